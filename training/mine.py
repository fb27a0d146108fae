"""The pair-mining job: prompts -> seeds -> sampler -> scorer -> scored records -> preference pairs.

    python -m training.mine --prompts prompts.jsonl --model MODEL_DIR --out OUT_DIR [--seeds N] [--local]
    vgpa mine ...                                           # the same, with a progress bar

A Ray Data pipeline over (prompt_id, seed) rows:

    read prompt file -> expand to (prompt_id, seed) rows, seeds derived from (base_seed, prompt_id, i)
      -> drop rows already recorded (resume) -> sample -> score -> driver appends records to Parquet
      -> pairs (training.pairs layout, what `vgpa train` reads)

Two ways to run the sample and score stages, the same code behind both:
    - default: the stages call the running Serve app's `Sampler` and `Scorer` deployments through
      deployment handles. The job shares the app's autoscaling replicas with users, and Serve's
      queue limits (`max_queued_requests`) push back on the stream: a stage waits and retries on
      back-pressure instead of piling up requests.
    - `--local`: the sampler (`services.sampler.SamplerServer`) and scorer
      (`services.scorer.ScorerServer`) classes run as Ray Data actor pools
      (`compute=ActorPoolStrategy`), for a cluster without the app.
Only paths and small fields go through the object store; videos, latents and text embeddings are
files on storage that every node shares (the sampler's output folder).

Output folder:
    records/part-*.parquet   one row per (prompt_id, seed): RECORD_SCHEMA below
    pairs/                   the pairs dataset (training.pairs) + its summary.json
    mine_summary.json        counts, timings, settings

Resuming: records already in `records/` (key prompt_id:seed) are skipped on a rerun, so a killed
job loses only the videos in flight (and at most `flush_every` finished ones not yet written) and
never duplicates a record or a pair. A video that fails (sampling or scoring error) is recorded
with status "failed" and its reason; a rerun with `retry_failed` (`--retry-failed`) redoes those.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from common.errors import ConfigError, invalid_settings
from training.prompts import read_prompt_file
from training.ray_session import ensure_ray

logger = logging.getLogger(__name__)

RECORDS_DIR = "records"
PAIRS_DIR = "pairs"
SUMMARY_NAME = "mine_summary.json"
RECORD_COLUMNS = (
    ("prompt_id", "string"), ("seed", "int64"), ("prompt", "string"), ("image", "string"),
    ("video", "string"), ("latents", "string"), ("prompt_embeds", "string"), ("sample_id", "string"),
    ("status", "string"), ("reason", "string"), ("score", "float64"), ("motion", "float64"),
    ("metric_id", "string"), ("sample_s", "float64"), ("score_s", "float64"),
)
COGVIDEOX_PIPELINES = {"CogVideoXPipeline": False, "CogVideoXImageToVideoPipeline": True}


class PairSettings(BaseModel):
    """How scored records become pairs. Scores are geometry errors E: lower is better."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["best-vs-worst", "all-pairs"] = Field(
        "best-vs-worst", description="One pair per prompt (best vs worst, as the paper) or every pair above the gap.")
    min_gap: float = Field(0.05, ge=0, description="Pair two videos only when their scores differ by at least this.")
    min_motion: float = Field(0.001, ge=0, description="Videos whose camera motion is below this are static: dropped.")
    max_score: Optional[float] = Field(
        None, description="Quality threshold: videos whose error E is above this are dropped (None: keep all).")


class MineSettings(BaseModel):
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
    sampler: dict = Field(default_factory=dict, description="Local mode: extra services.config.SamplerArgs fields.")
    score: dict = Field(default_factory=dict, description="Local mode: common.config.ScoreConfig fields.")
    sampler_num_gpus: float = Field(0, ge=0, description="Local mode: GPUs per sampler actor.")
    scorer_num_gpus: float = Field(0, ge=0, description="Local mode: GPUs per scorer actor.")
    flush_every: int = Field(8, ge=1, description="Records are appended to Parquet every N videos (and at the end).")
    retry_failed: bool = Field(False, description="On resume, redo videos recorded as failed (their new record replaces the old).")
    backpressure_timeout_s: float = Field(3600, gt=0, description="Serve: give a video up after waiting this long for capacity.")
    pairs: PairSettings = Field(default_factory=PairSettings)


