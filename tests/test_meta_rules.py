"""Meta's rules: the bot says it is a bot when it must, and never answers outside the messaging window."""
import json
import logging
import os
import sqlite3
import time
from contextlib import contextmanager, nullcontext

import pytest

from bot.replies.meta_rules import FIRST, SILENCE, AFTER_PERSON, Activity, disclosure_due
from config import load_config
from werkzeug.wrappers import Response

from devtools.emulator import LocalServer, graph_error
from tests.support import PAGE_ID, PSID, answer_queue, echo_body, post_signed, text_body
from tests.support.messages import FakeClock

HOUR_MS = 3600 * 1000
SAID = "You are chatting with Ana's Bakery's automated assistant."
REPLY = "Hello from the model."


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def client(make_client, clock):
    return make_client(clock, DISCLOSURE="on", FB_PAGE_NAME="Ana's Bakery", HUMAN_PAUSE="30m")


def say(client, clock, n, text="hello", **body):
    post_signed(client, text_body(f"m_user_{n}", text, timestamp=int(clock() * 1000), **body))
    answer_queue(client)


def log(client):
    return list(client.application.extensions["dispatcher"].store.conversations.export())


@pytest.mark.parametrize("disclosed, previous, person, first, expected", [
    (None, None, None, 10 * HOUR_MS, FIRST),
    (HOUR_MS, 2 * HOUR_MS, None, 3 * HOUR_MS, None),  # a conversation going on
    (HOUR_MS, 2 * HOUR_MS, None, 26 * HOUR_MS, SILENCE),  # 24 h of silence
    (HOUR_MS, 2 * HOUR_MS, 3 * HOUR_MS, 4 * HOUR_MS, AFTER_PERSON),  # a person answered since
    (5 * HOUR_MS, 5 * HOUR_MS, 3 * HOUR_MS, 6 * HOUR_MS, None),  # ... and the bot already said it since
], ids=["first", "ongoing", "silence", "after-person", "said-since-person"])
def test_when_the_bot_must_say_it_is_one(disclosed, previous, person, first, expected):
    assert disclosure_due(Activity(disclosed, previous, person), first, 24 * HOUR_MS) == expected


def test_the_first_reply_says_it_comes_from_a_bot_and_the_next_does_not(client, graph, clock):
    say(client, clock, 1)
    clock.advance(60)
    say(client, clock, 2)
    assert graph.sent_texts(PSID) == [f"{SAID}\n\n{REPLY}", REPLY]


def test_after_a_day_of_silence_it_says_it_again(client, graph, clock):
    say(client, clock, 1)
    clock.advance(25 * 3600)
    say(client, clock, 2)
    assert graph.sent_texts(PSID) == [f"{SAID}\n\n{REPLY}", f"{SAID}\n\n{REPLY}"]


@pytest.mark.parametrize("behind", [0, 3600], ids=["host-time", "bot-clock-an-hour-behind"])
def test_when_the_bot_takes_over_again_after_a_person_it_says_so(make_client, graph, behind):
    """On the bot's clock only: the time its answers are logged with is the one the rule reads."""
    clock = FakeClock(time.time() - behind)
    client = make_client(clock, DISCLOSURE="on", FB_PAGE_NAME="Ana's Bakery", HUMAN_PAUSE="30m")
    say(client, clock, 1)
    clock.advance(60)
    post_signed(client, echo_body("m_inbox", "Ana here!", app_id=263902037430900, timestamp=int(clock() * 1000)))
    answer_queue(client)
    clock.advance(31 * 60)  # HUMAN_PAUSE is over
    say(client, clock, 2)
    assert graph.sent_texts(PSID) == [f"{SAID}\n\n{REPLY}", f"{SAID}\n\n{REPLY}"]


