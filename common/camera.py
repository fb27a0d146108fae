"""Camera geometry: the one camera convention of videogpa, and the small functions built on it.

Convention:
    - Camera frame: OpenCV. +x right, +y down, +z forward (into the scene). Depth is the camera z
      of a point, not the length of its ray.
    - Pixels: (u, v) = (column, row); the centre of pixel (0, 0) is at (0.0, 0.0), so an image of
      width W spans u in [-0.5, W - 0.5].
    - Intrinsics K (3, 3): [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] in pixels of the frames being scored.
    - Extrinsics: world-to-camera, x_cam = R @ x_world + t, stored as a (4, 4) matrix [[R, t], [0, 1]]
      (a (3, 4) [R | t] is accepted wherever noted). The camera centre is C = -R^T t.

Every geometry backend converts its native outputs to this convention at its own edge
(`common.geometry`); nothing past that edge knows where the cameras came from.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def as_4x4(world_to_cam: Tensor) -> Tensor:
    """(..., 3, 4) or (..., 4, 4) -> (..., 4, 4) world-to-camera matrices."""
    if world_to_cam.shape[-2:] == (4, 4):
        return world_to_cam
    if world_to_cam.shape[-2:] != (3, 4):
        raise ValueError(f"world_to_cam must be (...,3,4) or (...,4,4), got {tuple(world_to_cam.shape)}")
    bottom = torch.zeros(*world_to_cam.shape[:-2], 1, 4, dtype=world_to_cam.dtype, device=world_to_cam.device)
    bottom[..., 0, 3] = 1
    return torch.cat([world_to_cam, bottom], dim=-2)


def invert_rigid(world_to_cam: Tensor) -> Tensor:
    """(..., 4, 4) rigid transform -> its inverse (cam-to-world), exactly, without a general inverse."""
    m = as_4x4(world_to_cam)
    R, t = m[..., :3, :3], m[..., :3, 3:]
    inv = torch.zeros_like(m)
    inv[..., :3, :3] = R.transpose(-1, -2)
    inv[..., :3, 3:] = -R.transpose(-1, -2) @ t
    inv[..., 3, 3] = 1
    return inv


def camera_centers(world_to_cam: Tensor) -> Tensor:
    """(T, 4, 4) -> (T, 3) camera centres in world coordinates."""
    m = as_4x4(world_to_cam)
    R, t = m[..., :3, :3], m[..., :3, 3]
    return -(R.transpose(-1, -2) @ t.unsqueeze(-1)).squeeze(-1)


def look_at(eye: Tensor, target: Tensor, up: Tensor | None = None) -> Tensor:
    """World-to-camera (4, 4) of an OpenCV camera at `eye` looking at `target`; `up` is world up.

    World up defaults to -y (so that the image's +y, down, points along world +y).
    """
    eye = torch.as_tensor(eye, dtype=torch.float64)
    target = torch.as_tensor(target, dtype=torch.float64)
    up = torch.tensor([0.0, -1.0, 0.0], dtype=torch.float64) if up is None else torch.as_tensor(up, dtype=torch.float64)
    z = target - eye
    z = z / z.norm()
    x = torch.linalg.cross(z, up)
    if x.norm() < 1e-9:  # looking along up: pick any perpendicular
        x = torch.linalg.cross(z, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    x = x / x.norm()
    y = torch.linalg.cross(z, x)
    R = torch.stack([x, y, z])  # rows: camera axes in world coordinates
    m = torch.eye(4, dtype=torch.float64)
    m[:3, :3] = R
    m[:3, 3] = -R @ eye
    return m


def intrinsics_from_fov(height: int, width: int, fov_x_deg: float) -> Tensor:
    """(3, 3) pinhole K with square pixels and the principal point at the image centre."""
    fx = 0.5 * width / math.tan(math.radians(fov_x_deg) / 2)
    return torch.tensor(
        [[fx, 0.0, (width - 1) / 2], [0.0, fx, (height - 1) / 2], [0.0, 0.0, 1.0]], dtype=torch.float64
    )


def pixel_grid(height: int, width: int, device=None, dtype=torch.float32) -> Tensor:
    """(H, W, 3) homogeneous pixel coordinates (u, v, 1) of pixel centres."""
    v, u = torch.meshgrid(
        torch.arange(height, device=device, dtype=dtype), torch.arange(width, device=device, dtype=dtype), indexing="ij"
    )
    return torch.stack([u, v, torch.ones_like(u)], dim=-1)


def unproject_depth(depth: Tensor, K: Tensor, world_to_cam: Tensor) -> Tensor:
    """Lift depth maps to world points.

    Args:
        depth: (T, H, W) camera z.
        K: (T, 3, 3) intrinsics.
        world_to_cam: (T, 4, 4) or (T, 3, 4).

    Returns:
        (T, H, W, 3) world coordinates of every pixel (meaningless where depth <= 0).
    """
    T, H, W = depth.shape
    pix = pixel_grid(H, W, device=depth.device, dtype=depth.dtype).reshape(-1, 3)  # (HW, 3)
    rays = pix @ torch.linalg.inv(K.to(depth.dtype)).transpose(-1, -2)  # (T, HW, 3), z = 1
    cam = rays * depth.reshape(T, -1, 1)
    cam_to_world = invert_rigid(as_4x4(world_to_cam).to(depth.dtype))
    world = cam @ cam_to_world[:, :3, :3].transpose(-1, -2) + cam_to_world[:, None, :3, 3]
    return world.reshape(T, H, W, 3)


def project_points(points: Tensor, K: Tensor, world_to_cam: Tensor) -> tuple[Tensor, Tensor]:
    """Project world points into one camera.

    Args:
        points: (N, 3) world coordinates.
        K: (3, 3). world_to_cam: (4, 4) or (3, 4).

    Returns:
        uv (N, 2) pixel coordinates and z (N,) camera depth (z <= 0 is behind the camera).
    """
    m = as_4x4(world_to_cam).to(points.dtype)
    cam = points @ m[:3, :3].T + m[:3, 3]
    z = cam[:, 2]
    proj = cam @ K.to(points.dtype).T
    uv = proj[:, :2] / z.clamp(min=1e-12).unsqueeze(-1)
    return uv, z


def rescale_intrinsics(K: Tensor, from_size: tuple[int, int], to_size: tuple[int, int], pixel_centre: float = 0.5) -> Tensor:
    """K (..., 3, 3) of images of from_size (h, w) -> K of images of to_size (H, W), in our convention.

    pixel_centre: where the model puts the centre of pixel (0, 0) (0.5 for DA3 / VGGT / COLMAP,
    0.0 for our own convention). The result has pixel centres at integers.
    """
    (h, w), (H, W) = from_size, to_size
    sx, sy = W / w, H / h
    out = K.clone().double()
    out[..., 0, 0] = K[..., 0, 0] * sx
    out[..., 0, 1] = K[..., 0, 1] * sx
    out[..., 1, 1] = K[..., 1, 1] * sy
    out[..., 0, 2] = (K[..., 0, 2] - pixel_centre + 0.5) * sx - 0.5
    out[..., 1, 2] = (K[..., 1, 2] - pixel_centre + 0.5) * sy - 0.5
    return out


def rotation_angle(R: Tensor) -> Tensor:
    """(..., 3, 3) rotation matrices -> (...,) rotation angles in radians."""
    trace = R[..., 0, 0] + R[..., 1, 1] + R[..., 2, 2]
    return torch.arccos(((trace - 1) / 2).clamp(-1.0, 1.0))


def camera_motion(world_to_cam: Tensor, scale: float = 1.0) -> float:
    """Motion value of a camera path: mean translation + 0.1 * mean rotation angle (radians).

    Both means are over consecutive pairs of cameras. Translations are divided by `scale`
    (e.g. the scene's median depth) so the value does not depend on the reconstruction's units.
    """
    m = as_4x4(world_to_cam).double()
    if m.shape[0] < 2:
        return 0.0
    centers = camera_centers(m)
    translation = (centers[1:] - centers[:-1]).norm(dim=-1).mean() / scale
    relative = m[1:, :3, :3] @ m[:-1, :3, :3].transpose(-1, -2)
    rotation = rotation_angle(relative).mean()
    return float(translation + 0.1 * rotation)
