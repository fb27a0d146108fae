"""`vgpa mine`: mine preference pairs (prompts -> seeds -> sampler -> scorer -> pairs) on Ray Data.

    vgpa mine --prompts prompts.jsonl --model MODEL_DIR --out OUT_DIR [--seeds N] [--address ADDR] [--local]

By default the job streams through the running Serve app's Sampler and Scorer deployments
(`vgpa serve` with a sampler: section); `--local` runs the same engines in Ray Data actor pools.
Re-running the same command resumes: videos already recorded are skipped. This is the job's one
command line: `ray job submit ... -- vgpa mine ...` and cluster/mine-rayjob.yaml call it too (with
the `vgpa` of the environment that has the project installed; see docs/mining.md).
Also registers `vgpa prompts` (clients/commands/prompts.py).
"""

from __future__ import annotations

from pathlib import Path

import click

from clients.commands.prompts import prompts


@click.command(help="Mine geometry preference pairs for `vgpa train` (Ray Data; through the Serve app or --local).")
@click.option("--prompts", "prompts_file", required=True, type=click.Path(path_type=Path), help="Prompt file (vgpa prompts).")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="Diffusers pipeline folder: CogVideoX (CogVideoXPipeline, CogVideoXImageToVideoPipeline) or Wan (WanPipeline, WanImageToVideoPipeline).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Receives records/, pairs/, mine_summary.json.")
@click.option("--seeds", type=int, default=None, help="Videos per prompt (default 4).")
@click.option("--address", default=None, help="Ray cluster address; default: RAY_ADDRESS or an embedded local Ray.")
@click.option("--local", is_flag=True, help="Run sampler and scorer as Ray Data actors instead of calling the Serve app.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="YAML/JSON file of training.mining.MineConfig fields.")
@click.option("--steps", type=int, default=None, help="Denoising steps per video (default: the sampler's).")
@click.option("--app-name", default=None, help="Serve application name (default 'default').")
@click.option("--pair-mode", type=click.Choice(["best-vs-worst", "all-pairs"]), default=None, help="Default best-vs-worst.")
@click.option("--min-gap", type=float, default=None, help="Smallest score gap of a pair (default 0.05).")
@click.option("--max-score", type=float, default=None, help="Quality threshold: drop videos with a larger error.")
@click.option("--min-motion", type=float, default=None, help="Drop videos with less camera motion (default 0.001).")
@click.option("--retry-failed", is_flag=True, help="Redo videos recorded as failed in an earlier run.")
def mine(prompts_file, model_dir, out_dir, seeds, address, local, config_file, steps, app_name, pair_mode, min_gap,
         max_score, min_motion, retry_failed):
    from tqdm import tqdm

    from training.mining import config_from_file
    from training.mining import mine as run_mine

    settings = config_from_file(config_file, {
        "seeds": seeds, "steps": steps, "app_name": app_name, "retry_failed": retry_failed or None,
        "pairs": {"mode": pair_mode, "min_gap": min_gap, "max_score": max_score, "min_motion": min_motion}})
    bar = tqdm(unit="prompt", dynamic_ncols=True, desc="mining")

    def on_progress(p: dict) -> None:
        bar.total = p["prompts_total"]
        bar.n = p["prompts_done"]
        bar.set_postfix(videos=f"{p['videos_done']}/{p['videos_total']}", per_min=f"{p['videos_per_min']:.1f}",
                        failed=p["failed"], pairs=p["pairs_so_far"])
        bar.refresh()

    try:
        summary = run_mine(prompts_file, model_dir, out_dir, settings, local=local, address=address, on_progress=on_progress)
    finally:
        bar.close()
    report = summary["report"]
    click.echo(f"videos         {summary['videos_done']} ({summary['videos_this_run']} this run, "
               f"{summary['videos_per_min']:.1f}/min), statuses {summary['statuses']}")
    click.echo(f"dropped videos {report['videos_dropped'] or 'none'}; dropped pairs {report['pairs_dropped'] or 'none'}")
    click.echo(f"pairs          {summary['pairs']} ({settings.pairs.mode}) -> {summary['pairs_dir'] or 'nothing written'}")
    click.echo(f"records        {summary['records']}")


COMMANDS = [mine, prompts]
