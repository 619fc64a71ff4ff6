"""One contract, both backends: every test here runs against SQLite and PostgreSQL, through
the same Queue and Conversations, so the two cannot drift. Time is a FakeClock."""
import json
import threading
from contextlib import contextmanager
from dataclasses import replace

import pytest

from bot.replies.answer import Outcome
from bot.storage import exchanges, mirror
from bot.storage.exchanges import Exchange
from bot.storage.inbox import RESUME, ClassifiedEcho
from bot.storage.queue import MAX_BATCH, LostLease, PausedByPerson, PostgresQueue, SQLiteQueue
from bot.webchat import store as webchat_store
from messenger.attachments import AUDIO, Attachment
from messenger.events import ATTACHMENT, POSTBACK, TEXT, Echo, IncomingMessage
from tests.support import FakeClock, incompressible_title, wait_until


@pytest.fixture
def clock():
    return FakeClock(1_800_000_000.0)


@pytest.fixture
def open_store(backend, tmp_path, clock):
    """Opens a queue on this test's database, as many times as a test wants (several processes or hosts)."""
    name, settings = backend
    opened = []

    def open_one(**kwargs):
        kwargs.setdefault("clock", clock)
        queue = (PostgresQueue(settings["DATABASE_URL"], **kwargs) if name == "postgres"
                 else SQLiteQueue(str(tmp_path / "bot.sqlite3"), **kwargs))
        opened.append(queue)
        return queue
    yield open_one
    for queue in opened:
        queue.close()


@pytest.fixture
def store(open_store):
    return open_store(max_attempts=3)


def message(mid, psid="u1", at=1000, text="hi"):
    return IncomingMessage(psid=psid, page_id="1", mid=mid, kind=TEXT, text=text, timestamp_ms=at)


def exchange(batch, outcome=Outcome.ANSWERED, reply="ok", tokens=10, sent=("r",)):
    return Exchange(psid=batch.psid, messages=batch.messages, outcome=outcome, bot_message=reply,
                    sent_parts=[(f"{p}_{batch.batch_id}", reply) for p in sent], bot_timestamp_ms=5_000,
                    model="m", usage=(1, tokens - 1, tokens), latency_ms=7)


def test_a_message_is_stored_once_by_its_mid(store):
    assert store.add([message("m1"), message("m2")]) == [True, True]
    assert store.add([message("m1")]) == [False]
    assert store.states() == {"m1": "pending", "m2": "pending"}


def test_a_postback_without_a_mid_and_with_a_title_of_thousands_is_stored_once(store):
    """Its key once held the whole title: past PostgreSQL's unique-index limit (2,704 bytes) the
    delivery was refused at every retry. Meta caps a button's title, the webhook takes what comes."""
    title = incompressible_title(7)
    tapped = IncomingMessage(psid="u1", page_id="1", mid=None, kind=POSTBACK, text=title, timestamp_ms=1000)
    assert store.add([tapped]) == [True]
    assert store.add([tapped]) == [False]  # Meta's redelivery
    assert store.add([replace(tapped, text=title[:-1] + "!")]) == [True]  # another title at that moment
    assert store.add([replace(tapped, text="Get Started")]) == [True]
    assert "postback:u1:1000:Get Started" in store.states()  # a short title's key is as it was
    assert store.claim("a", 30).messages[0].text == title


def test_a_users_waiting_messages_are_one_batch_in_timestamp_order(store):
    store.add([message("late", at=3000), message("early", at=1000), message("other", psid="u2", at=2000)])
    batch = store.claim("a", 30)
    assert batch.psid == "u1" and [m.mid for m in batch.messages] == ["early", "late"] and batch.attempts == 1
    assert store.claim("b", 30).psid == "u2"
    assert store.claim("c", 30) is None


def test_a_batch_holds_at_most_max_batch_messages_the_oldest_first_and_a_retry_keeps_its_members(store, clock):
    """One reply answers at most MAX_BATCH of a user's messages: the oldest, the rest next time.
    A batch given back for a retry comes back whole, without what arrived since."""
    store.add([message(f"m{n:02d}", at=1000 + n) for n in reversed(range(MAX_BATCH + 5))])
    first = store.claim("a", 30)
    assert [m.mid for m in first.messages] == [f"m{n:02d}" for n in range(MAX_BATCH)]
    store.retry(first, 5, "model timed out")
    store.add([message("m_new", at=9000)])
    clock.advance(6)
    again = store.claim("b", 30)
    assert again.batch_id == first.batch_id and again.ids == first.ids
    store.complete(again, exchange(again))
    rest = [f"m{n:02d}" for n in range(MAX_BATCH, MAX_BATCH + 5)]
    assert [m.mid for m in store.claim("c", 30).messages] == rest + ["m_new"]


def test_a_user_in_work_is_not_claimed_again_until_done(store):
    store.add([message("m1")])
    batch = store.claim("a", 30)
    store.add([message("m2", at=2000)])
    assert store.claim("b", 30) is None  # m1's reply is in flight: m2 waits for it
    store.complete(batch, exchange(batch))
    assert [m.mid for m in store.claim("b", 30).messages] == ["m2"]


def test_an_expired_lease_comes_back_and_is_bounded(store, clock):
    store.add([message("m1")])
    assert store.claim("dead", 30).attempts == 1
    clock.advance(29)
    assert store.claim("b", 30) is None
    clock.advance(2)
    batch = store.claim("b", 30)
    assert batch.attempts == 2
    store.renew("b", 30, [batch.batch_id])
    clock.advance(20)
    assert store.claim("c", 30) is None  # renewed
    clock.advance(11)
    assert store.claim("c", 30).attempts == 3
    clock.advance(31)
    assert store.claim("d", 30) is None and store.states() == {"m1": "failed"}


class _FailsAsInt(int):
    """A batch id the look for expired leases takes (as the database sees it, an integer) and the
    claim after it cannot: int() of it fails."""

    def __int__(self):
        raise ValueError("not a batch id")


def test_a_look_for_expired_leases_undone_with_its_claim_is_made_again_at_the_next_claim(store, clock):
    """Leases are looked for at most every EXPIRY_EVERY_S per claimant; a look whose claim failed
    afterwards was rolled back with it, so it does not count."""
    store.add([message("m1")])
    assert store.claim("dead", 30).attempts == 1
    clock.advance(31)  # its lease is over
    with pytest.raises(ValueError):  # the claim fails after its look, in the same transaction
        store.claim("b", 30, answering=[_FailsAsInt(7)])
    batch = store.claim("b", 30)  # at the same instant
    assert batch is not None and batch.attempts == 2


def test_a_batch_its_own_process_gave_up_on_is_taken_back_by_that_process(store, clock):
    """A reply thread could not put its batch back (the write failed): the lease renewal passes
    it by, and the process's next claim takes it back - on one host nobody else would, and the
    user's later messages would wait behind it. A batch a thread is answering is kept."""
    store.add([message("m_abandoned"), message("m_answering", psid="u2")])
    abandoned, answering = store.claim("a", 30), store.claim("a", 30)
    clock.advance(20)
    store.renew("a", 30, [answering.batch_id])
    clock.advance(20)  # past the first lease, within the renewed one
    again = store.claim("a", 30, answering=[answering.batch_id])
    assert again.ids == abandoned.ids and again.deaths == 1
    clock.advance(31)  # past every lease: still kept while its thread answers it
    assert store.claim("a", 30, answering=[again.batch_id, answering.batch_id]) is None
    # ...but not from another process:
    assert {store.claim("b", 30).ids, store.claim("b", 30).ids} == {again.ids, answering.ids}


