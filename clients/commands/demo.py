"""`vgpa demo`: render the demo scene, score it clean and corrupted, print both results.

`vgpa demo --tiny [--family cogvideox|wan] [--i2v|--t2v]`: the whole loop on one machine (tiny random
CogVideoX image-to-video, or Wan text-to-video, unless --i2v / --t2v says otherwise -> prompts -> mining
-> pairs -> LoRA-DPO with two workers -> LoRA loaded back -> sample -> score), one JSON summary.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click

from clients.commands.score import StageProgress, format_result


@click.command(help="Render a synthetic scene, score a clean and a corrupted video of it, print both "
                    "(--tiny: instead run the whole mine -> train -> sample -> score loop on a tiny model).")
@click.option("--out", type=click.Path(path_type=Path), help="Keep the videos and previews in this folder.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with both results.")
@click.option("--tiny", is_flag=True,
              help="Instead: run the whole loop (mine -> train -> sample -> score) with a tiny random model; print a JSON summary.")
@click.option("--family", type=click.Choice(["cogvideox", "wan"]), default="cogvideox", show_default=True,
              help="--tiny: the model family (cogvideox: CogVideoX, image-to-video by default; wan: Wan 2.1, "
                   "text-to-video by default).")
@click.option("--i2v/--t2v", "i2v", default=None,
              help="--tiny: image-to-video (first frames from the synthetic renderer) or text-to-video "
                   "(default: the family's, see --family).")
@click.option("--address", default=None, help="--tiny: Ray cluster address (default: RAY_ADDRESS or an embedded local Ray).")
def demo(out, as_json, tiny, family, i2v, address):
    if tiny:
        from training.demo import run_tiny_demo

        folder = out or Path(tempfile.mkdtemp(prefix="vgpa-demo-tiny-"))
        summary = run_tiny_demo(folder, family=family, i2v=i2v, address=address, log=lambda line: click.echo(line, err=True))
        click.echo(json.dumps(summary))
        return
    from common.scoring import score_video
    from common.synthetic import render_demo_video

    folder = out or Path(tempfile.mkdtemp(prefix="vgpa-demo-"))
    folder.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, corrupted in (("clean", False), ("corrupted", True)):
        video = render_demo_video(folder / f"demo_{name}.mp4", corrupted=corrupted)
        progress = StageProgress(video.name)
        results[name] = score_video(video, preview_dir=folder / f"previews_{name}", progress=progress).to_json_dict()
        progress("done")
    clean, corrupted = results["clean"]["score"], results["corrupted"]["score"]
    better = clean is not None and corrupted is not None and clean < corrupted
    if as_json:
        click.echo(json.dumps({"folder": str(folder), "clean_is_better": better, **results}))
        return
    for name, result in results.items():
        click.echo(format_result(f"demo_{name}.mp4", result) + "\n")
    click.echo(f"clean scores lower (more 3D-consistent) than corrupted: {'yes' if better else 'NO'}")
    click.echo(f"videos and previews: {folder}")


COMMANDS = [demo]
