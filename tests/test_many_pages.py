"""Two Pages and an Instagram account in one deployment, end to end: each user is answered
with their own Page's token, prompt and history; one Page's trouble stays its own."""
import json
import logging
import subprocess
import sys

import pytest

from devtools.emulator import webhooks
from tests.support import PAGE_ID, PAGE_TOKEN, PSID, answer_queue, fixture_bytes, post_signed
from tests.support.messages import IGSID as FIXTURE_IGSID, INSTAGRAM_ID, ROOT

PAGE_B, TOKEN_B = "1000000000000002", "EAAtest-page-b-token-9876543210"
INSTAGRAM = "17841400000000002"  # Page B's Instagram account
USER_B, IGSID = "2000000000000002", "3000000000000002"
PAGES = f'''
[[pages]]
id = "{PAGE_ID}"
access_token = "{PAGE_TOKEN}"
name = "Ana's Bakery"
system_prompt = "You answer for Ana's Bakery."

[[pages]]
id = "{PAGE_B}"
access_token = "{TOKEN_B}"
name = "Bob's Bikes"
system_prompt = "You answer for Bob's Bikes."
instagram_id = "{INSTAGRAM}"
'''


@pytest.fixture
def pages_client(make_client, graph, env, tmp_path):
    """The bot with a Pages file (and no FB_PAGE_*), against one emulator serving both Pages."""
    graph.add_page(PAGE_B, TOKEN_B, name="Bob's Bikes", instagram_id=INSTAGRAM)
    (tmp_path / "pages.toml").write_text(PAGES)
    return make_client(PAGES_FILE=str(tmp_path / "pages.toml"), FB_PAGE_ID="", FB_PAGE_ACCESS_TOKEN="")


def write(client, graph, psid, text, account=PAGE_ID, answer=True, reply_to=None):
    """`psid` writes `text` to a Page or an Instagram account; Meta delivers it."""
    mid = graph.user_writes(psid, text=text, page_id=account)
    event = webhooks.user_event(account, psid, mid, text=text, reply_to=reply_to)
    kind = "instagram" if account == INSTAGRAM else "page"
    assert post_signed(client, webhooks.delivery_body(account, [event], object=kind)).status_code == 200
    if answer:
        answer_queue(client)
    return mid


def system_prompt_for(model, text):
    [request] = [r for r in model.requests if text in r["json"]["messages"][-1]["content"]]
    return request["json"]["messages"][0]["content"]


def test_each_pages_users_get_that_pages_token_prompt_and_history(pages_client, graph, model):
    graph.add_message(USER_B, "Earlier question to Bob", page_id=PAGE_B)
    write(pages_client, graph, PSID, "Croissants today?", answer=False)
    write(pages_client, graph, USER_B, "Do you fix brakes?", account=PAGE_B, answer=False)
    answer_queue(pages_client)
    assert system_prompt_for(model, "Croissants today?") == "You answer for Ana's Bakery."
    assert system_prompt_for(model, "Do you fix brakes?") == "You answer for Bob's Bikes."
    bob_prompt = [r for r in model.requests if "brakes" in r["json"]["messages"][-1]["content"]][0]["json"]["messages"]
    assert {"role": "user", "content": "Earlier question to Bob"} in bob_prompt
    assert not any("Croissants" in str(m["content"]) for m in bob_prompt)
    for call in graph.calls:  # every read and send went with the token of the Page it was for
        assert call.token_page == (PAGE_B if call.account in (PAGE_B, INSTAGRAM) else PAGE_ID), call
    assert graph.sent_texts(PSID) and graph.sent_texts(USER_B)


def test_a_page_whose_token_expired_does_not_stop_the_other(pages_client, graph, model, caplog):
    graph.expire_token(PAGE_ID)
    write(pages_client, graph, PSID, "Hello Ana", answer=False)
    write(pages_client, graph, USER_B, "Hello Bob", account=PAGE_B, answer=False)
    with caplog.at_level(logging.ERROR):
        answer_queue(pages_client)
    assert graph.sent_texts(USER_B) == ["Hello from the model."]
    assert graph.sent_texts(PSID) == []
    assert "code=190" in caplog.text  # logged once, failed for good: no retry can fix a token
    states = pages_client.application.extensions["dispatcher"].store.states()
    assert sorted(states.values()) == ["done", "failed"]


