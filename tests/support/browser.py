"""Debian's Chromium, headless, for the browser test and docs/screenshot.py."""
import shutil

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As root in a container, with no network: no sandbox, no background connections.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
