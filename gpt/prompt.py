"""Conversation history to chat messages: a pure function, no I/O."""
from __future__ import annotations

from typing import Protocol, Sequence

ChatMessage = dict[str, str]


class HistoryItem(Protocol):
    mid: str
    text: str
    from_id: str


def to_chat_messages(
    history: Sequence[HistoryItem],
    text: str,
    *,
    mid: str | None,
    page_id: str,
    prefix: str,
    max_turns: int,
    system_prompt: str = "",
) -> list[ChatMessage]:
    """Role-tagged turns, oldest first, ending with the prefixed user turn.

    `history` is newest first, as the Conversations API returns it. When it
    already holds the message being answered (same mid), that message and
    anything newer are left out, so the question is never asked twice; when
    Messenger has not indexed it yet, the whole history is kept - including
    the Page's last reply, which the source guide's `messages[-1] = ...` dropped.
    """
    older = _before(history, mid)
    turns = [
        {"role": "assistant" if item.from_id == page_id else "user", "content": item.text}
        for item in reversed(older)
        if item.text.strip()
    ]
    turns = turns[-(max_turns - 1):] if max_turns > 1 else []
    turns.append({"role": "user", "content": prefix + text})
    if system_prompt.strip():
        turns.insert(0, {"role": "system", "content": system_prompt})
    return turns


def _before(history: Sequence[HistoryItem], mid: str | None) -> Sequence[HistoryItem]:
    """The messages older than `mid` (all of them when `mid` is not there yet)."""
    if mid:
        for index, item in enumerate(history):
            if item.mid == mid:
                return history[index + 1:]
    return history
