"""The emulator plays Meta's side over real HTTP: plain requests against it, nothing in-process."""
import hashlib
import hmac
import json
import threading
import time

import pytest
import requests

from devtools.emulator import GraphEmulator, ModelProxy, ModelStandIn, Timeline, WebhookSender, graph_error
from devtools.emulator import webhooks
from devtools.emulator.errors import expected_appsecret_proof
from devtools.emulator.users import PAGE_INBOX_APP_ID
from devtools.emulator.media import audio_seconds, png_bytes
from messenger.events import parse_delivery
from messenger.graph import appsecret_proof
from tests.support import APP_SECRET, PAGE_ID, PAGE_TOKEN, PSID, FakeClock, fixture_bytes, wait_for
from tests.support.messages import Receiver, shape

AUTH = {"Authorization": f"Bearer {PAGE_TOKEN}"}
# A known answer computed once outside Python, so neither the emulator nor the bot grades itself:
#   printf %s 'EAAkat-page-token-Zx9' | openssl dgst -sha256 -hmac 'kat-app-secret-42'
KAT_TOKEN, KAT_SECRET = "EAAkat-page-token-Zx9", "kat-app-secret-42"
KAT_PROOF = "4625335e892b4179cb9d2125f4002d6828afc27c1683086cea14e9d0ba1d69d8"


@pytest.fixture
def receiver():
    server = Receiver().start()
    yield server
    server.stop()


def connected(graph, receiver, **options):
    graph.webhooks = WebhookSender(receiver.url + "/webhook", APP_SECRET, graph.timeline, **options)
    return graph.webhooks


def history(graph, psid=PSID, fields="messages.limit(10){message,from,created_time}"):
    params = {"platform": "messenger", "user_id": psid, "appsecret_proof": graph.proof}
    if fields:
        params["fields"] = fields
    return requests.get(f"{graph.api_url}{PAGE_ID}/conversations", params=params, headers=AUTH, timeout=5)


def send(graph, body):
    return requests.post(f"{graph.api_url}me/messages", params={"appsecret_proof": graph.proof}, json=body,
                         headers=AUTH, timeout=5)


def text_message(text, psid=PSID, **message):
    return {"recipient": {"id": psid}, "messaging_type": "RESPONSE", "message": {"text": text, **message}}


def test_history_is_newest_first_with_details_for_the_20_newest(graph):
    assert history(graph).json() == {"data": []}
    for i in range(25):
        graph.add_message(PSID, f"message {i}", from_page=i % 2 == 1)
    data = history(graph, fields="messages.limit(25){message,from,created_time}").json()["data"]
    messages = data[0]["messages"]["data"]
    assert data[0]["id"] == f"t_{PSID}" and len(messages) == 25
    assert [m["message"] for m in messages[:3]] == ["message 24", "message 23", "message 22"]
    assert messages[1]["from"]["id"] == PAGE_ID and messages[0]["from"]["id"] == PSID
    assert all("message" in m for m in messages[:20]) and not any("message" in m for m in messages[20:])
    assert len(history(graph).json()["data"][0]["messages"]["data"]) == 10
    assert history(graph, fields=None).json() == {"data": [{"id": f"t_{PSID}"}]}  # no expansion, no messages


def test_send_api_stores_the_reply_and_enforces_meta_limits(graph):
    answer = send(graph, text_message("Hi there"))
    assert answer.status_code == 200 and answer.json()["message_id"].startswith("m_")
    assert history(graph).json()["data"][0]["messages"]["data"][0]["message"] == "Hi there"
    too_long = send(graph, text_message("x" * 2001))
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == 100
    assert "2000" in too_long.json()["error"]["message"]
    assert send(graph, text_message("\U0001F600" * 1001)).status_code == 400  # 2002 UTF-16 units
    chips = [{"content_type": "text", "title": f"t{i}", "payload": "p"} for i in range(14)]
    assert send(graph, text_message("pick", quick_replies=chips)).json()["error"]["code"] == 100
    both = {"recipient": {"id": PSID}, "sender_action": "typing_on", "message": {"text": "x"}}
    assert send(graph, both).status_code == 400
    assert send(graph, {"recipient": {"id": PSID}, "sender_action": "dance"}).status_code == 400
    assert send(graph, {"recipient": {"id": PSID}, "sender_action": "mark_seen"}).json() == {"recipient_id": PSID}
    assert graph.sent_texts() == ["Hi there"]


