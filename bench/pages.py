"""Many Pages at once: 10 Pages x 20 new users write at the same moment (200 messages).

    .venv/bin/python bench/pages.py [--pages 10] [--users 20] [--model-ms 1000] [--runs 3]

`gunicorn server:app` with a PAGES_FILE, against one emulator serving every Page (50 ms per
Graph call, the model answering in --model-ms). Printed, one JSON line a run and a summary:
drain_s (first POST to the last reply sent; target <= 5 s at 1 s of model), replies, and each
Page's Conversations API reads: the most in any 1-second window (Meta allows 2 a second per
Page; the bot spaces them 1.5x wider) and whether the emulator refused any for the rate.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from bench.run import APP_SECRET, Gunicorn, free_port  # noqa: E402
from devtools.emulator import GraphEmulator, ModelStandIn, webhooks  # noqa: E402
from messenger.signature import sign  # noqa: E402

GRAPH_LATENCY_S = 0.05


def page_ids(count: int) -> list[tuple[str, str]]:
    return [(f"10000000000{n:05d}", f"EAAbench-token-{n:05d}-abcdefghijklmnop") for n in range(count)]


def pages_file(pages: list[tuple[str, str]]) -> str:
    path = Path(tempfile.mkdtemp(prefix="bench-pages-")) / "pages.toml"
    path.write_text("".join(f'[[pages]]\nid = "{pid}"\naccess_token = "{token}"\nsystem_prompt = "Page {n}"\n\n'
                            for n, (pid, token) in enumerate(pages)))
    return str(path)


def most_in_a_second(times: list[float]) -> int:
    times = sorted(times)
    return max((sum(1 for t in times[i:] if t - start < 1.0) for i, start in enumerate(times)), default=0)


def one_run(pages: list[tuple[str, str]], users: int, model_ms: int, bot_env: list[str]) -> dict:
    (first, token), *others = pages
    graph = GraphEmulator(first, token, APP_SECRET, conversations_per_second=2.0).start()
    for pid, tok in others:
        graph.add_page(pid, tok)
    graph.delays["history"] = graph.delays["send"] = GRAPH_LATENCY_S
    model = ModelStandIn().start()
    model.delay = model_ms / 1000
    Gunicorn.extra_env = {"PAGES_FILE": pages_file(pages), "FB_PAGE_ID": "", "FB_PAGE_ACCESS_TOKEN": "",
                          **dict(item.split("=", 1) for item in bot_env)}
    host = Gunicorn("server:app", graph, model, free_port())
    try:
        bodies = []
        for p, (pid, _) in enumerate(pages):
            for u in range(users):
                psid = f"2{p:04d}{u:011d}"
                mid = graph.user_writes(psid, text=f"Hello page {p}", page_id=pid)
                bodies.append(webhooks.delivery_body(pid, [webhooks.user_event(pid, psid, mid, text=f"Hello page {p}")]))
        started = time.monotonic()
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(lambda b: requests.post(host.url + "/webhook", data=b, timeout=10, headers={
                "X-Hub-Signature-256": sign(b, APP_SECRET)}).raise_for_status(), bodies))
        if not graph.wait_for_deliveries(len(bodies), 60):
            log = (host.work / "gunicorn.log").read_text()[-3000:]
            print(f"only {len(graph.delivered)} of {len(bodies)} answered; the bot's log ends:\n{log}", file=sys.stderr)
        drain = time.monotonic() - started
        reads: dict[str, list[float]] = {}
        for call in graph.calls:
            if call.path.endswith("/conversations"):
                reads.setdefault(call.token_page, []).append(call.at)
        return {"bench": "many_pages", "pages": len(pages), "users_per_page": users, "model_ms": model_ms,
                "drain_s": round(drain, 2), "replies": len(graph.delivered), "target_drain_s": 5,
                "graph_reads": sum(map(len, reads.values())),
                "max_reads_in_1s_per_page": max((most_in_a_second(t) for t in reads.values()), default=0),
                "graph_rate_limited": graph.rate_limited}
    finally:
        host.stop()
        graph.stop()
        model.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=10)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--model-ms", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--bot-env", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for the bot under test, e.g. REPLY_THREADS=200")
    args = parser.parse_args()
    runs = []
    for _ in range(args.runs):
        runs.append(one_run(page_ids(args.pages), args.users, args.model_ms, args.bot_env))
        print(json.dumps(runs[-1]), flush=True)
    print(json.dumps({"bench": "many_pages_summary", "runs": len(runs),
                      "drain_s_median": statistics.median(r["drain_s"] for r in runs),
                      "replies_min": min(r["replies"] for r in runs),
                      "max_reads_in_1s_per_page": max(r["max_reads_in_1s_per_page"] for r in runs),
                      "graph_rate_limited": sum(r["graph_rate_limited"] for r in runs)}), flush=True)


if __name__ == "__main__":
    main()
