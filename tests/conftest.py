"""Shared fixtures: one local Ray cluster per test session, the shared real data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.local_ray import set_local_ray_env, start_local_ray

# Before anything imports ray: the tests' Ray is local, on loopback only, with no token file.
set_local_ray_env()
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
        start_local_ray(8, object_store_memory=512 * 1024 * 1024, log_to_driver=False)
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()
