"""Bilingual dictionaries for full-text search in other languages: a question in Spanish finds
the English document ("domingos" → "Sunday") when the model server has no embeddings.

A dictionary is a dictd one (`name.index` and `name.dict` or `name.dict.dz`), the format of
FreeDict's, which Debian packages as dict-freedict-spa-eng, -deu-eng, -fra-eng and many more.
`python -m bot knowledge dictionary add /usr/share/dictd/freedict-spa-eng.index` reads it once
into the store (bot/knowledge/store.py), where every process and host looks words up: a
question's word the knowledge base holds nowhere is looked up, then the same word without a
plural or inflection ending, and the translations the knowledge base holds take its place in
the full-text query (bot/knowledge/retrieval.py) - unless the question's little words are English.

Only what a search can use is kept: one-word headwords, folded as questions are (lower case, no
accents), and the words of their first senses - no pronunciations, grammar labels, usage
examples or cross-references.
"""
from __future__ import annotations

import gzip
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from bot.knowledge.retrieval import fold

SENSES = 3  # translation lines kept per entry: the first are the common meanings
MAX_WORDS_TEXT = 200  # characters of translations kept per word
# Bounds, far above FreeDict's largest (German-English: 13 MB of index, 519,000 lines, entries
# of a few KB, ~100 MB of text), so a damaged or hostile file costs seconds and megabytes, not
# minutes and gigabytes - and SQLite's write lock is held a few seconds at most.
MAX_DATA_BYTES = 512 * 1024 * 1024  # the dictionary's text, uncompressed
MAX_INDEX_BYTES = 128 * 1024 * 1024
MAX_ENTRY_BYTES = 16 * 1024  # of one entry, read from its start: the senses come first
MAX_WORDS = 1_000_000  # one-word headwords kept
MAX_WORD_CHARS = 64  # a longer headword is never a question's word
MAX_NUMBER_DIGITS = 11  # base64 digits of an offset or a length (2^66)
BASE64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}
ONE_WORD = re.compile(r"\w+")
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # PostgreSQL stores no NUL; none belongs in a word
# In an entry's lines: <grammar>, [domain], (notes), {cross-references}; "1." sense numbers.
LABELS = re.compile(r"<[^>]*>|\[[^\]]*\]|\([^)]*\)|\{[^}]*\}|^\s*\d+\.\s*")
HOW = "a dictionary is NAME.index with NAME.dict or NAME.dict.dz beside it"


class DictionaryError(Exception):
    """The dictionary cannot be read: one line saying why."""


@dataclass(frozen=True)
class Dictionary:
    name: str  # the file name without .index: freedict-spa-eng
    index: Path
    data: Path


def locate(path: str) -> Dictionary:
    """The dictionary a path names: its .index, its .dict(.dz), or the two's common name."""
    given = Path(path)
    base = given.name
    for suffix in (".index", ".dict.dz", ".dict"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    try:
        folder = given.parent
        index = folder / f"{base}.index"
        data = next((candidate for candidate in (folder / f"{base}.dict.dz", folder / f"{base}.dict")
                     if candidate.is_file()), None)
        if not index.is_file():
            raise DictionaryError(f"no file {index.name} ({HOW})" if not index.exists() else
                                  f"{index.name} is not a file ({HOW})")
    except OSError as error:  # a name too long, a folder that cannot be read
        raise DictionaryError(f"cannot be read ({error.strerror or error})") from None
    if data is None:
        raise DictionaryError(f"no {base}.dict or {base}.dict.dz beside {index.name}")
    return Dictionary(base, index, data)


def entries(dictionary: Dictionary) -> Iterator[tuple[str, str]]:
    """(folded one-word headword, its translations as text), once per headword."""
    merged: dict[str, list[str]] = {}
    name = dictionary.index.name
    try:
        if dictionary.index.stat().st_size > MAX_INDEX_BYTES:  # before the text is decompressed
            raise DictionaryError(f"{name} is over {MAX_INDEX_BYTES // 2**20} MB")
        text = _data(dictionary)
        with open(dictionary.index, encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                fields = line.rstrip("\n").split("\t")
                if len(fields) < 3 or fields[0].startswith("00"):  # 00-database-info and the like
                    continue
                word = CONTROL.sub("", fold(fields[0])).strip()
                start, length = _number(fields[1], name, number), _number(fields[2], name, number)
                if start + length > len(text):
                    raise DictionaryError(f"{name} line {number} points past the end of {dictionary.data.name}: "
                                          "the two files do not belong together")
                if len(word) > MAX_WORD_CHARS or not ONE_WORD.fullmatch(word) or word.isdigit():
                    continue
                senses = _senses(text[start:start + min(length, MAX_ENTRY_BYTES)].decode("utf-8", "replace"))
                if not senses:
                    continue
                kept = merged.setdefault(word, [])
                if not kept and len(merged) > MAX_WORDS:
                    raise DictionaryError(f"{name} has over {MAX_WORDS:,} one-word entries")
                if sum(map(len, kept)) < MAX_WORDS_TEXT:
                    kept.extend(senses)
    except UnicodeDecodeError as error:
        raise DictionaryError(f"{name} is not UTF-8 ({error.reason})") from None
    except OSError as error:
        raise DictionaryError(f"{name} cannot be read ({error.strerror or error})") from None
    for word, senses in merged.items():
        yield word, ", ".join(dict.fromkeys(senses))[:MAX_WORDS_TEXT]


def _data(dictionary: Dictionary) -> bytes:
    """The whole text: a .dict.dz is gzip (dictzip adds an index of its own that we do not need)."""
    try:
        if dictionary.data.suffix == ".dz":
            with gzip.open(dictionary.data) as file:
                data = file.read(MAX_DATA_BYTES + 1)
        else:
            with open(dictionary.data, "rb") as file:
                data = file.read(MAX_DATA_BYTES + 1)
    except (OSError, EOFError, zlib.error) as error:
        raise DictionaryError(f"{dictionary.data.name} cannot be read ({error})") from None
    if len(data) > MAX_DATA_BYTES:
        raise DictionaryError(f"{dictionary.data.name} is over {MAX_DATA_BYTES // 2**20} MB of text")
    if not data:
        raise DictionaryError(f"{dictionary.data.name} is empty")
    return data


def _number(text: str, name: str, line: int) -> int:
    if not text or len(text) > MAX_NUMBER_DIGITS:
        raise DictionaryError(f"{name} line {line}: not a dictd index line")
    value = 0
    for char in text:
        digit = BASE64.get(char)
        if digit is None:
            raise DictionaryError(f"{name} line {line}: not a dictd index line")
        value = value * 64 + digit
    return value


def _senses(entry: str) -> list[str]:
    """The first SENSES translation lines of an entry, without labels; the headword line, usage
    examples ("..."  - ...), notes and cross-references left out."""
    senses = []
    for line in CONTROL.sub("", entry).split("\n")[1:]:
        line = line.strip()
        if not line or line[0] == '"' or line.lower().startswith(("see:", "synonym", "note:", "antonym")):
            continue
        cleaned = re.sub(r" ([,;])", r"\1", " ".join(LABELS.sub(" ", line).split())).strip(" ,;")
        if cleaned:
            senses.append(cleaned[:MAX_WORDS_TEXT])
            if len(senses) == SENSES:
                break
    return senses
