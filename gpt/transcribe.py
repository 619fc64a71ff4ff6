"""Voice notes to text: the OpenAI-compatible `/audio/transcriptions` endpoint, through the
same client, retries and deadline as the chat model (gpt/retries.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import openai

from gpt.model import MODEL_FAILURES, log_failure
from gpt.retries import RetryPolicy, Tries
from messenger.text import clean_text

# The endpoint reads the format from the file name; Messenger's voice notes are MP4 audio.
EXTENSIONS = {"audio/mp4": "m4a", "audio/x-m4a": "m4a", "audio/m4a": "m4a", "video/mp4": "mp4", "audio/mpeg": "mp3",
              "audio/mp3": "mp3", "audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "audio/ogg": "ogg",
              "audio/webm": "webm", "audio/flac": "flac", "audio/x-flac": "flac"}
# What a server that bills by the second (whisper-1) counts as tokens: OpenAI's audio models
# take about 10 tokens a second of audio. Only for DAILY_TOKEN_BUDGET.
TOKENS_PER_SECOND = 10


class TranscriptionFailed(Exception):
    """The voice note could not be turned into text (the failure is logged already)."""


@dataclass(frozen=True)
class Transcript:
    text: str
    tokens: int  # what the transcription cost, for the daily token budget


class Transcriber:
    def __init__(self, client: openai.OpenAI, model: str, *, error_log_file: str, retries: RetryPolicy):
        self.client = client
        self.model = model
        self.error_log_file = error_log_file
        self.retries = retries

    def transcribe(self, audio: bytes | bytearray, content_type: str, deadline: float | None = None) -> Transcript:
        """The text of the voice note; TranscriptionFailed (logged) when the server cannot say."""
        started, tries = self.retries.clock(), Tries()
        name = f"voice-note.{EXTENSIONS.get(content_type, 'mp4')}"
        try:
            result = self.retries.call(lambda timeout: self.client.audio.transcriptions.create(
                model=self.model, file=(name, bytes(audio), content_type), timeout=timeout), deadline, tries)
            text = clean_text(getattr(result, "text", "") or "").strip()
        except MODEL_FAILURES as exc:
            log_failure("transcription", exc, tries.count, self.retries.clock() - started, self.error_log_file)
            raise TranscriptionFailed(type(exc).__name__) from None
        return Transcript(text, usage_tokens(getattr(result, "usage", None)))


def usage_tokens(usage: Any) -> int:
    """Tokens the server counted, or its seconds of audio at TOKENS_PER_SECOND; 0 when it says nothing."""
    total = getattr(usage, "total_tokens", None)
    if isinstance(total, int) and not isinstance(total, bool) and 0 <= total < 2 ** 40:
        return total
    seconds = getattr(usage, "seconds", None)
    if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and 0 <= seconds < 10 ** 6:
        return int(seconds * TOKENS_PER_SECOND)
    return 0