def test_a_retried_reply_carries_the_line_once_and_the_next_reply_not_at_all(client, graph, clock):
    graph.fail_next("send", graph_error(2, "Service temporarily unavailable", status=500))
    say(client, clock, 1)
    assert graph.sent_texts(PSID) == []
    clock.advance(120)  # past the retry's backoff
    answer_queue(client)
    clock.advance(60)
    say(client, clock, 2)
    assert graph.sent_texts(PSID) == [f"{SAID}\n\n{REPLY}", REPLY]


def test_a_person_who_answers_while_the_reply_waits_for_its_retry_has_the_conversation(client, graph, clock):
    """The gate asked before the model; the reply's first send failed, and a person answered
    from the inbox before its retry: the bot's answer is dropped, not sent on top of theirs."""
    graph.fail_next("send", graph_error(2, "Service temporarily unavailable", status=500))
    say(client, clock, 1, "Is my order shipped?")
    clock.advance(1)
    post_signed(client, echo_body("m_inbox", "Ana here, it left today!", app_id=263902037430900,
                                  timestamp=int(clock() * 1000)))
    clock.advance(120)  # past the retry's backoff
    answer_queue(client)
    assert graph.sent_texts(PSID) == []
    assert [r["outcome"] for r in log(client)] == ["paused"]
    clock.advance(31 * 60)  # HUMAN_PAUSE is over: the bot answers again
    say(client, clock, 2, "thanks! and on Sundays?")
    assert graph.sent_texts(PSID)[-1].endswith(REPLY)


def test_a_persons_answer_delivered_late_pauses_from_when_it_was_written(client, graph, clock):
    """Meta redelivers for up to an hour after an outage: a person's answer written 50 minutes
    ago leaves 30 - 50 < 0 minutes of pause, not another whole HUMAN_PAUSE from its arrival."""
    post_signed(client, echo_body("m_inbox_old", "done, bye", app_id=263902037430900,
                                  timestamp=int((clock() - 50 * 60) * 1000)))
    post_signed(client, echo_body("m_inbox_new", "and one more thing", app_id=263902037430900,
                                  timestamp=int((clock() - 10 * 60) * 1000)))
    answer_queue(client)
    paused_until = client.application.extensions["dispatcher"].store.conversations.user(PSID).paused_until
    assert paused_until == pytest.approx(clock() + 20 * 60, abs=1)  # 30 minutes from the newer one
    clock.advance(20 * 60 + 1)
    say(client, clock, 1, "hello?")
    assert graph.sent_texts(PSID)[-1].endswith(REPLY)


def test_the_line_is_on_by_default_and_names_the_page_when_it_has_a_name(env):
    assert load_config({**env, "DISCLOSURE": ""}, env_file=None).disclosure_line == \
        "You are chatting with an automated assistant."
    named = load_config({**env, "DISCLOSURE": "", "FB_PAGE_NAME": "Ana's Bakery"}, env_file=None)
    assert named.disclosure_line == SAID
    assert load_config({**env, "DISCLOSURE": "off"}, env_file=None).disclosure_line is None


# -- the messaging window -----------------------------------------------------------------------
def test_a_reply_whose_window_closed_in_the_queue_is_dropped_not_sent(client, graph, model, clock):
    post_signed(client, text_body("m_old", "are you there?", timestamp=int(clock() * 1000)))
    clock.advance(25 * 3600)  # an outage: the reply process comes back a day later
    answer_queue(client)
    assert graph.sent_texts(PSID) == [] and model.requests == []
    [record] = log(client)
    assert record["outcome"] == "window-closed"
    metrics = client.get("/metrics").get_data(as_text=True).splitlines()
    assert any(line.startswith("messenger_exchanges_total{") and 'outcome="window-closed"' in line
               and f'page="{PAGE_ID}"' in line and line.endswith(" 1.0") for line in metrics)


def test_a_reply_whose_window_closes_while_the_model_answers_is_dropped_not_sent(client, graph, model, clock):
    """Found by a probe: the window was looked at only before the model was asked, and a slow
    model (up to SLOW_REPLY_LIMIT) let the reply go out after it had closed."""
    def slow(messages):
        clock.advance(24 * 3600 + 1)
        return "Too late."
    model.reply = slow
    say(client, clock, 1, "are you there?")
    assert graph.sent_texts(PSID) == [] and len(model.requests) == 1
    [record] = log(client)
    assert record["outcome"] == "window-closed"
    assert client.application.extensions["dispatcher"].store.states() == {"m_user_1": "failed"}  # not retried


