"""Bilingual dictionaries: full text answers a question in another language from the English
documents, on both backends, through the command line and in a reply; a broken dictionary is
refused with one line and leaves what was there."""
from __future__ import annotations

import gzip
import threading

import pytest

from bot.knowledge import dictionary
from bot.knowledge.retrieval import base_forms
from devtools.emulator import ModelStandIn
from tests.test_knowledge import chat_requests, docs, excerpts_in, knowledge_of, say  # noqa: F401 - fixture
from tests.test_knowledge_ingest import run_cli

# Entries as FreeDict writes them: the headword line (with its pronunciation), then the senses,
# with grammar labels, domains, usage examples and cross-references around them.
SPANISH = {
    "00-database-info": "This is a test dictionary\n",
    "domingo": "domingo /doˈmiŋɡo/\nSunday <n>\n",
    "sábado": "sábado /ˈsaβaðo/\n1. Saturday <n>\n2. sabbath\n",
    "abrir": "abrir /aˈβɾiɾ/\nopen <v>\n      \"abrir la puerta\"  - open the door\n see: {abierto}\n",
    "entrega": "entrega /enˈtɾeɣa/ <fem, n>\n [com.] delivery <n>\n",
    "hora": "hora /ˈoɾa/\nhour (of the day), o'clock\n",
    "cerrado por": "cerrado por /θeˈrado/\nclosed for\n",  # two words: no question word is ever that
}


def write_dictionary(folder, name: str, entries: dict[str, str], *, compressed: bool = True):
    """A dictd dictionary: NAME.index (headword, base64 offset, base64 length) and NAME.dict(.dz)."""
    data, lines = b"", []
    for headword, text in entries.items():
        body = text.encode()
        lines.append(f"{headword}\t{b64(len(data))}\t{b64(len(body))}\n")
        data += body
    (folder / f"{name}.index").write_text("".join(sorted(lines)), encoding="utf-8")
    if compressed:
        (folder / f"{name}.dict.dz").write_bytes(gzip.compress(data))
    else:
        (folder / f"{name}.dict").write_bytes(data)
    return folder / f"{name}.index"


def b64(number: int) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"  # dictd's, not RFC 4648's padding
    digits = ""
    while True:
        number, digit = divmod(number, 64)
        digits = alphabet[digit] + digits
        if not number:
            return digits


@pytest.fixture
def no_embeddings():
    """A model server without /embeddings: the bot searches full text only."""
    model = ModelStandIn(embeddings=False).start()
    yield {"OPENAI_BASE_URL": model.base_url}, model
    model.stop()


# -- reading a dictionary --------------------------------------------------------------------------

@pytest.mark.parametrize("compressed", [True, False])
def test_a_dictionary_gives_one_word_headwords_folded_with_the_words_of_their_senses(tmp_path, compressed):
    index = write_dictionary(tmp_path, "test-spa-eng", SPANISH, compressed=compressed)
    for named in (index, tmp_path / "test-spa-eng", tmp_path / ("test-spa-eng.dict.dz" if compressed else
                                                                  "test-spa-eng.dict")):
        assert dictionary.locate(str(named)).name == "test-spa-eng"
    entries = dict(dictionary.entries(dictionary.locate(str(index))))
    assert entries == {"domingo": "Sunday", "sabado": "Saturday, sabbath", "abrir": "open",
                       "entrega": "delivery", "hora": "hour, o'clock"}


def test_words_are_tried_as_written_then_without_an_ending():
    assert base_forms("domingos") == ["domingos", "domingo"]
    assert base_forms("postleitzahlen") == ["postleitzahlen", "postleitzahl", "postleitzahle"]
    assert base_forms("sols") == ["sols", "sol"] and base_forms("ses") == ["ses"]  # three letters left at least