def test_a_body_nested_100000_deep_is_a_client_error_and_the_emulator_goes_on(graph):
    """werkzeug's get_json(silent=True) caught ValueError but not RecursionError: a 500."""
    deep = requests.post(f"{graph.api_url}me/messages", params={"appsecret_proof": graph.proof},
                         data=b"[" * 100_000 + b"]" * 100_000, timeout=5,
                         headers={**AUTH, "Content-Type": "application/json"})
    assert 400 <= deep.status_code < 500
    assert send(graph, text_message("Still here")).status_code == 200


def test_every_call_needs_the_token_and_the_proof(graph):
    no_token = requests.post(f"{graph.api_url}me/messages", params={"appsecret_proof": graph.proof},
                             json=text_message("x"), timeout=5)
    assert no_token.json()["error"]["code"] == 190
    wrong_proof = requests.post(f"{graph.api_url}me/messages", params={"appsecret_proof": "0" * 64},
                                json=text_message("x"), headers=AUTH, timeout=5)
    assert wrong_proof.json()["error"]["code"] == 100 and "appsecret_proof" in wrong_proof.json()["error"]["message"]
    assert graph.sent_texts() == []


def test_appsecret_proof_matches_a_known_answer():
    assert expected_appsecret_proof(KAT_TOKEN, KAT_SECRET) == KAT_PROOF
    assert appsecret_proof(KAT_TOKEN, KAT_SECRET) == KAT_PROOF  # the bot's own, against the same answer


def test_a_well_formed_but_wrong_proof_is_refused_with_code_100():
    graph = GraphEmulator(PAGE_ID, KAT_TOKEN, KAT_SECRET).start()
    try:
        def post(proof):
            return requests.post(f"{graph.api_url}me/messages", params={"appsecret_proof": proof},
                                 json=text_message("x"), headers={"Authorization": f"Bearer {KAT_TOKEN}"}, timeout=5)
        # Key and message swapped: the likeliest slip, and as plausible-looking as the right one.
        swapped = post(hmac.new(KAT_TOKEN.encode(), KAT_SECRET.encode(), hashlib.sha256).hexdigest())
        assert swapped.status_code == 400 and swapped.json()["error"]["code"] == 100
        assert "appsecret_proof" in swapped.json()["error"]["message"] and graph.sent_texts() == []
        assert post(KAT_PROOF).status_code == 200 and graph.sent_texts() == ["x"]
    finally:
        graph.stop()


def test_fail_call_fails_only_the_nth_call_of_its_kind(graph):
    graph.fail_call("send", 2, graph_error(1200, "second", status=500))
    graph.fail_next("send", graph_error(2, "first"))  # the next call not already scripted
    assert send(graph, {"recipient": {"id": PSID}, "sender_action": "typing_on"}).status_code == 200  # an action
    statuses = [send(graph, text_message(f"m{i}")).status_code for i in range(4)]
    assert statuses == [400, 500, 200, 200] and graph.sent_texts() == ["m2", "m3"]
    graph.fail_call("history", 3, graph_error(613, "limit"))
    assert [history(graph).status_code for _ in range(4)] == [200, 200, 400, 200]
    with pytest.raises(ValueError):
        graph.fail_call("send", 0, graph_error(2, "x"))
    graph.fail_call("send", 1, graph_error(2, "x"))
    with pytest.raises(ValueError):
        graph.fail_call("send", 1, graph_error(2, "y"))  # never silently replaces a scripted answer