def test_a_stored_reply_held_back_past_the_window_is_dropped_not_sent(client, graph, model, clock):
    """A send Meta refused for its rate limit waits minutes with its answer stored; when the
    window closes meanwhile, the stored answer is not sent."""
    graph.fail_next("send", graph_error(613, "Calls to this api have exceeded the rate limit."))
    say(client, clock, 1, "are you there?")
    assert graph.sent_texts(PSID) == [] and len(model.requests) == 1
    clock.advance(24 * 3600 + 1)
    answer_queue(client)
    assert graph.sent_texts(PSID) == [] and len(model.requests) == 1
    assert log(client)[-1]["outcome"] == "window-closed"


def test_a_message_from_an_ad_opens_seven_days(client, graph, clock):
    body = json.loads(text_body("m_ad", "I saw your ad", timestamp=int(clock() * 1000)))
    body["entry"][0]["messaging"][0]["referral"] = {"ref": "spring", "source": "ADS", "type": "OPEN_THREAD",
                                                    "ad_id": "6045246247433"}
    post_signed(client, json.dumps(body).encode())
    clock.advance(3 * 24 * 3600)
    answer_queue(client)
    assert len(graph.sent_texts(PSID)) == 1


def test_metas_window_error_drops_the_reply_and_says_why(client, graph, clock, caplog):
    graph.fail_next("send", graph_error(10, "(#10) This message is sent outside of allowed window.", subcode=2018278))
    with caplog.at_level(logging.ERROR):
        say(client, clock, 1)
    [record] = log(client)
    assert record["outcome"] == "window-closed"
    assert client.application.extensions["dispatcher"].store.states() == {"m_user_1": "failed"}  # not retried
    assert "outside Meta's messaging window" in caplog.text


def test_a_restricted_page_is_explained_in_the_log(client, graph, clock, caplog):
    graph.fail_next("send", graph_error(10, "(#10) This Page is restricted.", subcode=1893063))
    with caplog.at_level(logging.ERROR):
        say(client, clock, 1)
    assert log(client)[0]["outcome"] == "failed" and "restricted from messaging" in caplog.text


def test_bot_replies_never_carry_a_message_tag(client, graph, clock):
    say(client, clock, 1)
    sends = [c.body for c in graph.calls if c.path.endswith("me/messages") and "message" in (c.body or {})]
    assert sends and all("tag" not in body and body["messaging_type"] == "RESPONSE" for body in sends)


# -- a way to a person ----------------------------------------------------------------------------
HANDED_OVER = "Thank you, a person from Ana's Bakery will answer you here as soon as possible."


class WebhookRecorder(LocalServer):
    """The Page owner's HANDOFF_WEBHOOK: records each JSON body, answers the scripted statuses."""

    def __init__(self, statuses=()):
        super().__init__()
        self.statuses, self.bodies = list(statuses), []

    def handle(self, request):
        self.bodies.append(request.get_json())
        return Response("ok", self.statuses.pop(0) if self.statuses else 200)


@pytest.fixture
def owner():
    """The owner's endpoint, failing its first note with a 500 (tried once more)."""
    server = WebhookRecorder([500]).start()
    yield server
    server.stop()


@pytest.fixture
def steady_owner():
    """The owner's endpoint, taking every note at once."""
    server = WebhookRecorder().start()
    yield server
    server.stop()


def quick_reply_body(n, clock, title, payload):
    body = json.loads(text_body(f"m_user_{n}", title, timestamp=int(clock() * 1000)))
    body["entry"][0]["messaging"][0]["message"]["quick_reply"] = {"payload": payload}
    return json.dumps(body).encode()


