"""The knowledge base's excerpts in a chat request, read back: what the offline stand-in answers
from and what the sandbox's side panel shows as its Knowledge block. Pure functions, no I/O.

The system message is bot/knowledge/prompt.py's: a header, then "[n] <title> (<source>)" and the
excerpt's text, excerpts a blank line apart, numbered from 1.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

EXCERPTS_START = "Excerpts from"
EXCERPT_LABEL = re.compile(r"^\[(\d+)\] (.*)$")


@dataclass(frozen=True)
class Excerpt:
    number: int
    title: str
    source: str  # the label's file name or URL ("" when it has none)
    text: str


def _text(content) -> str:
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content if isinstance(content, str) else ""


def excerpts_at(messages: list) -> int | None:
    """The index of the system message that carries the excerpts; None without one."""
    return next((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "system"
                 and _text(m.get("content")).startswith(EXCERPTS_START)), None)


def read_excerpts(message: str) -> tuple[str, list[Excerpt]]:
    """The header and the excerpts of the knowledge base's system message. A label line starts the
    next excerpt only after a blank line and with the next number: a document may hold "[2] …" too."""
    lines = message.splitlines()
    starts = []
    for i, line in enumerate(lines):
        found = EXCERPT_LABEL.match(line)
        if found and int(found.group(1)) == len(starts) + 1 and (i == 0 or not lines[i - 1].strip()):
            starts.append(i)
    header = "\n".join(lines[:starts[0]] if starts else lines).strip()
    found = []
    for number, (start, end) in enumerate(zip(starts, starts[1:] + [len(lines)]), start=1):
        title, source = split_label(EXCERPT_LABEL.match(lines[start]).group(2))
        found.append(Excerpt(number, title, source, "\n".join(lines[start + 1:end]).strip()))
    return header, found


def split_label(label: str) -> tuple[str, str]:
    """ "Faq (faq.csv)" -> ("Faq", "faq.csv"); a label without "(source)" is all title."""
    title, _, source = label.rpartition(" (")
    return (title, source[:-1]) if title and source.endswith(")") else (label, "")


def knowledge_of(messages) -> dict | None:
    """What the timeline's model event keeps of the excerpts: which message carries them, its
    header and each excerpt (number, title, source, text); None when the request has none."""
    at = excerpts_at(messages) if isinstance(messages, list) else None
    if at is None:
        return None
    header, found = read_excerpts(_text(messages[at]["content"]))
    return {"at": at, "header": header, "excerpts": [asdict(excerpt) for excerpt in found]}
