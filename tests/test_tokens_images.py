"""Image sizes read from real headers built byte by byte, and OpenAI's published tile prices."""

from __future__ import annotations

import base64
import struct
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.tokens.images import ImageCostRule, data_url_image_size, image_size, image_tokens

GPT_4O = ImageCostRule(base_tokens=85, tile_tokens=170)
GPT_4O_MINI = ImageCostRule(base_tokens=2833, tile_tokens=5667)


# --- builders -------------------------------------------------------------------------------


def png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    # 8-bit RGBA, deflate, adaptive filtering, no interlace.
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body


APP0_JFIF = segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
DQT = segment(0xDB, b"\x00" + bytes(range(1, 65)))
# A DHT segment (C4) sits in the SOFn marker range; mistaking it for a frame header would
# read table bytes as the size.
DHT = segment(0xC4, b"\x00" + bytes([0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]) + bytes(range(12)))
SOS_AND_SCAN = segment(0xDA, b"\x01\x01\x00\x00\x3f\x00") + b"\x12\x34\xff\x00\x56" + b"\xff\xd9"


def sof(marker: int, width: int, height: int) -> bytes:
    components = b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return segment(marker, struct.pack(">BHHB", 8, height, width, 3) + components)


def jpeg(width: int, height: int, sof_marker: int = 0xC0, before_sof: bytes = b"") -> bytes:
    return b"\xff\xd8" + APP0_JFIF + DQT + before_sof + sof(sof_marker, width, height) + DHT + SOS_AND_SCAN


def gif(width: int, height: int, version: bytes = b"89a") -> bytes:
    # Global colour table of 2 entries, then a trailer: enough for a parser to stop cleanly.
    return b"GIF" + version + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00" * 6 + b";"


def chunk(fourcc: bytes, payload: bytes) -> bytes:
    return fourcc + struct.pack("<I", len(payload)) + payload + b"\x00" * (len(payload) % 2)


def riff(*chunks: bytes) -> bytes:
    body = b"WEBP" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def webp_vp8(width: int, height: int, scale_bits: int = 0) -> bytes:
    # Frame tag: key frame (bit 0 clear), version 0, shown, first partition of 16 bytes.
    tag = (1 << 4) | (16 << 5)
    frame = tag.to_bytes(3, "little") + b"\x9d\x01\x2a"
    frame += struct.pack("<HH", width | scale_bits << 14, height | scale_bits << 14)
    return riff(chunk(b"VP8 ", frame + b"\x00" * 16))


def vp8l_bitstream(width: int, height: int, alpha: bool = False) -> bytes:
    bits = (width - 1) | (height - 1) << 14 | int(alpha) << 28
    return b"\x2f" + struct.pack("<I", bits) + b"\x00" * 8


def webp_vp8l(width: int, height: int, alpha: bool = False) -> bytes:
    return riff(chunk(b"VP8L", vp8l_bitstream(width, height, alpha)))


def webp_vp8x(width: int, height: int) -> bytes:
    # Flags: alpha. The image chunk that follows is deliberately smaller than the canvas:
    # the canvas, not the first frame, is the image's size.
    canvas = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return riff(chunk(b"VP8X", b"\x10\x00\x00\x00" + canvas), chunk(b"VP8L", vp8l_bitstream(1, 1, True)))


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


# --- sizes ----------------------------------------------------------------------------------

COMMON_SIZES = [(1, 1), (300, 200), (200, 300), (4000, 3000), (1024, 1024)]


@pytest.mark.parametrize(("width", "height"), [*COMMON_SIZES, (2**31 - 1, 2**31 - 1), (1, 2**31 - 1)])
def test_png(width: int, height: int) -> None:
    assert image_size(png(width, height)) == (width, height)


def test_png_rejects_zero_and_out_of_range_sides() -> None:
    assert image_size(png(0, 10)) is None
    assert image_size(png(10, 0)) is None
    assert image_size(png(2**31, 10)) is None


def test_png_needs_ihdr_first() -> None:
    data = bytearray(png(10, 10))
    data[12:16] = b"IDAT"
    assert image_size(bytes(data)) is None