# ------------------------------------------------------------------------------------------------
# Inputs, checked before anything is sampled.
# ------------------------------------------------------------------------------------------------

def video_seed(base_seed: int, prompt_id: str, index: int) -> int:
    """A 31-bit seed that depends only on (base_seed, prompt_id, index)."""
    digest = hashlib.sha256(f"{base_seed}:{prompt_id}:{index}".encode()).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF


def check_model_dir(model_dir: str | Path) -> bool:
    """Raise ConfigError unless `model_dir` is a diffusers CogVideoX pipeline folder. Returns whether it is image-to-video."""
    model_dir = Path(model_dir)
    index = model_dir / "model_index.json"
    if not index.is_file():
        raise ConfigError(f"{model_dir} is not a diffusers pipeline folder (model_index.json is missing)")
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except json.JSONDecodeError as err:
        raise ConfigError(f"{index} is not valid JSON ({err})") from err
    if name not in COGVIDEOX_PIPELINES:
        raise ConfigError(f"{model_dir} holds a {name}, not a CogVideoX pipeline ({', '.join(COGVIDEOX_PIPELINES)})")
    for part in ("transformer", "vae", "scheduler", "text_encoder", "tokenizer"):
        if not (model_dir / part).is_dir():
            raise ConfigError(f"{model_dir} is not a complete CogVideoX pipeline folder: {part}/ is missing")
    return COGVIDEOX_PIPELINES[name]


def check_prompts_for_model(prompts: list[dict], i2v: bool, where: str) -> None:
    with_image = [p["prompt_id"] for p in prompts if p.get("image")]
    if i2v and len(with_image) != len(prompts):
        missing = next(p["prompt_id"] for p in prompts if not p.get("image"))
        raise ConfigError(f"the model is image-to-video but prompt {missing!r} in {where} has no first-frame image")
    if not i2v and with_image:
        raise ConfigError(f"the model is text-to-video but {where} gives first-frame images (e.g. prompt {with_image[0]!r})")


def plan_rows(prompts: list[dict], settings: MineSettings, done: set[str]) -> list[dict]:
    """(prompt_id, seed) rows still to do, in prompt order."""
    rows = []
    for p in prompts:
        for i in range(settings.seeds):
            seed = video_seed(settings.base_seed, p["prompt_id"], i)
            if f"{p['prompt_id']}:{seed}" not in done:
                rows.append({"prompt_id": p["prompt_id"], "seed": seed, "prompt": p["prompt"], "image": p.get("image")})
    return rows


# ------------------------------------------------------------------------------------------------
# Records on disk.
# ------------------------------------------------------------------------------------------------

def _schema():
    import pyarrow as pa

    return pa.schema([(name, getattr(pa, kind)()) for name, kind in RECORD_COLUMNS])


def load_records(out_dir: str | Path) -> list[dict]:
    """Every record written so far, one per prompt_id:seed (the latest; a part file that cannot be read,
    e.g. cut by a kill, is set aside and its videos are redone)."""
    import pyarrow.parquet as pq

    folder = Path(out_dir) / RECORDS_DIR
    records: dict[str, dict] = {}
    for part in sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []:
        try:
            rows = pq.read_table(part).to_pylist()
        except Exception as err:  # a truncated file from a killed job: its videos are redone
            logger.warning("setting aside unreadable record file %s (%s)", part, err)
            part.rename(part.with_suffix(".unreadable"))
            continue
        for row in rows:
            records[f"{row['prompt_id']}:{row['seed']}"] = row  # files sort by write time: a retried video's latest record wins
    return list(records.values())


