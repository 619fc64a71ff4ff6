"""Shared fixtures: fake Graph and OpenAI servers, a Config aimed at them, the real app."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bot.web.app import create_app  # noqa: E402
from config import load_config  # noqa: E402
from messenger.signature import sign  # noqa: E402
from devtools.emulator import GraphEmulator, ModelStandIn  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
VERIFY_TOKEN = "verify-token-for-tests"
PAGE_ID = "1000000000000001"
PAGE_TOKEN = "EAAtest-page-token-0123456789"
APP_SECRET = "test-app-secret-0123456789abcdef"
PSID = "2000000000000001"


def fixture_bytes(name: str) -> bytes:
    """A recorded webhook body, byte for byte as Meta sent it."""
    return (FIXTURES / f"{name}.json").read_bytes()


def base_env(graph: GraphEmulator, model: ModelStandIn, tmp_path: Path) -> dict[str, str]:
    return {
        "FB_VERIFY_TOKEN": VERIFY_TOKEN,
        "FB_APP_SECRET": APP_SECRET,
        "FB_PAGE_ACCESS_TOKEN": PAGE_TOKEN,
        "FB_PAGE_ID": PAGE_ID,
        "FB_API_URL": graph.api_url,
        "OPENAI_API_KEY": ModelStandIn.API_KEY,
        "OPENAI_BASE_URL": model.base_url,
        "OPENAI_TIMEOUT": "2",
        "OPENAI_MAX_RETRIES": "0",
        "GRAPH_TIMEOUT": "2",
        "ERROR_LOG_FILE": str(tmp_path / "openai_api_errors.log"),
        "DATA_DIR": str(tmp_path / "data"),
    }


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
    def build(**overrides: str):
        config = load_config({**env, **overrides}, env_file=None)
        return create_app(config, replies="manual").test_client()
    return build


@pytest.fixture
def client(make_client):
    return make_client()


def post_signed(client, body: bytes, secret: str = APP_SECRET, header: str = "X-Hub-Signature-256", **headers):
    """POST `body` as Meta does: raw bytes, signed with the app secret."""
    algorithm = "sha1" if header == "X-Hub-Signature" else "sha256"
    return client.post("/webhook", data=body, content_type="application/json",
                       headers={header: sign(body, secret, algorithm), **headers})


def text_body(mid: str, text: str, psid: str = PSID, timestamp: int = 1763893200001) -> bytes:
    """A webhook body in Meta's shape for one text message."""
    event = {"sender": {"id": psid}, "recipient": {"id": PAGE_ID}, "timestamp": timestamp,
             "message": {"mid": mid, "text": text}}
    return json.dumps({"object": "page", "entry": [{"id": PAGE_ID, "time": timestamp, "messaging": [event]}]}).encode()


def echo_body(mid: str, text: str, psid: str = PSID, app_id: int | None = None, metadata: str | None = None,
              timestamp: int = 1763893200001) -> bytes:
    """What Meta sends (message_echoes) for a message the Page sent to `psid`."""
    message = {"mid": mid, "is_echo": True, "text": text}
    if app_id is not None:
        message["app_id"] = app_id
    if metadata is not None:
        message["metadata"] = metadata
    event = {"sender": {"id": PAGE_ID}, "recipient": {"id": psid}, "timestamp": timestamp, "message": message}
    return json.dumps({"object": "page", "entry": [{"id": PAGE_ID, "time": timestamp, "messaging": [event]}]}).encode()


def wait_for(predicate, seconds: float = 5.0) -> bool:
    """Poll `predicate` until it holds (work that runs beside the reply, e.g. sender actions)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def answer_queue(client) -> int:
    """Answer what the webhook stored, as the reply threads would."""
    return client.application.extensions["dispatcher"].run_pending()


def replay(client, name: str):
    """Post a recorded fixture, then let the bot answer it."""
    response = post_signed(client, fixture_bytes(name))
    answer_queue(client)
    return response


class SandboxProcess:
    """`python -m devtools.sandbox --port 0` as a newcomer runs it, read from what it prints."""

    def __init__(self, cwd: Path, extra_env: dict[str, str] | None = None):
        import os
        import re
        import subprocess

        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "FB_"))}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "devtools.sandbox", "--port", "0"], cwd=cwd, text=True,
            env={**env, "PYTHONPATH": str(ROOT), **(extra_env or {})},
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        banner = "".join(self.process.stdout.readline() for _ in range(5))
        found = re.search(r"open (\S+)/\n.*webhook: (\S+)\n.*FB_APP_SECRET=(\S+)", banner, re.S)
        if not found:
            self.stop()
            raise RuntimeError(f"the sandbox did not start: {banner!r}")
        self.url, self.webhook, self.app_secret = found.groups()

    def state(self, after: int = 0) -> dict:
        import requests
        return requests.get(f"{self.url}/api/state", params={"after": after}, timeout=5).json()

    def events(self, kind: str, psid: str | None = None) -> list[dict]:
        return [e for e in self.state()["events"] if e["kind"] == kind and (psid is None or e["psid"] == psid)]

    def stop(self) -> int:
        self.process.terminate()
        return self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    running = SandboxProcess(tmp_path_factory.mktemp("sandbox"))
    yield running
    running.stop()
