"""Docker for the tests: a dockerd of their own, on loopback only, and the bot's containers.

No registry is reachable here, so nothing is pulled: the images are made on this machine
(tests/support/docker_images.py). The daemon has no bridge and no iptables rules; every
container runs with `--network host` against the emulator on 127.0.0.1. Its data root is
kept across runs (BOT_DOCKER_STATE, default /var/cache/messenger-gpt-bot-tests), so the base
images are made once. Without root or apt the tests are skipped with the reason - unless
BOT_REQUIRE_DOCKER=1 (`.ci/run` sets it): then they fail.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests

from devtools.emulator import ModelStandIn
from tests.support.messages import APP_SECRET, PAGE_ID, PAGE_TOKEN, VERIFY_TOKEN

STATE = Path(os.environ.get("BOT_DOCKER_STATE", "/var/cache/messenger-gpt-bot-tests"))
# Debian's packages; /usr/local/bin/docker may be a newer client without compose or buildx.
PACKAGES = {"dockerd": "docker.io", "docker": "docker.io", "debootstrap": "debootstrap",
            "docker-compose": "docker-compose"}
LABEL = "messenger-gpt-bot-tests"


def unavailable(reason: str) -> None:
    """Skip, or under CI (BOT_REQUIRE_DOCKER=1) fail, saying why."""
    if os.environ.get("BOT_REQUIRE_DOCKER") == "1":
        pytest.fail(f"BOT_REQUIRE_DOCKER=1 but {reason}")
    pytest.skip(f"container tests skipped: {reason}")


def install_missing_tools() -> None:
    """apt-get install what is missing (Debian's docker.io, debootstrap, docker-compose)."""
    missing = sorted({package for tool, package in PACKAGES.items() if not shutil.which(tool)})
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        unavailable(f"{', '.join(missing)} missing and no apt-get as root to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode:
            unavailable(f"`{' '.join(command)}` failed: {done.stderr.strip()[-300:]}")


class Docker:
    """A private dockerd (own socket, data root, exec root and pidfile) and a CLI aimed at it."""

    def __init__(self, state: Path = STATE):
        self.state = state
        self.socket = state / "docker.sock"
        self.pidfile = state / "docker.pid"
        self.env = {key: value for key, value in os.environ.items() if not key.startswith(("DOCKER_", "COMPOSE_"))}
        self.env.update(DOCKER_HOST=f"unix://{self.socket}", DOCKER_BUILDKIT="0", COMPOSE_DOCKER_CLI_BUILD="0",
                        DOCKER_CONFIG=str(state / "client"))
        self.process: subprocess.Popen | None = None
        self._lock = None

    def start(self) -> "Docker":
        if os.geteuid() != 0:
            unavailable("dockerd needs root")
        install_missing_tools()
        self.state.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        self._stop_leftover_daemon()
        shutil.rmtree(self.state / "exec", ignore_errors=True)
        log = open(self.state / "dockerd.log", "w")
        self.process = subprocess.Popen(
            ["dockerd", "--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-forward=false",
             "--ip-masq=false", "--host", f"unix://{self.socket}", "--data-root", str(self.state / "data"),
             "--exec-root", str(self.state / "exec"), "--pidfile", str(self.pidfile)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while self.run("version", check=False).returncode:
            if self.process.poll() is not None or time.monotonic() > deadline:
                unavailable(f"dockerd did not start: {(self.state / 'dockerd.log').read_text()[-500:]}")
            time.sleep(0.1)
        self.remove_leftovers()
        return self

    def _take_lock(self) -> None:
        """One test run at a time owns the daemon and its data root; another waits for it."""
        self._lock = open(self.state / "lock", "w")
        deadline = time.monotonic() + 600
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    unavailable(f"another test run held {self.state / 'lock'} for 10 minutes")
                time.sleep(1)

    def _stop_leftover_daemon(self) -> None:
        """A run killed before its teardown leaves its dockerd behind, holding the pidfile."""
        try:
            pid = int(self.pidfile.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return
        if b"dockerd" in cmdline and str(self.socket).encode() in cmdline:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.1)

    def remove_leftovers(self) -> None:
        """Containers and volumes of an earlier run (the images stay: they are the cache)."""
        ids = self.run("ps", "-aq").stdout.split()
        if ids:
            self.run("rm", "-f", "-v", *ids)
        self.run("volume", "prune", "-f")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.remove_leftovers()
            # Bot images a rebuild left untagged, once a day old: the newer ones hold the build cache
            # (the build stage's layers are untagged too).
            self.run("image", "prune", "-f", "--filter", "until=24h", check=False)
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._lock:
            self._lock.close()

    def run(self, *args: str, check: bool = True, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
        """The docker CLI against this daemon."""
        done = subprocess.run(["docker", *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                              **kwargs)
        if check and done.returncode:
            raise RuntimeError(f"docker {' '.join(args[:3])} failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def compose(self, *args: str, cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
        """The older `docker-compose` (Debian's), the one that runs here: no compose plugin for the CLI."""
        done = subprocess.run(["docker-compose", *args], cwd=cwd, env={**self.env, **env}, capture_output=True,
                              text=True, timeout=300)
        if check and done.returncode:
            raise RuntimeError(f"docker-compose {' '.join(args[:3])} failed: {done.stderr.strip()[-2000:]}")
        return done

    def has_image(self, tag: str) -> bool:
        return self.run("image", "inspect", tag, check=False).returncode == 0

    def image_size(self, tag: str) -> int:
        return int(self.run("image", "inspect", "-f", "{{.Size}}", tag).stdout)

    def inspect(self, name: str) -> dict:
        return json.loads(self.run("inspect", name).stdout)[0]


class Container:
    """One `docker run -d --network host` of an image, its /data on a named volume of its own
    (or on `volume`: another volume's name, or a host folder)."""

    def __init__(self, docker: Docker, image: str, env: dict[str, str], name: str, volume: str | None = None):
        self.docker, self.image, self.env, self.name = docker, image, env, name
        self.volume = volume or f"{name}-data"

    def start(self, *options: str, command: tuple[str, ...] = ()) -> "Container":
        settings = [arg for key, value in self.env.items() for arg in ("-e", f"{key}={value}")]
        self.docker.run("run", "-d", "--name", self.name, "--label", LABEL, "--network", "host",
                        "-v", f"{self.volume}:/data", *settings, *options, self.image, *command)
        return self

    def restart(self) -> None:
        """`docker start` again: the same container, the same volume."""
        self.docker.run("start", self.name)

    def stop(self, *options: str) -> float:
        """`docker stop`; the seconds it took."""
        started = time.monotonic()
        self.docker.run("stop", *options, self.name, timeout=120)
        return time.monotonic() - started

    def state(self) -> dict:
        return self.docker.inspect(self.name)["State"]

    def exec(self, *command: str) -> subprocess.CompletedProcess:
        return self.docker.run("exec", self.name, *command, check=False, timeout=60)

    def logs(self) -> str:
        done = self.docker.run("logs", self.name, check=False)
        return done.stdout + done.stderr

    def remove(self) -> None:
        self.docker.run("rm", "-f", self.name, check=False)
        if not self.volume.startswith("/"):  # a named volume, not a host folder
            self.docker.run("volume", "rm", "-f", self.volume, check=False)


def bot_settings(graph, model) -> dict[str, str]:
    """The test Page's settings for a container on the host's network; DATA_DIR and the error log
    stay the image's (/data)."""
    return {"FB_VERIFY_TOKEN": VERIFY_TOKEN, "FB_APP_SECRET": APP_SECRET, "FB_PAGE_ACCESS_TOKEN": PAGE_TOKEN,
            "FB_PAGE_ID": PAGE_ID, "FB_API_URL": graph.api_url, "OPENAI_API_KEY": ModelStandIn.API_KEY,
            "OPENAI_BASE_URL": model.base_url, "OPENAI_TIMEOUT": "30", "OPENAI_MAX_RETRIES": "0",
            "HOST": "127.0.0.1",
            # The disclosure line is the default; these tests compare replies word for word.
            "DISCLOSURE": "off"}


def is_ready(url: str) -> bool:
    try:
        return requests.get(url + "/readyz", timeout=1).status_code == 200
    except requests.RequestException:
        return False
