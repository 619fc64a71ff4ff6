"""gunicorn settings and hooks, read by `gunicorn server:app` from this folder.

The settings are validated here, in the master, so a bad `.env` stops start-up
with one message instead of every worker failing to boot in a loop. Reading this
file sets one variable (the replies run in a process of their own); the hooks below
prepare DATA_DIR and the rest of the environment (on_starting) and keep the reply
process running (bot/runtime/supervisor.py).
"""
import json
import os
import shutil
import sys

from bot.runtime.supervisor import MASTER_STATE
from config import CHECKED_SETTINGS_ENV, REPLY_PROCESS_ENV, ConfigError, load_config, read_env_file
from pages import read_pages_text

# What only a start checks (the port is free, DATA_DIR is this bot's alone, the database): a
# reload that changes one of them is refused, and a restart takes it.
START_ONLY = ("host", "port", "data_dir", "database_url", "webchat", "webchat_port")

# Larger, the handed-on settings could not go into an environment (Linux: 128 KB a variable): the
# processes then read the Pages file (and, past it, `.env`) themselves.
CHECKED_SETTINGS_MAX = 100_000


def _validated():
    """The Config of the `.env` file and the environment, and what the processes this master keeps
    get of it (config.CHECKED_SETTINGS_ENV): the file's values and the Pages file's text, each read
    once, so what they get is what was validated (ConfigError)."""
    env_file = read_env_file()
    environ = {**env_file, **os.environ}
    pages_path, pages_text = environ.get("PAGES_FILE", "").strip(), None
    if pages_path:
        try:
            pages_text = read_pages_text(pages_path)
        except (OSError, UnicodeDecodeError):
            pass  # load_config reads it again and names the problem
    config = load_config(environ, env_file=None, pages_text=pages_text)
    handed = json.dumps({"env_file": env_file, "pages_file": [pages_path, pages_text] if pages_text else None})
    if len(handed) > CHECKED_SETTINGS_MAX:
        handed = json.dumps({"env_file": env_file, "pages_file": None})
    return (handed if len(handed) <= CHECKED_SETTINGS_MAX else None), config


# A master reads the files itself, whatever its own environment says (a copied one, a wrapper's).
os.environ.pop(CHECKED_SETTINGS_ENV, None)

_changed = True  # a reload that changed nothing (logrotate's SIGHUP): nothing is started again for it
if "config" not in MASTER_STATE:
    try:
        _handed, _config = _validated()
    except ConfigError as error:
        raise SystemExit(str(error)) from None
else:  # a reload (SIGHUP) reads this file again: settings edited with a mistake must not stop the bot
    _had, _refusal = MASTER_STATE["config"], ""
    try:
        _handed, _config = _validated()
    except ConfigError as error:
        _refusal = str(error)
    else:
        if _start_only := [name.upper() for name in START_ONLY if getattr(_config, name) != getattr(_had, name)]:
            _refusal = f"{', '.join(_start_only)} change only with a restart."
    if _refusal:
        _handed, _config = MASTER_STATE["handed_settings"], _had
        print(f"SIGHUP: the new settings were not taken, the bot goes on with those it had. {_refusal}",
              file=sys.stderr, flush=True)
    _changed = _config != _had
# The workers are forked from this master and use these settings (server.py), not a `.env` read
# of their own: they run on what was validated here. The processes it keeps get what it
# validated in their environment (bot/runtime/supervisor.py), for the same reason.
MASTER_STATE["config"], MASTER_STATE["handed_settings"] = _config, _handed
# Tells server.py not to start reply threads in the webhook workers (the reply process answers).
# Set here, not in on_starting: with --preload gunicorn loads the app before that hook runs.
os.environ[REPLY_PROCESS_ENV] = "1"

# HOST and WEB_CONCURRENCY come from the Config, so a value in `.env` counts as one in the
# environment does (gunicorn itself reads only the environment).
_host = _config.host
bind = f"[{_host}]:{_config.port}" if ":" in _host else f"{_host}:{_config.port}"

# The webhook workers only verify, store and acknowledge. gunicorn's asyncio worker
# (bot/web/asgi.py) keeps a slow or idle connection from holding a thread: 200 of them
# do not delay Meta (bench/run.py --only slow_clients). bot/web/worker.py adds what it lacks:
# a deadline for a request's headers, and a cap on connections (within the open-file limit).
worker_class = "bot.web.worker.GuardedASGIWorker"
workers = _config.web_concurrency
worker_connections = 1000
# One listening socket per worker (SO_REUSEPORT): the kernel spreads connections
# over the workers. bot/runtime/preflight.py makes sure no other bot already listens there.
reuse_port = True

# An event loop blocked this long is stuck: gunicorn replaces the worker.
timeout = 30
# On shutdown the reply process gets the budget of the slowest honest reply.
graceful_timeout = _config.stop_seconds

# gunicorn sets the master's umask to this while it makes each worker's heartbeat file (0 by
# default): the reply process, spawned by another thread of the master at that moment, began
# with umask 0 and wrote its metrics files 0666 into DATA_DIR (seen in CI). The same as on_starting's.
umask = 0o077

# gunicorn's control socket sits at one path per user: several bots on one host
# (or the tests and the benchmark) would fight over it, and nothing here uses it.
control_socket_disable = True

