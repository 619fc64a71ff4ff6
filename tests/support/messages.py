"""Meta's side of a test: the test Page's settings and webhook bodies in Meta's shape, signed."""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

from werkzeug.wrappers import Response

from devtools.emulator import GraphEmulator, LocalServer, ModelStandIn
from messenger.signature import is_valid_signature, sign

ROOT = Path(__file__).resolve().parent.parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
VERIFY_TOKEN = "verify-token-for-tests"
PAGE_ID = "1000000000000001"
PAGE_TOKEN = "EAAtest-page-token-0123456789"
APP_SECRET = "test-app-secret-0123456789abcdef"
PSID = "2000000000000001"
# The Instagram account linked to the test Page, and a user who writes to it (tests/fixtures/instagram_*.json).
INSTAGRAM_ID = "17841400000000001"
IGSID = "3000000000000001"


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
        # Meta's disclosure line is on by default; tests that check it turn it on again
        # (tests/test_meta_rules.py), the others compare replies word for word.
        "DISCLOSURE": "off",
    }


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


class FakeClock:
    """Wall time for the bot under test (`create_app(clock=...)`): it moves only when told."""

    def __init__(self, start: float | None = None):
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def sleep(self, seconds: float) -> None:
        """A wait in the code under test passes fake time only."""
        self.advance(seconds)


class TickingClock(FakeClock):
    """A clock each reading of which moves it `step` on: a loop that reads it after every piece
    of work sees time pass piece by piece, with no real waiting."""

    def __init__(self, step: float, start: float = 0.0):
        super().__init__(start)
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


class Trickle(LocalServer):
    """A server that sends `size` bytes of `content_type` one at a time, 20 ms apart (so each
    read gets a little, and none times out); `sent` counts them."""

    def __init__(self, content_type: str, size: int = 400):
        super().__init__()
        self.content_type, self.size, self.sent = content_type, size, 0

    def handle(self, request):
        def body():
            for _ in range(self.size):
                time.sleep(0.02)
                self.sent += 1
                yield b"x"
        return Response(body(), headers={"Content-Type": self.content_type, "Content-Length": str(self.size)})


class Receiver(LocalServer):
    """A bot stand-in for the emulator's deliveries: checks Meta's signatures (both headers), answers
    scripted statuses, records bodies. GET answers the handshake for the verify token "right"."""

    def __init__(self, statuses=(), sleep=0.0):
        super().__init__()
        self.statuses = list(statuses)
        self.sleep = sleep
        self.bodies: list[bytes] = []
        self.signed: list[bool] = []

    def handle(self, request):
        if request.method == "GET":
            ok = request.args.get("hub.verify_token") == "right"
            return Response(request.args["hub.challenge"] if ok else "no", 200 if ok else 403)
        body = request.get_data()
        self.signed.append(is_valid_signature(body, request.headers, APP_SECRET)
                           and is_valid_signature(body, {"X-Hub-Signature": request.headers["X-Hub-Signature"]},
                                                  APP_SECRET))
        self.bodies.append(body)  # last: a test waiting for a body finds its signature checked
        time.sleep(self.sleep)
        return Response("EVENT_RECEIVED", self.statuses.pop(0) if self.statuses else 200)


def shape(value, key=None):
    """Keys and kinds of values, and the attachment types themselves: what the emulator's bodies
    must share with Meta's documented ones (tests/fixtures/attachment_*.json)."""
    if isinstance(value, dict):
        return {k: shape(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value]
    return value if key == "type" else type(value).__name__


def incompressible_title(seed: int, length: int = 3000) -> str:
    """CJK characters at random: a postback title that PostgreSQL's compression cannot bring under
    its unique-index limit (2,704 bytes)."""
    draw = random.Random(seed)
    return "".join(chr(draw.randrange(0x4E00, 0x9FFF)) for _ in range(length))
