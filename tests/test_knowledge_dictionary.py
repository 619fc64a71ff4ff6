"""Bilingual dictionaries: full text answers a question in another language from the English
documents, on both backends, through the command line and in a reply; a broken dictionary is
refused with one line and leaves what was there."""
from __future__ import annotations

import gzip

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
    ("no data", "no test-spa-eng.dict or test-spa-eng.dict.dz"),
    ("not gzip", "cannot be read"),
    ("bad index", "line 1: not a dictd index line"),
])
def test_a_broken_dictionary_is_refused_with_one_line(tmp_path, damage, reason):
    index = write_dictionary(tmp_path, "test-spa-eng", SPANISH)
    if damage == "no data":
        (tmp_path / "test-spa-eng.dict.dz").unlink()
    elif damage == "not gzip":
        (tmp_path / "test-spa-eng.dict.dz").write_bytes(b"plain text, not gzip")
    else:
        index.write_text("domingo\t*\tB\n" + index.read_text())
    with pytest.raises(dictionary.DictionaryError, match=reason):
        list(dictionary.entries(dictionary.locate(str(index))))


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

    [added] = [kb.add_dictionary(str(write_dictionary(tmp_path, "test-spa-eng", SPANISH)))]
    assert (added.status, added.chunks, added.line()) == ("added", 5, "added     test-spa-eng: 5 words")
    found = other.search(question, env["FB_PAGE_ID"])
    assert found.hits[0].title == "Opening hours" and found.hits[0].relevant
    assert found.hits[0].coverage == 0.667  # sábado → Saturday, domingo → Sunday; no entry for "abren" (abrir's)
    assert other.search("¿Los domingos?", env["FB_PAGE_ID"]).hits[0].title == "Opening hours"  # domingos → domingo
    assert other.search("¿Hay entregas?", env["FB_PAGE_ID"]).hits[0].title == "Delivery"
    # A word the documents hold is not translated: "hora" stays "hora" where the text has it.
    assert kb.dictionaries() == [("test-spa-eng", 5)]

    [again] = [kb.add_dictionary(str(tmp_path / "test-spa-eng.index"))]  # re-read: replaced, not doubled
    assert (again.status, again.chunks) == ("updated", 5) and kb.dictionaries() == [("test-spa-eng", 5)]

    [removed] = [kb.remove_dictionary("test-spa-eng")]
    assert (removed.status, removed.chunks) == ("removed", 5)
    assert not any(hit.relevant for hit in other.search(question, env["FB_PAGE_ID"]).hits)
    assert kb.remove_dictionary("test-spa-eng").status == "failed"


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
    assert done.stderr.splitlines() == [f"failed    {tmp_path / 'missing.index'}: no dictd index "
                                        f"{tmp_path / 'missing.index'} (a dictionary is NAME.index with NAME.dict "
                                        "or NAME.dict.dz)"]
    listed = run_cli(settings, "dictionary", "list")
    assert listed.stdout.splitlines() == ["       5 words  test-spa-eng", "1 dictionary"]
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