# The proxies whose X-Forwarded-Proto is believed (bot/web/proxy.py does the same for the app).
forwarded_allow_ips = ",".join(_config.forwarded_allow_ips)

# gunicorn's own lines pass the bot's scrubber too: no secret, no forged line.
logger_class = "bot.telemetry.gunicorn_logger.ScrubbingLogger"
accesslog = "-"
# %(U)s is the path without the query string: hub.verify_token never reaches a log.
access_log_format = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(M)sms'

_metrics_dir = os.path.join(_config.data_dir, "metrics")
# Kept by the module, not this file: a reload (SIGHUP) reads this file again from the start.
_state = MASTER_STATE


def on_starting(server):
    """Once, in the master, before binding: refuse to start on a bad DATA_DIR or next to a
    running bot, then set up what every process (workers, reply process) inherits."""
    from bot.runtime.preflight import (StartupProblem, check_database, check_error_log, check_port_free,
                                       lock_data_dir, prepare_data_dir)

    if list(server.cfg.bind) != [bind]:  # -b/--bind: the port checks below, and the log, would be of another
        print(f"Cannot start: --bind is not supported (the bot listens where HOST and PORT say, {bind}, and checks "
              "that no other bot does): remove it from the command line or GUNICORN_CMD_ARGS and set HOST and "
              "PORT", file=sys.stderr)
        sys.exit(1)
    if server.cfg.env:  # set after this file validated the settings, and only for the processes it starts
        print("Cannot start: -e/--env and raw_env are not supported (the settings they set would not be the ones "
              "checked): put them in .env or the environment", file=sys.stderr)
        sys.exit(1)
    if server.cfg.preload_app:  # the app was loaded here, in the master: its database connections
        # would be shared by every forked worker, and the start-up checks below came too late
        print("Cannot start: --preload is not supported (each worker opens the database itself): remove it "
              "from the command line or GUNICORN_CMD_ARGS", file=sys.stderr)
        sys.exit(1)
    # DATA_DIR holds every user's messages: whatever the bot creates is for this user only.
    os.umask(0o077)
    try:
        prepare_data_dir(_config.data_dir)
        _state["lock"] = lock_data_dir(_config.data_dir)  # held until the last process exits
        check_port_free(_host, _config.port)
        if _config.webchat:
            check_port_free(_host, _config.webchat_port, "WEBCHAT_PORT")
        check_database(_config.database_url, _config.database_path, _config.data_dir,
                       retention_days=_config.retention_days)
        for error_log in sorted({a.config.error_log_file for a in _config.accounts} | {_config.error_log_file}):
            check_error_log(error_log)
    except StartupProblem as problem:
        print(f"Cannot start: {problem}", file=sys.stderr)
        sys.exit(1)
    # /metrics sums every process: prometheus-client's multiprocess mode, one folder per run.
    shutil.rmtree(_metrics_dir, ignore_errors=True)
    os.makedirs(_metrics_dir)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir
    # The reply process holds photos on their way to the model (bot/media/budget.py). glibc's
    # malloc raises its mmap threshold as big blocks are freed, and then keeps them in per-thread
    # arenas: a fixed 1 MB threshold gives every photo's memory back when it is done. Measured
    # with bench/media.py (50 photos of 8 MB at once): 174 MB above a text burst without, 62 with.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1024 * 1024))


def when_ready(server):
    from bot.runtime.supervisor import ReplySupervisor

    scheme_host = f"[{_host}]" if ":" in _host else _host
    server.log.info("bot listening on http://%s:%s (webhook: /webhook)", scheme_host, _config.port)
    _state["replies"] = ReplySupervisor(server.log, on_exit=_mark_dead, settings=_checked_settings,
                                        alive_file=os.path.join(_config.data_dir, "reply-process.alive"))
    _state["replies"].start()
    if _config.webchat:  # the website chat: a listener and a process of its own (bot/webchat/serve.py)
        server.log.info("website chat on http://%s:%s (/webchat.js)", scheme_host, _config.webchat_port)
        _state["webchat"] = ReplySupervisor(server.log, command=("-m", "bot.webchat.serve"), on_exit=_mark_dead,
                                            name="website chat process", settings=_checked_settings,
                                            alive_file=os.path.join(_config.data_dir, "webchat-process.alive"))
        _state["webchat"].start()


def _checked_settings():
    """The settings the master validated last, for config.CHECKED_SETTINGS_ENV (the supervisors
    read them at each start; None: too large, the processes read the files)."""
    return MASTER_STATE["handed_settings"]


def on_reload(server):
    """SIGHUP with new, good settings: gunicorn starts new webhook workers on them (server.py
    reads MASTER_STATE); the reply process and the website chat take them when they start, so
    they are started again too. With refused settings or the same ones they go on as they are
    (their stop would pause the replies and close the website chat for nothing)."""
    if not _changed:
        return
    for name in ("replies", "webchat"):
        if name in _state:
            _state[name].restart()


def on_exit(server):
    from bot.runtime.supervisor import stop_together

    stop_together([(_state[name], timeout) for name, timeout in (("webchat", _config.reply_deadline_seconds + 10),
                                                                 ("replies", graceful_timeout + 5)) if name in _state])


def post_fork(server, worker):
    worker.header_seconds = _config.header_timeout


def child_exit(server, worker):
    _mark_dead(worker.pid)


def _mark_dead(pid):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)
