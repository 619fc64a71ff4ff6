"""A private, throwaway PostgreSQL server, for a test that must stop and start it.

The shared server (tests/support/postgres.py) serves every other PostgreSQL test at once,
so it is never restarted. This one is made with `initdb` in a temporary folder, listens
on 127.0.0.1 on a free port (trust auth, no Unix socket in a shared place) and is removed
afterwards. PostgreSQL refuses to run as root: as root, every server command runs as the
system user `postgres` (created with `useradd --system` if the machine has none).

The binaries come from PG_BIN_DIR, else the newest /usr/lib/postgresql/*/bin (Debian's
`postgresql` package), else `pg_ctl` on PATH. Without them the test is skipped with one
line saying so - unless BOT_REQUIRE_POSTGRES=1 (`.ci/run`): then it fails.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.support.processes import free_port

SERVER_USER = "postgres"  # who runs the server when the tests run as root
HOW = ("private PostgreSQL server skipped: no initdb/pg_ctl (apt-get install postgresql, "
       "or set PG_BIN_DIR to the folder holding them)")


def bin_dir() -> Path | None:
    """The folder with initdb, pg_ctl and postgres, or None."""
    candidates = []
    if os.environ.get("PG_BIN_DIR"):
        candidates.append(os.environ["PG_BIN_DIR"])
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                         key=lambda path: int(Path(path).parent.name) if Path(path).parent.name.isdigit() else 0,
                         reverse=True)
    if shutil.which("pg_ctl"):
        candidates.append(os.path.dirname(shutil.which("pg_ctl")))
    for folder in candidates:
        if all(os.access(os.path.join(folder, name), os.X_OK) for name in ("initdb", "pg_ctl", "postgres")):
            return Path(folder)
    return None


def require_binaries() -> Path:
    """The binaries' folder; the test is skipped (failed under BOT_REQUIRE_POSTGRES=1) without them."""
    folder = bin_dir()
    if folder is None:
        if os.environ.get("BOT_REQUIRE_POSTGRES") == "1":
            pytest.fail("BOT_REQUIRE_POSTGRES=1 but " + HOW.split(": ", 1)[1])
        pytest.skip(HOW)
    return folder


def _server_account() -> pwd.struct_passwd | None:
    """None when the tests do not run as root (the server runs as this user); else `postgres`."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVER_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVER_USER],
                       check=True, capture_output=True)
        return pwd.getpwnam(SERVER_USER)


class PgServer:
    """One private PostgreSQL cluster: `start()`, `stop()`, `restart()`, `destroy()`; `url` to connect."""

    def __init__(self, folder: Path | None = None, **settings: str):
        self.bin = folder or require_binaries()
        self.account = _server_account()
        self.port = free_port()
        # Not pytest's tmp_path: that is private to root (0700), and the server user must reach it.
        self.root = Path(tempfile.mkdtemp(prefix="bot-pg-"))
        self.data = self.root / "data"
        self.logfile = self.root / "server.log"
        self.settings = {"listen_addresses": "'127.0.0.1'", "port": str(self.port),
                         "unix_socket_directories": f"'{self.root}'",
                         # No OS crash happens in a test: the kernel keeps every committed write
                         # through a stop, a restart or a kill of the server, so fsync only costs time.
                         "fsync": "off", "full_page_writes": "off",
                         **settings}
        if self.account:
            os.chown(self.root, self.account.pw_uid, self.account.pw_gid)
        self._initdb()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """A server command, as the server's user, that must succeed."""
        extra = {}
        if self.account:
            extra = {"user": self.account.pw_uid, "group": self.account.pw_gid, "extra_groups": []}
        result = subprocess.run([str(self.bin / args[0]), *args[1:]], cwd=self.root, capture_output=True, text=True,
                                timeout=timeout, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                                                      "LC_ALL": "C", "HOME": str(self.root)}, **extra)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stdout}{result.stderr}\n"
                               f"{self.log_tail()}")
        return result

    def _initdb(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-locale",
                  "-E", "UTF8", "--no-sync")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write("\n# tests/support/pgserver.py\n")
            conf.writelines(f"{name} = {value}\n" for name, value in self.settings.items())

    def start(self) -> "PgServer":
        self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "30")
        return self

    def stop(self, mode: str = "fast") -> None:
        """fast: clients disconnected, clean shutdown; immediate: as if the server crashed."""
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w", "-t", "30")

    def restart(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "restart", "-D", str(self.data), "-m", mode, "-l", str(self.logfile), "-w", "-t", "30")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def destroy(self) -> None:
        """Stop it if it runs (immediately), and delete the cluster."""
        try:
            if self.running():
                self.stop("immediate")
        except (RuntimeError, subprocess.TimeoutExpired):
            pid = self._postmaster_pid()
            if pid:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
                time.sleep(0.5)
        shutil.rmtree(self.root, ignore_errors=True)

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return None
