"""Parse a webhook delivery once into small frozen records.

Meta documents one event per `messaging` array and one entry per POST, but
real deliveries batch both, so every entry and every event is read.
https://developers.facebook.com/docs/messenger-platform/webhooks

Everything here is validated at the edge: a body that is not a delivery is
BadPayload (the webhook answers 400); an event that is malformed (no sender id,
no mid) or whose ids could not be stored or logged safely is skipped and counted,
so one bad event never costs the batch - Meta would retry the whole POST and the
good messages in it would be lost with the bad one. A body whose every event is
malformed is BadPayload.
"""
from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Collection

from messenger.attachments import Attachment, parse_attachments
from messenger import nesting
from messenger.text import clean_text, preview

logger = logging.getLogger(__name__)

TEXT = "text"
POSTBACK = "postback"
ATTACHMENT = "attachment"

MAX_ID_CHARS = 64  # PSIDs, Page and app ids: about 15-20 digits
# Messenger mids run to ~90 characters, Instagram's to ~170: room to spare, still bounded.
MAX_MID_CHARS = 512
# Control characters (Unicode category Cc) and surrogates: an id holding one would
# forge log lines or break every later UTF-8 write.
UNSAFE_ID_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
EARLIEST_MS = 1_072_915_200_000  # 2004-01-01T00:00:00Z: older than Facebook itself
MAX_CLOCK_SKEW_MS = 24 * 3600 * 1000


class BadPayload(ValueError):
    """The body is not a Messenger delivery; the message says why, briefly (it is sent back and logged)."""


class OtherObject(Exception):
    """A well-formed delivery of another of the app's webhook objects (`user`, `permissions`...):
    not for this bot, and no reason for Meta to deliver it again. `args`: the object, its entries."""


class InvalidEvent(Exception):
    """One event or entry has an id we must not keep; it is skipped, not the whole batch."""


@dataclass(frozen=True)
class IncomingMessage:
    """Something a user said to the Page that deserves an answer."""

    psid: str
    page_id: str
    mid: str | None
    kind: str  # TEXT, POSTBACK or ATTACHMENT
    text: str
    timestamp_ms: int
    attachment_types: tuple[str, ...] = ()  # Meta's `type` of each, as sent
    attachments: tuple[Attachment, ...] = ()
    from_ad: bool = False  # came from a click-to-Messenger ad (referral source ADS): a 7-day window
    payload: str | None = None  # a quick reply's or a postback's payload (HANDOFF: "Talk to a person")

    @property
    def is_attachment_only(self) -> bool:
        return self.kind == ATTACHMENT

    def to_dict(self) -> dict:
        """Flat and JSON-ready. vars(), not dataclasses.asdict: asdict's deep copy costs
        ~10 us per message on the webhook's path, and nothing here is nested."""
        return vars(self)

    @classmethod
    def from_dict(cls, data: dict) -> "IncomingMessage":
        """What to_dict gave, back from JSON (lists become the tuples again)."""
        return cls(**{**data, "attachment_types": tuple(data["attachment_types"]),
                      "attachments": tuple(Attachment(*a) for a in data.get("attachments", ()))})


@dataclass(frozen=True)
class Echo:
    """A message the Page sent (message_echoes): the bot's own reply, or a person in the inbox."""

    psid: str  # the user it went to
    mid: str
    text: str
    timestamp_ms: int
    app_id: str | None  # the app that sent it; absent for some inbox tools
    metadata: str | None  # what the sender put in `message.metadata`
    page_id: str = ""  # the account that sent it: the Page, or its Instagram account ("": an older record)


@dataclass(frozen=True)
class ThreadControl:
    """Meta's handover protocol passed the conversation to this app (`pass_thread_control`): a
    person handed the user back to the bot."""

    psid: str
    page_id: str
    timestamp_ms: int


@dataclass(frozen=True)
class Touch:
    """Something a user did to a message already sent: edited theirs (`edit`: the new text),
    reacted to one (`reaction`: the emoji, "" when taken back), rated one of the bot's
    (`feedback`: "Good response" / "Bad response"), or unsent theirs (`unsend`, Instagram: "")."""

    kind: str
    psid: str
    page_id: str
    mid: str
    value: str
    timestamp_ms: int


EDIT, REACTION, FEEDBACK, UNSEND = "edit", "reaction", "feedback", "unsend"


@dataclass(frozen=True)
class Delivery:
    """One parsed POST: the messages to answer, the Page's echoes, how many events were ignored."""

    messages: tuple[IncomingMessage, ...]
    ignored: int
    echoes: tuple[Echo, ...] = ()
    foreign_pages: tuple[str, ...] = ()  # ids of Pages (or Instagram accounts) not answered here, skipped
    controls: tuple[ThreadControl, ...] = ()  # threads passed back to the bot
    touches: tuple[Touch, ...] = ()  # edits, reactions, feedback
    watched: tuple[IncomingMessage, ...] = ()  # users' messages in a thread another app owns (standby): never answered


