"""The Ray Train + DeepSpeed DPO trainer on the tiny CogVideoX (CPU, gloo), and its pure pieces."""

from __future__ import annotations

import json
import math

import pytest
import torch

from training.fixtures import tiny_cogvideox as tiny
from common.errors import ConfigError
from training.lora import LORA_WEIGHTS_NAME, add_lora, count_parameters
from training.pairs import Pair, PairsDatasetError, write_pairs_dataset
from common.cogvideox import latent_space
from common.families import read_model_configs
from training.trainer import (FAULT_MARKER, TrainConfig, deepspeed_config, heldout_split, lr_multiplier,
                              micro_batch_indices, resolve_gpus_per_worker, train)

LATENT = (tiny.LATENT_FRAMES, tiny.LATENT_CHANNELS, tiny.LATENT_HEIGHT, tiny.LATENT_WIDTH)


def synthetic_pairs(n: int = 16, i2v: bool = False, seed: int = 0) -> list[Pair]:
    """Winners ~ N(0.5, 0.3^2), losers ~ N(0, 1.5^2): two distributions a LoRA can tell apart."""
    g = torch.Generator().manual_seed(seed)
    return [
        Pair(
            prompt=f"prompt {i % 4}",
            winner_latents=0.5 + 0.3 * torch.randn(LATENT, generator=g),
            loser_latents=1.5 * torch.randn(LATENT, generator=g),
            prompt_embeds=torch.randn(tiny.TEXT_SEQ_LEN, tiny.TEXT_EMBED_DIM, generator=g),
            image_latents=torch.randn((1, *LATENT[1:]), generator=g) if i2v else None,
        )
        for i in range(n)
    ]


def write_pairs_for(model_dir, directory, pairs):
    """A pairs dataset that records the latent space of `model_dir`, as `vgpa cache` and the mining job do."""
    return write_pairs_dataset(directory, pairs, model=str(model_dir), latent_space=latent_space(*read_model_configs(model_dir)))


def small_config(**overrides) -> TrainConfig:
    base = dict(
        num_workers=2, batch_size=4, max_steps=20, warmup_steps=2, learning_rate=1e-3, beta=500.0,
        lora_rank=4, lora_alpha=8, checkpoint_every=10, max_failures=0,
    )
    return TrainConfig(**{**base, **overrides})


# ---------------------------------------------------------------------------------------------
# Pure pieces (no Ray).
# ---------------------------------------------------------------------------------------------


def test_real_5b_config_trains_about_one_percent_on_meta_device(shared_data):
    from diffusers import CogVideoXTransformer3DModel

    path = shared_data / "configs" / "cogvideox-5b" / "transformer.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    config = json.loads(path.read_text())
    with torch.device("meta"):  # 5.6 B parameters, no memory
        model = CogVideoXTransformer3DModel.from_config(config)
    add_lora(model, rank=64, alpha=128)
    trainable, total = count_parameters(model)
    inner = config["num_attention_heads"] * config["attention_head_dim"]  # 3072
    # 4 projections x 42 blocks x r (in + out)
    assert trainable == config["num_layers"] * 4 * 64 * (inner + inner)
    assert trainable / (total - trainable) == pytest.approx(0.0119, abs=0.0002)
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())


def test_lr_warmup_then_cosine():
    assert lr_multiplier(0, 4, 12) == 0.25
    assert lr_multiplier(3, 4, 12) == 1.0
    assert lr_multiplier(4, 4, 12) == 1.0
    assert lr_multiplier(8, 4, 12) == pytest.approx(0.5)
    assert lr_multiplier(12, 4, 12) == pytest.approx(0.0, abs=1e-12)
    assert lr_multiplier(12, 4, 12, min_lr_ratio=0.1) == pytest.approx(0.1)


