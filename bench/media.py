"""Photos: what one costs over a text message, and how much memory a burst of big ones takes.

    .venv/bin/python bench/media.py [--runs 30] [--burst 50] [--photo-mb 8]

photo_overhead   one reply at a time through the real app (in this process) against the emulator
                 on 127.0.0.1: a text message, then the same with a 500 KB photo; median ms of
                 each, from the webhook POST to the reply sent. Target: the photo adds <= 30 ms.
burst_rss        `gunicorn server:app` as the README runs it; `--burst` messages posted at once,
                 first text only, then each with a `--photo-mb` photo (a fresh bot each time);
                 the reply process's peak RSS (VmHWM). Target: photos add <= 100 MB.
One JSON line per figure. Everything runs on 127.0.0.1; the model is the offline stand-in.
"""
from __future__ import annotations

import argparse
from collections import Counter
import json
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from bench.run import APP_SECRET, PAGE_ID, PAGE_TOKEN, Gunicorn, free_port  # noqa: E402
from devtools.emulator import GraphEmulator, ModelStandIn, webhooks  # noqa: E402
from devtools.emulator.media import png_of_size  # noqa: E402
from messenger.signature import sign  # noqa: E402


def body_for(psid: str, mid: str, text: str, photo_url: str | None) -> bytes:
    attachments = [webhooks.image_attachment(photo_url)] if photo_url else []
    return webhooks.delivery_body(PAGE_ID, [webhooks.user_event(PAGE_ID, psid, mid, text=text,
                                                                attachments=attachments)])


def photo_overhead(runs: int) -> list[dict]:
    """Median reply time in-process, text vs text + a 500 KB photo, the same app and emulator."""
    from bot.web.app import create_app
    from config import load_config

    graph, model = GraphEmulator(PAGE_ID, PAGE_TOKEN, APP_SECRET).start(), ModelStandIn().start()
    work = Path(tempfile.mkdtemp(prefix="bench-media-"))
    config = load_config({"FB_VERIFY_TOKEN": "v", "FB_APP_SECRET": APP_SECRET, "FB_PAGE_ACCESS_TOKEN": PAGE_TOKEN,
                          "FB_PAGE_ID": PAGE_ID, "FB_API_URL": graph.api_url, "OPENAI_API_KEY": ModelStandIn.API_KEY,
                          "OPENAI_BASE_URL": model.base_url, "DATA_DIR": str(work), "RATE_LIMIT": "off", "GRAPH_READS_PER_SECOND": "1000",
                          "LOG_LEVEL": "WARNING", "ERROR_LOG_FILE": str(work / "errors.log")}, env_file=None)
    app = create_app(config, replies="manual")
    client, dispatcher = app.test_client(), app.extensions["dispatcher"]
    photo = png_of_size(500 * 1024)
    times: dict[str, list[float]] = {"text": [], "photo": []}
    for n in range(runs * 2 + 2):
        kind = "photo" if n % 2 else "text"
        url = graph.add_attachment(photo, "image/png") if kind == "photo" else None
        body = body_for(f"3{n:015d}", f"m_bench_{n}", "Is this in stock?", url)
        started = time.perf_counter()
        client.post("/webhook", data=body, headers={"X-Hub-Signature-256": sign(body, APP_SECRET)},
                    content_type="application/json")
        dispatcher.run_pending()
        if n >= 2:  # the first of each kind warms the pools
            times[kind].append((time.perf_counter() - started) * 1000)
    graph.stop(), model.stop()
    text, with_photo = statistics.median(times["text"]), statistics.median(times["photo"])
    return [{"bench": "photo_overhead", "runs": runs, "photo_kb": len(photo) // 1024,
             "text_ms_median": round(text, 2), "photo_ms_median": round(with_photo, 2),
             "overhead_ms": round(with_photo - text, 2), "target_ms": 30}]


def reply_process_peak_kb(host: Gunicorn) -> int:
    from bench.recovery import reply_process
    for line in open(f"/proc/{reply_process(host)}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def burst(graph: GraphEmulator, model: ModelStandIn, count: int, photo: bytes | None) -> dict:
    host = Gunicorn("server:app", graph, model, free_port())
    try:
        before, sent_before = reply_process_peak_kb(host), len(graph.delivered)
        bodies = [body_for(f"5{i:015d}", f"m_burst_{i}_{time.time_ns()}", "What is this?" if photo is None else "",
                           graph.add_attachment(photo, "image/png") if photo else None) for i in range(count)]
        started = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda b: requests.post(host.url + "/webhook", data=b, timeout=30, headers={
                "X-Hub-Signature-256": sign(b, APP_SECRET)}).raise_for_status(), bodies))
        graph.wait_for_deliveries(sent_before + count, 120)
        seconds = time.monotonic() - started
        replies = graph.delivered[sent_before:]
        return {"peak_kb": reply_process_peak_kb(host), "start_kb": before, "replies": len(replies),
                "seconds": round(seconds, 1),
                "saw_photo": sum(1 for _, text in replies if "image" in text),
                "other_replies": dict(Counter(text[:60] for _, text in replies if "image" not in text))}
    finally:
        host.stop()


def burst_rss(count: int, photo_mb: float) -> list[dict]:
    graph, model = GraphEmulator(PAGE_ID, PAGE_TOKEN, APP_SECRET).start(), ModelStandIn().start()
    from devtools.emulator.model import offline_reply
    model.reply = offline_reply  # says "1 image (...)" when it got the photo
    try:
        text = burst(graph, model, count, None)
        photos = burst(graph, model, count, png_of_size(int(photo_mb * 1024 * 1024) - 4096))  # just under IMAGE_MAX_MB
    finally:
        graph.stop(), model.stop()
    added_mb = (photos["peak_kb"] - text["peak_kb"]) / 1024
    return [{"bench": "burst_rss", "messages": count, "photo_mb": photo_mb,
             "text_peak_mb": round(text["peak_kb"] / 1024, 1), "photo_peak_mb": round(photos["peak_kb"] / 1024, 1),
             "added_mb": round(added_mb, 1), "target_added_mb": 100, "text_replies": text["replies"],
             "photo_replies": photos["replies"], "photos_seen_by_model": photos["saw_photo"],
             "other_photo_replies": photos["other_replies"],
             "text_seconds": text["seconds"], "photo_seconds": photos["seconds"]}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--burst", type=int, default=50)
    parser.add_argument("--photo-mb", type=float, default=8.0)
    parser.add_argument("--only", choices=("photo_overhead", "burst_rss"))
    parser.add_argument("--bot-env", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for the bot under test, e.g. MEDIA_MEMORY_MB=32")
    args = parser.parse_args()
    Gunicorn.extra_env = dict(item.split("=", 1) for item in args.bot_env)
    if args.only in (None, "photo_overhead"):
        for line in photo_overhead(args.runs):
            print(json.dumps(line), flush=True)
    if args.only in (None, "burst_rss"):
        for line in burst_rss(args.burst, args.photo_mb):
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    threading.excepthook = lambda hook: None  # the emulator's threads may outlive a stopped server
    main()
