"""gunicorn settings, read by `gunicorn server:app` from this folder.

The settings are validated here, in the master, so a bad `.env` stops start-up
with one message instead of every worker failing to boot in a loop.
"""
import os
import shutil
import sys

from config import ConfigError, load_config

try:
    _config = load_config()
except ConfigError as error:
    print(error, file=sys.stderr)
    sys.exit(1)

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{_config.port}"

# Threads keep each worker answering webhooks while replies are generated;
# the replies themselves run on the app's own reply threads.
worker_class = "gthread"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
threads = 8

# The slowest honest reply: history read, every model attempt with the openai
# client's backoff (at most 8 s between tries), and a send, plus a margin.
_graph_call = min(3.05, _config.graph_timeout) + _config.graph_timeout
_model = _config.openai_timeout * (_config.openai_max_retries + 1) + 8 * _config.openai_max_retries
timeout = int(2 * _graph_call + _model + 5)
# On SIGTERM, replies already accepted get the same budget to finish.
graceful_timeout = timeout

# gunicorn's control socket sits at one path per user: several bots on one host
# (or the tests and the benchmark) would fight over it, and nothing here uses it.
control_socket_disable = True

# Tunnels (cloudflared, ngrok) connect from this host and set X-Forwarded-*.
forwarded_allow_ips = "127.0.0.1,::1"

# /metrics sums every worker: prometheus-client's multiprocess mode, one folder per run.
_metrics_dir = os.path.join(_config.data_dir, "metrics")
shutil.rmtree(_metrics_dir, ignore_errors=True)
os.makedirs(_metrics_dir)
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir


def worker_exit(server, worker):
    """On SIGTERM: stop claiming, finish replies in flight, give back the rest."""
    dispatcher = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("dispatcher")
    if dispatcher is not None:
        dispatcher.stop(timeout=max(1, graceful_timeout - 5))


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


accesslog = "-"
# %(U)s is the path without the query string: hub.verify_token never reaches a log.
access_log_format = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(M)sms'
