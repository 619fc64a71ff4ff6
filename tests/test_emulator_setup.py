"""The emulator's setup endpoints (token debugger, permissions, subscriptions, the app node, the
Messenger Profile), its handover calls and events, and the model's GET /v1/models/{model}: plain
`requests` and the real `openai` client over real HTTP, each answer in Meta's (or OpenAI's) shape."""
import json
import time

import openai
import pytest
import requests

from devtools.emulator import GraphEmulator, ModelStandIn, webhooks
from devtools.emulator.errors import expected_appsecret_proof
from devtools.emulator.users import PAGE_INBOX_APP_ID
from tests.support import APP_SECRET, PAGE_ID, PAGE_TOKEN, PSID, wait_for
from tests.test_emulator_pages import receiver  # noqa: F401 - the fixture, with this module's graph

APP_ID = "5550000000000001"
PAGE2_ID, PAGE2_TOKEN = "1000000000000002", "EAAtest-second-page-token-9876"


@pytest.fixture
def graph():
    server = GraphEmulator(PAGE_ID, PAGE_TOKEN, APP_SECRET, app_id=APP_ID, name="Ana's Bakery").start()
    server.add_page(PAGE2_ID, PAGE2_TOKEN, name="Ben's Bikes")
    server.add_user(PSID, "Ana")
    yield server
    server.stop()


def call(graph, method, path, token=PAGE_TOKEN, **kwargs):
    proof = expected_appsecret_proof(token, APP_SECRET)
    return requests.request(method, graph.api_url + path, params={"appsecret_proof": proof, **kwargs.pop("params", {})},
                            headers={"Authorization": f"Bearer {token}"}, timeout=5, **kwargs)


def debug(graph, input_token=PAGE_TOKEN):
    return call(graph, "GET", "debug_token", graph.app_token, params={"input_token": input_token})


def test_debug_token_of_a_good_page_token(graph):
    data = debug(graph).json()["data"]
    assert data["is_valid"] is True and data["type"] == "PAGE" and data["app_id"] == APP_ID
    assert data["profile_id"] == PAGE_ID and data["expires_at"] == 0 and "pages_messaging" in data["scopes"]
    assert debug(graph, PAGE2_TOKEN).json()["data"]["profile_id"] == PAGE2_ID  # another Page's token says so


def test_debug_token_scripted_per_page(graph):
    graph.setup(PAGE_ID).scopes.remove("pages_messaging")
    graph.setup(PAGE_ID).expires_at = int(time.time()) + 3600
    data = debug(graph).json()["data"]
    assert data["is_valid"] and "pages_messaging" not in data["scopes"] and data["expires_at"] > time.time()
    assert "pages_messaging" in debug(graph, PAGE2_TOKEN).json()["data"]["scopes"]  # the other Page untouched
    graph.expire_token(PAGE_ID)
    data = debug(graph).json()["data"]
    assert data["is_valid"] is False and data["error"]["code"] == 190 and data["error"]["subcode"] == 463
    unknown = debug(graph, "EAAnot-a-token").json()["data"]
    assert unknown["is_valid"] is False and unknown["error"]["code"] == 190


def test_app_token_is_checked(graph):
    answer = call(graph, "GET", "debug_token", f"{APP_ID}|wrong-secret", params={"input_token": PAGE_TOKEN})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == 190
    wrong_proof = requests.get(graph.api_url + "debug_token", params={"input_token": PAGE_TOKEN, "appsecret_proof": "0"},
                               headers={"Authorization": f"Bearer {graph.app_token}"}, timeout=5)
    assert wrong_proof.json()["error"]["code"] == 100


def test_me_and_permissions(graph):
    assert call(graph, "GET", "me", params={"fields": "id,name"}).json() == {"id": PAGE_ID, "name": "Ana's Bakery"}
    graph.setup(PAGE_ID).scopes = ["pages_show_list"]
    assert call(graph, "GET", "me/permissions").json() == {"data": [{"permission": "pages_show_list", "status": "granted"}]}
    graph.expire_token(PAGE_ID)
    assert call(graph, "GET", "me").json()["error"]["code"] == 190


def test_subscribed_apps(graph):
    apps = call(graph, "GET", f"{PAGE_ID}/subscribed_apps").json()["data"]
    assert apps[0]["id"] == APP_ID and apps[0]["subscribed_fields"] == ["messages", "messaging_postbacks", "message_echoes"]
    graph.setup(PAGE_ID).subscribed_fields = ["messages"]
    assert call(graph, "GET", f"{PAGE_ID}/subscribed_apps").json()["data"][0]["subscribed_fields"] == ["messages"]
    graph.setup(PAGE_ID).subscribed_fields = None
    assert call(graph, "GET", f"{PAGE_ID}/subscribed_apps").json() == {"data": []}
    assert call(graph, "GET", f"{PAGE2_ID}/subscribed_apps").status_code == 403  # not this token's Page


def test_app_node_hidden_from_page_tokens_in_development_mode(graph):
    assert call(graph, "GET", APP_ID).json() == {"id": APP_ID, "name": graph.app_name}
    graph.development_mode = True
    hidden = call(graph, "GET", APP_ID).json()["error"]
    assert (hidden["code"], hidden["error_subcode"]) == (100, 33)
    assert call(graph, "GET", APP_ID, graph.app_token).json()["id"] == APP_ID  # the app always sees itself


