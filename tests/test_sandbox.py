"""`python -m devtools.sandbox`: the bot and the emulator wired together, no account, no settings."""
import base64
import ctypes
import json
import os
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import requests

from bot.webchat.service import web_psid
from config import DEFAULT_KNOWLEDGE_UNKNOWN_REPLY, DEFAULT_OPENAI_MODEL
from devtools.emulator import ModelStandIn
from devtools.emulator.page import STATIC
from devtools.sandbox import (BAKERY, BOOKSHOP, BOOKSHOP_USERS, HANDOFF_BUTTON, INSTAGRAM_USERS, PROMPTS,
                              SANDBOX_APP_ID, STOP_WITHIN_S, USERS, Sandbox, knowledge_line)
from devtools.emulator.users import PAGE_INBOX_APP_ID
from tests.support import ROOT, SandboxProcess, wait_for
from tests.support.messages import IGSID
from tests.support.webchat import parse_events

ANA, BEN = list(USERS)[:2]
ELI, FAY = list(INSTAGRAM_USERS)
GUS = list(BOOKSHOP_USERS)[0]
SAMPLE_PHOTO = (STATIC / "sample-photo.jpg").read_bytes()


def say(sandbox, psid, text, action="messages", **extra):
    return requests.post(f"{sandbox.url}/api/users/{psid}/{action}", json={"text": text, **extra}, timeout=5)


def bot_replies(sandbox, psid):
    return [e["text"] for e in sandbox.events("message", psid) if e["sender"] == "page" and e["by"] == "bot"]


def test_a_message_typed_in_the_page_is_answered_by_the_bot_with_every_step_shown(sandbox):
    assert say(sandbox, ANA, "Are you open on Sunday?").status_code == 202
    assert wait_for(lambda: bot_replies(sandbox, ANA), 10)
    assert "Are you open on Sunday?" in bot_replies(sandbox, ANA)[0]
    assert "offline stand-in" in sandbox.state()["model"]["label"]
    webhook = sandbox.events("webhook", ANA)[0]
    assert webhook["status"] == 200 and webhook["body"]["entry"][0]["messaging"][0]["message"]["text"] == \
        "Are you open on Sunday?"
    graph = sandbox.events("graph", ANA)
    assert any(g["path"].endswith("/conversations") for g in graph)
    assert {g["request"]["body"].get("sender_action") for g in graph if "body" in g["request"]} >= {"mark_seen",
                                                                                                   "typing_on"}
    model = sandbox.events("model", ANA)[0]
    assert model["messages"][-1]["content"].endswith(": Are you open on Sunday?")  # the politeness prefix
    assert not any("access_token" in g["request"]["query"] or "appsecret_proof" in g["request"]["query"]
                   for g in graph)


def test_history_reaches_the_model_on_the_next_turn(sandbox):
    say(sandbox, BEN, "My name is Ben.")
    assert wait_for(lambda: len(bot_replies(sandbox, BEN)) == 1, 10)
    say(sandbox, BEN, "What is my name?")
    assert wait_for(lambda: len(bot_replies(sandbox, BEN)) == 2, 10)
    # The Page's own prompt first (and the knowledge base's excerpts, when any is relevant, after it).
    turns = [m for m in sandbox.events("model", BEN)[-1]["messages"] if not m["content"].startswith("Excerpts from")]
    assert [m["role"] for m in turns] == ["system", "user", "assistant", "user"]
    assert turns[1]["content"] == "My name is Ben."


def test_postback(sandbox):
    chloe = list(USERS)[2]
    assert say(sandbox, chloe, "Get Started", "postback", payload="GET_STARTED").status_code == 202
    assert wait_for(lambda: len(bot_replies(sandbox, chloe)) == 1, 10)
    assert "Get Started" in bot_replies(sandbox, chloe)[0]  # a postback's title is the user's turn


def media(sandbox, psid, action):
    return requests.post(f"{sandbox.url}/api/users/{psid}/{action}", json={}, timeout=5)


def mark(sandbox) -> int:
    """The timeline's newest number: what a test does next comes after it (the users are shared)."""
    return max((e["seq"] for e in sandbox.state()["events"]), default=0)


def events_after(sandbox, seq, kind, psid):
    return [e for e in sandbox.state(after=seq)["events"] if e["kind"] == kind and e["psid"] == psid]


