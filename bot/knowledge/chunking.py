"""Text into chunks a prompt can carry: pure functions, no I/O.

A chunk follows the document's own structure: a Markdown heading starts a new section, a
section is cut between paragraphs, and a paragraph longer than a chunk between sentences.
When a section needs several chunks, each carries the last paragraph (up to OVERLAP
characters) of the one before, so a fact that straddles the cut is whole in one of them.
Each chunk keeps its heading path ("Title › Section › Subsection") and its position.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

MAX_CHARS = 900  # about 225 tokens: four of them fit KNOWLEDGE_MAX_TOKENS' default with room
OVERLAP = 200
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Chunk:
    heading: str  # the heading path, the source's title first
    text: str
    position: int  # 0, 1, 2... in the source


def chunk_markdown(text: str, title: str, max_chars: int = MAX_CHARS, overlap: int = OVERLAP) -> list[Chunk]:
    """Markdown (or plain text: one section under the title) as chunks."""
    chunks: list[Chunk] = []
    for path, body in _sections(text, title):
        for piece in _pack(_paragraphs(body, max_chars), max_chars, overlap):
            chunks.append(Chunk(" \u203a ".join(path), piece, len(chunks)))
    return chunks


def chunk_pairs(pairs: list[tuple[str, str]], title: str) -> list[Chunk]:
    """A FAQ: one question and its answer, one chunk (never cut: an answer without its question
    is found by nothing)."""
    return [Chunk(f"{title} \u203a {q}", f"Q: {q}\nA: {a}", i) for i, (q, a) in enumerate(pairs)]


def _sections(text: str, title: str) -> list[tuple[list[str], str]]:
    """(heading path, body) of each section; a first `#` heading equal to the title is not repeated."""
    sections: list[tuple[list[str], str]] = []
    path: list[tuple[int, str]] = []
    body: list[str] = []
    in_code = False

    def close() -> None:
        if "\n".join(body).strip():
            names = [title] + [name for _, name in path if name != title]
            sections.append((names, "\n".join(body)))
        body.clear()

    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        heading = None if in_code else HEADING.match(line)
        if heading:
            close()
            level = len(heading.group(1))
            path = [(lvl, name) for lvl, name in path if lvl < level] + [(level, heading.group(2).strip())]
        else:
            body.append(line)
    close()
    return sections


def _paragraphs(body: str, max_chars: int) -> list[str]:
    """Paragraphs (blank-line separated; a list stays one paragraph), each at most max_chars."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", body):
        block = "\n".join(line.rstrip() for line in block.strip().splitlines())
        if not block:
            continue
        while len(block) > max_chars:
            cut = _cut(block, max_chars)
            paragraphs.append(block[:cut].strip())
            block = block[cut:].strip()
        if block:
            paragraphs.append(block)
    return paragraphs


def _cut(text: str, limit: int) -> int:
    """Where to cut a long paragraph: the last sentence end, else line break, else space before the limit."""
    window = text[:limit]
    ends = [m.start() for m in SENTENCE_END.finditer(window)]
    if ends and ends[-1] > limit // 3:
        return ends[-1]
    for mark in ("\n", " "):
        at = window.rfind(mark)
        if at > limit // 3:
            return at
    return limit


def _pack(paragraphs: list[str], max_chars: int, overlap: int) -> list[str]:
    """Paragraphs into pieces of at most max_chars, the previous piece's last paragraph repeated
    at the start of the next when it is short enough."""
    pieces: list[list[str]] = []
    for paragraph in paragraphs:
        current = pieces[-1] if pieces else None
        if current is not None and len("\n\n".join(current + [paragraph])) <= max_chars:
            current.append(paragraph)
            continue
        carried = [current[-1]] if current and len(current) > 1 and len(current[-1]) <= overlap else []
        if carried and len("\n\n".join(carried + [paragraph])) > max_chars:
            carried = []
        pieces.append(carried + [paragraph])
    return ["\n\n".join(piece) for piece in pieces]
