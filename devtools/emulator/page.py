"""The sandbox's web page: a Messenger-like chat that drives the emulator and shows its timeline."""
from __future__ import annotations

import mimetypes
import struct
from pathlib import Path

from werkzeug.wrappers import Request, Response

from devtools.emulator.graph import GraphEmulator
from devtools.emulator.http import LocalServer, json_response

STATIC = Path(__file__).parent / "static"
MAX_TEXT = 2000  # what Messenger lets a user type in one message
# What the page's media buttons send: a real photo, and a spoken question (espeak-ng, 16 kHz mono) that
# a real model transcribes to "What time do you open on Sundays?".
SAMPLE_PHOTO = ("sample-photo.jpg", "image/jpeg")
SAMPLE_VOICE = ("sample-voice.wav", "audio/wav")


def _favicon(size: int = 16, rgb: tuple[int, int, int] = (0, 132, 255)) -> bytes:
    """A Messenger-blue disc as a 32-bit .ico, drawn here rather than stored as a binary file."""
    centre, radius = (size - 1) / 2, size / 2 - 0.5
    pixels = b"".join(
        bytes((rgb[2], rgb[1], rgb[0], 255 if (x - centre) ** 2 + (y - centre) ** 2 <= radius ** 2 else 0))
        for y in range(size) for x in range(size))  # rows bottom-up, as BMP stores them (a disc is symmetric)
    mask = bytes(((size + 31) // 32) * 4 * size)  # the AND mask: unused with an alpha channel
    image = struct.pack("<IiiHHIIiiII", 40, size, size * 2, 1, 32, 0, len(pixels) + len(mask), 0, 0, 0, 0)
    image += pixels + mask
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", size, size, 0, 0, 1, 32, len(image), 22) + image


FAVICON = _favicon()


class SandboxPage(LocalServer):
    """`/` the chat page; `/api/state` the accounts, users and the timeline since a number;
    `/api/users/<psid>/…` what a user does (to the account they write to), what a person does in
    the Page inbox (`inbox`: answers, `handback`: passes the thread back to the bot), and
    `close-window`: Meta's messaging window for the user closes (the sandbox's emulator only)."""

    def __init__(self, graph: GraphEmulator, info: dict, host: str = "127.0.0.1", port: int = 0):
        super().__init__(host, port)
        self.graph = graph
        self.info = info  # page name and id, the model's label, the bot's address: shown in the header
        self.samples = {name: ((STATIC / name).read_bytes(), mime) for name, mime in (SAMPLE_PHOTO, SAMPLE_VOICE)}

    def handle(self, request: Request) -> Response:
        path = request.path
        if request.method == "GET" and path in ("/", "/index.html"):
            return self._static("index.html")
        if request.method == "GET" and path == "/favicon.ico":
            return Response(FAVICON, mimetype="image/x-icon", headers={"Cache-Control": "max-age=86400"})
        if request.method == "GET" and path.startswith("/static/"):
            return self._static(path.removeprefix("/static/"))
        if request.method == "GET" and path == "/api/state":
            return self._state(request)
        parts = path.strip("/").split("/")
        if request.method == "POST" and len(parts) == 4 and parts[:2] == ["api", "users"]:
            return self._act(parts[2], parts[3], request.get_json(silent=True))
        return json_response({"error": "not found"}, 404)

    def _static(self, name: str) -> Response:
        file = (STATIC / name).resolve()
        if STATIC.resolve() not in file.parents or not file.is_file():
            return json_response({"error": "not found"}, 404)
        return Response(file.read_bytes(), mimetype=mimetypes.guess_type(file.name)[0] or "application/octet-stream",
                        headers={"Cache-Control": "no-store"})

    def _state(self, request: Request) -> Response:
        after = request.args.get("after", "0")
        if not after.isdigit():
            return json_response({"error": "after must be a number"}, 400)
        events = self.graph.timeline.after(int(after))
        accounts = self.graph.accounts
        users = [{"psid": psid, "name": name, "account": accounts.account_of(psid).id,
                  "with_person": self.graph.thread_owner(psid) != self.graph.app_id}  # passed to the inbox
                 for psid, name in list(self.graph.users.items())]
        shown = [{"id": a.id, "page_id": a.page_id, "platform": a.platform, "name": a.name,
                  "label": f"{a.name} \u00b7 {a.platform.capitalize()}"} for a in accounts.accounts.values()]
        return json_response({**self.info, "accounts": shown, "users": users, "events": events})

    def _act(self, psid: str, action: str, body) -> Response:
        if psid not in self.graph.users:
            return json_response({"error": "no such user"}, 404)
        if not isinstance(body, dict):
            return json_response({"error": "send a JSON object"}, 400)
        text = str(body.get("text", "")).strip()
        if action in ("image", "voice", "like"):
            mid = self._send_media(psid, action)
        elif action == "handback":
            return self._hand_back(psid)
        elif action == "close-window" and hasattr(self.graph, "close_window"):  # devtools.sandbox.SandboxGraph
            self.graph.close_window(psid)
            return json_response({}, 202)
        elif not text or len(text) > MAX_TEXT:
            return json_response({"error": f"text must be 1 to {MAX_TEXT} characters"}, 400)
        elif action == "messages":
            mid = self.graph.user_writes(psid, text=text, quick_reply=body.get("quick_reply"))
        elif action == "postback":
            mid = self.graph.user_writes(psid, text=text, postback=str(body.get("payload") or text))
        elif action == "inbox":
            mid = self.graph.inbox_reply(psid, text)
        else:
            return json_response({"error": "no such action"}, 404)
        return json_response({"mid": mid}, 202)

    def _hand_back(self, psid: str) -> Response:
        """The person in the Page inbox is done ("Move to done"): the thread goes back to the bot's app,
        which Meta tells with a `pass_thread_control` webhook."""
        account = self.graph.accounts.account_of(psid).id
        self.graph.timeline.add("handover", psid, action="pass_thread_control", by="inbox", to="bot", account=account)
        self.graph.inbox_passes_back(psid, "the person in the Page inbox is done")
        return json_response({}, 202)

    def _send_media(self, psid: str, action: str) -> str:
        """The media buttons: the sample photo or voice note, served by the emulator's CDN, or a like."""
        if action == "like":
            return self.graph.user_sends_sticker(psid)
        data, mime = self.samples[(SAMPLE_PHOTO if action == "image" else SAMPLE_VOICE)[0]]
        if action == "image":
            return self.graph.user_sends_photo(psid, data, content_type=mime)
        return self.graph.user_sends_voice(psid, data, content_type=mime)
