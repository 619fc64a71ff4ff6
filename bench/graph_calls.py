"""What one Graph call costs the reply process in CPU: messenger/graph.py's client against a local
server that answers at once, the environment read once (today) or by requests at every call
(as before 2026-12-07).

    .venv/bin/python bench/graph_calls.py [--calls 2000] [--rounds 5]

A reply makes three or four of these calls (seen, typing, the send, sometimes the history read),
so their CPU is a large share of what the reply process spends on a reply. Prints one JSON line
per round: the calling thread's mean CPU per call over the round (µs) for each way, alternating,
then a summary with the medians of the rounds and their ratio.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from messenger.graph import GraphClient  # noqa: E402

ANSWER = b'{"recipient_id": "2"}'


class Answer(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # kept alive, as Graph's connections are

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        # One write: headers and body apart would wait out the client's delayed ACK (Nagle).
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(ANSWER), ANSWER))

    def log_message(self, *args):
        pass


def cpu_per_call_us(client: GraphClient, calls: int) -> float:
    for _ in range(100):  # the connection made, the code warm
        client.send_action("2", "typing_on")
    started = time.thread_time()
    for _ in range(calls):
        client.send_action("2", "typing_on")
    return (time.thread_time() - started) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/"
    results: dict[str, list[float]] = {"read_once": [], "every_call": []}
    for round_ in range(args.rounds):
        for way in results:
            client = GraphClient(base_url=url, page_id="1", token="t", app_secret="s")
            if way == "every_call":
                client._session.trust_env = True  # requests' default: the environment at each call
            results[way].append(cpu_per_call_us(client, args.calls))
        print(json.dumps({"round": round_ + 1, **{f"{way}_cpu_us_per_call": round(values[-1], 1)
                                                  for way, values in results.items()}}), flush=True)
    medians = {way: statistics.median(values) for way, values in results.items()}
    print(json.dumps({"summary": True, "calls": args.calls, "rounds": args.rounds,
                      **{f"{way}_cpu_us_per_call_median": round(value, 1) for way, value in medians.items()},
                      "ratio": round(medians["read_once"] / medians["every_call"], 2)}), flush=True)
    server.shutdown()


if __name__ == "__main__":
    main()
