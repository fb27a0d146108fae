"""Reading and writing videos: files (PyAV), folders of ordered images, zips of ordered images.

Pixel convention, defined once: decoded frames are uint8 RGB (N, H, W, 3); scoring works on
float32 in [0, 1] made by `to_float` (x / 255). No range is ever guessed from the data.

Frames are returned as a player shows them (`Display`): upright (a video's display rotation, an
image's EXIF orientation) and with square pixels (a video's sample aspect ratio). The scorer's
cameras are pinholes with one focal length: a frame of non-square pixels has none, and its video
would be judged less consistent than it is.
"""

from __future__ import annotations

import io
import lzma
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable, Sequence, Union

import av
import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from common.containers import require_frames_source, sniff_file
from common.deadline import check_deadline
from common.errors import (
    CorruptVideoError,
    InputNotFoundError,
    InputTooLargeError,
    NotAVideoError,
    TooFewFramesError,
)

VIDEO_SUFFIXES = {".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif", ".m4v", ".mpg", ".mpeg"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}

#: Largest image file (one frame of a folder or a zip) that is read into memory to be decoded.
#: A zip member is checked by its declared size and again while it is inflated.
MAX_IMAGE_FILE_BYTES = 64 * 1024**2
#: What zipfile can raise on a damaged or hostile archive (bad CRC, unsupported or encrypted member...).
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, NotImplementedError, RuntimeError,
               ValueError, OSError, struct.error)

VideoSource = Union[str, Path, np.ndarray, Tensor]


@dataclass
class DecodedVideo:
    """Frames at the scoring resolution, and where they came from."""

    frames: Tensor  # (N, H, W, 3) uint8 RGB, only the frames that were asked for
    indices: list[int]  # index of each kept frame in the whole video
    total_frames: int  # frames in the whole video
    source_size: tuple[int, int]  # (height, width) as shown (`Display`), before resizing
    fps: float | None = None


def uniform_indices(total: int, count: int) -> list[int]:
    """`count` indices spread uniformly over [0, total - 1], first and last included, no repeats."""
    count = min(count, total)
    if count == 1:
        return [0]
    return sorted({int(round(i * (total - 1) / (count - 1))) for i in range(count)})


def evenly_filled(total: int, keep: Sequence[int], count: int) -> list[int]:
    """`keep` (indices in [0, total - 1]) plus the first and last index, filled up to `count`
    indices: each added index goes to the gap between kept ones whose spacing is then widest (the
    earliest of equal ones), and each gap's added indices are spread evenly over it.

    Unlike the union of `keep` with `uniform_indices(total, count)`, the result has `count`
    indices (when `keep` has fewer), not up to `count + len(keep)`: where `keep` is already
    spread out, a uniform grid of its own lands next to it and adds indices that add little.
    """
    if total <= 0:
        return []
    kept = sorted(set(keep) | {0, total - 1})
    gaps = [b - a for a, b in zip(kept, kept[1:])]
    added = [0] * len(gaps)
    for _ in range(max(0, min(count, total) - len(kept))):
        open_gaps = [k for k in range(len(gaps)) if added[k] < gaps[k] - 1]
        if not open_gaps:
            break
        widest = max(open_gaps, key=lambda k: (gaps[k] / (added[k] + 1), -k))
        added[widest] += 1
    chosen = set(kept)
    for a, gap, n in zip(kept, gaps, added):
        chosen.update(a + round(j * gap / (n + 1)) for j in range(1, n + 1))
    return sorted(chosen)


def to_float(frames: Tensor) -> Tensor:
    """uint8 (..., 3) -> float32 in [0, 1]."""
    if frames.dtype != torch.uint8:
        raise TypeError(f"expected uint8 frames, got {frames.dtype}")
    return frames.float() / 255.0