def test_the_photo_button_sends_a_real_photo_that_reaches_the_model(sandbox):
    chloe, seq = list(USERS)[2], mark(sandbox)
    assert media(sandbox, chloe, "image").status_code == 202
    assert wait_for(lambda: events_after(sandbox, seq, "model", chloe), 10)
    sent = events_after(sandbox, seq, "message", chloe)[0]
    photo = requests.get(sent["image_url"], timeout=5)  # the emulator's CDN serves the sample photo
    assert photo.headers["Content-Type"] == "image/jpeg" and photo.content == SAMPLE_PHOTO
    assert any(d["status"] == 200 and not d["had_token"] for d in events_after(sandbox, seq, "download", chloe))
    parts = events_after(sandbox, seq, "model", chloe)[0]["messages"][-1]["content"]
    image = next(p for p in parts if p["type"] == "image_url")
    assert image["about"] == "480\u00d7360 JPEG, 12 KB"  # the side panel's thumbnail rides along
    assert image["image_url"]["url"] == "data:image/jpeg;base64," + base64.b64encode(SAMPLE_PHOTO).decode()
    assert wait_for(lambda: any("I can see 1 image (480\u00d7360 JPEG" in r for r in bot_replies(sandbox, chloe)), 10)


def test_the_voice_button_sends_a_voice_note_that_is_transcribed_for_the_model(sandbox):
    seq = mark(sandbox)
    assert media(sandbox, BEN, "voice").status_code == 202
    assert wait_for(lambda: events_after(sandbox, seq, "transcription", BEN), 10)
    heard = events_after(sandbox, seq, "transcription", BEN)[0]
    assert heard["status"] == 200 and heard["seconds"] == pytest.approx(2.56, abs=0.01)
    assert heard["text"] == "[offline stand-in] a voice note of 2.6 s (audio/wav)"
    assert wait_for(lambda: events_after(sandbox, seq, "model", BEN), 10)
    assert heard["text"] in str(events_after(sandbox, seq, "model", BEN)[0]["messages"][-1]["content"])


def test_the_like_button_sends_metas_like_sticker(sandbox):
    seq = mark(sandbox)
    assert media(sandbox, ANA, "like").status_code == 202
    assert wait_for(lambda: events_after(sandbox, seq, "webhook", ANA), 5)
    sent = events_after(sandbox, seq, "webhook", ANA)[0]["body"]["entry"][0]["messaging"][0]["message"]["attachments"]
    assert [(a["type"], a["payload"]["sticker_id"]) for a in sent] == [("image", 369239263222822),
                                                                       ("sticker", 369239263222822)]


def test_a_reply_from_the_page_inbox_pauses_the_bot(sandbox):
    dev = list(USERS)[3]
    assert say(sandbox, dev, "A person will answer you", "inbox").status_code == 202
    assert wait_for(lambda: any(e["body"]["entry"][0]["messaging"][0]["message"].get("is_echo")
                                for e in sandbox.events("webhook", dev)), 5)
    say(sandbox, dev, "Thank you, person!")
    assert wait_for(lambda: len([e for e in sandbox.events("webhook", dev) if e["status"] == 200]) == 2, 5)
    # The batch's outcome is its end: once it is in, any reply or model call it made is too.
    assert wait_for(lambda: sandbox.events("outcome", dev), 10)
    assert [e["outcome"] for e in sandbox.events("outcome", dev)] == ["paused"]  # the page's note says why
    assert bot_replies(sandbox, dev) == [] and sandbox.events("model", dev) == []


@pytest.fixture
def fresh(tmp_path):
    """A sandbox of this test's own: none of its users has written yet, nobody is paused or handed over."""
    running = SandboxProcess(tmp_path)
    yield running
    running.stop()


DISCLOSURE = f"You are chatting with {BAKERY}'s automated assistant.\n\n"
HANDOFF_REPLY = f"Thank you, a person from {BAKERY} will answer you here as soon as possible."


def outcomes(sandbox, psid):
    return [e["outcome"] for e in sandbox.events("outcome", psid)]


def with_person(sandbox, psid):
    return next(u["with_person"] for u in sandbox.state()["users"] if u["psid"] == psid)


def sends(sandbox, psid):
    """The bot's Send API messages to `psid` (not sender actions), as the panel shows them."""
    return [g for g in sandbox.events("graph", psid) if g["path"].endswith("/messages")
            and "message" in (g["request"].get("body") or {})]


def handbacks(sandbox, psid):
    """The emulator's pass_thread_control deliveries to the bot (the inbox gave the thread back)."""
    return [w for w in sandbox.events("webhook", psid) if not w.get("replayed")
            and "pass_thread_control" in w["body"]["entry"][0].get("messaging", [{}])[0]]


def on_standby(sandbox, psid):
    """Deliveries of a thread the bot does not own (Meta's `standby`), and the bot's answers to them."""
    return [w["status"] for w in sandbox.events("webhook", psid) if "standby" in w["body"]["entry"][0]]


def test_the_first_reply_says_it_is_a_bot_and_offers_a_person_under_the_answer(fresh):
    assert say(fresh, ANA, "Hello!").status_code == 202
    assert wait_for(lambda: bot_replies(fresh, ANA), 10)
    assert bot_replies(fresh, ANA)[0].startswith(DISCLOSURE + "[offline stand-in] You said \u201cHello!\u201d")
    shown = next(e for e in fresh.events("message", ANA) if e["sender"] == "page")
    assert shown["quick_replies"] == [HANDOFF_BUTTON]  # the page draws it as a chip under the answer
    offered = sends(fresh, ANA)[0]["request"]["body"]["message"]["quick_replies"]
    assert offered == [{"content_type": "text", "title": HANDOFF_BUTTON, "payload": "HANDOFF"}]
    assert wait_for(lambda: outcomes(fresh, ANA) == ["answered"], 5)