@pytest.mark.parametrize("words, text", [("", "Human!"), ("", "AGENT"), ("mensch, humano", "Humano")],
                         ids=["english", "any-case", "configured"])
def test_asking_for_a_person_pauses_the_bot_until_the_pause_ends(make_client, graph, model, clock, words, text):
    client = make_client(clock, FB_PAGE_NAME="Ana's Bakery", HUMAN_PAUSE="30m",
                         **({"HANDOFF_WORDS": words} if words else {}))
    say(client, clock, 1, text)
    assert graph.sent_texts(PSID) == [HANDED_OVER] and model.requests == []
    clock.advance(60)
    say(client, clock, 2, "hello?")  # a person answers now: the bot keeps quiet
    assert graph.sent_texts(PSID) == [HANDED_OVER]
    clock.advance(31 * 60)
    say(client, clock, 3, "anyone?")
    assert graph.sent_texts(PSID) == [HANDED_OVER, REPLY]
    assert [r["outcome"] for r in log(client)] == ["handoff", "paused", "answered"]


class Died(BaseException):
    """The reply process killed (nothing in it catches this)."""


@contextmanager
def store_write_failing(client, failing, write="sending"):
    """The reply threads' store, with `failing()` run in place of its `write` (by default the
    write before each send)."""
    replier = client.application.extensions["dispatcher"].replier
    store = replier.store

    class FailsToStore:
        def __getattr__(self, name):
            return (lambda *args, **kwargs: failing()) if name == write else getattr(store, name)
    replier.store = FailsToStore()
    try:
        yield store
    finally:
        replier.store = store


@pytest.mark.parametrize("failure", [Died(), sqlite3.OperationalError("database is locked")],
                         ids=["process-died", "write-failed"])
def test_a_request_for_a_person_is_answered_and_pauses_though_the_write_of_its_answer_failed(
        make_client, graph, model, clock, failure, steady_owner):
    """The write that keeps the answer failed: the process died there (the pause that request
    set must not silence its own reply when the batch is taken over), or the write failed and
    the answer was kept by the retry's (the pause goes with it: the retry asks no gate again)."""
    owner = steady_owner
    client = make_client(clock, FB_PAGE_NAME="Ana's Bakery", HUMAN_PAUSE="30m", LEASE_SECONDS="8",
                         RETRY_BASE_SECONDS="1", HANDOFF_WEBHOOK=owner.url + "/handoff")
    post_signed(client, text_body("m_human", "human", timestamp=int(clock() * 1000)))

    def fail():
        raise failure
    with store_write_failing(client, fail), pytest.raises(Died) if isinstance(failure, Died) else nullcontext():
        answer_queue(client)
    assert graph.sent_texts(PSID) == []
    clock.advance(9)  # its lease runs out (taken over), or its backoff
    answer_queue(client)
    assert graph.sent_texts(PSID) == [HANDED_OVER]
    clock.advance(60)
    say(client, clock, 2, "hello?")  # and the pause holds from then on
    assert graph.sent_texts(PSID) == [HANDED_OVER]
    # The owner hears of it once, after the reply went out, with the asking message's id.
    assert [note["id"] for note in owner.bodies] == ["m_human"]


def test_a_hand_over_cut_short_by_a_kill_is_repeated_with_the_same_id_and_the_reply_is_not(
        make_client, graph, clock, steady_owner):
    owner = steady_owner
    client = make_client(clock, FB_PAGE_NAME="Ana's Bakery", HUMAN_PAUSE="30m", LEASE_SECONDS="8",
                         HANDOFF_WEBHOOK=owner.url + "/handoff")
    post_signed(client, text_body("m_human", "human", timestamp=int(clock() * 1000)))

    def die():
        raise Died()
    with store_write_failing(client, die, "complete"), pytest.raises(Died):  # after the hand-over, before the record
        answer_queue(client)
    clock.advance(9)  # its lease runs out: taken over
    answer_queue(client)
    assert graph.sent_texts(PSID) == [HANDED_OVER]
    assert [note["id"] for note in owner.bodies] == ["m_human", "m_human"]