# `page` for Messenger, `instagram` for the Instagram accounts linked to the Pages.
OBJECTS = ("page", "instagram")


def parse_body(body: bytes, *, now_ms: int | None = None, accounts: Collection[str] | None = None) -> Delivery:
    """Decode and parse a raw webhook body: anything unreadable is BadPayload (a 400), never a crash."""
    return parse_delivery(_decode_json(body), now_ms=now_ms, accounts=accounts)


def parse_delivery(payload: Any, *, now_ms: int | None = None, accounts: Collection[str] | None = None) -> Delivery:
    """Turn a decoded webhook body into a Delivery, or raise BadPayload.

    Events with an unusable id, and the entries of any Page or Instagram account not in
    `accounts` (None: any), are skipped and counted in `ignored`; `now_ms` stands in for
    implausible event times.
    """
    if not isinstance(payload, dict):
        raise BadPayload("body must be a JSON object")
    if payload.get("object") not in OBJECTS:
        if isinstance(payload.get("object"), str) and payload["object"] and isinstance(payload.get("entry"), list):
            raise OtherObject(payload["object"][:60], len(payload["entry"]))
        raise BadPayload("object must be 'page' or 'instagram'")
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    messages: list[IncomingMessage] = []
    echoes: list[Echo] = []
    controls: list[ThreadControl] = []
    touches: list[Touch] = []
    watched: list[IncomingMessage] = []
    foreign: list[str] = []
    ignored = 0
    malformed: list[str] = []
    sound = 0  # events that were not malformed, answered or not
    if not isinstance(payload.get("entry"), list):
        raise BadPayload("entry must be a list of objects")
    # A malformed entry or event is skipped (counted in `malformed`), never the delivery with it:
    # a 400 would make Meta send the whole POST again, and lose its good messages with the bad.
    for entry in _objects(payload["entry"], "entry", malformed):
        # `standby` events belong to a thread another app owns (the Page inbox after a handover):
        # never answered, but a person's echoes there pause the bot and enter the mirror.
        standby = _objects(entry.get("standby", []), "standby", [])
        events = _objects(entry.get("messaging", []), "messaging", malformed)
        if not _is_for_page(entry, accounts, foreign):
            ignored += len(events) + len(standby)
            sound += len(events) + len(standby)
            continue
        for n, event in enumerate(events + standby):
            try:
                record = _parse_event(event, now_ms)
            except BadPayload as exc:
                if n < len(events):  # one only watched (standby) never refuses a delivery
                    malformed.append(str(exc))
                else:
                    sound += 1
                ignored += 1
                continue
            sound += 1
            if isinstance(record, IncomingMessage) and n < len(events):
                messages.append(record)
                continue
            ignored += 1  # not to answer; an echo or a handover is still worth knowing about
            if isinstance(record, IncomingMessage):
                watched.append(record)
            elif isinstance(record, Echo):
                echoes.append(record)
            elif isinstance(record, ThreadControl):
                controls.append(record)
            elif isinstance(record, Touch):
                touches.append(record)
    if malformed:
        if not sound:  # nothing else in it: refuse the body itself
            raise BadPayload(malformed[0])
        logger.warning("ignoring %d malformed messaging event(s) of a delivery: %s", len(malformed),
                       "; ".join(sorted(set(malformed))))
    return Delivery(tuple(messages), ignored, tuple(echoes), tuple(foreign), tuple(controls), tuple(touches),
                    tuple(watched))


def to_echo(event: dict, now_ms: int) -> Echo | None:
    """The Page's own message in an echo event, or None for any other event."""
    body = event.get("message")
    if not isinstance(body, dict) or not is_echo(body):
        return None
    text, metadata = body.get("text"), body.get("metadata")
    return Echo(
        psid=_recipient(event), page_id=_sender(event), mid=_mid(body, required=True), text=_clean(text),
        timestamp_ms=to_timestamp_ms(event.get("timestamp"), now_ms),
        app_id=_to_id(body.get("app_id"), "message.app_id"),
        metadata=clean_text(metadata) if isinstance(metadata, str) else None,
    )


def to_thread_control(event: dict, now_ms: int) -> ThreadControl | None:
    """A `pass_thread_control` event: Meta sends it to the app that receives the thread.
    https://developers.facebook.com/docs/messenger-platform/handover-protocol"""
    if not isinstance(event.get("pass_thread_control"), dict):
        return None
    return ThreadControl(psid=_sender(event), page_id=_recipient(event),
                         timestamp_ms=to_timestamp_ms(event.get("timestamp"), now_ms))