def test_talk_to_a_person_hands_over_until_the_inbox_passes_the_thread_back(fresh):
    say(fresh, ANA, "Hello!")
    assert wait_for(lambda: bot_replies(fresh, ANA), 10)
    # The chip's tap, as the page sends it: the title as text, the payload the bot gave it.
    assert say(fresh, ANA, HANDOFF_BUTTON, quick_reply="HANDOFF").status_code == 202
    assert wait_for(lambda: len(bot_replies(fresh, ANA)) == 2, 10)
    assert bot_replies(fresh, ANA)[1] == HANDOFF_REPLY
    passed = [g for g in fresh.events("graph", ANA) if g["path"].endswith("/me/pass_thread_control")]
    assert [(g["status"], g["request"]["body"]["target_app_id"]) for g in passed] == [(200, int(PAGE_INBOX_APP_ID))]
    assert with_person(fresh, ANA) and not with_person(fresh, BEN)
    assert wait_for(lambda: outcomes(fresh, ANA) == ["answered", "handoff"], 5)
    assert len(fresh.events("model", ANA)) == 1  # the handoff asked no model

    say(fresh, ANA, "Is anyone there?")  # the thread is the inbox's: Meta sends it on standby, never answered
    assert wait_for(lambda: on_standby(fresh, ANA) == [200], 10)

    assert say(fresh, ANA, "Hi, Maria here: your cake is ready.", "inbox").status_code == 202
    assert requests.post(f"{fresh.url}/api/users/{ANA}/handback", json={}, timeout=5).status_code == 202
    assert wait_for(lambda: handbacks(fresh, ANA), 5)
    control = handbacks(fresh, ANA)[0]
    assert control["status"] == 200
    assert control["body"]["entry"][0]["messaging"][0]["pass_thread_control"]["new_owner_app_id"] == SANDBOX_APP_ID
    assert not with_person(fresh, ANA)
    assert [e["by"] for e in fresh.events("handover", ANA)] == ["inbox"]  # the panel's turn for it

    say(fresh, ANA, "Thanks! Can the bot help again?")
    assert wait_for(lambda: len(bot_replies(fresh, ANA)) == 3, 10)
    # Back from a person: the bot says again that it is one (Meta's disclosure rule).
    assert bot_replies(fresh, ANA)[2].startswith(DISCLOSURE + "[offline stand-in] ")
    assert "\u201cThanks! Can the bot help again?\u201d" in bot_replies(fresh, ANA)[2]
    assert wait_for(lambda: outcomes(fresh, ANA) == ["answered", "handoff", "answered"], 5)
    assert on_standby(fresh, ANA) == [200, 200]  # the user's question and Maria's answer
    # What was said while the person had the thread is history the model now sees.
    said = [m["content"] for m in fresh.events("model", ANA)[-1]["messages"]]
    assert any("Is anyone there?" in c for c in said) and any("Maria here" in c for c in said)


def test_a_closed_messaging_window_drops_that_users_next_reply_only(fresh):
    say(fresh, ANA, "Hello!")
    assert wait_for(lambda: bot_replies(fresh, ANA), 10)
    assert requests.post(f"{fresh.url}/api/users/{ANA}/close-window", json={}, timeout=5).status_code == 202
    assert [e["state"] for e in fresh.events("window", ANA)] == ["closed"]  # the chat's note
    say(fresh, BEN, "Hi, I am Ben.")  # another user's window is open
    assert wait_for(lambda: bot_replies(fresh, BEN), 10)
    say(fresh, ANA, "Are you still there?")
    assert wait_for(lambda: outcomes(fresh, ANA) == ["answered", "window-closed"], 10)
    assert len(bot_replies(fresh, ANA)) == 1
    refused = sends(fresh, ANA)[-1]
    assert refused["status"] == 400 and refused["response"]["error"]["code"] == 10
    assert refused["response"]["error"]["error_subcode"] == 2018278
    assert refused["response"]["error"]["message"] == "(#10) This message is sent outside of allowed window."
    say(fresh, ANA, "And now?")  # Meta refused one reply: the user wrote again, the window is open again
    assert wait_for(lambda: len(bot_replies(fresh, ANA)) == 2, 10)
    assert outcomes(fresh, BEN) == ["answered"]


def accounts(sandbox):
    return {a["label"]: a for a in sandbox.state()["accounts"]}


