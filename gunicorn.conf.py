"""gunicorn settings, read by `gunicorn server:app` from this folder.

The settings are validated here, in the master, so a bad `.env` stops start-up
with one message instead of every worker failing to boot in a loop. The
master also starts the reply process (bot/worker.py) and restarts it if it
dies, so this one command runs the whole bot.
"""
import os
import shutil
import signal
import sys
import threading
import time

from config import REPLY_PROCESS_ENV, ConfigError, load_config

try:
    _config = load_config()
except ConfigError as error:
    print(error, file=sys.stderr)
    sys.exit(1)

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{_config.port}"

# The webhook workers only verify, store and acknowledge; threads let each one
# serve several deliveries at once.
worker_class = "gthread"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
threads = 8
# One listening socket per worker (SO_REUSEPORT): the kernel spreads connections
# over the workers, so a few busy keep-alive connections cannot pile onto one.
reuse_port = True

# Nothing slow runs in a request any more, but keep the budget of the slowest
# honest reply (history + every model attempt + send) as the worker and
# shutdown timeouts.
timeout = _config.worst_reply_seconds
graceful_timeout = timeout

# gunicorn's control socket sits at one path per user: several bots on one host
# (or the tests and the benchmark) would fight over it, and nothing here uses it.
control_socket_disable = True

# Tunnels (cloudflared, ngrok) connect from this host and set X-Forwarded-*.
forwarded_allow_ips = "127.0.0.1,::1"

accesslog = "-"
# %(U)s is the path without the query string: hub.verify_token never reaches a log.
access_log_format = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(M)sms'

# /metrics sums every process: prometheus-client's multiprocess mode, one folder per run.
_metrics_dir = os.path.join(_config.data_dir, "metrics")
shutil.rmtree(_metrics_dir, ignore_errors=True)
os.makedirs(_metrics_dir)
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir
# Tells server.py not to start reply threads in the webhook workers.
os.environ[REPLY_PROCESS_ENV] = "1"

_reply = {"pid": None, "stopping": False}


def _run_reply_process(server):
    """Keep one reply process alive until the master stops."""
    while not _reply["stopping"]:
        try:
            # posix_spawn, not subprocess: Popen waits on a pipe that a gunicorn worker
            # forked at the same moment would inherit and hold open, forever.
            pid = os.posix_spawn(sys.executable, [sys.executable, "-m", "bot.worker"], os.environ)
            _reply["pid"] = pid
            code = _wait(pid)
            _mark_dead(pid)
        except Exception:  # noqa: BLE001 - the supervisor must outlive any one failure
            server.log.exception("reply process supervisor")
            code = None
        if not _reply["stopping"]:
            server.log.error("reply process exited (%s); starting a new one", code)
            time.sleep(1)


def _wait(pid, timeout=None):
    """Wait for the reply process to end; the arbiter may reap it first (waitpid(-1))."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while deadline is None or time.monotonic() < deadline:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return "reaped by gunicorn"
        if done:
            return f"status {os.waitstatus_to_exitcode(status)}"
        time.sleep(0.2)
    raise TimeoutError


def _mark_dead(pid):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)


def when_ready(server):
    threading.Thread(target=_run_reply_process, args=(server,), name="reply-supervisor", daemon=True).start()


def on_exit(server):
    """Let the reply process finish what is in flight (it releases the rest), then exit."""
    _reply["stopping"] = True
    pid = _reply["pid"]
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGTERM)
        _wait(pid, timeout=graceful_timeout + 5)
    except ProcessLookupError:
        pass
    except TimeoutError:
        os.kill(pid, signal.SIGKILL)


def child_exit(server, worker):
    _mark_dead(worker.pid)
