"""The sandbox page in a real headless Chromium (Debian's `chromium`), driven by Playwright."""
import re
import time

import pytest
from playwright.sync_api import expect

from devtools.emulator import json_response
from devtools.sandbox import BAKERY, BOOKSHOP, HANDOFF_BUTTON, Sandbox
from tests.support import SandboxProcess
from tests.support.browser import chromium


@pytest.fixture(scope="module")
def browser():
    with chromium() as launched:
        yield launched


@pytest.fixture
def page(browser, sandbox):
    tab = browser.new_page(viewport={"width": 1280, "height": 800})
    tab.set_default_timeout(10_000)
    tab.goto(sandbox.url + "/")
    yield tab
    tab.close()


@pytest.fixture
def fresh_page(browser, tmp_path):
    """A tab on a sandbox of this test's own: none of its users has written yet, nobody is handed over."""
    sandbox = SandboxProcess(tmp_path)
    tab = browser.new_page(viewport={"width": 1280, "height": 800})
    tab.set_default_timeout(10_000)
    try:
        tab.goto(sandbox.url + "/")
        yield tab
    finally:
        tab.close()
        sandbox.stop()


def select(page, name):
    """Click the user called `name` in the list of the account shown."""
    exactly = page.locator(".name", has_text=re.compile(f"^{re.escape(name)}$"))
    page.locator("#users .user:visible", has=exactly).click()
    expect(page.locator("#chat-title")).to_contain_text(name)


def switch_account(page, label):
    page.get_by_label("Account").select_option(label=label)
    expect(page.locator("#chat-title")).to_contain_text(label)


def write(page, text):
    page.fill("#text", text)
    page.press("#text", "Enter")


def test_chat_typing_indicator_reply_and_model_messages(page):
    expect(page.locator("#model-label")).to_contain_text("offline stand-in")
    select(page, "Ana")
    page.fill("#text", "Do you deliver on Sundays?")
    page.press("#text", "Enter")
    expect(page.locator(".bubble.user").last).to_have_text("Do you deliver on Sundays?")
    expect(page.locator("#typing")).to_be_visible()  # typing_on from the bot, before its reply
    reply = page.locator(".bubble.page").last
    expect(reply).to_contain_text("\u201cDo you deliver on Sundays?\u201d")  # "You said" or, from excerpts, "You asked"
    expect(page.locator("#typing")).to_have_count(0)  # a sent message ends the indicator
    expect(page.locator("#seen")).to_be_visible()  # mark_seen
    last_turn = page.locator("#steps .turn").last
    expect(last_turn.locator("h3")).to_contain_text("Do you deliver on Sundays?")
    expect(last_turn.locator(".step[data-kind=webhook]").first).to_contain_text("200")
    expect(last_turn.locator(".step[data-kind=graph]").first).to_contain_text("history")
    sent = last_turn.locator(".model-messages li[data-role=user]").last
    expect(sent).to_contain_text("Answer polite and concisely in a single sentence : Do you deliver on Sundays?")


def test_switching_user_shows_their_own_conversation(page):
    select(page, "Ben")
    page.fill("#text", "Hi, I am Ben")
    page.press("#text", "Enter")
    expect(page.locator(".bubble.page").last).to_contain_text("You said \u201cHi, I am Ben\u201d")
    select(page, "Chlo\u00e9")
    expect(page.locator(".bubble", has_text="Hi, I am Ben")).to_have_count(0)
    select(page, "Ben")
    expect(page.locator(".bubble.user", has_text="Hi, I am Ben")).to_have_count(1)


