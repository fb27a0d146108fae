"""What kind of file an upload is, from its first bytes: a cheap check before any decoder sees it.

The service answers "not a video" from this alone (no FFmpeg demuxer probes an arbitrary upload),
and a file that starts like a video container but does not open is reported as truncated or
damaged (422), not as "not a video" (415). Light (standard library only): the HTTP ingress uses it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from common.errors import NotAVideoError, TooFewFramesError

#: Bytes to read from the start of a file for `sniff_container` (two MPEG-TS packets and a byte).
HEAD_BYTES = 2 * 188 + 1

#: ISO base media (mp4, mov, m4v, 3gp) files start with one of these boxes.
_ISO_BOXES = {b"ftyp", b"styp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"uuid", b"sidx", b"moof"}

#: Kinds that hold several frames (a video container or a zip of images); the rest are images.
VIDEO_KINDS = {"mp4", "matroska", "avi", "gif", "mpeg-ps", "mpeg-ts", "ogg"}


def sniff_container(head: bytes) -> Optional[str]:
    """The container kind of a file starting with `head` (at least HEAD_BYTES when the file has them).

    Returns one of VIDEO_KINDS, "zip", "png", "jpeg", "bmp", "tiff", "webp", or None for anything else.
    """
    if len(head) >= 8 and head[4:8] in _ISO_BOXES:
        return "mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):  # EBML: Matroska and WebM
        return "matroska"
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "avi"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head.startswith((b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3")):  # MPEG program stream, MPEG-1/2 video
        return "mpeg-ps"
    if len(head) > 2 * 188 and head[0] == head[188] == head[2 * 188] == 0x47:  # MPEG transport stream sync bytes
        return "mpeg-ts"
    if head.startswith(b"OggS"):
        return "ogg"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):  # a zip with members, an empty zip
        return "zip"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"BM"):
        return "bmp"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    return None


def sniff_file(path: str | Path) -> Optional[str]:
    """`sniff_container` of a file's first bytes."""
    with open(path, "rb") as f:
        return sniff_container(f.read(HEAD_BYTES))


def require_frames_source(kind: Optional[str], name: str) -> str:
    """`kind` when it can hold several frames (a video container or a zip), else the error to answer.

    Raises:
        NotAVideoError: an unknown file type.
        TooFewFramesError: a single image.
    """
    if kind is None:
        raise NotAVideoError(f"{name} is not a video, a zip of images or an image that can be read (unknown file type)")
    if kind not in VIDEO_KINDS and kind != "zip":
        raise TooFewFramesError(f"{name} is a single {kind} image; at least 2 frames are needed "
                                "(send a video or a zip of ordered images)")
    return kind
