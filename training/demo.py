"""`vgpa demo --tiny`: the whole loop on one machine with a tiny random CogVideoX (or Wan: `--family wan`).

    tiny image-to-video CogVideoX (save_pretrained) -> first frames from the synthetic renderer
    -> camera-motion prompts -> mining job (--local mode: sampler + scorer engines in Ray Data actor pools)
    -> pairs -> LoRA-DPO with two Ray Train workers (DeepSpeed ZeRO-2) -> the LoRA loaded back into
    the sampler -> sample again -> score

With random weights the videos are noise: the geometry scorer rightly calls them unscorable, so
there is nothing to rank. The demo then ranks the *same mined candidates* by a stand-in that
needs no reconstruction (mean absolute frame-to-frame change, lower is better), labels it as such
in the summary (`pairs_ranked_by`, its own metric_id), and trains on those pairs. The numbers mean
nothing for quality; the point is that every real component runs, connected.

`family="wan"`: the same loop on a tiny random Wan 2.1 (`training.fixtures.tiny_wan`), text-to-video
by default: camera-motion prompts without first frames, sampled at the tiny model's 9 x 32 x 32 (Wan's
own default, 81 x 480 x 832, is for the real model), flow-matching DPO. `i2v=True` runs it on a tiny
Wan 2.1 image-to-video (`WanImageToVideoPipeline`, CLIP image encoder included) from the renderer's
first frames, as the CogVideoX loop does; `i2v=False` runs CogVideoX text-to-video.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

STAND_IN_METRIC = "demo-stand-in/frame-change"
#: The families the tiny demo runs (`vgpa demo --tiny --family`) -> image-to-video unless told otherwise?
DEMO_FAMILIES = {"cogvideox": True, "wan": False}


def frame_change(video: str) -> float:
    """Mean absolute change between consecutive frames, in [0, 1] (a reconstruction-free stand-in)."""
    from common.video import load_video, to_float

    frames = to_float(load_video(video).frames)
    return float((frames[1:] - frames[:-1]).abs().mean())


def stand_in_records(records: list[dict]) -> list[dict]:
    """The mined records re-ranked by `frame_change` (sampled videos only; failures stay failures)."""
    out = []
    for rec in records:
        if rec.get("status") == "failed" or not rec.get("video"):
            out.append(rec)
            continue
        value = frame_change(rec["video"])
        out.append(dict(rec, status="ok", reason=None, score=value, motion=value, metric_id=STAND_IN_METRIC))
    return out


def _image_prompt_file(out: Path, prompts: int) -> Path:
    """Camera-motion prompts for first frames rendered by the synthetic renderer (image-to-video)."""
    from PIL import Image

    from common.synthetic import render_video
    from training.prompts import image_prompts, write_prompt_file

    frames_dir = out / "first_frames"
    frames_dir.mkdir(exist_ok=True)
    scenes = [("boxes", "orbit"), ("room", "dolly"), ("boxes", "truck"), ("room", "orbit")]
    for i in range(prompts):
        kind, trajectory = scenes[i % len(scenes)]
        path = frames_dir / f"{kind}-{i}.png"
        if not path.is_file():
            Image.fromarray(render_video(kind, trajectory, frames=2, size=(64, 64), seed=i).frames[0].numpy()).save(path)
    return write_prompt_file(out / "prompts.jsonl", image_prompts(frames_dir))


def _text_prompt_file(out: Path, prompts: int) -> Path:
    """Seeded camera-motion prompts without first frames (text-to-video)."""
    import random

    from training.prompts import camera_motion_prompt, load_vocabulary, write_prompt_file

    vocabulary = load_vocabulary()
    rows = [{"prompt_id": f"t2v-{i}", "prompt": camera_motion_prompt(random.Random(i), vocabulary)} for i in range(prompts)]
    return write_prompt_file(out / "prompts.jsonl", rows)


def run_tiny_demo(out: str | Path, *, family: str = "cogvideox", i2v: Optional[bool] = None, prompts: int = 3,
                  seeds: int = 2, train_steps: int = 2, workers: int = 2, address: Optional[str] = None,
                  log=print) -> dict:
    """Run the loop on a tiny `family` model, image-to-video if `i2v` (default: CogVideoX image-to-video, Wan
    text-to-video); write everything under `out`; return (and write) demo_summary.json."""
    from common.config import ScoreConfig
    from common.errors import ConfigError
    from common.scoring import score_video
    from common.sampling import SampleRequest, Sampler, SamplingConfig
    from training.mining import MineConfig, PairConfig, mine
    from training.mining.pair_writer import build_pairs
    from training.mining.records import load_records
    from training.pairs import load_pairs_index
    from training.trainer import TrainConfig, train

    if family not in DEMO_FAMILIES:
        raise ConfigError(f"the tiny demo runs {' or '.join(DEMO_FAMILIES)}, not {family!r}")
    i2v = DEMO_FAMILIES[family] if i2v is None else bool(i2v)
    started = time.perf_counter()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = out / "model"
    sizes: dict = {}
    if family == "wan":
        from training.fixtures import tiny_wan

        if not model.is_dir():
            tiny_wan.save_tiny_wan(model, i2v=i2v)
        sizes = {"frames": tiny_wan.NUM_FRAMES, "height": tiny_wan.HEIGHT, "width": tiny_wan.WIDTH}
    else:
        from training.fixtures.tiny_cogvideox import save_tiny_cogvideox

        if not model.is_dir():
            save_tiny_cogvideox(model, i2v=i2v)
    name = {"cogvideox": "CogVideoX", "wan": "Wan"}[family]
    if i2v:
        prompt_file = _image_prompt_file(out, prompts)
        log(f"[demo] {prompts} prompts from the synthetic renderer's first frames for a tiny random {name} "
            f"image-to-video -> {prompt_file}")
    else:
        prompt_file = _text_prompt_file(out, prompts)
        log(f"[demo] {prompts} text-to-video camera-motion prompts for a tiny random {name} -> {prompt_file}")

    # 1. Mine (local mode: no Serve app needed).
    score = {"frames": 4, "recon_frames": 8, "max_side": 64}
    mined = mine(prompt_file, model, out / "mined", MineConfig(seeds=seeds, steps=2, score=score, **sizes), local=True,
                 address=address,
                 on_progress=lambda p: log(f"[demo] mining: prompts {p['prompts_done']}/{p['prompts_total']}, "
                                           f"videos {p['videos_done']}/{p['videos_total']}, pairs so far {p['pairs_so_far']}"))
    ranked_by = mined["report"]["metric_ids"][0] if mined["pairs"] else None
    pairs_dir = Path(mined["pairs_dir"]) if mined["pairs_dir"] else None
    if pairs_dir is None:
        log(f"[demo] the geometry scorer found nothing to rank ({mined['statuses']}): random weights make noise; "
            "ranking the mined candidates by the frame-change stand-in")
        records = stand_in_records(load_records(out / "mined"))
        report = build_pairs(records, model, out / "pairs", PairConfig(min_gap=0.0, min_motion=0.0),
                             extra={"ranked_by": STAND_IN_METRIC})
        if not report["written"]:
            raise RuntimeError(f"the demo could not form any pair: {report}")
        pairs_dir, ranked_by = Path(report["written"]), STAND_IN_METRIC
    num_pairs = len(load_pairs_index(pairs_dir))
    log(f"[demo] {num_pairs} pairs in {pairs_dir}")

    # 2. Train a LoRA for a few steps with two workers.
    cfg = TrainConfig(num_workers=workers, batch_size=workers, micro_batch_size=1, max_steps=train_steps,
                      warmup_steps=0, lora_rank=4, lora_alpha=8, learning_rate=1e-3, checkpoint_every=train_steps,
                      max_failures=0, run_name="vgpa-demo-tiny", gradient_checkpointing=False)
    trained = train(cfg, pairs_dir, model, out / "lora", address=address,
                    on_step=lambda m: log(f"[demo] step {m['step']}: loss {m['loss']:.4f}"))

    # 3. Load the LoRA back into the sampler engine, sample again, score.
    sampler = Sampler(SamplingConfig(model_dir=model, adapters={"demo": out / "lora"}, default_steps=2), out / "after")
    after = []
    for row in [json.loads(line) for line in prompt_file.read_text().splitlines()]:
        answer = sampler.sample(SampleRequest(prompt=row["prompt"], seeds=[0], adapter="demo", **sizes), row.get("image"))
        if answer.error is not None:
            after.append({"prompt_id": row["prompt_id"], "status": "failed", "reason": answer.error.message})
            continue
        video = answer.result.samples[0].video
        result = score_video(video, ScoreConfig(**score))
        after.append({"prompt_id": row["prompt_id"], "video": video, "status": result.status, "score": result.score,
                      "reason": result.reason, "frame_change": frame_change(video)})

    metrics = trained["final_metrics"]
    summary = {
        "family": family,
        "i2v": i2v,
        "pairs": num_pairs,
        "pairs_ranked_by": ranked_by,
        "mined": {"videos": mined["videos_done"], "statuses": mined["statuses"], "records": mined["records"]},
        "steps": trained["steps"],
        "workers": workers,
        "final_loss": metrics.get("loss"),
        "implicit_accuracy": metrics.get("rewards/accuracies"),
        "lora": trained["lora"],
        "after_training": after,
        "folder": str(out),
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
