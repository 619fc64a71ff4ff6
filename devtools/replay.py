"""`python -m devtools.replay FILE_OR_DIR… --url URL`: post recorded webhooks to a running bot.

Each body is signed with FB_APP_SECRET exactly as Meta signs it, so a deployed
bot (behind its tunnel) can be checked end to end without Meta. `--verify`
first runs the dashboard's GET handshake with FB_VERIFY_TOKEN. With FB_PAGE_ID set,
the recorded Page id is replaced by it before signing, and with FB_INSTAGRAM_ID the recorded
Instagram account id of `"object": "instagram"` bodies: the bot ignores events for
accounts it does not serve.
"""
from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from pathlib import Path

import requests

from config import read_environment
from messenger.signature import LEGACY_SIGNATURE_HEADER, SIGNATURE_256_HEADER, sign

EXPLAIN = {
    403: "refused: the signature does not match, so FB_APP_SECRET here is not the bot's app secret",
    400: "refused as malformed: the file is not a webhook body the bot understands",
    503: "the bot could not store the event and asked for a retry (Meta would redeliver it)",
}


class ReplayError(Exception):
    """Something that stops the whole run, with the reason to print."""


def fixture_files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            files.extend(sorted(path.glob("*.json")))
        elif path.is_file():
            files.append(path)
        else:
            raise ReplayError(f"no such file or folder: {name}")
    if not files:
        raise ReplayError("no .json files to replay")
    return files


def verify(session: requests.Session, url: str, token: str, timeout: float) -> str:
    challenge = str(secrets.randbelow(10**9))
    params = {"hub.mode": "subscribe", "hub.verify_token": token, "hub.challenge": challenge}
    response = session.get(url, params=params, timeout=timeout)
    if response.status_code == 200 and response.text == challenge:
        return "verify: 200, challenge echoed"
    if response.status_code == 403:
        raise ReplayError("verify: 403, the bot refused FB_VERIFY_TOKEN: it is not the token the bot was given")
    raise ReplayError(f"verify: {response.status_code}, expected 200 and the challenge back")


def post(session: requests.Session, url: str, body: bytes, secret: str, timeout: float) -> tuple[int, float, str]:
    headers = {"Content-Type": "application/json", SIGNATURE_256_HEADER: sign(body, secret),
               LEGACY_SIGNATURE_HEADER: sign(body, secret, "sha1")}
    started = time.perf_counter()
    response = session.post(url, data=body, headers=headers, timeout=timeout)
    elapsed = (time.perf_counter() - started) * 1000
    note = "" if response.ok else EXPLAIN.get(response.status_code, response.text.strip()[:120])
    return response.status_code, elapsed, note


def run(args: argparse.Namespace, environ: dict[str, str]) -> int:
    secret = environ.get("FB_APP_SECRET", "").strip()
    if not secret:
        raise ReplayError("FB_APP_SECRET is not set (environment or .env): replay signs every body with the "
                          "app secret as Meta does, and a bot refuses unsigned bodies")
    files = fixture_files(args.paths)
    session = requests.Session()
    failures = 0
    try:
        if args.verify:
            token = environ.get("FB_VERIFY_TOKEN", "").strip()
            if not token:
                raise ReplayError("--verify needs FB_VERIFY_TOKEN (environment or .env)")
            print(verify(session, args.url, token, args.timeout))
        ids = {"page": environ.get("FB_PAGE_ID", "").strip(), "instagram": environ.get("FB_INSTAGRAM_ID", "").strip()}
        for file in files:
            body = for_account(file.read_bytes(), ids)
            status, ms, note = post(session, args.url, body, secret, args.timeout)
            failures += not 200 <= status < 300
            print(f"{file.name:<32} {status} {ms:8.1f} ms" + (f"  {note}" if note else ""), flush=True)
    except requests.ConnectionError as exc:
        raise ReplayError(f"cannot reach {args.url}: {_reason(exc)}") from None
    except requests.Timeout:
        raise ReplayError(f"{args.url} did not answer within {args.timeout} s (Meta waits 5 s)") from None
    print(f"{len(files) - failures} of {len(files)} accepted")
    return 1 if failures else 0


def for_account(body: bytes, ids: dict[str, str]) -> bytes:
    """The recording with its account id (entry id, and the account as sender or recipient)
    replaced by `ids[object]` (the Page id for "page", the Instagram account id for "instagram"),
    byte for byte otherwise; unchanged where no id is given for its object."""
    try:
        data = json.loads(body)
        target = ids.get(str(data["object"]), "")
        recorded = {str(entry["id"]) for entry in data["entry"]}
    except (ValueError, KeyError, TypeError):
        return body  # not a delivery: let the bot say so
    if not target.isdigit():
        return body
    for old in recorded:
        if old.isdigit():
            body = body.replace(f'"{old}"'.encode(), f'"{target}"'.encode())
    return body


def _reason(exc: requests.ConnectionError) -> str:
    text = str(exc)
    for known in ("Connection refused", "Name or service not known", "No route to host",
                  "Temporary failure in name resolution", "certificate verify failed"):
        if known in text:
            return known
    return type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.replay", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", metavar="FILE_OR_DIR", help="webhook bodies (.json), or folders of them")
    parser.add_argument("--url", required=True, help="the bot's webhook, e.g. https://bot.example.com/webhook")
    parser.add_argument("--verify", action="store_true", help="run the GET handshake with FB_VERIFY_TOKEN first")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each answer (default 10)")
    args = parser.parse_args(argv)
    try:
        return run(args, read_environment())
    except ReplayError as error:
        print(f"replay: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
