"""A small ray-casting renderer of static textured scenes, with ground truth, for tests and demos.

Scenes are axis-aligned boxes (a room seen from inside, or boxes on a ground plane in front of a
wall) with procedural multi-scale textures, seen by a pinhole camera moving along a trajectory.
Every render returns the ground-truth depth, intrinsics and world-to-camera poses in the
convention of `common.camera`, so the scoring path can be checked without any reconstruction.

Geometric corruptions make videos with no valid 3D interpretation:
    - "warp": an independent smooth random image warp per frame (wobble);
    - "drift": one smooth warp whose strength grows over time (progressive drift);
    - "deform": one object grows over time, its texture stretching with it (non-rigid scene).
`corrupt_frames` applies the image-space ones to any frames (real footage too), in pixels:
    - "warp" A px: an independent smooth field per frame, each component within about +-A;
    - "drift" A px: one smooth field growing linearly from 0 to about A at the last frame;
    - "bulge" A px: a local radial swelling around one point growing to A px (a deforming region).

Scenes may hold moving objects (`movers=`): rigid boxes that slide across the scene while the
camera moves, like the animals, people and vehicles of real generated videos. The "slow"
trajectory is a generated-style camera: a slow, slightly curved pan-and-push over the clip; "pan"
turns the camera in place (a tripod pan: no parallax at all).

World frame: y points down (like the image rows), so "up" is -y; the ground is at y = +1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal, Optional

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from common.camera import intrinsics_from_fov, look_at

SceneKind = Literal["boxes", "room"]
Trajectory = Literal["orbit", "dolly", "truck", "slow", "pan", "static"]
Corruption = Literal["warp", "drift", "deform"]
ImageCorruption = Literal["warp", "drift", "bulge"]

_TEXTURE_SIZE = 384
_TEXTURE_PERIOD = 12.0  # world units per texture repeat: no repeats in view


@dataclass
class Box:
    lo: tuple[float, float, float]
    hi: tuple[float, float, float]
    inside: bool = False  # seen from inside (the room's walls)
    rest_size: Optional[tuple[float, float, float]] = None  # texture is pinned to the box at this size

    def texture_coords(self, point: Tensor) -> Tensor:
        """(P, 3) world points on the box -> (P, 3) texture-space coordinates that move and stretch with it."""
        lo, hi = torch.tensor(self.lo, dtype=torch.float64), torch.tensor(self.hi, dtype=torch.float64)
        rest = torch.tensor(self.rest_size, dtype=torch.float64) if self.rest_size else hi - lo
        return (point - lo) / (hi - lo) * rest


@dataclass
class Scene:
    boxes: list[Box]
    target: tuple[float, float, float]  # where the cameras look
    eye: tuple[float, float, float]  # the camera's start position
    textures: Tensor = field(repr=False, default=None)  # (boxes, 6 faces, S, S, 3) float in [0, 1]


@dataclass
class RenderedVideo:
    frames: Tensor  # (N, H, W, 3) uint8 RGB
    depth: Tensor  # (N, H, W) float32 camera z; 0 where a ray hits nothing
    K: Tensor  # (N, 3, 3) float64
    world_to_cam: Tensor  # (N, 4, 4) float64


def make_texture(generator: torch.Generator, size: int = _TEXTURE_SIZE) -> Tensor:
    """(S, S, 3) in [0, 1]: value noise over several octaves plus sharp blobs (corners for SIFT)."""
    image = torch.zeros(3, size, size)
    for octave, cells in enumerate((4, 8, 16, 32)):
        grid = torch.rand(1, 3, cells, cells, generator=generator)
        image += F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False)[0] * 0.6**octave
    image = (image - image.amin()) / (image.amax() - image.amin() + 1e-6)
    canvas = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
    blobs = 24 * (size // 128) ** 2
    centres = torch.randint(0, size, (blobs, 2), generator=generator).tolist()
    radii = torch.randint(2, 7, (blobs,), generator=generator).tolist()
    colours = torch.rand(blobs, 3, generator=generator).tolist()
    for (cy, cx), radius, colour in zip(centres, radii, colours):
        cv2.circle(canvas, (cx, cy), radius, colour, thickness=-1, lineType=cv2.LINE_8)
    return torch.from_numpy(canvas).clamp(0, 1)


def make_scene(kind: SceneKind = "boxes", seed: int = 0) -> Scene:
    """A static scene of textured boxes; `seed` places the objects and draws the textures."""
    generator = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: lo + (hi - lo) * float(torch.rand(1, generator=generator))  # noqa: E731
    if kind == "boxes":
        boxes = [Box((-8, 1, -8), (8, 1.5, 10)), Box((-8, -5, 6), (8, 1, 6.5))]  # ground, back wall
        for x in (-1.6, 0.0, 1.6):
            w, h, d = rand(0.5, 0.9), rand(0.5, 1.4), rand(0.5, 0.9)
            z = rand(1.0, 3.0)
            boxes.append(Box((x - w / 2, 1 - h, z - d / 2), (x + w / 2, 1, z + d / 2)))
        scene = Scene(boxes, target=(0.0, 0.2, 2.0), eye=(0.0, -0.6, -3.0))
    elif kind == "room":
        boxes = [Box((-4, -2.0, -5), (4, 1, 6), inside=True)]
        for x in (-1.8, 0.3, 2.0):
            w, h, d = rand(0.6, 1.0), rand(0.5, 1.6), rand(0.6, 1.0)
            z = rand(1.5, 3.5)
            boxes.append(Box((x - w / 2, 1 - h, z - d / 2), (x + w / 2, 1, z + d / 2)))
        scene = Scene(boxes, target=(0.0, 0.0, 3.0), eye=(0.0, -0.4, -2.5))
    else:
        raise ValueError(f"unknown scene kind {kind!r} (boxes, room)")
    scene.textures = _textures(len(scene.boxes), seed)
    return scene


@lru_cache(maxsize=8)
def _textures(boxes: int, seed: int) -> Tensor:
    """(boxes, 6, S, S, 3): the same scene seed always gets the same textures, made once per process."""
    generator = torch.Generator().manual_seed(1_000 + seed)
    return torch.stack([torch.stack([make_texture(generator) for _ in range(6)]) for _ in range(boxes)])


def camera_path(scene: Scene, trajectory: Trajectory, frames: int, amount: float = 1.0) -> Tensor:
    """(N, 4, 4) world-to-camera poses along a trajectory; `amount` scales how far the camera goes."""
    eye0, target = torch.tensor(scene.eye, dtype=torch.float64), torch.tensor(scene.target, dtype=torch.float64)
    poses = []
    for i in range(frames):
        s = (i / max(frames - 1, 1) - 0.5) * amount  # -0.5 .. 0.5
        if trajectory == "orbit":  # swing around the target, 30 degrees in all
            angle = math.radians(30.0) * s
            offset = eye0 - target
            rotated = torch.tensor(
                [offset[0] * math.cos(angle) + offset[2] * math.sin(angle), offset[1],
                 -offset[0] * math.sin(angle) + offset[2] * math.cos(angle)], dtype=torch.float64
            )
            poses.append(look_at(target + rotated, target))
        elif trajectory == "dolly":  # move toward the target
            direction = (target - eye0) / (target - eye0).norm()
            poses.append(look_at(eye0 + direction * (s + 0.5) * 1.5, target))
        elif trajectory == "truck":  # slide sideways, looking straight ahead
            shift = torch.tensor([1.6 * s, 0.0, 0.0], dtype=torch.float64)
            poses.append(look_at(eye0 + shift, target + shift))
        elif trajectory == "slow":  # generated-style: a slow push-in with a gentle sideways arc
            direction = (target - eye0) / (target - eye0).norm()
            side = torch.tensor([0.45 * s, 0.04 * math.sin(math.pi * (s + 0.5)), 0.0], dtype=torch.float64)
            eye = eye0 + direction * (s + 0.5) * 0.5 + side
            poses.append(look_at(eye, target + side * 0.5))
        elif trajectory == "pan":  # a tripod pan: the camera turns 16 degrees in place, tilting a little
            yaw, tilt = math.radians(16.0) * s, math.radians(2.0) * math.sin(math.pi * s)
            forward = target - eye0
            turned = torch.tensor(
                [forward[0] * math.cos(yaw) + forward[2] * math.sin(yaw), forward[1] + tilt * forward.norm(),
                 -forward[0] * math.sin(yaw) + forward[2] * math.cos(yaw)], dtype=torch.float64
            )
            poses.append(look_at(eye0, eye0 + turned))
        elif trajectory == "static":
            poses.append(look_at(eye0, target))
        else:
            raise ValueError(f"unknown trajectory {trajectory!r} (orbit, dolly, truck, slow, pan, static)")
    return torch.stack(poses)


def render(scene: Scene, world_to_cam: Tensor, K: Tensor, height: int, width: int,
           boxes_per_frame: Optional[list[list[Box]]] = None) -> RenderedVideo:
    """Ray-cast every frame. boxes_per_frame, when given, replaces the scene's boxes frame by frame."""
    from common.camera import invert_rigid, pixel_grid

    frames, depths = [], []
    rays_cam = pixel_grid(height, width, dtype=torch.float64).reshape(-1, 3) @ torch.linalg.inv(K).T  # z = 1
    for i, w2c in enumerate(world_to_cam):
        c2w = invert_rigid(w2c)
        origin = c2w[:3, 3]
        directions = rays_cam @ c2w[:3, :3].T  # camera z = 1, so the hit parameter t is the depth
        boxes = boxes_per_frame[i] if boxes_per_frame is not None else scene.boxes
        colour, depth = _cast(origin, directions, boxes, scene.textures)
        frames.append((colour.reshape(height, width, 3) * 255 + 0.5).clamp(0, 255).to(torch.uint8))
        depths.append(depth.reshape(height, width).float())
    n = len(world_to_cam)
    return RenderedVideo(torch.stack(frames), torch.stack(depths), K.expand(n, 3, 3).clone(), world_to_cam.clone())