def test_a_process_never_claims_again_a_batch_its_own_thread_answers_once_another_host_expired_it(open_store, clock):
    """PostgreSQL restarted while a reply thread of host A waited for it: host B's claim expired
    A's lease and took another user's message, then A's own claim took the expired batch - under
    A's owner name, so the waiting thread's write still matched, and both threads sent the reply
    (seen in CI). A batch its own threads answer is the claimant's to finish or lose, never to claim."""
    a, b = open_store(), open_store()
    a.add([message("m_first", psid="u0"), message("m_second", psid="u1")])
    first, second = a.claim("a", 2), a.claim("a", 2)
    clock.advance(3)  # both leases ran out while A waited for the database
    assert b.claim("b", 2).ids == first.ids  # B expires both, and takes the older
    assert a.claim("a", 2, answering=[first.batch_id, second.batch_id]) is None
    with pytest.raises(LostLease):  # A's thread, back from its wait: nothing goes out from here
        a.sending(second, '{"text": "ok"}', 0, 2)
    assert b.claim("b", 2).ids == second.ids  # B answers it, once


def test_deaths_after_the_answer_is_stored_get_more_tries_but_stay_bounded(store, clock):
    """A poison message kills its process while the answer is made; once it is stored, only
    sending is left, and a host restarting again and again must not fail it after 3 deaths."""
    store.add([message("m_composing", psid="u1"), message("m_sending", psid="u2")])
    for death in range(1, 3 * 4 + 1):
        batches = {b.psid: b for b in (store.claim(f"owner{death}", 30), store.claim(f"owner{death}", 30)) if b}
        if death <= 3:
            assert batches["u1"].attempts == death
        else:
            assert "u1" not in batches  # died 3 times while its answer was being made: failed
        assert batches["u2"].attempts == death
        store.sending(batches["u2"], '{"text": "r"}', 0, 30)
        clock.advance(31)  # its owner died
    assert store.claim("last", 30) is None
    assert store.states() == {"m_composing": "failed", "m_sending": "failed"}


def test_a_takeover_bounds_deaths_as_an_expired_lease_does(store):
    store.add([message("m_composing", psid="u1"), message("m_sending", psid="u2")])
    for death in range(1, 3 * 4 + 1):
        claimed = [store.claim(f"bot1:{death}", 30) for _ in range(2)]
        for batch in filter(None, claimed):
            if batch.psid == "u2":
                store.sending(batch, '{"text": "r"}', 0, 30)
        taken_back = store.take_over("bot1:", f"bot1:{death + 1}")
        assert taken_back == (2 if death < 3 else 1 if death < 3 * 4 else 0)  # the rest: failed
        if death == 3:  # the bound before the answer is stored is the smaller one
            assert store.states() == {"m_composing": "failed", "m_sending": "pending"}
    assert store.states() == {"m_composing": "failed", "m_sending": "failed"}


def test_deaths_with_the_whole_bot_are_counted_apart_with_a_larger_bound(store):
    """Under gunicorn each master start has its lineage: a reply process that died under this
    master (a poison message) counts a death; a claim of an earlier start died with the whole bot
    (kill -9 of the group, a restart), counted apart with four times the bound - a storm of
    restarts fails nothing, a message that takes the bot down at every start still ends."""
    store.add([message("m_storm", psid="u1"), message("m_poison", psid="u2")])
    for start in range(1, 3 * 4 + 1):
        claimed = {b.psid: b for b in (store.claim(f"bot1:start{start}.100:aa", 30) for _ in range(2)) if b}
        assert (claimed["u2"].attempts, claimed["u2"].deaths) == (1, 0)  # no try spent by the restarts
        if start == 11:
            store.complete(claimed["u1"], exchange(claimed["u1"]))  # the storm ends for u1: answered
        taken = store.take_over("bot1:", f"bot1:start{start + 1}.200:bb", f"start{start + 1}")
        assert taken == (2 if start < 11 else 1 if start == 11 else 0)
    assert store.states() == {"m_storm": "done", "m_poison": "failed"}  # u2 took the bot down 12 times
    store.add([message("m_crash", psid="u3")])
    for death in range(1, 4):  # a reply process dying under one living master, again and again
        batch = store.claim(f"bot1:master.{death}:cc", 30)
        assert (batch.attempts, batch.deaths) == (death, death - 1)
        store.take_over("bot1:", f"bot1:master.{death + 1}:dd", "master")
    assert store.states()["m_crash"] == "failed"  # the bound, as before


def test_errors_and_deaths_have_bounds_of_their_own(store, clock):
    """A host dying again and again must not use up a stored answer's tries at sending, nor
    may errors use up a message's deaths."""
    store.add([message("m1", psid="u1"), message("m2", psid="u2")])
    for _ in range(2):  # u1: two errors while its answer is made...
        batch = store.claim("a", 30)
        assert batch.psid == "u1" and store.retry(batch, 0, "HTTP 500")
    for death in range(3):  # ...then its owner dies three times: failed at the third
        batch = store.claim(f"dead{death}", 30)
        assert (batch.psid, batch.deaths) == ("u1", death)
        clock.advance(31)
    for death in range(3):  # u2: its answer is stored, then three deaths mid-send...
        batch = store.claim(f"gone{death}", 30)
        assert batch.psid == "u2"
        store.sending(batch, '{"text": "r"}', 0, 30)
        clock.advance(31)
    outcomes = [store.retry(store.claim("b", 30), 0, "HTTP 500", reply='{"text": "r"}') for _ in range(3)]
    assert outcomes == [True, True, False]  # ...and still MAX_ATTEMPTS tries at sending
    assert store.states() == {"m1": "failed", "m2": "failed"}


def test_retry_keeps_the_reply_and_waits_for_its_delay(store, clock):
    store.add([message("m1")])
    batch = store.claim("a", 30)
    assert store.retry(batch, 5.0, "boom", reply='{"text": "r"}', sent_parts=1)
    assert store.claim("a", 30) is None
    clock.advance(5)
    again = store.claim("a", 30)
    assert again.batch_id == batch.batch_id and again.reply == '{"text": "r"}' and again.sent_parts == 1
    assert again.sending is None  # a plain retry: nothing in doubt


def test_a_retry_in_doubt_hands_the_part_under_way_to_the_next_attempt(store, clock):
    store.add([message("m1")])
    batch = store.claim("a", 30)
    store.sending(batch, '{"text": "r"}', 1, 30)
    assert store.retry(batch, 0, "ReadTimeout", reply='{"text": "r"}', sent_parts=1, sending=1)
    assert store.claim("b", 30).sending == 1  # it looks for part 1 before sending it again