def test_messenger_profile_round_trip_per_page(graph):
    profile = {"get_started": {"payload": "GET_STARTED"}, "greeting": [{"locale": "default", "text": "Hi!"}]}
    assert call(graph, "POST", "me/messenger_profile", json=profile).json() == {"result": "success"}
    fields = {"fields": "get_started,greeting,ice_breakers,persistent_menu"}
    assert call(graph, "GET", "me/messenger_profile", params=fields).json() == {"data": [profile]}
    assert call(graph, "GET", "me/messenger_profile", PAGE2_TOKEN, params=fields).json() == {"data": []}
    assert call(graph, "DELETE", "me/messenger_profile", json={"fields": ["greeting"]}).json() == {"result": "success"}
    assert call(graph, "GET", "me/messenger_profile", params=fields).json() == {"data": [{"get_started": profile["get_started"]}]}
    assert len(graph.profile_calls()) == 5


@pytest.mark.parametrize("body", [
    {"greeting": [{"locale": "default", "text": "x" * 161}]},
    {"ice_breakers": [{"locale": "default", "call_to_actions": [{"question": "q", "payload": "p"}] * 5}]},
    {"persistent_menu": [{"locale": "default", "call_to_actions": [{"type": "postback", "title": "t", "payload": "p"}]}]},
    {"home_url": {"url": "https://example.com"}},
])
def test_messenger_profile_refuses_what_meta_refuses(graph, body):
    answer = call(graph, "POST", "me/messenger_profile", json=body)
    assert answer.status_code == 400 and answer.json()["error"]["code"] == 100


def test_messenger_profile_needs_pages_messaging(graph):
    graph.setup(PAGE_ID).scopes = ["pages_show_list"]
    assert call(graph, "GET", "me/messenger_profile", params={"fields": "greeting"}).json()["error"]["code"] == 200


def test_pass_and_take_thread_control(graph, receiver):
    assert graph.thread_owner(PSID) == APP_ID
    body = {"recipient": {"id": PSID}, "target_app_id": int(PAGE_INBOX_APP_ID), "metadata": "asked for a person"}
    assert call(graph, "POST", "me/pass_thread_control", json=body).json() == {"success": True}
    assert graph.thread_owner(PSID) == PAGE_INBOX_APP_ID
    send = {"recipient": {"id": PSID}, "messaging_type": "RESPONSE", "message": {"text": "hi"}}
    assert call(graph, "POST", "me/messages", json=send).json()["error"]["code"] == 10  # only the owner sends
    handover = graph.handovers[-1]
    assert (handover.kind, handover.psid, handover.new_owner, handover.metadata) == (
        "pass_thread_control", PSID, PAGE_INBOX_APP_ID, "asked for a person")
    graph.inbox_passes_back(PSID, "done")
    assert graph.thread_owner(PSID) == APP_ID
    assert wait_for(lambda: len(receiver.bodies) == 1)
    event = json.loads(receiver.bodies[0])["entry"][0]["messaging"][0]
    assert event["sender"] == {"id": PSID} and event["recipient"] == {"id": PAGE_ID}
    assert event["pass_thread_control"] == {"previous_owner_app_id": PAGE_INBOX_APP_ID, "new_owner_app_id": APP_ID,
                                            "metadata": "done"}
    graph.inbox_takes(PSID)
    assert wait_for(lambda: len(receiver.bodies) == 2) and graph.thread_owner(PSID) == PAGE_INBOX_APP_ID
    taken = json.loads(receiver.bodies[1])["entry"][0]["messaging"][0]["take_thread_control"]
    assert taken == {"previous_owner_app_id": APP_ID, "new_owner_app_id": PAGE_INBOX_APP_ID}
    assert call(graph, "POST", "me/take_thread_control", json={"recipient": {"id": PSID}}).json() == {"success": True}
    assert graph.thread_owner(PSID) == APP_ID and graph.handovers[-1].kind == "take_thread_control"
    assert "message_id" in call(graph, "POST", "me/messages", json=send).json()


def test_handover_refusals(graph):
    assert call(graph, "POST", "me/pass_thread_control", json={"target_app_id": 1}).json()["error"]["code"] == 100
    no_target = call(graph, "POST", "me/pass_thread_control", json={"recipient": {"id": PSID}})
    assert no_target.json()["error"]["code"] == 100
    other_page = call(graph, "POST", "me/pass_thread_control", PAGE2_TOKEN,
                      json={"recipient": {"id": PSID}, "target_app_id": PAGE_INBOX_APP_ID})
    assert other_page.json()["error"]["error_subcode"] == 2018001 and graph.thread_owner(PSID) == APP_ID


def test_builders_in_metas_shapes():
    feedback = webhooks.response_feedback_event(PAGE_ID, PSID, "m_1", "Bad response")
    assert feedback["response_feedback"] == {"feedback": "Bad response", "mid": "m_1"}
    idle = webhooks.pass_thread_control_event(PAGE_ID, PSID, None, APP_ID)
    assert idle["pass_thread_control"] == {"previous_owner_app_id": None, "new_owner_app_id": APP_ID}
    standby = json.loads(webhooks.delivery_body(PAGE_ID, [feedback], key="standby"))
    assert standby["entry"][0]["standby"] == [feedback] and "messaging" not in standby["entry"][0]


def test_model_retrieve_with_the_openai_client():
    model = ModelStandIn().start()
    try:
        client = openai.OpenAI(api_key=ModelStandIn.API_KEY, base_url=model.base_url, max_retries=0, timeout=5)
        assert client.models.retrieve("gpt-4.1-mini").id == "gpt-4.1-mini"
        model.models = {"gpt-4.1-mini"}
        with pytest.raises(openai.NotFoundError) as unknown:
            client.models.retrieve("gpt-nope")
        assert unknown.value.code == "model_not_found"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(api_key="sk-wrong", base_url=model.base_url, max_retries=0).models.retrieve("gpt-4.1-mini")
    finally:
        model.stop()