def test_an_instagram_user_is_answered_through_the_linked_page(pages_client, graph, model):
    write(pages_client, graph, IGSID, "Are you open on Sunday?", account=INSTAGRAM)
    assert graph.sent_texts(IGSID) == ["Hello from the model."]
    reads = [c for c in graph.calls if c.path.endswith("/conversations")]
    assert [(c.args.get("platform"), c.token_page) for c in reads] == [("instagram", PAGE_B)]
    [send] = [c for c in graph.calls if c.path.endswith("me/messages") and c.body.get("message")]
    assert "metadata" not in send.body["message"]  # not a field of Instagram's Send API
    assert system_prompt_for(model, "Sunday") == "You answer for Bob's Bikes."
    [record] = list(pages_client.application.extensions["dispatcher"].store.conversations.export(page=INSTAGRAM))
    assert record["psid"] == IGSID and record["page_id"] == INSTAGRAM


def test_a_long_instagram_answer_is_split_at_1000_bytes(pages_client, graph, model):
    model.reply = ("Très bien. " * 150).strip()  # 1,800 bytes of UTF-8, under 2,000 characters
    write(pages_client, graph, IGSID, "Tell me everything", account=INSTAGRAM)
    parts = graph.sent_texts(IGSID)
    assert len(parts) == 2 and all(len(p.encode()) <= 1000 for p in parts)
    assert " ".join(parts) == model.reply
    write(pages_client, graph, PSID, "And on Messenger?")
    assert graph.sent_texts(PSID) == [model.reply]  # one message there: 2,000 characters


def test_an_instagram_story_reply_is_answered_with_the_story_in_words(pages_client, graph, model):
    write(pages_client, graph, IGSID, "love this!", account=INSTAGRAM,
          reply_to=webhooks.story_reply("https://lookaside.example/story/1", "1789"))
    last = model.requests[-1]["json"]["messages"][-1]["content"]
    assert last.endswith("[The user is replying to the Page's story]\nlove this!")


def test_an_instagram_message_unsent_is_not_answered_and_leaves_later_prompts(pages_client, graph, model):
    """Instagram tells the bot when a user unsends a message (`is_deleted`): one still waiting is
    not answered, and none is in a prompt again."""
    def unsend(mid):
        graph.user_unsends(IGSID, mid)
        body = webhooks.delivery_body(INSTAGRAM, [webhooks.message_deleted_event(INSTAGRAM, IGSID, mid)],
                                      object="instagram")
        assert post_signed(pages_client, body).status_code == 200

    unsend(write(pages_client, graph, IGSID, "My phone is 555-0100", account=INSTAGRAM))
    unsend(write(pages_client, graph, IGSID, "No wait, call 555-0199", account=INSTAGRAM, answer=False))
    write(pages_client, graph, IGSID, "Are you open on Sunday?", account=INSTAGRAM)
    assert graph.sent_texts(IGSID) == ["Hello from the model."] * 2
    assert len(model.requests) == 2
    prompt = json.dumps(model.requests[-1]["json"]["messages"])
    assert "Sunday" in prompt and "555-01" not in prompt
    assert [m["content"] for m in model.requests[-1]["json"]["messages"] if m["role"] == "assistant"] == [
        "Hello from the model."]


def instagram_echo(mid, text, app_id=None):
    """Instagram's echo of a message the account sent: no metadata; an app id only when an app
    (Meta's inbox) sent it."""
    message = {"mid": mid, "text": text, "is_echo": True, **({"app_id": int(app_id)} if app_id else {})}
    event = {"sender": {"id": INSTAGRAM}, "recipient": {"id": IGSID}, "timestamp": webhooks.now_ms(), "message": message}
    return webhooks.delivery_body(INSTAGRAM, [event], object="instagram")