def test_a_send_is_refused_while_a_person_answers_unless_it_is_the_handoff_reply(store, clock):
    store.add([message("m1")])
    batch = store.claim("a", 30)
    person = Echo(psid="u1", page_id="1", mid="e1", text="A person here", timestamp_ms=1500, app_id=None, metadata=None)
    store.add([], [ClassifiedEcho(person, True, clock() + 60)])
    with pytest.raises(PausedByPerson):
        store.sending(batch, '{"text": "r"}', 0, 30, {"rate_notice_at": 1.0}, unless_paused=True)
    assert store.conversations.user("u1").rate_notice_at is None  # nothing written with it
    store.sending(batch, '{"text": "r"}', 0, 30, unless_paused=False)  # a handoff reply: its own pause
    clock.advance(61)  # the pause is over
    store.sending(batch, '{"text": "r"}', 0, 30, unless_paused=True)


def test_a_send_refused_for_a_rate_limit_comes_back_later_untried_and_not_in_doubt(store, clock):
    store.add([message("m1")])
    batch = store.claim("a", 30)
    store.sending(batch, '{"text": "r"}', 0, 30)
    store.throttled(batch, 60, "rate limit")
    clock.advance(59)
    assert store.claim("b", 30) is None
    clock.advance(2)
    again = store.claim("b", 30)
    assert (again.attempts, again.sending, again.reply) == (batch.attempts, None, '{"text": "r"}')


def test_a_graceful_stop_gives_back_no_batch_whose_send_is_under_way(store, clock):
    """Given back at once, its send might land after another host looked for it - and sent it
    too. It waits out its lease, then is looked for like a dead process's send."""
    store.add([message("m1"), message("m2", psid="u2")])
    composing, sending = store.claim("a", 8), store.claim("a", 8)
    store.sending(sending, '{"text": "ok"}', 0, 8)
    assert store.release("a") == 1  # the one still composing
    taken = store.claim("b", 8)
    assert taken.ids == composing.ids
    assert store.claim("b", 8, answering=[taken.batch_id]) is None
    clock.advance(8.1)
    assert store.claim("b", 8, answering=[taken.batch_id]).sending == 0


@contextmanager
def database_held(store):
    """Every way into the store's database taken, so its next write waits: the pool's every
    connection (PostgreSQL), this process's write lock (SQLite). Yields a function that returns
    once a writer waits."""
    database = store._database
    if database.backend == "postgres":
        connections = [database.pool.getconn() for _ in range(database.pool.max_size)]
        try:
            yield lambda: wait_until(lambda: database.pool.get_stats().get("requests_waiting", 0) > 0, 10)
        finally:
            for connection in connections:
                database.pool.putconn(connection)
        return
    lock, waiting = database.writer, threading.Event()

    class Announced:
        def __enter__(self):
            waiting.set()
            return lock.__enter__()

        def __exit__(self, *exc):
            return lock.__exit__(*exc)
    database.writer = Announced()
    try:
        with lock:
            yield lambda: waiting.wait(10)
    finally:
        database.writer = lock


def test_a_send_whose_write_waited_past_the_lease_holds_a_lease_from_that_write(store, clock):
    """The write before a send waited for the database longer than the lease (PostgreSQL
    restarting): the lease it renews runs from the write, not from the asking - or another host
    takes the batch over at once and sends the reply too, while this one sends it."""
    store.add([message("m1")])
    batch = store.claim("a", 2)
    with database_held(store) as writer_waits:
        sender = threading.Thread(target=store.sending, args=(batch, '{"text": "ok"}', 0, 2))
        sender.start()
        assert writer_waits()
        clock.advance(3)  # the wait outlasts the lease
    sender.join(timeout=30)
    assert store.claim("b", 2) is None  # still the sender's
    clock.advance(2.1)
    assert store.claim("b", 2).sending == 0  # its lease runs out two seconds after the write


def test_a_send_in_doubt_keeps_the_moment_it_was_first_tried(open_store, clock):
    store = open_store(max_attempts=5)
    store.add([message("m1")])
    batch = store.claim("a", 30)
    first_try = clock()
    store.sending(batch, '{"text": "r"}', 0, 30)
    clock.advance(5)
    store.retry(batch, 0, "ReadTimeout", reply='{"text": "r"}', sending=0)
    again = store.claim("b", 30)
    assert (again.sending, again.sending_since) == (0, first_try)
    store.sending(again, '{"text": "r"}', 0, 30)  # the retry's own send of that part
    clock.advance(31)  # ...and its owner died
    taken_over = store.claim("c", 30)
    assert (taken_over.sending, taken_over.sending_since) == (0, first_try)  # still looked for from then
    store.mark_sent(taken_over, '{"text": "r"}', 1)
    store.sending(taken_over, '{"text": "r"}', 1, 30)
    store.retry(taken_over, 0, "ReadTimeout", reply='{"text": "r"}', sent_parts=1, sending=1)
    assert store.claim("d", 30).sending_since == clock()  # the next part: from its own first try


def test_a_send_left_in_doubt_by_an_older_bot_is_looked_for_since_the_message_arrived(store, clock):
    store.add([message("m1")])
    arrived = clock()
    clock.advance(5)
    batch = store.claim("a", 30)
    store.sending(batch, '{"text": "r"}', 0, 30)
    with store._write() as db:  # as a bot from before sending_since existed left it
        db.execute("UPDATE events SET sending_since = NULL")
    clock.advance(31)  # its owner died mid-send
    taken_over = store.claim("b", 30)
    store.sending(taken_over, '{"text": "r"}', 0, 30)
    clock.advance(31)
    assert store.claim("c", 30).sending_since == arrived  # not the takeover's own first try


def test_retries_run_out_into_failed_with_the_exchange_logged(store):
    store.add([message("m1")])
    for attempt in range(3):
        batch = store.claim("a", 30)
        done = store.retry(batch, 0, "boom", exchange=exchange(batch, Outcome.FAILED, reply=None, sent=()))
    assert not done and store.states() == {"m1": "failed"}
    assert [r["outcome"] for r in store.conversations.export()] == ["failed"]


def test_a_voice_notes_transcript_is_what_the_mirror_and_the_log_keep_with_its_size(store):
    voice = IncomingMessage(psid="u1", page_id="1", mid="m_voice", kind=ATTACHMENT, text="", timestamp_ms=1000,
                            attachment_types=("audio",), attachments=(Attachment(AUDIO, url="https://cdn/a.mp4"),))
    store.add([voice])
    batch = store.claim("a", 30)
    assert list(batch.messages) == [voice]  # the attachment survives the queue
    said = {"m_voice": "[voice note] Are you open?"}
    store.complete(batch, replace(exchange(batch, reply="Yes."), said=said, attachments=[("audio", 48_000, "transcribed")]))
    history = store.conversations.history("u1", "page", 10, None)
    assert [h.text for h in history] == ["Yes.", "[voice note] Are you open?"]
    [record] = store.conversations.export()
    assert record["user_message"] == "[voice note] Are you open?"
    assert json.loads(record["attachments"]) == [["audio", 48_000, "transcribed"]]


def test_a_renewal_keeps_a_lease_and_never_waits_for_a_row_being_written(store, backend, clock):
    """The lease renewal and a reply's own write locked one batch's rows in different orders on
    PostgreSQL and deadlocked (the reply's write failed, a try spent). The renewal now passes by
    a row another transaction holds; it renews the rest."""
    store.add([message("m1", at=1000), message("m2", at=1001)])
    batch = store.claim("owner", 30)
    name, settings = backend
    if name == "postgres":
        import psycopg

        with psycopg.connect(settings["DATABASE_URL"]) as writing:  # a transaction holding m1's row
            writing.execute("UPDATE events SET error = 'x' WHERE dedupe_key = 'm1'")
            renewed = threading.Thread(target=store.renew, args=("owner", 60, [batch.batch_id]))
            renewed.start()
            renewed.join(5)
            assert not renewed.is_alive(), "the renewal waited for a row another transaction holds"
            writing.rollback()
    store.renew("owner", 60, [batch.batch_id])
    clock.advance(45)  # past the first lease, within the renewed one
    assert store.claim("another", 30) is None


