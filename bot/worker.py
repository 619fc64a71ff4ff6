"""The reply process: `python -m bot.worker` answers the queue until SIGTERM.

gunicorn.conf.py starts one beside the webhook workers, so `gunicorn server:app`
is still the one command that runs the whole bot.
"""
from __future__ import annotations

import logging
import os
import signal
import threading

from bot.replies import build_dispatcher
from bot.logs import configure_logging
from config import ConfigError, load_config

logger = logging.getLogger("bot.worker")  # not "__main__" under python -m

REPLY_PROCESS_NICENESS = 10


def main() -> None:
    try:
        config = load_config()
    except ConfigError as error:
        raise SystemExit(str(error)) from None
    configure_logging(config.log_level, config.secrets)
    # Acknowledging Meta comes first: when the CPU is short, the webhook workers
    # get it and replies wait a little in the durable queue.
    os.nice(REPLY_PROCESS_NICENESS)
    dispatcher = build_dispatcher(config)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    parent = os.getppid()
    dispatcher.start()
    logger.info("reply process ready: %d reply threads", config.reply_threads)
    # An orphan (the gunicorn master was killed) stops too: the next start spawns a new one.
    while not stop.wait(1.0):
        if os.getppid() != parent:
            logger.warning("gunicorn master is gone: stopping")
            break
    dispatcher.stop(timeout=config.worst_reply_seconds)


if __name__ == "__main__":
    main()