def constant_borders(
    frames: Tensor, tolerance: int = 8, max_level: int = 40, margin: int = 2, max_fraction: float = 0.5
) -> tuple[int, int, int, int]:
    """(top, bottom, left, right): how many pixels of bars of one dark colour (letterbox,
    pillarbox, a black frame edge) line the edges of every frame of `frames` (N, H, W, 3) uint8.

    A row (a column) belongs to a bar when, over every frame, 95% of its pixels stay within
    `tolerance` grey levels of one colour (not all: a codec's ringing spills into a bar's lines
    next to a bar of another colour) no channel of which is above `max_level`. Dark only: a flat
    wall, a white backdrop or a clear sky can fill whole rows of every frame too, and they are
    scene (without texture, they get no depth anyway). Bars are counted from each edge inwards,
    plus `margin` pixels for the ringing where the picture starts. A bar holds no scene: with a
    moving camera the scene's points reproject behind it and every comparison there is an error
    (bear with black bars over a quarter of the frame: 0.2178 kept, 0.1573 cut; docs/backends.md,
    "Letterbox and pillarbox bars"). Bars that would leave less than `max_fraction` of an axis
    are not counted on it (a clip of one colour is left whole, for the static-camera check).
    0.03-0.07 s for 32 frames of 720 x 404-480 (2-core CPU; a second round only with side bars).
    """
    low = frames.amin(dim=0).to(torch.int16)  # (H, W, 3) over time
    high = frames.amax(dim=0).to(torch.int16)
    height, width = low.shape[:2]

    def leading(low: Tensor, high: Tensor) -> int:
        """Leading lines (first dimension) of one colour over time; low, high: (L, P, 3)."""
        if low.shape[0] == 0 or low.shape[1] == 0:
            return 0
        colour = ((low + high) / 2).median(dim=1, keepdim=True).values  # (L, 1, 3)
        deviation = torch.maximum((high - colour).abs(), (low - colour).abs()).amax(dim=-1)  # (L, P)
        constant = (torch.quantile(deviation.float(), 0.95, dim=1) <= tolerance) & (colour[:, 0].amax(dim=-1) <= max_level)
        first_content = torch.nonzero(~constant)
        return int(first_content[0]) if len(first_content) else len(constant)

    def both_ends(low: Tensor, high: Tensor) -> tuple[int, int]:
        return leading(low, high), leading(low.flip(0), high.flip(0))

    # Rows are judged between the side bars and columns between the top and bottom ones, so a
    # second round finds bars of two colours (black above and below, grey at the sides). Without
    # side bars the second round would judge the same rows again: most clips end after one.
    left = right = 0
    for _ in range(2):
        cols = slice(left, width - right)
        top, bottom = both_ends(low[:, cols], high[:, cols])
        rows = slice(top, max(top, height - bottom))
        left, right = both_ends(low[rows].transpose(0, 1), high[rows].transpose(0, 1))
        if not (left or right):
            break

    def with_margin(start: int, end: int, size: int) -> tuple[int, int]:
        start, end = (start + margin if start else 0), (end + margin if end else 0)
        return (start, end) if start + end <= (1 - max_fraction) * size else (0, 0)

    return (*with_margin(top, bottom, height), *with_margin(left, right, width))


def _colour_histogram(frame: np.ndarray) -> tuple[np.ndarray, float]:
    """One (H, W, 3) uint8 RGB frame at 128 px -> its (30, 32) float32 hue-saturation histogram summing
    to 1, and its contrast (standard deviation of the grey levels).

    Hue and saturation, not brightness: exposure that changes from frame to frame barely moves it."""
    height, width = frame.shape[:2]
    scale = min(1.0, 128 / max(height, width))
    small = cv2.resize(frame, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)
    hist = cv2.calcHist([cv2.cvtColor(small, cv2.COLOR_RGB2HSV)], [0, 1], None, [30, 32], [0, 180, 0, 256])
    return hist / max(float(hist.sum()), 1.0), float(cv2.cvtColor(small, cv2.COLOR_RGB2GRAY).std())


