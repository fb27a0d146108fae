"""The mining job on Ray Data: prompts -> (prompt_id, seed) rows -> sample -> score -> records -> pairs.

    read prompt file -> expand to (prompt_id, seed) rows, seeds derived from (base_seed, prompt_id, i)
      -> drop rows already recorded (resume) -> sample -> score -> driver appends records to Parquet
      -> pairs (training.pairs layout, what `vgpa train` reads)

The sample and score stages (`training.mining.stages`) call the running Serve app's deployments
by default: the job shares the app's autoscaling replicas with users. With `local=True` the same
engines run in Ray Data actor pools (`compute=ActorPoolStrategy`), for a cluster without the app.
Only paths and small fields go through the object store; videos, latents and text embeddings are
files on storage that every node shares (the sampler's output folder).

Output folder:
    records/part-*.parquet   one row per (prompt_id, seed): training.mining.records.RECORD_COLUMNS
    pairs/                   the pairs dataset (training.pairs) + its summary.json
    mine_summary.json        counts, timings, settings

Resuming: records already in `records/` (key prompt_id:seed) are skipped on a rerun, so a killed
job loses only the videos in flight (and at most `flush_every` finished ones not yet written) and
never duplicates a record or a pair. A video that fails (sampling or scoring error) is recorded
with status "failed" and its reason; a rerun with `retry_failed` (`--retry-failed`) redoes those.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Optional

from pydantic import ValidationError

from common.errors import ConfigError, invalid_settings
from common.sampling import SamplingConfig, inspect_video_model
from common.scorer import ScorerConfig
from training.mining.config import MineConfig
from training.mining.pair_policy import select_pairs
from training.mining.pair_writer import build_pairs
from training.mining.records import RECORDS_DIR, append_records, load_records
from training.mining.stages import SampleStage, ScoreStage, check_app
from training.prompts import read_prompt_file
from training.ray_session import ensure_ray

PAIRS_DIR = "pairs"
SUMMARY_NAME = "mine_summary.json"


def video_seed(base_seed: int, prompt_id: str, index: int) -> int:
    """A 31-bit seed that depends only on (base_seed, prompt_id, index)."""
    digest = hashlib.sha256(f"{base_seed}:{prompt_id}:{index}".encode()).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF



def check_prompts_for_model(prompts: list[dict], i2v: bool, where: str) -> None:
    with_image = [p["prompt_id"] for p in prompts if p.get("image")]
    if i2v and len(with_image) != len(prompts):
        missing = next(p["prompt_id"] for p in prompts if not p.get("image"))
        raise ConfigError(f"the model is image-to-video but prompt {missing!r} in {where} has no first-frame image")
    if not i2v and with_image:
        raise ConfigError(f"the model is text-to-video but {where} gives first-frame images (e.g. prompt {with_image[0]!r})")


def plan_rows(prompts: list[dict], config: MineConfig, done: set[str]) -> list[dict]:
    """(prompt_id, seed) rows still to do, in prompt order."""
    rows = []
    for p in prompts:
        for i in range(config.seeds):
            seed = video_seed(config.base_seed, p["prompt_id"], i)
            if f"{p['prompt_id']}:{seed}" not in done:
                rows.append({"prompt_id": p["prompt_id"], "seed": seed, "prompt": p["prompt"], "image": p.get("image")})
    return rows


def mine(
    prompts_file: str | Path,
    model_dir: str | Path,
    out_dir: str | Path,
    config: Optional[MineConfig] = None,
    *,
    local: bool = False,
    address: Optional[str] = None,
    on_progress: Optional[Callable[[dict], None]] = None,
) -> dict:
    """Run (or resume) a mining job; write records, pairs and mine_summary.json. Returns the summary."""
    import ray

    settings = config or MineConfig()
    out_dir = Path(out_dir).resolve()
    model_dir = Path(model_dir).resolve()
    # 1. Everything that can be wrong with the inputs, before any sampling.
    prompts = read_prompt_file(prompts_file)
    model_info = inspect_video_model(model_dir, need=("sample", "mine"))  # CogVideoX or Wan
    i2v = model_info.i2v
    check_prompts_for_model(prompts, i2v, str(prompts_file))
    sampling = scoring = None
    if local:
        try:
            sampling = SamplingConfig(model_dir=model_dir, output_dir=out_dir / "samples", **dict(settings.sampler))
        except ValidationError as err:
            raise invalid_settings(err, "local sampler setting") from None
        scoring = ScorerConfig(score=settings.score)

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

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        ds = ray.data.from_items(todo, override_num_blocks=len(todo))
        if local:
            sample_kwargs, score_kwargs = {"sampling": sampling}, {"scoring": scoring}
            sample_resources = {"num_cpus": 1, **({"num_gpus": settings.sampler_num_gpus} if settings.sampler_num_gpus else {})}
            score_resources = {"num_cpus": 1, **({"num_gpus": settings.scorer_num_gpus} if settings.scorer_num_gpus else {})}
        else:  # the actors only wait on handles
            check_app(settings.app_name, i2v, model_info.family)
            sample_kwargs = score_kwargs = {"app_name": settings.app_name}
            sample_resources = score_resources = {"num_cpus": 0.05}
        for stage, kwargs, resources, size in ((SampleStage, sample_kwargs, sample_resources, settings.sample_concurrency),
                                               (ScoreStage, score_kwargs, score_resources, settings.score_concurrency)):
            ds = ds.map_batches(stage, fn_constructor_args=(settings,), fn_constructor_kwargs=kwargs, batch_size=1,
                                batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=size), **resources)
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

