"""`python -m devtools.sandbox`: chat with the bot in a browser, no Facebook account needed.

Starts a local Messenger emulator (Graph API, signed webhooks, a chat page),
the model (the real one when OPENAI_API_KEY is set, through a recording
proxy; an offline stand-in otherwise) and the bot itself, wired together on
127.0.0.1 with made-up ids, tokens and app secret. Two Pages, the first with a
linked Instagram account, each with its own system prompt: the bot runs from a
PAGES_FILE in the sandbox's own temporary folder, as a deployment for many Pages would;
each offers "Talk to a person" under its answers and passes the thread to the Page inbox.
The first Page also answers a website visitor: the bot's website chat (WEBCHAT=on) on a
listener of its own, its widget's demo page shown in the sandbox page, streamed by the model.
It also has a knowledge base: examples/knowledge/anas-bakery, synced into the bot's store at start.
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter

if __name__ == "__main__":  # Ctrl-C while the imports below load (a second or so): a quiet stop, not their traceback
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))

from werkzeug.serving import make_server  # noqa: E402
from werkzeug.wrappers import Request, Response  # noqa: E402

from bot.web.app import create_app  # noqa: E402
from bot.telemetry.logs import configure_logging  # noqa: E402
from config import ConfigError, load_config, read_environment  # noqa: E402
from devtools.emulator import (GraphEmulator, ModelProxy, ModelStandIn, Timeline, WebhookSender,  # noqa: E402
                               graph_error)
from devtools.emulator.http import QuietHandler  # noqa: E402
from devtools.emulator.knowledge import Loaded, load_folder, logged_excerpts  # noqa: E402
from devtools.emulator.model import offline_reply  # noqa: E402
from devtools.emulator.page import SandboxPage  # noqa: E402
from devtools.emulator.webvisitor import WebchatListener, WebVisitors, webchat_server  # noqa: E402
from devtools.replayed import ReplayedDeliveries  # noqa: E402

logger = logging.getLogger("devtools.sandbox")

# Settings of a real bot (its .env) the sandbox must not take: the live store (its reply threads
# would join the live queue as one more host, and claim real users' messages for Pages they do
# not know), the owner's endpoints, where the live bot listens.
NOT_TAKEN = frozenset({"PAGES_FILE", "DATABASE_URL", "DATABASE_POOL_SIZE", "TRACKING_URL", "HANDOFF_WEBHOOK",
                       "HOST", "PORT", "WEBCHAT_PORT", "WEBCHAT_PAGE", "WEBCHAT_ORIGINS"})

DEFAULT_OPENAI_URL = "https://api.openai.com/v1"
BAKERY, BOOKSHOP = "Ana's Bakery", "Harbour Books"
PROMPTS = {
    # No opening hours or prices here: the bakery's knowledge base has them (examples/knowledge/).
    BAKERY: "You answer for Ana's Bakery, a family bakery: bread, cakes and coffee. Be warm and brief.",
    BOOKSHOP: "You answer for Harbour Books, a second-hand bookshop by the harbour: orders take a week, open "
              "10 to 18. Be precise and brief.",
}
USERS = {"2000000000000101": "Ana", "2000000000000102": "Ben", "2000000000000103": "Chlo\u00e9",
         "2000000000000104": "Dev"}  # Ana's Bakery on Messenger
INSTAGRAM_USERS = {"3000000000000101": "Eli", "3000000000000102": "Fay"}  # Ana's Bakery on Instagram
BOOKSHOP_USERS = {"2000000000000201": "Gus", "2000000000000202": "Hugo"}  # Harbour Books on Messenger
OFFLINE_KEY = "sandbox-offline-model"
SANDBOX_APP_ID = "900000000000001"
OUTCOMES_EVERY_S = 0.2  # how often the exchange log is read for outcomes to show
STOP_REPLIES_S = 1.0  # on Ctrl-C, how long replies in flight may still finish
# On Ctrl-C, the longest the whole stop may take (about 1.5 s when nothing is wrong): past it every
# thread's stack goes to stderr, the temporary DATA_DIR is removed and the process exits 1, so a
# part that hangs is seen, never waited on.
STOP_WITHIN_S = 8.0
STREAM_DELAY_S = 0.08  # between the offline model's streamed pieces: the website chat visibly streams
# The website chat's per-address limits, looser than the bot's defaults (5 a minute) for one person trying
# it from 127.0.0.1; the environment's WEBCHAT_* settings win.
WEBCHAT_DEFAULTS = {"WEBCHAT_RATE_LIMIT": "20/minute", "WEBCHAT_CONVERSATION_LIMIT": "20/minute"}
WEBSITE_VISITOR = "Website visitor"
HANDOFF_BUTTON = "Talk to a person"  # the quick reply under the bot's answers, on every sandbox Page
# Meta's refusal of a message sent after the messaging window closed (Send API error codes page).
WINDOW_CLOSED = (10, 2018278, "(#10) This message is sent outside of allowed window.")


class Sandbox:
    """Every part, started in order and stopped together."""

    def __init__(self, environ: dict[str, str], host: str = "127.0.0.1", port: int = 8080,
                 model_delay: float = 0.8):
        self.timeline = Timeline()
        app_secret, verify_token = secrets.token_hex(16), secrets.token_urlsafe(12)
        self.app_secret, self.verify_token = app_secret, verify_token
        self.graph = emulated_pages(app_secret, self.timeline)
        self.instagram_id = self.graph.accounts.first.instagram_id
        real_key = environ.get("OPENAI_API_KEY", "").strip()
        if real_key:
            upstream = environ.get("OPENAI_BASE_URL", "").strip() or DEFAULT_OPENAI_URL
            self.model = ModelProxy(upstream, timeline=self.timeline)
        else:
            self.model = ModelStandIn(offline_reply, api_key=OFFLINE_KEY, timeline=self.timeline)
            self.model.delay = model_delay  # long enough to see the typing indicator
            self.model.stream_delay = STREAM_DELAY_S if model_delay else 0.0
        self.visitors: WebVisitors | None = None  # the website chat's, once the config is read
        self.model.psid_of = lambda messages: (self.visitors and self.visitors.psid_for_prompt(messages)) or \
            self.graph.psid_for_prompt(messages)
        self.model.psid_of_media = self.graph.psid_for_media  # a photo or voice note sent on to the model
        self.data_dir = tempfile.TemporaryDirectory(prefix="messenger-sandbox-")
        pages_file = os.path.join(self.data_dir.name, "pages.toml")
        with open(pages_file, "w", encoding="utf-8") as file:
            file.write(pages_toml(self.graph))
        self.config = load_config({
            **WEBCHAT_DEFAULTS,
            **{k: v for k, v in environ.items() if not k.startswith("FB_") and k not in NOT_TAKEN},
            "FB_VERIFY_TOKEN": verify_token, "FB_APP_SECRET": app_secret, "PAGES_FILE": pages_file,
            "FB_API_URL": self.graph.api_url,
            "OPENAI_API_KEY": real_key or OFFLINE_KEY, "OPENAI_BASE_URL": self.model.base_url,
            "DATA_DIR": self.data_dir.name, "REPLY_THREADS": "8",
            "ERROR_LOG_FILE": os.path.join(self.data_dir.name, "openai_api_errors.log"),  # forgotten with the rest
            "WEBCHAT": "on", "WEBCHAT_PAGE": self.graph.page_id,
        }, env_file=None)
        if real_key:
            label = f"real model: {self.config.openai_model} via {upstream}"
        else:
            label = "offline stand-in model (set OPENAI_API_KEY for a real one)"
        self.app = create_app(self.config, replies="threads")
        wsgi = ReplayedDeliveries(self.graph, self.timeline, app_secret).around(self.app)
        self.bot = make_server("127.0.0.1", 0, wsgi, threaded=True, request_handler=QuietHandler)
        self.bot_url = f"http://127.0.0.1:{self.bot.server_port}/webhook"
        self.webhooks = WebhookSender(self.bot_url, app_secret, self.timeline)
        self.graph.webhooks = self.webhooks
        self.visitors = WebVisitors(webchat_server(self.config, self.app.extensions["dispatcher"].store),
                                    self.timeline, self.graph.page_id)
        self.webchat = WebchatListener(self.visitors)
        self.page = SandboxPage(self.graph, {
            "page": {"id": self.graph.page_id, "name": BAKERY}, "model": {"mode": self.model.mode, "label": label},
            "webhook": self.bot_url,
            "webchat": {"url": self.webchat.url, "demo": self.webchat.url + "/webchat/demo",
                        "account": self.graph.page_id, "name": WEBSITE_VISITOR},
        }, host, port)
        self.knowledge: Loaded | None = None  # the example knowledge base, once loaded
        self._stopping = threading.Event()
        self._outcomes = threading.Thread(target=self._watch_outcomes, name="sandbox-outcomes", daemon=True)

    @property
    def url(self) -> str:
        return self.page.url + "/"

    def start(self) -> "Sandbox":
        self.graph.start()
        self.model.start()
        threading.Thread(target=self.bot.serve_forever, args=(0.05,), daemon=True).start()
        self.webchat.start()
        self._load_knowledge()
        # As the dashboard does on "Verify and save", before any message is delivered.
        if not self.webhooks.verify(self.config.fb_verify_token):
            raise RuntimeError("the bot did not answer the webhook verification")
        self.page.start()
        self._outcomes.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._outcomes.is_alive():
            self._outcomes.join(timeout=5)
        # Replies in flight get a moment while the emulator still answers; what is left is forgotten
        # with the temporary DATA_DIR (see main: their threads are not waited for).
        self.app.extensions["dispatcher"].stop(timeout=STOP_REPLIES_S)
        self.page.stop()
        self.webchat.stop()
        self.webhooks.close()
        self.bot.shutdown()
        self.model.stop()
        self.graph.stop()
        self.data_dir.cleanup()

    @property
    def database(self):
        """The bot's own store (SQLite in DATA_DIR): the exchange log and the knowledge base."""
        return self.app.extensions["dispatcher"].store.conversations.database

    def _load_knowledge(self) -> None:
        """Ana's Bakery's documents into the bot's store, as `knowledge sync --page` would, before anyone
        writes (the model serves the embeddings); KNOWLEDGE_MODE=off in the environment: none."""
        if self.config.knowledge_mode != "off":
            self.knowledge = load_folder(self.config, self.database, self.graph.page_id)
        self.page.info["knowledge"] = {"mode": self.config.knowledge_mode, "page": BAKERY, **(
            {"sources": self.knowledge.sources, "chunks": self.knowledge.chunks} if self.knowledge else {})}

    # -- what the page shows beyond Meta's side ------------------------------------------------
    def _watch_outcomes(self) -> None:
        """Each new exchange-log record on the timeline as an `outcome` event: the page shows a note
        for the outcomes that leave the user without an ordinary answer (paused, rate-limited, reset...),
        and the scores of the knowledge base's excerpts (or that nothing relevant was found)."""
        log = self.app.extensions["dispatcher"].store.conversations
        mode = self.config.knowledge_mode
        shown: Counter = Counter()
        while not self._stopping.wait(OUTCOMES_EVERY_S):
            try:
                records = list(log.export())
            except sqlite3.Error as error:
                logger.debug("exchange log not readable yet: %s", error)
                continue
            now = Counter()
            for record in records:
                key = tuple(record.values())
                now[key] += 1
                if now[key] > shown[key]:
                    self.timeline.add("outcome", record["psid"], outcome=record["outcome"], model=record["model"],
                                      latency_ms=record["latency_ms"], total_tokens=record["total_tokens"],
                                      account=record.get("page_id"), channel=record.get("channel"),
                                      knowledge=logged_excerpts(record, self.database, mode))
            shown = now


