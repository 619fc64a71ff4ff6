"""Parse a webhook delivery once into small frozen records.

Meta documents one event per `messaging` array and one entry per POST, but
real deliveries batch both, so every entry and every event is read.
https://developers.facebook.com/docs/messenger-platform/webhooks
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TEXT = "text"
POSTBACK = "postback"
ATTACHMENT = "attachment"


class BadPayload(ValueError):
    """The body is not a Messenger delivery; the message says why, briefly."""


@dataclass(frozen=True)
class IncomingMessage:
    """Something a user said to the Page that deserves an answer."""

    psid: str
    page_id: str
    mid: str | None
    kind: str  # TEXT, POSTBACK or ATTACHMENT
    text: str
    timestamp_ms: int
    attachment_types: tuple[str, ...] = ()

    @property
    def is_attachment_only(self) -> bool:
        return self.kind == ATTACHMENT


@dataclass(frozen=True)
class Echo:
    """A message the Page sent (message_echoes): the bot's own reply, or a person in the inbox."""

    psid: str  # the user it went to
    mid: str
    text: str
    timestamp_ms: int
    app_id: str | None  # the app that sent it; absent for some inbox tools
    metadata: str | None  # what the sender put in `message.metadata`


@dataclass(frozen=True)
class Delivery:
    """One parsed POST: the messages to answer, the Page's echoes, how many events were ignored."""

    messages: tuple[IncomingMessage, ...]
    ignored: int
    echoes: tuple[Echo, ...] = ()


def parse_delivery(payload: Any) -> Delivery:
    """Turn a decoded webhook body into a Delivery, or raise BadPayload."""
    if not isinstance(payload, dict):
        raise BadPayload("body must be a JSON object")
    if payload.get("object") != "page":
        raise BadPayload("object must be 'page'")
    entries = _list_of_objects(payload.get("entry"), "entry")
    messages: list[IncomingMessage] = []
    echoes: list[Echo] = []
    ignored = 0
    for entry in entries:
        # `standby` events belong to a thread another app owns: watch, never answer.
        ignored += len(_list_of_objects(entry.get("standby", []), "standby"))
        for event in _list_of_objects(entry.get("messaging", []), "messaging"):
            message = to_incoming_message(event)
            if message is not None:
                messages.append(message)
                continue
            ignored += 1  # not to answer; an echo is still worth knowing about
            echo = to_echo(event)
            if echo is not None:
                echoes.append(echo)
    return Delivery(tuple(messages), ignored, tuple(echoes))


def to_echo(event: dict) -> Echo | None:
    """The Page's own message in an echo event, or None for any other event."""
    body = event.get("message")
    if not isinstance(body, dict) or not is_echo(body):
        return None
    app_id, metadata = body.get("app_id"), body.get("metadata")
    return Echo(
        psid=_recipient(event), mid=_mid(body, required=True), text=str(body.get("text") or ""),
        timestamp_ms=to_timestamp_ms(event.get("timestamp")),
        app_id=None if app_id is None else str(app_id), metadata=metadata if isinstance(metadata, str) else None,
    )


def to_incoming_message(event: dict) -> IncomingMessage | None:
    """The message to answer in one `messaging` event, or None for events we only watch."""
    if "message" in event:
        body = _object(event["message"], "message")
        if is_echo(body):
            return None
        return _from_message(event, body)
    if "postback" in event:
        return _from_postback(event, _object(event["postback"], "postback"))
    return None  # delivery, read, reaction, referral, optin, handover...


def is_echo(message: dict) -> bool:
    """A message the Page itself sent (the bot's own reply or a human in the inbox)."""
    return bool(message.get("is_echo"))


def _from_message(event: dict, body: dict) -> IncomingMessage | None:
    text = body.get("text")
    attachments = body.get("attachments", [])
    if not isinstance(attachments, list):
        raise BadPayload("message.attachments must be a list")
    types = tuple(str(a.get("type", "unknown")) for a in attachments if isinstance(a, dict))
    if isinstance(text, str) and text.strip():
        kind = TEXT  # quick replies too: their text is the button's title
    elif types:
        kind, text = ATTACHMENT, ""
    else:
        return None  # nothing we can answer (e.g. an empty or unknown message)
    return IncomingMessage(
        psid=_sender(event), page_id=_recipient(event), mid=_mid(body, required=True),
        kind=kind, text=text, timestamp_ms=to_timestamp_ms(event.get("timestamp")),
        attachment_types=types,
    )


def _from_postback(event: dict, body: dict) -> IncomingMessage | None:
    title = body.get("title")
    if not isinstance(title, str) or not title.strip():
        return None
    return IncomingMessage(
        psid=_sender(event), page_id=_recipient(event), mid=_mid(body, required=False),
        kind=POSTBACK, text=title, timestamp_ms=to_timestamp_ms(event.get("timestamp")),
    )


def to_timestamp_ms(value: Any) -> int:
    """Event time in ms; some deliveries carry seconds (values below 1e12)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0
    return int(value * 1000) if value < 1e12 else int(value)


def _mid(body: dict, required: bool) -> str | None:
    mid = body.get("mid")
    if isinstance(mid, str) and mid:
        return mid
    if required:
        raise BadPayload("message.mid is missing")
    return None


def _sender(event: dict) -> str:
    return _id_of(event.get("sender"), "sender")


def _recipient(event: dict) -> str:
    return _id_of(event.get("recipient"), "recipient")


def _id_of(party: Any, name: str) -> str:
    if not isinstance(party, dict) or not isinstance(party.get("id"), (str, int)) or party.get("id") == "":
        raise BadPayload(f"{name}.id is missing")
    return str(party["id"])


def _object(value: Any, name: str) -> dict:
    if not isinstance(value, dict):
        raise BadPayload(f"{name} must be an object")
    return value


def _list_of_objects(value: Any, name: str) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise BadPayload(f"{name} must be a list of objects")
    return value
