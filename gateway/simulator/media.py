"""Real files for the simulated backend: PNGs coloured by the prompt, tiny MP4 videos."""

from __future__ import annotations

import hashlib
import struct
import zlib
from functools import cache
from importlib import resources

MAX_SIDE = 512


def prompt_colour(prompt: str) -> tuple[int, int, int]:
    digest = hashlib.sha256(prompt.encode()).digest()
    return digest[0], digest[1], digest[2]


def png_size(requested: str) -> tuple[int, int]:
    """The size of the PNG served for a requested `WxH`: the same shape, at most 512 px."""
    try:
        w, h = (int(part) for part in requested.lower().split("x", 1))
    except ValueError:
        w, h = 1024, 1024
    scale = max(w, h) / MAX_SIDE
    if scale > 1:
        w, h = max(1, round(w / scale)), max(1, round(h / scale))
    return w, h


@cache
def solid_png(width: int, height: int, colour: tuple[int, int, int]) -> bytes:
    """A valid truecolour PNG of one colour."""
    row = b"\x00" + bytes(colour) * width  # filter byte 0, then RGB pixels
    raw = row * height

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


_VIDEO_FOR_RATIO = {"16:9": ("16x9", 160, 90), "9:16": ("9x16", 90, 160), "1:1": ("1x1", 120, 120)}


@cache
def sample_video(aspect_ratio: str) -> tuple[bytes, int, int]:
    """An 8-second H.264 MP4 test pattern for the aspect ratio: (bytes, width, height)."""
    name, width, height = _VIDEO_FOR_RATIO.get(aspect_ratio, _VIDEO_FOR_RATIO["16:9"])
    data = resources.files("gateway.simulator").joinpath(f"media/sample_{name}.mp4").read_bytes()
    return data, width, height