@pytest.mark.parametrize("damage, reason", [
    ("no data", "no test-spa-eng.dict or test-spa-eng.dict.dz beside test-spa-eng.index"),
    ("not gzip", "test-spa-eng.dict.dz cannot be read"),
    ("empty data", "test-spa-eng.dict.dz is empty"),
    ("bad index", "test-spa-eng.index line 1: not a dictd index line"),
    ("huge number", "test-spa-eng.index line 1: not a dictd index line"),
    ("past the data", "test-spa-eng.index line 1 points past the end of test-spa-eng.dict.dz"),
    ("not UTF-8", "test-spa-eng.index is not UTF-8"),
    ("a folder", "test-spa-eng.index is not a file"),
])
def test_a_broken_dictionary_is_refused_with_one_line(tmp_path, damage, reason):
    index = write_dictionary(tmp_path, "test-spa-eng", SPANISH)
    data = tmp_path / "test-spa-eng.dict.dz"
    if damage == "no data":
        data.unlink()
    elif damage == "not gzip":
        data.write_bytes(b"plain text, not gzip")
    elif damage == "empty data":
        data.write_bytes(gzip.compress(b""))
    elif damage == "bad index":
        index.write_text("domingo\t*\tB\n" + index.read_text())
    elif damage == "huge number":
        index.write_text("domingo\t" + "A" * 300_000 + "\tB\n" + index.read_text())
    elif damage == "past the data":
        index.write_text("domingo\tBAAAA\tB\n" + index.read_text())
    elif damage == "not UTF-8":
        index.write_bytes("sábado\tA\tB\n".encode("latin-1"))
    else:
        index.unlink()
        index.mkdir()
    with pytest.raises(dictionary.DictionaryError, match=reason):
        list(dictionary.entries(dictionary.locate(str(index))))


def test_a_dictionary_past_its_bounds_is_refused_and_a_long_entry_is_read_from_its_start(tmp_path, monkeypatch):
    index = write_dictionary(tmp_path, "test-spa-eng", {**SPANISH, "largo": "largo\nlong\n" + "x, " * 50_000})
    entries = dict(dictionary.entries(dictionary.locate(str(index))))
    assert entries["largo"].startswith("long, x, x") and len(entries["largo"]) == dictionary.MAX_WORDS_TEXT
    monkeypatch.setattr(dictionary, "MAX_WORDS", 3)
    with pytest.raises(dictionary.DictionaryError, match="has over 3 one-word entries"):
        list(dictionary.entries(dictionary.locate(str(index))))
    monkeypatch.setattr(dictionary, "MAX_DATA_BYTES", 1024)
    with pytest.raises(dictionary.DictionaryError, match="is over 0 MB of text"):
        list(dictionary.entries(dictionary.locate(str(index))))


def test_control_characters_and_overlong_headwords_are_left_out(tmp_path):
    index = write_dictionary(tmp_path, "test-spa-eng", {"nul": "nul\nnull\x00 byte\n", "x" * 65: "x\nlong\n"})
    assert dict(dictionary.entries(dictionary.locate(str(index)))) == {"nul": "null byte"}


def test_a_path_that_cannot_be_a_file_is_one_line():
    with pytest.raises(dictionary.DictionaryError, match="cannot be read .File name too long"):
        dictionary.locate("/tmp/" + "a" * 300 + ".index")


# -- in the store, on both backends ----------------------------------------------------------------