def shot_cuts(frames: Tensor, min_distance: float = 0.8, min_ratio: float = 5.0, min_contrast: float = 4.0) -> list[int]:
    """Positions k in `frames` (N, H, W, 3) uint8 where a new shot begins: frame k shows another scene than frame k - 1.

    A cut is a jump of the colour histogram (`_colour_histogram`, Bhattacharyya distance) between
    neighbouring frames of at least `min_distance` and `min_ratio` times the video's median jump,
    that lasts: the frames on each side of it, one step further (where there is one), differ as
    much (one odd frame inside the video, a flash or a glitch, is not a cut). Frames without
    contrast (grey standard deviation under `min_contrast` levels: black, a fade) are no scene and
    cut nothing. Measured (docs/backends.md, "Scene cuts"): between the frames of the benchmark's
    videos, sparse captures of views 45 degrees apart included, the largest jump is 0.61 and at
    most 2.6 times the median; a cut from one real clip to another 0.985-0.994 and 10-11 times.
    Under 1 ms a frame at 720 px.
    """
    if len(frames) < 2:
        return []
    hists, contrasts = zip(*(_colour_histogram(frame) for frame in frames.numpy()))

    def distance(a: int, b: int) -> float:
        return float(cv2.compareHist(hists[a], hists[b], cv2.HISTCMP_BHATTACHARYYA))

    jumps = np.array([distance(k, k + 1) for k in range(len(frames) - 1)])
    cuts = []
    for a, jump in enumerate(jumps):
        b = a + 1
        if jump < min_distance or min(contrasts[a], contrasts[b]) < min_contrast:
            continue
        others = np.delete(jumps, a)
        if len(others) and jump < min_ratio * float(np.median(others)):
            continue
        lasting = (b + 1 >= len(frames) or distance(a, b + 1) >= min_distance) and (a == 0 or distance(a - 1, b) >= min_distance)
        if lasting:
            cuts.append(b)
    return cuts


def static_overlay(
    frames: Tensor, max_side: int = 360, max_range: float = 10.0, min_contrast: float = 25.0, min_area: float = 0.0005,
    max_static: float = 0.8, quantile: float = 0.1,
) -> Tensor:
    """(H, W) bool: the pixels of `frames` (N, H, W, 3) uint8 that hold an overlay fixed to the screen while the
    picture moves: a watermark, a logo, a caption, a dashboard. They are not scene and follow no camera.

    At `max_side` px, in grey levels: a pixel is an overlay pixel where its 5 x 5 neighbourhood in
    the median frame has a contrast (standard deviation) of at least `min_contrast` and its value
    over the frames stays within `max_range` (after a 3 x 3 blur, between the `quantile` and
    1 - `quantile` quantiles over the frames: a low-bitrate codec redraws thin letters differently
    in some frames), as decoded (an overlay composited onto the video) or with each frame scaled to
    the video's mean brightness (one that a model drew into its frames, flickering with them). A
    textured scene point under a moving camera changes; a flat wall or sky does not, but it has no
    contrast. Blobs of at least `min_area` of the frame (strokes closed into words), grown by 2 px
    at `max_side`. Nothing when more than `max_static` of the contrasted pixels stay still: the
    camera barely moves (the static-camera check judges that). Chosen on 175 videos without an
    overlay (nothing found in any) and 28 with a caption (26 found; docs/backends.md, "Screen
    overlays"). 50-180 ms for 32 frames of 720 px (2-core CPU).
    """
    arrays = frames.numpy()
    count, height, width, _ = arrays.shape
    empty = torch.zeros(height, width, dtype=torch.bool)
    if count < 3:
        return empty
    scale = min(1.0, max_side / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    grey = np.stack([cv2.resize(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), size, interpolation=cv2.INTER_AREA) for f in arrays])
    grey = np.stack([cv2.GaussianBlur(g, (3, 3), 0) for g in grey.astype(np.float32)])
    means = grey.reshape(count, -1).mean(axis=1)
    levelled = grey * (means.mean() / np.maximum(means, 1.0))[:, None, None]

    lowest, highest = int(quantile * (count - 1)), count - 1 - int(quantile * (count - 1))

    def stays(values: np.ndarray) -> np.ndarray:  # (N, h, w) -> (h, w): within max_range between the quantiles
        ordered = np.partition(values, (lowest, highest), axis=0)
        return ordered[highest] - ordered[lowest] <= max_range

    still = stays(grey) | stays(levelled)
    median = np.median(grey, axis=0)
    mean = cv2.blur(median, (5, 5))
    contrast = np.sqrt(np.maximum(cv2.blur(median * median, (5, 5)) - mean * mean, 0.0)) >= min_contrast
    candidates = (still & contrast).astype(np.uint8)
    if not contrast.any() or candidates.sum() > max_static * contrast.sum():
        return empty
    candidates = cv2.morphologyEx(candidates, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7)))
    _, labels, stats, _ = cv2.connectedComponentsWithStats(candidates, connectivity=8)
    big = stats[:, cv2.CC_STAT_AREA] >= min_area * candidates.size
    big[0] = False  # label 0 is the background
    mask = cv2.dilate(big[labels].astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    return torch.from_numpy(cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST) > 0)


