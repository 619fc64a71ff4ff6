"""The website chat's listener: `python -m bot.webchat.serve`, started by the gunicorn master when
WEBCHAT=on (gunicorn.conf.py), on HOST:WEBCHAT_PORT.

A gunicorn of its own (the bot's guarded asyncio worker, bot/web/worker.py; one process): the web
routes never share a process, an event loop or a thread pool with the webhook workers, and run at
the lowest CPU priority (behind the webhook workers and the reply process), so a crowd of visitors
cannot delay Meta's acknowledgements (README, "Chat on your website", with the numbers). It stops
with its parent: an orphan would keep the port.
"""
from __future__ import annotations

import logging
import os
import signal
import threading

from gunicorn.app.base import BaseApplication

from bot.runtime.liveness import keep_saying_alive
from bot.storage.instance import WEBCHAT_LOCK, master_pid, take_process_lock
from bot.telemetry.logs import configure_logging
from bot.web.worker import RESERVED_FILES
from config import Config, load_config_or_exit

# The lowest priority: behind the webhook workers (0) and the reply process (10), so web visitors
# wait for Messenger and not the other way round. At 10, beside the reply process, the ack p99 with
# 200 open chats was 1.7-2.4x the one without; at 19, 1.3x (bench/webchat.py).
WEBCHAT_NICENESS = 19


class WebchatApplication(BaseApplication):
    def __init__(self, config: Config):
        self.config = config
        super().__init__()

    def load_config(self) -> None:
        host = self.config.host
        settings = {
            "bind": f"[{host}]:{self.config.webchat_port}" if ":" in host else f"{host}:{self.config.webchat_port}",
            "worker_class": "bot.web.worker.GuardedASGIWorker", "workers": 1, "timeout": 30,
            "control_socket_disable": True, "post_fork": _worker_settings(self.config),
            "graceful_timeout": int(self.config.reply_deadline_seconds + 5),
            "forwarded_allow_ips": ",".join(self.config.forwarded_allow_ips),
            "logger_class": "bot.telemetry.gunicorn_logger.ScrubbingLogger", "accesslog": "-",
            "access_log_format": '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(M)sms webchat',
            "when_ready": _stop_with_parent, "proc_name": "webchat",
        }
        for name, value in settings.items():
            self.cfg.set(name, value)

    def load(self):
        from bot.webchat.wiring import build_server

        return build_server(self.config)


def _worker_settings(config: Config):
    def post_fork(server, worker) -> None:
        worker.header_seconds = config.header_timeout
        worker.reserved_files = RESERVED_FILES + config.webchat_threads  # a model connection per answer
    return post_fork


def _stop_with_parent(server) -> None:
    """Stop gracefully once the process that started this one is gone (kill -9 of the bot)."""
    parent = int(os.environ.get("WEBCHAT_PARENT_PID", os.getppid()))

    def watch() -> None:
        while True:
            threading.Event().wait(1.0)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGTERM)
                return
    threading.Thread(target=watch, name="webchat-parent", daemon=True).start()


def main() -> None:
    os.environ["WEBCHAT_PARENT_PID"] = str(master_pid())
    keep_saying_alive()  # to the master, which replaces this process if it freezes whole
    config = load_config_or_exit()
    configure_logging(config.log_level, config.secrets)
    os.nice(WEBCHAT_NICENESS)
    # Held until this process and its worker end: a move to PostgreSQL waits for a website chat
    # left finishing its answers by a kill -9 of the bot. An earlier one still finishing holds it
    # for its graceful time at most: this one serves at once, and takes it once that one is gone.
    log = logging.getLogger("bot.webchat.serve")
    try:
        if take_process_lock(config.data_dir, WEBCHAT_LOCK) is None:
            log.info("an earlier website chat process of this bot is still finishing: %s is taken once it ends",
                     WEBCHAT_LOCK)
            threading.Thread(target=take_process_lock, args=(config.data_dir, WEBCHAT_LOCK), kwargs={"block": True},
                             name="webchat-lock", daemon=True).start()
    except OSError as error:  # a lock file this user cannot open: the chat is served all the same
        log.warning("cannot take %s (%s): a move to PostgreSQL will not wait for this process", WEBCHAT_LOCK,
                    error.strerror)
    WebchatApplication(config).run()


if __name__ == "__main__":
    main()
