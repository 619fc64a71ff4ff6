"""The bot as it runs in production: `gunicorn server:app` in a real process."""
import os
import signal
import subprocess
import sys
import time

import pytest
import requests

from messenger.signature import sign
from tests.support import (APP_SECRET, PAGE_TOKEN, PSID, ROOT, VERIFY_TOKEN, base_env, fixture_bytes, free_port, is_up,
                           start_gunicorn, wait_until)
from devtools.emulator import ModelStandIn


@pytest.fixture
def bot(graph, model, tmp_path):
    port = free_port()
    env = {**base_env(graph, model, tmp_path), "PORT": str(port), "HOST": "127.0.0.1", "LOG_LEVEL": "DEBUG"}
    process = start_gunicorn(env, tmp_path)
    url = f"http://127.0.0.1:{port}"
    assert wait_until(lambda: is_up(url) or process.poll() is not None), "gunicorn did not start"
    yield url, process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def test_answers_a_signed_webhook_after_acknowledging_it(bot, graph, model):
    url, _ = bot
    model.delay = 1.0
    body = fixture_bytes("text")
    started = time.monotonic()
    response = requests.post(url + "/webhook", data=body, timeout=5, headers={
        "Content-Type": "application/json", "X-Hub-Signature-256": sign(body, APP_SECRET)})
    acknowledged = time.monotonic() - started
    assert response.status_code == 200
    assert acknowledged < 0.5, "the 200 must not wait for the model"
    assert wait_until(lambda: graph.sent_texts(PSID) == ["Hello from the model."])
    # /metrics sums every process: a webhook worker counted the delivery, the reply process the send.
    # (A prometheus_client imported by the gunicorn master before PROMETHEUS_MULTIPROC_DIR is set
    # leaves every worker counting in memory, and /metrics without the webhook's lines.)
    exposed = requests.get(url + "/metrics", timeout=5).text
    assert 'messenger_webhooks_received_total{result="accepted"} 1.0' in exposed
    assert "messenger_replies_sent_total 1.0" in exposed


def test_verification_and_logs_hold_no_secret(bot, graph):
    url, process = bot
    query = {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "4242"}
    assert requests.get(url + "/webhook", params=query, timeout=5).text == "4242"
    body = fixture_bytes("non_ascii")
    requests.post(url + "/webhook", data=body, timeout=5, headers={
        "X-Hub-Signature-256": sign(body, APP_SECRET), "X-Forwarded-For": "198.51.100.4"})
    requests.post(url + "/webhook", data=b"{}", timeout=5, headers={"X-Hub-Signature-256": "sha256=00"})
    assert wait_until(lambda: len(graph.sent_texts(PSID)) == 1)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=30)[0]
    assert "GET /webhook " in output and "POST /webhook " in output  # the access log is on
    assert f"Listening at: 127.0.0.1:{url.rsplit(':', 1)[1]} (each worker's own socket)" in output
    for secret in (VERIFY_TOKEN, APP_SECRET, PAGE_TOKEN, ModelStandIn.API_KEY):
        assert secret not in output
    assert "Bonjour" not in output  # no message body either


def test_bad_settings_stop_start_up_with_one_message(tmp_path):
    env = {"FB_PAGE_ID": "not-a-number", "MESSAGE_COUNT": "50", "PORT": str(free_port())}
    process = start_gunicorn(env, tmp_path)
    output = process.communicate(timeout=30)[0]
    assert process.returncode != 0
    assert "Traceback" not in output
    assert output.count("Invalid configuration") == 1
    for problem in ("FB_VERIFY_TOKEN is required", "FB_APP_SECRET is required", "FB_PAGE_ACCESS_TOKEN is required",
                    "OPENAI_API_KEY is required", "FB_PAGE_ID must be digits only", "MESSAGE_COUNT must be between"):
        assert problem in output


def test_replay_command_against_plain_gunicorn_with_secrets_from_dotenv(bot, graph, tmp_path):
    url, _ = bot
    (tmp_path / "replay").mkdir()
    (tmp_path / "replay" / ".env").write_text(f"FB_APP_SECRET={APP_SECRET}\nFB_VERIFY_TOKEN={VERIFY_TOKEN}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FB_")}
    result = subprocess.run(
        [sys.executable, "-m", "devtools.replay", str(ROOT / "tests/fixtures/text.json"), "--url", url + "/webhook",
         "--verify"], cwd=tmp_path / "replay", env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("verify: 200, challenge echoed\ntext.json")
    assert wait_until(lambda: graph.sent_texts(PSID) == ["Hello from the model."])