_FACE_SHADE = torch.tensor([0.85, 1.0, 0.7])  # per axis (x, y, z): faces of a box look different


def _cast(origin: Tensor, directions: Tensor, boxes: list[Box], textures: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest hit of P rays against the boxes -> colour (P, 3) in [0,1], depth (P,) (0 = miss)."""
    P = directions.shape[0]
    best_t = torch.full((P,), math.inf, dtype=torch.float64)
    best_colour = torch.zeros(P, 3, dtype=torch.float64)
    safe = torch.where(directions.abs() < 1e-12, torch.full_like(directions, 1e-12), directions)
    for b, box in enumerate(boxes):
        lo, hi = torch.tensor(box.lo, dtype=torch.float64), torch.tensor(box.hi, dtype=torch.float64)
        t1, t2 = (lo - origin) / safe, (hi - origin) / safe
        t_enter, t_exit = torch.minimum(t1, t2), torch.maximum(t1, t2)
        if box.inside:
            t, axis = t_exit.min(dim=1)
            hit = t > 1e-6
        else:
            t, axis = t_enter.max(dim=1)
            hit = (t > 1e-6) & (t <= t_exit.min(dim=1).values)
        closer = hit & (t < best_t)
        if not closer.any():
            continue
        idx = closer.nonzero().squeeze(1)
        point = origin + t[idx, None] * directions[idx]
        ax = axis[idx]
        # Face index: axis * 2 + (1 if the hit is on the box's high side).
        on_high = (point.gather(1, ax[:, None]).squeeze(1) - hi[ax]).abs() < (point.gather(1, ax[:, None]).squeeze(1) - lo[ax]).abs()
        face = ax * 2 + on_high.long()
        # Texture coordinates: the two coordinates along the face.
        other = torch.tensor([[1, 2], [0, 2], [0, 1]])[ax]
        uv = box.texture_coords(point).gather(1, other) / _TEXTURE_PERIOD
        colour = _sample_texture(textures[b], face, uv) * _FACE_SHADE.double()[ax, None]
        best_t[idx] = t[idx]
        best_colour[idx] = colour
    depth = torch.where(torch.isfinite(best_t), best_t, torch.zeros_like(best_t))
    return best_colour, depth


def _sample_texture(faces: Tensor, face: Tensor, uv: Tensor) -> Tensor:
    """Bilinear, wrapping lookup: faces (6, S, S, 3), face (P,), uv (P, 2) in texture periods."""
    size = faces.shape[1]
    xy = (uv - torch.floor(uv)) * size - 0.5
    x0, y0 = torch.floor(xy[:, 0]), torch.floor(xy[:, 1])
    fx, fy = (xy[:, 0] - x0)[:, None], (xy[:, 1] - y0)[:, None]
    x0, y0 = x0.long() % size, y0.long() % size
    x1, y1 = (x0 + 1) % size, (y0 + 1) % size
    texels = faces.double()
    pick = lambda y, x: texels[face, y, x]  # noqa: E731
    return (pick(y0, x0) * (1 - fx) * (1 - fy) + pick(y0, x1) * fx * (1 - fy)
            + pick(y1, x0) * (1 - fx) * fy + pick(y1, x1) * fx * fy)


def smooth_field(generator: torch.Generator, height: int, width: int, amplitude_px: float, cells: int = 3) -> Tensor:
    """(H, W, 2) smooth random displacement in pixels, each component within about +-amplitude."""
    grid = (torch.rand(1, 2, cells, cells + 1, generator=generator) * 2 - 1) * amplitude_px
    return F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=True)[0].permute(1, 2, 0)


def warp_frames(frames: Tensor, fields: list[Tensor]) -> Tensor:
    """Resample each uint8 frame (N, H, W, 3) by its displacement field (H, W, 2) in pixels."""
    n, height, width, _ = frames.shape
    v, u = np.mgrid[0:height, 0:width].astype(np.float32)
    out = []
    for image, flow in zip(frames.numpy(), fields):
        flow = flow.numpy().astype(np.float32)
        out.append(cv2.remap(image, u + flow[..., 0], v + flow[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT))
    return torch.from_numpy(np.stack(out))


def false_colour(frames: Tensor) -> Tensor:
    """(N, H, W, 3) uint8 RGB frames as another scene would look: their grey levels through a false-colour
    map (OpenCV's JET). The renderer's scenes share one palette, so a cut from one to another barely
    moves the colours; this one is a cut to a scene of other hues, as between two real shots."""
    grey = [cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in frames.numpy()]
    return torch.from_numpy(np.stack([cv2.cvtColor(cv2.applyColorMap(g, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB) for g in grey]))


def cross_fade(frames: Tensor, other: Tensor, start: float = 0.7) -> Tensor:
    """(N, H, W, 3) uint8 `frames` whose last 1 - `start` fade linearly into `other`'s frames of the same
    index (resized to `frames`' size; repeated from its start where it is shorter): a clip that morphs
    into another scene, the way a generated clip can drift away from its first frames. No cut: every
    frame is near its neighbours."""
    n, height, width, _ = frames.shape
    other = F.interpolate(other.permute(0, 3, 1, 2).float(), size=(height, width), mode="bilinear", align_corners=False)
    other = other.permute(0, 2, 3, 1)[torch.arange(n) % len(other)]
    first = int(start * n)
    weight = torch.zeros(n)
    weight[first:] = torch.linspace(0, 1, n - first)
    weight = weight.view(n, 1, 1, 1)
    return (frames.float() * (1 - weight) + other * weight).round().clamp(0, 255).to(torch.uint8)


def with_caption(frames: Tensor, text: str = "VidGen AI", scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """(N, H, W, 3) uint8 `frames` with a caption fixed to the screen near the bottom-right corner (a
    watermark, a logo: white letters outlined in dark grey, `scale` times 1/720 of the frame width
    per pixel of OpenCV's font), and its (H, W) bool pixels."""
    height, width = frames.shape[1:3]
    size = scale * width / 720
    corner = (int(width * 0.62), int(height * 0.92))
    outline, stroke = max(2, round(5 * size)), max(1, round(2 * size))
    letters = np.zeros((height, width, 3), np.uint8)
    cv2.putText(letters, text, corner, cv2.FONT_HERSHEY_DUPLEX, size, (40, 40, 40), outline, cv2.LINE_AA)
    cv2.putText(letters, text, corner, cv2.FONT_HERSHEY_DUPLEX, size, (255, 255, 255), stroke, cv2.LINE_AA)
    cover = np.zeros((height, width), np.uint8)
    cv2.putText(cover, text, corner, cv2.FONT_HERSHEY_DUPLEX, size, 255, outline, cv2.LINE_AA)
    alpha = cover[..., None] / 255.0
    captioned = (frames.numpy() * (1 - alpha) + letters * alpha).round().astype(np.uint8)
    return torch.from_numpy(captioned), torch.from_numpy(cover > 0)


def corrupt_frames(
    frames: Tensor, kind: ImageCorruption, seed: int = 0, strength: float = 0.03, amplitude_px: Optional[float] = None
) -> Tensor:
    """Image-space corruptions of uint8 frames (N, H, W, 3).

    amplitude_px: displacement in pixels (see the module docstring); default strength * width.
    """
    n, height, width, _ = frames.shape
    generator = torch.Generator().manual_seed(10_000 + seed)
    amplitude = amplitude_px if amplitude_px is not None else strength * width
    growth = [i / max(n - 1, 1) for i in range(n)]
    if kind == "warp":
        fields = [smooth_field(generator, height, width, amplitude) for _ in range(n)]
    elif kind == "drift":
        base = smooth_field(generator, height, width, amplitude)
        fields = [base * g for g in growth]
    elif kind == "bulge":
        base = bulge_field(generator, height, width, amplitude)
        fields = [base * g for g in growth]
    else:
        raise ValueError(f"unknown corruption {kind!r} (warp, drift, bulge)")
    return warp_frames(frames, fields)


def bulge_field(generator: torch.Generator, height: int, width: int, amplitude_px: float) -> Tensor:
    """(H, W, 2) sampling offsets that swell a disc (radius a quarter of the short side) by up to amplitude px."""
    cy = height * (0.3 + 0.4 * float(torch.rand(1, generator=generator)))
    cx = width * (0.3 + 0.4 * float(torch.rand(1, generator=generator)))
    radius = 0.25 * min(height, width)
    v, u = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij")
    du, dv = u - cx, v - cy
    r = torch.sqrt(du * du + dv * dv).clamp_min(1e-6)
    # Sampling closer to the centre magnifies: displacement toward the centre, peaking mid-radius.
    strength = amplitude_px * torch.sin(math.pi * (r / radius).clamp(max=1.0))
    return torch.stack([-du / r * strength, -dv / r * strength], dim=-1)


def render_video(
    scene: SceneKind | Scene = "boxes",
    trajectory: Trajectory = "orbit",
    frames: int = 24,
    size: tuple[int, int] = (180, 240),
    corruption: Optional[Corruption] = None,
    seed: int = 0,
    fov_deg: float = 60.0,
    strength: float = 0.03,
    movers: int = 0,
) -> RenderedVideo:
    """Render a scene along a trajectory, optionally corrupted. Ground truth is that of the clean scene.

    movers: how many rigid boxes slide across the scene during the clip (moving subjects); the
    ground-truth depth includes them, so only a scorer that leaves them out sees a rigid scene.
    """
    scene = make_scene(scene, seed) if isinstance(scene, str) else scene
    height, width = size
    poses = camera_path(scene, trajectory, frames)
    K = intrinsics_from_fov(height, width, fov_deg)
    boxes_per_frame = None
    if movers:  # textures of their own (the scene's boxes keep theirs: same generator, drawn first)
        scene.textures = _textures(len(scene.boxes) + movers, seed)
        boxes_per_frame = _moving_boxes(scene, frames, movers, seed)
    if corruption == "deform":  # the middle object grows 2.5x in height and width, texture stretching
        boxes_per_frame = []
        target = scene.boxes[-2]
        for i in range(frames):
            grow = 1.0 + 1.5 * i / max(frames - 1, 1)
            lo, hi = np.array(target.lo), np.array(target.hi)
            centre = (lo + hi) / 2
            half = (hi - lo) / 2 * np.array([grow, grow, 1.0])
            new = Box(tuple(np.r_[centre[:1] - half[:1], hi[1] - 2 * half[1], lo[2]]),
                      tuple(np.r_[centre[:1] + half[:1], hi[1], hi[2]]), rest_size=tuple(hi - lo))
            boxes_per_frame.append([b if b is not target else new for b in scene.boxes])
        if movers:
            boxes_per_frame = [fixed + moving[len(scene.boxes):] for fixed, moving in zip(boxes_per_frame, _moving_boxes(scene, frames, movers, seed))]
    video = render(scene, poses, K, height, width, boxes_per_frame)
    if corruption in ("warp", "drift"):
        video.frames = corrupt_frames(video.frames, corruption, seed=seed, strength=strength)
    return video


def _moving_boxes(scene: Scene, frames: int, movers: int, seed: int) -> list[list[Box]]:
    """Per frame: the scene's boxes plus `movers` textured boxes hopping diagonally across the scene.

    They cross the view, come nearer or go farther, and hop. (A thing moving exactly along the
    camera's epipolar lines looks like a static one at another depth: no two-view test can tell.)
    """
    generator = torch.Generator().manual_seed(500 + seed)
    rand = lambda lo, hi: lo + (hi - lo) * float(torch.rand(1, generator=generator))  # noqa: E731
    paths = []
    for m in range(movers):
        size, z, start = rand(0.35, 0.65), rand(1.2, 2.0) + 0.8 * m, rand(-1.4, -0.8)
        sign = 1 if m % 2 == 0 else -1
        paths.append((size, z, sign * start, sign * rand(1.0, 1.8), rand(-1.2, 1.2)))
    per_frame = []
    for i in range(frames):
        s = i / max(frames - 1, 1)
        moving = []
        for size, z, start, speed_x, speed_z in paths:
            x, zz = start + speed_x * s, z + speed_z * s
            lift = 0.5 * abs(math.sin(2 * math.pi * s))  # world y points down: the box leaves the ground
            # rest_size: half the texture on the box, so that it shows texture, not a flat colour
            moving.append(Box((x - size / 2, 1 - 1.6 * size - lift, zz - size / 2), (x + size / 2, 1 - lift, zz + size / 2),
                              rest_size=(_TEXTURE_PERIOD / 2,) * 3))
        per_frame.append(list(scene.boxes) + moving)
    return per_frame


def render_demo_video(path: str | Path, corrupted: bool = False, frames: int = 24,
                      size: tuple[int, int] = (240, 320)) -> Path:
    """Write the demo scene (boxes, orbiting camera) as an H.264 mp4; corrupted=True adds per-frame warps."""
    from common.video import write_video

    video = render_video("boxes", "orbit", frames=frames, size=size, corruption="warp" if corrupted else None)
    return write_video(path, video.frames, fps=8)
