"""`vgpa eval --ray`: the same per-video evaluation as `common.evaluation`, as Ray tasks over many videos.

Videos travel as paths (never as tensors through the object store); each worker process builds
the geometry backend and LPIPS once and reuses them for every video it gets. On a cluster, the
paths must be readable by every node (shared storage).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from common.config import ScoreConfig

def _evaluate_remote(name: str, path: str, config_json: str, label: str) -> dict:
    from common.evaluation import video_row
    from common.geometry import shared_backend
    from common.metrics import load_lpips

    config = ScoreConfig.model_validate_json(config_json)  # both built once per worker process, cached by the core
    return video_row(name, Path(path), config, shared_backend(config.backend, config.weights), load_lpips(config), label)


def evaluate_set_ray(
    videos: dict[str, Path], config: ScoreConfig, label: str = "A", cpus_per_video: float = 1.0,
    on_done: Optional[Callable[[dict], None]] = None,
) -> list[dict]:
    """Rows of `common.evaluation.video_row` for every video, computed by Ray tasks, in the input order."""
    import ray

    task = ray.remote(num_cpus=cpus_per_video, max_retries=1)(_evaluate_remote)
    config_json = config.model_dump_json(by_alias=True)
    refs = [task.remote(name, str(path), config_json, label) for name, path in videos.items()]
    order = {ref: i for i, ref in enumerate(refs)}
    rows: list[Optional[dict]] = [None] * len(refs)
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        row = ray.get(done[0])
        rows[order[done[0]]] = row
        if on_done:
            on_done(row)
    return rows  # type: ignore[return-value]
