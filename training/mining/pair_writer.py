"""The pairs dataset `vgpa train` reads, written from the selected pairs (`training.pairs` layout).

Winner and loser latents and the prompt's text embeddings are the files the sampler wrote (in the
model family's space and layout: CogVideoX (F, C, h, w), Wan (C, F, h, w)); image-to-video pairs
also carry the first frame's condition latents, encoded with the model's VAE at the sampled size as the
family's I2V pipeline encodes them (and, for Wan 2.1 I2V, the first frame's CLIP image embeddings).
The dataset records the family and latent space of the model folder (`common.families`). Derived data: rebuilt from the records each time, never left stale.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Optional

from common.errors import ConfigError
from common.sampling import inspect_video_model
from common.storage import read_bytes
from training.mining.config import PairConfig
from training.mining.pair_policy import pair_id, select_pairs


def _remove_old_pairs(directory: Path) -> None:
    """Delete a previous pairs dataset (only a folder whose summary.json says it is one)."""
    import shutil

    from training.pairs import FORMAT, SUMMARY_NAME as PAIRS_SUMMARY

    summary = directory / PAIRS_SUMMARY
    if not summary.is_file():
        if directory.exists() and any(directory.iterdir()):
            raise ConfigError(f"{directory} exists and is not a pairs dataset: refusing to write pairs into it")
        return
    try:
        is_pairs = json.loads(summary.read_text()).get("format") == FORMAT
    except json.JSONDecodeError:
        is_pairs = False
    if not is_pairs:
        raise ConfigError(f"{directory} exists and is not a pairs dataset: refusing to write pairs into it")
    shutil.rmtree(directory)


def build_pairs(records: list[dict], model_dir: str | Path, out_dir: str | Path, settings: PairConfig,
                extra: Optional[dict] = None) -> dict:
    """Select pairs and write them with `training.pairs.write_pairs_dataset` (the layout `vgpa train` reads).

    Image-to-video pairs carry the first frame's condition (and image embeddings, where the model takes
    them), encoded with the model's VAE (and image encoder) at the sampled size. Returns the report (also written into the dataset's summary.json). With no pair
    to write, nothing is written and the report says why.
    """
    import torch

    from common.families import FAMILIES, read_model_configs
    from training.pairs import Pair, write_pairs_dataset

    pairs, report = select_pairs(records, settings)
    out_dir = Path(out_dir)
    report["settings"] = settings.model_dump()
    _remove_old_pairs(out_dir)  # derived data: rebuilt from the records, never left stale
    if not pairs:
        report["written"] = None
        return report
    info = inspect_video_model(model_dir, need=("mine",))
    family, i2v = FAMILIES[info.family], info.i2v
    vae = image_encoder = None
    image_cache: dict[tuple[str, tuple], tuple] = {}
    tensors: dict[str, torch.Tensor] = {}

    def load(path: str) -> torch.Tensor:  # a path, or a storage URI (samples of a sampler writing to one)
        if path not in tensors:
            tensors[path] = torch.load(io.BytesIO(read_bytes(path)), map_location="cpu", weights_only=True).float()
        return tensors[path]

    def image_condition(path: str, latent_shape: tuple) -> tuple:
        """(image latents, image embeddings or None) of a first frame, for videos of `latent_shape`."""
        nonlocal vae, image_encoder
        import numpy as np
        from PIL import Image

        from training.encode import encode_condition_image, fit_frames, load_vae

        key = (path, tuple(latent_shape))
        if key not in image_cache:
            if vae is None:
                vae = load_vae(Path(model_dir), "cpu", torch.float32, family)
                image_encoder = family.image_encoder(model_dir, "cpu", torch.float32)
            num_frames, h, w = family.video_size_of_latents(latent_shape)
            image = Image.open(path).convert("RGB").resize((w, h))  # as the sampler resized it
            frames = torch.from_numpy(np.asarray(image).copy())[None]  # (1, H, W, 3)
            image_cache[key] = (encode_condition_image(vae, fit_frames(frames, h, w), num_frames, family),
                                image_encoder(image) if image_encoder else None)
        return image_cache[key]

    def generate():
        for winner, loser in pairs:
            wl = load(winner["latents"])
            image_latents, image_embeds = image_condition(winner["image"], tuple(wl.shape)) if i2v else (None, None)
            yield Pair(
                prompt=winner["prompt"], winner_latents=wl, loser_latents=load(loser["latents"]),
                prompt_embeds=load(winner["prompt_embeds"]), image_latents=image_latents, image_embeds=image_embeds,
                winner_score=float(winner["score"]), loser_score=float(loser["score"]),
                winner_video=winner["video"], loser_video=loser["video"], pair_id=pair_id(winner, loser),
            )

    metric_ids = report["metric_ids"]
    write_pairs_dataset(out_dir, generate(), model=str(model_dir), metric_id=metric_ids[0] if len(metric_ids) == 1 else None,
                        family=family.name, latent_space=family.latent_space(*read_model_configs(model_dir)),
                        extra={"mining": report, **(extra or {})})
    report["written"] = str(out_dir)
    return report
