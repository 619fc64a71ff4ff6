"""Audio files for the length checks, made here frame by frame from their formats' specs (no
binary in the tree, no encoder needed): headers right, sound silent."""
from __future__ import annotations

import struct

MP3_KBPS = (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)  # MPEG-1 Layer III


def mp3_bytes(seconds: float, kbps: int = 128, claimed_frames: int | None = None) -> bytes:
    """MPEG-1 Layer III, 44.1 kHz mono, constant bitrate; `claimed_frames`: a Xing header in the
    first frame claiming that many frames (a VBR file's length, or a lie)."""
    frame_length = 144 * kbps * 1000 // 44100
    header = bytes([0xFF, 0xFB, MP3_KBPS.index(kbps) << 4, 0xC0])
    frames = [header + bytes(frame_length - 4)] * round(seconds * 44100 / 1152)
    if claimed_frames is not None:
        body = bytearray(frame_length - 4)  # after a mono frame's 17 bytes of side information
        body[17:29] = b"Xing" + struct.pack(">II", 1, claimed_frames)  # flag 1: the frame count is given
        frames[0] = header + bytes(body)
    return b"".join(frames)


def opus_bytes(seconds: float, pre_skip: int = 312) -> bytes:
    """Ogg Opus: the OpusHead and OpusTags pages, then one page whose granule ends at `seconds`."""
    head = b"OpusHead" + bytes([1, 1]) + struct.pack("<HIhB", pre_skip, 48000, 0, 0)
    tags = b"OpusTags" + struct.pack("<I", 4) + b"test" + struct.pack("<I", 0)
    return (_ogg_page(head, 0, 0, 2) + _ogg_page(tags, 0, 1, 0)
            + _ogg_page(bytes(1000), pre_skip + round(seconds * 48000), 2, 4))


def _ogg_page(packet: bytes, granule: int, sequence: int, flags: int) -> bytes:
    lacing = [255] * (len(packet) // 255) + [len(packet) % 255]
    page = bytearray(b"OggS" + bytes([0, flags]) + struct.pack("<qIII", granule, 1, sequence, 0)
                     + bytes([len(lacing)]) + bytes(lacing) + packet)
    struct.pack_into("<I", page, 22, _ogg_crc(bytes(page)))
    return bytes(page)


def _ogg_crc(data: bytes) -> int:
    """Ogg's CRC-32: polynomial 0x04C11DB7, not reflected, over the page with its CRC field zero."""
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7 if crc & 0x80000000 else crc << 1) & 0xFFFFFFFF
    return crc
