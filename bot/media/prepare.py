"""One batch's messages made ready for the model: photos fetched into data URLs, voice notes
transcribed, locations and links put into words - or, when nothing is left for the model
(stickers, a video alone, a photo that could not be opened), the reply to send instead.

Failures cost the user a clear reply and one log line with the reason; never the URL (it is
signed), never the bytes, never the message.
"""
from __future__ import annotations

import base64
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, NamedTuple, Sequence

from bot.media import describe
from bot.media.budget import MemoryBudget
from bot.media.download import TOO_LARGE, WRONG_TYPE, Downloader, Fetched, MediaError
from bot.media.duration import audio_seconds
from bot.telemetry import metrics
from gpt.transcribe import Transcriber, TranscriptionFailed
from messenger.attachments import AUDIO, IMAGE, STICKER, Attachment
from messenger.events import POSTBACK, IncomingMessage

logger = logging.getLogger(__name__)

MB = 1024 * 1024
# What the model takes (OpenAI's list; other servers take the same or fewer).
IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
TOO_LONG, NOT_UNDERSTOOD, NO_MEMORY = "too_long", "not_understood", "no_memory"
# A fetch that could not reach the CDN is tried again only with this much of the reply's time left.
RETRY_IF_LEFT_S = 4.0
# A photo waiting for memory (a burst of big ones) gives up this long before the reply's deadline:
# the model needs the time to look at it. The user is asked to send it again.
MODEL_TIME_S = 5.0
# Kinds of reply when nothing is left for the model (an Outcome's value, bot/replies/answer.py).
STICKER_OUTCOME, UNSUPPORTED_OUTCOME, MEDIA_FAILED_OUTCOME = "sticker", "unsupported", "media-failed"


@dataclass(frozen=True, kw_only=True)
class MediaSettings:
    """The replies and bounds of config.py (IMAGE_MAX_MB, VOICE_MAX_LENGTH, STICKER_REPLY...)."""

    unsupported_reply: str
    media_error_reply: str
    too_large_reply: str
    voice_error_reply: str
    sticker_reply: str  # "" = stickers get no reply
    default_question: str  # asked of photos sent without words
    vision: bool = True
    image_max_bytes: int = 8 * MB
    audio_max_bytes: int = 25 * MB
    voice_max_seconds: float = 300.0


class MediaFact(NamedTuple):
    """What the exchange log keeps of one attachment: its kind, size and fate - never its content.
    A NamedTuple: it is stored as JSON with the answer."""

    kind: str
    size: int | None
    outcome: str


@dataclass
class Prepared:
    """The prompt's new turns (mid, text), the photos for the last one, and what each message said."""

    turns: list[tuple[str | None, str]] = field(default_factory=list)
    images: list[str] = field(default_factory=list)  # data URLs
    said: dict[str, str] = field(default_factory=dict)  # mid -> its words in the mirror and the log
    facts: list[MediaFact] = field(default_factory=list)
    tokens: int = 0  # transcription tokens, for DAILY_TOKEN_BUDGET
    reply: tuple[str | None, str] | None = None  # (text, outcome) when the model is not asked
    has_words: bool = False  # the user's own words, not just the question asked of a photo
    postbacks: frozenset[str] = frozenset()  # mids of button taps (Get Started...): a title, not a question
    release: Callable[[], None] = lambda: None

    def without_images(self, settings: MediaSettings) -> "Prepared":
        """The same, for a model that refused the photos: words only, or UNSUPPORTED_REPLY."""
        self.release()
        if not self.has_words:
            return replace(self, images=[], reply=(settings.unsupported_reply, UNSUPPORTED_OUTCOME))
        (mid, last), note = self.turns[-1], describe.cannot_see(IMAGE)
        return replace(self, images=[], turns=[*self.turns[:-1], (mid, f"{last}\n{note}")])


@dataclass
class _Message:
    """One message while it is read: the words for the model, notes, labels for the mirror."""

    words: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)


