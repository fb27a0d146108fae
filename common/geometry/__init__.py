"""Geometry backends behind one interface (`GeometryBackend.reconstruct`), chosen by name."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Callable, Optional

from common.errors import ConfigError
from common.geometry.base import GeometryBackend, ReconstructionFailed, SceneGeometry

__all__ = ["GeometryBackend", "ReconstructionFailed", "SceneGeometry", "available_backends", "create_backend", "shared_backend"]


def _colmap_flow(weights: Optional[Path], **options) -> GeometryBackend:
    from common.geometry.colmap_flow import ColmapFlowBackend

    return ColmapFlowBackend(**options)


def _hybrid(weights: Optional[Path], **options) -> GeometryBackend:
    from common.geometry.hybrid import HybridBackend

    return HybridBackend(weights, **options)


def _da3(weights: Optional[Path], **options) -> GeometryBackend:
    from common.geometry.learned import DepthAnything3Backend

    return DepthAnything3Backend(weights, **options)


def _vggt(weights: Optional[Path], **options) -> GeometryBackend:
    from common.geometry.learned import VGGTBackend

    return VGGTBackend(weights, **options)


# name -> factory(weights path or None, **constructor options). Learned backends register here
# beside the default; their packages are imported only when one is created.
_FACTORIES: dict[str, Callable[..., GeometryBackend]] = {
    "colmap-flow": _colmap_flow,
    "hybrid": _hybrid,
    "da3": _da3,
    "vggt": _vggt,
}


def register_backend(name: str, factory: Callable[..., GeometryBackend]) -> None:
    _FACTORIES[name] = factory


def available_backends() -> list[str]:
    return sorted(_FACTORIES) + ["oracle"]


def create_backend(name: str, weights: Optional[Path] = None, **options) -> GeometryBackend:
    """Build the backend called `name`. The oracle needs ground truth and is passed in directly.

    `options` go to the backend's constructor (e.g. `process_res=504, device="cuda"` for da3); an
    option the backend does not take is a ConfigError.
    """
    if name == "oracle":
        raise ConfigError("the oracle backend takes ground-truth geometry: pass an OracleBackend instance to score_video")
    if name not in _FACTORIES:
        raise ConfigError(f"unknown geometry backend {name!r}; available: {', '.join(available_backends())}")
    try:
        return _FACTORIES[name](weights, **options)
    except TypeError as err:
        if not options:
            raise
        raise ConfigError(f"the {name} backend does not take these options {sorted(options)}: {err}") from None


_shared: dict[tuple, GeometryBackend] = {}
_shared_lock = threading.Lock()


def shared_backend(name: str, weights: Optional[Path] = None, **options) -> GeometryBackend:
    """The process's one backend for (name, weights, options), built on first use.

    Everything that builds models on demand uses it (`score_video`, the `Scorer` engine, the eval
    job's workers), so a process loads each model once, and a request with other weights or options
    gets its own backend. A backend that is not thread-safe comes wrapped so that one thread at a
    time reconstructs with it (pycolmap seeds one process-wide generator: the lock must be the
    process's too); decoding, rasterising and metrics of other threads still overlap it.
    """
    key = (name, str(weights), json.dumps(options, sort_keys=True, default=str))
    with _shared_lock:
        if key not in _shared:
            backend = create_backend(name, weights, **options)
            _shared[key] = backend if backend.thread_safe else _Serialized(backend)
        return _shared[key]


class _Serialized(GeometryBackend):
    """A backend that is not thread-safe, reconstructing for one thread at a time."""

    thread_safe = True

    def __init__(self, backend: GeometryBackend) -> None:
        self._backend, self._lock = backend, threading.Lock()
        self.name, self.revision = backend.name, backend.revision

    def cropped(self, borders: tuple[int, int, int, int]) -> GeometryBackend:
        inner = self._backend.cropped(borders)
        return self if inner is self._backend else _Serialized(inner)

    def reconstruct(self, frames, scored, video_indices) -> SceneGeometry:
        with self._lock:
            return self._backend.reconstruct(frames, scored, video_indices)
