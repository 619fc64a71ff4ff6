"""The website chat's listener as a real process (`python -m bot.webchat.serve`), read over HTTP."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import requests

from bot.storage.queue import PostgresQueue, SQLiteQueue
from tests.support.messages import ROOT, base_env
from tests.support.processes import free_port, wait_until


def parse_events(text: str) -> list[tuple[str, dict]]:
    """Server-sent events as (name, data) pairs."""
    events = []
    for block in text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in lines:
            events.append((lines["event"], json.loads(lines.get("data", "null"))))
    return events


class WebchatProcess:
    def __init__(self, graph, model, tmp_path, **settings: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**base_env(graph, model, tmp_path), "WEBCHAT": "on", "WEBCHAT_PORT": str(self.port),
                    "HOST": "127.0.0.1", "PORT": str(free_port()), **settings}
        os.makedirs(self.env["DATA_DIR"], exist_ok=True)
        self.log_path = tmp_path / f"webchat-{self.port}.log"
        self.process = subprocess.Popen([sys.executable, "-m", "bot.webchat.serve"], cwd=tmp_path,
                                        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), **self.env},
                                        stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT,
                                        start_new_session=True)
        if not wait_until(self._up, 15):
            self.stop()
            raise RuntimeError("the website chat did not start:\n" + self.log())

    def _up(self) -> bool:
        try:
            return requests.get(self.url + "/healthz", timeout=0.5).status_code == 200
        except requests.RequestException:
            return False

    def chat(self, message=None, *, stream: bool = False, headers: dict | None = None, timeout: float = 15,
             **fields) -> requests.Response:
        body = {**({"message": message} if message is not None else {}), **fields}
        accept = {"Accept": "text/event-stream"} if stream else {}
        return requests.post(self.url + "/api/chat", json=body, headers={**accept, **(headers or {})},
                             timeout=timeout)

    def store(self):
        if self.env.get("DATABASE_URL"):
            return PostgresQueue(self.env["DATABASE_URL"], pool_size=2)
        return SQLiteQueue(os.path.join(self.env["DATA_DIR"], "bot.sqlite3"))

    def exchanges(self, **filters) -> list[dict]:
        store = self.store()
        try:
            return list(store.conversations.export(**filters))
        finally:
            store.close()

    def log(self) -> str:
        return self.log_path.read_text()[-4000:]

    def stop(self) -> int | None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.returncode