def test_conversations_rate_limit_refuses_a_third_call_within_a_second():
    graph = GraphEmulator(PAGE_ID, PAGE_TOKEN, APP_SECRET, conversations_per_second=2).start()
    try:
        statuses = [history(graph).status_code for _ in range(3)]
        refused = history(graph).json()["error"]
        time.sleep(1.05)
        assert statuses == [200, 200, 400] and refused["code"] == 613
        assert history(graph).status_code == 200 and graph.rate_limited == 2
    finally:
        graph.stop()


def test_users_messages_are_delivered_signed_in_metas_bytes(graph, receiver):
    connected(graph, receiver)
    graph.add_user(PSID, "Ana")
    mid = graph.user_writes(PSID, text="caf\u00e9 / tea?")
    assert wait_for(lambda: receiver.bodies)
    body = receiver.bodies[0]
    assert b"caf\\u00e9 \\/ tea?" in body and body.isascii()  # as Meta writes it
    assert receiver.signed == [True]
    delivery = parse_delivery(json.loads(body))
    assert [(m.psid, m.mid, m.text) for m in delivery.messages] == [(PSID, mid, "caf\u00e9 / tea?")]
    assert history(graph).json()["data"][0]["messages"]["data"][0]["id"] == mid  # and it is in the history


def test_postback_quick_reply_and_image_are_shaped_as_meta_sends_them(graph, receiver):
    connected(graph, receiver)
    graph.user_writes(PSID, text="Get Started", postback="GET_STARTED")
    graph.user_writes(PSID, text="Thanks!", quick_reply="THANKS")
    graph.user_writes(PSID, image_url="http://127.0.0.1/static/sample.svg")
    assert wait_for(lambda: len(receiver.bodies) == 3)
    events = sorted((json.loads(b)["entry"][0]["messaging"][0] for b in receiver.bodies),
                    key=lambda e: int((e.get("message") or e.get("postback"))["mid"][2:]))
    assert events[0]["postback"]["payload"] == "GET_STARTED" and events[0]["postback"]["title"] == "Get Started"
    assert events[1]["message"]["quick_reply"] == {"payload": "THANKS"}
    assert events[2]["message"]["attachments"][0]["type"] == "image"
    kinds = [parse_delivery({"object": "page", "entry": [{"id": PAGE_ID, "messaging": [e]}]}).messages[0].kind
             for e in events]
    assert kinds == ["postback", "text", "attachment"]


def test_a_refused_delivery_is_retried_like_meta_until_200(graph, receiver):
    receiver.statuses = [500, 403]
    webhooks = connected(graph, receiver, retry_delays=(0, 0, 0.05, 0.05))
    graph.user_writes(PSID, text="hello")
    assert wait_for(lambda: len(graph.timeline.of_kind("webhook")) == 3)
    attempts = graph.timeline.of_kind("webhook")
    assert [(a["attempt"], a["status"]) for a in attempts] == [(1, 500), (2, 403), (3, 200)]
    assert len(set(receiver.bodies)) == 1 and len(receiver.bodies) == 3  # the same bytes each time
    webhooks.close()


def test_a_slow_answer_counts_as_a_failure_and_delivery_gives_up_after_the_last_try(graph):
    slow = Receiver(sleep=0.4).start()
    try:
        connected(graph, slow, retry_delays=(0, 0), timeout=0.2)
        graph.user_writes(PSID, text="hello")
        assert wait_for(lambda: graph.timeline.of_kind("webhook_failed"))
        assert [a["status"] for a in graph.timeline.of_kind("webhook")] == ["timeout", "timeout"]
    finally:
        slow.stop()


def test_unreachable_bot_is_recorded_not_raised(graph):
    webhooks = WebhookSender("http://127.0.0.1:9/webhook", APP_SECRET, graph.timeline, retry_delays=(0,))
    assert webhooks.deliver(PAGE_ID, [{"sender": {"id": PSID}}], PSID).result(timeout=5) is False
    assert graph.timeline.of_kind("webhook")[0]["status"] == "unreachable"


