"""The LoRA file: what `vgpa train` writes and what every sampler (the Serve deployment, `vgpa demo`,
`vgpa compare-lora`, anyone with diffusers) loads.

Format: diffusers' `pytorch_lora_weights.safetensors` (keys `transformer.<module>.lora_A.weight`, ...)
**with the peft adapter metadata** (`r`, `lora_alpha`, `target_modules`, ...) in the safetensors
header under diffusers' `lora_adapter_metadata` key. diffusers 0.42.1 builds the adapter's
`LoraConfig` from that metadata; without it, it infers `r` from the weight shapes and assumes
`lora_alpha = r`, i.e. it applies the adapter at scale 1 instead of `alpha / r` (half strength for
the paper's r 64 / alpha 128). So an export is only right when the metadata travels with it, and it
is checked by comparing the loaded transformer's *output* with the trained one, never the weights.

Everything here is plain diffusers/peft (no Ray); one loading path, `load_lora`, serves every caller.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from common.errors import ConfigError

logger = logging.getLogger(__name__)

#: The file `CogVideoXPipeline.load_lora_weights(folder)` reads.
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
#: The safetensors header key diffusers reads the adapter metadata from (diffusers.loaders.lora_base).
METADATA_KEY = "lora_adapter_metadata"
#: The LoraConfig fields we write: enough to rebuild the adapter exactly, and accepted by every peft
#: version diffusers supports (a full `LoraConfig.to_dict()` carries fields older peft rejects).
METADATA_FIELDS = ("r", "lora_alpha", "target_modules", "lora_dropout", "bias", "use_rslora", "use_dora",
                   "init_lora_weights", "rank_pattern", "alpha_pattern")


def adapter_metadata(lora_config: Any) -> dict:
    """The metadata dict to store beside the weights, from a peft `LoraConfig` (or its `to_dict()`).

    `target_modules` becomes a sorted list (peft keeps a set; JSON has none).
    """
    config = lora_config if isinstance(lora_config, Mapping) else lora_config.to_dict()
    missing = [k for k in ("r", "lora_alpha", "target_modules") if config.get(k) is None]
    if missing:
        raise ValueError(f"LoRA adapter config lacks {', '.join(missing)}")
    out = {k: config[k] for k in METADATA_FIELDS if k in config}
    targets = out["target_modules"]
    out["target_modules"] = [targets] if isinstance(targets, str) else sorted(targets)
    return out


def save_lora(directory: str | Path, state_dict: dict[str, torch.Tensor], metadata: Mapping) -> Path:
    """Write `directory/pytorch_lora_weights.safetensors` with its adapter metadata; returns the file.

    `state_dict`: peft's adapter weights of the transformer (`...to_q.lora_A.weight` keys, as
    `peft.utils.get_peft_model_state_dict` returns them). `metadata`: `adapter_metadata(config)`.
    The text-to-video and image-to-video CogVideoX pipelines share this loader and format.
    """
    from diffusers import CogVideoXPipeline

    if not state_dict:
        raise ValueError("no LoRA weights to save")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    CogVideoXPipeline.save_lora_weights(
        directory,
        transformer_lora_layers={k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
        weight_name=LORA_WEIGHTS_NAME,
        transformer_lora_adapter_metadata=dict(metadata),
    )
    return directory / LORA_WEIGHTS_NAME


def lora_file(folder: str | Path) -> Path:
    """The weights file of a LoRA folder (or the file itself); a clear error when it is missing."""
    path = Path(folder)
    if path.is_dir():
        path = path / LORA_WEIGHTS_NAME
    if not path.is_file():
        raise ConfigError(f"no LoRA at {folder}: {LORA_WEIGHTS_NAME} is missing")
    return path


def read_adapter_metadata(folder: str | Path) -> Optional[dict]:
    """The transformer's adapter metadata stored in a LoRA file (`r`, `lora_alpha`, ...), or None."""
    from safetensors import safe_open

    with safe_open(str(lora_file(folder)), framework="pt") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
    if not raw:
        return None
    # diffusers prefixes each key with the component: {"transformer.r": 64, ...}
    return {k.removeprefix("transformer."): v for k, v in json.loads(raw).items() if k.startswith("transformer.")}


def read_lora(folder: str | Path) -> tuple[dict[str, torch.Tensor], Optional[dict]]:
    """(weights with peft's keys, as `save_lora` takes them; adapter metadata or None) of a LoRA file."""
    from safetensors.torch import load_file

    weights = load_file(str(lora_file(folder)))
    # diffusers stores the transformer's keys as "transformer.<peft key>".
    return {k.removeprefix("transformer."): v for k, v in weights.items()}, read_adapter_metadata(folder)


def load_lora(pipe, folder: str | Path, adapter_name: str) -> dict:
    """Load the LoRA in `folder` into a CogVideoX pipeline as adapter `adapter_name`; returns its metadata.

    The one loading path of the project: the sampler deployment, `vgpa demo` and `vgpa compare-lora`
    call it, so they all apply the adapter the trainer trained (scale alpha / r from the metadata).
    A file without metadata (written by something else, or by `vgpa train` before exports carried it)
    still loads, as diffusers loads it (scale 1), with a warning that says so.
    """
    path = lora_file(folder)
    metadata = read_adapter_metadata(path)
    if metadata is None:
        logger.warning(
            "%s carries no adapter metadata (r, lora_alpha): diffusers applies it at scale 1, which is "
            "the trained strength only if lora_alpha == r", path)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter_name)
    return metadata or {}


def select_adapter(pipe, adapter_name: Optional[str], scale: float = 1.0) -> None:
    """Make `adapter_name` the only active LoRA at `scale` x its trained strength; None: the base model.

    `scale` multiplies alpha / r (peft's `set_scale`), so 1.0 is the policy as trained and 0.0 the base.
    """
    if adapter_name is None:
        pipe.disable_lora()
        return
    pipe.enable_lora()
    pipe.set_adapters([adapter_name], [float(scale)])
