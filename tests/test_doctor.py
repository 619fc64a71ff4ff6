"""`python -m bot doctor`, run as a real subprocess against the emulator's Graph API and model stand-in
(real `requests` and `openai` clients): each check passing, and failing with its advice; the exit
status; every Page checked; a real HTTPS handshake against the real app; never a token or secret
in the output."""
from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import sys
import threading
import time
from datetime import date

import pytest
from werkzeug.serving import make_server

from bot.doctor import graph_version, token_checks
from bot.web.app import create_app
from config import load_config
from tests.support import APP_SECRET, PAGE_ID, PAGE_TOKEN, ROOT, VERIFY_TOKEN, base_env, free_port
from tests.test_emulator_setup import APP_ID, PAGE2_ID, PAGE2_TOKEN, graph  # noqa: F401 - graph: the fixture



@pytest.fixture
def env(graph, model, tmp_path):
    return {**base_env(graph, model, tmp_path), "FB_APP_ID": APP_ID}


def doctor(env: dict, *args: str, cwd=None, extra: dict | None = None) -> subprocess.CompletedProcess:
    """The command as a Page owner runs it: its own process, settings from the environment only."""
    process_env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "HOME": str(cwd or ROOT),
                   **env, **(extra or {})}
    done = subprocess.run([sys.executable, "-m", "bot", "doctor", *args], cwd=cwd or env["DATA_DIR"].rsplit("/", 1)[0],
                          env=process_env, capture_output=True, text=True, timeout=90)
    for secret in (PAGE_TOKEN, PAGE2_TOKEN, APP_SECRET, VERIFY_TOKEN, env["OPENAI_API_KEY"]):
        assert secret not in done.stdout + done.stderr
    return done


def line(output: str, start: str) -> str:
    """The first line with this beginning, and its advice line when it has one."""
    lines = output.splitlines()
    index = next(i for i, text in enumerate(lines) if text.startswith(start))
    advice = lines[index + 1] if index + 1 < len(lines) and lines[index + 1].startswith("    → ") else ""
    return lines[index] + ("\n" + advice if advice else "")


def test_a_well_set_up_page_passes_every_check(env):
    done = doctor(env)
    assert done.returncode == 0, done.stdout
    out = done.stdout
    assert line(out, "✓ settings").endswith("valid (1 Page)")
    assert "✓ Graph API version v26.0" in out
    assert f"✓ Page {PAGE_ID}: the token is valid, a Page token of this Page and app" in out
    assert f"✓ Page {PAGE_ID}: the token never expires" in out and "has pages_messaging" in out
    assert "✓ Page" in line(out, f"✓ Page {PAGE_ID}: the app is subscribed with messages, messaging_postbacks, message_echoes")
    assert f"✓ app {APP_ID} is public" in out
    assert "✓ model server" in out and "model gpt-4.1-mini is known" in out
    assert "✗" not in out and out.rstrip().endswith("All checks passed.")


def test_an_expired_token(env, graph):
    graph.expire_token(PAGE_ID)
    done = doctor(env)
    assert done.returncode == 1
    assert "A Page token that does not expire" in line(done.stdout, f"✗ Page {PAGE_ID}: the token is not valid")
    assert f"– Page {PAGE_ID}: webhook subscription not checked" in done.stdout
    assert "– app mode not checked: no Page token passed its check" in done.stdout


def test_a_token_expiring_soon(env, graph):
    graph.setup(PAGE_ID).expires_at = int(time.time()) + 3 * 3600
    done = doctor(env)
    assert done.returncode == 1
    shown = line(done.stdout, f"✗ Page {PAGE_ID}: the token expires on")
    assert "(in 3 hours)" in shown and "→ make a Page token that does not expire" in shown
    graph.setup(PAGE_ID).expires_at = int(time.time()) + 50 * 86400  # a long-lived one: not soon
    assert "✓ Page" in line(doctor(env).stdout, f"✓ Page {PAGE_ID}: the token expires on")


