"""The Dockerfile and docker-compose.yml, built and run here (tests/support/docker.py says how:
a private dockerd, a Debian base made with debootstrap, wheels from the host, --network host).

What this covers: the image as the Dockerfile builds it (from the Debian base, not the default
official python image, which no registry can give here), started as a user would start it, and
the committed docker-compose.yml with the older `docker-compose` (Debian's; the `docker compose`
plugin is not installed here) and an override for host networking and local images. The
official `postgres` image is not pulled: a stand-in made from Debian's server honours its
settings and data folder (tests/support/postgres_standin.sh).
"""
from __future__ import annotations

import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests

from bot.storage.queue import PostgresQueue
from messenger.signature import sign
from tests.support import APP_SECRET, PSID, ROOT, free_port, text_body, wait_until
from tests.support.docker import Container, Docker, bot_settings, is_ready
from tests.support.docker_images import (BASE_IMAGE, BOT_IMAGE, POSTGRES_IMAGE, build_bot_image, ensure_base_images,
                                         fetch_wheels, stage_context)

OVERRIDE = ROOT / "tests" / "support" / "compose.override.yml"
REPLY = "Hello from the model."
BOT_UID = 10001  # the Dockerfile's USER
# Run by `docker exec`: a child forks a grandchild and exits at once, so the grandchild is
# orphaned to the container's PID 1; it exits 0.3 s later. Prints its parent after the orphaning
# and what became of it: reaped (gone), or a zombie left by a PID 1 that does not reap.
ORPHAN = """
import os, time
read_end, write_end = os.pipe()
child = os.fork()
if child == 0:
    orphan = os.fork()
    if orphan == 0:
        time.sleep(0.3)
        os._exit(0)
    os.write(write_end, str(orphan).encode())
    os._exit(0)
os.waitpid(child, 0)
orphan = int(os.read(read_end, 32))
stat = lambda: open(f"/proc/{orphan}/stat").read().rsplit(")", 1)[1].split()
parent, deadline = stat()[1], time.monotonic() + 2
while time.monotonic() < deadline:
    try:
        state = stat()[0]
    except FileNotFoundError:
        state = "reaped"
        break
    time.sleep(0.05)
print(parent, "zombie" if state == "Z" else state)
"""


@pytest.fixture(scope="session")
def docker():
    daemon = Docker().start()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="session")
def bot_image(docker, tmp_path_factory) -> str:
    ensure_base_images(docker)
    build_bot_image(docker, stage_context(tmp_path_factory.mktemp("context"), fetch_wheels(docker)))
    return BOT_IMAGE


@pytest.fixture
def run_bot(docker, bot_image, graph, model):
    """Start the image as a user would, with the test Page's settings; removed afterwards."""
    started = []

    def run(*options: str, volume: str | None = None, **settings: str) -> tuple[Container, str]:
        port = free_port()
        env = {**bot_settings(graph, model), "PORT": str(port), **settings}
        container = Container(docker, bot_image, env, f"bot-{uuid.uuid4().hex[:8]}", volume).start(*options)
        started.append(container)
        return container, f"http://127.0.0.1:{port}"
    yield run
    for container in started:
        container.remove()


def post(url: str, body: bytes) -> int:
    return requests.post(url + "/webhook", data=body, timeout=5,
                         headers={"X-Hub-Signature-256": sign(body, APP_SECRET)}).status_code


def is_idle(url: str) -> bool:
    """Nothing waiting and nothing in flight (/healthz counts the inbox files too)."""
    try:
        health = requests.get(url + "/healthz", timeout=1).json()
    except requests.RequestException:
        return False
    return health["queue_depth"] == 0 and health["in_flight"] == 0


