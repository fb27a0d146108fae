"""Geometry backends behind one interface (`GeometryBackend.reconstruct`), chosen by name."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from common.errors import ConfigError
from common.geometry.base import GeometryBackend, ReconstructionFailed, SceneGeometry

__all__ = ["GeometryBackend", "ReconstructionFailed", "SceneGeometry", "available_backends", "create_backend"]


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