@pytest.mark.parametrize("sof_marker", [0xC0, 0xC1, 0xC2, 0xC3, 0xC9, 0xCF])
@pytest.mark.parametrize(("width", "height"), [*COMMON_SIZES, (65535, 65535), (65535, 1)])
def test_jpeg_frame_headers(sof_marker: int, width: int, height: int) -> None:
    assert image_size(jpeg(width, height, sof_marker)) == (width, height)


def test_jpeg_skips_tables_fill_bytes_and_standalone_markers() -> None:
    dac = segment(0xCC, b"\x00\x10")
    exif = segment(0xE1, b"Exif\x00\x00" + b"\xc0" * 300)
    # Fill bytes before a marker, a TEM, restart markers and a stray SOI carry no length.
    standalone = b"\xff\xff\xff\x01\xff\xd0\xff\xd7\xff\xd8"
    data = jpeg(640, 480, before_sof=DHT + dac + exif + standalone + b"\xff\xff")
    assert image_size(data) == (640, 480)


def test_jpeg_without_frame_header_before_scan_or_end() -> None:
    assert image_size(b"\xff\xd8" + APP0_JFIF + DQT + SOS_AND_SCAN) is None
    assert image_size(b"\xff\xd8" + APP0_JFIF + b"\xff\xd9") is None
    # Height 0 defers to a DNL segment after the scan, which a header read cannot see.
    assert image_size(jpeg(640, 0)) is None


def test_jpeg_corrupt_segments() -> None:
    assert image_size(b"\xff\xd8" + APP0_JFIF + b"\x00" + sof(0xC0, 8, 8)) is None
    assert image_size(b"\xff\xd8\xff\xe0\x00\x01" + sof(0xC0, 8, 8)) is None
    assert image_size(b"\xff\xd8\xff\xc0\x00\x05\x08\x00\x08\x00\x08") is None
    assert image_size(b"\xff\xd8\xff\xff\xff") is None


@pytest.mark.parametrize("version", [b"87a", b"89a"])
@pytest.mark.parametrize(("width", "height"), [*COMMON_SIZES, (65535, 65535)])
def test_gif(version: bytes, width: int, height: int) -> None:
    assert image_size(gif(width, height, version)) == (width, height)


def test_gif_other_versions_and_zero_sides() -> None:
    assert image_size(gif(10, 10, b"88a")) is None
    assert image_size(gif(0, 10)) is None


@pytest.mark.parametrize(("width", "height"), [*COMMON_SIZES, (16383, 16383)])
def test_webp_lossy(width: int, height: int) -> None:
    assert image_size(webp_vp8(width, height)) == (width, height)
    # The top two bits of each side are an upscaling hint for the decoder, not size.
    assert image_size(webp_vp8(width, height, scale_bits=3)) == (width, height)


def test_webp_lossy_needs_a_key_frame() -> None:
    data = bytearray(webp_vp8(10, 10))
    data[20] |= 1
    assert image_size(bytes(data)) is None
    data = bytearray(webp_vp8(10, 10))
    data[23:26] = b"\x9d\x01\x2b"
    assert image_size(bytes(data)) is None


@pytest.mark.parametrize(("width", "height"), [*COMMON_SIZES, (16384, 16384), (16384, 1)])
def test_webp_lossless(width: int, height: int) -> None:
    assert image_size(webp_vp8l(width, height)) == (width, height)
    assert image_size(webp_vp8l(width, height, alpha=True)) == (width, height)


def test_webp_lossless_rejects_other_versions_and_signatures() -> None:
    data = bytearray(webp_vp8l(10, 10))
    data[24] |= 0x20
    assert image_size(bytes(data)) is None
    data = bytearray(webp_vp8l(10, 10))
    data[20] = 0x2E
    assert image_size(bytes(data)) is None


@pytest.mark.parametrize(("width", "height"), [*COMMON_SIZES, (16384, 16384), (2**24, 2**24), (2**24, 1)])
def test_webp_extended(width: int, height: int) -> None:
    assert image_size(webp_vp8x(width, height)) == (width, height)