class MediaReader:
    """Shared by every reply thread: one downloader, one memory budget, one transcriber."""

    def __init__(self, settings: MediaSettings, downloader: Downloader, transcriber: Transcriber,
                 budget: MemoryBudget, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.downloader = downloader
        self.transcriber = transcriber
        self.budget = budget
        self.clock = clock
        self._refused = threading.Event()  # the model server said it takes no images

    @property
    def vision(self) -> bool:
        return self.settings.vision and not self._refused.is_set()

    def images_refused(self, model: str) -> None:
        """The model refused image input: said once, and photos are not fetched from now on."""
        if not self._refused.is_set():
            self._refused.set()
            logger.warning("model %s refused image input: photos get UNSUPPORTED_REPLY from now on (set VISION=off "
                           "to say so, or choose a model that reads images)", model)

    def prepare(self, messages: Sequence[IncomingMessage], deadline: float | None,
                working: Callable[[], object] = lambda: None) -> Prepared:
        """Read every message; `working` is called before the first fetch (the typing indicator)."""
        postbacks = frozenset(m.mid for m in messages if m.mid and m.kind == POSTBACK)
        prepared, held, failures = Prepared(postbacks=postbacks), [], []
        prepared.release = lambda: self._release(held)
        try:
            read = [self._read(m, deadline, prepared, held, failures, working) for m in messages]
        except BaseException:
            prepared.release()
            raise
        self._finish(messages, read, prepared, failures)
        return prepared

    def _read(self, message: IncomingMessage, deadline: float | None, prepared: Prepared, held: list[int],
              failures: list[str], working: Callable[[], object]) -> _Message:
        read = _Message()
        for attachment in message.attachments:
            try:
                self._read_one(message, attachment, deadline, prepared, held, read, working)
            except (MediaError, TranscriptionFailed, TimeoutError) as exc:
                reason = _reason(exc)
                failures.append(reason)
                read.notes.append(describe.could_not_open(attachment.kind))
                read.labels.append(describe.label(attachment))
                self._count(prepared, attachment.kind, getattr(exc, "size", None), reason)
                logger.warning("psid=%r mid=%r: a %s was not used: %s", message.psid, message.mid,
                               describe.name(attachment.kind), exc)
        if message.text.strip():
            read.words.append(message.text)
        return read

    def _read_one(self, message: IncomingMessage, attachment: Attachment, deadline: float | None,
                  prepared: Prepared, held: list[int], read: _Message, working: Callable[[], object]) -> None:
        kind = attachment.kind
        if kind == IMAGE and self.vision and attachment.url:
            working()
            data_url, size = self._image(attachment.url, deadline, held)
            prepared.images.append(data_url)
            read.labels.append(describe.label(attachment))
            self._count(prepared, kind, size, "read")
        elif kind == AUDIO and attachment.url:
            working()
            transcript, size = self._voice(attachment.url, deadline, prepared, held)
            read.words.append(transcript)
            read.labels.append(describe.label(attachment, transcript))
            self._count(prepared, kind, size, "transcribed")
        elif kind == STICKER:
            read.labels.append(describe.label(attachment))
            self._count(prepared, kind, None, "ignored")
        elif kind in describe.DESCRIBED:
            read.words.append(describe.describe(attachment))
            read.labels.append(describe.label(attachment))
            self._count(prepared, kind, None, "described")
        else:  # video, file, an unknown kind, a photo with VISION off
            read.notes.append(describe.cannot_see(kind))
            read.labels.append(describe.label(attachment))
            self._count(prepared, kind, None, "unsupported")

    def _image(self, url: str, deadline: float | None, held: list[int]) -> tuple[str, int]:
        fetched = self._fetch(url, IMAGE_TYPES.__contains__, self.settings.image_max_bytes, deadline, held)
        # Bytes that are no image the model takes (a damaged file, an error page labelled
        # image/jpeg) were sent all the same: the model refused the whole turn with a 400, and the
        # user's words got the fallback. Now they are a photo that could not be opened.
        if (sniffed := image_type(fetched.data)) is None:
            raise MediaError(WRONG_TYPE, f"labelled {fetched.content_type}, not an image")
        encoded = base64.b64encode(fetched.data).decode("ascii")
        return f"data:{sniffed};base64,{encoded}", len(fetched.data)

    def _voice(self, url: str, deadline: float | None, prepared: Prepared, batch: list[int]) -> tuple[str, int]:
        held: list[int] = []
        try:
            fetched = self._fetch(url, _is_audio, self.settings.audio_max_bytes, deadline, held, sum(batch))
            seconds = audio_seconds(fetched.data)
            if seconds is not None and seconds > self.settings.voice_max_seconds:
                raise MediaError(TOO_LONG, f"{seconds:.0f} s")
            # Half of what is left: the model needs the rest to answer the transcript.
            until = None if deadline is None else self.clock() + (deadline - self.clock()) / 2
            transcript = self.transcriber.transcribe(fetched.data, fetched.content_type, until)
        finally:
            self._release(held)  # the bytes are gone once transcribed
        if not transcript.text:
            raise TranscriptionFailed("the transcript is empty")
        prepared.tokens += transcript.tokens
        return transcript.text, len(fetched.data)

    def _fetch(self, url: str, accept: Callable[[str], bool], max_bytes: int, deadline: float | None,
               held: list[int], elsewhere: int = 0) -> Fetched:
        """A fetch, tried once more when the CDN could not be reached and there is time for it.
        The memory its bytes take is reserved from the budget (into `held`) before they are read;
        what the batch holds (`held`, and `elsewhere` beside it) is not waited for: it stays held."""
        def reserve(size: int) -> None:
            held.append(self.budget.reserve(size, None if deadline is None else deadline - MODEL_TIME_S,
                                            own=sum(held) + elsewhere))
        before = len(held)  # what the batch's other attachments hold: still in memory
        try:
            return self.downloader.fetch(url, accept, max_bytes, deadline, on_size=reserve)
        except MediaError as exc:
            if not exc.retryable or (deadline is not None and deadline - self.clock() < RETRY_IF_LEFT_S):
                raise
            logger.info("fetching an attachment failed (%s); trying once more", exc)
            self._release(held, keep=before)  # only the failed try's reservation
            return self.downloader.fetch(url, accept, max_bytes, deadline, on_size=reserve)

    def _release(self, held: list[int], keep: int = 0) -> None:
        while len(held) > keep:
            self.budget.release(held.pop())

    def _finish(self, messages: Sequence[IncomingMessage], read: list[_Message], prepared: Prepared,
                failures: list[str]) -> None:
        for message, each in zip(messages, read):
            if each.labels and message.mid:
                prepared.said[message.mid] = " ".join([*each.labels, message.text]).strip()
        has_words = prepared.has_words = any(each.words for each in read)
        if has_words or prepared.images:
            prepared.turns = [(m.mid, "\n".join(each.words + each.notes)) for m, each in zip(messages, read)
                              if each.words or each.notes]
            if not has_words:  # photos alone: they get the default question
                prepared.turns.append((messages[-1].mid, self.settings.default_question))
            return
        prepared.release()
        settings = self.settings
        if failures:
            text = (settings.too_large_reply if failures[0] in (TOO_LARGE, TOO_LONG) else
                    settings.voice_error_reply if failures[0] == NOT_UNDERSTOOD else settings.media_error_reply)
            prepared.reply = (text, MEDIA_FAILED_OUTCOME)
        elif any(each.notes for each in read) or not any(m.attachments for m in messages):
            prepared.reply = (settings.unsupported_reply, UNSUPPORTED_OUTCOME)
        else:  # stickers, the "like" among them
            prepared.reply = (settings.sticker_reply or None, STICKER_OUTCOME)

    @staticmethod
    def _count(prepared: Prepared, kind: str, size: int | None, outcome: str) -> None:
        prepared.facts.append(MediaFact(kind, size, outcome))
        metrics.ATTACHMENTS.labels(kind, outcome).inc()


def image_type(data: bytes | bytearray) -> str | None:
    """The type of IMAGE_TYPES the bytes begin as (their magic number), or None."""
    head = bytes(data[:12])
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def _is_audio(content_type: str) -> bool:
    # Messenger serves voice notes as MP4 audio, sometimes labelled video/mp4.
    return content_type.startswith("audio/") or content_type == "video/mp4"


def _reason(exc: Exception) -> str:
    if isinstance(exc, MediaError):
        return exc.reason
    return NOT_UNDERSTOOD if isinstance(exc, TranscriptionFailed) else NO_MEMORY

