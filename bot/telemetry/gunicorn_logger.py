"""gunicorn's own log lines (request-line errors, "Error handling request", the access
log) pass the same scrubber as the bot's: a verify token in a malformed URL or a
forged newline must not reach the log through gunicorn either."""
from __future__ import annotations

from gunicorn import glogging

from bot.runtime.supervisor import MASTER_STATE
from bot.telemetry.logs import LogScrubber
from config import Config, ConfigError, load_config


class ScrubbingLogger(glogging.Logger):
    def info(self, msg, *args, **kwargs) -> None:
        # With SO_REUSEPORT each worker opens its own socket and the master none, so gunicorn's
        # start-up line said "Listening at:  (pid)": it names the address the workers bind instead.
        if msg.startswith("Listening at: %s") and args and not args[0]:
            args = (",".join(self.cfg.bind) + " (each worker's own socket)", *args[1:])
        super().info(msg, *args, **kwargs)

    def setup(self, cfg) -> None:
        super().setup(cfg)
        config = MASTER_STATE.get("config")  # what gunicorn.conf.py validated, also through a reload
        try:
            secrets = config.secrets if isinstance(config, Config) else load_config().secrets
        except ConfigError:  # gunicorn.conf.py has already stopped start-up with the message
            secrets = ()
        scrubber = LogScrubber(secrets)
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                handler.addFilter(scrubber)