def inpainted(frames: Tensor, mask: Tensor, radius: int = 3) -> Tensor:
    """(N, H, W, 3) uint8 `frames` with the (H, W) bool `mask` filled from its surroundings, frame by frame
    (OpenCV's Telea inpainting): a screen overlay's sharp, still edges would give structure-from-motion
    features that do not move with the scene."""
    if not bool(mask.any()):
        return frames
    hole = mask.numpy().astype(np.uint8)
    return torch.from_numpy(np.stack([cv2.inpaint(f, hole, radius, cv2.INPAINT_TELEA) for f in frames.numpy()]))


#: Sample aspect ratios (pixel width / height) taken as a picture's: anamorphic formats use 8:9 to
#: 2:1. Beyond these the number is damaged metadata, and honouring it would stretch the frame absurdly.
SAR_RANGE = (Fraction(1, 4), Fraction(4))
#: EXIF orientation tag (1-8) -> (quarter turns counter-clockwise, mirrored first): the picture PIL's
#: ImageOps.exif_transpose shows.
_EXIF_ORIENTATIONS = {1: (0, False), 2: (0, True), 3: (2, False), 4: (2, True), 5: (1, True), 6: (3, False),
                      7: (3, True), 8: (1, False)}


@dataclass(frozen=True)
class Display:
    """How stored pixels are shown: mirrored left-right first (`mirror`), then turned counter-clockwise
    by `quarter_turns` x 90 degrees, with pixels `sar` times as wide as they are high."""

    quarter_turns: int = 0
    mirror: bool = False
    sar: Fraction = Fraction(1)

    @classmethod
    def of_exif(cls, orientation: int | None) -> "Display":
        turns, mirror = _EXIF_ORIENTATIONS.get(orientation or 1, (0, False))  # a tag out of 1-8 says nothing
        return cls(turns, mirror)

    @classmethod
    def of_video(cls, rotation_deg: float | None, sar: Fraction | None, what: str) -> "Display":
        """From PyAV: `VideoFrame.rotation` (degrees counter-clockwise) and the codec's sample aspect ratio
        (None or 0 where unknown: square). A rotation off the quarter turns is left alone, as ffmpeg does."""
        rotation_deg = rotation_deg or 0
        turns = round(rotation_deg / 90)
        if abs(rotation_deg - 90 * turns) > 1:
            turns = 0
        sar = Fraction(sar) if sar else Fraction(1)
        if not SAR_RANGE[0] <= sar <= SAR_RANGE[1]:
            raise CorruptVideoError(f"{what}: sample aspect ratio {sar.numerator}:{sar.denominator} is not a "
                                    f"picture's (from 1:4 to 4:1)")
        return cls(turns % 4, False, sar)

    def size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) shown for stored (height, width)."""
        width = max(1, round(width * self.sar))
        return (width, height) if self.quarter_turns % 2 else (height, width)

    def show(self, image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """A stored (h, w, 3) image as shown, resized to `size` (height, width, as shown)."""
        image = _resize(image, (size[1], size[0]) if self.quarter_turns % 2 else size)  # resized while still stored
        if self.mirror:
            image = image[:, ::-1]
        return np.ascontiguousarray(np.rot90(image, self.quarter_turns)) if self.quarter_turns or self.mirror else image


def resized_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(h, w) with the long side at most max_side, aspect kept, both even (video codecs like even sizes)."""
    scale = min(1.0, max_side / max(height, width))
    h = max(2, int(height * scale / 2 + 0.5) * 2) if scale < 1 else height
    w = max(2, int(width * scale / 2 + 0.5) * 2) if scale < 1 else width
    return h, w


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def load_video(
    source: VideoSource,
    *,
    wanted: Callable[[int], Iterable[int]] | None = None,
    max_side: int = 720,
    max_input_side: int = 8192,
    max_input_frames: int = 3600,
    max_image_bytes: int = MAX_IMAGE_FILE_BYTES,
) -> DecodedVideo:
    """Decode a video, an image folder, a zip of images, or take an array of frames.

    Every limit is checked before the pixels it guards are decoded: the container is recognised
    from its first bytes (`common.containers`), a video's frame size and packet count before
    decoding, each image's size from its header (and OpenCV's own pixel limit, set in
    `common/__init__.py`, as a second line), zip members by declared and inflated size.
    Decoder failures become CorruptVideoError. Within a `common.deadline.deadline_scope`, decoding
    stops once the deadline passes.

    Args:
        source: path (video file, folder of ordered images, .zip of ordered images), or frames as
            an array / tensor (N, H, W, 3), uint8 or float in [0, 1].
        wanted: given the total frame count, the indices to keep (default: all). Keeping only
            what is needed bounds memory on long videos.
        max_side: long side of the returned frames, in pixels.
        max_input_side, max_input_frames: inputs beyond these are rejected.
        max_image_bytes: largest image file of a folder or zip.

    Raises:
        InputNotFoundError, NotAVideoError, CorruptVideoError, TooFewFramesError, InputTooLargeError,
        DeadlineExceededError.
    """
    limits = dict(max_side=max_side, max_input_side=max_input_side, max_input_frames=max_input_frames)
    if isinstance(source, (np.ndarray, Tensor)):
        return _from_array(source, wanted, **limits)
    path = Path(source)
    if not path.exists():
        raise InputNotFoundError(f"no such file or folder: {path}")
    if path.is_dir():
        names = sorted((p.name for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)
        return _from_images(names, lambda n: _read_image_file(path / n, max_image_bytes), f"folder {path.name}",
                            wanted, **limits)
    kind = require_frames_source(sniff_file(path), path.name)
    if kind == "zip":
        return _from_zip(path, wanted, max_image_bytes=max_image_bytes, **limits)
    return _from_video_file(path, kind, wanted, **limits)


def _check_size(height: int, width: int, what: str, max_input_side: int) -> None:
    if max(height, width) > max_input_side:
        raise InputTooLargeError(
            f"{what}: resolution {width}x{height} is over the limit (long side at most {max_input_side} px)"
        )


def _check_count(total: int, what: str, max_input_frames: int) -> None:
    if total > max_input_frames:
        raise InputTooLargeError(f"{what}: {total} frames is over the limit of {max_input_frames} frames")
    if total < 2:
        raise TooFewFramesError(f"{what}: {total} frame{'s' if total != 1 else ''}; at least 2 are needed")


def _select(total: int, wanted) -> list[int]:
    return sorted(set(wanted(total))) if wanted is not None else list(range(total))


def _from_array(array, wanted, *, max_side, max_input_side, max_input_frames) -> DecodedVideo:
    frames = torch.as_tensor(array)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise NotAVideoError(f"frames must be (N, H, W, 3), got {tuple(frames.shape)}")
    if frames.dtype != torch.uint8:
        if not frames.is_floating_point():
            raise NotAVideoError(f"frames must be uint8 or float in [0, 1], got {frames.dtype}")
        frames = (frames.clamp(0, 1) * 255 + 0.5).to(torch.uint8)
    total, height, width = frames.shape[:3]
    _check_count(total, "frames", max_input_frames)
    _check_size(height, width, "frames", max_input_side)
    indices = _select(total, wanted)
    size = resized_size(height, width, max_side)
    kept = [torch.from_numpy(_resize(frames[i].numpy(), size)) for i in indices]
    return DecodedVideo(torch.stack(kept), indices, total, (height, width))


def _from_images(names, read, what, wanted, *, max_side, max_input_side, max_input_frames) -> DecodedVideo:
    """Frames from image files; `read(name)` returns a file's bytes (bounded by the caller)."""
    if not names:
        raise NotAVideoError(f"{what} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    _check_count(len(names), what, max_input_frames)
    indices = _select(len(names), wanted)
    kept, source_size, size = [], None, None
    for i in indices:
        check_deadline()
        data = read(names[i])
        stored_size, display = _image_header(data, f"{what}: image {names[i]}")
        _check_size(*stored_size, what, max_input_side)
        shown_size = display.size(*stored_size)
        if source_size is None:
            source_size = shown_size
            size = resized_size(*source_size, max_side)
        elif shown_size != source_size:
            raise NotAVideoError(
                f"{what}: image {names[i]} is {shown_size[1]}x{shown_size[0]}, "
                f"the first is {source_size[1]}x{source_size[0]}; all frames must share one size"
            )
        try:
            # Decoded as stored, then turned as its EXIF tag says (`Display`): the same for every format.
            image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
            if image is None or image.shape[:2] != stored_size:
                raise CorruptVideoError(f"{what}: cannot read image {names[i]}")
            kept.append(torch.from_numpy(display.show(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), size)))
        except cv2.error:
            raise CorruptVideoError(f"{what}: cannot decode image {names[i]}") from None
    return DecodedVideo(torch.stack(kept), indices, len(names), source_size)


def _image_header(data: bytes, what: str) -> tuple[tuple[int, int], Display]:
    """(height, width) as stored and the EXIF orientation, from an image's header; nothing is decoded
    (PIL opens lazily)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            orientation = _exif_orientation(image)
    except Image.DecompressionBombError:  # PIL's own limit (about 179 Mpx) is far above ours
        raise InputTooLargeError(f"{what}: resolution over the limit") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, struct.error):
        raise CorruptVideoError(f"{what} cannot be read as an image") from None
    if width < 1 or height < 1:
        raise CorruptVideoError(f"{what} has no pixels")
    return (height, width), Display.of_exif(orientation)


def _exif_orientation(image: Image.Image) -> int | None:
    """The EXIF Orientation tag of an opened image, from what its header held. A PNG whose eXIf chunk
    comes after the pixels has none here: PIL's getexif would decode the whole image to find it. A
    damaged EXIF block says nothing (the pixels may still be fine)."""
    if image.format == "PNG" and "exif" not in image.info:
        return None
    try:
        orientation = image.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - any parser failure in metadata leaves the picture as stored
        return None
    return orientation if isinstance(orientation, int) else None


def _read_image_file(path: Path, max_bytes: int) -> bytes:
    if path.stat().st_size > max_bytes:
        raise InputTooLargeError(f"image {path.name} is over the limit of {max_bytes // 2**20} MiB per image")
    return path.read_bytes()


def _from_zip(path: Path, wanted, *, max_image_bytes: int, max_input_frames: int, **limits) -> DecodedVideo:
    """Frames from a zip of images: members are counted before the directory is parsed, and each
    member is checked by its declared size, then inflated in chunks with a running cap."""
    what = f"zip {path.name}"
    entries = _zip_entry_count(path)
    max_entries = 2 * max_input_frames + 64  # room for folders and stray files beside the frames
    if entries is not None and entries > max_entries:
        raise InputTooLargeError(f"{what}: {entries} entries is over the limit of {max_entries}")
    try:
        archive = zipfile.ZipFile(path)
    except _ZIP_ERRORS:
        raise CorruptVideoError(f"{what}: damaged or truncated zip archive") from None
    with archive:
        members = {info.filename: info for info in archive.infolist()
                   if Path(info.filename).suffix.lower() in IMAGE_SUFFIXES and not info.is_dir()}
        names = sorted(members, key=_natural_key)

        def read(name: str) -> bytearray:
            info = members[name]
            if info.file_size > max_image_bytes:
                raise InputTooLargeError(f"{what}: member {name} declares {info.file_size} bytes, over the limit "
                                         f"of {max_image_bytes // 2**20} MiB per image")
            data = bytearray()
            try:
                with archive.open(info) as member:
                    # In 1 MiB steps: zipfile inflates as much as one read asks for, whatever the
                    # member declared, so one large read would hold the whole inflated block.
                    while chunk := member.read(1 << 20):
                        data += chunk
                        if len(data) > max_image_bytes:
                            raise InputTooLargeError(f"{what}: member {name} inflates beyond the limit of "
                                                     f"{max_image_bytes // 2**20} MiB per image")
            except _ZIP_ERRORS:
                raise CorruptVideoError(f"{what}: member {name} is damaged") from None
            return data  # bytes-like; no copy

        return _from_images(names, read, what, wanted, max_input_frames=max_input_frames, **limits)


def _zip_entry_count(path: Path) -> int | None:
    """Entries a zip declares, from its end-of-central-directory record (zip64 too), before zipfile
    builds one object per entry. None where the record is not found (zipfile then reports it)."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        tail_start = max(0, size - (22 + 65535 + 20))  # the record, the longest comment, the zip64 locator
        f.seek(tail_start)
        tail = f.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) < at + 22:
        return None
    entries = struct.unpack("<H", tail[at + 10 : at + 12])[0]
    locator = at - 20
    if entries == 0xFFFF and locator >= 0 and tail[locator : locator + 4] == b"PK\x06\x07":
        record_offset = struct.unpack("<Q", tail[locator + 8 : locator + 16])[0]
        with open(path, "rb") as f:
            f.seek(min(record_offset, size))
            record = f.read(56)
        if record[:4] == b"PK\x06\x06" and len(record) >= 40:
            entries = struct.unpack("<Q", record[32:40])[0]
    return entries


