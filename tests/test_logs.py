"""Logging: secrets scrubbed from every line; libraries kept quiet."""
import logging

import pytest

from bot.telemetry.logs import configure_logging


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield
    root.handlers[:], level = saved
    root.setLevel(level)


def test_secret_in_a_log_line_is_redacted(capsys, restore_logging):
    configure_logging("INFO", ["EAAsecret-page-token-123", "short"])
    logging.getLogger("messenger.graph").error("call failed for %s with token %s", "psid1", "EAAsecret-page-token-123")
    err = capsys.readouterr().err
    assert "EAAsecret-page-token-123" not in err
    assert "call failed for psid1 with token [redacted]" in err


def test_debug_applies_to_the_bot_not_libraries(capsys, restore_logging):
    configure_logging("DEBUG", [])
    logging.getLogger("gpt.model").debug("own debug line")
    logging.getLogger("openai._base_client").debug("Request options: {'messages': ['user text']}")
    err = capsys.readouterr().err
    assert "own debug line" in err
    assert "user text" not in err