def test_each_epoch_visits_every_pair_once_across_ranks_and_micro_batches():
    cfg = TrainConfig(num_workers=2, batch_size=8, micro_batch_size=2)  # 2 accumulation steps
    seen = []
    for step in range(3):  # 3 steps x 8 = 24 samples = 2 epochs of 12 pairs
        for micro in range(cfg.grad_accum_steps):
            for rank in range(2):
                seen += micro_batch_indices(12, step, micro, rank, cfg)
    assert sorted(seen[:12]) == list(range(12)) and sorted(seen[12:24]) == list(range(12))
    assert seen[:12] != seen[12:24]  # a new order every epoch


def test_heldout_split_is_seeded_disjoint_and_rounded():
    train_ids, held = heldout_split(100, 0.02, 42)
    assert len(held) == 2 and sorted(train_ids + held) == list(range(100))
    assert heldout_split(100, 0.02, 42) == (train_ids, held) != heldout_split(100, 0.02, 7)
    assert heldout_split(16, 0.02, 42) == (list(range(16)), [])  # 0.32 pairs: none held out
    with pytest.raises(ConfigError, match="leaves none to train on"):
        heldout_split(2, 0.9, 0)


def test_batch_arithmetic_is_validated():
    with pytest.raises(ValueError, match="multiple of micro_batch_size x num_workers"):
        TrainConfig(num_workers=3, batch_size=16)
    assert TrainConfig(num_workers=2, batch_size=16, micro_batch_size=2).grad_accum_steps == 4
    with pytest.raises(ValueError, match="needs validation_prompts"):
        TrainConfig(validation_every=10)
    with pytest.raises(ValueError, match="zero_stage 2"):
        TrainConfig(validation_every=10, validation_prompts=["a"], zero_stage=3)


def test_bad_inputs_fail_before_any_worker(tmp_path):
    model = tiny.save_tiny_cogvideox(tmp_path / "model")
    pairs = write_pairs_for(model, tmp_path / "pairs", synthetic_pairs(4))
    (pairs / "latents" / "000002.winner.safetensors").unlink()
    with pytest.raises(PairsDatasetError, match="missing"):
        train(small_config(), pairs, model, tmp_path / "out")
    i2v_pairs = write_pairs_for(model, tmp_path / "i2v", synthetic_pairs(4, i2v=True))
    with pytest.raises(ConfigError, match=r"image-to-video latents with 4 channels.*in_channels=4.*text-to-video model"):
        train(small_config(), i2v_pairs, model, tmp_path / "out")
    with pytest.raises(ConfigError, match="not a diffusers pipeline folder"):
        train(small_config(), i2v_pairs, tmp_path / "nomodel", tmp_path / "out")
    cfg_path = model / "scheduler" / "scheduler_config.json"
    cfg_path.write_text(cfg_path.read_text().replace('"v_prediction"', '"epsilon"'))
    with pytest.raises(ConfigError, match="needs v_prediction"):
        train(small_config(), write_pairs_for(model, tmp_path / "ok", synthetic_pairs(4)), model, tmp_path / "out")
    assert not (tmp_path / "out" / "ray").exists()


def test_pairs_from_another_latent_space_are_refused_before_any_worker(tmp_path):
    """Latents are checked against the model being trained: family, VAE scaling factor, channels."""
    model = tiny.save_tiny_cogvideox(tmp_path / "model")
    model15 = tiny.save_tiny_cogvideox(tmp_path / "model15", version="1.5")
    pairs15 = write_pairs_for(model15, tmp_path / "pairs15", synthetic_pairs(4))
    with pytest.raises(ConfigError, match=r"another model.*family cogvideox-1.5 \(pairs\) vs cogvideox-1.0 \(model\)"
                                          r".*scaling_factor 0.7 \(pairs\) vs 1.15"):
        train(small_config(), pairs15, model, tmp_path / "out")
    unrecorded = write_pairs_dataset(tmp_path / "old", synthetic_pairs(4))  # no latent_space in summary.json
    with pytest.raises(ConfigError, match="do not say which latent space"):
        train(small_config(), unrecorded, model, tmp_path / "out")