def _open(path: Path, kind: str):
    """Open a file whose first bytes say it is a `kind` video container."""
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as err:
        # It starts like a video container but does not open: its index or headers are missing
        # (an mp4 cut before its index at the end) or damaged. Not "not a video".
        raise CorruptVideoError(f"{path.name}: truncated or damaged {kind} file, it cannot be opened "
                                f"({_reason(err)})") from None
    if not container.streams.video:
        container.close()
        raise NotAVideoError(f"{path.name} has no video stream")
    return container


def _reason(err: Exception) -> str:
    return getattr(err, "strerror", None) or str(err) or type(err).__name__


def _count_frames(path: Path, kind: str) -> int:
    """Frames in the first video stream, from the packets (no decoding); a truncated file is an error.

    A file cut short whose index survived (an mp4 with its index at the front, an mkv, an avi)
    opens and demuxes without any error, only with fewer packets: it is caught by comparing what
    the headers declare (the video stream's frame count; the container's duration for Matroska,
    which declares no count) with the packets that are actually there, and by a cut packet.
    """
    with _open(path, kind) as container:
        video = container.streams.video[0]
        declared_frames = video.frames
        count, cut, end_s = 0, False, None
        try:
            for packet in container.demux():  # every stream: a video may be shorter than its audio
                if packet.size <= 0:
                    continue
                cut = cut or packet.is_corrupt
                if packet.pts is not None and packet.time_base is not None:
                    end = float((packet.pts + (packet.duration or 0)) * packet.time_base)
                    end_s = end if end_s is None else max(end_s, end)
                if packet.stream.index == video.index:
                    count += 1
        except av.error.FFmpegError as err:
            raise CorruptVideoError(f"{path.name}: damaged or truncated video ({_reason(err)})") from None
        missing = None
        if cut:
            missing = "its last packet is cut"
        elif declared_frames > 0 and count < declared_frames:
            missing = f"{count} of the {declared_frames} frames its header declares are present"
        elif kind == "matroska" and container.duration and end_s is not None:
            declared_s = container.duration / av.time_base
            start_s = (container.start_time or 0) / av.time_base
            rate = float(video.average_rate or 0) or 25.0
            if end_s - start_s < declared_s - max(2.0 / rate, 0.02 * declared_s):
                missing = f"{end_s - start_s:.2f} s of the {declared_s:.2f} s its header declares are present"
        if missing is not None:
            raise CorruptVideoError(f"{path.name}: truncated video ({missing})")
        return count


