"""The pairs dataset round-trips through its writer and reader, and bad directories fail clearly."""

from __future__ import annotations

import json
import os

import pytest
import torch

from training.pairs import (
    Pair,
    PairsDataset,
    PairsDatasetError,
    collate_pairs,
    load_pairs_index,
    write_pairs_dataset,
)

SHAPE = (3, 4, 4, 4)


def _pairs(n=3, i2v=False, prompts=("a", "b")):
    g = torch.Generator().manual_seed(0)
    return [
        Pair(
            prompt=prompts[i % len(prompts)],
            winner_latents=torch.randn(SHAPE, generator=g),
            loser_latents=torch.randn(SHAPE, generator=g),
            prompt_embeds=torch.full((16, 32), float(i % len(prompts))),
            image_latents=torch.randn((1, *SHAPE[1:]), generator=g) if i2v else None,
            winner_score=0.1,
            loser_score=0.5,
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("i2v", [False, True])
def test_roundtrip(tmp_path, i2v):
    pairs = _pairs(i2v=i2v)
    write_pairs_dataset(tmp_path, pairs, model="tiny", metric_id="m")
    index = load_pairs_index(tmp_path)
    assert len(index) == 3 and index.i2v == i2v and index.latent_shape == SHAPE
    assert len(list((tmp_path / "text").iterdir())) == 2  # one file per distinct prompt
    batch = collate_pairs([PairsDataset(index)[i] for i in range(3)])
    torch.testing.assert_close(batch["winner_latents"][1], pairs[1].winner_latents)
    torch.testing.assert_close(batch["prompt_embeds"][2], pairs[2].prompt_embeds)
    assert batch["winner_latents"].shape == (3, *SHAPE)
    assert ("image_latents" in batch) == i2v


def test_missing_file(tmp_path):
    write_pairs_dataset(tmp_path, _pairs())
    os.remove(tmp_path / "latents" / "000001.loser.safetensors")
    with pytest.raises(PairsDatasetError, match=r"pair 000001: loser_latents file .* is missing"):
        load_pairs_index(tmp_path)


def test_mismatched_shape(tmp_path):
    from safetensors.torch import save_file

    write_pairs_dataset(tmp_path, _pairs())
    save_file({"latents": torch.zeros(3, 4, 8, 8)}, str(tmp_path / "latents" / "000002.winner.safetensors"))
    with pytest.raises(PairsDatasetError, match=r"shape \[3, 4, 8, 8\], summary.json says \[3, 4, 4, 4\]"):
        load_pairs_index(tmp_path)


def test_empty_set(tmp_path):
    import pyarrow.parquet as pq

    write_pairs_dataset(tmp_path, _pairs())
    table = pq.read_table(tmp_path / "pairs.parquet")
    pq.write_table(table.slice(0, 0), tmp_path / "pairs.parquet")
    with pytest.raises(PairsDatasetError, match="empty"):
        load_pairs_index(tmp_path)
    with pytest.raises(PairsDatasetError, match="empty"):
        write_pairs_dataset(tmp_path / "new", [])


def test_not_a_dataset(tmp_path):
    with pytest.raises(PairsDatasetError, match="does not exist"):
        load_pairs_index(tmp_path / "nope")
    with pytest.raises(PairsDatasetError, match="summary.json is missing"):
        load_pairs_index(tmp_path)
    write_pairs_dataset(tmp_path, _pairs())
    summary = json.loads((tmp_path / "summary.json").read_text())
    (tmp_path / "summary.json").write_text(json.dumps({**summary, "version": 99}))
    with pytest.raises(PairsDatasetError, match="version"):
        load_pairs_index(tmp_path)


def test_writer_rejects_inconsistent_pairs(tmp_path):
    pairs = _pairs()
    pairs[1].loser_latents = torch.zeros(3, 4, 4, 2)
    with pytest.raises(PairsDatasetError, match="pair 000001"):
        write_pairs_dataset(tmp_path, pairs)
    pairs = _pairs(i2v=True)
    pairs[0].image_latents = None
    with pytest.raises(PairsDatasetError, match="image latents"):
        write_pairs_dataset(tmp_path, pairs)


def test_family_is_recorded_and_datasets_from_before_wan_read_as_cogvideox(tmp_path):
    wan = load_pairs_index(write_pairs_dataset(tmp_path / "wan", _pairs(), latent_space={"family": "wan", "i2v": False}))
    assert (wan.family, wan.summary["latent_layout"], wan.summary["latents_normalised"]) == ("wan", "CFhw", True)
    cog = load_pairs_index(write_pairs_dataset(tmp_path / "cog", _pairs(), latent_space={"family": "cogvideox-1.5"}))
    assert (cog.family, cog.summary["latent_layout"]) == ("cogvideox", "FChw")
    # An older dataset: no family, no layout, the CogVideoX-only "scaling_factor_applied".
    summary_path = tmp_path / "cog" / "summary.json"
    summary = json.loads(summary_path.read_text())
    for key in ("family", "latent_layout", "latents_normalised", "latent_space"):
        summary.pop(key)
    summary_path.write_text(json.dumps({**summary, "scaling_factor_applied": True}))
    old = load_pairs_index(tmp_path / "cog")
    assert (old.family, old.summary["latent_layout"], old.summary["latents_normalised"]) == ("cogvideox", "FChw", True)
    with pytest.raises(PairsDatasetError, match="unknown model family 'hunyuan'"):
        write_pairs_dataset(tmp_path / "bad", _pairs(), family="hunyuan")
