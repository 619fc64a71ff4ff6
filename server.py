"""The WSGI entry point: `gunicorn server:app` (settings in gunicorn.conf.py)."""
import os

from bot.app import create_app
from bot.logs import configure_logging
from config import REPLY_PROCESS_ENV, ConfigError, load_config


def build_app():
    """Read the settings once, set up logging once, then build the app."""
    try:
        config = load_config()
    except ConfigError as error:
        raise SystemExit(str(error)) from None
    configure_logging(config.log_level, config.secrets)
    # gunicorn.conf.py runs the replies in a process of their own; any other
    # server gets reply threads inside the app.
    return create_app(config, replies="process" if os.environ.get(REPLY_PROCESS_ENV) == "1" else "threads")


app = build_app()