def _from_video_file(path: Path, kind: str, wanted, *, max_side, max_input_side, max_input_frames) -> DecodedVideo:
    with _open(path, kind) as container:
        stream = container.streams.video[0]
        _check_size(stream.codec_context.height, stream.codec_context.width, path.name, max_input_side)
    estimate = _count_frames(path, kind)
    if estimate > max_input_frames:
        _check_count(estimate, path.name, max_input_frames)
    limits = dict(max_side=max_side, max_input_side=max_input_side)
    keep = set(_select(max(estimate, 1), wanted))
    frames, indices, total, source_size, fps = _decode(path, kind, keep, **limits)
    if total != estimate:  # packet count was off (B-frames, broken index): select again from the truth
        _check_count(total, path.name, max_input_frames)
        keep = set(_select(total, wanted))
        if keep != set(indices):
            frames, indices, total, source_size, fps = _decode(path, kind, keep, **limits)
    _check_count(total, path.name, max_input_frames)
    return DecodedVideo(torch.stack(frames), indices, total, source_size, fps)


def _decode(path: Path, kind: str, keep: set[int], *, max_side: int, max_input_side: int):
    frames, indices, total, size, source_size = [], [], 0, None, (0, 0)
    stored_size, display = None, None
    with _open(path, kind) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = float(stream.average_rate) if stream.average_rate else None
        try:
            for frame in container.decode(stream):
                check_deadline()
                # The bitstream, not the container header, decides the real size of each frame.
                _check_size(frame.height, frame.width, path.name, max_input_side)
                if total in keep:
                    image = frame.to_ndarray(format="rgb24")
                    if stored_size is None:  # the first frame's display geometry holds for the video
                        stored_size = image.shape[:2]
                        display = Display.of_video(frame.rotation, stream.codec_context.sample_aspect_ratio, path.name)
                        source_size = display.size(*stored_size)
                        size = resized_size(*source_size, max_side)
                    elif image.shape[:2] != stored_size:
                        raise CorruptVideoError(f"{path.name}: the frame size changes within the video")
                    frames.append(torch.from_numpy(display.show(image, size)))
                    indices.append(total)
                total += 1
        except (av.error.FFmpegError, ValueError, cv2.error) as err:
            raise CorruptVideoError(
                f"{path.name}: damaged or truncated video, decoding failed after {total} frames ({_reason(err)})"
            ) from None
    if total < 2:
        raise TooFewFramesError(f"{path.name}: {total} frame{'s' if total != 1 else ''} decoded; at least 2 are needed")
    return frames, indices, total, source_size, fps


