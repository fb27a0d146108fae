"""Reading and writing videos: files (PyAV), folders of ordered images, zips of ordered images.

Pixel convention, defined once: decoded frames are uint8 RGB (N, H, W, 3); scoring works on
float32 in [0, 1] made by `to_float` (x / 255). No range is ever guessed from the data.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence, Union

import av
import cv2
import numpy as np
import torch
from torch import Tensor

from common.errors import (
    CorruptVideoError,
    InputNotFoundError,
    InputTooLargeError,
    NotAVideoError,
    TooFewFramesError,
)

VIDEO_SUFFIXES = {".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif", ".m4v", ".mpg", ".mpeg"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}

VideoSource = Union[str, Path, np.ndarray, Tensor]


@dataclass
class DecodedVideo:
    """Frames at the scoring resolution, and where they came from."""

    frames: Tensor  # (N, H, W, 3) uint8 RGB, only the frames that were asked for
    indices: list[int]  # index of each kept frame in the whole video
    total_frames: int  # frames in the whole video
    source_size: tuple[int, int]  # (height, width) before resizing
    fps: float | None = None


def uniform_indices(total: int, count: int) -> list[int]:
    """`count` indices spread uniformly over [0, total - 1], first and last included, no repeats."""
    count = min(count, total)
    if count == 1:
        return [0]
    return sorted({int(round(i * (total - 1) / (count - 1))) for i in range(count)})


def to_float(frames: Tensor) -> Tensor:
    """uint8 (..., 3) -> float32 in [0, 1]."""
    if frames.dtype != torch.uint8:
        raise TypeError(f"expected uint8 frames, got {frames.dtype}")
    return frames.float() / 255.0


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
) -> DecodedVideo:
    """Decode a video, an image folder, a zip of images, or take an array of frames.

    Args:
        source: path (video file, folder of ordered images, .zip of ordered images), or frames as
            an array / tensor (N, H, W, 3), uint8 or float in [0, 1].
        wanted: given the total frame count, the indices to keep (default: all). Keeping only
            what is needed bounds memory on long videos.
        max_side: long side of the returned frames, in pixels.
        max_input_side, max_input_frames: inputs beyond these are rejected.

    Raises:
        InputNotFoundError, NotAVideoError, CorruptVideoError, TooFewFramesError, InputTooLargeError.
    """
    limits = dict(max_side=max_side, max_input_side=max_input_side, max_input_frames=max_input_frames)
    if isinstance(source, (np.ndarray, Tensor)):
        return _from_array(source, wanted, **limits)
    path = Path(source)
    if not path.exists():
        raise InputNotFoundError(f"no such file or folder: {path}")
    if path.is_dir():
        names = sorted((p.name for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)
        return _from_images(names, lambda n: (path / n).read_bytes(), f"folder {path}", wanted, **limits)
    if path.suffix.lower() == ".zip" or zipfile.is_zipfile(path):
        try:
            archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as err:
            raise CorruptVideoError(f"{path.name}: damaged zip archive ({err})") from None
        with archive:
            names = sorted(
                (n for n in archive.namelist() if Path(n).suffix.lower() in IMAGE_SUFFIXES and not n.endswith("/")),
                key=_natural_key,
            )
            return _from_images(names, archive.read, f"zip {path.name}", wanted, **limits)
    return _from_video_file(path, wanted, **limits)


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
    if not names:
        raise NotAVideoError(f"{what} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    _check_count(len(names), what, max_input_frames)
    indices = _select(len(names), wanted)
    kept, source_size, size = [], None, None
    for i in indices:
        image = cv2.imdecode(np.frombuffer(read(names[i]), np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise CorruptVideoError(f"{what}: cannot read image {names[i]}")
        if source_size is None:
            source_size = image.shape[:2]
            _check_size(*source_size, what, max_input_side)
            size = resized_size(*source_size, max_side)
        elif image.shape[:2] != source_size:
            raise NotAVideoError(
                f"{what}: image {names[i]} is {image.shape[1]}x{image.shape[0]}, "
                f"the first is {source_size[1]}x{source_size[0]}; all frames must share one size"
            )
        kept.append(torch.from_numpy(_resize(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), size)))
    return DecodedVideo(torch.stack(kept), indices, len(names), source_size)


def _open(path: Path):
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as err:
        raise NotAVideoError(f"{path.name} is not a video that can be read ({_reason(err)})") from None
    if not container.streams.video:
        container.close()
        raise NotAVideoError(f"{path.name} has no video stream")
    return container


def _reason(err: Exception) -> str:
    return getattr(err, "strerror", None) or str(err) or type(err).__name__


def _count_frames(path: Path) -> int:
    """Frames in the first video stream, from the packets (no decoding)."""
    with _open(path) as container:
        stream = container.streams.video[0]
        try:
            return sum(1 for packet in container.demux(stream) if packet.size > 0)
        except av.error.FFmpegError as err:
            raise CorruptVideoError(f"{path.name}: damaged or truncated video ({_reason(err)})") from None


def _from_video_file(path: Path, wanted, *, max_side, max_input_side, max_input_frames) -> DecodedVideo:
    with _open(path) as container:
        stream = container.streams.video[0]
        _check_size(stream.codec_context.height, stream.codec_context.width, path.name, max_input_side)
    estimate = _count_frames(path)
    if estimate > max_input_frames:
        _check_count(estimate, path.name, max_input_frames)
    keep = set(_select(max(estimate, 1), wanted))
    frames, indices, total, source_size, fps = _decode(path, keep, max_side)
    if total != estimate:  # packet count was off (B-frames, broken index): select again from the truth
        _check_count(total, path.name, max_input_frames)
        keep = set(_select(total, wanted))
        if keep != set(indices):
            frames, indices, total, source_size, fps = _decode(path, keep, max_side)
    _check_count(total, path.name, max_input_frames)
    return DecodedVideo(torch.stack(frames), indices, total, source_size, fps)


def _decode(path: Path, keep: set[int], max_side: int):
    frames, indices, total, size, source_size = [], [], 0, None, (0, 0)
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = float(stream.average_rate) if stream.average_rate else None
        try:
            for frame in container.decode(stream):
                if total in keep:
                    image = frame.to_ndarray(format="rgb24")
                    if size is None:
                        source_size = image.shape[:2]
                        size = resized_size(*source_size, max_side)
                    frames.append(torch.from_numpy(_resize(image, size)))
                    indices.append(total)
                total += 1
        except av.error.FFmpegError as err:
            raise CorruptVideoError(
                f"{path.name}: damaged or truncated video, decoding failed after {total} frames ({_reason(err)})"
            ) from None
    if total < 2:
        raise TooFewFramesError(f"{path.name}: {total} frame{'s' if total != 1 else ''} decoded; at least 2 are needed")
    return frames, indices, total, source_size, fps


def write_video(path: str | Path, frames: Tensor | np.ndarray, fps: float = 8.0, *, lossless: bool = False) -> Path:
    """Write uint8 RGB frames (N, H, W, 3) as H.264 (yuv420p), or FFV1 (bit-exact) with lossless=True.

    H.264 needs even sizes; frames are cropped by one pixel where needed.
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
            stream.options = {"crf": "18", "preset": "veryfast"}
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

