"""LoRA on the CogVideoX transformer's attention projections: add, read out, export in the diffusers format."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

#: The attention projections (query, key, value, output) of every CogVideoX block.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: The file `CogVideoXPipeline.load_lora_weights(folder)` reads.
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def add_lora(
    transformer, rank: int = 64, alpha: int = 128, targets: Sequence[str] = DEFAULT_TARGETS, dropout: float = 0.0
):
    """Freeze `transformer` and add fresh LoRA adapters (B = 0, so the policy starts equal to the base).

    Returns the transformer (modified in place) for chaining.
    """
    from peft import LoraConfig

    transformer.requires_grad_(False)
    transformer.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights=True, target_modules=list(targets))
    )
    return transformer


def lora_parameters(transformer) -> list[torch.nn.Parameter]:
    """The trainable LoRA parameters, in module order."""
    return [p for n, p in transformer.named_parameters() if "lora_" in n and p.requires_grad]


def count_parameters(transformer) -> tuple[int, int]:
    """(trainable, total) parameter counts (works on the meta device)."""
    trainable = sum(p.numel() for p in lora_parameters(transformer))
    total = sum(p.numel() for p in transformer.parameters())
    return trainable, total


def lora_state_dict(transformer) -> dict[str, torch.Tensor]:
    """The adapter weights only, with peft's keys (`...to_q.lora_A.weight`), detached, on the CPU."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}


def export_lora(directory: str | Path, state_dict: dict[str, torch.Tensor], i2v: bool = False) -> Path:
    """Write `pytorch_lora_weights.safetensors` in the diffusers format; returns its path.

    `state_dict` is `lora_state_dict(transformer)`; the file loads with
    `CogVideoXPipeline.load_lora_weights(directory)` (the I2V pipeline reads the same format).
    """
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cls = CogVideoXImageToVideoPipeline if i2v else CogVideoXPipeline
    cls.save_lora_weights(directory, transformer_lora_layers=state_dict, weight_name=LORA_WEIGHTS_NAME)
    return directory / LORA_WEIGHTS_NAME
