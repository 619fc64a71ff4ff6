"""The images the container tests need, made on this machine because no registry answers here.

- a Debian base with python3 (`debootstrap --variant=minbase` + `docker import`), from the
  mirror this machine's apt uses; the bot's Dockerfile is built FROM it (BASE_IMAGE);
- a PostgreSQL stand-in for the official `postgres` image of docker-compose.yml: the same
  tree with Debian's server installed on the host side, and an entrypoint that honours the
  official image's POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB and its data folder;
- the bot's image, built with `--network none` from wheels downloaded here (`pip download`).

Both base images stay in the daemon's data root, so this costs about a minute once.
"""
from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.support.docker import Docker
from tests.support.messages import ROOT

BASE_IMAGE = "messenger-bot-tests/debian-python:bookworm"
POSTGRES_IMAGE = "messenger-bot-tests/debian-postgresql:bookworm"
BOT_IMAGE = "messenger-bot-tests/bot:latest"
SUITE = "bookworm"
ENTRYPOINT = Path(__file__).with_name("postgres_standin.sh")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Left out of both images: apt's downloads and package lists.
# pip takes these literally (no older manylinux implied): the tags the pinned wheels carry.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
TAR_EXCLUDES = ("./var/cache/apt/archives/*.deb", "./var/lib/apt/lists/*")


def debian_mirror() -> str:
    """The Debian mirror in /etc/apt/sources.list* serving the main suite (not -security)."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for source in sources:
        text = source.read_text() if source.is_file() else ""
        for stanza in text.split("\n\n"):  # deb822 (.sources): URIs and Suites in one stanza
            uris, suites = re.search(r"^URIs:\s*(.+)$", stanza, re.M), re.search(r"^Suites:\s*(.+)$", stanza, re.M)
            if uris and suites and SUITE in suites.group(1).split():
                return uris.group(1).split()[0]
        for uri in re.findall(rf"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+{SUITE}\s", text, re.M):  # one-line format
            return uri
    return "http://deb.debian.org/debian"


def ensure_base_images(docker: Docker) -> float | None:
    """Make the two base images unless the daemon has them; the seconds it took, or None."""
    if docker.has_image(BASE_IMAGE) and docker.has_image(POSTGRES_IMAGE):
        return None
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="debootstrap-", dir=docker.state))
    tree = work / "rootfs"
    try:
        _run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", SUITE,
              str(tree), debian_mirror()], timeout=900)
        _import(docker, tree, BASE_IMAGE, [f"ENV PATH={PATH}", "ENV LANG=C.UTF-8", 'CMD ["python3"]'])
        version = _install_postgresql(tree)
        _import(docker, tree, POSTGRES_IMAGE, [
            f"ENV PATH=/usr/lib/postgresql/{version}/bin:{PATH}", "ENV LANG=C.UTF-8",
            "ENV PGDATA=/var/lib/postgresql/data", "USER postgres", "VOLUME /var/lib/postgresql/data",
            'ENTRYPOINT ["/usr/local/bin/postgres-standin"]'])
        # As the official image: a fast shutdown, not one that waits for clients (import cannot set it).
        docker.run("build", "-t", POSTGRES_IMAGE, "-", input=f"FROM {POSTGRES_IMAGE}\nSTOPSIGNAL SIGINT\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return time.monotonic() - started


def _install_postgresql(tree: Path) -> str:
    """Debian's server in the tree, installed from the host (apt in a chroot: no network in a build)."""
    (tree / "usr/sbin/policy-rc.d").write_text("#!/bin/sh\nexit 101\n")  # start nothing while installing
    (tree / "usr/sbin/policy-rc.d").chmod(0o755)
    (tree / "etc/postgresql-common").mkdir(parents=True, exist_ok=True)
    (tree / "etc/postgresql-common/createcluster.conf").write_text("create_main_cluster = false\n")
    env = ["/usr/bin/env", "-i", f"PATH={PATH}", "DEBIAN_FRONTEND=noninteractive"]
    _run(["chroot", str(tree), *env, "apt-get", "install", "-y", "-qq", "--no-install-recommends", "postgresql"],
         timeout=900)
    (tree / "usr/sbin/policy-rc.d").unlink()
    shutil.copy(ENTRYPOINT, tree / "usr/local/bin/postgres-standin")
    (tree / "usr/local/bin/postgres-standin").chmod(0o755)
    for folder in ("var/lib/postgresql/data", "run/postgresql"):
        (tree / folder).mkdir(parents=True, exist_ok=True)
    _run(["chroot", str(tree), "chown", "-R", "postgres:postgres", "/var/lib/postgresql", "/run/postgresql"])
    (tree / "var/lib/postgresql/data").chmod(0o700)
    return sorted((tree / "usr/lib/postgresql").iterdir(), key=lambda p: int(p.name))[-1].name


def _import(docker: Docker, tree: Path, tag: str, changes: list[str]) -> None:
    excludes = [f"--exclude={pattern}" for pattern in TAR_EXCLUDES]
    tar = subprocess.Popen(["tar", "-C", str(tree), "--numeric-owner", *excludes, "-c", "."],
                           stdout=subprocess.PIPE)
    change_args = [arg for change in changes for arg in ("--change", change)]
    docker.run("import", *change_args, "-", tag, stdin=tar.stdout)
    tar.stdout.close()
    if tar.wait():
        raise RuntimeError(f"tar of {tree} failed")


def fetch_wheels(docker: Docker) -> Path:
    """requirements.txt as wheels for the image's Python (3.11, glibc), downloaded on the host
    once per version of requirements.txt."""
    requirements = (ROOT / "requirements.txt").read_bytes()
    folder = docker.state / "wheels" / hashlib.sha256(requirements).hexdigest()[:16]
    if not (folder / "complete").exists():
        shutil.rmtree(folder, ignore_errors=True)
        _run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", "3.11",
              "--implementation", "cp", *(arg for tag in PLATFORMS for arg in ("--platform", tag)),
              "-r", str(ROOT / "requirements.txt"), "-d", str(folder)], timeout=600)
        (folder / "complete").touch()
    return folder


def stage_context(target: Path, wheels: Path) -> Path:
    """The build context a `docker build .` of this checkout sends (what .dockerignore lets in),
    plus the wheels/ folder the Dockerfile installs from when it is there."""
    allowed = [line[1:] for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")]
    for source in [ROOT / "Dockerfile", ROOT / ".dockerignore", *(path for name in allowed for path in ROOT.glob(name))]:
        if source.is_dir():
            shutil.copytree(source, target / source.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, target / source.name)
    shutil.copytree(wheels, target / "wheels", ignore=shutil.ignore_patterns("complete"))
    return target


def build_bot_image(docker: Docker, context: Path, tag: str = BOT_IMAGE, *extra: str) -> float:
    """`docker build` with the legacy builder, no network, FROM the Debian base; the seconds it took."""
    started = time.monotonic()
    docker.run("build", "--network", "none", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-t", tag, *extra,
               str(context), timeout=600)
    return time.monotonic() - started


def _run(command: list[str], timeout: float = 300) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command[:4])} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
