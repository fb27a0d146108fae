"""The preference-pairs dataset: what the mining job writes and the DPO trainer reads.

Layout of a pairs directory (format "videogpa-pairs", version 1)::

    pairs/
      summary.json        # dataset-wide facts, see below
      pairs.parquet       # one row per pair, see below
      latents/<pair_id>.winner.safetensors   # key "latents": (F, C, h, w) CogVideoX, (C, F, h, w) Wan
      latents/<pair_id>.loser.safetensors    # key "latents": as the winner's
      latents/<pair_id>.image.safetensors    # key "latents": image-to-video only, CogVideoX (1, C, h, w),
                                             #   Wan (4 + C, F, h, w)
      latents/<pair_id>.image_embeds.safetensors  # key "image_embeds": (N, D), Wan 2.1 I2V only
      text/<sha1(prompt)[:16]>.safetensors   # key "prompt_embeds": (L, D), shared by pairs of one prompt

Tensors:
    - latents are VAE encodings of frames in [-1, 1] in the transformer's space and layout, as the
      model family's adapter (`common.families`) defines them: CogVideoX multiplies by the VAE's
      `scaling_factor` and stores (F latent frames, C channels, h x w); Wan normalises per channel
      with the VAE's `latents_mean` / `latents_std` and stores (C, F, h, w). float32 or bfloat16.
    - image latents (I2V): the condition as the family's I2V pipeline builds it. CogVideoX: the condition
      frame's encoding, scaled the same way, one latent frame. Wan: the first-frame mask (4, F, h, w) ++
      the normalised encoding of [first frame, T - 1 black frames] (C, F, h, w), as
      `WanImageToVideoPipeline.prepare_latents` returns it.
    - image embeddings (Wan 2.1 I2V, whose transformer has `image_dim`): the CLIP vision tower's
      penultimate hidden state of the first frame (`WanImageToVideoPipeline.encode_image`), (257, 1280).
    - prompt_embeds: the text encoder's (T5; Wan: UMT5) last hidden state, padded/truncated to L tokens.

`pairs.parquet` columns:
    pair_id (string, unique), prompt (string),
    winner_latents, loser_latents, prompt_embeds (string: paths relative to the directory),
    image_latents (string or null: relative path; null for text-to-video),
    image_embeds (string or null: relative path; null unless the model takes image embeddings; absent in
        datasets written before Wan image-to-video),
    winner_score, loser_score (float64: geometry error E, lower is better; NaN when unknown),
    winner_video, loser_video (string or null: where the clips came from, informational).

`summary.json`:
    {"format": "videogpa-pairs", "version": 1, "num_pairs": N, "latent_shape": [F, C, h, w] or [C, F, h, w],
     "text_shape": [L, D], "i2v": bool, "dtype": "float32",
     "image_embeds_shape": [N, D] or null (absent: null),
     "family": "cogvideox" | "wan" (the model family; the trainer refuses pairs of another family),
     "latent_layout": "FChw" | "CFhw", "latents_normalised": true (latents are in the transformer's
         space: x scaling_factor for CogVideoX, (z - mean) / std for Wan),
     "model": str or null (the pipeline folder/name that encoded it), "metric_id": str or null,
     "latent_space": the family adapter's `latent_space` of the encoding model (CogVideoX: family
         "cogvideox-1.0"/"-1.5", scaling_factor, latent_channels, invert_scale_latents, i2v; Wan:
         family "wan", latent_channels, latents_mean, latents_std, i2v); the trainer compares it with
         the model it trains, at start and on resume,
     ...any extra keys the writer adds (mining settings)}

Datasets written before Wan was supported have neither "family" nor "latent_layout" and say
"scaling_factor_applied": true instead of "latents_normalised": they are CogVideoX (F, C, h, w) and
read as such.

F is the video's own latent frame count ((T - 1) / 4 + 1); CogVideoX 1.5's padding to a multiple
of patch_size_t happens in the trainer, as in the pipeline.

`load_pairs_index(dir)` checks all of this (missing files, shapes that differ from the summary,
an empty table) and raises `PairsDatasetError` before any training worker starts.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import torch

from common.errors import VideoGPAError
from common.families import FAMILIES, family_of_latent_space

FORMAT = "videogpa-pairs"
VERSION = 1
TABLE_NAME = "pairs.parquet"
SUMMARY_NAME = "summary.json"
_PATH_COLUMNS = ("winner_latents", "loser_latents", "prompt_embeds", "image_latents", "image_embeds")


class PairsDatasetError(VideoGPAError):
    """The pairs directory is missing, empty or inconsistent (a user-facing sentence)."""

    http_status = 422


@dataclass
class Pair:
    """One preference pair in memory. Shapes: latents (F, C, h, w) (Wan: (C, F, h, w)), image_latents (1, C, h, w)
    (Wan: (4 + C, F, h, w)), image_embeds (N, D) (Wan 2.1 I2V), prompt_embeds (L, D)."""

    prompt: str
    winner_latents: torch.Tensor
    loser_latents: torch.Tensor
    prompt_embeds: torch.Tensor
    image_latents: Optional[torch.Tensor] = None
    image_embeds: Optional[torch.Tensor] = None
    winner_score: float = math.nan
    loser_score: float = math.nan
    winner_video: Optional[str] = None
    loser_video: Optional[str] = None
    pair_id: Optional[str] = None


def _save_tensor(path: Path, key: str, tensor: torch.Tensor) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: tensor.detach().cpu().contiguous()}, str(path))


def write_pairs_dataset(
    directory: str | Path,
    pairs: Iterable[Pair],
    *,
    model: Optional[str] = None,
    metric_id: Optional[str] = None,
    latent_space: Optional[dict] = None,
    family: Optional[str] = None,
    latent_layout: Optional[str] = None,
    extra: Optional[dict] = None,
) -> Path:
    """Write `pairs` in the layout above (overwriting the table and summary) and validate it.

    All pairs must share one latent shape, one text shape, and either all or none carry
    image latents (and image embeddings, of one shape). Text embeddings of the same prompt are stored once. `family` defaults to that
    of `latent_space` (else cogvideox), `latent_layout` to the family's. Returns the directory.
    """
    family = family or family_of_latent_space(latent_space) or "cogvideox"
    if family not in FAMILIES:
        raise PairsDatasetError(f"unknown model family {family!r} (supported: {', '.join(FAMILIES)})")
    latent_layout = latent_layout or FAMILIES[family].latent_layout
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    latent_shape = text_shape = None
    i2v = None
    embeds_shape: Optional[tuple] = None
    dtype = None
    written_text: set[str] = set()
    for index, pair in enumerate(pairs):
        pair_id = pair.pair_id or f"{index:06d}"
        shape = tuple(pair.winner_latents.shape)
        if len(shape) != 4 or tuple(pair.loser_latents.shape) != shape:
            raise PairsDatasetError(
                f"pair {pair_id}: winner {shape} and loser {tuple(pair.loser_latents.shape)} latents must both be "
                f"({', '.join(latent_layout)})"
            )
        latent_shape = latent_shape or shape
        text_shape = text_shape or tuple(pair.prompt_embeds.shape)
        dtype = dtype or pair.winner_latents.dtype
        if shape != latent_shape or tuple(pair.prompt_embeds.shape) != text_shape:
            raise PairsDatasetError(f"pair {pair_id}: shapes differ from the first pair's {latent_shape} / {text_shape}")
        has_image = pair.image_latents is not None
        i2v = has_image if i2v is None else i2v
        if has_image != i2v:
            raise PairsDatasetError(f"pair {pair_id}: either every pair carries image latents or none does")
        has_embeds = pair.image_embeds is not None
        this_embeds = tuple(pair.image_embeds.shape) if has_embeds else None
        embeds_shape = this_embeds if index == 0 else embeds_shape
        if this_embeds != embeds_shape:
            raise PairsDatasetError(f"pair {pair_id}: image embeddings {this_embeds} differ from the first pair's "
                                    f"{embeds_shape} (every pair carries them, of one shape, or none does)")

        row = {
            "pair_id": pair_id,
            "prompt": pair.prompt,
            "winner_latents": f"latents/{pair_id}.winner.safetensors",
            "loser_latents": f"latents/{pair_id}.loser.safetensors",
            "prompt_embeds": f"text/{hashlib.sha1(pair.prompt.encode()).hexdigest()[:16]}.safetensors",
            "image_latents": f"latents/{pair_id}.image.safetensors" if has_image else None,
            "image_embeds": f"latents/{pair_id}.image_embeds.safetensors" if has_embeds else None,
            "winner_score": float(pair.winner_score),
            "loser_score": float(pair.loser_score),
            "winner_video": pair.winner_video,
            "loser_video": pair.loser_video,
        }
        _save_tensor(directory / row["winner_latents"], "latents", pair.winner_latents)
        _save_tensor(directory / row["loser_latents"], "latents", pair.loser_latents)
        if has_image:
            _save_tensor(directory / row["image_latents"], "latents", pair.image_latents)
        if has_embeds:
            _save_tensor(directory / row["image_embeds"], "image_embeds", pair.image_embeds)
        if row["prompt_embeds"] not in written_text:
            _save_tensor(directory / row["prompt_embeds"], "prompt_embeds", pair.prompt_embeds)
            written_text.add(row["prompt_embeds"])
        rows.append(row)

    if not rows:
        raise PairsDatasetError("no pairs to write: the pairs dataset would be empty")
    schema = pa.schema(
        [("pair_id", pa.string()), ("prompt", pa.string())]
        + [(c, pa.string()) for c in _PATH_COLUMNS]
        + [("winner_score", pa.float64()), ("loser_score", pa.float64())]
        + [("winner_video", pa.string()), ("loser_video", pa.string())]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), directory / TABLE_NAME)
    summary = {
        "format": FORMAT,
        "version": VERSION,
        "num_pairs": len(rows),
        "latent_shape": list(latent_shape),
        "text_shape": list(text_shape),
        "i2v": bool(i2v),
        "image_embeds_shape": list(embeds_shape) if embeds_shape else None,
        "dtype": str(dtype).removeprefix("torch."),
        "family": family,
        "latent_layout": latent_layout,
        "latents_normalised": True,
        "model": model,
        "metric_id": metric_id,
        "latent_space": latent_space,
        **(extra or {}),
    }
    (directory / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    load_pairs_index(directory)  # what we wrote must read back
    return directory


@dataclass
class PairsIndex:
    """A validated pairs directory: its summary and rows (paths already absolute)."""

    directory: Path
    summary: dict
    rows: list[dict] = field(repr=False)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return tuple(self.summary["latent_shape"])

    @property
    def text_shape(self) -> tuple[int, int]:
        return tuple(self.summary["text_shape"])

    @property
    def i2v(self) -> bool:
        return bool(self.summary["i2v"])

    @property
    def image_embeds_shape(self) -> Optional[tuple[int, int]]:
        """(N, D) of the pairs' image embeddings (Wan 2.1 I2V), None when they have none."""
        shape = self.summary.get("image_embeds_shape")
        return tuple(shape) if shape else None

    @property
    def family(self) -> str:
        """The model family the pairs were encoded for ("cogvideox" or "wan")."""
        return self.summary["family"]

    def __len__(self) -> int:
        return len(self.rows)