def test_gpus_are_used_whenever_the_cluster_has_them():
    assert resolve_gpus_per_worker(None, 8, 8) == (1.0, "training on 8 worker(s) x 1 GPU (NCCL)")
    gpus, where = resolve_gpus_per_worker(None, 0, 2)
    assert gpus == 0 and "no GPU in the Ray cluster: training runs on the CPU" in where
    with pytest.raises(ConfigError, match="has no GPU"):
        resolve_gpus_per_worker(1, 0, 2)
    assert "waits until enough are added" in resolve_gpus_per_worker(None, 4, 8)[1]


def test_bf16_accumulates_and_reduces_gradients_in_fp32():
    cfg = TrainConfig(num_workers=8, batch_size=16)
    gpu = deepspeed_config(cfg, use_cuda=True)
    assert gpu["bf16"]["enabled"] and gpu["gradient_accumulation_steps"] == 2
    assert gpu["data_types"] == {"grad_accum_dtype": "fp32"} and gpu["communication_data_type"] == "fp32"
    cpu = deepspeed_config(cfg, use_cuda=False)
    assert not cpu["bf16"]["enabled"] and "data_types" not in cpu


def test_defaults_are_the_papers_reference_setup():
    cfg = TrainConfig()
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets) == (64, 128, ["to_q", "to_k", "to_v", "to_out.0"])
    assert (cfg.learning_rate, cfg.warmup_steps, cfg.max_steps, cfg.batch_size) == (5e-6, 500, 10_000, 16)
    assert (cfg.weight_decay, cfg.adam_betas, cfg.adam_eps) == (0.01, (0.9, 0.999), 1e-8)  # torch AdamW defaults
    assert (cfg.max_grad_norm, cfg.beta, cfg.loss_type) == (1.0, 1.0, "sigmoid")


# ---------------------------------------------------------------------------------------------
# Ray Train + DeepSpeed ZeRO-2, two CPU workers.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    model = tiny.save_tiny_cogvideox(root / "model")
    pairs = write_pairs_for(model, root / "pairs", synthetic_pairs(16))
    return root, model, pairs


@pytest.fixture(scope="module")
def finished_run(ray_cluster, workspace):
    """One uninterrupted 20-step run on 2 workers: the reference for the resume tests."""
    root, model, pairs = workspace
    steps: list[dict] = []
    summary = train(small_config(run_name="straight"), pairs, model, root / "straight", on_step=steps.append)
    return summary, steps


@pytest.mark.ray
def test_two_zero2_workers_learn_the_preference_and_stay_identical(finished_run):
    summary, steps = finished_run
    assert summary["steps"] == 20 and [s["step"] for s in steps] == list(range(1, 21))
    # Every rank ends with the same LoRA (gathered max - min over ranks).
    assert summary["final_metrics"]["lora_rank_spread"] == 0.0
    # Fresh LoRA: policy == reference.
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert steps[0]["rewards/accuracies"] == 0.5
    late = steps[-5:]
    assert sum(s["rewards/accuracies"] for s in late) / 5 > 0.8
    assert sum(s["loss"] for s in late) / 5 < 0.5 * math.log(2)
    assert all(s["grad_norm"] > 0 and math.isfinite(s["grad_norm"]) for s in steps)
    assert steps[1]["lr"] == pytest.approx(1e-3) and steps[-1]["lr"] < 1e-4  # warm-up, then cosine


