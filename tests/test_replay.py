"""`python -m devtools.replay`: recorded webhooks, signed, posted to a running bot."""
import os
import subprocess
import sys

from tests.support import FIXTURES, PSID, ROOT, wait_for
from tests.support.messages import IGSID

FIXTURE_COUNT = len(list(FIXTURES.glob("*.json")))


def replay(*args, cwd, **env):
    base = {k: v for k, v in os.environ.items() if not k.startswith("FB_")}
    return subprocess.run([sys.executable, "-m", "devtools.replay", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env={**base, "PYTHONPATH": str(ROOT), **env})


def test_replays_every_fixture_against_the_sandbox(sandbox, tmp_path):
    instagram = next(a for a in sandbox.state()["accounts"] if a["platform"] == "instagram")
    result = replay(str(FIXTURES), "--url", sandbox.webhook, cwd=tmp_path, FB_APP_SECRET=sandbox.app_secret,
                    FB_PAGE_ID=sandbox.state()["page"]["id"], FB_INSTAGRAM_ID=instagram["id"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == FIXTURE_COUNT + 1 and lines[-1] == f"{FIXTURE_COUNT} of {FIXTURE_COUNT} accepted"
    assert all(" 200 " in line and line.endswith(" ms") for line in lines[:-1])
    # The bot answered the replayed users through the emulator, which shows them in the page.
    assert wait_for(lambda: any(e["sender"] == "page" for e in sandbox.events("message", PSID)), 10)
    assert any(u["psid"] == PSID for u in sandbox.state()["users"])
    # The Instagram fixtures, addressed to the sandbox's Instagram account, are answered through it.
    first = sandbox.events("webhook", IGSID)[0]["body"]
    assert (first["object"], first["entry"][0]["id"]) == ("instagram", instagram["id"])
    assert wait_for(lambda: any(e["sender"] == "page" for e in sandbox.events("message", IGSID)), 10)
    assert {e["account"] for e in sandbox.events("message", IGSID)} == {instagram["id"]}
    assert {u["account"] for u in sandbox.state()["users"] if u["psid"] == IGSID} == {instagram["id"]}


def test_a_wrong_secret_is_reported_as_403_with_the_reason(sandbox, tmp_path):
    result = replay(str(FIXTURES / "text.json"), "--url", sandbox.webhook, cwd=tmp_path, FB_APP_SECRET="wrong")
    assert result.returncode == 1
    assert "text.json" in result.stdout and " 403 " in result.stdout
    assert "FB_APP_SECRET here is not the bot's app secret" in result.stdout
    assert "0 of 1 accepted" in result.stdout


def test_an_unreachable_url_is_a_clear_error(tmp_path):
    result = replay(str(FIXTURES), "--url", "http://127.0.0.1:9/webhook", cwd=tmp_path, FB_APP_SECRET="s")
    assert result.returncode != 0
    assert "cannot reach http://127.0.0.1:9/webhook: Connection refused" in result.stderr
    assert "Traceback" not in result.stderr


def test_refuses_to_run_without_a_secret_or_with_a_missing_file(tmp_path):
    result = replay(str(FIXTURES), "--url", "http://127.0.0.1:9/webhook", cwd=tmp_path)
    assert result.returncode == 2 and "FB_APP_SECRET is not set" in result.stderr
    missing = replay(str(tmp_path / "nope.json"), "--url", "http://127.0.0.1:9/", cwd=tmp_path, FB_APP_SECRET="s")
    assert missing.returncode == 2 and "no such file or folder" in missing.stderr


def test_verify_with_a_wrong_token_is_explained(sandbox, tmp_path):
    result = replay(str(FIXTURES / "text.json"), "--url", sandbox.webhook, "--verify", cwd=tmp_path,
                    FB_APP_SECRET=sandbox.app_secret, FB_VERIFY_TOKEN="not-the-token")
    assert result.returncode == 2 and "403, the bot refused FB_VERIFY_TOKEN" in result.stderr