def test_buttons_and_a_human_reply_from_the_inbox(page):
    select(page, "Chlo\u00e9")
    expect(page.get_by_role("button", name="Thanks!")).to_be_hidden()  # a test chip under "more", not the bot's
    page.get_by_role("button", name="Get Started").click()
    expect(page.locator(".bubble.user.postback").last).to_have_text("Get Started")
    expect(page.locator(".bubble.page").last).to_contain_text("\u201cGet Started\u201d")
    expect(page.get_by_role("button", name="Get Started", exact=True)).to_be_hidden()  # only before the first message
    page.locator("#more summary").click()  # the emulator's test chips
    page.get_by_role("button", name="Thanks!").click()
    expect(page.locator(".bubble.page").last).to_contain_text("\u201cThanks!\u201d")
    page.fill("#inbox-text", "Hello, a person here.")
    page.press("#inbox-text", "Enter")
    expect(page.locator(".bubble.page.inbox").last).to_have_text("Hello, a person here.")
    expect(page.locator("#steps .turn h3").last).to_contain_text("Page inbox (a person)")


def test_a_photo_shows_in_the_chat_and_as_a_thumbnail_of_what_the_model_got(page):
    select(page, "Ana")
    page.get_by_role("button", name="Send a photo").click()
    expect(page.locator(".bubble.user img[alt='photo sent by the user']").last).to_be_visible()
    turn = page.locator("#steps .turn").last
    expect(turn.locator("h3")).to_contain_text("[photo]")
    expect(turn.locator(".step[data-kind=download]").first).to_contain_text("from Meta's CDN \u2192 200, 12 KB")
    thumbnail = turn.locator(".model-messages img.thumbnail")
    expect(thumbnail).to_have_attribute("alt", "image sent to the model: 480\u00d7360 JPEG, 12 KB")
    expect(thumbnail).to_be_visible()
    assert thumbnail.evaluate("img => img.complete && img.naturalWidth") == 480  # a real picture, decoded
    expect(page.locator(".bubble.page").last).to_contain_text("I can see 1 image (480\u00d7360 JPEG, 12 KB)")


def test_a_voice_note_plays_in_the_chat_and_its_transcript_shows_in_the_panel(page):
    select(page, "Ben")
    page.get_by_role("button", name="Send a voice note").click()
    audio = page.locator(".bubble.user audio").last
    expect(audio).to_be_visible()
    page.wait_for_function("a => a.readyState >= 1 && a.duration > 2.5", arg=audio.element_handle())  # it loads
    turn = page.locator("#steps .turn").last
    expect(turn.locator("h3")).to_contain_text("[voice note]")
    transcription = turn.locator(".step[data-kind=transcription]")
    expect(transcription).to_contain_text("(2.6 s of audio) \u2192 200")
    expect(transcription.locator(".transcript")).to_have_text(
        "\u201c[offline stand-in] a voice note of 2.6 s (audio/wav)\u201d")
    expect(page.locator(".bubble.page").last).to_contain_text("a voice note of 2.6 s")


def test_the_like_button_sends_a_thumbs_up(page):
    select(page, "Dev")
    page.get_by_role("button", name="Send a like").click()
    expect(page.get_by_role("img", name="like sticker").last).to_be_visible()
    expect(page.locator("#users .user.selected .preview")).to_have_text("[sticker]")


def send_image(page):
    """An image from the selected user, sent without touching the page: the bot answers it at once."""
    page.evaluate("psid => fetch(`/api/users/${psid}/image`, {method: 'POST', body: '{}',"
                  " headers: {'Content-Type': 'application/json'}})",
                  page.locator("#users .user.selected").get_attribute("data-psid"))


def test_polling_never_rebuilds_what_the_user_is_reading(page):
    select(page, "Ana")
    replies = page.locator(".bubble.page")
    count = replies.count()
    send_image(page)
    expect(replies).to_have_count(count + 1)
    details = page.locator("#steps .turn").last.locator(".step[data-kind=webhook] details").first.element_handle()
    details.query_selector("summary").click()
    pre = details.query_selector("pre")
    pre.evaluate("e => { e.scrollTop = 40; }")
    replies.last.evaluate("e => { const range = document.createRange(); range.selectNodeContents(e);"
                          " getSelection().removeAllRanges(); getSelection().addRange(range); }")
    selected = page.evaluate("() => getSelection().toString()")
    send_image(page)  # another turn of this user while they read: new bubbles and steps, nothing redrawn
    expect(replies).to_have_count(count + 2)
    time.sleep(1.0)  # and a few polls more
    assert details.evaluate("e => e.open") and pre.evaluate("e => e.scrollTop") == 40
    assert selected and page.evaluate("() => getSelection().toString()") == selected