def append_records(out_dir: str | Path, rows: list[dict]) -> Optional[Path]:
    """Write rows as one new part file, atomically (temp file + rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not rows:
        return None
    folder = Path(out_dir) / RECORDS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
    tmp = path.with_suffix(".tmp")
    names = [name for name, _ in RECORD_COLUMNS]
    pq.write_table(pa.Table.from_pylist([{k: row.get(k) for k in names} for row in rows], schema=_schema()), tmp)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------
# The two stages. Each takes one row (paths and small fields) and returns it with more fields;
# a failure becomes status "failed" with a reason, never an exception that stops the job.
# ------------------------------------------------------------------------------------------------

def _sample_request(row: dict, s: dict) -> dict:
    req = {"prompt": row["prompt"], "seeds": [int(row["seed"])]}
    for key in ("steps", "guidance", "frames", "height", "width", "negative_prompt", "adapter"):
        if s.get(key) is not None:
            req[key] = s[key]
    return req


def _after_sample(row: dict, answer: dict, seconds: float) -> dict:
    out = dict(row, sample_s=seconds)
    if "error" in answer:
        err = answer["error"]
        return dict(out, status="failed", reason=f"sampling: {err.get('type')}: {err.get('message')}")
    sample = answer["samples"][0]
    return dict(out, status=None, reason=None, sample_id=answer["sample_id"], video=sample["video"],
                latents=sample["latents"], prompt_embeds=sample["prompt_embeds"])


def _after_score(row: dict, answer: dict, seconds: float) -> dict:
    out = dict(row, score_s=seconds)
    if "error" in answer:
        err = answer["error"]
        return dict(out, status="failed", reason=f"scoring: {err.get('type')}: {err.get('message')}")
    r = answer["result"]
    return dict(out, status=r["status"], reason=r.get("reason"), score=r.get("score"), motion=r.get("motion"),
                metric_id=r.get("metric_id"))


def _failed(row: dict, stage: str, err: BaseException) -> dict:
    return dict(row, status="failed", reason=f"{stage}: {type(err).__name__}: {err}")


class LocalSampleStage:
    """Ray Data actor: the sampler deployment's class, loaded once per actor."""

    def __init__(self, sampler_args: dict, output_dir: str, settings: dict):
        from services.sampler import SamplerServer

        self._server = SamplerServer(sampler_args, output_dir)
        self._settings = settings

    def __call__(self, row: dict) -> dict:
        t0 = time.perf_counter()
        try:
            answer = asyncio.run(self._server.sample(_sample_request(row, self._settings), row.get("image")))
        except Exception as err:  # noqa: BLE001 - recorded, the job goes on
            return _failed(row, "sampling", err)
        return _after_sample(row, answer, time.perf_counter() - t0)


class LocalScoreStage:
    """Ray Data actor: the scorer deployment's class (backend and perceptual metric loaded once)."""

    def __init__(self, scorer_args: dict):
        from services.scorer import ScorerServer

        self._server = ScorerServer(scorer_args)

    def __call__(self, row: dict) -> dict:
        if row.get("status") == "failed":
            return row
        t0 = time.perf_counter()
        try:
            answer = asyncio.run(self._server.score(row["video"]))
        except Exception as err:  # noqa: BLE001
            return _failed(row, "scoring", err)
        return _after_score(row, answer, time.perf_counter() - t0)


def _call_with_backpressure(call: Callable[[], Any], timeout_s: float):
    """Call a deployment handle; while Serve answers with back-pressure, wait and try again."""
    from ray.serve.exceptions import BackPressureError

    end, delay = time.monotonic() + timeout_s, 0.2
    while True:
        try:
            return call()
        except BackPressureError:
            if time.monotonic() > end:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


class ServeSampleStage:
    """Ray Data actor: one request at a time to the app's Sampler deployment (pool size = requests in flight)."""

    def __init__(self, app_name: str, settings: dict):
        from ray import serve

        self._handle = serve.get_deployment_handle("Sampler", app_name=app_name)
        self._settings = settings

    def __call__(self, row: dict) -> dict:
        t0 = time.perf_counter()
        try:
            answer = _call_with_backpressure(
                lambda: self._handle.sample.remote(_sample_request(row, self._settings), row.get("image")).result(),
                self._settings["backpressure_timeout_s"])
        except Exception as err:  # noqa: BLE001
            return _failed(row, "sampling", err)
        return _after_sample(row, answer, time.perf_counter() - t0)


class ServeScoreStage:
    """Ray Data actor: one request at a time to the app's Scorer deployment."""

    def __init__(self, app_name: str, settings: dict):
        from ray import serve

        self._handle = serve.get_deployment_handle("Scorer", app_name=app_name)
        self._settings = settings

    def __call__(self, row: dict) -> dict:
        if row.get("status") == "failed":
            return row
        t0 = time.perf_counter()
        try:
            answer = _call_with_backpressure(lambda: self._handle.score.remote(row["video"]).result(),
                                             self._settings["backpressure_timeout_s"])
        except Exception as err:  # noqa: BLE001
            return _failed(row, "scoring", err)
        return _after_score(row, answer, time.perf_counter() - t0)