def to_incoming_message(event: dict, now_ms: int) -> IncomingMessage | None:
    """The message to answer in one `messaging` event, or None for events we only watch."""
    if "message" in event:
        body = _object(event["message"], "message")
        if is_echo(body) or is_unsent(body):
            return None
        return _from_message(event, body, now_ms)
    if "postback" in event:
        return _from_postback(event, _object(event["postback"], "postback"), now_ms)
    return None  # delivery, read, reaction, referral, optin, handover...


def is_echo(message: dict) -> bool:
    """A message the Page itself sent (the bot's own reply or a human in the inbox)."""
    return bool(message.get("is_echo"))


def is_unsent(message: dict) -> bool:
    """Instagram's notice that the user deleted (unsent) a message: its mid and `is_deleted`."""
    return message.get("is_deleted") is True


def to_timestamp_ms(value: Any, now_ms: int) -> int:
    """Event time in ms; `now_ms` (the receive time) when it is missing, not a number or implausible.

    Some deliveries carry seconds (values below 1e12). A made-up time such as 1e20
    would overflow storage or sort the message before all others.
    """
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 16:
        value = int(value)  # digit strings occur in real deliveries
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return now_ms
    if isinstance(value, float) and not math.isfinite(value):
        return now_ms  # only reachable from a dict built in Python: parse_body refuses these
    ms = value * 1000 if value < 1e12 else value
    return int(ms) if EARLIEST_MS <= ms <= now_ms + MAX_CLOCK_SKEW_MS else now_ms


def to_touch(event: dict, now_ms: int) -> Touch | None:
    """message_edit, reaction or response_feedback: Meta's shapes in
    https://developers.facebook.com/docs/messenger-platform/reference/webhook-events; and an
    Instagram message with `is_deleted` (https://developers.facebook.com/docs/messenger-platform/
    instagram/features/webhook)."""
    body = event.get("message")
    if isinstance(body, dict) and is_unsent(body) and not is_echo(body):
        mid = _to_id(body.get("mid"), "message.mid", MAX_MID_CHARS)
        return Touch(UNSEND, _sender(event), _recipient(event), mid, "",
                     to_timestamp_ms(event.get("timestamp"), now_ms)) if mid else None
    for field, kind, key in (("message_edit", EDIT, "text"), ("reaction", REACTION, "emoji"),
                             ("response_feedback", FEEDBACK, "feedback")):
        body = event.get(field)
        if isinstance(body, dict) and (mid := _to_id(body.get("mid"), f"{field}.mid", MAX_MID_CHARS)):
            value = body.get(key) if isinstance(body.get(key), str) else ""
            if kind == REACTION and body.get("action") == "unreact":
                value = ""
            # An edit is the message's new text, as long as a message's own (the request's size
            # bounds both); a reaction or a feedback word is short.
            value = clean_text(value) if kind == EDIT else clean_text(value)[:2000]
            return Touch(kind, _sender(event), _recipient(event), mid, value,
                         to_timestamp_ms(event.get("timestamp"), now_ms))
    return None


def _parse_event(event: dict, now_ms: int) -> IncomingMessage | Echo | ThreadControl | Touch | None:
    try:
        return (to_incoming_message(event, now_ms) or to_echo(event, now_ms) or to_thread_control(event, now_ms)
                or to_touch(event, now_ms))
    except InvalidEvent as exc:
        logger.warning("ignoring a messaging event: %s", exc)
        return None


def _is_for_page(entry: dict, accounts: Collection[str] | None, foreign: list[str]) -> bool:
    """False for an entry with an unusable id, or another Page's (its id goes to `foreign`)."""
    try:
        entry_id = _to_id(entry.get("id"), "entry.id")
    except InvalidEvent as exc:
        logger.warning("ignoring an entry: %s", exc)
        return False
    # Meta always sends the id; hand-made test bodies sometimes leave it out.
    if accounts is None or entry_id is None or entry_id in accounts:
        return True
    if entry_id not in foreign:
        foreign.append(entry_id)
    return False


def _from_message(event: dict, body: dict, now_ms: int) -> IncomingMessage | None:
    text = body.get("text")
    attachments = body.get("attachments", [])
    if not isinstance(attachments, list):
        raise BadPayload("message.attachments must be a list")
    types = tuple(_attachment_type(a) for a in attachments if isinstance(a, dict))
    parsed = parse_attachments(body)
    if isinstance(text, str) and text.strip():
        kind = TEXT  # quick replies too: their text is the button's title
    elif parsed:
        kind, text = ATTACHMENT, ""
    else:
        return None  # nothing we can answer (e.g. an empty or unknown message)
    return IncomingMessage(
        psid=_sender(event), page_id=_recipient(event), mid=_mid(body, required=True),
        kind=kind, text=clean_text(text), timestamp_ms=to_timestamp_ms(event.get("timestamp"), now_ms),
        attachment_types=types, attachments=parsed, from_ad=_from_ad(event, body), payload=_payload(body.get("quick_reply")),
    )


