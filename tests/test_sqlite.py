"""The SQLite file as several processes of one host see it."""
import multiprocessing

from bot.storage.queue import SQLiteQueue

PROCESSES = 8
FIRST_STARTS = 20


def open_queue(path, everyone_ready, results):
    everyone_ready.wait()
    try:
        SQLiteQueue(path).states()
        results.put("ok")
    except Exception as exc:  # noqa: BLE001 - the test reports what a worker would have died of
        results.put(repr(exc))


def test_processes_opening_a_new_database_in_the_same_instant_all_start(tmp_path):
    """A first start: gunicorn's workers and the reply process open the new file at once. One
    of them switching it to WAL used to be refused at once ("database is locked": SQLite
    skips the busy timeout when waiting could deadlock), and that worker failed to boot,
    which stops gunicorn. Without the retry, about one first start in three lost a process."""
    fork = multiprocessing.get_context("fork")
    failures = []
    for start in range(FIRST_STARTS):
        path = str(tmp_path / f"start{start}" / "bot.sqlite3")
        everyone_ready, results = fork.Barrier(PROCESSES), fork.Queue()
        processes = [fork.Process(target=open_queue, args=(path, everyone_ready, results))
                     for _ in range(PROCESSES)]
        for process in processes:
            process.start()
        outcomes = [results.get(timeout=60) for _ in processes]
        for process in processes:
            process.join()
        failures += [outcome for outcome in outcomes if outcome != "ok"]
    assert failures == []
