"""Global SfM (GLOMAP in pycolmap 4) of one COLMAP workspace, here or in a child process.

COLMAP runs on one thread with fixed seeds (see `common.geometry.colmap_flow.FAST`), which leaves
the scorer's second core idle while it maps. A clip whose self-calibrated focal length comes out
too narrow is mapped a second time with the focal fixed (`_Workspace.cameras`); that mapping
depends on the database only, so it is started at the same time in a child process and its
result is waited for only when it is needed (on the bear clip: 2.1 s self-calibrating, 1.1 s
fixed, one after the other before). A child process and not a thread: two mappings in one
process share COLMAP's global state, and concurrent ones failed or gave different cameras.

This module imports nothing from the project, so the child (`python -P global_sfm.py ...`)
starts in about 0.2 s and maps exactly as the parent would: its model is the parent's, bit for bit.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pycolmap

pycolmap.logging.minloglevel = 2  # errors only: COLMAP's INFO lines would drown the CLI's output


def global_mapping(database: Path, images: Path, output: Path, refine_focal: bool) -> Optional[pycolmap.Reconstruction]:
    """Global SfM on one thread with fixed seeds, models written under `output`; the largest, or None."""
    output.mkdir()
    mapping = pycolmap.GlobalPipelineOptions()
    mapping.min_model_size = 3
    mapping.num_threads = 1
    mapping.random_seed = 0
    mapping.mapper.num_threads = 1
    mapping.mapper.random_seed = 0
    mapping.mapper.bundle_adjustment.refine_focal_length = refine_focal
    pycolmap.set_random_seed(0)
    models = pycolmap.global_mapping(database, images, output, mapping)
    return _largest(list(models.values()))


def _largest(models: list) -> Optional[pycolmap.Reconstruction]:
    # max() keeps the first of equals: models in COLMAP's order (folders 0, 1, ...) pick the same one.
    return max(models, key=lambda m: m.num_reg_images()) if models else None


class MappingInChild:
    """`global_mapping` started in a child process; `result()` waits for it, `cancel()` stops it.

    The child's models are read back from `output`. A child that fails (killed, out of memory)
    is mapped again here, so the answer never depends on whether the child worked.
    """

    def __init__(self, database: Path, images: Path, output: Path, refine_focal: bool) -> None:
        self._args = (database, images, output, refine_focal)
        self._log = output.with_suffix(".log")
        with open(self._log, "wb") as log:
            self._child = subprocess.Popen(
                [sys.executable, "-P", __file__, str(database), str(images), str(output), str(int(refine_focal))],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )

    def result(self) -> Optional[pycolmap.Reconstruction]:
        output = self._args[2]
        if self._child.wait() != 0:
            shutil.rmtree(output, ignore_errors=True)
            return global_mapping(*self._args)
        folders = sorted((p for p in output.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
        return _largest([pycolmap.Reconstruction(str(p)) for p in folders])

    def cancel(self) -> None:
        if self._child.poll() is None:
            self._child.kill()
        self._child.wait()


if __name__ == "__main__":
    database, images, output, refine = sys.argv[1:5]
    global_mapping(Path(database), Path(images), Path(output), refine == "1")
