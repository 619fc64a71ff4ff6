"""The sandbox's web page: a Messenger-like chat that drives the emulator and shows its timeline."""
from __future__ import annotations

import mimetypes
from pathlib import Path

from werkzeug.wrappers import Request, Response

from devtools.emulator.graph import GraphEmulator
from devtools.emulator.http import LocalServer, json_response

STATIC = Path(__file__).parent / "static"
MAX_TEXT = 2000  # what Messenger lets a user type in one message


class SandboxPage(LocalServer):
    """`/` the chat page; `/api/state` the timeline since a number; `/api/users/<psid>/…` what a user does."""

    def __init__(self, graph: GraphEmulator, info: dict, host: str = "127.0.0.1", port: int = 0):
        super().__init__(host, port)
        self.graph = graph
        self.info = info  # page name and id, the model's label, the bot's address: shown in the header

    def handle(self, request: Request) -> Response:
        path = request.path
        if request.method == "GET" and path in ("/", "/index.html"):
            return self._static("index.html")
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
        users = [{"psid": psid, "name": name} for psid, name in self.graph.users.items()]
        return json_response({**self.info, "users": users, "events": events})

    def _act(self, psid: str, action: str, body) -> Response:
        if psid not in self.graph.users:
            return json_response({"error": "no such user"}, 404)
        if not isinstance(body, dict):
            return json_response({"error": "send a JSON object"}, 400)
        text = str(body.get("text", "")).strip()
        if action == "image":
            mid = self.graph.user_writes(psid, image_url=f"{self.url}/static/sample.svg")
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
