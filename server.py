"""The WSGI entry point: `gunicorn server:app` (settings in gunicorn.conf.py)."""
from bot.app import create_app
from bot.logs import configure_logging
from config import ConfigError, load_config


def build_app():
    """Read the settings once, set up logging once, then build the app."""
    try:
        config = load_config()
    except ConfigError as error:
        raise SystemExit(str(error)) from None
    configure_logging(config.log_level, config.secrets)
    return create_app(config)


app = build_app()