def test_release_gives_work_back_without_counting_the_attempt(store):
    store.add([message("m1")])
    store.claim("stopping", 30)
    assert store.release("stopping") == 1
    assert store.claim("next", 30).attempts == 1


def test_complete_logs_and_mirrors_in_one_go(store):
    store.add([message("m1", text="Do you deliver?")])
    batch = store.claim("a", 30)
    store.complete(batch, exchange(batch, reply="Yes."))
    history = store.conversations.history("u1", "page", 10, None)
    assert [(h.text, h.from_id) for h in history] == [("Yes.", "page"), ("Do you deliver?", "u1")]
    [record] = store.conversations.export()
    assert (record["user_message"], record["bot_message"], record["total_tokens"]) == ("Do you deliver?", "Yes.", 10)
    assert store.conversations.tokens_since("u1", 0) == 10 and store.stats()["in_flight"] == 0


def test_export_pages_through_records_sharing_a_moment_each_once_in_order(store, monkeypatch):
    """Pages of two records, cut inside a run of records of the same millisecond."""
    monkeypatch.setattr(exchanges, "EXPORT_PAGE", 2)
    for n, at in enumerate((1000, 1000, 1000, 2000, 2000), start=1):
        store.add([message(f"m{n}", psid=f"u{n}", at=at, text=f"q{n}")])
        batch = store.claim("a", 30)
        store.complete(batch, exchange(batch))
    assert [r["user_message"] for r in store.conversations.export()] == ["q1", "q2", "q3", "q4", "q5"]
    assert [r["user_message"] for r in store.conversations.export(since_ms=1500)] == ["q4", "q5"]


def test_a_reply_already_logged_is_not_found_as_anothers_send(store):
    store.add([message("m1", text="Hours?")])
    batch = store.claim("a", 30)
    store.complete(batch, exchange(batch, reply="Sorry, try again.", sent=("p1", "p2")))
    logged = {f"p1_{batch.batch_id}", f"p2_{batch.batch_id}"}
    conversations = store.conversations
    assert conversations.reply_mids_since("u1", 5_000) == logged
    assert conversations.reply_mids_since("u1", 5_001) == set() and conversations.reply_mids_since("u2", 0) == set()
    assert conversations.find_own_message("u1", "Sorry, try again.", 0) == f"p1_{batch.batch_id}"
    assert conversations.find_own_message("u1", "Sorry, try again.", 0, {f"p1_{batch.batch_id}"}) == f"p2_{batch.batch_id}"
    assert conversations.find_own_message("u1", "Sorry, try again.", 0, logged) is None


def test_a_message_graph_reported_first_takes_its_webhook_time_and_its_place(store):
    """Two messages in one second, m1 at .023 and m2 at .443. Answering m1, a Graph read returned
    m2 too, at the whole second (Graph's created_time): it sorted before m1, and the prompts read
    them swapped. m2's own webhook time, recorded when it is answered, puts it back in its place."""
    second = 1_796_543_755_000
    store.add([message("m1", at=second + 23, text="says 0")])
    batch = store.claim("a", 30)
    synced = (("m2", "user", "says 1", second), ("m1", "user", "says 0", second))
    store.complete(batch, replace(exchange(batch, reply="re: says 0", sent=("r1",)), synced=synced,
                                  bot_timestamp_ms=second + 600))
    store.add([message("m2", at=second + 443, text="says 1")])
    batch = store.claim("a", 30)
    store.complete(batch, replace(exchange(batch, reply="re: says 1", sent=("r2",)), bot_timestamp_ms=second + 900))
    history = store.conversations.history("u1", "page", 10, None)
    assert [h.text for h in reversed(history)] == ["says 0", "says 1", "re: says 0", "re: says 1"]


def test_history_breaks_ties_of_the_same_millisecond_by_arrival(store):
    store.add([message("m1", at=1000)])
    batch = store.claim("a", 30)
    store.complete(batch, exchange(batch, reply="part", sent=("p1", "p2", "p3")))
    texts = [h.mid for h in store.conversations.history("u1", "page", 10, None)]
    assert texts == [f"p3_{batch.batch_id}", f"p2_{batch.batch_id}", f"p1_{batch.batch_id}", "m1"]


def test_a_persons_echo_pauses_the_user_and_never_shortens_a_pause(store):
    echo = Echo(psid="u1", page_id="1", mid="e1", text="A person here", timestamp_ms=900, app_id=None, metadata=None)
    store.add([], [ClassifiedEcho(echo, True, 2_000_000_000.0)])
    later = Echo(psid="u1", page_id="1", mid="e2", text="again", timestamp_ms=950, app_id=None, metadata=None)
    store.add([], [ClassifiedEcho(later, True, 1_900_000_000.0)])
    assert store.conversations.user("u1").paused_until == 2_000_000_000.0
    assert [h.mid for h in store.conversations.history("u1", "page", 10, None)] == ["e2", "e1"]


def test_a_thread_passed_back_ends_the_pause_whichever_delivery_comes_first(store):
    """Meta's deliveries can arrive out of order: a person's answer (at 900) delivered after the
    inbox passed the thread back (at 1000) must not pause the bot again; an answer after the
    handback (1100) does, and a handback older than that answer, delivered late, keeps it."""
    def person(mid: str, at_ms: int) -> ClassifiedEcho:
        echo = Echo(psid="u1", page_id="1", mid=mid, text="A person here", timestamp_ms=at_ms, app_id=None,
                    metadata=None)
        return ClassifiedEcho(echo, True, 2_000_000_000.0)

    def handback(at_ms: int) -> ClassifiedEcho:
        echo = Echo(psid="u1", page_id="1", mid=f"thread-control:{at_ms}", text="", timestamp_ms=at_ms, app_id=None,
                    metadata=None)
        return ClassifiedEcho(echo, False, 0.0, RESUME)

    store.add([], [handback(1000)])
    store.add([], [person("e1", 900)])
    assert store.conversations.user("u1").paused_until is None
    assert [h.mid for h in store.conversations.history("u1", "page", 10, None)] == ["e1"]  # still mirrored
    store.add([], [person("e2", 1100)])
    assert store.conversations.user("u1").paused_until == 2_000_000_000.0
    store.add([], [handback(1050)])  # passed back before e2 was written, delivered after it
    assert store.conversations.user("u1").paused_until == 2_000_000_000.0
    store.add([], [handback(1200)])
    assert store.conversations.user("u1").paused_until is None