def test_webhook_times_follow_metas_clock_as_created_time_does(graph, receiver):
    """The emulator's clock is Meta's for what it delivers too: a test that moves it a day on
    sees a day pass between two messages, as the messaging window counts it."""
    graph.clock = FakeClock(1763893200.5)
    connected(graph, receiver)
    mid = graph.user_writes(PSID, text="hello")
    graph.user_edits(PSID, mid, "hello again")
    graph.inbox_reply(PSID, "A person here")
    graph.inbox_takes(PSID)
    graph.clock.advance(86400)
    graph.user_writes(PSID, text="a day later")
    assert wait_for(lambda: len(receiver.bodies) == 5)
    entries = [json.loads(body)["entry"][0] for body in receiver.bodies]
    times = sorted((entry["time"], event["timestamp"]) for entry in entries
                   for event in entry.get("messaging", entry.get("standby")))
    assert times == [(1763893200500, 1763893200500)] * 4 + [(1763979600500, 1763979600500)]
    [later] = [entry for entry in entries if entry["time"] == 1763979600500]
    assert "standby" in later  # the inbox took the thread: Meta sends its events there
    assert history(graph).json()["data"][0]["messages"]["data"][-1]["created_time"] == "2025-11-23T10:20:00+0000"


def test_echoes_carry_the_senders_app_id(receiver):
    graph = GraphEmulator(PAGE_ID, PAGE_TOKEN, APP_SECRET, app_id="4242").start()
    try:
        connected(graph, receiver)
        send(graph, text_message("from the bot"))
        graph.inbox_reply(PSID, "from a person")
        assert wait_for(lambda: len(receiver.bodies) == 2)
        echoes = {m["text"]: m for m in (json.loads(b)["entry"][0]["messaging"][0]["message"] for b in receiver.bodies)}
        assert echoes["from the bot"]["is_echo"] is True and echoes["from the bot"]["app_id"] == 4242
        assert echoes["from a person"]["app_id"] == int(PAGE_INBOX_APP_ID)
    finally:
        graph.stop()


def test_verification_handshake(graph, receiver):
    assert connected(graph, receiver).verify("right") is True
    assert graph.webhooks.verify("wrong") is False
    assert [v["ok"] for v in graph.timeline.of_kind("verify")] == [True, False]


def test_model_proxy_forwards_and_records_the_exact_messages():
    timeline = Timeline()
    upstream = ModelStandIn("real answer").start()
    proxy = ModelProxy(upstream.base_url, timeline=timeline).start()
    try:
        messages = [{"role": "user", "content": "Answer politely : hi"}]
        answer = requests.post(f"{proxy.base_url}/chat/completions", json={"model": "m", "messages": messages},
                               headers={"Authorization": f"Bearer {ModelStandIn.API_KEY}"}, timeout=5)
        assert answer.json()["choices"][0]["message"]["content"] == "real answer"
        assert upstream.requests[0]["json"]["messages"] == messages  # forwarded unchanged, key included
        event = timeline.of_kind("model")[0]
        assert (event["mode"], event["messages"], event["reply"]) == ("real", messages, "real answer")
        upstream.stop()
        down = requests.post(f"{proxy.base_url}/chat/completions", json={"messages": messages}, timeout=5)
        assert down.status_code == 502
    finally:
        proxy.stop()


