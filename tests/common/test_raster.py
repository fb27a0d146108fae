import pytest
import torch

from common.camera import intrinsics_from_fov, look_at, unproject_depth
from common.raster import rasterize_points


def _brute_force(points, colors, K, w2c, H, W):
    """Reference z-buffer: loop over points, keep the nearest (ties: smaller index)."""
    T = w2c.shape[0]
    image, depth, mask = torch.zeros(T, H, W, colors.shape[1]), torch.zeros(T, H, W), torch.zeros(T, H, W, dtype=torch.bool)
    for t in range(T):
        best = {}
        cam = points @ w2c[t, :3, :3].T + w2c[t, :3, 3]
        proj = cam @ K[t].T
        for i in range(points.shape[0]):
            z = float(cam[i, 2])
            if z <= 1e-6:
                continue
            u, v = int(torch.floor(proj[i, 0] / proj[i, 2] + 0.5)), int(torch.floor(proj[i, 1] / proj[i, 2] + 0.5))
            if 0 <= u < W and 0 <= v < H and ((v, u) not in best or z < best[(v, u)][0]):
                best[(v, u)] = (z, i)
        for (v, u), (z, i) in best.items():
            image[t, v, u], depth[t, v, u], mask[t, v, u] = colors[i], z, True
    return image, depth, mask


def _cameras(T=3, H=12, W=16):
    K = intrinsics_from_fov(H, W, 60).float().expand(T, 3, 3).contiguous()
    w2c = torch.stack([look_at(torch.tensor([0.3 * t, 0.1, -3.0]), torch.zeros(3)) for t in range(T)]).float()
    return K, w2c


def test_matches_brute_force_reference():
    torch.manual_seed(0)
    K, w2c = _cameras()
    points = torch.randn(400, 3)
    colors = torch.rand(400, 3)
    got = rasterize_points(points, colors, K, w2c, 12, 16)
    want = _brute_force(points, colors, K, w2c, 12, 16)
    assert torch.equal(got[2], want[2])
    assert torch.allclose(got[1], want[1], atol=1e-5)
    assert torch.equal(got[0], want[0])


def test_nearest_surface_wins_whatever_the_order():
    K, w2c = _cameras(T=1)
    H, W = 12, 16
    near = unproject_depth(torch.full((1, H, W), 2.0), K, w2c).reshape(-1, 3)
    far = unproject_depth(torch.full((1, H, W), 5.0), K, w2c).reshape(-1, 3)
    red, blue = torch.tensor([[1.0, 0, 0]]).expand(H * W, 3), torch.tensor([[0, 0, 1.0]]).expand(H * W, 3)
    for points, colors in ((torch.cat([near, far]), torch.cat([red, blue])), (torch.cat([far, near]), torch.cat([blue, red]))):
        image, depth, mask = rasterize_points(points, colors, K, w2c, H, W)
        assert mask.all()
        assert torch.allclose(depth, torch.full_like(depth, 2.0))
        assert torch.equal(image[0], red.reshape(H, W, 3))


def test_deterministic_across_thread_counts_and_3x4_poses():
    torch.manual_seed(1)
    K, w2c = _cameras(T=4, H=48, W=64)
    # Many points per pixel, equal depths included: ties go to the smaller index.
    points = torch.randn(200_000, 3) * 0.3
    points[100_000:] = points[:100_000]
    colors = torch.rand(200_000, 3)
    threads = torch.get_num_threads()
    try:
        first = rasterize_points(points, colors, K, w2c, 48, 64)
        torch.set_num_threads(1)
        second = rasterize_points(points, colors, K, w2c[:, :3, :], 48, 64)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_origin_frame_leaves_each_frame_out():
    K, w2c = _cameras(T=2)
    points = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    colors = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    image, _, mask = rasterize_points(points, colors, K, w2c, 12, 16, origin_frame=torch.tensor([0, 1]))
    assert mask[0].sum() == 1 and mask[1].sum() == 1
    assert torch.equal(image[0][mask[0]][0], colors[1])  # frame 0 sees only the point from frame 1
    assert torch.equal(image[1][mask[1]][0], colors[0])


def test_points_behind_or_outside_are_dropped_and_shapes_are_checked():
    K, w2c = _cameras(T=1)
    points = torch.tensor([[0.0, 0.0, -10.0], [100.0, 0.0, 0.0]])  # behind the camera, far off to the side
    image, depth, mask = rasterize_points(points, torch.ones(2, 1), K, w2c, 12, 16)
    assert image.shape == (1, 12, 16, 1) and depth.shape == (1, 12, 16) and not mask.any()
    with pytest.raises(ValueError, match="points must be"):
        rasterize_points(torch.zeros(3), torch.ones(3, 1), K, w2c, 12, 16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu():
    torch.manual_seed(2)
    K, w2c = _cameras(T=3, H=48, W=64)
    points, colors = torch.randn(50_000, 3), torch.rand(50_000, 3)
    cpu = rasterize_points(points, colors, K, w2c, 48, 64)
    gpu = rasterize_points(points.cuda(), colors.cuda(), K.cuda(), w2c.cuda(), 48, 64)
    assert torch.equal(cpu[2], gpu[2].cpu())
