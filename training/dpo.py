"""Diffusion-DPO for v-prediction video diffusion: the loss (pure) and one batched policy/reference step.

The objective, for a pair (winner x_w, loser x_l) with the same condition c, one timestep t and one
noise e shared by both:

    x_t   = scheduler.add_noise(x0, e, t)
    v     = scheduler.get_velocity(x0, e, t)                 # the v-prediction target
    E(m,x)= mean over (F, C, h, w) of (m(x_t, t, c) - v)^2   # per-sample, MEAN-reduced, fp32
    margin = [E(ref, x_w) - E(theta, x_w)] - [E(ref, x_l) - E(theta, x_l)]
    loss   = -log sigmoid(beta * margin)                     # "sigmoid" (Diffusion-DPO)

The reference model is the same transformer with its LoRA adapters switched off (no second copy).

Scale of beta: errors are means over all latent elements, so E is O(0.1..1) and early margins
are O(1e-4). beta = 1 is what the paper's code uses with this reduction. The diffusers
Diffusion-DPO example writes the same loss as -log sigmoid(-0.5 * beta' * (model_diff - ref_diff)),
so its beta' = 2500 equals beta = 1250 here; Epipolar-DPO's 500 (with -0.5) equals beta = 250.
Errors summed instead of averaged would multiply the margin by F*C*h*w: divide beta by that.

Variants (all tested): "hinge" = relu(1 - beta * margin) (SLiC); "ipo" = (margin - 1/(2 beta))^2.
An optional SFT term adds `sft_weight * mean(E(theta, x_w))` (winners only).

CogVideoX 1.5 (patch_size_t = 2) runs on a multiple of 2 latent frames. Its pipeline samples the
missing frames *in front* of the video and drops them before decoding; here the video's first
latent frame is repeated in front (as CogVideoX's own fine-tuning does), the model sees the padded
sequence (the I2V condition at its first position, as in the pipeline), and E is measured on the
video's own frames only: the padding is discarded at inference, so nothing should be learned on it.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Optional

import torch
import torch.nn.functional as F

from common.families import family_of_transformer
# The CogVideoX inputs live with the family adapter; re-exported here for callers of training.dpo.
from common.families.cogvideox import check_batch, i2v_condition, pad_latent_frames, rotary_embeddings  # noqa: F401

LossType = Literal["sigmoid", "hinge", "ipo"]


@dataclass
class DPOOutput:
    """The loss (scalar, fp32, differentiable) and detached per-step metrics with trl's names."""

    loss: torch.Tensor
    metrics: dict[str, float]


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample in fp32. pred, target: (B, ...) -> (B,)."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    diff = pred.float() - target.float()
    return diff.pow(2).flatten(1).mean(dim=1)


