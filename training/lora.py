"""LoRA on the CogVideoX transformer's attention projections: add, read out, export (common.lora's format)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from common.lora import LORA_WEIGHTS_NAME, adapter_metadata, save_lora

__all__ = ["DEFAULT_TARGETS", "LORA_WEIGHTS_NAME", "add_lora", "count_parameters", "export_lora", "lora_config",
           "lora_parameters", "lora_state_dict"]

#: The attention projections (query, key, value, output) of every CogVideoX block.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: peft's name for the one adapter a training run adds.
ADAPTER_NAME = "default"


def lora_config(rank: int = 64, alpha: float = 128, targets: Sequence[str] = DEFAULT_TARGETS, dropout: float = 0.0):
    """The peft `LoraConfig` of a run: what `add_lora` adds and what an export records as metadata."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights=True, target_modules=list(targets))


def add_lora(
    transformer, rank: int = 64, alpha: float = 128, targets: Sequence[str] = DEFAULT_TARGETS, dropout: float = 0.0
):
    """Freeze `transformer` and add fresh LoRA adapters (B = 0, so the policy starts equal to the base).

    The adapter's output is scaled by alpha / rank. Returns the transformer (modified in place).
    """
    transformer.requires_grad_(False)
    transformer.add_adapter(lora_config(rank, alpha, targets, dropout), adapter_name=ADAPTER_NAME)
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

    return {k: v.detach().cpu().contiguous()
            for k, v in get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME).items()}


def export_lora(directory: str | Path, transformer, state_dict: Optional[dict[str, torch.Tensor]] = None) -> Path:
    """Write the transformer's LoRA as `directory/pytorch_lora_weights.safetensors`, with its metadata.

    `CogVideoXPipeline.load_lora_weights(directory)` (or the I2V pipeline's) then reproduces the
    trained adapter exactly: same r, alpha and targets. `state_dict`: the whole weights when the
    transformer holds only a partition of them (DeepSpeed ZeRO-3 gathers them first); default:
    read from `transformer`. Returns the file's path.
    """
    weights = lora_state_dict(transformer) if state_dict is None else state_dict
    return save_lora(directory, weights, adapter_metadata(transformer.peft_config[ADAPTER_NAME]))
