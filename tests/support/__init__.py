"""Helpers shared by the tests (and docs/screenshot.py): one home, so no test imports another."""
from tests.support.messages import (  # noqa: F401
    APP_SECRET, FIXTURES, FakeClock, PAGE_ID, PAGE_TOKEN, PSID, ROOT, VERIFY_TOKEN, answer_queue, base_env, echo_body,
    fixture_bytes, incompressible_title, post_signed, replay, text_body, wait_for,
)
from tests.support.processes import (  # noqa: F401
    Bot, SandboxProcess, free_port, is_up, reply_process_pid, start_gunicorn, wait_until,
)
