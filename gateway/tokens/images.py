"""Image inputs priced by OpenAI's published tile rule, with sizes read from header bytes.

The gateway has to price an image before forwarding the request, so it reads only the
few bytes that hold the dimensions (PNG, JPEG, GIF, WebP) instead of decoding pixels.
Every parser here returns None for anything it does not recognise and never raises:
the bytes come straight from clients.
"""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass

__all__ = ["ImageCostRule", "data_url_image_size", "image_size", "image_tokens"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_MAX_SIDE = 2**31 - 1

# Markers that carry no length field; skipping them as segments would misread the stream.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8), 0xD8})
# C4, C8 and CC share the SOFn range but are Huffman tables, a reserved marker and
# arithmetic-coding conditioning: they carry no frame size.
_JPEG_NOT_SOF = frozenset({0xC4, 0xC8, 0xCC})
_JPEG_EOI = 0xD9
_JPEG_SOS = 0xDA

_VP8_START_CODE = b"\x9d\x01\x2a"
_VP8L_SIGNATURE = 0x2F


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a PNG, JPEG, GIF or WebP from its header, else None.

    Truncated, corrupt or zero-sized images give None; no input makes this raise.
    """
    if data.startswith(_PNG_SIGNATURE):
        return _png_size(data)
    if data.startswith(b"\xff\xd8"):
        return _jpeg_size(data)
    if data.startswith((b"GIF87a", b"GIF89a")):
        return _gif_size(data)
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return _webp_size(data)
    return None


def _positive(width: int, height: int) -> tuple[int, int] | None:
    return (width, height) if width > 0 and height > 0 else None


def _png_size(data: bytes) -> tuple[int, int] | None:
    # IHDR must be the first chunk, so its length, type and both sides sit at fixed offsets.
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    length, width, height = struct.unpack_from(">I4xII", data, 8)
    if length != 13 or width > _PNG_MAX_SIDE or height > _PNG_MAX_SIDE:
        return None
    return _positive(width, height)


def _gif_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 10:
        return None
    width, height = struct.unpack_from("<HH", data, 6)
    return _positive(width, height)


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    pos = 2
    end = len(data)
    while pos < end:
        if data[pos] != 0xFF:
            return None
        # Any number of 0xFF fill bytes may precede a marker.
        while pos < end and data[pos] == 0xFF:
            pos += 1
        if pos >= end:
            return None
        marker = data[pos]
        pos += 1
        if marker in _JPEG_STANDALONE:
            continue
        # 0x00 only appears stuffed inside entropy-coded data, and a frame header must
        # precede both the first scan and the end of the image.
        if marker in (0x00, _JPEG_EOI, _JPEG_SOS):
            return None
        if pos + 2 > end:
            return None
        (length,) = struct.unpack_from(">H", data, pos)
        if length < 2:
            return None
        if 0xC0 <= marker <= 0xCF and marker not in _JPEG_NOT_SOF:
            # length(2) precision(1) height(2) width(2) components(1) ...
            if length < 8 or pos + 7 > end:
                return None
            height, width = struct.unpack_from(">HH", data, pos + 3)
            # A zero height means a later DNL segment defines it, which is past the header.
            return _positive(width, height)
        pos += length
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    # RIFF(4) size(4) WEBP(4), then the first chunk: fourcc(4) size(4) payload.
    fourcc = data[12:16]
    payload = 20
    if fourcc == b"VP8 ":
        # A 3-byte frame tag whose low bit is 0 on key frames, the key-frame start code,
        # then 14-bit sides whose top 2 bits are an upscaling hint, not part of the size.
        if len(data) < payload + 10 or data[payload] & 1:
            return None
        if data[payload + 3 : payload + 6] != _VP8_START_CODE:
            return None
        width, height = struct.unpack_from("<HH", data, payload + 6)
        return _positive(width & 0x3FFF, height & 0x3FFF)
    if fourcc == b"VP8L":
        # Signature byte, then width-1 (14 bits), height-1 (14 bits), alpha (1), version (3).
        if len(data) < payload + 5 or data[payload] != _VP8L_SIGNATURE:
            return None
        (bits,) = struct.unpack_from("<I", data, payload + 1)
        if bits >> 29 != 0:
            return None
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if fourcc == b"VP8X":
        # Flags(1) reserved(3), then canvas width-1 and height-1 as 24-bit little-endian.
        if len(data) < payload + 10:
            return None
        width = int.from_bytes(data[payload + 4 : payload + 7], "little") + 1
        height = int.from_bytes(data[payload + 7 : payload + 10], "little") + 1
        return width, height
    return None


def data_url_image_size(url: str, max_header_bytes: int = 64 * 1024) -> tuple[int, int] | None:
    """(width, height) of a ``data:image/...;base64,`` URL, decoding at most a bounded prefix.

    Only enough base64 for ``max_header_bytes`` decoded bytes is decoded, so a multi-megabyte
    upload costs no more than its header; a JPEG whose frame header lies beyond that prefix
    gives None. Non-data URLs, non-image or non-base64 data URLs, and invalid base64 (including
    embedded whitespace) in the decoded prefix give None; characters past it, including a
    trailing group shorter than 4, are never read, so they are not validated. Never raises.
    """
    if max_header_bytes <= 0 or url[:5].lower() != "data:":
        return None
    comma = url.find(",", 5)
    if comma < 0:
        return None
    params = url[5:comma].lower().split(";")
    if len(params) < 2 or params[-1].strip() != "base64" or not params[0].strip().startswith("image/"):
        return None
    # Base64 decodes in 4-character groups; decoding whole groups lets a prefix of the
    # payload be checked and decoded without seeing the rest of it.
    max_chars = -(-max_header_bytes // 3) * 4
    prefix = url[comma + 1 : comma + 1 + max_chars]
    prefix = prefix[: len(prefix) - len(prefix) % 4]
    try:
        header = base64.b64decode(prefix, validate=True)
    except ValueError:
        # binascii.Error is a ValueError, and non-ASCII text raises a plain ValueError.
        return None
    return image_size(header[:max_header_bytes])


@dataclass(frozen=True)
class ImageCostRule:
    """Token prices of one model's image inputs; the defaults are OpenAI's gpt-4o geometry."""

    base_tokens: int
    tile_tokens: int
    tile_size: int = 512
    max_side: int = 2048
    short_side: int = 768
    low_detail_tokens: int | None = None

    def __post_init__(self) -> None:
        # Caught at config load: a zero side or tile would divide by zero on the first request.
        if self.tile_size < 1 or self.max_side < 1 or self.short_side < 1:
            raise ValueError("tile_size, max_side and short_side must be positive")
        if self.base_tokens < 0 or self.tile_tokens < 0:
            raise ValueError("base_tokens and tile_tokens must not be negative")
        if self.low_detail_tokens is not None and self.low_detail_tokens < 0:
            raise ValueError("low_detail_tokens must not be negative")


def image_tokens(width: int, height: int, detail: str, rule: ImageCostRule) -> int:
    """Prompt tokens of one image under OpenAI's tile rule for gpt-4o-style models.

    ``"low"`` costs ``rule.low_detail_tokens`` (or ``rule.base_tokens`` when that is None)
    whatever the size. ``"high"``, ``"auto"`` and any other value are priced as high detail:
    the image is scaled down to fit within ``max_side`` x ``max_side``, then scaled down
    again so that its shorter side is at most ``short_side`` (never up), and the cost is
    ``base_tokens + tile_tokens * ceil(w / tile_size) * ceil(h / tile_size)``.

    Rounding: after each scaling step both sides are rounded down to whole pixels (floor),
    but never below 1. The floor is taken of the exact ratio in integer arithmetic, so the
    side being fitted lands exactly on ``max_side`` / ``short_side`` with no float error
    (a float scale can yield 2047.999... and floor to 2047).

    Raises ValueError when width or height is below 1.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image sides must be positive, got {width}x{height}")
    if detail == "low":
        return rule.base_tokens if rule.low_detail_tokens is None else rule.low_detail_tokens
    longest = max(width, height)
    if longest > rule.max_side:
        width, height = _scale(width, height, rule.max_side, longest)
    shortest = min(width, height)
    if shortest > rule.short_side:
        width, height = _scale(width, height, rule.short_side, shortest)
    tiles = -(-width // rule.tile_size) * -(-height // rule.tile_size)
    return rule.base_tokens + rule.tile_tokens * tiles


def _scale(width: int, height: int, numerator: int, denominator: int) -> tuple[int, int]:
    return max(1, width * numerator // denominator), max(1, height * numerator // denominator)
