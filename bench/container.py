"""Container benchmark: what the image costs and how fast it starts, as the tests build it.

    .venv/bin/python bench/container.py [--runs 3] [--from-scratch]

Uses the tests' private dockerd and images (tests/support/docker.py, as root): the Debian
base made with debootstrap, wheels from the host, `docker build --network none`. Prints JSON lines:
  build   seconds for the base images (only when they had to be made: --from-scratch removes
          them and the wheel cache first), the wheel download, a build of the bot's image
          without the layer cache, and a rebuild with nothing changed
  image   the base image's size, the bot's image's, and the difference (target: <= 80 MB)
  start   per run: `docker run` to the first 200 from /readyz (polled from the host), to
          docker's "healthy" (the image's own HEALTHCHECK, 5 s interval), and the `docker stop`
          of the idle bot; then a summary line with medians
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devtools.emulator import GraphEmulator, ModelStandIn  # noqa: E402
from tests.support.docker import Container, Docker, bot_settings, is_ready  # noqa: E402
from tests.support.docker_images import (BASE_IMAGE, BOT_IMAGE, POSTGRES_IMAGE, build_bot_image,  # noqa: E402
                                         ensure_base_images, fetch_wheels, stage_context)
from tests.support.messages import APP_SECRET, PAGE_ID, PAGE_TOKEN  # noqa: E402
from tests.support.processes import free_port  # noqa: E402

MB = 1_000_000


def emit(line: dict) -> None:
    print(json.dumps(line), flush=True)


def build(docker: Docker, from_scratch: bool) -> None:
    if from_scratch:
        docker.run("rmi", "-f", BOT_IMAGE, BASE_IMAGE, POSTGRES_IMAGE, check=False)
        shutil.rmtree(docker.state / "wheels", ignore_errors=True)
    base_s = ensure_base_images(docker)
    started = time.monotonic()
    wheels = fetch_wheels(docker)
    wheels_s = time.monotonic() - started
    with tempfile.TemporaryDirectory() as folder:
        context = stage_context(Path(folder), wheels)
        no_cache_s = build_bot_image(docker, context, BOT_IMAGE, "--no-cache")
        rebuild_s = build_bot_image(docker, context)
    emit({"scenario": "build", "base_images_s": None if base_s is None else round(base_s, 1),
          "wheels_s": round(wheels_s, 1), "build_no_cache_s": round(no_cache_s, 1), "rebuild_s": round(rebuild_s, 2)})
    base, image = docker.image_size(BASE_IMAGE), docker.image_size(BOT_IMAGE)
    emit({"scenario": "image", "base_mb": round(base / MB, 1), "image_mb": round(image / MB, 1),
          "above_base_mb": round((image - base) / MB, 1), "target_above_base_mb": 80})


def one_start(docker: Docker, graph: GraphEmulator, model: ModelStandIn) -> dict:
    port = free_port()
    settings = {**bot_settings(graph, model), "PORT": str(port)}
    container = Container(docker, BOT_IMAGE, settings, f"bench-{uuid.uuid4().hex[:8]}")
    try:
        started = time.monotonic()
        container.start()
        ready_s = healthy_s = None
        while ready_s is None or healthy_s is None:
            if time.monotonic() - started > 60:
                raise RuntimeError(f"not ready and healthy within 60 s: {container.logs()[-2000:]}")
            if ready_s is None and is_ready(f"http://127.0.0.1:{port}"):
                ready_s = time.monotonic() - started
            if healthy_s is None and container.state()["Health"]["Status"] == "healthy":
                healthy_s = time.monotonic() - started
            time.sleep(0.05)
        stop_s = container.stop()
        return {"scenario": "start", "ready_s": round(ready_s, 2), "healthy_s": round(healthy_s, 2),
                "idle_stop_s": round(stop_s, 2), "exit_code": container.state()["ExitCode"]}
    finally:
        container.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--from-scratch", action="store_true", help="make the base images and wheels again")
    args = parser.parse_args()
    docker = Docker().start()
    graph, model = GraphEmulator(PAGE_ID, PAGE_TOKEN, APP_SECRET).start(), ModelStandIn().start()
    try:
        build(docker, args.from_scratch)
        runs = [one_start(docker, graph, model) for _ in range(args.runs)]
        for run in runs:
            emit(run)
        emit({"scenario": "start_summary", "runs": len(runs),
              **{f"{key}_p50": round(statistics.median(run[key] for run in runs), 2)
                 for key in ("ready_s", "healthy_s", "idle_stop_s")}})
    finally:
        graph.stop()
        model.stop()
        docker.stop()


if __name__ == "__main__":
    main()