def test_timeline_hands_out_only_what_is_new():
    timeline = Timeline(keep=3)
    threads = [threading.Thread(target=timeline.add, args=("x",)) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [e["seq"] for e in timeline.after(0)] == [3, 4, 5] and timeline.after(5) == []


# -- what users send besides text ------------------------------------------------------------------------

CDN = "https://scontent.xx.fbcdn.net/v/t1/x.png?oe=1"
SENT = {
    "image": ([webhooks.image_attachment(CDN)], "", None),
    "audio": ([webhooks.audio_attachment(CDN)], "", None),
    "video": ([webhooks.video_attachment(CDN)], "", None),
    "file": ([webhooks.file_attachment(CDN)], "", None),
    "sticker": (webhooks.sticker_attachments(CDN), "", None),
    "location": ([webhooks.location_attachment(48.8584, 2.2945)], "", None),
    "fallback": ([webhooks.fallback_attachment("TAHITI", CDN)], "Look: https://youtu.be/x", None),
    "story_reply": ([], "Still available?", webhooks.story_reply(CDN, "17890000000000001")),
}


@pytest.mark.parametrize("kind", list(SENT))
def test_what_users_send_is_shaped_as_metas_documented_bodies(kind):
    attachments, text, reply_to = SENT[kind]
    event = webhooks.user_event(PAGE_ID, PSID, "m_1", text=text, attachments=attachments, reply_to=reply_to)
    documented = json.loads(fixture_bytes(f"attachment_{kind}"))
    assert documented["entry"][0]["messaging"][0]["sender"]["id"] == PSID
    assert shape(event) == shape(documented["entry"][0]["messaging"][0])


def test_a_photo_a_voice_note_and_a_sticker_arrive_with_urls_that_serve_them(graph, receiver):
    connected(graph, receiver)
    graph.add_user(PSID, "Ana")
    photo = png_bytes(64, 48)
    photo_mid = graph.user_sends_photo(PSID, photo, text="Is this on the menu?")
    graph.user_sends_voice(PSID)
    graph.user_sends_sticker(PSID)
    assert wait_for(lambda: len(receiver.bodies) == 3)
    messages = sorted((json.loads(b)["entry"][0]["messaging"][0]["message"] for b in receiver.bodies),
                      key=lambda m: int(m["mid"][2:]))
    assert [[a["type"] for a in m["attachments"]] for m in messages] == [["image"], ["audio"], ["image", "sticker"]]
    assert messages[0]["text"] == "Is this on the menu?" and "text" not in messages[1]
    assert requests.get(messages[0]["attachments"][0]["payload"]["url"], timeout=5).content == photo
    voice = requests.get(messages[1]["attachments"][0]["payload"]["url"], timeout=5)
    assert voice.headers["Content-Type"] == "audio/wav" and audio_seconds(voice.content) == 2.0
    assert {a["payload"]["sticker_id"] for a in messages[2]["attachments"]} == {webhooks.LIKE_STICKER_ID}
    fields = "messages{message,from,attachments,sticker}"
    history_of = {m["id"]: m for m in history(graph, fields=fields).json()["data"][0]["messages"]["data"]}
    assert history_of[photo_mid]["message"] == "Is this on the menu?"
    assert history_of[photo_mid]["attachments"]["data"][0]["image_data"]["width"] == 64
    assert history_of[messages[1]["mid"]]["message"] == ""  # no caption: an empty message, as Meta gives it
    assert history_of[messages[2]["mid"]]["sticker"].startswith(graph.url + "/cdn/")
    shown = [(e["type"], bool(e["image_url"])) for e in graph.timeline.of_kind("message")]
    assert shown == [("image", True), ("audio", False), ("sticker", False)]


def test_a_caller_that_dies_mid_body_is_no_error_of_the_model_stand_in(model, caplog):
    # A bot killed mid-call (the tests' kill -9, a benchmark's end) leaves its body half sent.
    import socket
    with socket.create_connection(("127.0.0.1", model.port), timeout=5) as raw:
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 1000\r\n\r\n{\"model\": ")
    assert requests.post(model.base_url + "/chat/completions", json={"model": "m", "messages": [
        {"role": "user", "content": "still there?"}]}, headers={"Authorization": f"Bearer {ModelStandIn.API_KEY}"},
        timeout=5).status_code == 200
    assert wait_for(lambda: model.dropped == 1)  # its handler has met the half-sent body
    assert not [r for r in caplog.records if r.name == "werkzeug" and r.levelname == "ERROR"], caplog.text
