"""Work split over threads: the same results, in the same order, for any number of workers."""

import threading
import time

import numpy as np
import pytest
import torch

from common.parallel import OnceCache, Prefetch, cpu_workers, ordered_map
from common.synthetic import render_video


def test_ordered_map_keeps_the_items_order_whichever_finishes_first():
    def slow_first(x: int) -> int:
        time.sleep(0.05 if x == 0 else 0.0)  # the first item finishes last
        return x * x

    assert list(ordered_map(slow_first, range(6), workers=2)) == [0, 1, 4, 9, 16, 25]
    assert list(ordered_map(slow_first, range(6), workers=1)) == [0, 1, 4, 9, 16, 25]
    assert list(ordered_map(slow_first, [], workers=2)) == []


def test_ordered_map_starts_only_a_few_items_ahead_of_the_caller():
    started: list[int] = []

    def note(x: int) -> int:
        started.append(x)
        return x

    results = ordered_map(note, range(100), workers=2)
    assert next(results) == 0
    time.sleep(0.05)  # the workers would have started every item by now if nothing held them back
    assert len(started) <= 4  # the taken one, the two workers' and one waiting
    assert list(results) == list(range(1, 100)) and sorted(started) == list(range(100))


def test_cpu_workers_follow_torch_threads_up_to_the_limit():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # what Ray sets in a replica that reserved one CPU
        assert cpu_workers() == 1
        torch.set_num_threads(4)
        assert cpu_workers() == 2 and cpu_workers(limit=3) == 3
    finally:
        torch.set_num_threads(threads)


def test_once_cache_computes_each_key_once_when_threads_ask_at_once():
    cache: OnceCache[int, int] = OnceCache()
    calls: list[int] = []

    def compute(key: int) -> int:
        calls.append(key)
        time.sleep(0.02)  # long enough for the other threads to ask meanwhile
        return 10 * key

    keys = [1, 2, 1, 1, 2, 3, 3, 1]
    assert list(ordered_map(lambda k: cache.get(k, lambda: compute(k)), keys, workers=4)) == [10 * k for k in keys]
    assert sorted(calls) == [1, 2, 3] and 3 in cache and 4 not in cache


def test_prefetch_runs_beside_the_caller_from_start_and_in_the_caller_otherwise():
    threads: list[str] = []

    def compute() -> int:
        threads.append(threading.current_thread().name)
        return 42

    beside = Prefetch(compute, background=True)
    time.sleep(0.02)
    assert threads == []  # nothing runs before start()
    beside.start()
    beside.start()  # once
    beside.join()
    assert threads == ["vgpa-prefetch"] and beside.get() == 42 and beside.get() == 42
    threads.clear()
    lazy = Prefetch(compute, background=False)
    lazy.start()  # one CPU: nothing starts beside the caller
    assert threads == []
    assert lazy.get() == 42 and threads == [threading.current_thread().name]
    lazy.join()  # nothing to wait for


def test_prefetch_raises_its_error_to_whoever_asks():
    def fail() -> int:
        raise ValueError("no flow to fit")

    for background in (True, False):
        prefetch = Prefetch(fail, background=background)
        prefetch.start()
        prefetch.join()
        with pytest.raises(ValueError, match="no flow to fit"):
            prefetch.get()


def test_turning_fit_beside_sfm_gives_the_same_geometry_as_after_it(monkeypatch):
    """A pan that SfM registers gets the turning alternative: fitted beside SfM (two workers) or
    after it (one), the same cameras, depths and masks of both interpretations."""
    import common.geometry.colmap_flow as colmap_flow

    frames = render_video("boxes", "pan", frames=16, size=(180, 240)).frames
    scored = list(range(0, 16, 2))
    geometries = []
    for workers in (1, 2):
        monkeypatch.setattr(colmap_flow, "cpu_workers", lambda limit=2, n=workers: n)
        geometries.append(colmap_flow.ColmapFlowBackend().reconstruct(frames, scored, list(range(16))))
    one, two = geometries
    assert one.alternative is not None and two.alternative is not None and one.alternative.turning
    for name in ("depth", "confidence", "moving", "world_to_cam", "K", "registered"):
        assert torch.equal(getattr(one, name), getattr(two, name)), name
        assert torch.equal(getattr(one.alternative, name), getattr(two.alternative, name)), name


def test_depth_stage_on_two_threads_gives_the_same_geometry_as_one(monkeypatch):
    """The scored frames' depths from their neighbours, two frames at a time, equal one by one."""
    import common.geometry.colmap_flow as colmap_flow

    frames = render_video("room", "truck", frames=12, size=(120, 160)).frames
    scored = [0, 3, 6, 9, 11]
    geometries = []
    for workers in (1, 2):
        monkeypatch.setattr(colmap_flow, "cpu_workers", lambda limit=2, n=workers: n)
        geometries.append(colmap_flow.ColmapFlowBackend().reconstruct(frames, scored, list(range(12))))
    one, two = geometries
    assert int(one.registered.sum()) >= 4 and float((one.depth > 0).float().mean()) > 0.2
    for name in ("depth", "confidence", "moving", "world_to_cam", "K", "registered"):
        assert torch.equal(getattr(one, name), getattr(two, name)), name


def _database(workspace) -> dict:
    """Every table of a workspace's COLMAP database that later steps read, as comparable values."""
    import pycolmap

    database = pycolmap.Database.open(workspace.database)
    try:
        images = database.read_all_images()
        tables = {
            "cameras": [(c.camera_id, str(c.model), c.width, c.height, tuple(c.params)) for c in database.read_all_cameras()],
            "images": [(i.image_id, i.name, i.camera_id, i.frame_id) for i in images],
            "rigs": [str(r) for r in database.read_all_rigs()],
            "frames": [str(f) for f in database.read_all_frames()],
        }
        for image in images:
            tables[f"keypoints {image.name}"] = np.asarray(database.read_keypoints(image.image_id)).tobytes()
            tables[f"descriptors {image.name}"] = np.asarray(database.read_descriptors(image.image_id).data).tobytes()
        pairs, geometries = database.read_two_view_geometries()
        tables["verified"] = [(pair, g.config, np.asarray(g.inlier_matches).tobytes()) for pair, g in zip(pairs, geometries)]
        return tables
    finally:
        database.close()


@pytest.mark.parametrize("settings", ["FAST", "SPARSE"])
def test_sift_split_over_two_threads_gives_the_same_database_as_one(settings, tmp_path, monkeypatch):
    """Features extracted on two threads (halves of the frames, each into its own database, then
    copied) equal one thread's: cameras, images, rigs and frames as COLMAP writes them, every
    keypoint and descriptor, and so the verified matches; with feature masks too."""
    import common.geometry.colmap_flow as colmap_flow

    frames = render_video("boxes", "orbit", frames=6, size=(120, 160)).frames
    masks = {2: np.zeros((120, 160), bool)}
    masks[2][:, :60] = True  # no features on the left of frame 2
    databases = []
    for workers in (1, 2):
        monkeypatch.setattr(colmap_flow, "cpu_workers", lambda limit=2, n=workers: n)
        workspace = colmap_flow._Workspace(tmp_path / str(workers), frames, getattr(colmap_flow, settings), range(6), masks)
        databases.append(_database(workspace))
    one, two = databases
    assert len(one["images"]) == 6 and len(one["cameras"]) == 1 and len(one["verified"]) > 0
    assert one == two
