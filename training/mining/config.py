"""Every setting of a mining run: `MineConfig` (with its `PairConfig`), from YAML/JSON plus flags."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.config import ScoreConfig
from common.errors import ConfigError, invalid_settings
from common.sampling import SamplingOptions


class PairConfig(BaseModel):
    """How scored records become pairs. Scores are geometry errors E: lower is better."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["best-vs-worst", "all-pairs"] = Field(
        "best-vs-worst", description="One pair per prompt (best vs worst, as the paper) or every pair above the gap.")
    min_gap: float = Field(0.05, ge=0, description="Pair two videos only when their scores differ by at least this.")
    min_motion: float = Field(0.001, ge=0, description="Videos whose camera motion is below this are static: dropped.")
    max_score: Optional[float] = Field(
        None, description="Quality threshold: videos whose error E is above this are dropped (None: keep all).")


class MineConfig(BaseModel):
    """Everything about a mining run except where its inputs and outputs are."""

    model_config = ConfigDict(extra="forbid")

    seeds: int = Field(4, ge=1, description="Videos per prompt.")
    base_seed: int = Field(0, description="Seeds are derived from (base_seed, prompt_id, i): deterministic per prompt.")
    steps: Optional[int] = Field(None, ge=1, description="Denoising steps (default: the sampler's).")
    guidance: Optional[float] = Field(None, ge=0, description="Guidance scale (default: the sampler's).")
    frames: Optional[int] = Field(None, ge=1, description="Pixel frames, 4k+1 (default: the model's).")
    height: Optional[int] = Field(None, ge=8, description="Pixel height (default: the model's).")
    width: Optional[int] = Field(None, ge=8, description="Pixel width (default: the model's).")
    negative_prompt: Optional[str] = None
    adapter: Optional[str] = Field(None, description="A LoRA adapter name the sampler knows (default: the base model).")
    sample_concurrency: int = Field(1, ge=1, description="Local: sampler actors. Serve: requests in flight to the sampler.")
    score_concurrency: int = Field(1, ge=1, description="Local: scorer actors. Serve: requests in flight to the scorer.")
    app_name: str = Field("default", description="Serve application whose Sampler and Scorer deployments are used.")
    sampler: SamplingOptions = Field(default_factory=SamplingOptions,
                                     description="Local mode: the sampling engine's options (dtype, device, adapters...).")
    score: ScoreConfig = Field(default_factory=ScoreConfig, description="Local mode: the scorer's settings.")
    sampler_num_gpus: float = Field(0, ge=0, description="Local mode: GPUs per sampler actor.")
    scorer_num_gpus: float = Field(0, ge=0, description="Local mode: GPUs per scorer actor.")
    flush_every: int = Field(8, ge=1, description="Records are appended to Parquet every N videos (and at the end).")
    retry_failed: bool = Field(False, description="On resume, redo videos recorded as failed (their new record replaces the old).")
    backpressure_timeout_s: float = Field(3600, gt=0, description="Serve: give a video up after waiting this long for capacity.")
    pairs: PairConfig = Field(default_factory=PairConfig)


def config_from_file(path: Optional[str | Path], overrides: dict) -> MineConfig:
    """MineConfig from a YAML/JSON file plus command-line overrides (None values ignored)."""
    data: dict = {}
    if path is not None:
        import yaml

        text = Path(path).read_text()
        data = (json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of MineConfig fields")
    pair_overrides = {k: v for k, v in overrides.pop("pairs", {}).items() if v is not None}
    data.update({k: v for k, v in overrides.items() if v is not None})
    if pair_overrides:
        data["pairs"] = {**data.get("pairs", {}), **pair_overrides}
    try:
        return MineConfig.model_validate(data)
    except ValidationError as err:
        raise invalid_settings(err, "mining setting") from None
