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

from common.cogvideox import check_latent_size, padded_latent_frames

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
# The model side: inputs the CogVideoX transformer expects, and one batched winner+loser step.
# ------------------------------------------------------------------------------------------------


def rotary_embeddings(
    transformer_config, latent_frames: int, latent_height: int, latent_width: int, device=None
) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """CogVideoX's 3D rotary embeddings (cos, sin), each (F*h*w/p^2, head_dim); None when unused.

    The same computation as `CogVideoXPipeline._prepare_rotary_positional_embeddings`, written
    from latent sizes (the pipeline starts from pixels and divides by the VAE factor).
    """
    if not transformer_config.use_rotary_positional_embeddings:
        return None
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    p = transformer_config.patch_size
    p_t = transformer_config.patch_size_t
    grid_h, grid_w = latent_height // p, latent_width // p
    base_w, base_h = transformer_config.sample_width // p, transformer_config.sample_height // p
    if p_t is None:  # CogVideoX 1.0
        crops = get_resize_crop_region_for_grid((grid_h, grid_w), base_w, base_h)
        return get_3d_rotary_pos_embed(
            embed_dim=transformer_config.attention_head_dim,
            crops_coords=crops,
            grid_size=(grid_h, grid_w),
            temporal_size=latent_frames,
            device=device,
        )
    return get_3d_rotary_pos_embed(  # CogVideoX 1.5
        embed_dim=transformer_config.attention_head_dim,
        crops_coords=None,
        grid_size=(grid_h, grid_w),
        temporal_size=(latent_frames + p_t - 1) // p_t,
        grid_type="slice",
        max_size=(base_h, base_w),
        device=device,
    )


def pad_latent_frames(latents: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, F, C, h, w) -> (B, frames, C, h, w): the first latent frame repeated in front (CogVideoX 1.5)."""
    pad = frames - latents.shape[1]
    if pad < 0:
        raise ValueError(f"cannot pad {latents.shape[1]} latent frames to {frames}")
    return torch.cat([latents[:, :1].expand(-1, pad, -1, -1, -1), latents], dim=1) if pad else latents


def i2v_condition(image_latents: torch.Tensor, latent_frames: int) -> torch.Tensor:
    """First-frame latent (B, 1, C, h, w) -> (B, F, C, h, w): zero-padded on frames, as the I2V pipeline does.

    `latent_frames` is the count the transformer runs on (padded for CogVideoX 1.5), as the pipeline's
    `prepare_latents` receives it from `__call__`.
    """
    if image_latents.dim() != 5 or image_latents.shape[1] != 1:
        raise ValueError(f"image latents must be (B, 1, C, h, w), got {tuple(image_latents.shape)}")
    pad = image_latents.new_zeros((image_latents.shape[0], latent_frames - 1, *image_latents.shape[2:]))
    return torch.cat([image_latents, pad], dim=1)


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


def check_batch(batch: dict, transformer_config) -> None:
    """Assert shapes and dtypes at the boundary. Latents (B, F, C, h, w) float, text (B, L, D) float."""
    w, l, text = batch["winner_latents"], batch["loser_latents"], batch["prompt_embeds"]
    if w.shape != l.shape or w.dim() != 5:
        raise ValueError(f"winner {tuple(w.shape)} and loser {tuple(l.shape)} latents must both be (B, F, C, h, w)")
    if not (w.is_floating_point() and l.is_floating_point() and text.is_floating_point()):
        raise ValueError("latents and text embeddings must be floating point")
    i2v = "image_latents" in batch and batch["image_latents"] is not None
    channels = transformer_config.in_channels // 2 if i2v else transformer_config.in_channels
    if w.shape[2] != channels:
        raise ValueError(
            f"latents have {w.shape[2]} channels, the transformer expects {channels}"
            + (" (image-to-video: half of in_channels)" if i2v else "")
        )
    check_latent_size(transformer_config, w.shape[1], w.shape[3], w.shape[4])
    if text.dim() != 3 or text.shape[0] != w.shape[0] or text.shape[2] != transformer_config.text_embed_dim:
        raise ValueError(
            f"text embeddings {tuple(text.shape)} must be (B={w.shape[0]}, L, {transformer_config.text_embed_dim})"
        )


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
    config = model.config
    check_batch(batch, config)
    device = next(p for p in model.parameters()).device
    bsz, video_frames, _, height, width = batch["winner_latents"].shape
    frames = padded_latent_frames(video_frames, config)  # what the transformer runs on
    x0_w, x0_l = (pad_latent_frames(batch[k], frames) for k in ("winner_latents", "loser_latents"))

    # 1. One timestep and one noise per pair, shared by winner and loser.
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (bsz,), generator=generator)
    if noise is None:
        noise = torch.randn(x0_w.shape, generator=generator)
    x0 = torch.cat([x0_w, x0_l]).to(device, torch.float32)  # (2B, F, C, h, w): [winners; losers]
    t = torch.cat([timesteps, timesteps]).to(device)
    e = torch.cat([noise, noise]).to(device, torch.float32)

    # 2. Noisy input and v-prediction target (fp32: the scheduler's alphas are fp32).
    x_t = scheduler.add_noise(x0, e, t)
    target = scheduler.get_velocity(x0, e, t)

    # 3. Condition: text, rotary embeddings, and the first-frame latent on channels for I2V.
    text = torch.cat([batch["prompt_embeds"], batch["prompt_embeds"]]).to(device, compute_dtype)
    model_input = x_t
    if batch.get("image_latents") is not None:
        cond = i2v_condition(batch["image_latents"].to(device, torch.float32), frames)
        model_input = torch.cat([x_t, torch.cat([cond, cond])], dim=2)
    rotary = rotary_embeddings(config, frames, height, width, device=device)
    kwargs = dict(
        hidden_states=model_input.to(compute_dtype),
        encoder_hidden_states=text,
        timestep=t,
        image_rotary_emb=rotary,
        return_dict=False,
    )
    if getattr(config, "ofs_embed_dim", None):
        kwargs["ofs"] = model_input.new_full((1,), 2.0)  # as the CogVideoX 1.5 I2V pipeline does

    # 4. Policy (LoRA on) with gradients, reference (LoRA off) without.
    forward = forward or model
    pred = forward(**kwargs)[0]
    if reference is None:
        with torch.no_grad(), adapters_disabled(model):
            ref_pred = forward(**kwargs)[0]
    else:
        with torch.no_grad():
            ref_pred = reference(**kwargs)[0]
    # Errors on the video's own frames (the last `video_frames`; CogVideoX 1.5's padding is in front).
    video = slice(frames - video_frames, None)
    policy_err_w, policy_err_l = per_sample_mse(pred[:, video], target[:, video]).chunk(2)
    ref_err_w, ref_err_l = per_sample_mse(ref_pred[:, video], target[:, video]).chunk(2)

    # 5. The loss in fp32.
    return dpo_loss(policy_err_w, policy_err_l, ref_err_w, ref_err_l, beta, loss_type, sft_weight)
