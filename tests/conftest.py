"""Shared fixtures: one local Ray cluster per test session, the shared real data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Ray 2.60 switches token auth on by default and writes a token under $HOME; tests run local only.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("VGPA_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data: licensed test data that stays out of the repository."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA} (set VGPA_SHARED_DATA to its folder)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_cluster():
    """One embedded Ray cluster for the whole session (Serve, Data and Train tests share it).

    Logical CPUs are oversubscribed on purpose: the machine has 2 cores, but Serve replicas,
    Ray Data actors and Ray Train workers each reserve a CPU token while mostly waiting.
    """
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(
            num_cpus=8,
            include_dashboard=False,
            object_store_memory=512 * 1024 * 1024,
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()