def test_unknown_and_truncated_formats() -> None:
    assert image_size(b"") is None
    assert image_size(b"BM" + b"\x00" * 64) is None
    assert image_size(riff(chunk(b"VP8Z", b"\x00" * 32))) is None
    assert image_size(b"RIFF\x00\x00\x00\x00WAVEfmt ") is None


# --- data URLs ------------------------------------------------------------------------------


def test_data_urls() -> None:
    assert data_url_image_size(data_url(png(300, 200))) == (300, 200)
    assert data_url_image_size(data_url(jpeg(4000, 3000), "image/jpeg")) == (4000, 3000)
    assert data_url_image_size(data_url(gif(1, 1), "image/gif")) == (1, 1)
    assert data_url_image_size(data_url(webp_vp8l(640, 480), "image/webp")) == (640, 480)
    assert data_url_image_size("DATA:Image/PNG;BASE64," + data_url(png(7, 9)).split(",", 1)[1]) == (7, 9)
    assert data_url_image_size(data_url(png(7, 9), "image/png;name=a.png")) == (7, 9)


def test_data_url_decodes_only_a_prefix() -> None:
    # Everything after the first 2 KiB is not base64: decoding it would fail, so it must not be read.
    url = data_url(png(300, 200) + bytes(2048)) + "!" * 1_000_000
    assert data_url_image_size(url, max_header_bytes=1024) == (300, 200)


def test_jpeg_frame_header_beyond_the_limit() -> None:
    # Two maximal APP segments push the frame header past 128 KiB, as large EXIF/ICC blocks do.
    big_app = segment(0xE1, b"\x00" * 65533) + segment(0xE2, b"\x00" * 65533)
    url = data_url(jpeg(800, 600, before_sof=big_app), "image/jpeg")
    assert data_url_image_size(url) is None
    assert data_url_image_size(url, max_header_bytes=256 * 1024) == (800, 600)


def test_limit_is_exact_in_decoded_bytes() -> None:
    data = png(300, 200)
    assert data_url_image_size(data_url(data), max_header_bytes=24) == (300, 200)
    assert data_url_image_size(data_url(data), max_header_bytes=23) is None
    assert data_url_image_size(data_url(data), max_header_bytes=0) is None
    assert data_url_image_size(data_url(data), max_header_bytes=-5) is None


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/cat.png",
        "http://example.com/data:image/png;base64,",
        "data:image/png,%89PNG",
        "data:image/png;base64",
        "data:;base64," + base64.b64encode(png(1, 1)).decode(),
        "data:text/plain;base64," + base64.b64encode(png(1, 1)).decode(),
        "data:image/png;base64,iVBORw0KGgo*AAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAAAA==",
        "data:image/png;base64,iVBORw0K\nGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJ",
        "data:image/png;base64,iVBO=w0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJ",
        "data:image/png;base64,iVBORw0KGgoAAAANSUhEU\u00e9gAAAAEAAAABCAYAAAAfFcSJ",
        "data:image/png;base64,",
        "",
    ],
)
def test_data_urls_that_give_no_size(url: str) -> None:
    assert data_url_image_size(url) is None


# --- costs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "detail", "tokens"),
    [
        (1024, 1024, "high", 765),
        (2048, 4096, "high", 1105),
        (4096, 8192, "low", 85),
        (512, 512, "high", 255),
        (100, 100, "high", 255),
        (100, 100, "auto", 255),
        (1024, 1024, "auto", 765),
        (1024, 1024, "something-new", 765),
    ],
)
def test_gpt_4o_published_examples(width: int, height: int, detail: str, tokens: int) -> None:
    assert image_tokens(width, height, detail, GPT_4O) == tokens


def test_gpt_4o_mini() -> None:
    assert image_tokens(1024, 1024, "high", GPT_4O_MINI) == 2833 + 5667 * 4 == 25501
    assert image_tokens(1024, 1024, "low", GPT_4O_MINI) == 2833


