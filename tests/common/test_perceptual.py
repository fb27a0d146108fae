import torch

from common.perceptual import DSSIM


def test_dssim_is_zero_for_identical_frames_and_grows_with_noise():
    torch.manual_seed(0)
    frames = torch.rand(2, 40, 60, 3)
    metric = DSSIM()
    assert metric.distance_map(frames, frames).abs().max() < 1e-6
    slight = metric.distance_map((frames + 0.02 * torch.randn_like(frames)).clamp(0, 1), frames).mean()
    strong = metric.distance_map((frames + 0.2 * torch.randn_like(frames)).clamp(0, 1), frames).mean()
    assert 0 < slight < strong <= 0.5


def test_opencv_and_torch_blurs_agree():
    torch.manual_seed(1)
    x = torch.rand(3, 1, 33, 47)
    metric = DSSIM()
    assert torch.allclose(metric._blur_opencv(x), metric._blur_torch(x), atol=1e-5)


def _textured(seed: int, height: int = 120, width: int = 180) -> torch.Tensor:
    """(1, H, W, 3) smooth random texture in [0, 1]: something optical flow can lock on to."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, height // 6, width // 6, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False).clamp(0, 1).permute(0, 2, 3, 1)


def test_alignment_measures_displacement_not_blur():
    """The weight-free term: pixels of misalignment count, the splatting blur of a render does not."""
    import cv2
    import numpy as np

    from common.perceptual import Alignment

    frame = _textured(0)
    metric = Alignment()
    assert metric.distance_map(frame, frame).max() == 0
    shifted = lambda px: torch.roll(frame, shifts=px, dims=2)  # noqa: E731
    blurred = torch.from_numpy(cv2.GaussianBlur(frame[0].numpy(), (5, 5), 1.2))[None]
    one, two = metric.distance_map(shifted(1), frame)[:, 10:-10, 10:-10].mean(), metric.distance_map(shifted(2), frame)[:, 10:-10, 10:-10].mean()
    blur = metric.distance_map(blurred, frame)[:, 10:-10, 10:-10].mean()
    # 1 px is 1 / clip of the way to the cap (clip = long side / 180 = 1 px here); the cap holds at 1.
    assert float(blur) < 0.2 < float(one) <= float(two) <= 1.0
    assert np.isclose(float(two), 1.0, atol=0.1)
