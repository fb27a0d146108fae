"""Locations: a path, or a storage URI opened with pyarrow.fs (here file://, as s3:// and gs:// are opened the same way)."""

import pytest

from common import storage
from common.errors import InputNotFoundError


def test_uri_round_trip_through_node_local_copies(tmp_path):
    root = (tmp_path / "store").as_uri()
    assert storage.is_uri(root) and not storage.is_uri(str(tmp_path)) and not storage.is_uri(None)
    (tmp_path / "clip.bin").write_bytes(b"frames")
    where = storage.put_file(tmp_path / "clip.bin", storage.join(root, "uploads", "1", "clip.bin"))
    assert where == f"{root}/uploads/1/clip.bin" and storage.read_bytes(where) == b"frames"
    with storage.local_copy(where) as local:
        assert local != str(tmp_path / "clip.bin") and open(local, "rb").read() == b"frames"
    assert [name for name, _ in storage.entries(storage.join(root, "uploads"))] == ["1"]
    with storage.publishing(storage.join(root, "previews", "7")) as (folder, publish):
        path = f"{folder}/frame_00000.png"
        open(path, "wb").write(b"png")
        assert publish([path]) == [f"{root}/previews/7/frame_00000.png"]
    assert storage.read_bytes(f"{root}/previews/7/frame_00000.png") == b"png"
    storage.delete(storage.join(root, "uploads", "1"))
    assert storage.entries(storage.join(root, "uploads")) == []
    with pytest.raises(InputNotFoundError, match="missing.mp4"):
        with storage.local_copy(f"{root}/missing.mp4"):
            pass


def test_paths_are_used_in_place(tmp_path):
    with storage.local_copy(str(tmp_path / "a.mp4")) as local:
        assert local == str(tmp_path / "a.mp4")
    with storage.publishing(str(tmp_path)) as (folder, publish):
        assert folder == str(tmp_path) and publish(["x"]) == ["x"]
