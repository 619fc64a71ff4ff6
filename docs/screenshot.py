"""Takes docs/sandbox.png from the real sandbox page: `.venv/bin/python docs/screenshot.py`."""
import sys
from pathlib import Path

from playwright.sync_api import expect

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import SandboxProcess  # noqa: E402
from tests.support.browser import chromium  # noqa: E402


def main() -> None:
    sandbox = SandboxProcess(ROOT)
    try:
        with chromium() as browser:
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            page.goto(sandbox.url + "/")
            page.fill("#text", "Hi! Are you open on Sunday?")
            page.press("#text", "Enter")
            expect(page.locator(".bubble.page")).to_have_count(1, timeout=10_000)
            page.fill("#text", "How much is the gluten-free buckwheat and teff loaf?")  # answered from a document
            page.press("#text", "Enter")
            expect(page.locator(".bubble.page")).to_have_count(2, timeout=10_000)
            knowledge = page.locator("#steps .turn").last.locator(".model-messages li.knowledge")
            expect(knowledge.locator(".score").first).not_to_be_empty(timeout=10_000)  # the exchange log's scores
            knowledge.evaluate("block => block.scrollIntoView({block: 'center'})")
            page.screenshot(path=str(ROOT / "docs" / "sandbox.png"))
    finally:
        sandbox.stop()


if __name__ == "__main__":
    main()