def test_a_bubble_is_as_wide_as_its_text(page):
    select(page, "Ben")
    for text in ("Hi", "A longer message, to see that a bubble grows with its text up to a maximum width. " * 2):
        page.fill("#text", text)
        page.press("#text", "Enter")
    short, long = page.locator(".bubble.user").nth(-2), page.locator(".bubble.user").last
    expect(long).to_contain_text("A longer message")
    assert short.bounding_box()["width"] < long.bounding_box()["width"] / 3


@pytest.mark.parametrize("width", [600, 480])
def test_a_narrow_window_keeps_the_composer_on_screen(browser, sandbox, width):
    tab = browser.new_page(viewport={"width": width, "height": 800})
    try:
        tab.goto(sandbox.url + "/")
        expect(tab.locator("#users .user.selected")).to_have_count(1)
        for button in tab.locator("#send, #inbox button, #close-window").all():
            box = button.bounding_box()
            assert 0 <= box["x"] and box["x"] + box["width"] <= width and box["y"] + box["height"] <= 800, box
        assert tab.evaluate("() => document.documentElement.scrollWidth") <= width  # no sideways scrolling
    finally:
        tab.close()


def test_an_instagram_user_is_answered_through_the_instagram_account_with_its_pages_prompt(page):
    switch_account(page, f"{BAKERY} \u00b7 Instagram")
    expect(page.locator("#page-name")).to_contain_text("Instagram account")
    expect(page.locator("#users .user:visible .name")).to_have_text(["Eli", "Fay"])  # its own users only
    expect(page.get_by_role("button", name="Send a like")).to_be_hidden()  # no stickers on Instagram
    select(page, "Eli")
    write(page, "Do you sell sourdough?")
    reply = page.locator(".bubble.page").last
    expect(reply).to_contain_text("\u201cDo you sell sourdough?\u201d")
    expect(reply).to_contain_text("[offline stand-in] From \u201c")  # from the Page's own documents
    expect(reply).not_to_contain_text(BOOKSHOP)
    turn = page.locator("#steps .turn").last
    expect(turn.locator(".step[data-kind=webhook]").first).to_contain_text("(object instagram)")
    sends = turn.locator(".step[data-kind=graph]", has_text="(send)")
    expect(sends.first.locator(".account")).to_have_text(f"{BAKERY} \u00b7 Instagram")
    expect(turn.locator(".model-messages li[data-role=system]")).to_contain_text("You answer for Ana's Bakery")
    switch_account(page, f"{BOOKSHOP} \u00b7 Messenger")
    expect(page.locator(".bubble", has_text="Do you sell sourdough?")).to_have_count(0)  # its own conversations
    select(page, "Gus")
    write(page, "Do you have sea charts?")
    expect(page.locator(".bubble.page").last).to_contain_text("You answer for Harbour Books")
    switch_account(page, f"{BAKERY} \u00b7 Instagram")
    expect(page.locator("#chat-title")).to_contain_text("Eli")  # back where the user left it
    expect(page.locator(".bubble.user", has_text="Do you sell sourdough?")).to_have_count(1)


def test_a_reset_shows_a_note_in_the_chat(page):
    select(page, "Dev")
    page.fill("#text", "reset")
    page.press("#text", "Enter")
    expect(page.locator(".note[data-outcome=reset]")).to_contain_text("Conversation reset")
    expect(page.locator("#steps .turn").last.locator(".step[data-kind=outcome]")).to_contain_text("reset")