class SandboxGraph(GraphEmulator):
    """The emulator, plus what the sandbox page does to Meta's side: close a user's messaging window,
    so that Meta's Send API refuses the next reply to that user (and only that user) with 10/2018278."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._closed_windows: set[str] = set()
        self._sends = threading.Lock()

    def close_window(self, psid: str) -> None:
        with self._sends:
            self._closed_windows.add(psid)
        self.timeline.add("window", psid, state="closed", account=self.accounts.account_of(psid).id)

    def handle(self, request: Request) -> Response:
        psid = _message_recipient(request)
        if psid is None:
            return super().handle(request)
        # Messages are sent one at a time here, so the refusal scripted for this user is the one this
        # very call meets, never another user's send running beside it.
        with self._sends:
            if psid in self._closed_windows:
                self._closed_windows.discard(psid)
                code, subcode, message = WINDOW_CLOSED
                self.fail_next("send", graph_error(code, message, subcode=subcode))
            return super().handle(request)


def _message_recipient(request: Request) -> str | None:
    """Whom a Send API message (not a sender action) goes to; None for any other call."""
    if request.method != "POST" or not request.path.endswith("/messages"):
        return None
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or "message" not in body or not isinstance(body.get("recipient"), dict):
        return None
    return str(body["recipient"].get("id") or "") or None


def emulated_pages(app_secret: str, timeline: Timeline) -> SandboxGraph:
    """Ana's Bakery (on Messenger and on Instagram) and Harbour Books, with their users, on one emulator."""
    bakery, bookshop, instagram = _numeric_id("1", 15), _numeric_id("1", 15), _numeric_id("178414", 17)
    graph = SandboxGraph(bakery, "EAAsandbox" + secrets.token_hex(24), app_secret, app_id=SANDBOX_APP_ID,
                         name=BAKERY, instagram_id=instagram, conversations_per_second=2, timeline=timeline)
    graph.add_page(bookshop, "EAAsandbox" + secrets.token_hex(24), name=BOOKSHOP)
    for account, users in ((bakery, USERS), (instagram, INSTAGRAM_USERS), (bookshop, BOOKSHOP_USERS)):
        for psid, name in users.items():
            graph.add_user(psid, name, page_id=account)
    return graph