@pytest.mark.ray
def test_heldout_loss_keeps_the_best_lora_under_zero3_in_bf16_with_uneven_shards(ray_cluster, workspace):
    """Held-out evaluation every 4 steps keeps the LoRA with the lowest held-out loss; the metrics of each
    step are on disk before the driver hears of it. On 2 ZeRO-3 ranks (parameters partitioned too) in bf16
    with fp32 gradient accumulation: 3 held-out pairs, so rank 1 repeats a pair with weight 0 and both run
    the same forwards. One launch for all three: a Ray Train launch costs about 30 s on 2 cores."""
    from diffusers import CogVideoXPipeline

    root, model, pairs = workspace
    out = root / "heldout"
    in_file_when_reported = []

    def on_step(row: dict) -> None:  # the driver hears of a step only after rank 0 has written it
        lines = (out / "metrics.jsonl").read_text().splitlines()
        in_file_when_reported.append(any(json.loads(line)["step"] == row["step"] for line in lines))

    cfg = small_config(run_name="heldout", zero_stage=3, precision="bf16", heldout_fraction=0.2, eval_every=4,
                       max_steps=12, checkpoint_every=12)
    summary = train(cfg, pairs, model, out, on_step=on_step)
    assert in_file_when_reported == [True] * 12
    assert summary["precision"] == "bf16" and summary["steps"] == 12
    assert math.isfinite(summary["final_metrics"]["loss"]) and summary["final_metrics"]["lora_rank_spread"] == 0.0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in rows if "eval/loss" in r}
    assert sorted(evals) == [4, 8, 12] and summary["heldout_pairs"] == 3
    assert all(r["eval/pairs"] == 3 and 0 <= r["eval/rewards/accuracies"] <= 1 for r in evals.values())
    best_step = min(evals, key=lambda k: evals[k]["eval/loss"])
    assert summary["best"]["step"] == best_step
    assert summary["best"]["eval/loss"] == pytest.approx(evals[best_step]["eval/loss"])
    CogVideoXPipeline.from_pretrained(model).load_lora_weights(out / "best")


@pytest.mark.ray
def test_resuming_with_another_partitioning_is_refused_before_start(finished_run, workspace):
    root, model, pairs = workspace
    cfg = small_config(run_name="straight", num_workers=1)  # the run was checkpointed by 2 ZeRO ranks
    with pytest.raises(ConfigError, match="num_workers=2, now num_workers=1"):
        train(cfg, pairs, model, root / "straight")


@pytest.mark.ray
@pytest.mark.parametrize("change,message", [
    ({"lora_alpha": 16}, "lora_alpha=8.0, now lora_alpha=16.0"),
    ({"lora_rank": 8}, "lora_rank=4, now lora_rank=8"),
    ({"precision": "bf16"}, "trained in fp32, this launch would train in bf16"),
])
def test_resuming_with_another_lora_or_precision_is_refused(finished_run, workspace, change, message):
    root, model, pairs = workspace
    with pytest.raises(ConfigError, match=message):
        train(small_config(run_name="straight", **change), pairs, model, root / "straight")


@pytest.mark.ray
def test_resuming_on_pairs_from_another_latent_space_is_refused(finished_run, workspace, tmp_path):
    """A model folder with another VAE scaling factor and pairs encoded for it: consistent with each
    other, so only the resumed checkpoint can tell that the run was trained in another latent space."""
    import shutil

    root, model, _ = workspace
    other = tmp_path / "other-model"
    shutil.copytree(model, other)
    vae_config = other / "vae" / "config.json"
    vae_config.write_text(vae_config.read_text().replace('"scaling_factor": 1.15258426', '"scaling_factor": 0.5'))
    other_pairs = write_pairs_for(other, tmp_path / "other-pairs", synthetic_pairs(16))
    with pytest.raises(ConfigError, match=r"run 'straight'.*scaling_factor 0.5 \(pairs\) vs 1.15"):
        train(small_config(run_name="straight"), other_pairs, other, root / "straight")