def test_two_pages_and_an_instagram_account_each_with_its_own_users(sandbox):
    shown = accounts(sandbox)
    assert list(shown) == [f"{BAKERY} \u00b7 Messenger", f"{BAKERY} \u00b7 Instagram", f"{BOOKSHOP} \u00b7 Messenger"]
    bakery, instagram, bookshop = shown.values()
    assert (instagram["platform"], instagram["page_id"]) == ("instagram", bakery["id"])
    users = {u["psid"]: u["account"] for u in sandbox.state()["users"]}
    assert {users[p] for p in USERS} == {bakery["id"]} and {users[p] for p in BOOKSHOP_USERS} == {bookshop["id"]}
    assert {users[p] for p in INSTAGRAM_USERS} == {instagram["id"]}


def test_an_instagram_user_is_answered_through_the_instagram_account_with_its_pages_prompt(sandbox):
    instagram = accounts(sandbox)[f"{BAKERY} \u00b7 Instagram"]
    assert say(sandbox, ELI, "Do you sell sourdough?").status_code == 202
    assert wait_for(lambda: bot_replies(sandbox, ELI), 10)
    delivered = sandbox.events("webhook", ELI)[0]["body"]
    assert (delivered["object"], delivered["entry"][0]["id"]) == ("instagram", instagram["id"])
    reads = [g for g in sandbox.events("graph", ELI) if g["path"].endswith("/conversations")]
    assert reads and all(g["request"]["query"]["platform"] == "instagram" and g["status"] == 200 for g in reads)
    assert reads[0]["path"].endswith(f"/{instagram['page_id']}/conversations")  # the linked Page's id and token
    reply = next(e for e in sandbox.events("message", ELI) if e["sender"] == "page")
    assert reply["account"] == instagram["id"]
    system = sandbox.events("model", ELI)[0]["messages"][0]
    assert system == {"role": "system", "content": PROMPTS[BAKERY]}
    assert "Ana's Bakery" in reply["text"] and "Harbour Books" not in reply["text"]


def test_the_second_page_answers_with_its_own_prompt_and_token(sandbox):
    bookshop = accounts(sandbox)[f"{BOOKSHOP} \u00b7 Messenger"]
    assert say(sandbox, GUS, "Can you order a book for me?").status_code == 202
    assert wait_for(lambda: bot_replies(sandbox, GUS), 10)
    assert {g["account"] for g in sandbox.events("graph", GUS)} == {bookshop["id"]}
    assert all(g["status"] == 200 for g in sandbox.events("graph", GUS))  # its own token: no 2018001
    assert sandbox.events("model", GUS)[0]["messages"][0]["content"] == PROMPTS[BOOKSHOP]
    assert "Harbour Books" in bot_replies(sandbox, GUS)[0] and "Ana's Bakery" not in bot_replies(sandbox, GUS)[0]


def test_bad_requests_to_the_page_get_a_4xx(sandbox):
    assert requests.get(f"{sandbox.url}/api/state", params={"after": "x"}, timeout=5).status_code == 400
    assert say(sandbox, "999", "hi").status_code == 404
    assert say(sandbox, "999", "", "close-window").status_code == 404
    assert say(sandbox, ANA, "").status_code == 400
    assert say(sandbox, ANA, "x" * 2001).status_code == 400
    assert requests.post(f"{sandbox.url}/api/users/{ANA}/messages", data="[", timeout=5).status_code == 400
    assert requests.get(f"{sandbox.url}/static/../graph.py", timeout=5).status_code == 404
    assert requests.get(sandbox.url + "/", timeout=5).text.startswith("<!doctype html>")


def test_the_page_has_a_favicon(sandbox):
    icon = requests.get(f"{sandbox.url}/favicon.ico", timeout=5)
    assert icon.status_code == 200 and icon.headers["Content-Type"] == "image/x-icon"
    assert icon.content[:4] == b"\0\0\1\0"  # an .ico with one image


def test_with_a_key_the_real_model_is_used_through_the_recording_proxy():
    upstream = ModelStandIn("an answer from the real model").start()
    sandbox = Sandbox({"OPENAI_API_KEY": ModelStandIn.API_KEY, "OPENAI_BASE_URL": upstream.base_url},
                      port=0).start()
    try:
        # The example knowledge base was embedded by the real model's /embeddings, through the proxy.
        embedded = [r["json"] for r in upstream.requests if "input" in (r["json"] or {})]
        assert sandbox.knowledge.chunks == sum(len(e["input"]) for e in embedded[1:])  # after a one-word probe
        assert sandbox.knowledge.sources == 51 and sandbox.knowledge.search.startswith("embeddings")
        sandbox.graph.user_writes(ANA, text="hello")
        assert sandbox.graph.wait_for_deliveries(1, 10)
        # The first reply says it comes from a bot (Meta's disclosure rule, on by default).
        assert sandbox.graph.sent_texts(ANA) == [
            "You are chatting with Ana's Bakery's automated assistant.\n\nan answer from the real model"]
        model = sandbox.timeline.of_kind("model")[0]
        assert model["mode"] == "real" and model["psid"] == ANA
        assert sandbox.page.info["model"]["label"] == f"real model: {DEFAULT_OPENAI_MODEL} via {upstream.base_url}"
        assert upstream.requests[0]["headers"]["Authorization"] == f"Bearer {ModelStandIn.API_KEY}"
    finally:
        sandbox.stop()
        upstream.stop()


