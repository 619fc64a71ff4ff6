"""OpenAI's `POST /v1/audio/transcriptions` as the offline stand-in answers it: the checks the
real endpoint makes on the upload, and its answer shapes. Pure functions over the parsed form.

https://platform.openai.com/docs/api-reference/audio/createTranscription
"""
from __future__ import annotations

from dataclasses import dataclass

from werkzeug.wrappers import Request, Response

from devtools.emulator.http import json_response
from devtools.emulator.media import audio_seconds

# OpenAI goes by the file name's extension, not by the Content-Type of the part.
FORMATS = ("flac", "m4a", "mp3", "mp4", "mpeg", "mpga", "oga", "ogg", "wav", "webm")
MAX_BYTES = 25 * 1024 * 1024
TOKENS_PER_SECOND = 10  # the stand-in's input tokens for audio; output tokens are the words of the text


@dataclass(frozen=True)
class Upload:
    """One transcription request, as the stand-in records it."""
    model: str
    filename: str
    content_type: str
    size: int
    response_format: str
    seconds: float | None
    data: bytes


def read_upload(request: Request) -> Upload | None:
    """The multipart form's file and fields; None when there is no file part."""
    file = request.files.get("file")
    if file is None:
        return None
    data = file.read()
    return Upload(request.form.get("model", ""), file.filename or "", file.mimetype or "", len(data),
                  request.form.get("response_format", "json"), audio_seconds(data), data)


def invalid(message: str, param: str | None = None, status: int = 400) -> Response:
    return json_response({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                    "code": None}}, status)


def refusal(upload: Upload | None) -> Response | None:
    """The 400s OpenAI answers for a missing model or file, a format it does not take, a file too large."""
    if upload is None:
        return invalid("You must provide a file.", "file")
    if not upload.model:
        return invalid("you must provide a model parameter", "model")
    extension = upload.filename.rsplit(".", 1)[-1].lower() if "." in upload.filename else ""
    if extension not in FORMATS:
        return invalid(f"Invalid file format. Supported formats: {list(FORMATS)}", "file")
    if upload.size > MAX_BYTES:
        return invalid(f"Maximum content size limit ({MAX_BYTES}) exceeded ({upload.size} bytes read)", "file", 413)
    if upload.response_format not in ("json", "text", "verbose_json"):
        return invalid(f"response_format '{upload.response_format}' is not supported by the stand-in",
                       "response_format")
    return None


def offline_transcript(upload: Upload) -> str:
    length = f"{upload.seconds:.1f} s" if upload.seconds is not None else "unknown length"
    return f"[offline stand-in] a voice note of {length} ({upload.content_type or 'no content type'})"


def answer(upload: Upload, text: str) -> Response:
    """The transcript in the requested format, with usage as OpenAI reports it for the model:
    audio seconds for whisper-1, tokens for the gpt-4o transcribe models."""
    seconds = upload.seconds or 0.0
    if upload.response_format == "text":
        return Response(text + "\n", mimetype="text/plain")
    if upload.model.startswith("whisper"):
        usage: dict = {"type": "duration", "seconds": round(seconds)}
    else:
        tokens_in, tokens_out = round(seconds * TOKENS_PER_SECOND), len(text.split())
        usage = {"type": "tokens", "input_tokens": tokens_in, "output_tokens": tokens_out,
                 "total_tokens": tokens_in + tokens_out}
    if upload.response_format == "verbose_json":
        return json_response({"task": "transcribe", "language": "english", "duration": seconds, "text": text,
                              "segments": [], "usage": usage})
    return json_response({"text": text, "usage": usage})
