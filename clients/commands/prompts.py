"""`vgpa prompts`: build a mining prompt file from a folder of first frames and/or a caption file.

    vgpa prompts --frames FIRST_FRAMES_DIR --out prompts.jsonl [--per-image K] [--seed S] [--vocabulary FILE]
    vgpa prompts --captions captions.jsonl|captions.csv --out prompts.jsonl
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command(help="Build a prompt file (JSON Lines) for `vgpa mine` from first frames and/or captions.")
@click.option("--frames", "frames_dir", type=click.Path(path_type=Path), default=None,
              help="Folder of first-frame images: one seeded camera-motion prompt per image (image-to-video).")
@click.option("--captions", type=click.Path(path_type=Path), default=None,
              help="Captions for text-to-video: JSON Lines {id, caption} or CSV with columns id, caption.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Prompt file to write (.jsonl).")
@click.option("--per-image", type=int, default=1, show_default=True, help="Prompts per first frame.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the choice of camera-motion primitives.")
@click.option("--vocabulary", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Camera-motion vocabulary JSON (default: the built-in training/data/camera_motion.json).")
def prompts(frames_dir, captions, out, per_image, seed, vocabulary):
    from training.prompts import image_prompts, load_vocabulary, read_captions, write_prompt_file

    if frames_dir is None and captions is None:
        raise click.UsageError("give --frames and/or --captions")
    if frames_dir is not None and captions is not None:
        raise click.UsageError("one prompt file is for one kind of model: give --frames (image-to-video) or --captions (text-to-video)")
    if per_image < 1:
        raise click.UsageError("--per-image must be at least 1")
    rows = []
    if frames_dir is not None:
        rows += image_prompts(frames_dir, seed=seed, prompts_per_image=per_image, vocabulary=load_vocabulary(vocabulary))
    if captions is not None:
        rows += read_captions(captions)
    write_prompt_file(out, rows)
    kind = "image-to-video" if frames_dir is not None else "text-to-video"
    click.echo(f"wrote {len(rows)} {kind} prompts to {out}")
    click.echo(f"  e.g. {rows[0]['prompt_id']}: {rows[0]['prompt']}")


# Registered by clients.commands.mine (the verb module clients/cli.py already loads).
COMMANDS = [prompts]