def test_soon_is_seven_days_before_the_expiry_on_the_moment_the_checks_are_given(env, graph):
    expires = 2_000_000_000
    graph.setup(PAGE_ID).expires_at = expires
    config = load_config(env, env_file=None)

    def expiry_line(now):
        return next(line for line in token_checks(config, PAGE_ID, PAGE_ID, PAGE_TOKEN, now)
                    if "expires on" in line.text)
    assert expiry_line(expires - 7 * 86400 - 1).ok and not expiry_line(expires - 7 * 86400 + 1).ok
    assert "(in 6 days" in expiry_line(expires - 6.5 * 86400).text


def test_another_pages_token(env):
    done = doctor({**env, "FB_PAGE_ACCESS_TOKEN": PAGE2_TOKEN})
    assert done.returncode == 1
    shown = line(done.stdout, f"✗ Page {PAGE_ID}: the token is Page {PAGE2_ID}'s")
    assert f"→ put the token of Page {PAGE_ID} in FB_PAGE_ACCESS_TOKEN" in shown


def test_a_token_without_pages_messaging(env, graph):
    graph.setup(PAGE_ID).scopes.remove("pages_messaging")
    done = doctor(env)
    assert done.returncode == 1
    assert "pages_messaging ticked" in line(done.stdout, f"✗ Page {PAGE_ID}: the token lacks pages_messaging")


def test_a_user_token_or_another_apps_token(env, graph):
    graph.setup(PAGE_ID).token_type = "USER"
    assert "✗ Page" in line(doctor(env).stdout, f"✗ Page {PAGE_ID}: this is a USER token, not a Page token")
    graph.setup(PAGE_ID).token_type, graph.setup(PAGE_ID).token_app_id = "PAGE", "777"
    assert "Graph API Explorer" in line(doctor(env).stdout, f"✗ Page {PAGE_ID}: the token was made for app 777")


def test_a_wrong_app_secret_for_the_app_token(env):
    done = doctor({**env, "FB_APP_ID": "5550000000000009"})
    assert done.returncode == 1
    assert "→ check FB_APP_ID and FB_APP_SECRET" in line(done.stdout, f"✗ Page {PAGE_ID}: the token cannot be checked")


def test_without_fb_app_id_the_token_is_read_through_me(env, graph):
    no_app = {k: v for k, v in env.items() if k != "FB_APP_ID"}
    done = doctor(no_app)
    assert done.returncode == 0, done.stdout
    assert f"✓ Page {PAGE_ID}: the token is valid and speaks for this Page (Ana's Bakery)" in done.stdout
    assert f"– Page {PAGE_ID}: expiry and app of the token not checked: set FB_APP_ID" in done.stdout
    assert "– app mode not checked: set FB_APP_ID" in done.stdout
    graph.setup(PAGE_ID).scopes = ["pages_show_list"]
    assert doctor(no_app).returncode == 1
    assert "✗" in line(doctor({**no_app, "FB_PAGE_ACCESS_TOKEN": PAGE2_TOKEN}).stdout,
                       f"✗ Page {PAGE_ID}: the token is Page {PAGE2_ID}'s (Ben's Bikes)")


@pytest.mark.parametrize("app_id", [True, False])
def test_a_graph_api_that_does_not_answer_is_the_network_not_a_refused_token(env, app_id):
    closed = f"http://127.0.0.1:{free_port()}/v26.0/"  # nothing listens there
    settings = env if app_id else {k: v for k, v in env.items() if k != "FB_APP_ID"}
    done = doctor({**settings, "FB_API_URL": closed})
    assert done.returncode == 1
    assert "check that this host reaches FB_API_URL" in line(done.stdout, f"✗ Page {PAGE_ID}: Meta's Graph API did not answer")
    assert "refused" not in done.stdout and "make a Page token" not in done.stdout


def test_the_webhook_subscription(env, graph):
    graph.setup(PAGE_ID).subscribed_fields = ["messages", "messaging_postbacks"]
    shown = line(doctor(env).stdout, f"✗ Page {PAGE_ID}: the app is subscribed without message_echoes")
    assert "subscribed_apps\" -d subscribed_fields=messages,messaging_postbacks,message_echoes" in shown
    graph.setup(PAGE_ID).subscribed_fields = None
    done = doctor(env)
    assert done.returncode == 1 and "Meta delivers nothing" in done.stdout


