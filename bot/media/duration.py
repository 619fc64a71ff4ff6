"""How long a voice note plays, read from its container's header (no decoding).

Messenger's voice notes are MP4 audio (the `mvhd` box holds the duration) and WAV is read too,
both here by hand (a few lines, hardened against hostile nesting). An audio file a user shares
may be MP3 or Ogg (Opus, Vorbis): mutagen reads those. Anything else (WebM): None, and only the
size limit applies.
"""
from __future__ import annotations

import io
import logging
import struct

logger = logging.getLogger(__name__)

# The highest bitrate of each format, bits per second: a file cannot play for less than its size
# at that rate, whatever its header claims (an MP3's Xing frame count, an Ogg page's granule).
FASTEST = {"mp3": 320_000, "ogg": 510_000}

# Boxes that hold the `mvhd` box, and how far to look for them: the header is near the start.
CONTAINERS = {b"moov"}
MAX_BOXES = 64
MAX_DEPTH = 4  # `moov` holds `mvhd` directly; a file nesting boxes deeper is not a voice note


def audio_seconds(data: bytes | bytearray) -> float | None:
    """The duration in seconds, or None when the format is not one this reads (or the header is
    damaged: a user's file must never fail the reply)."""
    try:
        if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
            return _wav_seconds(data)
        if data[4:8] == b"ftyp":
            return _mp4_seconds(data)
    except struct.error:
        return None
    if data[:4] == b"OggS":
        return _read_by_mutagen(data, "ogg")
    if data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0):  # an MPEG frame
        return _read_by_mutagen(data, "mp3")
    return None


def _read_by_mutagen(data: bytes | bytearray, kind: str) -> float | None:
    from mutagen.mp3 import MP3  # only when such a file comes
    from mutagen.oggopus import OggOpus
    from mutagen.oggvorbis import OggVorbis

    readers = (MP3,) if kind == "mp3" else (OggOpus, OggVorbis)
    for reader in readers:
        try:
            length = reader(io.BytesIO(bytes(data))).info.length
        except Exception as exc:  # noqa: BLE001 - mutagen's errors, or worse on a hostile file: not this kind
            logger.debug("not %s audio mutagen can read: %s", reader.__name__, type(exc).__name__)
            continue
        return max(float(length or 0.0), len(data) * 8 / FASTEST[kind])
    return None


def _wav_seconds(data: bytes | bytearray) -> float | None:
    offset, byte_rate = 12, None
    while offset + 8 <= len(data):
        chunk, size = data[offset:offset + 4], struct.unpack_from("<I", data, offset + 4)[0]
        if chunk == b"fmt " and size >= 16 and offset + 24 <= len(data):
            byte_rate = struct.unpack_from("<I", data, offset + 16)[0]
        elif chunk == b"data":
            return size / byte_rate if byte_rate else None
        offset += 8 + size + (size & 1)
    return None


def _mp4_seconds(data: bytes | bytearray, start: int = 0, end: int | None = None, depth: int = 0) -> float | None:
    if depth > MAX_DEPTH:
        return None
    offset, end = start, len(data) if end is None else end
    for _ in range(MAX_BOXES):
        if offset + 8 > end:
            return None
        size, kind = struct.unpack_from(">I4s", data, offset)
        header = 8
        if size == 1 and offset + 16 <= end:  # a 64-bit size follows
            size, header = struct.unpack_from(">Q", data, offset + 8)[0], 16
        elif size == 0:  # to the end of the file
            size = end - offset
        if size < header:
            return None
        if kind in CONTAINERS:
            return _mp4_seconds(data, offset + header, min(end, offset + size), depth + 1)
        if kind == b"mvhd":
            return _mvhd_seconds(data, offset + header)
        offset += size
    return None


def _mvhd_seconds(data: bytes | bytearray, at: int) -> float | None:
    """version 0: 32-bit times and duration; version 1: 64-bit (ISO/IEC 14496-12, 8.2.2)."""
    try:
        if data[at] == 1:
            timescale, duration = struct.unpack_from(">IQ", data, at + 4 + 16)
        else:
            timescale, duration = struct.unpack_from(">II", data, at + 4 + 8)
    except (struct.error, IndexError):
        return None
    return duration / timescale if timescale else None
