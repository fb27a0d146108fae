"""Colour saturation of videos: the guard against LoRAs that over-saturate (mean HSV saturation)."""

from __future__ import annotations

import numpy as np
import torch


def mean_saturation(frames: np.ndarray | torch.Tensor) -> float:
    """Mean HSV saturation of uint8 RGB frames (T, H, W, 3), in [0, 1].

    Per pixel S = (max(R, G, B) - min(R, G, B)) / max(R, G, B), and 0 for black (HSV's definition,
    as OpenCV's `COLOR_RGB2HSV` computes it, without its rounding to 8 bits).

    Example:
        >>> mean_saturation(np.array([[[[255, 0, 0], [128, 128, 128]]]], dtype=np.uint8))
        0.5
    """
    x = torch.as_tensor(np.asarray(frames))
    if x.dim() != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    x = x.float()
    high, low = x.max(dim=-1).values, x.min(dim=-1).values
    saturation = torch.where(high > 0, (high - low) / high.clamp_min(1.0), torch.zeros_like(high))
    return float(saturation.mean())