def test_a_dictionary_lets_full_text_answer_a_question_in_another_language(env, backend, docs, tmp_path,
                                                                           no_embeddings):
    _, settings = backend
    settings = {**settings, **no_embeddings[0]}
    kb = knowledge_of(env, **settings)
    other = knowledge_of(env, **settings)  # another process or host on the same store
    kb.add([str(docs / name) for name in ("hours.md", "delivery.md", "faq.csv")])
    question = "¿Abren el sábado y el domingo?"
    assert not any(hit.relevant for hit in other.search(question, env["FB_PAGE_ID"]).hits)

    added = kb.add_dictionary(str(write_dictionary(tmp_path, "test-spa-eng", SPANISH)))
    assert (added.status, added.chunks, added.line()) == ("added", 5, "added     test-spa-eng: 5 words")
    found = other.search(question, env["FB_PAGE_ID"])
    assert found.hits[0].title == "Opening hours" and found.hits[0].relevant
    assert found.hits[0].coverage == 0.667  # sábado → Saturday, domingo → Sunday; no entry for "abren" (abrir's)
    assert other.search("¿Los domingos?", env["FB_PAGE_ID"]).hits[0].title == "Opening hours"  # domingos → domingo
    assert other.search("¿Hay entregas?", env["FB_PAGE_ID"]).hits[0].title == "Delivery"
    # Its little words are English: "domingo" is no Spanish word here, nothing is translated.
    assert not any(hit.relevant for hit in other.search("Do you open on sábado and domingo?", env["FB_PAGE_ID"]).hits)
    # A long message: the words no chunk holds give their places in the query to translations.
    long = "¿" + " ".join(f"zq{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(30)) + " sábado domingo?"
    assert other.search(long, env["FB_PAGE_ID"]).hits[0].title == "Opening hours"
    assert kb.dictionaries() == [("test-spa-eng", 5)]

    again = kb.add_dictionary(str(tmp_path / "test-spa-eng.index"))  # re-read: replaced, not doubled
    assert (again.status, again.chunks) == ("updated", 5) and kb.dictionaries() == [("test-spa-eng", 5)]

    removed = kb.remove_dictionary("test-spa-eng")
    assert (removed.status, removed.chunks) == ("removed", 5)
    assert not any(hit.relevant for hit in other.search(question, env["FB_PAGE_ID"]).hits)
    assert kb.remove_dictionary("test-spa-eng").status == "failed"


def test_two_adds_of_one_dictionary_at_once_both_end_well(env, backend, tmp_path, no_embeddings):
    _, settings = backend
    index = str(write_dictionary(tmp_path, "test-spa-eng", SPANISH))
    kb, other = knowledge_of(env, **settings, **no_embeddings[0]), knowledge_of(env, **settings, **no_embeddings[0])
    for _ in range(3):
        results = []
        threads = [threading.Thread(target=lambda k=k: results.append(k.add_dictionary(index))) for k in (kb, other)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(r.status for r in results) in (["added", "updated"], ["updated", "updated"]), results
        assert kb.dictionaries() == [("test-spa-eng", 5)]


def test_a_broken_dictionary_leaves_the_one_there_before(env, backend, docs, tmp_path, no_embeddings):
    _, settings = backend
    kb = knowledge_of(env, **settings, **no_embeddings[0])
    kb.add([str(docs / "hours.md")])
    good = tmp_path / "good"
    good.mkdir()
    kb.add_dictionary(str(write_dictionary(good, "test-spa-eng", SPANISH)))
    broken = tmp_path / "broken"
    broken.mkdir()
    index = write_dictionary(broken, "test-spa-eng", {**SPANISH, "lunes": "lunes\nMonday\n"})
    index.write_text(index.read_text() + "martes\tnot base64!\tB\n")
    report = kb.add_dictionary(str(index))
    assert report.status == "failed" and "not a dictd index line" in report.reason
    assert kb.dictionaries() == [("test-spa-eng", 5)]  # the earlier copy, whole
    assert kb.search("¿Abren el sábado y el domingo?", env["FB_PAGE_ID"]).hits[0].title == "Opening hours"


# -- the command line and a reply ----------------------------------------------------------------------

def test_the_command_line_adds_lists_and_removes_dictionaries(env, tmp_path, docs, no_embeddings):
    settings = {**env, **no_embeddings[0]}
    index = write_dictionary(tmp_path, "test-spa-eng", SPANISH)
    assert run_cli(settings, "add", str(docs / "hours.md")).returncode == 0
    done = run_cli(settings, "dictionary", "add", str(index), str(tmp_path / "missing.index"))
    assert done.returncode == 1
    assert done.stdout.splitlines() == ["added     test-spa-eng: 5 words"]
    assert done.stderr.splitlines() == [f"failed    {tmp_path / 'missing.index'}: no file missing.index (a "
                                        "dictionary is NAME.index with NAME.dict or NAME.dict.dz beside it)"]
    listed = run_cli(settings, "dictionary", "list")
    assert listed.stdout.splitlines() == ["       5 words  test-spa-eng", "1 dictionary"]
    too_long = run_cli(settings, "dictionary", "add", "/tmp/" + "a" * 300 + ".index")  # an OSError: one line too
    assert too_long.returncode == 1 and too_long.stderr.count("\n") == 1 and "File name too long" in too_long.stderr
    searched = run_cli(settings, "search", "¿Abren el sábado y el domingo?")
    assert searched.stdout.startswith("1. [relevant]") and "Opening hours" in searched.stdout
    assert run_cli(settings, "dictionary", "remove", "test-spa-eng").stdout == "removed   test-spa-eng: 5 words\n"
    assert run_cli(settings, "dictionary", "list").stdout.splitlines() == ["0 dictionaries"]


def test_an_answer_to_a_question_in_another_language_carries_the_excerpt(make_client, env, docs, tmp_path,
                                                                          no_embeddings, graph):
    settings, model = no_embeddings
    kb = knowledge_of(env, **settings)
    kb.add([str(docs / name) for name in ("hours.md", "delivery.md")])
    kb.add_dictionary(str(write_dictionary(tmp_path, "test-spa-eng", SPANISH)))
    client = make_client(KNOWLEDGE_MODE="only", **settings)
    say(client, 1, "¿Abren el sábado y el domingo?")
    [messages] = chat_requests(model)  # relevant by its translated words: asked, not "I don't know"
    assert "On Sundays and public holidays the shop is closed." in excerpts_in(messages)
