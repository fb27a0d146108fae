"""Perceptual distances between frames and their reprojections, as per-pixel maps.

LPIPS (package `lpips`) needs torchvision's ImageNet backbone weights, which we never download:
it is used when those weights are on disk (torchvision's cache, or a configured file). The
weight-free default is `Alignment` (residual optical flow, in pixels, clipped); DSSIM = (1 - SSIM) / 2
on luma with an 11x11 Gaussian window (sigma 1.5) is the other weight-free choice.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from functools import lru_cache
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from common.errors import ConfigError

# torchvision's file names for the ImageNet weights lpips builds on.
TORCHVISION_WEIGHTS = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}


class PerceptualMetric(ABC):
    name: str

    @abstractmethod
    def distance_map(self, a: Tensor, b: Tensor) -> Tensor:
        """a, b: (T, H, W, 3) float in [0, 1] -> (T, H, W) per-pixel distance (0 = identical)."""


class DSSIM(PerceptualMetric):
    name = "dssim"

    def __init__(self, window: int = 11, sigma: float = 1.5) -> None:
        self.sigma = sigma
        coords = torch.arange(window, dtype=torch.float32) - (window - 1) / 2
        g = torch.exp(-(coords**2) / (2 * sigma**2))
        self.kernel = g / g.sum()

    def _blur(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> the same, separable Gaussian with reflect(-101) borders."""
        # On the CPU OpenCV's Gaussian is about 8x faster than oneDNN's grouped 1-D convolutions.
        return self._blur_opencv(x) if x.device.type == "cpu" else self._blur_torch(x)

    def _blur_opencv(self, x: Tensor) -> Tensor:
        size = (len(self.kernel), len(self.kernel))
        planes = x.contiguous().reshape(-1, *x.shape[2:]).numpy()
        blurred = [cv2.GaussianBlur(p, size, self.sigma, borderType=cv2.BORDER_REFLECT_101) for p in planes]
        return torch.from_numpy(np.stack(blurred)).reshape(x.shape)

    def _blur_torch(self, x: Tensor) -> Tensor:
        C = x.shape[1]
        k = self.kernel.to(x)
        pad = len(k) // 2
        x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
        return F.conv2d(F.pad(x, (0, 0, pad, pad), mode="reflect"), k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)

    def distance_map(self, a: Tensor, b: Tensor) -> Tensor:
        # SSIM on luma, as in its original definition (Wang et al. 2004): colour errors are the
        # MSE term's job, and one channel costs a third of three.
        luma = torch.tensor([0.299, 0.587, 0.114], device=a.device)
        x, y = (a.float() @ luma)[:, None], (b.float() @ luma)[:, None]  # (T, 1, H, W)
        c1, c2 = 0.01**2, 0.03**2
        mu_x, mu_y = self._blur(x), self._blur(y)
        var_x = self._blur(x * x) - mu_x**2
        var_y = self._blur(y * y) - mu_y**2
        cov = self._blur(x * y) - mu_x * mu_y
        ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
        return ((1 - ssim.mean(dim=1)) / 2).clamp(0, 1)


class Alignment(PerceptualMetric):
    """Misalignment between a frame and its reprojection: residual optical flow, clipped.

    Per pixel min(|flow(a -> b)|, clip) / clip on luma, DIS optical flow, with clip = `clip_fraction`
    of the images' long side (2 px at the scorer's half-scale comparison of 720 px frames, i.e. 4 px
    of the frame). A geometric error of d pixels shows as d pixels of residual flow whatever the
    texture, while the point cloud's splatting blur and holes move no pixel: this is what ranks
    3D consistency where DSSIM's floor of blur hides a few pixels of drift (docs/backends.md has the
    measurement that chose it).
    """

    name = "align"

    def __init__(self, clip_fraction: float = 1 / 180) -> None:
        self.clip_fraction = clip_fraction

    def distance_map(self, a: Tensor, b: Tensor) -> Tensor:
        H, W = a.shape[1:3]
        clip = self.clip_fraction * max(H, W)
        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)  # per call: not thread-safe
        luma = torch.tensor([0.299, 0.587, 0.114])
        to_gray = lambda x: (x.float().cpu() @ luma).mul(255).round().clamp(0, 255).to(torch.uint8).numpy()  # noqa: E731
        maps = []
        for fa, fb in zip(to_gray(a), to_gray(b)):
            flow = dis.calc(fa, fb, None)
            maps.append(np.minimum(np.sqrt(flow[..., 0] ** 2 + flow[..., 1] ** 2), clip) / clip)
        return torch.from_numpy(np.stack(maps)).to(a.device)


class LPIPS(PerceptualMetric):
    """LPIPS with its published linear heads (shipped in the package) and a local backbone file."""

    def __init__(self, net: str, weights: Path, device: torch.device) -> None:
        import lpips

        self.name = f"lpips-{net}"
        self.model = lpips.LPIPS(net=net, spatial=True, pnet_rand=True, verbose=False)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        # lpips splits torchvision's `features.N` layers into slices; map them back by layer number.
        backbone = {}
        for key in self.model.net.state_dict():
            layer, param = key.split(".")[1:]
            backbone[key] = state[f"features.{layer}.{param}"]
        self.model.net.load_state_dict(backbone)
        self.model = self.model.to(device).eval()
        self._lock = threading.Lock()

    @torch.no_grad()
    def distance_map(self, a: Tensor, b: Tensor) -> Tensor:
        maps = []
        with self._lock:  # one model, possibly many request threads
            for fa, fb in zip(a, b):  # one frame at a time bounds the backbone's activation memory
                x = fa.permute(2, 0, 1)[None].float() * 2 - 1  # lpips takes [-1, 1]
                y = fb.permute(2, 0, 1)[None].float() * 2 - 1
                maps.append(self.model(x, y)[0, 0])
        return torch.stack(maps)


def lpips_weights_path(net: str, configured: Optional[Path]) -> Optional[Path]:
    """The backbone file to use, or None when it is not on this machine."""
    if configured is not None:
        return Path(configured) if Path(configured).is_file() else None
    path = Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_WEIGHTS[net]
    return path if path.is_file() else None


def create_metric(choice: str, lpips_weights: Optional[Path], device: torch.device) -> PerceptualMetric:
    """'auto' -> LPIPS-VGG when its weights are on disk, else Alignment; 'lpips-*' require the weights."""
    return _cached_metric(choice, str(lpips_weights) if lpips_weights else None, str(device))


@lru_cache(maxsize=8)
def _cached_metric(choice: str, lpips_weights: Optional[str], device: str) -> PerceptualMetric:
    configured = Path(lpips_weights) if lpips_weights else None
    if choice == "dssim":
        return DSSIM()
    if choice == "align":
        return Alignment()
    net = "alex" if choice == "lpips-alex" else "vgg"
    path = lpips_weights_path(net, configured)
    if path is None:
        if choice == "auto":
            return Alignment()
        where = configured or Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_WEIGHTS[net]
        raise ConfigError(
            f"{choice} needs torchvision's ImageNet {net} weights at {where}; copy the file "
            f"{TORCHVISION_WEIGHTS[net]} there (or pass lpips_weights), or use perceptual='dssim'"
        )
    return LPIPS(net, path, torch.device(device))
