"""The Diffusion-DPO loss against direct computations, and one batched step on the tiny CogVideoX."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.fixtures import tiny_cogvideox as tiny
from training.dpo import dpo_loss, dpo_step, per_sample_mse, rotary_embeddings
from training.lora import add_lora, lora_parameters

ERRS = dict(
    policy_err_w=torch.tensor([0.30, 0.50, 0.20]),
    policy_err_l=torch.tensor([0.40, 0.45, 0.25]),
    ref_err_w=torch.tensor([0.35, 0.40, 0.20]),
    ref_err_l=torch.tensor([0.30, 0.50, 0.30]),
)


def _reference_margin():
    # Written out pair by pair from the formula, in Python floats.
    e = {k: v.tolist() for k, v in ERRS.items()}
    return [
        (e["ref_err_w"][i] - e["policy_err_w"][i]) - (e["ref_err_l"][i] - e["policy_err_l"][i]) for i in range(3)
    ]


class TestDpoLoss:
    def test_sigmoid_matches_direct_computation(self):
        beta = 7.0
        out = dpo_loss(**ERRS, beta=beta)
        margins = _reference_margin()
        expected = sum(-math.log(1 / (1 + math.exp(-beta * m))) for m in margins) / 3
        assert out.loss.dtype == torch.float32
        assert out.loss.item() == pytest.approx(expected, rel=1e-6)
        # margins: +0.15, -0.15, -0.05 -> one of three correct
        assert out.metrics["rewards/accuracies"] == pytest.approx(1 / 3)
        assert out.metrics["rewards/margins"] == pytest.approx(beta * sum(margins) / 3, rel=1e-5)
        assert out.metrics["rewards/chosen"] - out.metrics["rewards/rejected"] == pytest.approx(
            out.metrics["rewards/margins"], rel=1e-5
        )

    def test_hinge_and_ipo_match_direct_computation(self):
        beta = 4.0
        margins = _reference_margin()
        hinge = dpo_loss(**ERRS, beta=beta, loss_type="hinge").loss.item()
        assert hinge == pytest.approx(sum(max(0.0, 1 - beta * m) for m in margins) / 3, rel=1e-6)
        ipo = dpo_loss(**ERRS, beta=beta, loss_type="ipo").loss.item()
        assert ipo == pytest.approx(sum((m - 1 / (2 * beta)) ** 2 for m in margins) / 3, rel=1e-5)

    def test_sft_term_adds_winner_error(self):
        base = dpo_loss(**ERRS, beta=2.0).loss.item()
        with_sft = dpo_loss(**ERRS, beta=2.0, sft_weight=0.5).loss.item()
        assert with_sft - base == pytest.approx(0.5 * ERRS["policy_err_w"].mean().item(), rel=1e-5)

    def test_half_precision_inputs_are_computed_in_fp32(self):
        out = dpo_loss(**{k: v.bfloat16() for k, v in ERRS.items()}, beta=1.0)
        assert out.loss.dtype == torch.float32

    def test_policy_equal_reference_gives_log2_and_half_accuracy(self):
        e = torch.rand(5)
        out = dpo_loss(e, e + 0.1, e, e + 0.1, beta=100.0)
        assert out.loss.item() == pytest.approx(math.log(2), abs=1e-7)
        assert out.metrics["rewards/accuracies"] == 0.5

    def test_unknown_loss_type_is_rejected(self):
        with pytest.raises(ValueError, match="loss_type"):
            dpo_loss(**ERRS, beta=1.0, loss_type="kto")

    def test_per_sample_mse(self):
        a, b = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
        b[1] *= 2
        torch.testing.assert_close(per_sample_mse(a, b), torch.tensor([1.0, 4.0]))


def _batch(bsz=2, i2v=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (bsz, tiny.LATENT_FRAMES, tiny.LATENT_CHANNELS, tiny.LATENT_HEIGHT, tiny.LATENT_WIDTH)
    batch = {
        "winner_latents": torch.randn(shape, generator=g),
        "loser_latents": torch.randn(shape, generator=g),
        "prompt_embeds": torch.randn(bsz, tiny.TEXT_SEQ_LEN, tiny.TEXT_EMBED_DIM, generator=g),
    }
    if i2v:
        batch["image_latents"] = torch.randn((bsz, 1, *shape[2:]), generator=g)
    return batch


@pytest.fixture(params=[(False, "1.0"), (True, "1.0"), (False, "1.5"), (True, "1.5")],
                ids=["t2v", "i2v", "t2v-1.5", "i2v-1.5"])
def policy(request):
    i2v, version = request.param
    model = add_lora(tiny.tiny_transformer(i2v=i2v, version=version), rank=4, alpha=8)
    return model, i2v


class TestDpoStep:
    def test_fresh_lora_gives_log2(self, policy):
        model, i2v = policy
        out = dpo_step(model, tiny.tiny_scheduler(), _batch(i2v=i2v), beta=1000.0, generator=torch.Generator().manual_seed(0))
        assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
        assert out.metrics["rewards/accuracies"] == 0.5
        assert out.metrics["err/policy_chosen"] == out.metrics["err/ref_chosen"]

    def test_identical_winner_and_loser_give_zero_gradient(self, policy):
        model, i2v = policy
        # Move the LoRA off zero so policy != reference and the gradient would otherwise be non-zero.
        with torch.no_grad():
            for p in lora_parameters(model):
                p.add_(0.1 * torch.randn_like(p))
        batch = _batch(i2v=i2v)
        batch["loser_latents"] = batch["winner_latents"].clone()

        # At the model output the gradient is exactly zero pair by pair: the winner's and the
        # loser's halves of dL/dpred are exact negatives (same noise, same t, same prediction).
        preds = []
        model.register_forward_hook(lambda m, i, o: preds.append(o[0]) if torch.is_grad_enabled() else None)
        out = dpo_step(model, tiny.tiny_scheduler(), batch, beta=50.0, generator=torch.Generator().manual_seed(1))
        assert out.metrics["rewards/margins"] == 0.0
        assert out.loss.item() == pytest.approx(math.log(2), abs=1e-7)
        (grad_pred,) = torch.autograd.grad(out.loss, preds[0], retain_graph=True)
        grad_w, grad_l = grad_pred.chunk(2)
        assert torch.count_nonzero(grad_w + grad_l) == 0

        # In the parameters the two halves are summed inside the batched GEMMs, whose reduction
        # order is not pairwise, so what is left is float32 rounding: compare with a real pair.
        out.loss.backward()
        zero_pair = max(p.grad.abs().max().item() for p in lora_parameters(model))
        model.zero_grad()
        out = dpo_step(model, tiny.tiny_scheduler(), _batch(i2v=i2v, seed=5), beta=50.0, generator=torch.Generator().manual_seed(1))
        out.loss.backward()
        real_pair = max(p.grad.abs().max().item() for p in lora_parameters(model))
        assert real_pair > 1e-3
        assert zero_pair <= 1e-5 * real_pair

    def test_only_lora_parameters_receive_gradients(self, policy):
        model, i2v = policy
        with torch.no_grad():
            for p in lora_parameters(model):
                p.add_(0.1 * torch.randn_like(p))
        dpo_step(model, tiny.tiny_scheduler(), _batch(i2v=i2v), beta=10.0).loss.backward()
        for name, p in model.named_parameters():
            assert (p.grad is not None) == ("lora_" in name), name

    def test_reference_is_bit_identical_to_the_base_model_and_lora_comes_back(self):
        import copy

        from training.dpo import adapters_disabled

        base = tiny.tiny_transformer(seed=4)
        model = add_lora(copy.deepcopy(base), rank=4, alpha=8)
        with torch.no_grad():
            for p in lora_parameters(model):
                p.add_(0.1 * torch.randn_like(p))
        b = _batch(bsz=1)
        args = dict(hidden_states=b["winner_latents"], encoder_hidden_states=b["prompt_embeds"],
                    timestep=torch.tensor([500]), return_dict=False)
        with torch.no_grad():
            policy = model(**args)[0]
            with adapters_disabled(model):
                reference = model(**args)[0]
            again = model(**args)[0]
            expected = base(**args)[0]
        assert torch.equal(reference, expected)
        assert torch.equal(again, policy) and not torch.equal(policy, expected)
        # The LoRA weights are trainable again afterwards.
        assert len(lora_parameters(model)) == sum("lora_" in n for n, _ in model.named_parameters()) > 0

    def test_rotary_embeddings_are_used(self):
        model = tiny.tiny_transformer()
        cos, sin = rotary_embeddings(model.config, tiny.LATENT_FRAMES, tiny.LATENT_HEIGHT, tiny.LATENT_WIDTH)
        tokens = tiny.LATENT_FRAMES * (tiny.LATENT_HEIGHT // 2) * (tiny.LATENT_WIDTH // 2)
        assert cos.shape == sin.shape == (tokens, model.config.attention_head_dim)
        b = _batch(bsz=1)
        args = dict(hidden_states=b["winner_latents"], encoder_hidden_states=b["prompt_embeds"], timestep=torch.tensor([500]), return_dict=False)
        with torch.no_grad():
            with_rope = model(**args, image_rotary_emb=(cos, sin))[0]
            without = model(**args)[0]
        assert not torch.allclose(with_rope, without)
        assert rotary_embeddings(tiny.tiny_transformer(rotary=False).config, 3, 4, 4) is None

    def test_bad_channels_are_rejected(self):
        model = add_lora(tiny.tiny_transformer(i2v=True), rank=4, alpha=8)
        with pytest.raises(ValueError, match="channels"):
            dpo_step(model, tiny.tiny_scheduler(), _batch(i2v=False), beta=1.0)


class TestDpoStepFeedsTheTransformerWhatThePipelineDoes:
    """Catches the reference code's mistakes: no rotary embeddings, an epsilon target."""

    @pytest.mark.parametrize("version,model_frames", [("1.0", 3), ("1.5", 4)])
    def test_forward_receives_the_pipelines_rotary_embeddings(self, version, model_frames):
        """CogVideoX 1.5 runs on 4 latent frames for a 3-frame video (patch_size_t = 2), as its pipeline does."""
        from diffusers import CogVideoXPipeline

        pipe = CogVideoXPipeline(**tiny.tiny_components(version=version))
        model = add_lora(pipe.transformer, rank=4, alpha=8)
        calls = []
        model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)
        dpo_step(model, tiny.tiny_scheduler(), _batch(), beta=1.0, generator=torch.Generator().manual_seed(0))
        assert len(calls) == 2  # policy, then reference (adapters off)
        expected = pipe._prepare_rotary_positional_embeddings(tiny.HEIGHT, tiny.WIDTH, model_frames, "cpu")
        for kwargs in calls:
            assert kwargs["hidden_states"].shape[1] == model_frames
            cos, sin = kwargs["image_rotary_emb"]
            torch.testing.assert_close(cos, expected[0], rtol=0, atol=0)
            torch.testing.assert_close(sin, expected[1], rtol=0, atol=0)

    def test_cogvideox15_i2v_gets_ofs_and_learns_only_on_the_videos_frames(self):
        """1.5 I2V: `ofs` = 2 as in its pipeline; the padded front frame is not part of the error."""
        scheduler = tiny.tiny_scheduler()
        model = add_lora(tiny.tiny_transformer(i2v=True, version="1.5"), rank=4, alpha=8)
        batch = _batch(i2v=True)
        t = torch.tensor([250, 750])
        e = torch.randn((2, 4, *batch["winner_latents"].shape[2:]), generator=torch.Generator().manual_seed(2))
        x0 = torch.cat([torch.cat([b[:, :1], b], dim=1) for b in (batch["winner_latents"], batch["loser_latents"])])
        velocity = scheduler.get_velocity(x0, torch.cat([e, e]), torch.cat([t, t]))
        seen = {}

        def forward(**kwargs):
            seen.update(kwargs)
            wrong_padding = velocity.clone()
            wrong_padding[:, 0] += 5.0  # the padded frame is dropped at inference: it must not count
            return (wrong_padding,)

        out = dpo_step(model, scheduler, batch, beta=1.0, timesteps=t, noise=e, forward=forward)
        assert out.metrics["err/policy_chosen"] == 0.0 and out.metrics["err/ref_rejected"] == 0.0
        torch.testing.assert_close(seen["ofs"], torch.tensor([2.0]))
        assert seen["hidden_states"].shape == (4, 4, 2 * tiny.LATENT_CHANNELS, tiny.LATENT_HEIGHT, tiny.LATENT_WIDTH)

    @pytest.mark.parametrize("kind", ["dpm", "ddim"])
    def test_target_is_the_schedulers_velocity(self, kind):
        """A model that predicts get_velocity(x0, e, t) exactly has zero error; one predicting e does not."""
        scheduler = tiny.tiny_scheduler(kind)
        model = add_lora(tiny.tiny_transformer(), rank=4, alpha=8)
        batch = _batch()
        t = torch.tensor([10, 900])
        e = torch.randn(batch["winner_latents"].shape, generator=torch.Generator().manual_seed(3))
        x0 = torch.cat([batch["winner_latents"], batch["loser_latents"]])
        velocity = scheduler.get_velocity(x0, torch.cat([e, e]), torch.cat([t, t]))
        noisy = scheduler.add_noise(x0, torch.cat([e, e]), torch.cat([t, t]))

        def predicts(prediction):
            def forward(**kwargs):
                torch.testing.assert_close(kwargs["hidden_states"], noisy, rtol=0, atol=0)  # x_t from add_noise
                torch.testing.assert_close(kwargs["timestep"], torch.cat([t, t]), rtol=0, atol=0)
                return (prediction,)
            return forward

        exact = dpo_step(model, scheduler, batch, beta=1.0, timesteps=t, noise=e, forward=predicts(velocity))
        assert exact.metrics["err/policy_chosen"] == 0.0 and exact.metrics["err/policy_rejected"] == 0.0
        epsilon = dpo_step(model, scheduler, batch, beta=1.0, timesteps=t, noise=e, forward=predicts(torch.cat([e, e])))
        assert epsilon.metrics["err/policy_chosen"] > 0.1
