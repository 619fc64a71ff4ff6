"""The entry point: `gunicorn server:app` (settings in gunicorn.conf.py).

`app` is ASGI for gunicorn's asyncio worker (what gunicorn.conf.py runs) and plain
WSGI for any other server.
"""
import os

from bot.web.app import create_app
from bot.web.asgi import ServerApp
from bot.telemetry.logs import configure_logging
from bot.web.proxy import TrustedPeers
from bot.runtime.supervisor import MASTER_STATE
from config import REPLY_PROCESS_ENV, Config, load_config_or_exit


def build_app() -> ServerApp:
    """Read the settings once (a gunicorn worker has those its master validated: gunicorn.conf.py),
    set up logging once, then build the app."""
    config = MASTER_STATE.get("config")
    if not isinstance(config, Config):
        config = load_config_or_exit()
    configure_logging(config.log_level, config.secrets)
    # gunicorn.conf.py runs the replies in a process of their own; any other
    # server gets reply threads inside the app.
    flask_app = create_app(config, replies="process" if os.environ.get(REPLY_PROCESS_ENV) == "1" else "threads")
    return ServerApp(flask_app.wsgi_app, flask_app.extensions["webhook"], TrustedPeers(config.forwarded_allow_ips))


app = build_app()
