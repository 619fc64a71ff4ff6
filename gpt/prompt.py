"""Conversation history to chat messages: a pure function, no I/O."""
from __future__ import annotations

from typing import Any, Protocol, Sequence

ChatMessage = dict[str, Any]  # content: a str, or a list of parts when photos go with the turn


class HistoryItem(Protocol):
    mid: str
    text: str
    from_id: str


def to_chat_messages(
    history: Sequence[HistoryItem],
    new: Sequence[tuple[str | None, str]],
    *,
    page_id: str,
    prefix: str,
    max_turns: int,
    system_prompt: str = "",
    images: Sequence[str] = (),
) -> list[ChatMessage]:
    """Role-tagged turns, oldest first, ending with the prefixed user turn.

    `history` is newest first, as the Conversations API returns it; `new` is
    the (mid, text) of the message(s) being answered, oldest first - several
    when a user wrote again before the bot could answer. When history already
    holds them (same mid), they and anything newer are left out, so nothing is
    asked twice; when Messenger has not indexed them yet, the whole history is
    kept - including the Page's last reply, which the source guide's
    `messages[-1] = ...` dropped. `images` (data URLs) go with the last turn, as
    content parts after its text.
    """
    older = _before(history, {mid for mid, _ in new if mid})
    turns = [
        {"role": "assistant" if item.from_id == page_id else "user", "content": item.text}
        for item in reversed(older)
        if item.text.strip()
    ]
    *earlier, (_, last) = new
    turns += [{"role": "user", "content": text} for _, text in earlier if text.strip()]
    turns = turns[-(max_turns - 1):] if max_turns > 1 else []
    turns.append({"role": "user", "content": _with_images(prefix + last, images)})
    if system_prompt.strip():
        turns.insert(0, {"role": "system", "content": system_prompt})
    return turns


def _with_images(text: str, images: Sequence[str]) -> str | list[dict]:
    if not images:
        return text
    return [{"type": "text", "text": text}, *({"type": "image_url", "image_url": {"url": url}} for url in images)]


def _before(history: Sequence[HistoryItem], mids: set[str]) -> Sequence[HistoryItem]:
    """The messages older than the oldest of `mids` (all of them when none is there yet)."""
    for index in range(len(history) - 1, -1, -1):
        if history[index].mid in mids:
            return history[index + 1:]
    return history