def test_a_requested_pause_written_with_the_answer_yields_to_a_handback_or_a_longer_pause(store):
    """The pause a request for a person sets is written with its answer, after the gate decided:
    a handback after the request (at 1000) or a person's longer pause that landed in between stands."""
    store.add([message("m1", at=1000), message("m2", psid="u2", at=1000)])
    first, second = store.claim("a", 30), store.claim("a", 30)
    batches = {first.psid: first, second.psid: second}
    handback = Echo(psid="u1", page_id="1", mid="thread-control:1100", text="", timestamp_ms=1100, app_id=None,
                    metadata=None)
    person = Echo(psid="u2", page_id="1", mid="e2", text="A person here", timestamp_ms=1050, app_id=None,
                  metadata=None)
    store.add([], [ClassifiedEcho(handback, False, 0.0, RESUME), ClassifiedEcho(person, True, 2_000_000_000.0)])
    store.sending(batches["u1"], '{"text": "r"}', 0, 30, {"pause": [1_900_000_000.0, 1000]})
    store.complete(batches["u2"], exchange(batches["u2"]), {"pause": [1_900_000_000.0, 1000]})
    assert store.conversations.user("u1").paused_until is None
    assert store.conversations.user("u2").paused_until == 2_000_000_000.0
    store.conversations.update_user("u3", pause=[1_900_000_000.0, 1000], rate_notice_at=7.5)  # no one paused it
    assert (store.conversations.user("u3").paused_until, store.conversations.user("u3").rate_notice_at) == (
        1_900_000_000.0, 7.5)


def test_a_thread_passed_to_the_inbox_is_due_back_once_its_pause_ends_unless_passed_back(store, clock):
    now = clock()
    conversations = store.conversations

    def handback(psid: str, at_ms: int) -> ClassifiedEcho:
        return ClassifiedEcho(Echo(psid=psid, page_id="page-1", mid=f"thread-control:{at_ms}", text="",
                                   timestamp_ms=at_ms, app_id=None, metadata=None), False, 0.0, RESUME)

    for at_ms, psid in enumerate(("u1", "u2", "u3", "u5"), start=1000):
        conversations.update_user(psid, pause=[now + 1800, 1000], thread_away="page-1", thread_away_ms=at_ms)
    conversations.update_user("u4", pause=[now + 1800, 1000])  # paused, thread never passed on
    conversations.update_user("u6", thread_away="page-1", thread_away_ms=1000)  # HUMAN_PAUSE=off: no pause
    assert conversations.threads_due_back(now) == []
    store.add([], [handback("u2", 2000), handback("u5", 900)])  # u5's is older than its hand-over: an earlier one's
    conversations.update_user("u3", pause=[now + 3600, 3000])  # a person answered later: a longer pause
    assert conversations.user("u2").thread_away is None and conversations.user("u2").paused_until is None
    assert conversations.user("u5").thread_away == "page-1" and conversations.user("u5").paused_until == now + 1800
    assert conversations.threads_due_back(now + 1800) == [("u1", "page-1"), ("u5", "page-1")]
    assert conversations.threads_due_back(now + 3600) == [("u1", "page-1"), ("u3", "page-1"), ("u5", "page-1")]
    assert conversations.threads_due_back(now + 3600, limit=1) == [("u1", "page-1")]
    assert conversations.claim_thread_back("u1", "page-1", now + 3600, hold=60)
    assert not conversations.claim_thread_back("u1", "page-1", now + 3600, hold=60)  # another host has it
    conversations.update_user("u3", pause=[now + 7200, 4000])  # a person answered after the list was read
    assert not conversations.claim_thread_back("u3", "page-1", now + 3600, hold=60)
    assert conversations.claim_thread_back("u5", "page-1", now + 3600, hold=60)
    conversations.thread_taken_back("u5", "page-1")
    assert conversations.threads_due_back(now + 3630) == []  # u1's taker may still be at it
    # u1's taker died (or Graph failed): once its claim runs out, due again - after one never tried
    conversations.update_user("u7", pause=[now, 1000], thread_away="page-1", thread_away_ms=5000)
    assert conversations.threads_due_back(now + 3661) == [("u7", "page-1"), ("u1", "page-1")]


def test_user_state_columns_are_set_and_kept(store):
    store.conversations.update_user("u1", reset_at_ms=42)
    store.conversations.update_user("u1", rate_notice_at=7.5, budget_notice_day="2027-01-15")
    state = store.conversations.user("u1")
    assert (state.reset_at_ms, state.rate_notice_at, state.budget_notice_day) == (42, 7.5, "2027-01-15")
    assert store.conversations.user("nobody").paused_until is None


def test_messages_between_counts_every_message_taken_in(store):
    store.add([message(f"m{i}", at=1000 + i) for i in range(5)])
    assert store.conversations.messages_between("u1", 1000, 1003) == 3  # (1000, 1003]


def test_the_graph_budget_is_one_read_per_slot_for_everyone(open_store, clock):
    a, b = open_store(), open_store()  # two processes (SQLite) or two hosts (PostgreSQL)
    assert a.conversations.take_graph_read("1", 2.0) is True
    assert b.conversations.take_graph_read("1", 2.0) is False
    clock.advance(0.75)
    assert b.conversations.take_graph_read("1", 2.0) is True
    a.conversations.hold_graph_reads("1", 10)
    clock.advance(5)
    assert a.conversations.take_graph_read("1", 2.0) is False


