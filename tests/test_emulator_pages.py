"""One emulator, several Pages and an Instagram account: routed by token, refused as Meta refuses,
Instagram's shapes and limits. Plain `requests` against the emulator over real HTTP."""
import json

import pytest
import requests

from devtools.emulator import GraphEmulator, WebhookSender, webhooks
from devtools.emulator.users import PAGE_INBOX_APP_ID
from tests.support import APP_SECRET, PAGE_ID, PAGE_TOKEN, PSID, fixture_bytes, wait_for
from tests.support.messages import IGSID, INSTAGRAM_ID, Receiver, shape

PAGE2_ID, PAGE2_TOKEN, PSID2 = "1000000000000002", "EAAtest-second-page-token-9876", "2000000000000002"


@pytest.fixture
def graph():
    """Ana's Bakery (PAGE_ID) with its Instagram account, and a second Page; one user on each account."""
    server = GraphEmulator(PAGE_ID, PAGE_TOKEN, APP_SECRET, name="Ana's Bakery", instagram_id=INSTAGRAM_ID).start()
    server.add_page(PAGE2_ID, PAGE2_TOKEN, name="Ben's Bikes")
    server.add_user(PSID, "Ana")
    server.add_user(IGSID, "Chlo\u00e9 D", page_id=INSTAGRAM_ID)
    server.add_user(PSID2, "Ben", page_id=PAGE2_ID)
    yield server
    server.stop()


@pytest.fixture
def receiver(graph):
    server = Receiver().start()
    graph.webhooks = WebhookSender(server.url + "/webhook", APP_SECRET, graph.timeline)
    yield server
    server.stop()


def call(graph, method, path, token, **kwargs):
    proof = graph.accounts.pages[PAGE2_ID if token == PAGE2_TOKEN else PAGE_ID].proof
    return requests.request(method, graph.api_url + path, params={"appsecret_proof": proof, **kwargs.pop("params", {})},
                            headers={"Authorization": f"Bearer {token}"}, timeout=5, **kwargs)


def send(graph, user, text, token=PAGE_TOKEN, **message):
    body = {"recipient": {"id": user}, "messaging_type": "RESPONSE", "message": {"text": text, **message}}
    return call(graph, "POST", "me/messages", token, json=body)


def history(graph, user, platform="messenger", token=PAGE_TOKEN, page=PAGE_ID):
    params = {"platform": platform, "user_id": user, "fields": "messages.limit(10){message,from,created_time}"}
    return call(graph, "GET", f"{page}/conversations", token, params=params)


def second_pages_history(graph, user):
    return history(graph, user, token=PAGE2_TOKEN, page=PAGE2_ID)


def action(graph, user, sender_action, token=PAGE_TOKEN):
    return call(graph, "POST", "me/messages", token, json={"recipient": {"id": user}, "sender_action": sender_action})


def bodies(receiver, count):
    assert wait_for(lambda: len(receiver.bodies) >= count)
    return sorted((json.loads(b) for b in receiver.bodies), key=_order)


def _order(body):
    """Deliveries go out concurrently: put them back in the order of their mids (m_1, m_2, ...)."""
    event = body["entry"][0]["messaging"][0]
    return int(next(event[k]["mid"] for k in ("message", "postback", "message_edit") if k in event)[2:])


def test_each_call_is_routed_by_its_token_to_its_own_page(graph):
    assert send(graph, PSID, "from the bakery").status_code == 200
    assert send(graph, PSID2, "from the bike shop", token=PAGE2_TOKEN).status_code == 200
    assert [(c.token_page, c.account) for c in graph.calls] == [(PAGE_ID, PAGE_ID), (PAGE2_ID, PAGE2_ID)]
    assert graph.delivered == [(PSID, "from the bakery"), (PSID2, "from the bike shop")]
    assert graph.delivered_by == [PAGE_ID, PAGE2_ID]
    assert graph.sent_texts(PSID2) == ["from the bike shop"]
    assert graph.sent_texts(account=PAGE_ID) == ["from the bakery"]
    page2 = second_pages_history(graph, PSID2).json()["data"][0]["messages"]["data"]
    assert [(m["message"], m["from"]) for m in page2] == [("from the bike shop",
                                                           {"id": PAGE2_ID, "name": "Ben's Bikes"})]


def test_a_proof_made_with_another_pages_token_is_refused(graph):
    wrong = requests.post(graph.api_url + "me/messages", params={"appsecret_proof": graph.proof}, timeout=5,
                          json={"recipient": {"id": PSID2}, "message": {"text": "x"}, "messaging_type": "RESPONSE"},
                          headers={"Authorization": f"Bearer {PAGE2_TOKEN}"})
    assert wrong.json()["error"]["code"] == 100 and "appsecret_proof" in wrong.json()["error"]["message"]