@pytest.mark.ray
def test_checkpoint_holds_only_trainable_and_optimizer_state(finished_run):
    from pathlib import Path

    summary, _ = finished_run
    ckpt = Path(summary["checkpoint"])
    state = json.loads((ckpt / "train_state.json").read_text())
    assert state["step"] == 20 and state["final"] and state["config"]["lora_rank"] == 4
    module = torch.load(ckpt / "deepspeed" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert module and all("lora_" in k for k in module)
    # Each of the two ranks saved its own ZeRO optimizer partition.
    assert len(list((ckpt / "deepspeed").glob("zero_pp_rank_*_optim_states.pt"))) == 2


def assert_export_reproduces_the_trained_module(summary, model_dir):
    """The exported LoRA, loaded into a fresh pipeline, gives the transformer output of the weights that
    DeepSpeed trained (the LoRA module state in the run's last checkpoint), not just the same tensors."""
    from pathlib import Path

    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

    from training.dpo import rotary_embeddings

    ckpt = Path(summary["checkpoint"])
    saved = json.loads((ckpt / "train_state.json").read_text())["config"]
    trained = CogVideoXTransformer3DModel.from_pretrained(model_dir, subfolder="transformer")
    add_lora(trained, rank=saved["lora_rank"], alpha=saved["lora_alpha"], targets=saved["lora_targets"])
    module = torch.load(ckpt / "deepspeed" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    missing_lora = [k for k in trained.load_state_dict(module, strict=False).missing_keys if "lora_" in k]
    assert module and not missing_lora

    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, *LATENT, generator=g),
        encoder_hidden_states=torch.randn(1, tiny.TEXT_SEQ_LEN, tiny.TEXT_EMBED_DIM, generator=g),
        timestep=torch.tensor([300]), return_dict=False,
        image_rotary_emb=rotary_embeddings(trained.config, *LATENT[:1], *LATENT[2:]),
    )
    pipe = CogVideoXPipeline.from_pretrained(model_dir)
    with torch.no_grad():
        base = pipe.transformer(**inputs)[0]
        expected = trained(**inputs)[0]
        pipe.load_lora_weights(Path(summary["lora"]).parent)
        loaded = pipe.transformer(**inputs)[0]
    assert (expected - base).abs().max() > 1e-4  # training moved the policy
    torch.testing.assert_close(loaded, expected, rtol=0, atol=1e-5)


@pytest.mark.ray
def test_exported_lora_reproduces_the_trained_transformer(finished_run, workspace):
    summary, _ = finished_run
    assert summary["lora"].endswith(LORA_WEIGHTS_NAME)
    assert_export_reproduces_the_trained_module(summary, workspace[1])


@pytest.mark.ray
def test_killed_worker_is_retried_from_its_checkpoint_with_the_same_result(finished_run, workspace):
    from safetensors.torch import load_file

    root, model, pairs = workspace
    cfg = small_config(run_name="killed", fail_at_step=15, max_failures=1)  # checkpoint at 10, crash at 15
    summary = train(cfg, pairs, model, root / "killed")
    assert (root / "killed" / "ray" / "killed" / FAULT_MARKER).is_file()  # the crash happened
    steps = [json.loads(line)["step"] for line in (root / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(11) == 2 and steps.count(16) == 1  # steps 11-14 ran twice: resumed at 10, not at 0
    straight = load_file(finished_run[0]["lora"])
    resumed = load_file(summary["lora"])
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0)
    assert_export_reproduces_the_trained_module(summary, model)  # exported after resuming from disk


@pytest.mark.ray
def test_killed_zero3_run_relaunched_with_the_same_name_continues_from_its_checkpoint(finished_run, workspace):
    """ZeRO-3 (parameters partitioned too), killed without retries, then the same command again."""
    from safetensors.torch import load_file

    from training.trainer import TrainingRunError

    root, model, pairs = workspace
    cfg = small_config(run_name="relaunch", zero_stage=3, fail_at_step=15, max_failures=0)
    with pytest.raises(TrainingRunError, match="run the same command again"):
        train(cfg, pairs, model, root / "relaunch")
    summary = train(cfg, pairs, model, root / "relaunch")  # the same command, launched again
    assert summary["first_step_this_launch"] == 11 and summary["steps_this_launch"] == 10
    # Rank spread is measured on gathered weights (ZeRO-3 ranks hold only partitions).
    assert summary["final_metrics"]["lora_rank_spread"] == 0.0
    # Same math as the uninterrupted ZeRO-2 run; only the reduction order differs.
    zero2, zero3 = load_file(finished_run[0]["lora"]), load_file(summary["lora"])
    assert zero2.keys() == zero3.keys()
    for key in zero2:
        assert (zero3[key] - zero2[key]).norm() <= 1e-3 * zero2[key].norm() + 1e-6, key
