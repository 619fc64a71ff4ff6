"""Messenger and Instagram: one Messenger Platform, two sets of limits.

Instagram accounts linked to a Page arrive as `"object": "instagram"` webhooks and answer
through the same Send API with that Page's token; their texts are shorter.
https://developers.facebook.com/docs/messenger-platform/instagram/features/send-message
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


def utf16_length(text: str) -> int:
    """Length in UTF-16 code units: the safe reading of Messenger's 2,000 (an emoji counts 2)."""
    return len(text.encode("utf-16-le")) // 2


def utf8_length(text: str) -> int:
    """Instagram's docs say both "less than 1000 characters" and "1000 bytes or less": bytes is the safe one."""
    return len(text.encode("utf-8"))


@dataclass(frozen=True)
class Platform:
    name: str  # the Conversations API's `platform`, the exchange log's channel
    webhook_object: str  # the webhook body's `object`
    max_text: int  # one Send API text, measured by `measure`
    measure: Callable[[str], int]


MESSENGER = Platform("messenger", "page", 2000, utf16_length)
INSTAGRAM = Platform("instagram", "instagram", 1000, utf8_length)
BY_OBJECT = {p.webhook_object: p for p in (MESSENGER, INSTAGRAM)}
BY_NAME = {p.name: p for p in (MESSENGER, INSTAGRAM)}