def test_an_unknown_token_and_an_expired_one_answer_190_and_only_for_that_page(graph):
    unknown = send(graph, PSID, "x", token="EAAnot-a-page-token")
    assert unknown.status_code == 400 and unknown.json()["error"]["code"] == 190
    assert "error_subcode" not in unknown.json()["error"] and graph.calls[-1].token_page is None
    graph.expire_token(PAGE2_ID)
    for expired in (send(graph, PSID2, "x", token=PAGE2_TOKEN), second_pages_history(graph, PSID2)):
        error = expired.json()["error"]
        assert (error["code"], error["error_subcode"], error["type"]) == (190, 463, "OAuthException")
        assert error["message"].startswith("Error validating access token: Session has expired")
    assert send(graph, PSID, "still fine").status_code == 200 and graph.sent_texts() == ["still fine"]


def test_a_send_with_another_pages_token_finds_no_matching_user(graph):
    for user, token in ((PSID, PAGE2_TOKEN), (IGSID, PAGE2_TOKEN), (PSID2, PAGE_TOKEN)):
        refused = send(graph, user, "wrong Page", token=token)
        assert refused.status_code == 400, user
        assert (refused.json()["error"]["code"], refused.json()["error"]["error_subcode"]) == (100, 2018001)
        assert refused.json()["error"]["message"] == "(#100) No matching user found"
    typing = action(graph, PSID, "typing_on", PAGE2_TOKEN)
    assert typing.json()["error"]["error_subcode"] == 2018001  # sender actions too
    assert graph.delivered == [] and graph.timeline.of_kind("message") == []
    assert [c.account for c in graph.calls[:3]] == [PAGE2_ID, PAGE2_ID, PAGE_ID]  # the Page that tried


def test_another_pages_conversations_are_not_this_tokens_to_read(graph):
    graph.add_message(PSID, "hello bakery")
    refused = history(graph, PSID, token=PAGE2_TOKEN, page=PAGE_ID)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == 200
    assert second_pages_history(graph, PSID).json() == {"data": []}  # not its user either
    assert history(graph, PSID).json()["data"][0]["messages"]["data"][0]["message"] == "hello bakery"


def test_the_instagram_conversation_is_read_through_the_linked_page(graph):
    graph.add_message(IGSID, "Gluten-free?")
    assert send(graph, IGSID, "Yes, on Fridays.").status_code == 200
    data = history(graph, IGSID, "instagram").json()["data"]
    messages = [(m["message"], m["from"]) for m in data[0]["messages"]["data"]]
    assert messages == [("Yes, on Fridays.", {"id": INSTAGRAM_ID, "username": "ana_s_bakery"}),
                        ("Gluten-free?", {"id": IGSID, "username": "chlo\u00e9_d"})]
    assert graph.history_calls()[-1].account == INSTAGRAM_ID and graph.delivered_by == [INSTAGRAM_ID]
    assert history(graph, IGSID, "messenger").json() == {"data": []}  # the same user is not on Messenger
    graph.add_message(PSID, "on Messenger")
    assert history(graph, PSID, "instagram").json() == {"data": []}
    no_instagram = history(graph, PSID2, "instagram", token=PAGE2_TOKEN, page=PAGE2_ID)
    assert no_instagram.status_code == 400 and no_instagram.json()["error"]["code"] == 100


def test_instagram_texts_are_limited_to_1000_utf8_bytes(graph):
    assert send(graph, IGSID, "\u00e9" * 500).status_code == 200  # 1,000 bytes
    too_long = send(graph, IGSID, "\u00e9" * 501)
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == 100
    assert too_long.json()["error"]["message"] == \
        "(#100) Length of param message[text] must be less than or equal to 1000"
    assert send(graph, IGSID, "x" * 1001).status_code == 400
    assert send(graph, PSID, "\u00e9" * 1500).status_code == 200  # Messenger counts 2,000 characters
    no_type = call(graph, "POST", "me/messages", PAGE_TOKEN,
                   json={"recipient": {"id": IGSID}, "message": {"text": "hi"}})
    assert no_type.status_code == 200  # Instagram's Send API examples have no messaging_type
    assert graph.sent_texts(IGSID) == ["\u00e9" * 500, "hi"]


def test_instagram_users_deliveries_have_metas_documented_shapes(graph, receiver):
    graph.user_writes(IGSID, text="Do you have gluten-free bread?")
    graph.user_writes(IGSID, text="Opening hours", quick_reply="HOURS")
    graph.user_writes(IGSID, text="What do you bake today?", postback="ICEBREAKER_TODAY")
    story = "https://lookaside.fbsbx.com/ig_messaging_cdn/?asset_id=1"
    graph.user_sends(IGSID, [], "Is this cake still available?", reply_to=webhooks.story_reply(story, "1789"))
    graph.user_sends(IGSID, [webhooks.story_mention(story)])
    graph.user_sends_photo(IGSID)
    sent = bodies(receiver, 6)
    assert {(b["object"], b["entry"][0]["id"]) for b in sent} == {("instagram", INSTAGRAM_ID)}
    names = ["text", "quick_reply", "postback", "story_reply", "story_mention", "image"]
    for body, name in zip(sent, names):
        assert shape(body) == shape(json.loads(fixture_bytes(f"instagram_{name}"))), name
    assert [e["account"] for e in graph.timeline.of_kind("message")] == [INSTAGRAM_ID] * 6