def _check_app(app_name: str, i2v: bool) -> None:
    """The Serve app must be running with a sampler of the same kind as the model folder."""
    from ray import serve

    try:
        status = serve.status().applications.get(app_name)
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"cannot reach Ray Serve ({err}); start the app (vgpa serve) or mine with --local") from err
    if status is None:
        raise ConfigError(f"no Serve application named {app_name!r} is running; start it (vgpa serve) or mine with --local")
    deployments = set(status.deployments)
    for name in ("Sampler", "Scorer"):
        if name not in deployments:
            raise ConfigError(f"the Serve application {app_name!r} has no {name} deployment "
                              "(configure its sampler: section) ; or mine with --local")
    info = serve.get_deployment_handle("Sampler", app_name=app_name).ready.remote().result(timeout_s=600)
    app_i2v = "ImageToVideo" in info["pipeline"]
    if app_i2v != i2v:
        raise ConfigError(f"the running sampler serves a {info['pipeline']}, but --model is "
                          f"{'image' if i2v else 'text'}-to-video: mine with the model the app serves")


# ------------------------------------------------------------------------------------------------
# Pairs.
# ------------------------------------------------------------------------------------------------

def select_pairs(records: list[dict], settings: PairSettings) -> tuple[list[tuple[dict, dict]], dict]:
    """Rank each prompt's usable videos by score (lower is better) and pair them.

    Returns (pairs as (winner, loser) records, report). Videos are dropped as failed, unscorable,
    static (motion < min_motion) or low_quality (score > max_score); a prompt with fewer than two
    usable videos of one metric_id yields nothing; a candidate pair whose gap is below min_gap is
    dropped as small_gap. Videos scored under different metric_ids are never paired.
    """
    dropped_videos: Counter = Counter()
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for rec in records:
        status = rec.get("status")
        if status == "failed":
            dropped_videos["failed"] += 1
        elif status != "ok" or rec.get("score") is None or not math.isfinite(rec["score"]):
            dropped_videos["unscorable"] += 1
        elif rec.get("motion") is None or rec["motion"] < settings.min_motion:
            dropped_videos["static"] += 1
        elif settings.max_score is not None and rec["score"] > settings.max_score:
            dropped_videos["low_quality"] += 1
        else:
            groups[(rec["prompt_id"], rec.get("metric_id") or "")].append(rec)
    pairs: list[tuple[dict, dict]] = []
    dropped_pairs: Counter = Counter()
    prompts_with_pairs: set[str] = set()
    for (prompt_id, _), group in sorted(groups.items()):
        group.sort(key=lambda r: (r["score"], r["seed"]))
        if len(group) < 2:
            dropped_pairs["single_candidate"] += 1
            continue
        if settings.mode == "best-vs-worst":
            candidates = [(group[0], group[-1])]
        else:
            candidates = [(group[i], group[j]) for i in range(len(group)) for j in range(i + 1, len(group))]
        for winner, loser in candidates:
            if loser["score"] - winner["score"] >= settings.min_gap and loser["score"] > winner["score"]:
                pairs.append((winner, loser))
                prompts_with_pairs.add(prompt_id)
            else:
                dropped_pairs["small_gap"] += 1
    gaps = [l["score"] - w["score"] for w, l in pairs]
    report = {
        "videos": len(records),
        "videos_kept": sum(len(g) for g in groups.values()),
        "videos_dropped": dict(sorted(dropped_videos.items())),
        "prompts": len({r["prompt_id"] for r in records}),
        "prompts_with_pairs": len(prompts_with_pairs),
        "pairs": len(pairs),
        "pairs_dropped": dict(sorted(dropped_pairs.items())),
        "gap_histogram": _histogram(gaps),
        "metric_ids": sorted({m for _, m in groups}),
    }
    return pairs, report


def _histogram(values: list[float], bins: int = 10) -> dict:
    import numpy as np

    if not values:
        return {"edges": [], "counts": []}
    counts, edges = np.histogram(np.asarray(values, dtype=float), bins=bins)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def _pair_id(winner: dict, loser: dict) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", winner["prompt_id"])[:48]
    digest = hashlib.sha1(f"{winner['prompt_id']}:{winner['seed']}:{loser['seed']}".encode()).hexdigest()[:10]
    return f"{safe}-{digest}"


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