def test_with_a_key_the_real_model_sees_the_sample_photo_and_hears_the_sample_voice_note():
    upstream = ModelStandIn("a real answer").start()
    upstream.transcripts = ["What time do you open on Sundays?"]
    sandbox = Sandbox({"OPENAI_API_KEY": ModelStandIn.API_KEY, "OPENAI_BASE_URL": upstream.base_url},
                      port=0).start()
    try:
        assert media(sandbox, ANA, "image").status_code == 202
        assert sandbox.graph.wait_for_deliveries(1, 10)
        # The chat requests, not the knowledge base's embeddings.
        chats = [r["json"] for r in upstream.requests if "messages" in (r["json"] or {})]
        image_urls = [p["image_url"]["url"] for p in chats[0]["messages"][-1]["content"] if p["type"] == "image_url"]
        assert image_urls == ["data:image/jpeg;base64," + base64.b64encode(SAMPLE_PHOTO).decode()]
        assert media(sandbox, ANA, "voice").status_code == 202
        assert sandbox.graph.wait_for_deliveries(2, 10)
        assert upstream.transcriptions[0].data == (STATIC / "sample-voice.wav").read_bytes()
        chats = [r["json"] for r in upstream.requests if "messages" in (r["json"] or {})]
        assert "What time do you open on Sundays?" in str(chats[-1]["messages"][-1]["content"])
        heard = sandbox.timeline.of_kind("transcription")[0]
        assert (heard["mode"], heard["psid"], heard["text"]) == ("real", ANA, "What time do you open on Sundays?")
    finally:
        sandbox.stop()
        upstream.stop()


def test_ctrl_c_stops_the_sandbox_at_once_while_a_reply_waits_on_the_model(tmp_path):
    upstream = ModelStandIn("too late").start()
    running = SandboxProcess(tmp_path, {"OPENAI_API_KEY": ModelStandIn.API_KEY, "KNOWLEDGE_MODE": "off",
                                        "OPENAI_BASE_URL": upstream.base_url})
    try:
        upstream.delay = 60.0  # the model call outlasts OPENAI_TIMEOUT (20 s): its thread is still in it
        assert say(running, ANA, "hello").status_code == 202
        assert wait_for(lambda: any("messages" in (r["json"] or {}) for r in upstream.requests), 10)
        assert running.stop() == 0  # within SandboxProcess.stop's 10 s, not after the model call's timeout
    finally:
        if running.process.poll() is None:
            running.process.kill()
        upstream.stop()


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "tgkill"), reason="tgkill(2) is Linux's (glibc 2.30 and later)")
def test_ctrl_c_that_the_kernel_gives_a_thread_other_than_the_main_one_stops_the_sandbox(tmp_path):
    """Linux gives a process's signal to its main thread when it can, but not always; Python runs
    the handler in the main thread only when that one wakes. Here tgkill(2) hands it to the others."""
    running = SandboxProcess(tmp_path)
    try:
        pid = running.process.pid
        libc = ctypes.CDLL(None, use_errno=True)
        others = [int(tid) for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid]
        told = [tid for tid in others if libc.tgkill(pid, tid, signal.SIGTERM) == 0]  # one that ended: ESRCH
        assert told, "no thread but the main one to give the signal to"
        try:
            code = running.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"no stop 10 s after the signal; the sandbox's log ends:\n{running.log()[-6000:]}")
        assert code == 0, running.log()[-6000:]
    finally:
        if running.process.poll() is None:
            running.process.kill()