def test_a_request_for_a_person_whose_reply_can_never_go_still_reaches_the_owner(make_client, graph, clock, owner):
    client = make_client(clock, HUMAN_PAUSE="30m", HANDOFF_WEBHOOK=owner.url + "/handoff")
    graph.fail_next("send", graph_error(10, "(#10) This message is sent outside of allowed window.", subcode=2018278))
    say(client, clock, 1, "human")
    assert graph.sent_texts(PSID) == [] and [r["outcome"] for r in log(client)] == ["window-closed"]
    assert [note["id"] for note in owner.bodies] == ["m_user_1", "m_user_1"]  # a 500 first: tried once more


def test_a_user_state_change_that_cannot_be_written_does_not_cost_the_reply(make_client, graph, model, clock, env):
    """The write of the answer failed, and so does the pause it carries: the retry keeps the
    answer without it (logged as dropped) rather than leaving the batch to its lease."""
    client = make_client(clock, FB_PAGE_NAME="Ana's Bakery", HUMAN_PAUSE="30m", RETRY_BASE_SECONDS="1")
    database = os.path.join(env["DATA_DIR"], "bot.sqlite3")

    def fail():
        with sqlite3.connect(database) as db:
            db.execute("ALTER TABLE users RENAME TO users_away")  # no user state can be written now
        raise sqlite3.OperationalError("database is locked")
    post_signed(client, text_body("m_human", "human", timestamp=int(clock() * 1000)))
    with store_write_failing(client, fail) as store:
        answer_queue(client)
    with sqlite3.connect(database) as db:
        db.execute("ALTER TABLE users_away RENAME TO users")
    assert store.states() == {"m_human": "pending"}  # its retry was recorded, the answer kept
    clock.advance(2)
    answer_queue(client)
    assert graph.sent_texts(PSID) == [HANDED_OVER]


def test_a_word_inside_a_sentence_is_not_a_request_for_a_person(make_client, graph, clock):
    client = make_client(clock)
    say(client, clock, 1, "is a person allowed to bring a dog?")
    assert graph.sent_texts(PSID) == [REPLY]


def test_the_button_under_each_answer_hands_over_and_the_owner_hears_of_it(make_client, graph, model, clock, owner):
    client = make_client(clock, FB_PAGE_NAME="Ana's Bakery", HANDOFF_BUTTON="Talk to a person",
                         HANDOFF_WEBHOOK=owner.url + "/handoff")
    say(client, clock, 1, "Do you have gluten-free bread?")
    [send] = [c.body for c in graph.calls if c.path.endswith("me/messages") and "message" in (c.body or {})]
    assert send["message"]["quick_replies"] == [{"content_type": "text", "title": "Talk to a person",
                                                 "payload": "HANDOFF"}]
    clock.advance(60)
    post_signed(client, quick_reply_body(2, clock, "Talk to a person", "HANDOFF"))
    answer_queue(client)
    assert graph.sent_texts(PSID)[-1] == HANDED_OVER and len(model.requests) == 1
    assert len(owner.bodies) == 2  # a 500 first: tried once more
    note = owner.bodies[-1]
    assert (note["event"], note["id"], note["psid"], note["page_id"]) == ("handoff", "m_user_2", PSID, PAGE_ID)
    assert [(m["from"], m["text"]) for m in note["messages"]] == [
        ("user", "Do you have gluten-free bread?"), ("page", REPLY)]


def test_the_thread_passed_back_by_the_inbox_ends_the_pause_at_once(make_client, graph, clock):
    client = make_client(clock, HUMAN_PAUSE="30m")
    say(client, clock, 1, "human")
    clock.advance(60)
    event = {"sender": {"id": PSID}, "recipient": {"id": PAGE_ID}, "timestamp": int(clock() * 1000),
             "pass_thread_control": {"previous_owner_app_id": "263902037430900", "new_owner_app_id": "1",
                                     "metadata": "done"}}
    post_signed(client, json.dumps({"object": "page", "entry": [{"id": PAGE_ID, "messaging": [event]}]}).encode())
    answer_queue(client)
    say(client, clock, 2, "thanks, one more question")
    assert graph.sent_texts(PSID)[-1] == REPLY