def build_pairs(records: list[dict], model_dir: str | Path, out_dir: str | Path, settings: PairSettings,
                extra: Optional[dict] = None) -> dict:
    """Select pairs and write them with `training.pairs.write_pairs_dataset` (the layout `vgpa train` reads).

    Image-to-video pairs carry the first frame's latents, encoded with the model's VAE at the
    sampled size. Returns the report (also written into the dataset's summary.json). With no pair
    to write, nothing is written and the report says why.
    """
    import torch

    from common.cogvideox import latent_space, read_model_configs
    from training.pairs import Pair, write_pairs_dataset

    pairs, report = select_pairs(records, settings)
    out_dir = Path(out_dir)
    report["settings"] = settings.model_dump()
    _remove_old_pairs(out_dir)  # derived data: rebuilt from the records, never left stale
    if not pairs:
        report["written"] = None
        return report
    i2v = check_model_dir(model_dir)
    vae = None
    image_cache: dict[tuple[str, tuple], torch.Tensor] = {}
    tensors: dict[str, torch.Tensor] = {}

    def load(path: str) -> torch.Tensor:
        if path not in tensors:
            tensors[path] = torch.load(path, map_location="cpu", weights_only=True).float()
        return tensors[path]

    def image_latents(path: str, latent_shape: tuple) -> torch.Tensor:
        nonlocal vae
        from PIL import Image

        from training.encode import encode_condition_image, fit_frames

        key = (path, tuple(latent_shape))
        if key not in image_cache:
            if vae is None:
                from diffusers import AutoencoderKLCogVideoX

                vae = AutoencoderKLCogVideoX.from_pretrained(Path(model_dir) / "vae").eval()
            factor = 2 ** (len(vae.config.block_out_channels) - 1)
            h, w = latent_shape[-2] * factor, latent_shape[-1] * factor
            image = Image.open(path).convert("RGB").resize((w, h))  # as the sampler resized it
            import numpy as np

            frames = torch.from_numpy(np.asarray(image).copy())[None]  # (1, H, W, 3)
            image_cache[key] = encode_condition_image(vae, fit_frames(frames, h, w))
        return image_cache[key]

    def generate():
        for winner, loser in pairs:
            wl = load(winner["latents"])
            yield Pair(
                prompt=winner["prompt"], winner_latents=wl, loser_latents=load(loser["latents"]),
                prompt_embeds=load(winner["prompt_embeds"]),
                image_latents=image_latents(winner["image"], tuple(wl.shape)) if i2v else None,
                winner_score=float(winner["score"]), loser_score=float(loser["score"]),
                winner_video=winner["video"], loser_video=loser["video"], pair_id=_pair_id(winner, loser),
            )

    metric_ids = report["metric_ids"]
    write_pairs_dataset(out_dir, generate(), model=str(model_dir), metric_id=metric_ids[0] if len(metric_ids) == 1 else None,
                        latent_space=latent_space(*read_model_configs(model_dir)), extra={"mining": report, **(extra or {})})
    report["written"] = str(out_dir)
    return report


# ------------------------------------------------------------------------------------------------
# The job.
# ------------------------------------------------------------------------------------------------