def test_a_model_error_shows_its_type_and_code(browser):
    sandbox = Sandbox({"OPENAI_MAX_RETRIES": "0"}, port=0, model_delay=0).start()
    try:
        error = {"message": "The server had an error", "type": "server_error", "code": "upstream_down"}
        sandbox.model.scripted.append(json_response({"error": error}, 502))
        tab = browser.new_page(viewport={"width": 1280, "height": 800})
        tab.goto(sandbox.url)
        tab.fill("#text", "Hello?")
        tab.press("#text", "Enter")
        model = tab.locator(".step[data-kind=model]").last
        expect(model).to_contain_text("502")
        expect(model.locator(".reason")).to_have_text("server_error / upstream_down: The server had an error")
        expect(tab.locator(".note[data-outcome=fallback]")).to_be_visible()
        tab.close()
    finally:
        sandbox.stop()


def first_reply(page, name):
    """`name` writes for the first time and the bot answers: the Page's bubbles."""
    select(page, name)
    write(page, "Hello!")
    replies = page.locator(".bubble.page")
    expect(replies).to_have_count(1)
    return replies


def test_the_first_reply_says_it_is_a_bot_and_a_person_answers_until_the_inbox_passes_back(fresh_page):
    page = fresh_page
    replies = first_reply(page, "Ana")
    expect(replies.first).to_contain_text("You said \u201cHello!\u201d")
    assert replies.first.inner_text().startswith(f"You are chatting with {BAKERY}'s automated assistant.\n")
    page.get_by_role("button", name=HANDOFF_BUTTON).click()  # the bot's quick reply, under its answer
    expect(page.locator(".bubble.user").last).to_have_text(HANDOFF_BUTTON)
    expect(replies.last).to_have_text(f"Thank you, a person from {BAKERY} will answer you here as soon as possible.")
    turn = page.locator("#steps .turn").last
    expect(turn.locator(".step[data-kind=graph]", has_text="pass_thread_control")).to_contain_text("\u2192 200")
    expect(turn.locator(".step[data-outcome=handoff]")).to_contain_text("handoff")
    expect(page.locator(".note[data-thread=passed]")).to_be_visible()
    expect(page.locator("#with-person")).to_be_visible()
    expect(page.get_by_role("button", name=HANDOFF_BUTTON)).to_have_count(0)  # not under the handoff reply

    write(page, "Is anyone there?")  # the thread is the inbox's: Meta sends it on standby, only watched
    standby = page.locator("#steps .step[data-kind=webhook]", has_text="standby POST /webhook (object page) \u2192 200")
    expect(standby).to_have_count(1)

    page.fill("#inbox-text", "Hi, Maria here: your cake is ready.")
    page.press("#inbox-text", "Enter")
    expect(page.locator(".bubble.page.inbox")).to_have_text("Hi, Maria here: your cake is ready.")
    page.get_by_role("button", name="Pass the thread back to the bot").click()
    expect(page.locator(".note[data-thread=back]")).to_be_visible()
    expect(page.locator("#with-person")).to_be_hidden()
    turn = page.locator("#steps .turn").last
    expect(turn.locator("h3")).to_have_text("Page inbox (a person): passed the thread back to the bot")
    webhook = turn.locator(".step[data-kind=webhook]")
    expect(webhook).to_contain_text("pass_thread_control POST /webhook (object page) \u2192 200")
    expect(webhook).to_contain_text("(attempt 1)")  # the emulator's delivery, and it alone:
    expect(webhook).not_to_contain_text("replayed")  # not shown again as a replay

    write(page, "Thanks! Can the bot help again?")
    expect(replies).to_have_count(4)  # Maria's and the bot's: nothing ever answered "Is anyone there?"
    expect(replies.last).to_contain_text("\u201cThanks! Can the bot help again?\u201d")
    expect(page.get_by_role("button", name=HANDOFF_BUTTON)).to_be_visible()  # offered again