def write_video(
    path: str | Path,
    frames: Tensor | np.ndarray,
    fps: float = 8.0,
    *,
    lossless: bool = False,
    sample_aspect_ratio: Fraction | str | None = None,
    display_rotation: float | None = None,
) -> Path:
    """Write uint8 RGB frames (N, H, W, 3) as H.264 (yuv420p), or FFV1 (bit-exact) with lossless=True.

    H.264 needs even sizes; frames are cropped by one pixel where needed. The same frames always
    give the same file. `sample_aspect_ratio` (pixel width / height) and `display_rotation` (degrees
    counter-clockwise) are written for players, and read back by `load_video` (`Display`).
    """
    path = Path(path)
    array = torch.as_tensor(frames).numpy() if not isinstance(frames, np.ndarray) else frames
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError("write_video takes uint8 frames (N, H, W, 3)")
    height, width = array.shape[1] // 2 * 2, array.shape[2] // 2 * 2
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("ffv1" if lossless else "libx264", rate=int(round(fps)))
        stream.width, stream.height = width, height
        stream.pix_fmt = "bgr0" if lossless else "yuv420p"
        if not lossless:
            # No MB-tree: with it, libx264 gave different pictures from the same frames from one
            # write to the next at most widths (406 or 400 px wide: every time; 384: never),
            # so a corrupted copy, a sample or a benchmark set written twice scored differently.
            stream.options = {"crf": "18", "preset": "veryfast", "x264-params": "no-mbtree=1"}
        if sample_aspect_ratio is not None:
            stream.codec_context.sample_aspect_ratio = Fraction(sample_aspect_ratio)
        if display_rotation is not None:
            stream.set_display_rotation(display_rotation)
        for image in array:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image[:height, :width]), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_image_folder(folder: str | Path, frames: Sequence[np.ndarray] | Tensor) -> Path:
    """Write frames as 000.png, 001.png, ... (lossless)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(frames):
        array = image.numpy() if isinstance(image, Tensor) else image
        cv2.imwrite(str(folder / f"{i:03d}.png"), cv2.cvtColor(array, cv2.COLOR_RGB2BGR))
    return folder

