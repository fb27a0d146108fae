"""Geometry backends behind one interface (`GeometryBackend.reconstruct`), chosen by name."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from common.errors import ConfigError
from common.geometry.base import GeometryBackend, ReconstructionFailed, SceneGeometry

__all__ = ["GeometryBackend", "ReconstructionFailed", "SceneGeometry", "available_backends", "create_backend"]


def _colmap_flow(weights: Optional[Path]) -> GeometryBackend:
    from common.geometry.colmap_flow import ColmapFlowBackend

    return ColmapFlowBackend()


def _hybrid(weights: Optional[Path]) -> GeometryBackend:
    from common.geometry.hybrid import HybridBackend

    return HybridBackend(weights)


def _da3(weights: Optional[Path]) -> GeometryBackend:
    from common.geometry.learned import DepthAnything3Backend

    return DepthAnything3Backend(weights)


def _vggt(weights: Optional[Path]) -> GeometryBackend:
    from common.geometry.learned import VGGTBackend

    return VGGTBackend(weights)


# name -> factory(weights path or None). Learned backends register here beside the default;
# their packages are imported only when one is created.
_FACTORIES: dict[str, Callable[[Optional[Path]], GeometryBackend]] = {
    "colmap-flow": _colmap_flow,
    "hybrid": _hybrid,
    "da3": _da3,
    "vggt": _vggt,
}


def register_backend(name: str, factory: Callable[[Optional[Path]], GeometryBackend]) -> None:
    _FACTORIES[name] = factory


def available_backends() -> list[str]:
    return sorted(_FACTORIES) + ["oracle"]


def create_backend(name: str, weights: Optional[Path] = None) -> GeometryBackend:
    """Build the backend called `name`. The oracle needs ground truth and is passed in directly."""
    if name == "oracle":
        raise ConfigError("the oracle backend takes ground-truth geometry: pass an OracleBackend instance to score_video")
    if name not in _FACTORIES:
        raise ConfigError(f"unknown geometry backend {name!r}; available: {', '.join(available_backends())}")
    return _FACTORIES[name](weights)