def _from_postback(event: dict, body: dict, now_ms: int) -> IncomingMessage | None:
    title = body.get("title")
    if not isinstance(title, str) or not title.strip():
        return None
    return IncomingMessage(
        psid=_sender(event), page_id=_recipient(event), mid=_mid(body, required=False),
        kind=POSTBACK, text=clean_text(title), timestamp_ms=to_timestamp_ms(event.get("timestamp"), now_ms),
        payload=_payload(body),
    )


def _payload(holder: Any) -> str | None:
    payload = holder.get("payload") if isinstance(holder, dict) else None
    return clean_text(payload)[:1000] if isinstance(payload, str) else None


def _from_ad(event: dict, body: dict) -> bool:
    """A message that starts a thread from a click-to-Messenger ad carries its referral."""
    referral = event.get("referral") if isinstance(event.get("referral"), dict) else body.get("referral")
    return isinstance(referral, dict) and referral.get("source") == "ADS"


def _attachment_type(attachment: dict) -> str:
    """Meta's type of an attachment, cleaned; "unknown" when it is not a word (missing, empty, not a string)."""
    kind = attachment.get("type")
    kind = clean_text(kind).strip()[:40] if isinstance(kind, str) else ""
    return kind or "unknown"


def _clean(text: Any) -> str:
    return clean_text(text) if isinstance(text, str) else ""


def _mid(body: dict, required: bool) -> str | None:
    mid = _to_id(body.get("mid"), "mid", MAX_MID_CHARS)
    if mid is None and required:
        raise BadPayload("message.mid is missing")
    return mid


def _sender(event: dict) -> str:
    return _party_id(event.get("sender"), "sender")


def _recipient(event: dict) -> str:
    return _party_id(event.get("recipient"), "recipient")


def _party_id(party: Any, name: str) -> str:
    # Absent is a wrong shape (400, as ever); present but unsafe skips just this event.
    party_id = _to_id(party.get("id"), f"{name}.id") if isinstance(party, dict) else None
    if party_id is None:
        raise BadPayload(f"{name}.id is missing")
    return party_id


def _to_id(value: Any, name: str, max_chars: int = MAX_ID_CHARS) -> str | None:
    """An id as str, None when absent; InvalidEvent for one that is unsafe to store or log.

    Ids come as strings or numbers (one app id above 2**53); nothing else is an id.
    """
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidEvent(f"{name} is not a string or integer: {preview(value)}")
    if isinstance(value, int) and value.bit_length() > 4 * max_chars:
        raise InvalidEvent(f"{name} is too long: {preview(value)}")  # checked before str(): huge ints raise
    text = str(value)
    if len(text) > max_chars:
        raise InvalidEvent(f"{name} is too long: {preview(value)}")
    if UNSAFE_ID_CHARS.search(text):
        raise InvalidEvent(f"{name} holds a control character or a surrogate: {preview(value)}")
    return text


def _decode_json(body: bytes) -> Any:
    try:
        return nesting.loads(body.decode("utf-8"), parse_constant=_refuse_constant, parse_float=_finite_float)
    except BadPayload:
        raise
    except (nesting.TooDeep, RecursionError):  # RecursionError: the guard missed, or the stack was deep
        raise BadPayload("body is not valid JSON: nested too deeply") from None
    except ValueError:  # bad UTF-8, bad JSON, an integer over Python's 4300 digits
        raise BadPayload("body is not valid JSON") from None


def _refuse_constant(name: str) -> Any:
    raise BadPayload(f"body is not valid JSON: {name} is not a number")  # NaN, Infinity, -Infinity


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadPayload("body is not valid JSON: a number too large for a float")  # 1e400
    return value


def _object(value: Any, name: str) -> dict:
    if not isinstance(value, dict):
        raise BadPayload(f"{name} must be an object")
    return value


def _objects(value: Any, name: str, malformed: list[str]) -> list[dict]:
    """The objects of a list; what is not one (the list itself, or an item) noted in `malformed`."""
    if not isinstance(value, list):
        malformed.append(f"{name} must be a list of objects")
        return []
    if len(objects := [item for item in value if isinstance(item, dict)]) < len(value):
        malformed.extend([f"{name} must be a list of objects"] * (len(value) - len(objects)))
    return objects