def _tensor_shape(path: Path, key: str) -> tuple[int, ...]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if key not in f.keys():
                raise PairsDatasetError(f"{path} has no tensor named {key!r}")
            return tuple(f.get_slice(key).get_shape())
    except PairsDatasetError:
        raise
    except Exception as err:  # a truncated or foreign file
        raise PairsDatasetError(f"{path} is not a readable safetensors file ({err})") from err


def load_pairs_index(directory: str | Path) -> PairsIndex:
    """Read and check a pairs directory without loading any tensor (headers only).

    Raises `PairsDatasetError` naming the first problem: no such directory, missing summary or
    table, wrong format, an empty set, a referenced file that does not exist, or a tensor whose
    shape differs from `summary.json`.
    """
    import pyarrow.parquet as pq

    directory = Path(directory)
    if not directory.is_dir():
        raise PairsDatasetError(f"pairs directory {directory} does not exist")
    summary_path, table_path = directory / SUMMARY_NAME, directory / TABLE_NAME
    for path in (summary_path, table_path):
        if not path.is_file():
            raise PairsDatasetError(f"{directory} is not a pairs dataset: {path.name} is missing")
    try:
        summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError as err:
        raise PairsDatasetError(f"{summary_path} is not valid JSON ({err})") from err
    if summary.get("format") != FORMAT or summary.get("version") != VERSION:
        raise PairsDatasetError(
            f"{summary_path}: expected format {FORMAT!r} version {VERSION}, "
            f"found {summary.get('format')!r} version {summary.get('version')}"
        )
    for key in ("latent_shape", "text_shape", "i2v"):
        if key not in summary:
            raise PairsDatasetError(f"{summary_path} lacks {key!r}")
    # Datasets from before Wan: CogVideoX latents (F, C, h, w), "scaling_factor_applied" for "latents_normalised".
    summary.setdefault("family", family_of_latent_space(summary.get("latent_space")) or "cogvideox")
    if summary["family"] not in FAMILIES:
        raise PairsDatasetError(f"{summary_path}: unknown model family {summary['family']!r} "
                                f"(supported: {', '.join(FAMILIES)})")
    summary.setdefault("latent_layout", FAMILIES[summary["family"]].latent_layout)
    if "latents_normalised" not in summary:
        summary["latents_normalised"] = bool(summary.pop("scaling_factor_applied", True))

    rows = pq.read_table(table_path).to_pylist()
    if not rows:
        raise PairsDatasetError(f"{table_path} holds no pairs: the pairs dataset is empty")
    latent_shape, text_shape = tuple(summary["latent_shape"]), tuple(summary["text_shape"])
    image_shape = FAMILIES[summary["family"]].image_latents_shape(latent_shape)  # CogVideoX (1, C, h, w)
    embeds_shape = tuple(summary["image_embeds_shape"]) if summary.get("image_embeds_shape") else None
    ids = set()
    for row in rows:
        pid = row.get("pair_id")
        if pid in ids:
            raise PairsDatasetError(f"{table_path}: pair_id {pid!r} appears twice")
        ids.add(pid)
        checks = [("winner_latents", "latents", latent_shape), ("loser_latents", "latents", latent_shape),
                  ("prompt_embeds", "prompt_embeds", text_shape)]
        if summary["i2v"]:
            checks.append(("image_latents", "latents", image_shape))
        if embeds_shape:
            checks.append(("image_embeds", "image_embeds", embeds_shape))
        for column, key, expected in checks:
            rel = row.get(column)
            if not rel:
                raise PairsDatasetError(f"pair {pid}: column {column} is empty")
            path = directory / rel
            if not path.is_file():
                raise PairsDatasetError(f"pair {pid}: {column} file {rel} is missing from {directory}")
            shape = _tensor_shape(path, key)
            if shape != expected:
                raise PairsDatasetError(
                    f"pair {pid}: {column} in {rel} has shape {list(shape)}, summary.json says {list(expected)}"
                )
            row[column] = str(path)
    return PairsIndex(directory=directory, summary=summary, rows=rows)


class PairsDataset(torch.utils.data.Dataset):
    """Map-style dataset over a validated index. Item: dict of float32 tensors (see `Pair`) + "prompt"."""

    def __init__(self, index: PairsIndex):
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        from safetensors.torch import load_file

        row = self.index.rows[i]
        item = {
            "winner_latents": load_file(row["winner_latents"])["latents"].float(),
            "loser_latents": load_file(row["loser_latents"])["latents"].float(),
            "prompt_embeds": load_file(row["prompt_embeds"])["prompt_embeds"].float(),
        }
        if self.index.i2v:
            item["image_latents"] = load_file(row["image_latents"])["latents"].float()
        if self.index.image_embeds_shape:
            item["image_embeds"] = load_file(row["image_embeds"])["image_embeds"].float()
        return item


def collate_pairs(items: list[dict]) -> dict:
    """Stack items into a batch: latents (B, F, C, h, w) (Wan: (B, C, F, h, w)), image_latents (B, 1, C, h, w)
    (Wan: (B, 4 + C, F, h, w)), image_embeds (B, N, D), prompt_embeds (B, L, D)."""
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}
