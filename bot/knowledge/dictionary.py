"""Bilingual dictionaries for full-text search in other languages: a question in Spanish finds
the English document ("domingos" → "Sunday") when the model server has no embeddings.

A dictionary is a dictd one (`name.index` and `name.dict` or `name.dict.dz`), the format of
FreeDict's, which Debian packages as dict-freedict-spa-eng, -deu-eng, -fra-eng and many more.
`python -m bot knowledge dictionary add /usr/share/dictd/freedict-spa-eng.index` reads it once
into the store (bot/knowledge/store.py), where every process and host looks words up: a
question's word the knowledge base holds nowhere is looked up, then the same word without a
plural or inflection ending, and the translations the knowledge base holds join the full-text
query (bot/knowledge/retrieval.py).

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
MAX_DATA_BYTES = 512 * 1024 * 1024  # a dictionary's text, uncompressed (FreeDict's largest: ~100 MB)
BASE64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}
ONE_WORD = re.compile(r"\w+")
# In an entry's lines: <grammar>, [domain], (notes), {cross-references}; "1." sense numbers.
LABELS = re.compile(r"<[^>]*>|\[[^\]]*\]|\([^)]*\)|\{[^}]*\}|^\s*\d+\.\s*")


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
    folder = given.parent
    index = folder / f"{base}.index"
    data = next((candidate for candidate in (folder / f"{base}.dict.dz", folder / f"{base}.dict")
                 if candidate.is_file()), None)
    if not index.is_file():
        raise DictionaryError(f"no dictd index {index} (a dictionary is NAME.index with NAME.dict or NAME.dict.dz)")
    if data is None:
        raise DictionaryError(f"no {base}.dict or {base}.dict.dz next to {index}")
    return Dictionary(base, index, data)


def entries(dictionary: Dictionary) -> Iterator[tuple[str, str]]:
    """(folded one-word headword, its translations as text), once per headword."""
    text = _data(dictionary)
    merged: dict[str, list[str]] = {}
    try:
        with open(dictionary.index, encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                fields = line.rstrip("\n").split("\t")
                if len(fields) < 3 or fields[0].startswith("00"):  # 00-database-info and the like
                    continue
                word = fold(fields[0]).strip()
                if not ONE_WORD.fullmatch(word) or word.isdigit():
                    continue
                try:
                    start, length = _number(fields[1]), _number(fields[2])
                except KeyError:
                    raise DictionaryError(f"{dictionary.index}, line {number}: not a dictd index line") from None
                senses = _senses(text[start:start + length].decode("utf-8", "replace"))
                if senses:
                    merged.setdefault(word, []).extend(senses)
    except UnicodeDecodeError as error:
        raise DictionaryError(f"{dictionary.index}: not UTF-8 ({error.reason})") from None
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
        raise DictionaryError(f"{dictionary.data}: cannot be read ({error})") from None
    if len(data) > MAX_DATA_BYTES:
        raise DictionaryError(f"{dictionary.data}: over {MAX_DATA_BYTES // 2**20} MB of text")
    return data


def _number(text: str) -> int:
    value = 0
    for char in text:
        value = value * 64 + BASE64[char]
    return value


def _senses(entry: str) -> list[str]:
    """The first SENSES translation lines of an entry, without labels; the headword line, usage
    examples ("..."  - ...), notes and cross-references left out."""
    senses = []
    for line in entry.split("\n")[1:]:
        line = line.strip()
        if not line or line[0] == '"' or line.lower().startswith(("see:", "synonym", "note:", "antonym")):
            continue
        cleaned = re.sub(r" ([,;])", r"\1", " ".join(LABELS.sub(" ", line).split())).strip(" ,;")
        if cleaned:
            senses.append(cleaned)
            if len(senses) == SENSES:
                break
    return senses