def test_a_person_answering_from_the_inbox_pauses_the_bot_on_instagram_too(pages_client, graph, model):
    write(pages_client, graph, IGSID, "First question", account=INSTAGRAM)
    post_signed(pages_client, instagram_echo("m_own", "Hello from the model."))  # the bot's own: no pause
    write(pages_client, graph, IGSID, "Second question", account=INSTAGRAM)
    assert graph.sent_texts(IGSID) == ["Hello from the model."] * 2
    post_signed(pages_client, instagram_echo("m_inbox", "Bob here, I'll take it from here.", app_id="263902037430900"))
    write(pages_client, graph, IGSID, "Thanks Bob", account=INSTAGRAM)
    assert graph.sent_texts(IGSID) == ["Hello from the model."] * 2  # paused: a person answers now
    records = pages_client.application.extensions["dispatcher"].store.conversations.export(page=INSTAGRAM)
    assert [r["outcome"] for r in records] == ["answered", "answered", "paused"]


@pytest.mark.parametrize("object_, account", [("page", "999"), ("instagram", "17841499999999999")])
def test_an_unknown_page_or_instagram_account_gets_200_and_nothing_else(pages_client, graph, model, object_, account):
    event = webhooks.user_event(account, "2000000000000009", "m_stranger", text="hi")
    response = post_signed(pages_client, webhooks.delivery_body(account, [event], object=object_))
    assert response.status_code == 200
    assert answer_queue(pages_client) == 0 and graph.calls == [] and model.requests == []


def test_each_account_has_its_own_graph_read_budget(pages_client):
    conversations = pages_client.application.extensions["dispatcher"].store.conversations
    assert conversations.take_graph_read(PAGE_ID, 2.0) and not conversations.take_graph_read(PAGE_ID, 2.0)
    assert conversations.take_graph_read(PAGE_B, 2.0) and conversations.take_graph_read(INSTAGRAM, 2.0)


def test_export_takes_one_page(pages_client, graph, env):
    write(pages_client, graph, PSID, "to Ana")
    write(pages_client, graph, USER_B, "to Bob", account=PAGE_B)
    result = subprocess.run([sys.executable, "-m", "bot", "export", "--data-dir", env["DATA_DIR"], "--page", PAGE_B],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["user_message"], r["page_id"]) for r in records] == [("to Bob", PAGE_B)]
    metrics = pages_client.get("/metrics").get_data(as_text=True).splitlines()
    assert any(line.startswith("messenger_exchanges_total{") and 'outcome="answered"' in line
               and f'page="{PAGE_B}"' in line for line in metrics)


ANSWERED = {"instagram_text": 1, "instagram_quick_reply": 1, "instagram_postback": 1, "instagram_story_reply": 1,
            "instagram_story_mention": 1, "instagram_image": 1}  # the photo's CDN is offline: a clear reply
WATCHED = ("instagram_echo", "instagram_reaction", "instagram_read", "instagram_message_edit")


@pytest.mark.parametrize("name", [*ANSWERED, *WATCHED])
def test_metas_instagram_bodies_are_answered_or_watched(make_client, graph, model, name):
    graph.add_page("1000000000000003", "EAAtest-page-c-token", instagram_id=INSTAGRAM_ID)
    graph.add_user(FIXTURE_IGSID, "Iris", page_id=INSTAGRAM_ID)  # Meta knows who wrote the fixture
    client = make_client(FB_PAGE_ID="1000000000000003", FB_PAGE_ACCESS_TOKEN="EAAtest-page-c-token",
                         FB_INSTAGRAM_ID=INSTAGRAM_ID, MEDIA_TIMEOUT="1s")
    assert post_signed(client, fixture_bytes(name)).status_code == 200
    answer_queue(client)
    assert len(graph.sent_texts(FIXTURE_IGSID)) == ANSWERED.get(name, 0)
    assert all(call.token_page == "1000000000000003" for call in graph.calls)