def test_a_person_answering_in_the_inbox_s_thread_is_seen_on_standby_and_the_bot_says_it_is_back(
        make_client, graph, clock):
    """While the Page inbox owns the thread Meta sends its events under `standby`: the person's
    answer still pauses the bot and enters the mirror, so after the handback the bot says it is
    one again - and the user's own messages there are never answered."""
    client = make_client(clock, DISCLOSURE="on", FB_PAGE_NAME="Ana's Bakery", HUMAN_PAUSE="30m",
                         HANDOFF_THREAD_CONTROL="on")
    say(client, clock, 1, "agent")
    clock.advance(60)
    for body in (text_body("m_user_2", "my order is late", timestamp=int(clock() * 1000)),
                 echo_body("m_inbox", "Ana here, sorry!", app_id=263902037430900, timestamp=int(clock() * 1000) + 1)):
        standby = json.loads(body)
        standby["entry"][0]["standby"] = standby["entry"][0].pop("messaging")
        assert post_signed(client, json.dumps(standby).encode()).status_code == 200
    answer_queue(client)
    history = client.application.extensions["dispatcher"].store.conversations.history(PSID, PAGE_ID, 10, None)
    assert {"m_user_2", "m_inbox"} <= {h.mid for h in history}  # the model sees both afterwards
    assert [r["outcome"] for r in log(client)] == ["handoff"]  # the user's was never to answer
    clock.advance(60)
    graph.inbox_passes_back(PSID)  # the thread is the bot's again (Meta's webhook for it is posted below)
    event = {"sender": {"id": PSID}, "recipient": {"id": PAGE_ID}, "timestamp": int(clock() * 1000),
             "pass_thread_control": {"previous_owner_app_id": "263902037430900", "new_owner_app_id": "1"}}
    post_signed(client, json.dumps({"object": "page", "entry": [{"id": PAGE_ID, "messaging": [event]}]}).encode())
    say(client, clock, 3, "one more question")
    assert graph.sent_texts(PSID) == [f"{SAID}\n\n{HANDED_OVER}", f"{SAID}\n\n{REPLY}"]


def test_with_thread_control_the_inbox_gets_the_thread_after_the_user_was_told(make_client, graph, clock):
    """Once the inbox owns the thread Meta refuses the bot's sends (the emulator too): the reply goes first."""
    client = make_client(clock, FB_PAGE_NAME="Ana's Bakery", HANDOFF_THREAD_CONTROL="on")
    say(client, clock, 1, "agent")
    assert graph.sent_texts(PSID) == [HANDED_OVER]
    [call] = [c for c in graph.calls if c.path.endswith("me/pass_thread_control")]
    assert call.body["recipient"] == {"id": PSID} and call.body["target_app_id"] == 263902037430900
    assert graph.thread_owner(PSID) == "263902037430900"


def test_a_thread_nobody_passed_back_is_taken_back_when_the_pause_ends_and_the_user_answered(
        make_client, graph, clock):
    """A person who never marks the conversation done would leave the user on `standby` for good:
    once no person answered for HUMAN_PAUSE the bot takes the thread back and answers again."""
    client = make_client(clock, FB_PAGE_NAME="Ana's Bakery", HANDOFF_THREAD_CONTROL="on", HUMAN_PAUSE="30m")
    dispatcher = client.application.extensions["dispatcher"]
    say(client, clock, 1, "agent")
    assert graph.thread_owner(PSID) == "263902037430900"
    clock.advance(20 * 60)
    standby = json.loads(echo_body("m_inbox", "Ana here!", app_id=263902037430900, timestamp=int(clock() * 1000)))
    standby["entry"][0]["standby"] = standby["entry"][0].pop("messaging")
    assert post_signed(client, json.dumps(standby).encode()).status_code == 200
    answer_queue(client)
    clock.advance(11 * 60)  # the request's pause is over, the person's answer's is not
    assert dispatcher.take_threads_back() == 0 and graph.thread_owner(PSID) == "263902037430900"
    clock.advance(20 * 60)
    assert dispatcher.take_threads_back() == 1 and graph.thread_owner(PSID) == graph.app_id
    [call] = [c for c in graph.calls if c.path.endswith("me/take_thread_control")]
    assert call.body["recipient"] == {"id": PSID}
    assert dispatcher.take_threads_back() == 0  # once
    say(client, clock, 2, "is my order ready?")
    assert graph.sent_texts(PSID) == [HANDED_OVER, REPLY]


