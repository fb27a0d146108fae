"""The real Serve app (ingress + scorer) on loopback: good and bad inputs, the hostile-input corpus,
bounded numbers, slow clients, previews, batch, client, web page in headless chromium, a bounded
load test and a replica fault test. One deployment."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray.serve")
pytest.importorskip("common.scoring")

from tests.services.conftest import deployed  # noqa: E402
from tests.services.hostile import corpus  # noqa: E402

pytestmark = pytest.mark.ray

APP = "vgpa-test-score"
FRAMES = 4
REPLICA_BEFORE_BAD_INPUT: dict = {}
BODY_SLOTS = 4  # the slow-loris setting: ingress_max_ongoing_requests 4
UPLOAD_TIMEOUT_S = 6.0
UPLOAD_IDLE_TIMEOUT_S = 3.0
#: The issue's corpus, scaled to this app's 2 MB upload cap (zip bomb members of 512 MiB, not 3 GB).
HOSTILE = {case.name: case for case in corpus(zip_bomb_bytes=512 << 20)}


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("service-work")


@pytest.fixture(scope="module")
def hostile_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("hostile")
    return {name: case.build(folder) for name, case in HOSTILE.items()}


@pytest.fixture(scope="module")
def url(serve_url, work_dir):
    args = {
        "work_dir": str(work_dir),
        "max_upload_mb": 2,
        "retry_after_s": 1,
        "auth_token_env": None,
        "ingress_max_ongoing_requests": BODY_SLOTS,
        "upload_timeout_s": UPLOAD_TIMEOUT_S,
        "upload_idle_timeout_s": UPLOAD_IDLE_TIMEOUT_S,
        "scorer": {
            "score": {"frames": FRAMES, "max_side": 240, "recon_frames": 8},
            "num_replicas": 1,
            "max_ongoing_requests": 1,
            "max_queued_requests": 4,
            "max_request_frames": 8,
            "health_check_period_s": 2,
        },
    }
    with deployed(args, APP, serve_url) as u:
        yield u


def post_score(url: str, path: Path, timeout: float = 300, **fields) -> httpx.Response:
    with open(path, "rb") as f:
        return httpx.post(f"{url}/score", files={"video": (path.name, f)}, data={k: str(v) for k, v in fields.items()},
                          timeout=timeout)


def assert_error(r: httpx.Response, *statuses: int) -> dict:
    """The documented error shape, and no server path in it."""
    assert r.status_code in statuses, (r.status_code, r.text)
    body = r.json()
    assert body["error"]["status"] == r.status_code
    assert isinstance(body["detail"], str) and body["detail"]
    assert body["error"]["message"] == body["detail"]
    for server_path in ("/tmp/", "/work/", "/root/", "upload-0", "Traceback"):
        assert server_path not in r.text, r.text
    return body


class TestProbesAndSchema:
    def test_healthz(self, url):
        assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}

    def test_readyz_reports_loaded_scorer(self, url):
        body = httpx.get(f"{url}/readyz").json()
        assert body["ready"] is True and body["scorer"]["ready"] is True and body["sampler"] is None
        assert body["scorer"]["replicas"] == 1
        assert "pid" not in str(body), "no process ids for anonymous callers"

    @pytest.mark.parametrize("method,path,status", [("GET", "/no/such/route", 404), ("DELETE", "/score", 405)])
    def test_starlette_errors_keep_the_json_shape(self, url, method, path, status):
        assert_error(httpx.request(method, f"{url}{path}"), status)

    def test_shared_cluster_listens_on_loopback_only(self, url):
        """The tests' own Ray (GCS, raylet, workers, agents, Serve proxy and replicas) is on loopback."""
        from services.local_ray import exposed_listeners, listening_sockets

        listeners = listening_sockets()
        assert any(s.process.startswith("ray::ServeReplica") for s in listeners), listeners
        assert exposed_listeners(listeners) == [], listeners

    def test_openapi_lists_routes_and_form(self, url):
        spec = httpx.get(f"{url}/openapi.json").json()
        assert {"/score", "/score/batch", "/healthz", "/readyz", "/sample"} <= set(spec["paths"])
        form = spec["paths"]["/score"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert {"video", "frames", "backend", "max_side", "lambda", "preview"} <= set(form["properties"])
        assert httpx.get(f"{url}/docs").status_code == 200

    def test_sample_without_sampler_is_404(self, url):
        assert_error(httpx.post(f"{url}/sample", json={"prompt": "a cube"}), 404)


class TestScoring:
    def test_good_video(self, url, videos):
        r = post_score(url, videos["good"])
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "ok" and isinstance(body["score"], float)
        assert body["frames"] == FRAMES and len(body["per_frame"]) == FRAMES
        assert body["previews"] == []

    def test_same_result_as_in_process(self, url, videos):
        from common.config import ScoreConfig
        from common.scoring import score_video

        local = score_video(videos["good"], ScoreConfig(frames=FRAMES, max_side=240, recon_frames=8)).to_json_dict()
        remote = post_score(url, videos["good"]).json()
        for key in ("status", "frame_indices", "metric_id", "size", "backend", "perceptual_metric", "frames",
                    "registered_frames"):
            assert remote[key] == local[key], key
        assert set(remote) == set(local), "the same JSON object as vgpa score --json"
        # The same reconstruction (COLMAP on one thread, fixed seeds); the replica's thread count
        # may differ from this process's, which moves float sums in the last digits only.
        assert remote["score"] == pytest.approx(local["score"], rel=1e-3)

    def test_form_overrides(self, url, videos):
        body = post_score(url, videos["good"], frames=3, max_side=160, **{"lambda": 0.5}).json()
        assert body["frames"] == 3 and body["lambda"] == 0.5 and max(body["size"]) <= 160

    def test_previews_are_urls_that_serve_png(self, url, videos):
        body = post_score(url, videos["good"], preview="true").json()
        assert body["previews"], "previews requested"
        for p in body["previews"]:
            assert p.startswith("/previews/") and p.endswith(".png")
            r = httpx.get(f"{url}{p}")
            assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"

    def test_zip_of_frames(self, url, videos):
        r = post_score(url, videos["zip"])
        assert r.status_code == 200, r.text
        assert r.json()["status"] in ("ok", "unscorable")

    def test_static_video_is_unscorable_200(self, url, videos):
        r = post_score(url, videos["static"])
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "unscorable" and body["reason"]

    def test_batch_keeps_order_and_per_file_status(self, url, videos):
        files = [("videos", ("good.mp4", videos["good"].read_bytes())), ("videos", ("notes.mp4", videos["text"].read_bytes()))]
        r = httpx.post(f"{url}/score/batch", files=files, timeout=300)
        assert r.status_code == 200, r.text
        good, bad = r.json()["results"]
        assert good["status_code"] == 200 and good["result"]["status"] == "ok"
        assert bad["status_code"] in (415, 422) and bad["error"]["message"]

    def test_python_client(self, url, videos, tmp_path):
        from clients.http_client import VideoGPAClient, score_via_http

        assert score_via_http(url, videos["good"])["status"] == "ok"
        result = score_via_http(url, videos["good"], preview_dir=tmp_path / "previews", **{"lambda": 0.5})
        assert result["lambda"] == 0.5 and result["previews"]
        assert all(Path(p).read_bytes()[:4] == b"\x89PNG" for p in result["previews"])
        with VideoGPAClient(url) as client:
            assert client.readyz()["ready"] is True
            assert client.score(videos["folder"], frames=3)["frames"] == 3  # folder -> zip on the fly


def scorer_replica() -> dict:
    from ray import serve

    return serve.get_deployment_handle("Scorer", app_name=APP).replica_info.remote().result(timeout_s=60)


class TestBadInput:
    def test_first_note_the_replica(self, url):
        REPLICA_BEFORE_BAD_INPUT.update(scorer_replica())
    def test_not_a_video_is_415(self, url, videos):
        body = assert_error(post_score(url, videos["text"]), 415, 422)
        assert "notes.mp4" not in body["detail"] or "video" in body["detail"].lower()

    def test_truncated_video(self, url, videos):
        assert_error(post_score(url, videos["truncated"]), 415, 422)

    def test_one_frame_is_422(self, url, videos):
        assert_error(post_score(url, videos["one_frame"]), 422)

    def test_empty_file_is_422(self, url, tmp_path):
        (tmp_path / "empty.mp4").write_bytes(b"")
        assert_error(post_score(url, tmp_path / "empty.mp4"), 422)

    def test_over_size_cap_is_413(self, url, tmp_path):
        big = tmp_path / "big.mp4"
        big.write_bytes(b"\0" * 3_000_000)  # the app's cap is 2 MB
        body = assert_error(post_score(url, big), 413)
        assert "2 MB" in body["detail"]

    def test_over_size_cap_without_content_length_is_413(self, url):
        def body():
            yield b"--b\r\nContent-Disposition: form-data; name=\"video\"; filename=\"x.mp4\"\r\n\r\n"
            for _ in range(40):
                yield b"\0" * 100_000

        r = httpx.post(f"{url}/score", content=body(), headers={"content-type": "multipart/form-data; boundary=b"}, timeout=60)
        assert_error(r, 413)

    def test_no_file_field_is_422(self, url):
        # A path sent as a text field is never read from the server's disk.
        r = httpx.post(f"{url}/score", files={"other": (None, "/etc/passwd")}, timeout=60)
        assert_error(r, 422)

    def test_not_multipart_is_415(self, url):
        assert_error(httpx.post(f"{url}/score", json={"video": "/etc/passwd"}), 415)

    @pytest.mark.parametrize("field,value", [("frames", "many"), ("frames", "1"), ("frames", "50"), ("lambda", "-1"),
                                             ("backend", "no-such-backend"), ("preview", "maybe")])
    def test_bad_form_fields_are_422(self, url, videos, field, value):
        body = assert_error(post_score(url, videos["good"], **{field: value}), 422)
        assert field in body["detail"] or "backend" in body["detail"]

    def test_deadline_is_504(self, url, videos):
        assert_error(post_score(url, videos["good"], timeout_s=0.001), 504)

    @pytest.mark.parametrize("name", list(HOSTILE))
    def test_hostile_input_is_a_clear_4xx(self, url, hostile_files, name):
        case = HOSTILE[name]
        body = assert_error(post_score(url, hostile_files[name], timeout=120), *case.statuses)
        assert case.says in body["detail"].lower(), body

    @pytest.mark.parametrize("field,value", [("lambda", "inf"), ("lambda", "1e308"), ("lambda", "nan"),
                                             ("timeout_s", "nan"), ("timeout_s", "inf"), ("timeout_s", "-1"),
                                             ("frames", str(2**70)), ("max_side", "1e9")])
    def test_numbers_must_be_finite_and_bounded(self, url, videos, field, value):
        body = assert_error(post_score(url, videos["good"], **{field: value}), 422)
        assert field in body["detail"]

    def test_two_files_in_one_request_is_422(self, url, videos):
        data = videos["good"].read_bytes()
        r = httpx.post(f"{url}/score", files=[("video", ("a.mp4", data)), ("video", ("b.mp4", data))], timeout=60)
        assert "one file" in assert_error(r, 422)["detail"]

    def test_deadline_mid_scoring_stops_and_leaves_no_previews(self, url, videos, work_dir):
        previews = work_dir / "previews"
        before = set(previews.iterdir())
        # Scoring 8 frames (the service's limit) of the good video takes seconds: this deadline passes while the
        # scorer works on it (with the service's 4 frames a quiet machine can finish inside 1 s).
        assert_error(post_score(url, videos["good"], timeout_s=0.3, frames=8, preview="true"), 504)
        # The scorer has one worker: once this answers, the cancelled work has stopped.
        assert post_score(url, videos["static"]).status_code == 200
        assert set(previews.iterdir()) <= before, "a cancelled request left previews behind"

    def test_replica_survived_every_bad_input(self, url, videos):
        assert scorer_replica() == REPLICA_BEFORE_BAD_INPUT, "the same scorer replica, never restarted"
        assert post_score(url, videos["good"]).status_code == 200

    def test_preview_paths_cannot_escape(self, url):
        for p in ("/previews/..%2F..%2Fetc/passwd", "/previews/" + "0" * 32 + "/..%2Fx.png", "/previews/abc/x.png"):
            assert httpx.get(f"{url}{p}").status_code == 404

    def test_symlinks_in_the_work_dir_are_not_followed(self, url, work_dir):
        """Someone who can write into work_dir plants links; the service serves only its own files."""
        linked_file, linked_folder = uuid.uuid4().hex, uuid.uuid4().hex
        (work_dir / "previews" / linked_file).mkdir()
        os.symlink("/etc/passwd", work_dir / "previews" / linked_file / "x.png")
        os.symlink("/etc", work_dir / "previews" / linked_folder)
        for path in (f"/previews/{linked_file}/x.png", f"/previews/{linked_folder}/passwd"):
            assert_error(httpx.get(f"{url}{path}"), 404)


class TestSlowClients:
    def test_slow_uploads_are_cut_off_and_probes_stay_fast(self, url, videos):
        """More slow-loris clients than body slots: probes answer throughout, a new upload gets 503 (not a
        hang), the slots' holders get 408 once their upload time is up, and the service recovers."""
        host, port = url.removeprefix("http://").split(":")
        head = (b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                b"Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"video\"; filename=\"v.mp4\"\r\n\r\n")
        answers: dict[int, bytes] = {}

        def slow_client(i: int, silent: bool) -> None:
            with socket.create_connection((host, int(port)), timeout=1) as sock:
                sock.sendall(head)
                end = time.monotonic() + 4 * UPLOAD_TIMEOUT_S
                while time.monotonic() < end:
                    try:
                        if not silent:
                            sock.sendall(b"x")  # one byte a second
                        data = sock.recv(4096)
                        if data:
                            answers[i] = data
                        return
                    except socket.timeout:
                        continue
                    except OSError:  # the server closed after answering
                        break

        clients = [threading.Thread(target=slow_client, args=(i, i == 0)) for i in range(BODY_SLOTS + 2)]
        for t in clients:
            t.start()
        time.sleep(1.5)
        probes = [httpx.get(f"{url}{path}", timeout=10).status_code for path in ("/healthz", "/readyz") * 3]
        busy = post_score(url, videos["good"], timeout=30)
        for t in clients:
            t.join(timeout=6 * UPLOAD_TIMEOUT_S)
        assert probes == [200] * 6, probes
        assert busy.status_code in (200, 503), busy.text
        if busy.status_code == 503:
            assert busy.headers["retry-after"]
        statuses = sorted(int(a.split(b" ", 2)[1]) for a in answers.values())
        assert len(statuses) == BODY_SLOTS + 2 and set(statuses) <= {408, 503}, answers
        assert statuses.count(408) >= BODY_SLOTS - 1, statuses  # the slots' holders (one may have lost its race)
        assert post_score(url, videos["static"]).status_code == 200, "slots are free again"


class TestWebPage:
    def test_upload_score_chart_previews(self, url, videos, page):
        page.goto(url + "/")
        assert "videogpa" in page.title()
        page.wait_for_function("document.querySelector('#frames').placeholder === '4'")  # defaults from /info
        assert page.is_hidden("#token-label"), "no token field when the service has no auth"
        page.set_input_files("#video", str(videos["good"]))
        page.click("#submit")
        page.wait_for_selector("#status:has-text('Done.')", timeout=300_000)
        assert page.inner_text("#verdict").startswith("score ")
        assert page.locator("#chart rect.bar").count() == FRAMES
        page.wait_for_function("document.querySelectorAll('#previews img').length > 0")
        assert page.evaluate("[...document.querySelectorAll('#previews img')].every(i => i.naturalWidth > 0)")
        # An error is shown, not swallowed.
        page.set_input_files("#video", str(videos["text"]))
        page.click("#submit")
        page.wait_for_selector("#status .verdict.error", timeout=120_000)
        assert "Error 415" in page.inner_text("#status") or "Error 422" in page.inner_text("#status")


class TestLoadAndFaults:
    def test_bounded_load_every_request_answered(self, url, videos):
        """200 requests from 16 concurrent clients: each gets 200 or 503 (+Retry-After); none lost or hung.

        The static video keeps each scoring short (its verdict comes before reconstruction), so the
        test measures queueing and back-pressure, not the scorer's speed.
        """
        data = videos["static"].read_bytes()
        outcomes: list[tuple[int, str | None]] = []
        lock = threading.Lock()

        def client(n: int) -> None:
            with httpx.Client(timeout=600) as http:
                for _ in range(n):
                    r = http.post(f"{url}/score", files={"video": ("static.mp4", data)})
                    with lock:
                        outcomes.append((r.status_code, r.headers.get("retry-after")))

        per_client = [200 // 16 + (1 if i < 200 % 16 else 0) for i in range(16)]
        with ThreadPoolExecutor(16) as pool:
            for f in [pool.submit(client, n) for n in per_client]:
                f.result()
        statuses = [s for s, _ in outcomes]
        assert len(outcomes) == 200
        assert set(statuses) <= {200, 503}, sorted(set(statuses))
        assert statuses.count(200) >= 1 and statuses.count(503) >= 1
        assert all(ra is not None and int(ra) >= 1 for s, ra in outcomes if s == 503)
        assert httpx.get(f"{url}/readyz").status_code == 200

    def test_killed_scorer_replica_is_replaced(self, url, videos):
        import ray
        from ray import serve

        scorer = serve.get_deployment_handle("Scorer", app_name=APP)
        before = scorer.replica_info.remote().result(timeout_s=60)
        results: list[int] = []

        def background() -> None:
            for _ in range(3):
                try:
                    results.append(post_score(url, videos["good"], timeout=600).status_code)
                except httpx.HTTPError:
                    results.append(-1)

        t = threading.Thread(target=background)
        t.start()
        time.sleep(1.0)  # let a request reach the replica (the test does not depend on it)
        ray.kill(ray.get_actor(before["actor_name"], namespace="serve"), no_restart=True)
        t.join(timeout=900)
        assert not t.is_alive()
        assert set(results) <= {200, 503}, results  # mid-flight: 503 (retry), never a hang or a 500

        # Serve starts a new replica; the service answers 200 again.
        deadline = time.monotonic() + 300
        while True:
            r = post_score(url, videos["good"])
            if r.status_code == 200:
                break
            assert r.status_code == 503, r.text
            assert time.monotonic() < deadline, "no replacement replica within 300 s"
            time.sleep(1)
        after = scorer.replica_info.remote().result(timeout_s=60)
        assert after["actor_name"] != before["actor_name"]

    def test_no_upload_left_behind(self, url, work_dir):
        assert list((work_dir / "uploads").iterdir()) == []