def test_concurrent_budget_takers_get_one_slot(open_store):
    stores = [open_store() for _ in range(4)]
    results, start = [], threading.Barrier(len(stores))

    def take(s):
        start.wait()
        results.append(s.conversations.take_graph_read("1", 1.0))
    threads = [threading.Thread(target=take, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False, False, False, True]


def test_concurrent_claimers_never_share_a_user(open_store):
    seed = open_store()
    seed.add([message(f"m{u}_{i}", psid=f"u{u}", at=1000 + i) for u in range(20) for i in range(3)])
    stores = [open_store() for _ in range(4)]
    claimed, lock = [], threading.Lock()

    def work(s, owner):
        while (batch := s.claim(owner, 30)) is not None:
            with lock:
                claimed.append((batch.psid, [m.mid for m in batch.messages]))
    threads = [threading.Thread(target=work, args=(s, f"w{i}")) for i, s in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(p for p, _ in claimed) == sorted(f"u{u}" for u in range(20))  # each user once
    assert all(mids == [f"{mids[0][:-2]}_{i}" for i in range(3)] for _, mids in claimed)


def test_retention_prunes_old_records_but_keeps_those_waiting_for_tracking(open_store, clock):
    store = open_store(tracking=True)
    store.add([message("old", at=1000)])
    batch = store.claim("a", 30)
    store.complete(batch, exchange(batch))
    assert store.conversations.prune(1) == (0, frozenset())  # waiting for TRACKING_URL: kept
    [(record_id, _)] = store.conversations.waiting_for_tracking()
    store.conversations.tracked(record_id)
    assert store.conversations.prune(1) == (1, frozenset()) and list(store.conversations.export()) == []


def test_retention_deletes_a_chunk_of_each_kind_per_step_until_nothing_old_is_left(store, clock):
    """A large store is pruned in short transactions, not one that holds the write lock for seconds."""
    store.add([message(f"old{n}", psid=f"u{n}", at=1000 + n) for n in range(5)])
    for _ in range(5):
        batch = store.claim("a", 30)
        store.complete(batch, exchange(batch))
    clock.advance(2 * 86400)
    store.add([message("new", psid="u9", at=int(clock() * 1000))])
    batch = store.claim("a", 30)
    store.complete(batch, exchange(batch))
    steps = [store.conversations.prune(1, limit=2)]
    while steps[-1].more:
        steps.append(store.conversations.prune(1, limit=2, kinds=steps[-1].more))
    # 5 old exchanges, 5 old done messages, 11 old mirror rows (each exchange's reply is at 5 s):
    # a kind with less than a chunk left is not looked at again
    assert [step.exchanges for step in steps] == [2, 2, 1, 0, 0, 0]
    assert [sorted(step.more) for step in steps] == [["events", "exchanges", "mirror"]] * 2 + [["mirror"]] * 3 + [[]]
    assert [r["user_message"] for r in store.conversations.export()] == ["hi"]  # the new one's
    assert store.states() == {"new": "done"}
    with store.conversations.database.read() as db:
        assert [row[0] for row in db.execute("SELECT psid FROM mirror WHERE author = 'user'")] == ["u9"]


def test_tracking_failures_back_off(open_store, clock):
    store = open_store(tracking=True)
    store.add([message("m1")])
    batch = store.claim("a", 30)
    store.complete(batch, exchange(batch))
    [(record_id, record)] = store.conversations.waiting_for_tracking()
    assert record["session_id"] == "u1" and record["engine"] == "m"
    assert store.conversations.tracking_failed(record_id, base_delay=2.0) == 1
    assert store.conversations.waiting_for_tracking() == []
    clock.advance(2)
    assert len(store.conversations.waiting_for_tracking()) == 1


def test_each_tracking_record_is_claimed_by_one_host_until_its_lease_ends(open_store, clock):
    """Every host's tracker reads one outbox: a record one of them is posting is not posted by
    another too - unless its poster never said how it went (died), once the claim runs out."""
    here, there = open_store(tracking=True), open_store(tracking=True)
    here.add([message(f"m{n}", psid=f"u{n}") for n in range(3)])
    for _ in range(3):
        batch = here.claim("a", 30)
        here.complete(batch, exchange(batch))
    mine = here.conversations.claim_for_tracking(lease=60, limit=2)
    theirs = there.conversations.claim_for_tracking(lease=60, limit=2)
    assert [r["session_id"] for _, r in mine] == ["u0", "u1"] and [r["session_id"] for _, r in theirs] == ["u2"]
    assert there.conversations.claim_for_tracking(lease=60) == []
    here.conversations.tracked(mine[0][0])
    here.conversations.release_tracking([mine[1][0]])  # not tried after all: due again now
    [(again, record)] = there.conversations.claim_for_tracking(lease=60)
    assert record["session_id"] == "u1"
    there.conversations.tracked(again)
    clock.advance(61)  # the claim on u2 ran out, never marked: posted again
    assert [r["session_id"] for _, r in here.conversations.claim_for_tracking(lease=60)] == ["u2"]


def test_stats_count_depth_flight_failures_and_age(store, clock):
    store.add([message("m1"), message("m2", psid="u2")])
    store.claim("a", 30)
    clock.advance(3)
    stats = store.stats()
    assert (stats["queue_depth"], stats["in_flight"], stats["failed"]) == (1, 1, 0)
    assert stats["oldest_pending_age_s"] == 3.0
    store.heartbeat("myhost:1:x")
    assert store.stats(owner_prefix="myhost:")["dispatcher_seen_s_ago"] == 0.0
    assert store.stats(owner_prefix="otherhost:")["dispatcher_seen_s_ago"] is None


def test_stats_say_when_any_host_last_made_progress(open_store, clock):
    here, there = open_store(), open_store()  # two hosts' reply processes
    here.add([message("m1"), message("m2", psid="u2")])
    here.heartbeat("a:1:x")
    there.heartbeat("b:1:y")
    assert here.stats()["progress_s_ago"] is None  # alive, but nothing finished yet
    batch = there.claim("b:1:y", 30)
    there.complete(batch, exchange(batch))
    clock.advance(5)
    assert here.stats()["progress_s_ago"] is None  # said with the next heartbeat, not before
    there.heartbeat("b:1:y")
    clock.advance(2)
    here.heartbeat("a:1:x")  # the other host, which finished nothing, does not hide it
    assert here.stats(owner_prefix="a:")["progress_s_ago"] == 7.0
    failed = here.claim("a:1:x", 30)
    here.fail(failed, "boom")  # a failure is an outcome too: the queue moves
    clock.advance(1)
    here.heartbeat("a:1:x")
    assert there.stats()["progress_s_ago"] == 1.0
    here.add([message("m3", psid="u3")])
    clock.advance(10)
    held = here.claim("a:1:x", 30)
    here.retry(held, 5, "model error")  # an error is no progress
    here.heartbeat("a:1:x")
    assert there.stats()["progress_s_ago"] == 11.0
    clock.advance(6)
    held = here.claim("a:1:x", 30)
    here.throttled(held, 90, "Meta: too many sends (613)")  # waiting out Meta's limit is
    here.heartbeat("a:1:x")
    assert there.stats()["progress_s_ago"] == 0.0


def test_the_answer_cache_keeps_an_answer_for_its_ttl(open_store, clock):
    a, b = open_store(), open_store()  # shared by every process and host
    a.conversations.remember_answer("k1", "We open at 9.", "gpt-x", ttl=60)
    assert b.conversations.cached_answer("k1") == ("We open at 9.", "gpt-x")
    assert b.conversations.cached_answer("k2") is None
    clock.advance(60)
    assert b.conversations.cached_answer("k1") is None


def test_a_graph_read_can_be_reserved_ahead_only_when_it_comes_in_time(open_store, clock):
    a, b = open_store(), open_store()
    assert a.conversations.reserve_graph_read("1", 2.0, latest=clock()) == clock()  # free now
    assert b.conversations.reserve_graph_read("1", 2.0, latest=clock() + 0.5) is None  # next slot is in 0.75 s
    assert b.conversations.reserve_graph_read("1", 2.0, latest=clock() + 5) == clock() + 0.75
    assert a.conversations.reserve_graph_read("1", 2.0, latest=clock() + 5) == clock() + 1.5  # the one after


def test_a_graph_read_reserved_after_a_wait_for_the_database_is_not_in_the_past(store, clock):
    """Reckoned from before the wait, the slot would be in the past: read at once, right beside
    the read another host reserved meanwhile."""
    slots = []

    def reserve():
        slots.append(store.conversations.reserve_graph_read("1", 2.0, latest=clock() + 10))
    with database_held(store) as writer_waits:
        reader = threading.Thread(target=reserve)
        reader.start()
        assert writer_waits()
        clock.advance(5)
    reader.join(timeout=30)
    assert slots == [clock()]


def test_a_nul_in_a_users_text_is_stored_by_both_backends(store):
    from messenger.text import clean_text

    store.add([message("m1", text=clean_text("before\x00after"))])
    batch = store.claim("a", 30)
    store.complete(batch, exchange(batch, reply="ok"))
    assert [r["user_message"] for r in store.conversations.export()] == ["before\ufffdafter"]


def test_a_stale_owner_cannot_overwrite_the_outcome_of_the_one_that_took_over(store, clock):

    store.add([message("m1")])
    stale = store.claim("slow", 30)
    clock.advance(31)
    fresh = store.claim("fast", 30)
    store.complete(fresh, exchange(fresh))
    for write in (lambda: store.retry(stale, 0, "late"), lambda: store.complete(stale, exchange(stale)),
                  lambda: store.sending(stale, "{}", 0, 30)):
        with pytest.raises(LostLease):
            write()
    assert store.states() == {"m1": "done"} and len(list(store.conversations.export())) == 1


def test_edits_reactions_and_feedback_land_where_they_belong(store):
    from bot.storage.inbox import EDIT, FEEDBACK, REACTION

    def touched(kind, mid, value):
        return ClassifiedEcho(Echo(psid="u1", mid=mid, text=value, timestamp_ms=1500, app_id=None, metadata=None,
                                   page_id="1"), False, 0.0, kind)
    store.add([message("answered", text="Open tomorrow?"), message("waiting", at=1200, text="typo")])
    batch = store.claim("a", 30)  # both: one batch; answer it, then a later message waits
    store.complete(batch, exchange(batch, reply="Yes, 9 to 5.", sent=("r",)))
    store.add([message("later", at=3000, text="and Sundy?")])
    reply_mid = f"r_{batch.batch_id}"
    store.add([], [touched(EDIT, "answered", "Open on Sunday?"), touched(EDIT, "later", "and Sunday?"),
                   touched(REACTION, reply_mid, "\u2764\ufe0f"), touched(FEEDBACK, reply_mid, "Good response")])
    texts = {h.mid: h.text for h in store.conversations.history("u1", "page", 10, None)}
    assert texts["answered"] == "Open on Sunday?"
    assert [m.text for m in store.claim("a", 30).messages] == ["and Sunday?"]
    assert [r["feedback"] for r in store.conversations.export()] == ["Good response"]


def edit(mid, text, at, psid="u1"):
    from bot.storage.inbox import EDIT

    return touch(EDIT, mid, text, at, psid)


def touch(kind, mid, text="", at=5000, psid="u1"):
    """What the user did to one of their messages, as the webhook hands it to the store."""
    return ClassifiedEcho(Echo(psid=psid, mid=mid, text=text, timestamp_ms=at, app_id=None, metadata=None,
                               page_id="1"), False, 0.0, kind)


def test_a_message_stored_after_its_edit_is_answered_as_edited(store):
    """Another worker's inbox file drained first, or Meta delivering the message again after a
    503: the edit was stored before its message, and the claim gives the message the edit's
    text - the latest edit's, whatever order the edits came in."""
    store.add([], [edit("m_typo", "Open on Sunday?", at=5000), edit("m_typo", "Open Sundy?", at=4000)])
    store.add([], [edit("m_photo", "Is this gluten free?", at=5000)])
    store.add([message("m_typo", text="Opn Sundy"),
               IncomingMessage(psid="u1", page_id="1", mid="m_photo", kind=ATTACHMENT, text="", timestamp_ms=2000)])
    batch = store.claim("a", 30)
    assert [(m.mid, m.kind, m.text) for m in batch.messages] == [("m_typo", TEXT, "Open on Sunday?"),
                                                                 ("m_photo", TEXT, "Is this gluten free?")]
    store.complete(batch, exchange(batch, reply="Yes, and yes."))
    assert [r["user_message"] for r in store.conversations.export()] == ["Open on Sunday?\nIs this gluten free?"]
    # Edited while its answer was being made: that answer and its record are to the words it was
    # made from; the mirror (later prompts) reads the edit. An edit without words changes nothing.
    store.add([message("m_late", at=6000, text="Hours?")])
    in_flight = store.claim("a", 30)
    store.add([], [edit("m_late", "Hours on Monday?", at=7000), edit("m_late", "", at=8000)])
    store.complete(in_flight, exchange(in_flight, reply="9 to 5.", sent=("s",)))
    assert [r["user_message"] for r in store.conversations.export()][-1] == "Hours?"
    texts = {h.mid: h.text for h in store.conversations.history("u1", "page", 10, None)}
    assert texts["m_late"] == "Hours on Monday?" and texts["m_typo"] == "Open on Sunday?"
    assert_pruned_with_retention(store, "edited", 3)


def test_an_edit_changes_only_a_message_of_the_user_who_sent_it(store):
    """Meta's mids are unique and its deliveries signed: an edit naming another user's message
    (or the bot's reply) is a forged or broken delivery, and changes nothing."""
    store.add([message("m_answered", text="Open tomorrow?")])
    batch = store.claim("a", 30)
    store.complete(batch, exchange(batch, reply="Yes, 9 to 5.", sent=("r",)))
    store.add([message("m_waiting", at=3000, text="And Sunday?")])
    store.add([], [edit("m_answered", "taken over", at=5000, psid="u2"), edit("m_waiting", "taken over", at=5000, psid="u2"),
                   edit(f"r_{batch.batch_id}", "taken over", at=5000)])
    store.add([], [edit("m_waiting", "And on Sunday?", at=6000)])  # then its own user's edit still counts
    assert "taken over" not in [h.text for h in store.conversations.history("u1", "page", 10, None)]
    assert [m.text for m in store.claim("a", 30).messages] == ["And on Sunday?"]


def test_an_unsent_message_leaves_the_history_and_is_not_answered_when_still_waiting(store):
    from bot.storage.edits import UNSENT_ERROR

    store.add([message("answered", text="My card number is 4111")])
    batch = store.claim("a", 30)
    store.complete(batch, exchange(batch, reply="Please never send it here.", sent=("r",)))
    store.add([message("waiting", at=3000, text="my address is 5 Main St"), message("kept", at=3100, text="Hours?")])
    store.add([], [unsend("answered"), unsend("waiting")])
    assert [h.mid for h in store.conversations.history("u1", "page", 10, None)] == [f"r_{batch.batch_id}"]
    assert store.states()["waiting"] == "done"
    kept = store.claim("a", 30)
    assert [m.mid for m in kept.messages] == ["kept"]
    store.complete(kept, exchange(kept, reply="9 to 5.", sent=("k",)))
    with store.conversations.database.read() as db:
        row = db.execute("SELECT message, error FROM events WHERE dedupe_key = ?", ("waiting",)).fetchone()
    assert "5 Main St" not in row[0] and row[1] == UNSENT_ERROR
    # Unsent while its answer was being made: answered, and still never mirrored again.
    store.add([message("in_flight", at=6000, text="my password is hunter2")])
    in_flight = store.claim("a", 30)
    store.add([], [unsend("in_flight")])
    store.complete(in_flight, exchange(in_flight, reply="Please keep it to yourself.", sent=("s",)))
    assert "hunter2" not in json.dumps([h.text for h in store.conversations.history("u1", "page", 10, None)])
    store.add([], [unsend(f"s_{in_flight.batch_id}")])  # only a user's own message is unsent
    assert f"s_{in_flight.batch_id}" in [h.mid for h in store.conversations.history("u1", "page", 10, None)]


def unsend(mid, psid="u1"):
    from bot.storage.inbox import UNSEND

    return touch(UNSEND, mid, psid=psid)


def test_a_message_stored_after_its_unsend_is_not_answered(store):
    """Meta delivering it again after a 503, or another worker's inbox file drained later: the
    unsend was stored first, and the claim finishes the message unanswered."""
    store.add([], [unsend("m_unsent")])
    store.add([message("m_unsent", text="my address is 5 Main St"), message("m_kept", at=2000, text="Hours?")])
    assert [m.mid for m in store.claim("a", 30).messages] == ["m_kept"]
    assert store.states() == {"m_unsent": "done", "m_kept": "working"}
    store.add([], [unsend("m_alone", psid="u2")])
    store.add([message("m_alone", psid="u2")])
    assert store.claim("b", 30) is None and store.states()["m_alone"] == "done"
    with store.conversations.database.read() as db:  # no message of u2's counts as said (the disclosure rule)
        assert mirror.activity(db, "u2", 10**13) == (None, None)
    assert_pruned_with_retention(store, "unsent", 2)


def assert_pruned_with_retention(store, table, rows):
    """`rows` rows of long ago in `table`, and none after a step of RETENTION_DAYS for its kind."""
    with store.conversations.database.read() as db:
        assert db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == rows
    store.conversations.prune(1, kinds=frozenset({table}))
    with store.conversations.database.read() as db:
        assert db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 0


def test_an_unsend_does_not_cut_an_answer_already_being_sent(store):
    """A batch back in the queue with part of its reply sent keeps going: its reply is finished
    and logged like any other."""
    store.add([message("m_long", text="Tell me everything")])
    batch = store.claim("a", 30)
    store.sending(batch, "part one. part two.", 0, 30)
    store.mark_sent(batch, "part one. part two.", 1)
    assert store.retry(batch, 0, "the Send API failed", reply="part one. part two.", sent_parts=1)
    store.add([], [unsend("m_long")])
    again = store.claim("a", 30)
    assert again is not None and again.reply == "part one. part two." and again.sent_parts == 1


def test_a_web_rate_window_starts_at_its_first_request_and_the_daily_one_at_midnight(store):
    database = store.conversations.database
    minute_ends = 1_800_000_060.0  # a whole minute of the clock

    def hits(key, times, window=60, **kwargs):
        with database.write() as db:
            return [webchat_store.hit(db, key, window, at, **kwargs) for at in times]
    # Across the clock's minute: still one window, counted on; a minute after the first, a new one.
    assert hits("ip:a", [minute_ends - 2, minute_ends - 1, minute_ends + 1, minute_ends + 2]) == [
        (1, 60), (2, 59), (3, 57), (4, 56)]
    assert hits("ip:a", [minute_ends + 58.5]) == [(1, 60)]
    day = 86400 * 20_833  # midnight UTC
    assert hits("ipday:a", [day - 1, day + 1], window=86400, calendar=True) == [(1, 1), (1, 86399)]


def test_a_web_reservation_counts_until_given_back_or_for_reservation_s_at_most(store):
    """An answer whose log never got written (a process killed, the database down at that moment)
    must not hold the daily caps until midnight."""
    database, now = store.conversations.database, 1_800_000_000.0
    with database.write() as db:
        webchat_store.take_turn(db, now)
        webchat_store.reserve(db, "r1", "198.51.100.1", 2000, now)
        webchat_store.reserve(db, "r2", "198.51.100.2", 2000, now)
        webchat_store.reserve(db, "r3", "2001:db8::/64", 2000, now + 1)
        webchat_store.reserve(db, "r4", "a:b:2001:db8::/64", 500, now + 1)  # no client's key ends another's
    with database.read() as db:
        assert webchat_store.reserved(db, now + 1) == 6500
        assert webchat_store.reserved(db, now + 1, "198.51.100.1") == 2000
        assert webchat_store.reserved(db, now + 1, "2001:db8::/64") == 2000
    with database.write() as db:
        webchat_store.release(db, "r2")  # its answer was logged
    with database.read() as db:
        assert webchat_store.reserved(db, now + 1) == 4500 and webchat_store.reserved(db, now + 1, "198.51.100.2") == 0
        assert webchat_store.reserved(db, now + webchat_store.RESERVATION_S + 0.5) == 2500  # r1 stopped counting
        assert webchat_store.reserved(db, now + webchat_store.RESERVATION_S + 1) == 0
    with database.write() as db:  # and the tidy deletes them
        assert webchat_store.prune(db, now + webchat_store.RESERVATION_S + 2) == 3
    with database.read() as db:
        assert db.execute("SELECT COUNT(*) FROM webchat_reservations").fetchone()[0] == 0


def test_the_web_chats_old_counters_and_conversations_with_no_exchange_left_are_pruned(store):
    database, now = store.conversations.database, 1_800_000_000.0
    with database.write() as db:
        webchat_store.hit(db, "ip:old", 60, now - 3 * 86400)
        webchat_store.hit(db, "ip:new", 60, now - 60)
        for conversation, created in (("talked", now - 100 * 86400), ("silent", now - 100 * 86400),
                                      ("recent", now - 86400)):
            webchat_store.add_conversation(db, conversation, None, "ana@example.com", created)
    with database.write() as db:  # as the website chat logs an answer (bot/webchat/service.py)
        store.conversations.finish(db, Exchange(psid="web:talked", messages=[message("w1", psid="web:talked",
                                                                                        at=1000)],
                                                outcome=Outcome.ANSWERED))
    with database.write() as db:
        assert webchat_store.prune(db, now) == 1  # without a retention: the old counter only
        assert webchat_store.prune(db, now, now - 90 * 86400, lambda conversation: "web:" + conversation) == 1
    with database.read() as db:
        assert [key for (key,) in db.execute("SELECT key FROM webchat_counters")] == ["ip:new"]
        assert sorted(c for (c,) in db.execute("SELECT id FROM webchat_conversations")) == ["recent", "talked"]


def test_older_code_goes_on_after_additive_migrations_and_stops_after_any_other(backend, tmp_path, caplog):
    """A rolling upgrade (or a rollback of the code): the hosts not yet upgraded keep working while
    every migration since their version only adds; otherwise they refuse, in one line."""
    from bot.storage.schema import POSTGRES_SCHEMA, SCHEMA
    from bot.storage.sql import Additive, SchemaTooNew

    name, settings = backend

    def newer_code(extra):  # the next version of the bot opens the database first, and migrates it
        if name == "postgres":
            from bot.storage.postgres import PostgresDatabase
            PostgresDatabase(settings["DATABASE_URL"], [*POSTGRES_SCHEMA, *extra], max_size=2).close()
        else:
            from bot.storage.sqlite import Database
            Database(str(tmp_path / "bot.sqlite3"), [*SCHEMA, *extra])

    def this_code():
        return (PostgresQueue(settings["DATABASE_URL"], pool_size=2) if name == "postgres"
                else SQLiteQueue(str(tmp_path / "bot.sqlite3")))

    newer_code([Additive("CREATE TABLE later_a (x INTEGER)"), Additive("CREATE INDEX later_a_x ON later_a (x)")])
    store = this_code()
    try:
        assert store.add([message("m1")]) == [True]
        assert store.claim("host:1:x", 30).psid == "u1"
    finally:
        store.close()
    assert "newer than this code" in caplog.text and "only add, so this host goes on" in caplog.text
    newer_code([Additive("CREATE TABLE later_a (x INTEGER)"), Additive("CREATE INDEX later_a_x ON later_a (x)"),
                "ALTER TABLE events RENAME COLUMN reply TO answer"])
    with pytest.raises(SchemaTooNew, match="newer than this code"):
        this_code().close()