def _numeric_id(prefix: str, digits: int) -> str:
    return prefix + "".join(secrets.choice("0123456789") for _ in range(digits - len(prefix)))


def pages_toml(graph: GraphEmulator) -> str:
    """The PAGES_FILE the bot runs from: each emulated Page, its token, Instagram account and prompt, and
    a way to a person: the "Talk to a person" quick reply, and the thread passed to the Page inbox."""
    tables = []
    for page in graph.accounts.pages.values():
        entry = {"id": page.id, "access_token": page.token, "name": page.name,
                 **({"instagram_id": page.instagram_id} if page.instagram_id else {}),
                 "system_prompt": PROMPTS[page.name], "handoff_button": HANDOFF_BUTTON, "handoff_thread_control": True}
        # A JSON string is a TOML basic string (same quotes and escapes); true is true in both.
        tables.append("[[pages]]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in entry.items()))
    return "\n".join(tables)


def replay_command(sandbox: Sandbox) -> str:
    """The replay line of the banner: everything `devtools.replay --verify` needs, the sandbox's
    throwaway secret and verify token included (they are forgotten on Ctrl-C). The fixtures go
    to Ana's Bakery, on Messenger and on Instagram."""
    return (f"replay fixtures here: FB_APP_SECRET={sandbox.app_secret} FB_PAGE_ID={sandbox.config.fb_page_id} "
            f"FB_INSTAGRAM_ID={sandbox.instagram_id} FB_VERIFY_TOKEN={sandbox.verify_token} "
            f".venv/bin/python -m devtools.replay tests/fixtures --url {sandbox.bot_url} --verify")


def knowledge_line(sandbox: Sandbox) -> str:
    """The knowledge base's line of the banner: what was loaded, and the command that manages it,
    with the sandbox's DATA_DIR and settings (a .env's one-Page settings and live store emptied: the
    sandbox runs from PAGES_FILE, on its own store)."""
    if sandbox.knowledge is None:
        return ("knowledge base: off (KNOWLEDGE_MODE=off)" if sandbox.config.knowledge_mode == "off" else
                "knowledge base: none (no examples/knowledge/anas-bakery)")
    key = "" if sandbox.model.mode == "real" else f"OPENAI_API_KEY={OFFLINE_KEY} "
    return (f"knowledge base: {sandbox.knowledge.summary()}, for {BAKERY}; manage it: "
            f"DATA_DIR={sandbox.data_dir.name} PAGES_FILE={sandbox.config.pages_file} FB_PAGE_ID= "
            f"FB_PAGE_ACCESS_TOKEN= FB_PAGE_NAME= FB_INSTAGRAM_ID= DATABASE_URL= WEBCHAT=off "
            f"FB_APP_SECRET={sandbox.app_secret} FB_VERIFY_TOKEN={sandbox.verify_token} "
            f"OPENAI_BASE_URL={sandbox.model.base_url} {key}.venv/bin/python -m bot knowledge search "
            f"\"Are you open on Sundays?\" --page {sandbox.graph.page_id} (or list, or add|sync|remove … "
            f"--page {sandbox.graph.page_id})")


def _port_problem(host: str, port: int) -> str | None:
    """Werkzeug exits the process on a taken port; say it plainly first."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            return error.strerror
    return None


def _cut_off_after(seconds: float, data_dir: str) -> None:
    """A stop that takes longer: every thread's stack to stderr (where it hangs), the temporary
    DATA_DIR removed all the same, exit 1. faulthandler's own timer, a little later, for an
    interpreter so stuck that this thread cannot run."""
    def cut_off() -> None:
        faulthandler.dump_traceback(all_threads=True)
        shutil.rmtree(data_dir, ignore_errors=True)
        os._exit(1)

    timer = threading.Timer(seconds, cut_off)
    timer.daemon = True
    timer.start()
    faulthandler.dump_traceback_later(seconds + 2, exit=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.sandbox", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1",
                        help="address of the chat page (default 127.0.0.1). The bot and the website chat stay on "
                             "127.0.0.1: from another machine use an SSH tunnel (ssh -L 8080:127.0.0.1:8080 HOST)")
    parser.add_argument("--port", type=int, default=8080, help="port of the chat page (default 8080; 0 = any free)")
    args = parser.parse_args(argv)
    problem = _port_problem(args.host, args.port)
    if problem:
        print(f"cannot open the sandbox on {args.host}:{args.port}: {problem} (choose another with --port)",
              file=sys.stderr)
        return 2
    # From here Ctrl-C (or SIGTERM) stops the sandbox the orderly way, also while it starts.
    # The handler only appends to a list, which takes no lock: an Event.set() there could wait for
    # good on the lock that the main thread, which runs the handler, holds inside Event.wait().
    stopped: list[int] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda received, _frame: stopped.append(received))
    try:
        sandbox = Sandbox(read_environment(), args.host, args.port)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    configure_logging(sandbox.config.log_level, sandbox.config.secrets)
    sandbox.start()
    if not stopped:
        print(f"Messenger sandbox: open {sandbox.url}\n"
              f"  bot webhook: {sandbox.bot_url}\n"
              f"  website chat: {sandbox.webchat.url}/webchat/demo\n"
              f"  model: {sandbox.page.info['model']['label']}\n"
              f"  {replay_command(sandbox)}\n"
              f"  {knowledge_line(sandbox)}\n"
              "Ctrl-C stops it.", flush=True)
    # Short sleeps, not one wait: Python runs the handler in the main thread when that one wakes,
    # and a signal the kernel hands to another thread (rare on Linux, not impossible) does not wake it.
    while not stopped:
        time.sleep(0.2)
    _cut_off_after(STOP_WITHIN_S, sandbox.data_dir.name)
    try:
        sandbox.stop()
    except Exception:  # noqa: BLE001 - said, then the exit below all the same
        logging.getLogger(__name__).exception("stopping the sandbox failed")
    finally:
        # The interpreter's exit would join the reply threads still in a model call or a retry (up
        # to OPENAI_TIMEOUT and more) for replies nobody will see: Ctrl-C must stop the sandbox now.
        sys.stdout.flush()
        logging.shutdown()
        os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
