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