def test_a_closed_messaging_window_gives_window_closed_and_no_reply(fresh_page):
    page = fresh_page
    replies = first_reply(page, "Ben")
    page.get_by_role("button", name="Close Meta's messaging window for this user").click()
    expect(page.locator(".note[data-thread=window]")).to_contain_text("refuses the next reply")
    write(page, "Are you still there?")
    turn = page.locator("#steps .turn").last
    expect(turn.locator(".step[data-kind=outcome]")).to_have_text(re.compile("window-closed"))
    expect(turn.locator(".step[data-kind=graph].error", has_text="(send)")).to_contain_text("\u2192 400")
    expect(page.locator(".note[data-outcome=window-closed]")).to_be_visible()
    expect(replies).to_have_count(1)  # the outcome is logged after the refused send: nothing went out


# The widget's answer bubble, watched in its Shadow DOM: every text it shows on the way to the last.
WATCH_ANSWER = """() => {
  const log = document.querySelector("[data-webchat]").shadowRoot.querySelector(".log");
  window.seenTexts = [];
  new MutationObserver(() => {
    const bot = [...log.querySelectorAll(".msg.bot")].pop();
    const last = window.seenTexts[window.seenTexts.length - 1];
    if (bot && bot.textContent !== last) window.seenTexts.push(bot.textContent);
  }).observe(log, { childList: true, subtree: true, characterData: true });
}"""


def test_the_website_visitor_chats_through_the_real_widget_and_the_answer_streams_in(page):
    select(page, "Website visitor")
    expect(page.locator("#composer")).to_be_hidden()  # not Messenger: the site's own chat
    site = page.frame_locator("#website")
    site.locator(".bubble").click()  # the widget's chat bubble, bottom right of the demo page
    frame = next(f for f in page.frames if f.url.endswith("/webchat/demo"))
    frame.evaluate(WATCH_ANSWER)
    site.locator("textarea").fill("Do you bake on Sundays?")
    site.locator("textarea").press("Enter")
    answer = site.locator(".msg.bot").last
    expect(answer).to_contain_text("\u201cDo you bake on Sundays?\u201d")
    expect(answer).to_contain_text("a real model.")  # the offline answer's last words: it came whole
    shown = frame.evaluate("() => window.seenTexts")
    growing = [text for text in shown if "[offline stand-in]" in text]
    assert len(growing) >= 4, shown  # piece by piece, not all at once
    assert all(later.startswith(earlier.rstrip()) or "automated assistant" in later
               for earlier, later in zip(growing, growing[1:-1])), shown

    turn = page.locator("#steps .turn").last
    expect(turn.locator("h3")).to_have_text("Website visitor: \u201cDo you bake on Sundays?\u201d")
    expect(turn.locator(".step[data-kind=webchat]")).to_have_count(2)  # the request, then how it was answered
    request, done = turn.locator(".step[data-kind=webchat]").all()
    expect(request).to_contain_text("POST /api/chat \u2192 200 (text/event-stream)")
    expect(done).to_have_text(re.compile(r"answered: \d+ deltas, the first after \d+ ms"))
    model = turn.locator(".step[data-kind=model]")
    expect(model).to_contain_text("(streamed)")
    expect(model.locator("li[data-role=user]").last).to_contain_text("Do you bake on Sundays?")
    expect(turn.locator(".step[data-kind=outcome]")).to_contain_text("answered (channel web")

    select(page, "Ana")  # and back to Messenger: its composer, and none of the visitor's turns
    expect(page.locator("#composer")).to_be_visible()
    expect(page.locator("#steps h3", has_text="Website visitor")).to_have_count(0)


