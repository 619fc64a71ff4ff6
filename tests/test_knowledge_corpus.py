"""The example knowledge base (examples/knowledge/) and its questions agree: every question names
a document that exists, and its fact is in that document and in no other, so "the source that
answers it" is never a matter of opinion. bench/knowledge.py measures retrieval against them."""
from __future__ import annotations

import html
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

from bot.knowledge import readers

CORPUS = Path(__file__).resolve().parent.parent / "examples" / "knowledge"
READABLE = {".md", ".txt", ".html", ".csv", ".yaml"}
KINDS = {"exact", "paraphrase", "other-language"}
QUESTIONS = yaml.safe_load((CORPUS / "questions.yaml").read_text(encoding="utf-8"))
DOCUMENTS = sorted(path for path in (CORPUS / "anas-bakery").rglob("*") if path.is_file())


def to_plain(text: str) -> str:
    """Markup and line breaks out of the way: a fact may wrap, or sit inside a tag."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", text)).split())


PLAIN = {path.relative_to(CORPUS).as_posix(): to_plain(path.read_text(encoding="utf-8")) for path in DOCUMENTS}


def test_the_corpus_is_about_fifty_small_documents_of_the_kinds_the_bot_reads():
    suffixes = Counter(path.suffix for path in DOCUMENTS)
    assert 45 <= len(DOCUMENTS) <= 60
    assert set(suffixes) <= READABLE and suffixes[".html"] >= 2 and suffixes[".txt"] >= 2
    assert suffixes[".csv"] == 1 and suffixes[".yaml"] == 1
    assert max(path.stat().st_size for path in DOCUMENTS) < 4096


def test_about_a_hundred_questions_of_each_kind():
    kinds = Counter(question["kind"] for question in QUESTIONS)
    assert 95 <= len(QUESTIONS) <= 110 and set(kinds) == KINDS
    assert kinds["paraphrase"] >= 30 and kinds["other-language"] >= 12
    assert {q["language"] for q in QUESTIONS if q["kind"] == "other-language"} >= {"es", "de", "fr"}
    assert all(q["language"] == "en" for q in QUESTIONS if q["kind"] != "other-language")
    assert len({q["question"] for q in QUESTIONS}) == len(QUESTIONS)


@pytest.mark.parametrize("question", QUESTIONS, ids=[q["question"][:40] for q in QUESTIONS])
def test_the_fact_is_in_its_source_and_nowhere_else(question):
    assert set(question) == {"question", "source", "fact", "kind", "language"}
    assert question["source"] in PLAIN, "no such document"
    holding = [name for name, text in PLAIN.items() if to_plain(question["fact"]) in text]
    assert holding == [question["source"]]


def test_the_faq_files_are_question_and_answer_pairs():
    faq_csv = (CORPUS / "anas-bakery" / "faq" / "general-faq.csv").read_text(encoding="utf-8")
    assert faq_csv.splitlines()[0] == "question,answer"
    pairs = yaml.safe_load((CORPUS / "anas-bakery" / "faq" / "orders-faq.yaml").read_text(encoding="utf-8"))
    assert pairs and all(set(pair) == {"question", "answer"} for pair in pairs)


@pytest.mark.parametrize("name", sorted({q["source"] for q in QUESTIONS}))
def test_the_bot_reads_each_fact_into_one_chunk(name):
    """What the bot's reader makes of the document still holds each of its facts whole."""
    document = readers.read(str(CORPUS / name), readers.Limits())
    chunks = [to_plain(chunk.text) for chunk in document.chunks]
    for question in (q for q in QUESTIONS if q["source"] == name):
        assert any(to_plain(question["fact"]) in chunk for chunk in chunks), question["fact"]
