"""The widget in a real headless Chromium, embedded by one tag in a page another origin serves."""
from __future__ import annotations


import pytest
from playwright.sync_api import expect
from werkzeug.wrappers import Request, Response

from devtools.emulator.http import LocalServer
from tests.support.browser import chromium
from tests.support.streaming_model import StreamingModel
from tests.support.webchat import WebchatProcess

XSS = 'Here is a picture <img src=x onerror="window.__xss = 1"> of our shop'


class HostSite(LocalServer):
    """Somebody's website: one page with the widget's tag, on its own port (another origin)."""

    def __init__(self):
        super().__init__()
        self.widget = ""

    def handle(self, request: Request) -> Response:
        page = (f'<!doctype html><html><head><meta name="viewport" content="width=device-width"></head><body>'
                f'<h1>Ana\'s Bakery</h1><script src="{self.widget}/webchat.js" data-title="Ask the bakery"'
                f' data-color="#aa3300"></script></body></html>')
        return Response(page, mimetype="text/html")


@pytest.fixture
def site():
    server = HostSite().start()
    yield server
    server.stop()


@pytest.fixture
def browser():
    with chromium() as launched:
        yield launched


@pytest.fixture
def model():
    server = StreamingModel(lambda messages: XSS if "picture" in messages[-1]["content"] else "Fresh every morning.",
                            piece_delay=0.25).start()
    yield server
    server.stop()


def test_the_widget_streams_keeps_history_shows_answers_as_text_and_limits_in_words(browser, site, graph, model,
                                                                                     tmp_path):
    web = WebchatProcess(graph, model, tmp_path, WEBCHAT_ORIGINS=site.url, WEBCHAT_RATE_LIMIT="3/minute",
                         OPENAI_TIMEOUT="10")
    site.widget = web.url
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(10_000)
        page.goto(site.url + "/")
        page.get_by_role("button", name="Open the chat: Ask the bakery").click()
        box = page.get_by_label("Your message")
        expect(box).to_be_focused()
        box.fill("Do you have a picture of the shop?")
        box.press("Enter")
        answer = page.locator("[data-webchat] .msg.bot").last
        expect(answer).to_contain_text("Here is")
        assert answer.text_content() != XSS  # still arriving: it streams in
        expect(answer).to_have_text(XSS)  # the whole answer, as words
        assert page.locator("[data-webchat] img").count() == 0 and page.evaluate("window.__xss") is None

        page.reload()
        page.get_by_role("button", name="Open the chat: Ask the bakery").click()
        expect(page.locator("[data-webchat] .msg.me")).to_have_text(["Do you have a picture of the shop?"])
        expect(page.locator("[data-webchat] .msg.bot")).to_have_text([XSS])
        page.get_by_label("Your message").fill("Is the bread fresh?")
        page.get_by_label("Your message").press("Enter")
        expect(page.locator("[data-webchat] .msg.bot").last).to_have_text("Fresh every morning.")
        history = [m["content"] for m in model.requests[-1]["messages"]]
        assert any("picture of the shop" in text for text in history)  # the same conversation, after the reload

        for text in ("One more?", "And another?"):
            page.get_by_label("Your message").fill(text)
            page.get_by_label("Your message").press("Enter")
            expect(page.get_by_role("button", name="Send")).to_be_enabled()
        expect(page.locator("[data-webchat] .note").last).to_contain_text("Slow down")
        page.keyboard.press("Escape")
        expect(page.get_by_role("button", name="Open the chat: Ask the bakery")).to_be_focused()
        page.close()

        phone = browser.new_page(viewport={"width": 375, "height": 667})
        phone.goto(site.url + "/")
        phone.get_by_role("button", name="Open the chat: Ask the bakery").click()
        panel = phone.get_by_role("dialog", name="Ask the bakery").bounding_box()
        assert panel["width"] <= 375 and panel["height"] <= 667
        phone.close()
    finally:
        web.stop()


def test_send_stays_off_while_a_forgotten_conversation_is_started_again(browser, site, graph, tmp_path):
    """Found by a probe: a stored conversation the bot no longer has (RETENTION_DAYS) is answered
    404 and the widget asks again in a new one - with Send already on, so a second message began
    a second conversation while the first was being answered."""
    slow = StreamingModel("Fresh every morning.", first_token_delay=1.5).start()
    web = WebchatProcess(graph, slow, tmp_path, WEBCHAT_ORIGINS=site.url)
    site.widget = web.url
    try:
        page = browser.new_page()
        page.set_default_timeout(10_000)
        page.goto(site.url + "/")
        key = f"webchat:{web.url}"
        page.evaluate("([key, gone]) => localStorage.setItem(key, JSON.stringify({conversation: gone, messages: []}))",
                      [key, "A" * 32])
        page.reload()
        page.get_by_role("button", name="Open the chat: Ask the bakery").click()
        page.get_by_label("Your message").fill("Is the bread fresh?")
        page.get_by_label("Your message").press("Enter")
        page.wait_for_timeout(700)  # the 404 is back, the new conversation's answer is not
        assert len(slow.requests) == 1 and page.get_by_role("button", name="Send").is_disabled()
        expect(page.locator("[data-webchat] .msg.bot").last).to_have_text("Fresh every morning.")
        expect(page.get_by_role("button", name="Send")).to_be_enabled()
    finally:
        web.stop()
        slow.stop()