def test_development_mode(env, graph):
    graph.development_mode = True
    done = doctor(env)
    assert done.returncode == 1
    shown = line(done.stdout, f"✗ app {APP_ID} is hidden from the public: it is in Development mode")
    assert "only people with a role on the app" in shown and "→ App Dashboard: switch the app to Live" in shown


def test_the_model_server(env, model):
    model.models = {"gpt-4.1-mini"}
    shown = line(doctor({**env, "OPENAI_MODEL": "gpt-nope"}).stdout, "✗ model server")
    assert "does not know the model gpt-nope" in shown and "→ set OPENAI_MODEL" in shown
    assert "refuses OPENAI_API_KEY (401)" in doctor({**env, "OPENAI_API_KEY": "sk-wrong-key"}).stdout
    unreachable = doctor({**env, "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})
    assert unreachable.returncode == 1 and "unreachable (APIConnectionError)" in unreachable.stdout


def test_a_model_server_without_get_models_id_is_asked_for_its_list(env, model):
    """vLLM serves GET /v1/models but not GET /v1/models/{id}: its 404 says nothing of the model."""
    model.model_lookup = False
    model.models = {"Qwen/Qwen2.5-7B-Instruct", "meta-llama/Llama-3.1-8B-Instruct"}
    known = doctor({**env, "OPENAI_MODEL": "Qwen/Qwen2.5-7B-Instruct"}).stdout
    assert "✓ model server" in known and "model Qwen/Qwen2.5-7B-Instruct is known" in known
    shown = line(doctor({**env, "OPENAI_MODEL": "gpt-4.1-mini"}).stdout, "✗ model server")
    assert ("does not know the model gpt-4.1-mini (it lists Qwen/Qwen2.5-7B-Instruct, "
            "meta-llama/Llama-3.1-8B-Instruct)") in shown
    no_v1 = doctor({**env, "OPENAI_BASE_URL": model.url, "OPENAI_API_KEY": "sk-wrong-key"})  # 404 to everything
    assert no_v1.returncode == 1
    assert "→ check OPENAI_BASE_URL: an OpenAI-compatible server's address usually ends in /v1" in line(
        no_v1.stdout, "✗ model server")


def test_bad_settings_are_named_and_nothing_else_runs(env):
    done = doctor({k: v for k, v in env.items() if k != "FB_APP_SECRET"})
    assert done.returncode == 1
    assert "✗ settings: FB_APP_SECRET is required" in done.stdout and "Graph API version" not in done.stdout


def test_an_expired_graph_version(env):
    done = doctor({**env, "FB_API_URL": "http://127.0.0.1:9/v15.0/"})
    assert done.returncode == 1
    assert "→ use v26.0 in FB_API_URL" in line(done.stdout, "✗ Graph API version v15.0: expired on 2024-11-20")


def test_graph_version_table():
    assert graph_version("https://graph.facebook.com/v20.0/", date(2026, 9, 23)).ok
    assert not graph_version("https://graph.facebook.com/v20.0/", date(2026, 9, 24)).ok
    assert graph_version("https://graph.facebook.com/v27.0/", date(2027, 1, 1)).ok  # newer than the table
    assert not graph_version("https://graph.facebook.com/", date(2027, 1, 1)).ok  # no version at all
    assert not graph_version("https://graph.facebook.com/v2.12/", date(2027, 1, 1)).ok


def two_pages(env: dict, tmp_path) -> dict:
    """The settings with a PAGES_FILE of both emulated Pages instead of FB_PAGE_ID."""
    pages = tmp_path / "pages.toml"
    pages.write_text(f'[[pages]]\nid = "{PAGE_ID}"\naccess_token = "{PAGE_TOKEN}"\nname = "Ana\'s Bakery"\n\n'
                     f'[[pages]]\nid = "{PAGE2_ID}"\naccess_token = "{PAGE2_TOKEN}"\nname = "Ben\'s Bikes"\n')
    several = {k: v for k, v in env.items() if k not in ("FB_PAGE_ID", "FB_PAGE_ACCESS_TOKEN")}
    return {**several, "PAGES_FILE": str(pages)}


def test_every_page_is_checked(env, graph, tmp_path):
    graph.expire_token(PAGE2_ID)
    done = doctor(two_pages(env, tmp_path))
    assert done.returncode == 1 and "valid (2 Pages)" in done.stdout
    assert f"✓ Page Ana's Bakery ({PAGE_ID}): the token is valid" in done.stdout
    assert f"✗ Page Ben's Bikes ({PAGE2_ID}): the token is not valid" in done.stdout
    assert f"✓ app {APP_ID} is public" in done.stdout  # read with the Page token that works


# -- the public URL: a real TLS handshake with the real app ----------------------------------------
@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    """A CA of our own and a certificate it signed for 127.0.0.1 (openssl), and a self-signed one."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")

    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=doctor test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "san.ext")
    return folder


@pytest.fixture
def https_bot(env, certificates):
    """The real app's /webhook behind HTTPS on 127.0.0.1 (what a tunnel or proxy gives Meta)."""
    app = create_app(load_config(env, env_file=None), replies="manual")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificates / "server.pem", certificates / "server.key")
    server = make_server("127.0.0.1", 0, app, threaded=True, ssl_context=context)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_the_public_url_answers_the_handshake(env, https_bot, certificates):
    trusted = {"REQUESTS_CA_BUNDLE": str(certificates / "ca.pem")}
    done = doctor(env, "--url", https_bot, extra=trusted)
    assert done.returncode == 0, done.stdout
    assert f"✓ public URL {https_bot}/webhook: answers Meta's verify handshake over HTTPS" in done.stdout
    refused = doctor({**env, "FB_VERIFY_TOKEN": "another-verify-token"}, "--url", https_bot + "/webhook", extra=trusted)
    assert "→ the bot behind it has another FB_VERIFY_TOKEN" in line(refused.stdout, "✗ public URL")


def test_the_public_url_failures(env, https_bot):
    untrusted = doctor(env, "--url", https_bot)  # the system's CAs: our certificate is not one of theirs
    assert "Meta refuses self-signed" in line(untrusted.stdout, f"✗ public URL {https_bot}/webhook: its certificate is not trusted")
    plain = doctor(env, "--url", "http://127.0.0.1:9")
    assert plain.returncode == 1 and "not an https:// address" in plain.stdout
    for broken in ("https://[::1", "https://"):  # a bracket left open: a traceback, and no line printed
        result = doctor(env, "--url", broken)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert "not an https:// address with a host" in result.stdout and "✓ settings" in result.stdout
    assert "unreachable (ConnectionError)" in doctor(env, "--url", "https://127.0.0.1:9").stdout


def test_the_instagram_account_answered_is_the_pages_linked_one_and_the_token_may_answer_it(env, graph):
    graph.add_page("1000000000000007", "EAA-token-of-cleo", name="Cleo's Cakes", instagram_id="17841400000000007")
    cleo = {**env, "FB_PAGE_ID": "1000000000000007", "FB_PAGE_ACCESS_TOKEN": "EAA-token-of-cleo"}
    done = doctor({**cleo, "FB_INSTAGRAM_ID": "17841400000000007"})
    assert done.returncode == 0, done.stdout
    assert "✓ Page 1000000000000007: Instagram account 17841400000000007 is the one linked to this Page" in done.stdout
    assert "✓ Page 1000000000000007: the token has instagram_basic and instagram_manage_messages" in done.stdout
    wrong = doctor({**cleo, "FB_INSTAGRAM_ID": "17841400000000009"})
    assert wrong.returncode == 1 and "→ set the Instagram id to 17841400000000007" in line(
        wrong.stdout, "✗ Page 1000000000000007: the Page's Instagram account is 17841400000000007, not 17841400000000009")
    unlinked = doctor({**env, "FB_INSTAGRAM_ID": "17841400000000009"})  # Ana's Page has none
    assert f"✗ Page {PAGE_ID}: no Instagram account is linked to this Page" in unlinked.stdout
    graph.setup("1000000000000007").scopes.remove("instagram_manage_messages")
    assert "✗ Page 1000000000000007: the token lacks instagram_manage_messages" in doctor(
        {**cleo, "FB_INSTAGRAM_ID": "17841400000000007"}).stdout
