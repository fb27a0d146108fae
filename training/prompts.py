"""Prompts for pair mining: structured camera-motion prompts (image-to-video) and captions (text-to-video).

A prompt file is JSON Lines, one prompt per line::

    {"prompt_id": "kitchen-000", "prompt": "A static scene: ... the camera pans left, then ...",
     "image": "/abs/path/kitchen.png"}          # "image" only for image-to-video
    {"prompt_id": "cap-17", "prompt": "a red car drives along a coast road"}

Image-to-video prompts are a fixed "static scene, only the camera moves" prefix followed by 2-3
camera-motion primitives drawn (seeded) from the vocabulary in `training/data/camera_motion.json`:
translations, rotations and complex paths. Users extend it with their own file of the same shape
(`--vocabulary FILE`). Text-to-video captions come from a JSON Lines file (`{"id", "caption"}`
per line) or a CSV with `id` and `caption` columns.

`read_prompt_file` checks a prompt file completely (readable, ids unique and non-empty, images
exist) and raises `PromptFileError` naming the first problem, before any sampling starts.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from importlib import resources
from pathlib import Path
from typing import Iterable, Optional

from common.errors import VideoGPAError

VOCABULARY_FORMAT = "videogpa-camera-motion"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class PromptFileError(VideoGPAError):
    """A prompt, caption or vocabulary file that cannot be used (a user-facing sentence)."""

    http_status = 422


def load_vocabulary(path: Optional[str | Path] = None) -> dict:
    """The camera-motion vocabulary: {"prefix", "joiner", "primitives": {category: [phrases]}}."""
    try:
        text = Path(path).read_text() if path else resources.files("training.data").joinpath("camera_motion.json").read_text()
        vocab = json.loads(text)
    except (OSError, json.JSONDecodeError) as err:
        raise PromptFileError(f"cannot read the camera-motion vocabulary {path or '(built-in)'}: {err}") from err
    primitives = vocab.get("primitives")
    if vocab.get("format") != VOCABULARY_FORMAT or not isinstance(primitives, dict) or not primitives:
        raise PromptFileError(f"{path}: expected format {VOCABULARY_FORMAT!r} with a non-empty 'primitives' mapping")
    for category, phrases in primitives.items():
        if not isinstance(phrases, list) or not phrases or not all(isinstance(p, str) and p.strip() for p in phrases):
            raise PromptFileError(f"{path}: primitives[{category!r}] must be a non-empty list of phrases")
    vocab.setdefault("prefix", "A static scene: nothing in it moves, only the camera moves.")
    vocab.setdefault("joiner", ", then ")
    return vocab


def camera_motion_prompt(rng: random.Random, vocabulary: dict, min_primitives: int = 2, max_primitives: int = 3) -> str:
    """Prefix + 2-3 distinct primitives, each from a different category while categories last."""
    primitives = vocabulary["primitives"]
    count = rng.randint(min_primitives, max_primitives)
    categories = list(primitives)
    chosen: list[str] = []
    while len(chosen) < count:
        order = categories[:]
        rng.shuffle(order)
        for category in order:
            options = [p for p in primitives[category] if p not in chosen]
            if options and len(chosen) < count:
                chosen.append(rng.choice(options))
        if all(p in chosen for c in categories for p in primitives[c]):
            break  # a vocabulary smaller than `count`
    body = vocabulary["joiner"].join(chosen)
    return f"{vocabulary['prefix']} {body[0].upper()}{body[1:]}."


def _stable_seed(*parts) -> int:
    return int(hashlib.sha256(":".join(str(p) for p in parts).encode()).hexdigest()[:8], 16)


def image_prompts(
    frames_dir: str | Path,
    *,
    seed: int = 0,
    prompts_per_image: int = 1,
    vocabulary: Optional[dict] = None,
) -> list[dict]:
    """One or more camera-motion prompts per first-frame image of a folder (sorted by name).

    Each prompt depends only on (seed, image name, index): adding images never changes the others.
    """
    folder = Path(frames_dir)
    if not folder.is_dir():
        raise PromptFileError(f"first-frame folder {folder} does not exist")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise PromptFileError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    vocabulary = vocabulary or load_vocabulary()
    rows = []
    for image in images:
        for k in range(prompts_per_image):
            rng = random.Random(_stable_seed(seed, image.name, k))
            rows.append({"prompt_id": f"{image.stem}-{k:03d}", "prompt": camera_motion_prompt(rng, vocabulary),
                         "image": str(image.resolve())})
    return rows


def read_captions(path: str | Path) -> list[dict]:
    """Captions from JSON Lines ({"id", "caption"}) or CSV (columns id, caption) -> prompt rows."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise PromptFileError(f"cannot read caption file {path}: {err}") from err
    entries: list[tuple[str, dict]] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or not {"id", "caption"} <= set(reader.fieldnames):
            raise PromptFileError(f"{path}: a caption CSV needs the columns id and caption (found {reader.fieldnames})")
        entries = [(f"row {n}", row) for n, row in enumerate(reader, start=2)]
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    entries.append((f"line {n}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise PromptFileError(f"{path} line {n} is not JSON ({err.msg})") from None
    rows = []
    for where, entry in entries:
        if not isinstance(entry, dict) or not str(entry.get("id") or "").strip() or not str(entry.get("caption") or "").strip():
            raise PromptFileError(f"{path} {where}: needs a non-empty id and caption")
        rows.append({"prompt_id": str(entry["id"]).strip(), "prompt": str(entry["caption"]).strip()})
    if not rows:
        raise PromptFileError(f"{path} holds no captions")
    return rows


def write_prompt_file(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write prompt rows as JSON Lines (checked first: unique ids, prompts present)."""
    rows = list(rows)
    check_prompt_rows(rows, str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def check_prompt_rows(rows: list[dict], where: str) -> None:
    if not rows:
        raise PromptFileError(f"{where} holds no prompts")
    seen: set[str] = set()
    for n, row in enumerate(rows, start=1):
        pid, prompt = row.get("prompt_id"), row.get("prompt")
        if not isinstance(pid, str) or not pid.strip() or ":" in pid:
            raise PromptFileError(f"{where} line {n}: prompt_id must be a non-empty string without ':' (got {pid!r})")
        if pid in seen:
            raise PromptFileError(f"{where} line {n}: prompt_id {pid!r} appears twice")
        seen.add(pid)
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptFileError(f"{where} line {n} ({pid}): the prompt is empty")
        image = row.get("image")
        if image is not None and not Path(image).is_file():
            raise PromptFileError(f"{where} line {n} ({pid}): first-frame image {image} does not exist")


def read_prompt_file(path: str | Path) -> list[dict]:
    """Read and check a prompt file (JSON Lines); relative image paths are resolved against its folder."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise PromptFileError(f"cannot read prompt file {path}: {err}") from err
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptFileError(f"{path} line {n} is not JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise PromptFileError(f"{path} line {n}: expected an object with prompt_id and prompt")
        if row.get("image"):
            image = Path(row["image"])
            row["image"] = str(image if image.is_absolute() else (path.parent / image).resolve())
        else:
            row["image"] = None
        rows.append({"prompt_id": row.get("prompt_id"), "prompt": row.get("prompt"), "image": row["image"]})
    check_prompt_rows(rows, str(path))
    return rows