def test_a_bakery_question_shows_the_knowledge_block_with_each_excerpts_title_source_and_score(page, sandbox):
    select(page, "Ana")
    write(page, "How much is the gluten-free buckwheat and teff loaf?")
    expect(page.locator(".bubble.page").last).to_contain_text("Buckwheat and teff loaf: \u00a36.20")
    turn = page.locator("#steps .turn").last
    block = turn.locator(".step[data-kind=model] li.knowledge")
    expect(block.locator(".role")).to_have_text("Knowledge")  # its own block, not a plain system message
    expect(turn.locator("li[data-role=system]")).to_have_count(1)
    expect(turn.locator("li[data-role=system]")).not_to_contain_text("Excerpts from")
    first = block.locator(".excerpt[data-number='1']")
    expect(first.locator(".number")).to_have_text("[1]")
    expect(first.locator(".title")).to_have_text("Gluten-free baking")
    expect(first.locator(".source")).to_have_text("gluten-free.md")
    expect(first.locator(".text")).to_contain_text("Buckwheat and teff loaf: \u00a36.20")
    # The scores come with the exchange log's record: the same chunk and score, excerpt by excerpt.
    expect(first.locator(".score")).to_have_text(re.compile(r"^score \d\.\d{3}$"))
    outcome = [e for e in sandbox.events("outcome", first_psid(page)) if e["knowledge"]][-1]
    for number, logged in enumerate(outcome["knowledge"], start=1):
        excerpt = block.locator(f".excerpt[data-number='{number}']")
        expect(excerpt.locator(".score")).to_have_text(f"score {logged['score']:.3f}")
        expect(excerpt).to_have_attribute("data-chunk", str(logged["chunk_id"]))
        expect(excerpt.locator(".title")).to_have_text(logged["title"])
    expect(turn.locator(".step[data-kind=outcome] .knowledge-note")).to_contain_text(
        f"knowledge: [1] chunk {outcome['knowledge'][0]['chunk_id']}, ")


def first_psid(page):
    return page.locator("#users .user.selected").get_attribute("data-psid")


def test_a_long_excerpt_is_folded_and_a_turn_without_excerpts_says_nothing_relevant(page):
    select(page, "Ben")
    write(page, "Do you use peanuts or peanut oil?")
    expect(page.locator(".bubble.page").last).to_contain_text("We do not use peanuts or peanut oil")
    text = page.locator("#steps .turn").last.locator("li.knowledge .excerpt[data-number='1'] details.text")
    expect(text.locator("summary")).to_contain_text("Contain nuts")
    expect(text.locator("summary")).not_to_contain_text("We do not use peanuts")  # folded: the start only
    text.locator("summary").click()
    expect(text).to_contain_text("We do not use peanuts or peanut oil in anything we bake.")
    switch_account(page, f"{BOOKSHOP} \u00b7 Messenger")  # Ana's documents are Ana's alone
    select(page, "Hugo")
    write(page, "Do you use peanuts or peanut oil?")
    expect(page.locator(".bubble.page").last).to_contain_text("You said \u201cDo you use peanuts or peanut oil?\u201d")
    turn = page.locator("#steps .turn").last
    expect(turn.locator(".step[data-kind=outcome] .knowledge-note")).to_have_text("knowledge: nothing relevant")
    expect(turn.locator("li.knowledge")).to_have_count(0)


def test_knowledge_mode_only_shows_the_unknown_outcome(browser):
    sandbox = Sandbox({"KNOWLEDGE_MODE": "only"}, port=0, model_delay=0).start()
    try:
        tab = browser.new_page(viewport={"width": 1280, "height": 800})
        tab.goto(sandbox.url)
        expect(tab.locator("#knowledge-label")).to_contain_text("knowledge base: 51 documents")
        write(tab, "Hello!")
        expect(tab.locator(".bubble.page").last).to_contain_text("I'm sorry, I don't know that.")
        expect(tab.locator(".note[data-outcome=unknown]")).to_contain_text("KNOWLEDGE_MODE=only")
        outcome = tab.locator("#steps .turn").last.locator(".step[data-outcome=unknown]")
        expect(outcome).to_contain_text("unknown")
        expect(outcome.locator(".knowledge-note")).to_have_text("knowledge: nothing relevant")
        expect(tab.locator("#steps .turn").last.locator(".step[data-kind=model]")).to_have_count(0)
        tab.close()
    finally:
        sandbox.stop()