def dpo_loss(
    policy_err_w: torch.Tensor,
    policy_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float,
    loss_type: LossType = "sigmoid",
    sft_weight: float = 0.0,
) -> DPOOutput:
    """Diffusion-DPO loss from per-sample errors (all (B,), any float dtype; computed in fp32).

    Returns the batch-mean loss and metrics: `loss`, `rewards/chosen` = beta * (ref_w - policy_w),
    `rewards/rejected`, `rewards/margins`, `rewards/accuracies` (= implicit accuracy: margin > 0,
    ties count one half, so policy == reference gives 0.5), and the four mean errors.
    """
    policy_err_w, policy_err_l = policy_err_w.float(), policy_err_l.float()
    ref_err_w, ref_err_l = ref_err_w.float().detach(), ref_err_l.float().detach()
    improve_w = ref_err_w - policy_err_w  # > 0: the policy fits the winner better than the reference
    improve_l = ref_err_l - policy_err_l
    margin = improve_w - improve_l  # (B,)

    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * margin)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * margin)
    elif loss_type == "ipo":
        losses = (margin - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected sigmoid, hinge or ipo")
    loss = losses.mean()
    if sft_weight:
        loss = loss + sft_weight * policy_err_w.mean()

    with torch.no_grad():
        m = margin.detach()
        accuracy = ((m > 0).float() + 0.5 * (m == 0).float()).mean()
        metrics = {
            "loss": loss.detach().item(),
            "rewards/chosen": (beta * improve_w.detach()).mean().item(),
            "rewards/rejected": (beta * improve_l.detach()).mean().item(),
            "rewards/margins": (beta * m).mean().item(),
            "rewards/accuracies": accuracy.item(),
            "err/policy_chosen": policy_err_w.detach().mean().item(),
            "err/policy_rejected": policy_err_l.detach().mean().item(),
            "err/ref_chosen": ref_err_w.mean().item(),
            "err/ref_rejected": ref_err_l.mean().item(),
        }
    return DPOOutput(loss=loss, metrics=metrics)


# ------------------------------------------------------------------------------------------------
# The model side: one batched winner+loser step (inputs and target from the model's family).
# ------------------------------------------------------------------------------------------------


_TUNER_LAYERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _tuner_layers(model) -> list:
    """peft's LoRA layers inside `model`, found once per model (walking a 5B model's modules costs ~1 ms)."""
    layers = _TUNER_LAYERS.get(model)
    if layers is None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = _TUNER_LAYERS[model] = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    return layers


@contextmanager
def adapters_disabled(model) -> Iterator[None]:
    """The reference model: `model` with its LoRA layers bypassed (outputs bit-identical to the base).

    Toggles peft's tuner layers directly: diffusers' `disable_adapters()` checks the installed peft
    version through importlib.metadata on every call (~2.5 ms, a third of a tiny-model step).
    """
    layers = _tuner_layers(model)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def dpo_step(
    model,
    scheduler,
    batch: dict,
    beta: float,
    generator: Optional[torch.Generator] = None,
    loss_type: LossType = "sigmoid",
    sft_weight: float = 0.0,
    compute_dtype: torch.dtype = torch.float32,
    timesteps: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    forward: Optional[Callable] = None,
    reference: Optional[torch.nn.Module] = None,
) -> DPOOutput:
    """One Diffusion-DPO forward: winners and losers in one batched call, policy then reference.

    Args:
        model: the CogVideoX transformer with LoRA adapters (peft, via diffusers' `add_adapter`).
        scheduler: a v-prediction scheduler with `add_noise` and `get_velocity` (CogVideoX DDIM/DPM).
        batch: `winner_latents`, `loser_latents` (B, F, C, h, w) scaled by the VAE's scaling_factor,
            F = the video's own latent frames; `prompt_embeds` (B, L, D); optional `image_latents`
            (B, 1, C, h, w) for image-to-video, scaled as the I2V pipeline scales its condition.
        beta: DPO temperature, see the module docstring for its scale.
        generator: draws t ~ U{0..T-1} (B,) and e ~ N(0, 1) like the (padded) latents, shared by winner
            and loser.
        timesteps, noise: given explicitly instead of drawn (tests).
        forward: what to call for the forward pass (a DeepSpeed engine wrapping `model`); default `model`.
        reference: a separate frozen reference model instead of `model` with adapters off. This is
            what the paper's code does (a second copy of the weights); kept for the benchmark.
    Returns: `DPOOutput` whose loss carries gradients into the LoRA parameters only.
    """
    # 1.-3. Timestep and noise shared by winner and loser, the noisy input, the target and the
    # condition: the family's (common.families: CogVideoX v-prediction, Wan rectified flow).
    kwargs, target, video = family_of_transformer(model).training_inputs(
        model, scheduler, batch, generator=generator, timesteps=timesteps, noise=noise, compute_dtype=compute_dtype)

    # 4. Policy (LoRA on) with gradients, reference (LoRA off) without.
    forward = forward or model
    pred = forward(**kwargs)[0]
    if reference is None:
        with torch.no_grad(), adapters_disabled(model):
            ref_pred = forward(**kwargs)[0]
    else:
        with torch.no_grad():
            ref_pred = reference(**kwargs)[0]
    # Errors on the video's own latent frames (dim 1; CogVideoX 1.5's padding in front is left out).
    policy_err_w, policy_err_l = per_sample_mse(pred[:, video], target[:, video]).chunk(2)
    ref_err_w, ref_err_l = per_sample_mse(ref_pred[:, video], target[:, video]).chunk(2)

    # 5. The loss in fp32.
    return dpo_loss(policy_err_w, policy_err_l, ref_err_w, ref_err_l, beta, loss_type, sft_weight)