@pytest.mark.parametrize("name, event", [
    ("reaction", webhooks.reaction_event(INSTAGRAM_ID, IGSID, "m_1")),
    ("read", webhooks.read_event(INSTAGRAM_ID, IGSID, mid="m_1")),
    ("message_edit", webhooks.message_edit_event(INSTAGRAM_ID, IGSID, "m_1", "new text")),
])
def test_instagram_event_builders_match_the_documented_fixtures(name, event):
    built = json.loads(webhooks.delivery_body(INSTAGRAM_ID, [event], object="instagram"))
    assert shape(built) == shape(json.loads(fixture_bytes(f"instagram_{name}")))


def test_an_edit_changes_the_history_and_is_delivered(graph, receiver):
    mid = graph.user_writes(IGSID, text="Bread?")
    graph.user_edits(IGSID, mid, "Gluten-free bread?")
    events = [body["entry"][0]["messaging"][0] for body in bodies(receiver, 2)]  # concurrent: any order
    edit = next(event["message_edit"] for event in events if "message_edit" in event)
    assert edit == {"mid": mid, "text": "Gluten-free bread?", "num_edit": 1}
    newest = history(graph, IGSID, "instagram").json()["data"][0]["messages"]["data"][0]
    assert newest["message"] == "Gluten-free bread?"


def test_an_unsent_message_leaves_the_history_and_only_instagram_tells_the_bot(graph, receiver):
    kept, unsent = graph.user_writes(IGSID, text="Bread?"), graph.user_writes(IGSID, text="my address")
    graph.user_unsends(IGSID, unsent)
    events = [body["entry"][0]["messaging"][0] for body in bodies(receiver, 3)]
    assert {"mid": unsent, "is_deleted": True} in [event["message"] for event in events]
    assert [m["id"] for m in history(graph, IGSID, "instagram").json()["data"][0]["messages"]["data"]] == [kept]
    messenger = graph.user_writes(PSID, text="hello")
    graph.user_unsends(PSID, messenger)  # Messenger sends no webhook for an unsend
    assert bodies(receiver, 4) and not wait_for(lambda: len(receiver.bodies) > 4, 0.5)
    assert messenger not in history(graph, PSID).text


def test_echoes_of_instagram_sends_carry_no_app_id_and_the_inbox_carries_its_own(graph, receiver):
    assert send(graph, IGSID, "from the bot", metadata="messenger-gpt-bot").status_code == 200  # metadata dropped
    graph.inbox_reply(IGSID, "from a person", page_id=INSTAGRAM_ID)
    assert send(graph, PSID2, "from the bike shop's bot", token=PAGE2_TOKEN, metadata="messenger-gpt-bot").ok
    by_text = {b["entry"][0]["messaging"][0]["message"]["text"]: b for b in bodies(receiver, 3)}
    bot = by_text["from the bot"]
    assert (bot["object"], bot["entry"][0]["id"]) == ("instagram", INSTAGRAM_ID)
    event = bot["entry"][0]["messaging"][0]
    assert (event["sender"], event["recipient"]) == ({"id": INSTAGRAM_ID}, {"id": IGSID})
    assert event["message"]["is_echo"] is True and not {"app_id", "metadata"} & set(event["message"])
    assert shape(bot) == shape(json.loads(fixture_bytes("instagram_echo")))
    person = by_text["from a person"]["entry"][0]["messaging"][0]["message"]
    assert person["app_id"] == int(PAGE_INBOX_APP_ID)
    messenger = by_text["from the bike shop's bot"]
    assert (messenger["object"], messenger["entry"][0]["id"]) == ("page", PAGE2_ID)
    assert messenger["entry"][0]["messaging"][0]["message"]["metadata"] == "messenger-gpt-bot"


def test_sender_actions_work_on_instagram(graph):
    for name in ("mark_seen", "typing_on", "typing_off"):
        assert action(graph, IGSID, name).json() == {"recipient_id": IGSID}
    assert [(e["action"], e["account"]) for e in graph.timeline.of_kind("action")] == \
        [(a, INSTAGRAM_ID) for a in ("mark_seen", "typing_on", "typing_off")]


def test_a_user_belongs_to_one_account_and_unknown_ids_are_refused(graph):
    with pytest.raises(ValueError):
        graph.user_writes(IGSID, text="hi", page_id=PAGE2_ID)
    with pytest.raises(ValueError):
        graph.add_user("2000000000000009", "Nobody", page_id="999")
    with pytest.raises(ValueError):
        graph.add_page(PAGE2_ID, "EAAanother-token")


def test_the_conversations_rate_limit_counts_per_page():
    graph = GraphEmulator(PAGE_ID, PAGE_TOKEN, APP_SECRET, conversations_per_second=1).start()
    try:
        graph.add_page(PAGE2_ID, PAGE2_TOKEN)
        statuses = [history(graph, PSID).status_code, second_pages_history(graph, PSID2).status_code,
                    history(graph, PSID).status_code]
        assert statuses == [200, 200, 400] and graph.rate_limited == 1
    finally:
        graph.stop()
