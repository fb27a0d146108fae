import math

import torch

from common.camera import (
    as_4x4, camera_centers, camera_motion, intrinsics_from_fov, invert_rigid, look_at, project_points, unproject_depth,
)


def test_look_at_follows_opencv_convention():
    eye, target = torch.tensor([0.0, 0.0, -5.0]), torch.zeros(3)
    w2c = look_at(eye, target)
    K = intrinsics_from_fov(100, 200, 60)
    # The target lands on the principal point, in front of the camera.
    uv, z = project_points(torch.stack([target.double(), torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0])]), K, w2c)
    assert torch.allclose(uv[0], K[:2, 2])
    assert z[0] == 5.0
    assert uv[1, 0] > uv[0, 0]  # world +x is image right
    assert uv[2, 1] > uv[0, 1]  # world +y (down) is image down
    assert torch.allclose(camera_centers(w2c[None])[0], eye.double())


def test_unproject_then_project_round_trip():
    K = intrinsics_from_fov(6, 8, 70).expand(2, 3, 3)
    w2c = torch.stack([look_at(torch.tensor([0.3, -0.2, -4.0]), torch.zeros(3)), look_at(torch.tensor([-1.0, 0, -4]), torch.zeros(3))])
    depth = torch.rand(2, 6, 8, dtype=torch.float64) + 2
    world = unproject_depth(depth, K, w2c)
    for t in range(2):
        uv, z = project_points(world[t].reshape(-1, 3), K[t], w2c[t])
        v, u = torch.meshgrid(torch.arange(6.0), torch.arange(8.0), indexing="ij")
        assert torch.allclose(uv, torch.stack([u, v], -1).reshape(-1, 2).double(), atol=1e-9)
        assert torch.allclose(z, depth[t].reshape(-1))


def test_invert_rigid_and_3x4():
    w2c = look_at(torch.tensor([1.0, 2, 3]), torch.zeros(3))
    assert torch.allclose(invert_rigid(w2c) @ w2c, torch.eye(4, dtype=torch.float64), atol=1e-12)
    assert torch.equal(as_4x4(w2c[:3]), w2c)


def test_camera_motion_values():
    static = torch.stack([look_at(torch.tensor([0.0, 0, -4]), torch.zeros(3))] * 3)
    assert camera_motion(static) == 0.0
    moving = torch.stack([look_at(torch.tensor([x, 0, -4]), torch.tensor([x, 0, 0])) for x in (0.0, 1.0, 2.0)])
    assert math.isclose(camera_motion(moving), 1.0)  # pure translation of 1 per step
    assert math.isclose(camera_motion(moving, scale=4.0), 0.25)
