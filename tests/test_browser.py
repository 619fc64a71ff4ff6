"""The sandbox page in a real headless Chromium (Debian's `chromium`), driven by Playwright."""
import shutil

import pytest
from playwright.sync_api import expect, sync_playwright

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As root in a container, with no network: no sandbox, no background connections.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if not shutil.which(CHROMIUM):
        pytest.fail("the browser test needs Debian's chromium: apt-get install chromium (.ci/run does it)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, sandbox):
    tab = browser.new_page(viewport={"width": 1280, "height": 800})
    tab.set_default_timeout(10_000)
    tab.goto(sandbox.url + "/")
    yield tab
    tab.close()


def select(page, name):
    page.locator(".user", has_text=name).click()
    expect(page.locator("#chat-title")).to_contain_text(name)


def test_chat_typing_indicator_reply_and_model_messages(page):
    expect(page.locator("#model-label")).to_contain_text("offline stand-in")
    select(page, "Ana")
    page.fill("#text", "Do you deliver on Sundays?")
    page.press("#text", "Enter")
    expect(page.locator(".bubble.user").last).to_have_text("Do you deliver on Sundays?")
    expect(page.locator("#typing")).to_be_visible()  # typing_on from the bot, before its reply
    reply = page.locator(".bubble.page").last
    expect(reply).to_contain_text("You said \u201cDo you deliver on Sundays?\u201d")
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


def test_buttons_image_and_a_human_reply_from_the_inbox(page):
    select(page, "Chlo\u00e9")
    page.get_by_role("button", name="Get Started").click()
    expect(page.locator(".bubble.user.postback").last).to_have_text("Get Started")
    expect(page.locator(".bubble.page").last).to_contain_text("You said \u201cGet Started\u201d")
    page.get_by_role("button", name="Thanks!").click()
    expect(page.locator(".bubble.page").last).to_contain_text("You said \u201cThanks!\u201d")
    page.get_by_role("button", name="Send an image").click()
    expect(page.locator(".bubble.user img").last).to_be_visible()
    expect(page.locator(".bubble.page").last).to_contain_text("I can only read text messages")
    page.fill("#inbox-text", "Hello, a person here.")
    page.press("#inbox-text", "Enter")
    expect(page.locator(".bubble.page.inbox").last).to_have_text("Hello, a person here.")
    expect(page.locator("#steps .turn h3").last).to_contain_text("Page inbox (a person)")