def test_taking_a_thread_back_is_tried_again_after_a_graph_failure_and_given_up_for_a_user_gone(
        make_client, graph, clock, caplog):
    client = make_client(clock, FB_PAGE_NAME="Ana's Bakery", HANDOFF_THREAD_CONTROL="on", HUMAN_PAUSE="30m")
    dispatcher = client.application.extensions["dispatcher"]
    say(client, clock, 1, "agent")
    post_signed(client, text_body("m_ben", "agent", psid="2000000000000002", timestamp=int(clock() * 1000)))
    answer_queue(client)
    clock.advance(31 * 60)
    graph.fail_next("handover", graph_error(2, "Service temporarily unavailable", status=500))
    graph.fail_next("handover", graph_error(551, "This person isn't available right now.", subcode=1545041))
    assert dispatcher.take_threads_back() == 0  # a 500: this turn ends, that one is tried after its claim
    assert len([c for c in graph.calls if c.path.endswith("me/take_thread_control")]) == 1
    assert dispatcher.take_threads_back() == 0  # the other user is gone: dropped, and the first one waits
    assert "not available" in caplog.text
    clock.advance(61)  # the claim on the first one ran out
    assert dispatcher.take_threads_back() == 1
    assert dispatcher.take_threads_back() == 0
    assert len([c for c in graph.calls if c.path.endswith("me/take_thread_control")]) == 3
    assert graph.thread_owner(PSID) == graph.app_id


def test_with_human_pause_off_the_inbox_keeps_the_thread_until_it_passes_it_back(make_client, graph, clock):
    client = make_client(clock, FB_PAGE_NAME="Ana's Bakery", HANDOFF_THREAD_CONTROL="on", HUMAN_PAUSE="off")
    say(client, clock, 1, "agent")
    clock.advance(24 * 3600)
    assert client.application.extensions["dispatcher"].take_threads_back() == 0
    assert graph.thread_owner(PSID) == "263902037430900"


def test_a_handoff_reply_that_cannot_go_still_hands_over_and_the_thread_is_taken_back_later(
        make_client, graph, clock):
    client = make_client(clock, FB_PAGE_NAME="Ana's Bakery", HANDOFF_THREAD_CONTROL="on", HUMAN_PAUSE="30m")
    graph.fail_next("send", graph_error(10, "(#10) This message is sent outside of allowed window.", subcode=2018278))
    say(client, clock, 1, "agent")
    assert graph.sent_texts(PSID) == [] and graph.thread_owner(PSID) == "263902037430900"
    clock.advance(31 * 60)
    assert client.application.extensions["dispatcher"].take_threads_back() == 1
    assert graph.thread_owner(PSID) == graph.app_id


def test_a_thread_passed_back_by_the_inbox_is_not_taken_again(make_client, graph, clock):
    client = make_client(clock, FB_PAGE_NAME="Ana's Bakery", HANDOFF_THREAD_CONTROL="on", HUMAN_PAUSE="30m")
    say(client, clock, 1, "agent")
    clock.advance(60)
    graph.inbox_passes_back(PSID)
    event = {"sender": {"id": PSID}, "recipient": {"id": PAGE_ID}, "timestamp": int(clock() * 1000),
             "pass_thread_control": {"previous_owner_app_id": "263902037430900", "new_owner_app_id": "1"}}
    post_signed(client, json.dumps({"object": "page", "entry": [{"id": PAGE_ID, "messaging": [event]}]}).encode())
    answer_queue(client)
    clock.advance(31 * 60)
    assert client.application.extensions["dispatcher"].take_threads_back() == 0
    assert not [c for c in graph.calls if c.path.endswith("me/take_thread_control")]