def test_a_stop_that_hangs_is_cut_off_with_every_threads_stack_in_the_log(tmp_path):
    """The database write-locked by another process: giving back the reply in flight would wait
    for it 30 s (LOCK_WAIT_SECONDS). Ctrl-C still ends the sandbox, at STOP_WITHIN_S, and says where."""
    upstream = ModelStandIn("too late").start()
    running = SandboxProcess(tmp_path, {"OPENAI_API_KEY": ModelStandIn.API_KEY, "KNOWLEDGE_MODE": "off",
                                        "OPENAI_BASE_URL": upstream.base_url, "TMPDIR": str(tmp_path)})
    try:
        upstream.delay = 60.0
        assert say(running, ANA, "hello").status_code == 202
        assert wait_for(lambda: any("messages" in (r["json"] or {}) for r in upstream.requests), 10)
        [database] = tmp_path.glob("messenger-sandbox-*/bot.sqlite3")
        blocker = sqlite3.connect(database, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            started = time.monotonic()
            assert running.stop() == 1
            assert STOP_WITHIN_S <= time.monotonic() - started < STOP_WITHIN_S + 2
        finally:
            blocker.close()
        log = running.log()
        assert "Thread 0x" in log and "in release" in log  # faulthandler's stacks, the hung call among them
        assert list(tmp_path.glob("messenger-sandbox-*")) == []  # forgotten, as on any Ctrl-C
    finally:
        if running.process.poll() is None:
            running.process.kill()
        upstream.stop()


def test_a_taken_port_is_a_clear_error(sandbox):
    port = sandbox.url.rsplit(":", 1)[1]
    result = subprocess.run([sys.executable, "-m", "devtools.sandbox", "--port", port], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and f"cannot open the sandbox on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_printed_replay_command_works_as_printed_and_shows_the_users_messages(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "FB_"))}
    running = SandboxProcess(tmp_path)
    try:
        command = re.search(r"replay fixtures here: (.*)", running.banner).group(1)
        assert ".venv/bin/python -m devtools.replay tests/fixtures --url " in command and "--verify" in command
        assert re.search(r"FB_VERIFY_TOKEN=\S+", command) and re.search(r"FB_INSTAGRAM_ID=\d+", command)
        if not (ROOT / ".venv" / "bin" / "python").exists():  # a checkout whose venv lives elsewhere
            command = command.replace(".venv/bin/python", sys.executable)
        result = subprocess.run(command, shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.startswith("verify: 200")
        events = running.state()["events"]
        said = {psid: [e["text"] for e in events if e["kind"] == "message" and e["sender"] == "user"
                       and e["psid"] == psid] for psid in ("2000000000000001", IGSID)}
        assert "First question" in said["2000000000000001"]  # batch.json
        assert "What are your opening hours?" in said["2000000000000001"]  # text.json
        assert "Do you have gluten-free bread?" in said[IGSID]  # instagram_text.json, to the Instagram account
        # Replies to the replayed users are still in flight here: Ctrl-C stops it all the same, in order.
        assert running.stop() == 0, running.log()[-6000:]
    finally:
        if running.process.poll() is None:
            running.process.kill()


def test_the_website_chat_runs_beside_messenger_and_its_turns_are_on_the_timeline(sandbox):
    webchat = sandbox.state()["webchat"]
    bakery = accounts(sandbox)[f"{BAKERY} \u00b7 Messenger"]
    assert (webchat["name"], webchat["account"]) == ("Website visitor", bakery["id"])
    demo = requests.get(webchat["demo"], timeout=5)
    assert demo.status_code == 200 and '<script src="/webchat.js"' in demo.text
    seq = mark(sandbox)
    answer = requests.post(webchat["url"] + "/api/chat", json={"message": "Do you sell rye bread?"},
                           headers={"Accept": "text/event-stream"}, timeout=15)
    names = [name for name, _ in parse_events(answer.text)]
    assert names[0] == "start" and names[-1] == "done" and names.count("delta") > 3  # streamed by the model
    conversation = parse_events(answer.text)[0][1]["conversation"]
    psid = web_psid(conversation)  # the exchange log's psid for a web conversation
    assert wait_for(lambda: events_after(sandbox, seq, "outcome", psid), 5)
    request, answered = events_after(sandbox, seq, "webchat", psid)
    assert (request["phase"], request["text"], request["stream"]) == ("request", "Do you sell rye bread?", True)
    assert (answered["phase"], answered["outcome"], answered["deltas"]) == ("answer", "answered", names.count("delta"))
    [model] = events_after(sandbox, seq, "model", psid)
    assert model["stream"] is True and model["messages"][0] == {"role": "system", "content": PROMPTS[BAKERY]}
    assert model["messages"][-1]["content"].endswith("Do you sell rye bread?")
    [outcome] = events_after(sandbox, seq, "outcome", psid)
    assert (outcome["outcome"], outcome["channel"]) == ("answered", "web")


# -- the knowledge base: Ana's Bakery's documents, and the excerpts on the timeline --------------------------

GLUTEN_FREE = "How much is the gluten-free buckwheat and teff loaf?"
GLUTEN_FREE_FACT = "Buckwheat and teff loaf: \u00a36.20"  # examples/knowledge/anas-bakery/allergens/gluten-free.md
EXCERPTS_HEADER = ("Excerpts from Ana's Bakery's own documents, most relevant first. Answer from them; if they do not"
                   " answer the question, say you do not know rather than guess.")


@pytest.mark.parametrize("message, excerpts", [
    (f"{EXCERPTS_HEADER}\n\n[1] Faq (faq.csv)\nQ: Sundays?\nA: 8 to 14.\n\n[2] Prices \u203a Cakes "
     "(https://ana.example/prices)\nCheesecake: 4 euros.",
     [(1, "Faq", "faq.csv", "Q: Sundays?\nA: 8 to 14."), (2, "Prices \u203a Cakes", "https://ana.example/prices",
                                                          "Cheesecake: 4 euros.")]),
    (f"{EXCERPTS_HEADER}\n\n[1] Notes (notes.md)\nSee\n[2] below\n\n[3] is not the next one\n\nend",
     [(1, "Notes", "notes.md", "See\n[2] below\n\n[3] is not the next one\n\nend")]),
    (f"{EXCERPTS_HEADER}\n\n[1] A title without a source\nText.", [(1, "A title without a source", "", "Text.")]),
    (EXCERPTS_HEADER, []),
], ids=["two excerpts", "a label inside the text is text", "no source", "a header alone"])
def test_the_excerpts_are_read_back_from_the_knowledge_message(message, excerpts):
    from devtools.emulator.excerpts import read_excerpts
    header, found = read_excerpts(message)
    assert header == EXCERPTS_HEADER
    assert [(e.number, e.title, e.source, e.text) for e in found] == excerpts


def knowledge_turn(sandbox, psid, text):
    """`psid` asks `text`; the bot's reply, and the model call and exchange-log outcome of that turn."""
    seq = mark(sandbox)
    assert say(sandbox, psid, text).status_code == 202
    assert wait_for(lambda: events_after(sandbox, seq, "outcome", psid), 10)
    [reply] = [e["text"] for e in events_after(sandbox, seq, "message", psid) if e["sender"] == "page"]
    models = events_after(sandbox, seq, "model", psid)
    return reply, models[-1] if models else None, events_after(sandbox, seq, "outcome", psid)[0]


def test_a_bakery_question_is_answered_from_its_document_with_the_excerpts_and_scores_on_the_timeline(sandbox):
    loaded = sandbox.state()["knowledge"]
    assert (loaded["mode"], loaded["page"], loaded["sources"]) == ("prefer", BAKERY, 51) and loaded["chunks"] > 51
    chloe = list(USERS)[2]
    reply, model, outcome = knowledge_turn(sandbox, chloe, GLUTEN_FREE)
    assert "[offline stand-in] From \u201cGluten-free baking\u201d: " in reply and GLUTEN_FREE_FACT in reply
    # The model got the excerpts right after the Page's prompt; the timeline has them read back.
    assert model["messages"][0]["content"] == PROMPTS[BAKERY]
    assert model["messages"][1]["content"].startswith(EXCERPTS_HEADER + "\n\n[1] Gluten-free baking (gluten-free.md)")
    knowledge = model["knowledge"]
    assert (knowledge["at"], knowledge["header"]) == (1, EXCERPTS_HEADER)
    first = knowledge["excerpts"][0]
    assert (first["number"], first["title"], first["source"]) == (1, "Gluten-free baking", "gluten-free.md")
    assert GLUTEN_FREE_FACT in first["text"]
    # The exchange log's [chunk id, score] of each, in the excerpts' order, named from the bot's store.
    logged = outcome["knowledge"]
    assert outcome["outcome"] == "answered" and len(logged) == len(knowledge["excerpts"])
    assert [item["title"] for item in logged] == [e["title"] for e in knowledge["excerpts"]]
    assert [item["source"] for item in logged] == [e["source"] for e in knowledge["excerpts"]]
    assert len({item["chunk_id"] for item in logged}) == len(logged)
    assert all(isinstance(item["chunk_id"], int) and 0 < item["score"] <= 1 for item in logged)


def test_the_instagram_account_answers_from_its_pages_documents_and_the_other_page_has_none(sandbox):
    reply, model, outcome = knowledge_turn(sandbox, FAY, "How much is a butter croissant?")
    assert "Butter croissant: \u00a32.60" in reply and outcome["knowledge"][0]["source"] == "pastries.md"
    hugo = list(BOOKSHOP_USERS)[1]
    reply, model, outcome = knowledge_turn(sandbox, hugo, "How much is a butter croissant?")
    assert "You said \u201cHow much is a butter croissant?\u201d" in reply  # Ana's documents are Ana's alone
    assert "knowledge" not in model and not any(m["content"].startswith("Excerpts from") for m in model["messages"])
    assert (outcome["outcome"], outcome["knowledge"]) == ("answered", [])  # the panel: "nothing relevant"


def test_the_printed_knowledge_command_manages_the_sandboxs_knowledge_base(fresh, tmp_path):
    line = fresh.process.stdout.readline()  # the banner's line after the replay command
    found = re.search(r"knowledge base: 51 sources, (\d+) chunks from .*manage it: (.*-m bot knowledge) search "
                      r"\"Are you open on Sundays\?\" --page (\d+) ", line)
    assert found, line
    chunks, command, page = int(found.group(1)), found.group(2), found.group(3)
    if not (ROOT / ".venv" / "bin" / "python").exists():
        command = command.replace(".venv/bin/python", sys.executable)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "FB_"))}
    # A live bot's .env beside it (found by a probe: one-Page names and its store broke the command).
    env.update(FB_PAGE_NAME="My Shop", FB_INSTAGRAM_ID="17841400000000001", WEBCHAT="on",
               DATABASE_URL="postgresql://live@127.0.0.1:1/live")

    def knowledge(*args: str) -> str:
        result = subprocess.run(f"{command} " + " ".join(map(shlex.quote, args)), shell=True, cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    assert knowledge("list").splitlines()[-1] == f"51 source(s), {chunks} chunk(s)"
    assert "Sunday" in knowledge("search", "Are you open on Sundays?", "--page", page)  # the command as printed
    best = json.loads(knowledge("search", "--json", "--page", page, GLUTEN_FREE).splitlines()[0])
    reply, model, outcome = knowledge_turn(fresh, ANA, GLUTEN_FREE)
    assert GLUTEN_FREE_FACT in reply
    assert (outcome["knowledge"][0]["chunk_id"], outcome["knowledge"][0]["score"]) == (best["chunk_id"],
                                                                                        best["similarity"])
    stall = tmp_path / "lantern-festival.md"
    stall.write_text("# Lantern festival\n\nOur lantern festival stall on the quay sells ginger lanterns: 2.40 each.\n")
    assert "added" in knowledge("add", "--page", page, str(stall))
    reply, model, outcome = knowledge_turn(fresh, BEN, "What does the lantern festival stall sell?")
    assert "From \u201cLantern festival\u201d: Our lantern festival stall on the quay sells ginger lanterns" in reply
    assert outcome["knowledge"][0]["source"] == "lantern-festival.md"


def test_knowledge_mode_only_says_it_does_not_know_without_a_model_call(tmp_path):
    running = SandboxProcess(tmp_path, {"KNOWLEDGE_MODE": "only"})
    try:
        reply, model, outcome = knowledge_turn(running, ANA, "Hello!")
        assert reply.endswith(DEFAULT_KNOWLEDGE_UNKNOWN_REPLY) and model is None
        assert (outcome["outcome"], outcome["knowledge"]) == ("unknown", [])  # the page's note and panel step
        reply, model, outcome = knowledge_turn(running, BEN, GLUTEN_FREE)
        assert GLUTEN_FREE_FACT in reply and outcome["outcome"] == "answered" and outcome["knowledge"]
    finally:
        running.stop()


def test_knowledge_mode_off_loads_nothing_and_says_so():
    sandbox = Sandbox({"KNOWLEDGE_MODE": "off"}, port=0, model_delay=0).start()
    try:
        assert sandbox.knowledge is None and sandbox.page.info["knowledge"] == {"mode": "off", "page": BAKERY}
        assert knowledge_line(sandbox) == "knowledge base: off (KNOWLEDGE_MODE=off)"
        sandbox.graph.user_writes(ANA, text=GLUTEN_FREE)
        assert sandbox.graph.wait_for_deliveries(1, 10)
        assert "You said" in sandbox.graph.sent_texts(ANA)[0]
        assert wait_for(lambda: sandbox.timeline.of_kind("outcome"), 5)
        assert sandbox.timeline.of_kind("outcome")[0]["knowledge"] is None  # not searched: nothing to say
    finally:
        sandbox.stop()


def test_a_live_bots_store_and_endpoints_in_the_environment_never_reach_the_sandbox():
    """Found by a probe: run next to a live bot (its .env in the folder), the sandbox took its
    DATABASE_URL, joined the live queue as one more host and failed real users' messages for
    Pages it did not know. Its own store, always; the owner's endpoints, never."""
    sandbox = Sandbox({"DATABASE_URL": "postgresql://live@127.0.0.1:1/live", "TRACKING_URL": "https://example.com/t",
                       "HANDOFF_WEBHOOK": "https://example.com/h", "PORT": "not-a-port", "KNOWLEDGE_MODE": "off"},
                      port=0, model_delay=0).start()
    try:
        config = sandbox.config
        assert (config.database_url, config.tracking_url, config.handoff_webhook) == (None, None, None)
        sandbox.graph.user_writes(ANA, text="hello")
        assert sandbox.graph.wait_for_deliveries(1, 10)
    finally:
        sandbox.stop()


@pytest.mark.parametrize("after_s", [0.3, 0.9, 1.5])
def test_ctrl_c_while_the_sandbox_starts_stops_it_quietly(tmp_path, after_s):
    """A newcomer's Ctrl-C at any moment of the start (its imports take about a second): the
    sandbox ends, with no traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "FB_"))}
    process = subprocess.Popen([sys.executable, "-m", "devtools.sandbox", "--port", "0"], cwd=tmp_path,
                               env={**env, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    time.sleep(after_s)  # a moment of the start, on the machine's own time: what is measured is a real process
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=20)[0]
    assert process.returncode in (0, 130) and "Traceback" not in output, output[-2000:]
