"""Shared fixtures: fake Graph and OpenAI servers, a Config aimed at them, the real app.
The helpers they use live in tests/support/."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot.web.app import create_app  # noqa: E402
from config import load_config  # noqa: E402
from devtools.emulator import GraphEmulator, ModelStandIn  # noqa: E402
from tests.support import (  # noqa: E402,F401 - the names tests imported from here before tests/support/
    APP_SECRET, FIXTURES, PAGE_ID, PAGE_TOKEN, PSID, ROOT, VERIFY_TOKEN, SandboxProcess, answer_queue, base_env,
    echo_body, fixture_bytes, post_signed, replay, text_body, wait_for,
)


@pytest.fixture
def graph():
    server = GraphEmulator(PAGE_ID, PAGE_TOKEN, APP_SECRET).start()
    yield server
    server.stop()


@pytest.fixture
def model():
    server = ModelStandIn().start()
    yield server
    server.stop()


@pytest.fixture
def env(graph, model, tmp_path) -> dict[str, str]:
    """Settings as a Page owner's .env would hold them; tests tweak before use."""
    return base_env(graph, model, tmp_path)


@pytest.fixture
def make_client(env):
    """Build the real app without reply threads: `replay` answers the queue in the test's thread."""
    def build(clock=None, **overrides: str):
        config = load_config({**env, **overrides}, env_file=None)
        timing = {"clock": clock, "sleep": clock.sleep} if clock else {}
        return create_app(config, replies="manual", **timing).test_client()
    return build


@pytest.fixture
def client(make_client):
    return make_client()


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    running = SandboxProcess(tmp_path_factory.mktemp("sandbox"))
    yield running
    running.stop()


@pytest.fixture
def pg_url():
    """A PostgreSQL database URL of this test's own (skipped without a server; see tests/support/postgres.py)."""
    from tests.support.postgres import fresh_schema

    with fresh_schema() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request, tmp_path):
    """Each storage backend in turn: (name, settings that select it)."""
    if request.param == "sqlite":
        yield "sqlite", {}
    else:
        from tests.support.postgres import fresh_schema

        with fresh_schema() as url:
            yield "postgres", {"DATABASE_URL": url}


def pytest_sessionfinish(session, exitstatus):
    """Under CI (BOT_NO_SKIPS=1, set by `.ci/run`) a skipped test fails the run: a tool missing from
    the machine (systemd-analyze, openssl, ...) must not let its tests pass unseen."""
    import os

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if os.environ.get("BOT_NO_SKIPS") == "1" and skipped and exitstatus == 0:
        reporter.ensure_newline()
        for report in skipped:
            reporter.write_line(f"BOT_NO_SKIPS=1 but skipped: {report.nodeid} ({report.longrepr[-1]})", red=True)
        session.exitstatus = 1