# -- what users do to messages already sent -------------------------------------------------------
def touch(client, clock, field, **body):
    event = {"sender": {"id": PSID}, "recipient": {"id": PAGE_ID}, "timestamp": int(clock() * 1000), field: body}
    assert post_signed(client, json.dumps({"object": "page", "entry": [{"id": PAGE_ID, "messaging": [event]}]})
                       .encode()).status_code == 200


def bot_mid(client):
    history = client.application.extensions["dispatcher"].store.conversations.history(PSID, PAGE_ID, 10, None)
    return next(h.mid for h in history if h.from_id == PAGE_ID)


def test_an_edit_before_the_answer_is_answered_as_edited(make_client, graph, model, clock):
    client = make_client(clock)
    post_signed(client, text_body("m_user_1", "Open tomorrow?", timestamp=int(clock() * 1000)))
    touch(client, clock, "message_edit", mid="m_user_1", text="Open on Sunday?", num_edit=1)
    answer_queue(client)
    assert model.requests[-1]["json"]["messages"][-1]["content"].endswith("Open on Sunday?")


def test_an_edit_of_a_long_message_keeps_all_of_its_words(make_client, graph, model, clock):
    """Found by a probe: the edit's text was cut at 2,000 characters, a message's own is not."""
    client = make_client(clock)
    long_text = "Here is my order: " + "two croissants, " * 300 + "and a baguette."
    post_signed(client, text_body("m_user_1", long_text, timestamp=int(clock() * 1000)))
    touch(client, clock, "message_edit", mid="m_user_1", text=long_text.replace("two", "three"), num_edit=1)
    answer_queue(client)
    assert model.requests[-1]["json"]["messages"][-1]["content"].endswith("three croissants, and a baguette.")


def test_an_edit_after_the_answer_replaces_the_text_in_the_mirror(make_client, graph, model, clock):
    client = make_client(clock)
    say(client, clock, 1, "Open tomorrow?")
    touch(client, clock, "message_edit", mid="m_user_1", text="Open on Sunday?", num_edit=1)
    clock.advance(60)
    say(client, clock, 2, "And the address?")
    prompt = [m["content"] for m in model.requests[-1]["json"]["messages"]]
    assert "Open on Sunday?" in prompt and "Open tomorrow?" not in prompt


def test_feedback_on_a_reply_is_kept_with_its_exchange_and_counted(make_client, graph, clock):
    client = make_client(clock)
    say(client, clock, 1, "Gluten-free?")
    touch(client, clock, "response_feedback", mid=bot_mid(client), feedback="Bad response")
    answer_queue(client)
    assert [r["feedback"] for r in log(client)] == ["Bad response"]
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'messenger_response_feedback_total{feedback="bad"} 1.0' in metrics


def test_reactions_are_recorded_in_the_mirror_and_taken_back(make_client, graph, clock, env):
    client = make_client(clock)
    say(client, clock, 1, "Thanks!")
    mid = bot_mid(client)
    database = sqlite3.connect(load_config(env, env_file=None).database_path)
    touch(client, clock, "reaction", mid=mid, action="react", emoji="\u2764\ufe0f", reaction="love")
    answer_queue(client)
    assert database.execute("SELECT reaction FROM mirror WHERE mid = ?", (mid,)).fetchone() == ("\u2764\ufe0f",)
    touch(client, clock, "reaction", mid=mid, action="unreact")
    answer_queue(client)
    assert database.execute("SELECT reaction FROM mirror WHERE mid = ?", (mid,)).fetchone() == (None,)
