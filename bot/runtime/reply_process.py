"""The reply process: `python -m bot.runtime.reply_process` answers the queue until SIGTERM.

gunicorn.conf.py starts one beside the webhook workers, so `gunicorn server:app`
is still the one command that runs the whole bot.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Callable

from bot.replies.dispatcher import Dispatcher
from bot.replies.wiring import build_dispatcher
from bot.runtime.liveness import keep_saying_alive
from bot.storage.instance import master_pid
from bot.telemetry.logs import configure_logging
from config import load_config_or_exit

logger = logging.getLogger("bot.runtime.reply_process")  # not "__main__" under python -m

REPLY_PROCESS_NICENESS = 10


def main() -> None:
    parent = master_pid()
    keep_saying_alive()  # to the master, which replaces this process if it freezes whole
    config = load_config_or_exit()
    configure_logging(config.log_level, config.secrets)
    # Acknowledging Meta comes first: when the CPU is short, the webhook workers
    # get it and replies wait a little in the durable queue.
    os.nice(REPLY_PROCESS_NICENESS)
    dispatcher = build_dispatcher(config)
    # The handler only appends to a list, which takes no lock: an Event.set() there could wait for
    # good on the lock that the main thread, which runs it, holds for an instant in each Event.wait().
    stop: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda received, _frame: stop.append(received))
    dispatcher.start()
    logger.info("reply process ready: %d reply threads", config.reply_threads)
    code = watch(dispatcher, lambda: bool(stop), lambda: os.getppid() != parent)
    try:
        dispatcher.stop(timeout=config.stop_seconds)
    except Exception:  # noqa: BLE001 - the exit below must happen whatever stop() met
        logger.exception("reply process: stopping the dispatcher failed")
        code = code or 1
    if code:
        # The interpreter's exit joins the reply threads: one stuck for good would keep
        # this unhealthy process alive. Leave now, so the supervisor starts a fresh one.
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


def watch(dispatcher: Dispatcher, stopping: Callable[[], bool], orphaned: Callable[[], bool],
          clock: Callable[[], float] = time.monotonic, every: float = 0.2) -> int:
    """Until SIGTERM: 0. An orphan (the gunicorn master was killed) stops too: the next start
    spawns a new one. A dispatcher that is no longer healthy: 1, so the supervisor starts a
    fresh process instead of leaving a dead loop that still looks alive."""
    while not stopping():
        if orphaned():
            logger.warning("gunicorn master is gone: stopping")
            return 0
        healthy, reason = dispatcher.healthy(clock())
        if not healthy:
            logger.error("reply process unhealthy (%s): exiting so a fresh one starts", reason)
            return 1
        time.sleep(every)  # a SIGTERM is seen when this ends (its handler runs at once; the sleep goes on)
    return 0


if __name__ == "__main__":
    main()
