"""Real media bytes for the emulator: PNG and WAV made with the standard library, and the
few header readers the model stand-in needs to say what it received (pixel size, audio length).

Nothing here is clever: enough of each format to be a genuine file a browser, a
decoder or OpenAI accepts, and to read back the one figure each format stores.
"""
from __future__ import annotations

import io
import math
import os
import struct
import wave
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, *, noise: bool = False) -> bytes:
    """An 8-bit RGB PNG: a soft gradient (a few hundred bytes), or random pixels that do not compress
    (`noise=True`: about width*height*3 bytes, for photos of a chosen weight)."""
    if noise:  # level 0: random data does not shrink, and storing it is fast even for 8 MB
        rows = b"".join(b"\0" + os.urandom(width * 3) for _ in range(height))
        level = 0
    else:
        rows = _gradient_rows(width, height) if width * height <= 1 << 20 else _flat_rows(width, height)
        level = 6
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, RGB, no interlace
    return (PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(rows, level))
            + _png_chunk(b"IEND", b""))


def _gradient_rows(width: int, height: int) -> bytes:
    """Red grows to the right, green downwards: a picture whose orientation can be checked."""
    return b"".join(b"\0" + b"".join(bytes((x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), 160))
                                      for x in range(width)) for y in range(height))


def _flat_rows(width: int, height: int) -> bytes:
    """Large plain images: one grey row repeated (building a gradient pixel by pixel would be slow)."""
    return (b"\0" + b"\x80\x80\x80" * width) * height


def png_of_size(approx_bytes: int) -> bytes:
    """A square noise PNG of about `approx_bytes` (within a few hundred bytes), e.g. an 8 MB photo."""
    side = max(1, math.isqrt(max(approx_bytes - 100, 3) // 3))
    return png_bytes(side, side, noise=True)


def wav_bytes(seconds: float, rate: int = 16000, *, frequency: float = 440.0) -> bytes:
    """A mono 16-bit PCM WAV of a sine tone."""
    frames = round(seconds * rate)
    samples = (round(12000 * math.sin(2 * math.pi * frequency * i / rate)) for i in range(frames))
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(struct.pack(f"<{frames}h", *samples))
    return out.getvalue()


def mp4_bytes(seconds: float, timescale: int = 1000) -> bytes:
    """An MP4 (M4A) container holding only `ftyp` and `moov/mvhd`: it has a length, no sound.

    Meta's voice notes are audio/mp4; this is enough for code that reads or forwards one, not for
    a decoder (the offline stand-in reads its length; a real model would refuse it)."""
    mvhd = struct.pack(">B3xIIII", 0, 0, 0, timescale, round(seconds * timescale)) + bytes(80)
    moov = _box(b"moov", _box(b"mvhd", mvhd))
    return _box(b"ftyp", b"M4A \0\0\0\0M4A isom") + moov


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


# -- reading ------------------------------------------------------------------------------------

def image_size(data: bytes) -> tuple[int, int, str] | None:
    """(width, height, format) of a PNG, JPEG, GIF or WebP, from its header; None for anything else."""
    if data.startswith(PNG_SIGNATURE) and data[12:16] == b"IHDR":
        return (*struct.unpack(">II", data[16:24]), "PNG")
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return (*struct.unpack("<HH", data[6:10]), "GIF")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_size(data)
    if data[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    return None


def _webp_size(data: bytes) -> tuple[int, int, str] | None:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30:  # lossy: 14-bit sizes after the key frame's start code
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF, "WEBP"
    if chunk == b"VP8L" and len(data) >= 25:  # lossless: 14 bits each, minus one, after a 0x2f byte
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, "WEBP"
    if chunk == b"VP8X" and len(data) >= 30:  # extended: 24 bits each, minus one
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1, "WEBP"
    return None


def _jpeg_size(data: bytes) -> tuple[int, int, str] | None:
    """Walk the segments to the first start-of-frame marker (SOF0..SOF15 but DHT, JPG, DAC)."""
    at = 2
    while at + 9 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        length = struct.unpack(">H", data[at + 2:at + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[at + 5:at + 9])
            return width, height, "JPEG"
        at += 2 + length
    return None


def audio_seconds(data: bytes) -> float | None:
    """The length of a WAV (from its header) or an MP4/M4A (from `moov/mvhd`); None for other formats."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        try:
            with wave.open(io.BytesIO(data)) as wav:
                return wav.getnframes() / wav.getframerate()
        except (wave.Error, EOFError, ZeroDivisionError):
            return None
    mvhd = _find_box(data, [b"moov", b"mvhd"])
    if mvhd is None or not mvhd:
        return None
    if mvhd[0] == 1 and len(mvhd) >= 32:  # version 1: 64-bit times and duration
        timescale, duration = struct.unpack(">IQ", mvhd[20:32])
    elif len(mvhd) >= 20:
        timescale, duration = struct.unpack(">II", mvhd[12:20])
    else:
        return None
    return duration / timescale if timescale else None


def _find_box(data: bytes, path: list[bytes]) -> bytes | None:
    """The payload of the box at `path` (e.g. moov then mvhd), walking sizes; None if absent."""
    at = 0
    while at + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[at:at + 8])
        header = 8
        if size == 1 and at + 16 <= len(data):  # a 64-bit size follows the type
            size, header = struct.unpack(">Q", data[at + 8:at + 16])[0], 16
        elif size == 0:  # the box runs to the end of the file
            size = len(data) - at
        if size < header:
            return None
        if kind == path[0]:
            payload = data[at + header:at + size]
            return payload if len(path) == 1 else _find_box(payload, path[1:])
        at += size
    return None
