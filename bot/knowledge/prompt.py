"""What the knowledge base puts into a prompt and an answer: pure functions, no I/O."""
from __future__ import annotations

from typing import Sequence

from bot.knowledge.retrieval import Hit

SHORT_QUESTION_WORDS = 6  # a message this short is likely a follow-up: the user's turn before joins the query
HEADER = ("Excerpts from {page}'s own documents, most relevant first. Answer from them; if they do not answer"
          " the question, say you do not know rather than guess.")


def question(new_texts: Sequence[str], earlier_user_texts: Sequence[str]) -> str:
    """The search query: what the user just wrote, and - when that is short, as a follow-up is
    ("and on Sundays?") - the user's message before it. `earlier_user_texts`: newest first."""
    asked = " ".join(text.strip() for text in new_texts if text.strip())
    if len(asked.split()) < SHORT_QUESTION_WORDS:
        before = next((text.strip() for text in earlier_user_texts if text.strip()), "")
        asked = f"{before} {asked}".strip()
    return asked


def tokens(text: str) -> int:
    """A token estimate that needs no tokenizer: about four characters each in English."""
    return (len(text) + 3) // 4


def within_budget(hits: Sequence[Hit], max_tokens: int) -> list[Hit]:
    """The best hits whose text fits `max_tokens` together (the first always, cut if it must be)."""
    chosen, spent = [], 0
    for hit in hits:
        cost = tokens(hit.text) + 12  # its label line
        if chosen and spent + cost > max_tokens:
            break
        chosen.append(hit)
        spent += cost
    return chosen


def message(hits: Sequence[Hit], page: str, max_tokens: int) -> str:
    """The system message that carries the excerpts, each labelled with its source."""
    parts = [HEADER.format(page=page or "the business")]
    for number, hit in enumerate(hits, start=1):
        text = hit.text if tokens(hit.text) <= max_tokens else hit.text[: max_tokens * 4].rsplit(" ", 1)[0] + " \u2026"
        parts.append(f"[{number}] {hit.label()}\n{text}")
    return "\n\n".join(parts)


def with_excerpts(chat: list[dict], excerpts: str) -> list[dict]:
    """The chat messages with the excerpts right after the system prompt (or first, without one)."""
    at = 1 if chat and chat[0].get("role") == "system" else 0
    return chat[:at] + [{"role": "system", "content": excerpts}] + chat[at:]


def citation(hit: Hit) -> str:
    """KNOWLEDGE_CITE's line under the answer: the source's title, and its URL when it has one."""
    return f"Source: {hit.title}" + (f" \u2013 {hit.url}" if hit.url else "")
