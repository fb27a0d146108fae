"""A cluster without a shared folder: `work_dir` as a storage URI (file:// here; s3:// and gs:// open the same way).

Two Ray workers with different temp folders stand for two nodes: the one that receives a video
copies it to the URI, the one that scores it reads it from there and writes its previews back; no
path of one is ever read by the other. Then the whole app over HTTP with `work_dir` a URI.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray.serve")

from common import storage  # noqa: E402
from tests.services.conftest import deployed, make_video  # noqa: E402

SCORE = {"frames": 4, "recon_frames": 8, "max_side": 128}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("vgpa-"))


def test_two_nodes_share_only_the_storage_uri(ray_cluster, tmp_path):
    ray = ray_cluster
    root = (tmp_path / "store").as_uri()
    node_a, node_b = tmp_path / "node-a", tmp_path / "node-b"
    node_a.mkdir(), node_b.mkdir()
    video = make_video(tmp_path / "clip.mp4", frames=12, size=(96, 128)).read_bytes()

    @ray.remote
    def receive(data: bytes) -> tuple[str, str]:
        """Node A: the upload lands in its own temp folder, is copied to the URI, and the local file goes."""
        import tempfile

        local = Path(tempfile.gettempdir()) / "upload-000.mp4"
        local.write_bytes(data)
        where = storage.put_file(local, storage.join(root, "uploads", "0" * 32, local.name))
        local.unlink()
        return where, str(local)

    @ray.remote
    def score(where: str) -> tuple[dict, str]:
        """Node B: the scorer engine reads the URI into its own temp folder and publishes its previews."""
        import tempfile

        from common.config import ScoreConfig
        from common.scorer import Scorer, ScorerConfig

        answer = Scorer(ScorerConfig(score=ScoreConfig(**SCORE))).score(where, preview_dir=storage.join(root, "previews", "1" * 32))
        return answer.to_json_dict(), tempfile.gettempdir()

    where, local_a = ray.get(receive.options(runtime_env={"env_vars": {"TMPDIR": str(node_a)}}).remote(video))
    assert where.startswith(root) and Path(local_a).parent == node_a and not Path(local_a).exists()
    result, temp_b = ray.get(score.options(runtime_env={"env_vars": {"TMPDIR": str(node_b)}}).remote(where))
    assert temp_b == str(node_b) and "error" not in result, result
    assert result["previews"] and all(p.startswith(f"{root}/previews/{'1' * 32}/") for p in result["previews"])
    assert storage.read_bytes(result["previews"][0])[:4] == b"\x89PNG"
    assert _leftovers(node_a) == [] and _leftovers(node_b) == []  # the node-local copies are gone
    missing = ray.get(score.remote(storage.join(root, "uploads", "nothing.mp4")))[0]
    assert missing["error"]["status"] == 404 and "nothing.mp4" in missing["error"]["message"]


def test_the_app_with_a_storage_uri_as_work_dir(ray_cluster, serve_url, tmp_path):
    root = (tmp_path / "store").as_uri()
    video = make_video(tmp_path / "clip.mp4", frames=12, size=(96, 128))
    args = {"work_dir": root, "auth_token_env": None,
            "scorer": {"score": SCORE, "num_replicas": 1, "warmup": False}}
    with deployed(args, "vgpa-test-storage", serve_url) as url:
        with open(video, "rb") as f:
            r = httpx.post(f"{url}/score", files={"video": ("clip.mp4", f)}, data={"preview": "true"}, timeout=300)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["previews"] and all(p.startswith("/previews/") for p in body["previews"])
        png = httpx.get(f"{url}{body['previews'][0]}", timeout=60)
        assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
        assert httpx.get(f"{url}/previews/{'f' * 32}/frame_00000.png").status_code == 404
    request_id = body["previews"][0].split("/")[2]
    assert [name for name, _ in storage.entries(storage.join(root, "previews"))] == [request_id]
    assert storage.entries(storage.join(root, "uploads")) == []  # each upload removed after its request
