"""The /webhook route: verification, signatures, bad bodies, replayed fixtures."""
import json
import logging

import pytest

from tests.support import APP_SECRET, PSID, VERIFY_TOKEN, answer_queue, fixture_bytes, post_signed, replay, wait_for


# -- GET: the dashboard's verification handshake ---------------------------------------------
@pytest.mark.parametrize("challenge", ["1158201444", "not-a-number_ünï"])
def test_verify_returns_challenge(client, challenge):
    response = client.get("/webhook", query_string={
        "hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": challenge})
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    assert response.get_data(as_text=True) == challenge


@pytest.mark.parametrize("query", [
    {"hub.mode": "subscribe", "hub.verify_token": "wrong", "hub.challenge": "1"},
    {"hub.mode": "unsubscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1"},
    {"hub.challenge": "1"},
    {},
], ids=["wrong-token", "wrong-mode", "no-token", "nothing"])
def test_verify_refused(client, query):
    response = client.get("/webhook", query_string=query)
    assert response.status_code == 403
    assert "1" not in response.get_data(as_text=True)


# -- POST: signatures ----------------------------------------------------------------------------
def test_missing_signature_is_403_and_nothing_happens(client, graph, model):
    response = client.post("/webhook", data=fixture_bytes("text"), content_type="application/json")
    assert response.status_code == 403
    assert answer_queue(client) == 0
    assert graph.calls == [] and model.requests == []


def test_wrong_secret_is_403(client, graph, model):
    response = post_signed(client, fixture_bytes("text"), secret="not-the-app-secret")
    assert response.status_code == 403
    assert answer_queue(client) == 0
    assert graph.calls == [] and model.requests == []


def test_signature_of_reserialised_body_is_403(client, graph):
    """A proxy that re-encodes the JSON breaks the signature, as it would at Meta."""
    body = fixture_bytes("non_ascii")
    reencoded = json.dumps(json.loads(body), ensure_ascii=False).encode()
    from messenger.signature import sign
    response = client.post("/webhook", data=reencoded, content_type="application/json",
                           headers={"X-Hub-Signature-256": sign(body, APP_SECRET)})
    assert response.status_code == 403
    assert answer_queue(client) == 0 and graph.sent_texts() == []


def test_legacy_sha1_accepted_when_sha256_absent(client, graph):
    response = post_signed(client, fixture_bytes("text"), header="X-Hub-Signature")
    assert response.status_code == 200
    answer_queue(client)
    assert graph.sent_texts(PSID) == ["Hello from the model."]


def test_refusal_logs_forwarded_client_address(client, caplog):
    """Behind a tunnel the real client is in X-Forwarded-For (ProxyFix)."""
    with caplog.at_level(logging.WARNING):
        client.post("/webhook", data=b"{}", headers={"X-Forwarded-For": "203.0.113.7"})
    assert "203.0.113.7" in caplog.text