def process_uids(container: Container) -> dict[int, int]:
    """pid -> uid of the container's PID 1 and every descendant, read from the host's /proc."""
    found, todo = {}, [container.state()["Pid"]]
    while todo:
        pid = todo.pop()
        status = Path(f"/proc/{pid}/status").read_text()
        found[pid] = int(status.split("\nUid:")[1].split()[0])
        for task in Path(f"/proc/{pid}/task").iterdir():
            todo += [int(child) for child in (task / "children").read_text().split()]
    return found


def test_the_image_turns_healthy_answers_a_signed_webhook_and_runs_as_a_non_root_user(run_bot, graph):
    container, url = run_bot()
    # The image's own HEALTHCHECK (its command and its 5 s interval) on /readyz.
    assert wait_until(lambda: container.state()["Health"]["Status"] == "healthy", 40), container.logs()
    assert post(url, text_body("m_container", "Are you open today?")) == 200
    assert graph.wait_for_deliveries(1, 15), container.logs()
    assert graph.sent_texts(PSID) == [REPLY]
    uids = process_uids(container)
    assert len(uids) >= 4, uids  # the master, two webhook workers, the reply process
    assert set(uids.values()) == {BOT_UID}, uids


def test_docker_stop_is_graceful_and_the_reply_in_flight_goes_out_once(run_bot, graph, model):
    container, url = run_bot()
    assert wait_until(lambda: is_ready(url), 20), container.logs()
    model.delay = 2.0
    assert post(url, text_body("m_before_stop", "Still there?")) == 200
    assert wait_until(lambda: len(model.requests) == 1, 10)
    seconds = container.stop()  # docker's default: SIGTERM, SIGKILL after 10 s
    assert container.state()["ExitCode"] == 0, container.logs()  # 137 would be docker's SIGKILL
    assert seconds < 8, container.logs()
    assert graph.sent_texts(PSID) == [REPLY]  # the reply in flight finished before the exit
    container.restart()  # the same volume: the message is done, not answered again
    assert wait_until(lambda: is_ready(url) and is_idle(url), 20), container.logs()
    assert graph.sent_texts(PSID) == [REPLY] and len(model.requests) == 1


def test_a_message_caught_by_a_stop_shorter_than_its_reply_is_answered_once_after_a_restart(run_bot, graph, model):
    container, url = run_bot()
    assert wait_until(lambda: is_ready(url), 20), container.logs()
    model.delay = 20.0  # the model still thinks when docker gives up waiting
    assert post(url, text_body("m_acknowledged", "Do you deliver?")) == 200
    assert wait_until(lambda: len(model.requests) == 1, 10)
    container.stop("-t", "2")
    assert container.state()["ExitCode"] == 137  # SIGKILL: what a too-short `docker stop -t` does
    assert graph.sent_texts(PSID) == []
    model.delay = 0
    container.restart()
    assert graph.wait_for_deliveries(1, 20), container.logs()
    assert wait_until(lambda: is_idle(url), 10)
    assert graph.sent_texts(PSID) == [REPLY]


def test_an_orphan_left_by_docker_exec_is_reaped_by_pid_1(docker, run_bot):
    container, url = run_bot()
    assert wait_until(lambda: is_ready(url), 20), container.logs()
    assert container.exec("python3", "-c", ORPHAN).stdout.split() == ["1", "reaped"]
    # The check itself: under a PID 1 that reaps nothing, the same orphan stays a zombie.
    idle = Container(docker, BASE_IMAGE, {}, f"no-reaper-{uuid.uuid4().hex[:8]}")
    try:
        idle.start(command=("python3", "-c", "import time; time.sleep(60)"))
        assert idle.exec("python3", "-c", ORPHAN).stdout.split() == ["1", "zombie"]
    finally:
        idle.remove()


