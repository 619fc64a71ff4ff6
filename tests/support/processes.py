"""The bot and the sandbox as real processes: `gunicorn server:app` as the README runs it."""
from __future__ import annotations

import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from bot.storage.queue import PostgresQueue, SQLiteQueue
from messenger.signature import sign
from tests.support.messages import APP_SECRET, ROOT, base_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gunicorn(env: dict, cwd, output=subprocess.PIPE, open_files: int | None = None) -> subprocess.Popen:
    """Exactly the README's run command, from a folder with no .env of the developer's.

    Its own session, so a test can kill -9 the master and every worker at once. `open_files`
    lowers the file-descriptor limit (`ulimit -n`) of gunicorn and everything it starts.
    """
    def limit_open_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

    return subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"), "server:app"],
        cwd=cwd, env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), **env},
        stdout=output, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        preexec_fn=limit_open_files if open_files else None,
    )


def wait_until(predicate, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def is_up(url):
    try:
        return requests.get(url + "/healthz", timeout=0.5).status_code == 200
    except requests.RequestException:
        return False


class Bot:
    """One `gunicorn server:app` run; start again with the same DATA_DIR to restart."""

    def __init__(self, graph, model, tmp_path, **settings):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**base_env(graph, model, tmp_path), "PORT": str(self.port), "HOST": "127.0.0.1",
                    "LEASE_SECONDS": "2", **settings}
        self.tmp_path = tmp_path
        self.log = open(tmp_path / "gunicorn.log", "a")
        self.process = None

    def start(self):
        self.process = start_gunicorn(self.env, self.tmp_path, output=self.log)
        assert wait_until(lambda: is_up(self.url), 15), "gunicorn did not start"
        return self

    def post(self, body: bytes) -> requests.Response:
        return requests.post(self.url + "/webhook", data=body, timeout=5,
                             headers={"X-Hub-Signature-256": sign(body, APP_SECRET)})

    def kill_9(self):
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=60)

    def log_text(self) -> str:
        self.log.flush()
        return (self.tmp_path / "gunicorn.log").read_text()[-3000:]

    def queue(self):
        """The bot's store, as another process opens it (SQLite in DATA_DIR, or DATABASE_URL)."""
        if self.env.get("DATABASE_URL"):
            return PostgresQueue(self.env["DATABASE_URL"], pool_size=2)
        return SQLiteQueue(os.path.join(self.env["DATA_DIR"], "bot.sqlite3"))

    def states(self):
        queue = self.queue()
        try:
            return queue.states()
        finally:
            queue.close()

    def backlog(self) -> int:
        """Acknowledged but not yet in the queue: records in the inbox files (none with PostgreSQL)."""
        if self.env.get("DATABASE_URL"):
            return 0
        store = SQLiteQueue(os.path.join(self.env["DATA_DIR"], "bot.sqlite3"))
        return store.inbox_backlog(os.path.join(self.env["DATA_DIR"], "inbox"))[0]


class SandboxProcess:
    """`python -m devtools.sandbox --port 0` as a newcomer runs it, read from what it prints."""

    def __init__(self, cwd: Path, extra_env: dict[str, str] | None = None):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "FB_"))}
        self.stderr = Path(cwd) / "sandbox-stderr.log"  # its log; a stop past STOP_WITHIN_S adds every stack
        with open(self.stderr, "w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "devtools.sandbox", "--port", "0"], cwd=cwd, text=True,
                env={**env, "PYTHONPATH": str(ROOT), **(extra_env or {})},
                stdout=subprocess.PIPE, stderr=stderr,
            )
        self.banner = "".join(self.process.stdout.readline() for _ in range(5))
        found = re.search(r"open (\S+)/\n.*webhook: (\S+)\n.*FB_APP_SECRET=(\S+)", self.banner, re.S)
        if not found:
            self.process.kill()
            self.process.wait()
            raise RuntimeError(f"the sandbox did not start: {self.banner!r}; its log ends:\n{self.log()[-6000:]}")
        self.url, self.webhook, self.app_secret = found.groups()

    def state(self, after: int = 0) -> dict:
        return requests.get(f"{self.url}/api/state", params={"after": after}, timeout=5).json()

    def events(self, kind: str, psid: str | None = None) -> list[dict]:
        return [e for e in self.state()["events"] if e["kind"] == kind and (psid is None or e["psid"] == psid)]

    def stop(self) -> int:
        """As Ctrl-C does: its exit status, which says whether it stopped in order (0) or was cut
        off by its own STOP_WITHIN_S (1: every thread's stack is then at the end of its log)."""
        self.process.terminate()
        try:
            return self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"the sandbox did not stop within 10 s; its log ends:\n{self.log()[-6000:]}")

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")


def _children(bot) -> list[tuple[int, bytes]]:
    """(pid, command line) of each child of `bot`'s gunicorn master."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = open(f"/proc/{entry}/cmdline", "rb").read()
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == bot.process.pid:
                found.append((int(entry), cmdline))
    return found


def worker_pids(bot) -> set[int]:
    """The pids of `bot`'s webhook workers (its master's children but the reply process)."""
    return {pid for pid, cmdline in _children(bot) if b"gunicorn" in cmdline}


def reply_process_pid(bot) -> int | None:
    """The pid of `bot`'s reply process (a child of its gunicorn master), if one runs."""
    return next((pid for pid, cmdline in _children(bot) if b"bot.runtime.reply_process" in cmdline), None)
