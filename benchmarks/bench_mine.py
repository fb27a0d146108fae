"""Is the scorer ever the bottleneck of the mining pipeline? Pipeline wall time vs sampling alone.

    python benchmarks/bench_mine.py [--prompts 3] [--seeds 2] [--steps 2 20] [--size 32]

For each sampler setting (denoising steps; more steps = a slower sampler):
  - sampling alone: the sampler engine (`common.sampling.Sampler`) in this process, every
    (prompt, seed) in a row, after one warm-up video (model loading excluded);
  - scoring alone: the scorer engine (`common.scorer.Scorer`) on those videos, in a row;
  - the pipeline: `training.mining.mine(..., local=True)` (Ray Data, one sampler actor + one scorer
    actor) on the same rows, wall time from the first row to the last record, actor start-up
    (model loading) included, and again with start-up subtracted (the first record's latency minus
    its own sampling and scoring time).
Printed side by side: wall / sampling-alone is the number to watch (target <= 1.1 once sampling
is slower than scoring); scorer share = scoring / (sampling + scoring).
On 2 CPU cores the two actors share the cores, so the overlap is limited by the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SCORE = {"frames": 4, "recon_frames": 8, "max_side": 64}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 20])
    parser.add_argument("--size", type=int, default=32, help="pixel height = width (multiple of 8)")
    parser.add_argument("--frames", type=int, default=9)
    args = parser.parse_args()

    import ray
    import torch
    from PIL import Image

    from services.local_ray import start_local_ray

    from common.synthetic import render_video
    from training.fixtures.tiny_cogvideox import save_tiny_cogvideox
    from common.config import ScoreConfig
    from common.sampling import SampleRequest, Sampler, SamplingConfig
    from common.scorer import Scorer, ScorerConfig
    from training.mining import MineConfig, mine
    from training.mining.job import plan_rows
    from training.mining.records import load_records
    from training.prompts import image_prompts, write_prompt_file

    root = Path(tempfile.mkdtemp(prefix="bench-mine-"))
    model = save_tiny_cogvideox(root / "model", i2v=True)
    (root / "frames").mkdir()
    for i in range(args.prompts):
        Image.fromarray(render_video("boxes", "orbit", frames=2, size=(64, 64), seed=i).frames[0].numpy()).save(root / "frames" / f"f{i}.png")
    prompt_file = write_prompt_file(root / "prompts.jsonl", image_prompts(root / "frames"))
    prompts = [json.loads(line) for line in prompt_file.read_text().splitlines()]
    start_local_ray(4, log_to_driver=False)
    print(f"torch threads {torch.get_num_threads()}, {os.cpu_count()} cores; {args.prompts} prompts x {args.seeds} seeds, "
          f"{args.frames} frames {args.size}x{args.size}, tiny I2V CogVideoX on CPU, scorer {SCORE}")
    header = f"{'steps':>5} {'videos':>6} {'sample alone s':>14} {'score alone s':>13} {'scorer share':>12} " \
             f"{'pipeline wall s':>15} {'wall/sample':>11} {'wall-startup s':>14} {'(wall-startup)/sample':>21}"
    rows = []
    scorer = Scorer(ScorerConfig(score=ScoreConfig(**SCORE)))
    for steps in args.steps:
        settings = MineConfig(seeds=args.seeds, steps=steps, frames=args.frames, height=args.size, width=args.size, score=SCORE,
                                flush_every=1, sampler={"max_steps": max(steps, 100)})
        todo = plan_rows(prompts, settings, set())
        sampler = Sampler(SamplingConfig(model_dir=model, default_steps=steps, max_steps=max(steps, 100)), root / f"alone-{steps}")
        req = lambda r: SampleRequest(prompt=r["prompt"], seeds=[r["seed"]], steps=steps, frames=args.frames,
                                      height=args.size, width=args.size)
        sampler.sample(req(todo[0]), todo[0]["image"])  # warm-up
        t0 = time.perf_counter()
        answers = [sampler.sample(req(r), r["image"]) for r in todo]
        if any(a.error is not None for a in answers):
            raise SystemExit(f"sampling failed: {next(a.error for a in answers if a.error is not None)}")
        videos = [a.result.samples[0].video for a in answers]
        sample_alone = time.perf_counter() - t0
        scorer.score(videos[0])  # warm-up
        t0 = time.perf_counter()
        for v in videos:
            scorer.score(v)
        score_alone = time.perf_counter() - t0

        out = root / f"mined-{steps}"
        first: dict = {}

        def on_progress(p: dict) -> None:
            if p["videos_this_run"] >= 1 and "t" not in first:
                first["t"] = time.perf_counter()

        t0 = time.perf_counter()
        mine(prompt_file, model, out, settings, local=True, on_progress=on_progress)
        wall = time.perf_counter() - t0
        recs = load_records(out)
        first_rec = min(recs, key=lambda r: r["sample_s"] + r["score_s"])
        startup = (first["t"] - t0) - (first_rec["sample_s"] + first_rec["score_s"])
        rows.append((steps, len(todo), sample_alone, score_alone, score_alone / (sample_alone + score_alone), wall,
                     wall / sample_alone, wall - startup, (wall - startup) / sample_alone))
        shutil.rmtree(out, ignore_errors=True)
    print(header)
    for r in rows:
        print(f"{r[0]:>5} {r[1]:>6} {r[2]:>14.2f} {r[3]:>13.2f} {r[4]:>12.0%} {r[5]:>15.2f} {r[6]:>11.2f} {r[7]:>14.2f} {r[8]:>21.2f}")
    shutil.rmtree(root, ignore_errors=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