@pytest.mark.parametrize("host_folder, settings, reason", [
    (False, {"FB_APP_SECRET": ""}, "FB_APP_SECRET is required"),
    (True, {}, "Cannot start: DATA_DIR /data is not writable by this user"),
], ids=["missing-secret", "host-folder-owned-by-root"])
def test_bad_settings_stop_the_container_at_once_with_the_reason_in_its_log(run_bot, tmp_path, host_folder, settings,
                                                                          reason):
    """The second case is the usual mistake with a bind mount: a host folder the bot's uid cannot write."""
    (tmp_path / "data").mkdir(mode=0o755)
    started = time.monotonic()
    container, _ = run_bot(volume=str(tmp_path / "data") if host_folder else None, **settings)
    assert wait_until(lambda: not container.state()["Running"], 10), container.logs()
    assert time.monotonic() - started < 10
    assert container.state()["ExitCode"] == 1
    assert reason in container.logs()
    assert "Traceback" not in container.logs()



@pytest.fixture
def compose_project(docker, bot_image, graph, model, tmp_path):
    """The committed docker-compose.yml in a folder of its own with the test Page's .env, and the
    tests' override (local images, host networking, free ports): `docker-compose` with both."""
    password = uuid.uuid4().hex
    (tmp_path / "docker-compose.yml").write_text(without_published_ports((ROOT / "docker-compose.yml").read_text()))
    settings = {**bot_settings(graph, model), "POSTGRES_PASSWORD": password}
    (tmp_path / ".env").write_text("".join(f"{key}={value}\n" for key, value in settings.items()))
    env = {"BOT_IMAGE": bot_image, "POSTGRES_IMAGE": POSTGRES_IMAGE, "BOT_PORT": str(free_port()),
           "DB_PORT": str(free_port())}
    files = ["-p", f"bot{uuid.uuid4().hex[:8]}", "-f", "docker-compose.yml", "-f", str(OVERRIDE)]

    def compose(*args: str) -> subprocess.CompletedProcess:
        return docker.compose(*files, *args, cwd=tmp_path, env=env)
    compose.url = f"http://127.0.0.1:{env['BOT_PORT']}"
    compose.database_url = f"postgresql://bot:{password}@127.0.0.1:{env['DB_PORT']}/bot"
    yield compose
    docker.compose(*files, "down", "-v", "-t", "5", cwd=tmp_path, env=env, check=False)


def without_published_ports(compose_file: str) -> str:
    """The committed file minus the bot's `ports:`, which host networking refuses (an override
    can add to a list, not remove it): the one change the tests make to the file itself."""
    changed, count = re.subn(r"^    ports:\n(      - .*\n)+", "", compose_file, flags=re.M)
    assert count == 1, "docker-compose.yml: the bot's ports block moved; update the tests"
    return changed


def stored_states(database_url: str) -> dict[str, str]:
    queue = PostgresQueue(database_url, pool_size=2)
    try:
        return queue.states()
    finally:
        queue.close()


def test_the_compose_stack_answers_with_postgresql_and_keeps_its_state_across_down_and_up(compose_project, graph):
    compose = compose_project
    compose("up", "-d", "--no-build")
    assert wait_until(lambda: is_ready(compose.url), 60), compose("logs").stdout[-3000:]
    first = text_body("m_compose_1", "Are you open today?")
    assert post(compose.url, first) == 200
    assert graph.wait_for_deliveries(1, 15), compose("logs").stdout[-3000:]
    assert wait_until(lambda: stored_states(compose.database_url) == {"m_compose_1": "done"}, 10)

    compose("down")  # containers gone, the volumes kept
    compose("up", "-d", "--no-build")
    assert wait_until(lambda: is_ready(compose.url), 60), compose("logs").stdout[-3000:]
    assert post(compose.url, first) == 200  # Meta redelivers: the database remembers it was answered
    assert post(compose.url, text_body("m_compose_2", "And tomorrow?", timestamp=1763893200002)) == 200
    assert graph.wait_for_deliveries(2, 15), compose("logs").stdout[-3000:]
    assert wait_until(lambda: is_idle(compose.url), 10)
    assert graph.sent_texts(PSID) == [REPLY, REPLY]
    assert stored_states(compose.database_url) == {"m_compose_1": "done", "m_compose_2": "done"}
