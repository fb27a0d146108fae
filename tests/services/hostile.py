"""The hostile-input corpus: files an attacker would upload, built in seconds from a few kilobytes.

Shared by tests/services/test_score_api.py (through HTTP, one test per case) and
benchmarks/bench_hostile.py (status, time and the scorer's peak memory per case). Every case
names the answer the service must give; each is small on the wire and large (or broken) inside.
"""

from __future__ import annotations

import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path], Path]  # writes the file into a folder, returns its path
    statuses: tuple[int, ...]  # acceptable HTTP answers
    says: str = ""  # a word the error sentence must contain


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def deflate_zeros(n: int) -> bytes:
    """A raw deflate stream of `n` zero bytes, built without deflating them all: after a full flush,
    deflate emits the same bytes for the same input, so one compressed 16 MiB block is repeated."""
    chunk = 16 << 20
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    deflate.compress(b"\0" * chunk)
    deflate.flush(zlib.Z_FULL_FLUSH)
    block = deflate.compress(b"\0" * chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
    full, rest = divmod(n, chunk)
    return block * full + deflate.compress(b"\0" * rest) + deflate.flush()


def crc32_zeros(n: int) -> int:
    crc, chunk = 0, b"\0" * (16 << 20)
    for _ in range(n // len(chunk)):
        crc = zlib.crc32(chunk, crc)
    return zlib.crc32(b"\0" * (n % len(chunk)), crc)


def png_bomb(width: int, height: int) -> bytes:
    """A valid black RGB PNG of width x height: about 1 MB on disk for 20000 x 20000 (1.2 GB of pixels)."""
    raw = height * (1 + 3 * width)  # a filter byte and the pixels of each row, all zero
    adler = ((raw % 65521) << 16) | 1  # Adler-32 of zeros: a stays 1, b grows by 1 per byte
    idat = b"\x78\xda" + deflate_zeros(raw) + struct.pack(">I", adler)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def png_with_garbage_pixels(width: int = 64, height: int = 48) -> bytes:
    """A PNG whose header is fine and whose pixel data is not deflate at all."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", b"\x13\x37" * 200) + _png_chunk(b"IEND", b"")


def zeros_zip(path: Path, member_bytes: int, count: int = 2, name: str = "frame{:03d}.png") -> Path:
    """A zip of `count` members of `member_bytes` zeros each, declared honestly (zip64 when needed)."""
    data = deflate_zeros(member_bytes)
    crc, compressed = crc32_zeros(member_bytes), len(data)
    zip64 = member_bytes >= 0xFFFFFFFF or compressed >= 0xFFFFFFFF
    with open(path, "wb") as f:
        central = []
        for i in range(count):
            fname = name.format(i).encode()
            offset = f.tell()
            extra = struct.pack("<HHQQ", 1, 16, member_bytes, compressed) if zip64 else b""
            sizes = (0xFFFFFFFF, 0xFFFFFFFF) if zip64 else (compressed, member_bytes)
            f.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 45 if zip64 else 20, 0, 8, 0, 0, crc, *sizes, len(fname), len(extra)))
            f.write(fname + extra + data)
            central.append((fname, offset))
        cd_start = f.tell()
        for fname, offset in central:
            extra = struct.pack("<HHQQQ", 1, 24, member_bytes, compressed, offset) if zip64 else b""
            sizes = (0xFFFFFFFF, 0xFFFFFFFF) if zip64 else (compressed, member_bytes)
            f.write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45 if zip64 else 20, 0, 8, 0, 0, crc, *sizes,
                                len(fname), len(extra), 0, 0, 0, 0, 0xFFFFFFFF if zip64 else offset))
            f.write(fname + extra)
        cd_end = f.tell()
        if zip64:
            f.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, cd_end - cd_start, cd_start))
            f.write(struct.pack("<IIQI", 0x07064B50, 0, cd_end, 1))
        f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, cd_end - cd_start, min(cd_start, 0xFFFFFFFF), 0))
    return path


def lying_zip(path: Path, member_bytes: int = 100 << 20, declared: int = 1000) -> Path:
    """A zip whose members inflate to `member_bytes` but declare `declared` bytes."""
    zeros_zip(path, member_bytes)
    data = bytearray(path.read_bytes())
    at = data.find(b"PK\x01\x02")
    while at >= 0:  # central directory: uncompressed size at +24
        data[at + 24 : at + 28] = struct.pack("<I", declared)
        at = data.find(b"PK\x01\x02", at + 4)
    path.write_bytes(bytes(data))
    return path


def zip_of(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def many_entries_zip(path: Path, entries: int = 20_000) -> Path:
    """A zip of many empty members: the directory alone would cost memory to parse."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for i in range(entries):
            z.writestr(f"{i}.png", b"")
    return path


def clip(path: Path, frames: int = 20, size: tuple[int, int] = (96, 128), **container_options: str) -> Path:
    """A small H.264 clip (noise frames) written with the given muxer options."""
    import av
    import numpy as np

    pixels = (np.random.default_rng(0).random((frames, *size, 3)) * 255).astype("uint8")
    with av.open(str(path), "w", options=container_options) as container:
        stream = container.add_stream("libx264", rate=8)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        for image in pixels:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def cut_in_half(source: Path, path: Path) -> Path:
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _in(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def corpus(bomb_side: int = 20000, zip_bomb_bytes: int = 3 << 30) -> list[Case]:
    """Every hostile case of issue 11, with the answers the service must give.

    bomb_side: side of the PNG bombs (the issue's 20000 px; tests use less to build faster).
    zip_bomb_bytes: inflated size of each of the zip bomb's two members (the issue's 3 GB).
    """

    def png_bombs(folder: Path) -> Path:
        bomb = png_bomb(bomb_side, bomb_side)
        return zip_of(_in(folder, "png-bombs.zip"), {"000.png": bomb, "001.png": bomb})

    def single_png_bomb(folder: Path) -> Path:
        path = _in(folder, "bomb.png")
        path.write_bytes(png_bomb(bomb_side, bomb_side))
        return path

    def text(folder: Path) -> Path:
        path = _in(folder, "notes.mp4")
        path.write_bytes(b"not a video\n" * 500)
        return path

    def broken_pngs(folder: Path) -> Path:
        return zip_of(_in(folder, "zip-broken-png.zip"), {"000.png": png_with_garbage_pixels(),
                                                          "001.png": png_with_garbage_pixels()})

    def truncated(name: str, **options: str) -> Callable[[Path], Path]:
        return lambda folder: cut_in_half(clip(_in(folder, name), **options), folder / f"half-{name}")

    return [
        Case("zip of two PNG bombs", png_bombs, (413,), "resolution"),
        Case("zip bomb, honest sizes", lambda d: zeros_zip(_in(d, "zip-bomb.zip"), zip_bomb_bytes), (413,), "limit"),
        Case("zip bomb, lying sizes", lambda d: lying_zip(_in(d, "zip-liar.zip")), (422,), "damaged"),
        Case("zip of 20000 entries", lambda d: many_entries_zip(_in(d, "zip-many.zip")), (413,), "entries"),
        Case("zip of PNGs with broken pixels", broken_pngs, (422,), "image"),
        Case("single PNG bomb", single_png_bomb, (422,), "single"),
        Case("mp4 cut in half, index at the end", truncated("end.mp4"), (422,), "truncated"),
        Case("mp4 cut in half, index at the front", truncated("front.mp4", movflags="faststart"), (422,), "truncated"),
        Case("mkv cut in half, cues at the end", truncated("end.mkv"), (422,), "truncated"),
        Case("mkv cut in half, cues at the front", truncated("front.mkv", reserve_index_space="20000"), (422,), "truncated"),
        Case("text named .mp4", text, (415,), "not a video"),
    ]