def test_low_detail_tokens_override() -> None:
    rule = ImageCostRule(base_tokens=85, tile_tokens=170, low_detail_tokens=42)
    assert image_tokens(4096, 8192, "low", rule) == 42
    assert image_tokens(512, 512, "high", rule) == 255


def test_scaling_floors_and_never_upscales() -> None:
    # 3000x1000 fits to 2048x682 (floor of 682.67); the short side is already under 768.
    assert image_tokens(3000, 1000, "high", GPT_4O) == 85 + 170 * 4 * 2
    # 2049 wide: float scaling gives 2047.999...; the exact ratio keeps 2048 -> 4 tiles wide.
    assert image_tokens(2049, 700, "high", GPT_4O) == 85 + 170 * 4 * 2
    # A 1-pixel-tall strip scales to 0 rows; the floor stops at 1.
    assert image_tokens(100_000, 1, "high", GPT_4O) == 85 + 170 * 4
    assert image_tokens(769, 769, "high", GPT_4O) == 85 + 170 * 4
    assert image_tokens(767, 767, "high", GPT_4O) == 85 + 170 * 4
    assert image_tokens(513, 100, "high", GPT_4O) == 85 + 170 * 2


def test_invalid_sizes_and_rules() -> None:
    with pytest.raises(ValueError):
        image_tokens(0, 10, "high", GPT_4O)
    with pytest.raises(ValueError):
        ImageCostRule(base_tokens=85, tile_tokens=170, tile_size=0)
    with pytest.raises(ValueError):
        ImageCostRule(base_tokens=-1, tile_tokens=170)


def test_rule_is_frozen() -> None:
    with pytest.raises(AttributeError):
        GPT_4O.base_tokens = 1  # type: ignore[misc]


# --- never raises ---------------------------------------------------------------------------

VALID = [
    (png(300, 200), (300, 200)),
    (jpeg(300, 200, before_sof=b"\xff\xff\xff\xd0"), (300, 200)),
    (jpeg(300, 200, 0xC2), (300, 200)),
    (gif(300, 200, b"87a"), (300, 200)),
    (gif(300, 200), (300, 200)),
    (webp_vp8(300, 200), (300, 200)),
    (webp_vp8l(300, 200), (300, 200)),
    (webp_vp8x(300, 200), (300, 200)),
]


def test_every_truncation_gives_none_or_the_true_size() -> None:
    for data, size in VALID:
        for end in range(len(data) + 1):
            assert image_size(data[:end]) in (None, size), (data[:end], size)


@given(st.binary(max_size=512))
def test_image_size_never_raises(data: bytes) -> None:
    result = image_size(data)
    assert result is None or (result[0] > 0 and result[1] > 0)


@given(st.sampled_from([data for data, _ in VALID]), st.data())
def test_image_size_never_raises_on_mutated_headers(valid: bytes, draw: st.DataObject) -> None:
    end = draw.draw(st.integers(0, len(valid)))
    data = bytearray(valid[:end])
    for _ in range(draw.draw(st.integers(0, 4))):
        if data:
            data[draw.draw(st.integers(0, len(data) - 1))] = draw.draw(st.integers(0, 255))
    result = image_size(bytes(data))
    assert result is None or (result[0] > 0 and result[1] > 0)


@given(st.text())
def test_data_url_never_raises_on_text(url: str) -> None:
    data_url_image_size(url)


@given(
    st.sampled_from(["data:image/png;base64,", "data:image/jpeg;base64,", "data:image/;base64,"]),
    st.one_of(st.text(), st.binary().map(lambda b: base64.b64encode(b).decode())),
    st.integers(-4, 64),
)
def test_data_url_never_raises_on_payloads(prefix: str, payload: str, limit: int) -> None:
    data_url_image_size(prefix + payload, max_header_bytes=limit)


@given(st.sampled_from([data for data, _ in VALID]), st.integers(0, 64), st.integers(1, 64))
def test_data_url_truncations(valid: bytes, end: int, limit: int) -> None:
    url = data_url(valid)
    result = data_url_image_size(url[: len("data:image/png;base64,") + end], max_header_bytes=limit)
    assert result in (None, (300, 200))