def mine(
    prompts_file: str | Path,
    model_dir: str | Path,
    out_dir: str | Path,
    settings: Optional[MineSettings] = None,
    *,
    local: bool = False,
    address: Optional[str] = None,
    on_progress: Optional[Callable[[dict], None]] = None,
) -> dict:
    """Run (or resume) a mining job; write records, pairs and mine_summary.json. Returns the summary."""
    import ray

    settings = settings or MineSettings()
    out_dir = Path(out_dir).resolve()
    model_dir = Path(model_dir).resolve()
    # 1. Everything that can be wrong with the inputs, before any sampling.
    prompts = read_prompt_file(prompts_file)
    i2v = check_model_dir(model_dir)
    check_prompts_for_model(prompts, i2v, str(prompts_file))
    local_sampler_args = local_scorer_args = None
    if local:
        from common.config import ScoreConfig
        from services.config import SamplerArgs, ScorerArgs

        try:
            local_sampler_args = SamplerArgs.model_validate(
                {"model_dir": str(model_dir), "output_dir": str(out_dir / "samples"), **settings.sampler}).model_dump(mode="json")
            local_scorer_args = ScorerArgs.model_validate(
                {"score": ScoreConfig.model_validate(settings.score).model_dump(by_alias=True), "warmup": False,
                 "num_replicas": 1}).model_dump(mode="json", by_alias=True)
        except Exception as err:  # pydantic's message names the field
            raise ConfigError(f"invalid local sampler/scorer settings: {err}") from None

    out_dir.mkdir(parents=True, exist_ok=True)
    records = load_records(out_dir)
    if settings.retry_failed:
        records = [r for r in records if r.get("status") != "failed"]
    done = {f"{r['prompt_id']}:{r['seed']}" for r in records}
    todo = plan_rows(prompts, settings, done)
    total_videos = len(prompts) * settings.seeds
    wanted = {f"{r['prompt_id']}:{video_seed(settings.base_seed, r['prompt_id'], i)}" for r in prompts for i in range(settings.seeds)}
    records = [r for r in records if f"{r['prompt_id']}:{r['seed']}" in wanted]  # another --seeds/--prompts run's extras stay on disk

    # 2. The stream.
    started = time.perf_counter()
    # Progress is kept incrementally (a job may hold 1e5 videos): records and pair counts per prompt.
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_prompt[r["prompt_id"]].append(r)
    pairs_per_prompt = {pid: len(select_pairs(rs, settings.pairs)[0]) for pid, rs in by_prompt.items()}
    state = {"new": 0, "failed": sum(r.get("status") == "failed" for r in records),
             "prompts_done": sum(len(rs) >= settings.seeds for rs in by_prompt.values()),
             "pairs": sum(pairs_per_prompt.values())}

    def progress() -> dict:
        elapsed = time.perf_counter() - started
        return {
            "prompts_done": state["prompts_done"],
            "prompts_total": len(prompts),
            "videos_done": len(records), "videos_total": total_videos, "videos_this_run": state["new"],
            "videos_per_min": round(60 * state["new"] / elapsed, 2) if elapsed > 0 and state["new"] else 0.0,
            "failed": state["failed"], "pairs_so_far": state["pairs"],
        }

    if on_progress:
        on_progress(progress())
    if todo:
        ensure_ray(address, min_cpus=4)
        import ray.data

        if not local:
            _check_app(settings.app_name, i2v)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        stage_settings = settings.model_dump(mode="json")
        ds = ray.data.from_items(todo, override_num_blocks=len(todo))
        if local:
            sample_resources = {"num_cpus": 1, **({"num_gpus": settings.sampler_num_gpus} if settings.sampler_num_gpus else {})}
            score_resources = {"num_cpus": 1, **({"num_gpus": settings.scorer_num_gpus} if settings.scorer_num_gpus else {})}
            ds = ds.map(LocalSampleStage, fn_constructor_kwargs={"sampler_args": local_sampler_args,
                                                                 "output_dir": str(out_dir / "samples"), "settings": stage_settings},
                        compute=ray.data.ActorPoolStrategy(size=settings.sample_concurrency), **sample_resources)
            ds = ds.map(LocalScoreStage, fn_constructor_kwargs={"scorer_args": local_scorer_args},
                        compute=ray.data.ActorPoolStrategy(size=settings.score_concurrency), **score_resources)
        else:
            kwargs = {"app_name": settings.app_name, "settings": stage_settings}
            ds = ds.map(ServeSampleStage, fn_constructor_kwargs=kwargs, num_cpus=0.05,
                        compute=ray.data.ActorPoolStrategy(size=settings.sample_concurrency))
            ds = ds.map(ServeScoreStage, fn_constructor_kwargs=kwargs, num_cpus=0.05,
                        compute=ray.data.ActorPoolStrategy(size=settings.score_concurrency))
        buffer: list[dict] = []

        def flush() -> None:
            append_records(out_dir, buffer)
            records.extend(buffer)
            for pid in {r["prompt_id"] for r in buffer}:
                count = len(select_pairs(by_prompt[pid], settings.pairs)[0])
                state["pairs"] += count - pairs_per_prompt.get(pid, 0)
                pairs_per_prompt[pid] = count
            buffer.clear()
            if on_progress:
                on_progress(progress())

        for row in ds.iter_rows():
            row = dict(row)
            if row.get("status") is None:
                row = dict(row, status="failed", reason="no verdict (the score stage did not run)")
            buffer.append(row)
            by_prompt[row["prompt_id"]].append(row)
            state["prompts_done"] += len(by_prompt[row["prompt_id"]]) == settings.seeds
            state["new"] += 1
            state["failed"] += row["status"] == "failed"
            if len(buffer) >= settings.flush_every:
                flush()
        flush()
    mined_s = time.perf_counter() - started

    # 3. Pairs (rebuilt from all records: idempotent, never duplicated).
    report = build_pairs(records, model_dir, out_dir / PAIRS_DIR, settings.pairs,
                         extra={"prompts_file": str(Path(prompts_file).resolve()), "seeds": settings.seeds,
                                "base_seed": settings.base_seed, "mode": "local" if local else "serve"})
    summary = {
        **progress(),
        "mode": "local" if local else f"serve:{settings.app_name}",
        "wall_time_s": round(mined_s, 2),
        "sample_s_total": round(sum(r.get("sample_s") or 0 for r in records[-state["new"]:]) if state["new"] else 0.0, 3),
        "score_s_total": round(sum(r.get("score_s") or 0 for r in records[-state["new"]:]) if state["new"] else 0.0, 3),
        "statuses": dict(Counter(r.get("status") for r in records)),
        "records": str(out_dir / RECORDS_DIR),
        "pairs_dir": report["written"],
        "pairs": report["pairs"],
        "report": report,
        "settings": settings.model_dump(mode="json"),
    }
    (out_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def format_progress(p: dict) -> str:
    return (f"prompts {p['prompts_done']}/{p['prompts_total']}  videos {p['videos_done']}/{p['videos_total']}  "
            f"{p['videos_per_min']:.1f} videos/min  failed {p['failed']}  pairs so far {p['pairs_so_far']}")


def settings_from_file(path: Optional[str | Path], overrides: dict) -> MineSettings:
    """MineSettings from a YAML/JSON file plus command-line overrides (None values ignored)."""
    from pydantic import ValidationError

    data: dict = {}
    if path is not None:
        import yaml

        text = Path(path).read_text()
        data = (json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of MineSettings fields")
    pair_overrides = {k: v for k, v in overrides.pop("pairs", {}).items() if v is not None}
    data.update({k: v for k, v in overrides.items() if v is not None})
    if pair_overrides:
        data["pairs"] = {**data.get("pairs", {}), **pair_overrides}
    try:
        return MineSettings.model_validate(data)
    except ValidationError as err:
        raise invalid_settings(err, "mining setting") from None


def build_parser() -> argparse.ArgumentParser:
    """The arguments of `python -m training.mine` (the same names as `vgpa mine`)."""
    parser = argparse.ArgumentParser(prog="python -m training.mine", description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int)
    parser.add_argument("--address")
    parser.add_argument("--local", action="store_true")
    parser.add_argument("--config", help="YAML/JSON file of MineSettings fields")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--app-name")
    parser.add_argument("--pair-mode", choices=["best-vs-worst", "all-pairs"])
    parser.add_argument("--min-gap", type=float)
    parser.add_argument("--max-score", type=float)
    parser.add_argument("--min-motion", type=float)
    parser.add_argument("--retry-failed", action="store_true", help="redo videos recorded as failed")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m training.mine` (what `ray job submit ... -- python -m training.mine` runs)."""
    args = build_parser().parse_args(argv)
    from common.errors import VideoGPAError

    try:
        settings = settings_from_file(args.config, {
            "seeds": args.seeds, "steps": args.steps, "app_name": args.app_name,
            "retry_failed": args.retry_failed or None,
            "pairs": {"mode": args.pair_mode, "min_gap": args.min_gap, "max_score": args.max_score, "min_motion": args.min_motion}})
        summary = mine(args.prompts, args.model, args.out, settings, local=args.local, address=args.address,
                       on_progress=lambda p: print(format_progress(p), flush=True))
    except VideoGPAError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("prompts_done", "videos_done", "failed", "pairs", "pairs_dir", "wall_time_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