# -- POST: bad bodies never give a 5xx -------------------------------------------------------
@pytest.mark.parametrize("body, reason", [
    (b"", "not valid JSON"),
    (b"not json at all", "not valid JSON"),
    (b"\xff\xfe\x00garbage", "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    (b'"a string"', "JSON object"),
    (b'{"object":"user","entry":{}}', "object must be 'page'"),
    (b'{"object":"page"}', "entry must be a list"),
    (b'{"object":"page","entry":[{"messaging":[{"message":{"mid":"m","text":"hi"}}]}]}', "sender.id"),
], ids=["empty", "text", "invalid-utf8", "deeply-nested", "string", "entry-not-a-list", "no-entry", "no-sender"])
def test_bad_bodies_are_400_and_app_keeps_serving(client, graph, body, reason):
    response = post_signed(client, body)
    assert response.status_code == 400
    assert reason in response.get_data(as_text=True)
    assert answer_queue(client) == 0 and graph.sent_texts() == []
    assert replay(client, "text").status_code == 200
    assert graph.sent_texts(PSID) == ["Hello from the model."]


@pytest.mark.parametrize("bad_event", [
    {"message": {"mid": "m_nobody", "text": "hi"}},
    {"sender": {"id": "2000000000000009"}, "recipient": {"id": "1"}, "message": {"text": "no mid"}},
    {"sender": {"id": "2000000000000009"}, "message": "a string"},
], ids=["no-sender", "no-mid", "message-string"])
def test_one_malformed_event_costs_only_itself_not_the_batch(client, graph, caplog, bad_event):
    """A 400 would make Meta retry the whole POST, and the good messages in it would be lost with
    the bad one: it is skipped (logged, a short reason) and the rest answered."""
    body = json.loads(fixture_bytes("batch"))
    body["entry"][0]["messaging"].insert(1, bad_event)
    with caplog.at_level(logging.WARNING):
        assert post_signed(client, json.dumps(body).encode()).status_code == 200
    assert "ignoring 1 malformed messaging event(s)" in caplog.text
    answer_queue(client)
    for psid in ("2000000000000001", "2000000000000002", "2000000000000003"):
        assert graph.sent_texts(psid) == ["Hello from the model."]


@pytest.mark.parametrize("spoil", [
    lambda body: body["entry"].append(5),
    lambda body: body["entry"].append({"id": "1000000000000001", "messaging": [1, "a"]}),
    lambda body: body["entry"].append({"id": "1000000000000001", "messaging": None}),
    lambda body: body["entry"][0]["messaging"].append(None),
    lambda body: body["entry"][0].update(standby=[1]),
    lambda body: body["entry"][0].update(standby="x"),
], ids=["entry-number", "events-not-objects", "messaging-null", "event-null", "standby-number", "standby-string"])
def test_an_entry_or_event_that_is_no_object_costs_only_itself(client, graph, spoil):
    """Found by a probe: one such item made the whole delivery a 400, and Meta's retries of it
    lost the good messages beside it."""
    body = json.loads(fixture_bytes("batch"))
    spoil(body)
    assert post_signed(client, json.dumps(body).encode()).status_code == 200
    answer_queue(client)
    for psid in ("2000000000000001", "2000000000000002", "2000000000000003"):
        assert graph.sent_texts(psid) == ["Hello from the model."]


def test_a_delivery_of_another_webhook_object_is_acknowledged_and_ignored(client, graph, caplog):
    """An app subscribed to `user` or `permissions` webhooks at this URL too: a 400 would make Meta
    retry them for hours and then disable the webhook - the Page's messages with it."""
    other = json.dumps({"object": "permissions", "entry": [{"id": "1", "time": 1, "changes": [{"field": "x"}]}]})
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            assert post_signed(client, other.encode()).status_code == 200
    assert caplog.text.count("ignoring events for object 'permissions'") == 1  # once per process
    assert answer_queue(client) == 0 and graph.sent_texts() == []
    assert replay(client, "text").status_code == 200
    assert graph.sent_texts(PSID) == ["Hello from the model."]


def test_body_over_5_mb_is_413_and_a_large_one_is_fine(client, graph):
    huge = b'{"object": "page", "entry": [], "pad": "' + b"x" * (5 * 1024 * 1024) + b'"}'
    assert post_signed(client, huge).status_code == 413
    body = fixture_bytes("text")
    large = body[:-1] + b', "pad": "' + b"x" * 400_000 + b'"}'  # Meta's bodies can exceed 300 KB
    assert post_signed(client, large).status_code == 200
    answer_queue(client)
    assert graph.sent_texts(PSID) == ["Hello from the model."]


def test_wrong_method_is_405(client):
    assert client.put("/webhook").status_code == 405


def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json()["status"] == "ok"


# -- replayed fixtures through the whole pipeline ---------------------------------------------
@pytest.mark.parametrize("name, user_text", [
    ("text", "What are your opening hours?"),
    ("quick_reply", "Opening hours"),
    ("postback", "Get Started"),
    ("non_ascii", "Bonjour à tous 👋 ça va? 1/2 你好"),
])
def test_answered_events(client, graph, model, name, user_text):
    assert replay(client, name).status_code == 200
    assert graph.sent_texts(PSID) == ["Hello from the model."]
    [request] = model.requests
    last = request["json"]["messages"][-1]
    assert last == {"role": "user", "content": "Answer polite and concisely in a single sentence : " + user_text}


def test_a_photo_with_vision_off_gets_the_unsupported_reply_without_model(make_client, graph, model):
    client = make_client(VISION="off")
    assert replay(client, "image").status_code == 200
    assert graph.sent_texts(PSID) == [
        "Sorry, I can only read text messages for now. Could you type your question?"]
    assert model.requests == []
    assert wait_for(lambda: "mark_seen" in graph.actions())  # the message is still marked seen


def test_the_like_sticker_gets_no_reply_and_no_model_call(client, graph, model):
    assert replay(client, "sticker").status_code == 200
    assert graph.sent_texts(PSID) == [] and model.requests == []
    assert wait_for(lambda: "mark_seen" in graph.actions())  # seen, not answered


@pytest.mark.parametrize("name", ["echo", "delivery", "read", "reaction", "standby"])
def test_watched_events_are_not_answered(client, graph, model, name):
    assert replay(client, name).status_code == 200
    assert model.requests == []
    assert graph.sent_texts() == [] and graph.history_calls() == []


def test_batch_answers_every_message(client, graph, model):
    assert replay(client, "batch").status_code == 200
    assert graph.sent_texts("2000000000000001") == ["Hello from the model."]
    assert graph.sent_texts("2000000000000002") == ["Hello from the model."]
    assert graph.sent_texts("2000000000000003") == ["Hello from the model."]
    assert len(model.requests) == 3
    asked = sorted(r["json"]["messages"][-1]["content"].split(" : ", 1)[1] for r in model.requests)
    assert asked == ["First question", "Second user here", "Talk to us"]
