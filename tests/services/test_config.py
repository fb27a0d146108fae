"""Service configuration, deployment options, streamed uploads and client helpers (no Ray cluster)."""

from __future__ import annotations

import asyncio
import io
import zipfile
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray.serve")

from services.config import ServiceArgs  # noqa: E402
from services.scorer import scorer_deployment_options  # noqa: E402
from services.uploads import UploadError, parse_multipart  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SERVE_CONFIG = REPO / "cluster" / "serve_config.yaml"


class TestServeConfigFile:
    def test_serve_schema_accepts_it(self):
        from ray.serve.schema import ServeDeploySchema

        schema = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_CONFIG.read_text()))
        app = schema.applications[0]
        assert app.import_path == "services.app:build_app"
        assert app.route_prefix == "/"

    def test_args_are_valid_service_args(self):
        data = yaml.safe_load(SERVE_CONFIG.read_text())
        cfg = ServiceArgs.model_validate(data["applications"][0]["args"])
        assert cfg.scorer.num_gpus == 0.5
        assert cfg.sampler is not None and "geo-dpo" in cfg.sampler.adapters
        assert cfg.sampler.graceful_shutdown_timeout_s >= 600

    def test_rayservice_inlines_the_same_config(self):
        docs = list(yaml.safe_load_all((REPO / "cluster" / "rayservice.yaml").read_text()))
        service = next(d for d in docs if d["kind"] == "RayService")
        assert yaml.safe_load(service["spec"]["serveConfigV2"]) == yaml.safe_load(SERVE_CONFIG.read_text())
        groups = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        gpu_limits = [g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") for g in groups]
        assert any(gpu_limits), "a GPU worker group"

    def test_import_path_builds_the_app_as_serve_does(self):
        from ray.serve import Application
        from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
        from ray.serve._private.utils import import_attr

        data = yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]
        builder = import_attr(data["import_path"])
        assert isinstance(call_user_app_builder_with_args_if_necessary(builder, data["args"]), Application)
        # `serve run services.app:build_app max_upload_mb=100` passes strings
        assert isinstance(call_user_app_builder_with_args_if_necessary(builder, {"max_upload_mb": "100"}), Application)

    def test_serve_build_output_is_a_valid_config(self, tmp_path):
        import subprocess
        import sys

        from ray.serve.schema import ServeDeploySchema

        from clients.commands.serve import load_config_file

        out = tmp_path / "built.yaml"
        serve_cli = Path(sys.executable).parent / "serve"
        subprocess.run([str(serve_cli), "build", "services.app:app", "-o", str(out)], cwd=REPO, check=True,
                       capture_output=True, timeout=300)
        schema = ServeDeploySchema.model_validate(yaml.safe_load(out.read_text()))
        names = {d.name for d in schema.applications[0].deployments}
        assert names == {"Ingress", "Scorer"}
        args, http = load_config_file(out)
        assert args == {} and http["port"] == 8000

    def test_serve_command_reads_it(self):
        from clients.commands.serve import load_config_file

        args, http = load_config_file(SERVE_CONFIG)
        assert http["port"] == 8000
        assert ServiceArgs.model_validate(args).max_upload_mb == 512


class TestServiceArgs:
    def test_defaults(self):
        cfg = ServiceArgs.model_validate({})
        assert cfg.sampler is None
        assert cfg.max_upload_mb == 512
        assert cfg.scorer.max_queued_requests >= 1

    def test_unknown_key_rejected(self):
        with pytest.raises(ValueError, match="max_uplod_mb"):
            ServiceArgs.model_validate({"max_uplod_mb": 1})

    def test_bad_autoscaling_rejected(self):
        with pytest.raises(ValueError, match="min_replicas"):
            ServiceArgs.model_validate({"scorer": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}})

    def test_every_field_is_described(self):
        from services.config import AutoscalingArgs, SamplerArgs, ScorerArgs

        for model in (ServiceArgs, ScorerArgs, SamplerArgs, AutoscalingArgs):
            missing = [name for name, f in model.model_fields.items() if not f.description]
            assert not missing, f"{model.__name__}: {missing}"

    def test_round_trip_through_json_dict(self):
        cfg = ServiceArgs.model_validate({"scorer": {"score": {"frames": 4, "lambda": 0.5}}})
        again = ServiceArgs.model_validate(cfg.model_dump(mode="json", by_alias=True))
        assert again == cfg and again.scorer.score.lambda_ == 0.5

    def test_token_from_file_wins(self, tmp_path, monkeypatch):
        monkeypatch.setenv("VGPA_API_TOKEN", "from-env")
        assert ServiceArgs().auth_token() == "from-env"
        (tmp_path / "token").write_text("from-file\n")
        assert ServiceArgs(auth_token_file=tmp_path / "token").auth_token() == "from-file"
        monkeypatch.setenv("VGPA_API_TOKEN", "")
        assert ServiceArgs().auth_token() is None


class TestNumbersAreFiniteAndBounded:
    """Every float setting of every config type refuses nan and inf, and every number has an upper bound."""

    @staticmethod
    def _models():
        from common.config import ScoreConfig
        from services.config import AutoscalingArgs, SampleRequest, SamplerArgs, ScorerArgs

        return (ServiceArgs, ScorerArgs, SamplerArgs, AutoscalingArgs, SampleRequest, ScoreConfig)

    def test_nan_and_inf_refused_everywhere(self):
        from pydantic import ValidationError

        required = {"SamplerArgs": {"model_dir": "/m"}, "SampleRequest": {"prompt": "x"}}
        checked = 0
        for model in self._models():
            for name, field in model.model_fields.items():
                if float not in (field.annotation, *getattr(field.annotation, "__args__", ())):
                    continue
                key = field.alias or name
                for bad in (float("nan"), float("inf"), "nan", "-inf"):
                    with pytest.raises(ValidationError):
                        model.model_validate({**required.get(model.__name__, {}), key: bad})
                checked += 1
        assert checked >= 15

    def test_every_number_has_an_upper_bound(self):
        import annotated_types

        unbounded, checked = [], 0
        for model in self._models():
            for name, field in model.model_fields.items():
                kinds = (field.annotation, *getattr(field.annotation, "__args__", ()))
                if not ({int, float} & set(kinds)) or bool in kinds:
                    continue
                checked += 1
                if not any(isinstance(m, (annotated_types.Le, annotated_types.Lt)) for m in field.metadata):
                    unbounded.append(f"{model.__name__}.{name}")
        assert unbounded == [] and checked >= 40, (unbounded, checked)

    def test_sample_request_bounds_seeds_before_use(self):
        from pydantic import ValidationError

        from services.config import SampleRequest

        with pytest.raises(ValidationError, match="num_seeds"):
            SampleRequest.model_validate({"prompt": "x", "num_seeds": 10_000_000})
        with pytest.raises(ValidationError, match="at most 64 seeds"):
            SampleRequest.model_validate({"prompt": "x", "seeds": ",".join(["1"] * 1_000_000)})
        with pytest.raises(ValidationError):
            SampleRequest.model_validate({"prompt": "x", "seeds": [2**70]})
        assert SampleRequest.model_validate({"prompt": "x", "seeds": "3,7"}).seed_list() == [3, 7]
        assert SampleRequest.model_validate({"prompt": "x", "num_seeds": "2"}).seed_list() == [0, 1]


class TestDeploymentOptions:
    def test_autoscaling_and_fractional_gpu(self):
        cfg = ServiceArgs.model_validate({"scorer": {"num_gpus": 0.25, "autoscaling": {"max_replicas": 4}}})
        opts = scorer_deployment_options(cfg.scorer)
        assert opts["ray_actor_options"]["num_gpus"] == 0.25
        assert opts["autoscaling_config"]["max_replicas"] == 4
        assert opts["max_queued_requests"] == cfg.scorer.max_queued_requests
        assert "num_replicas" not in opts

    def test_fixed_replicas_and_no_gpu(self):
        opts = scorer_deployment_options(ServiceArgs.model_validate({"scorer": {"num_replicas": 2}}).scorer)
        assert opts["num_replicas"] == 2 and "autoscaling_config" not in opts
        assert "num_gpus" not in opts["ray_actor_options"]

    def test_sampler_options(self):
        from services.sampler import sampler_deployment_options

        cfg = ServiceArgs.model_validate({"sampler": {"model_dir": "/m", "num_gpus": 1, "graceful_shutdown_timeout_s": 900}})
        opts = sampler_deployment_options(cfg.sampler)
        assert opts["graceful_shutdown_timeout_s"] == 900 and opts["ray_actor_options"]["num_gpus"] == 1

    def test_build_app_without_sampler(self):
        from services.app import build_app

        app = build_app({"scorer": {"warmup": False}})
        assert app is not None


def _multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "XyZ") -> tuple[str, bytes]:
    out = io.BytesIO()
    for name, filename, data in parts:
        out.write(f"--{boundary}\r\n".encode())
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out.write(f"Content-Disposition: {disp}\r\n\r\n".encode())
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", out.getvalue()


async def _chunks(data: bytes, size: int = 1000):
    for i in range(0, len(data), size):
        yield data[i : i + size]


class TestReceiveLimits:
    def test_idle_and_total_timeouts_are_408(self):
        from services.uploads import timed_chunks

        async def drip(gap_s: float, n: int):
            for _ in range(n):
                await asyncio.sleep(gap_s)
                yield b"x"

        async def drain(stream) -> int:
            return sum([len(c) async for c in stream])

        assert asyncio.run(drain(timed_chunks(drip(0.01, 5), idle_timeout_s=1, total_timeout_s=5))) == 5
        with pytest.raises(UploadError, match="No part") as idle:
            asyncio.run(drain(timed_chunks(drip(0.5, 2), idle_timeout_s=0.1, total_timeout_s=5)))
        with pytest.raises(UploadError, match="not received within") as total:
            asyncio.run(drain(timed_chunks(drip(0.05, 100), idle_timeout_s=1, total_timeout_s=0.3)))
        assert idle.value.status == total.value.status == 408

    def test_json_body_is_capped_while_reading(self):
        from services.uploads import read_json_object

        received = []

        async def body():
            for _ in range(100):
                received.append(1)
                yield b"x" * 1000

        with pytest.raises(UploadError) as err:
            asyncio.run(read_json_object(body(), max_bytes=10_000))
        assert err.value.status == 413 and len(received) == 11
        with pytest.raises(UploadError) as err:
            asyncio.run(read_json_object(_chunks(b"[1, 2]"), max_bytes=10_000))
        assert err.value.status == 400


class TestStreamedUploads:
    def test_file_and_fields(self, tmp_path):
        payload = bytes(range(256)) * 40
        ctype, body = _multipart([("frames", None, b"4"), ("video", "../../etc/clip.MP4", payload)])
        form = asyncio.run(parse_multipart(ctype, _chunks(body), tmp_path, max_bytes=10**6, max_files=1))
        assert form.fields == {"frames": "4"}
        (f,) = form.files
        assert f.path.parent == tmp_path and f.path.suffix == ".mp4" and f.filename == "clip.MP4"
        assert f.path.read_bytes() == payload and f.size == len(payload)

    def test_over_cap_is_413_while_streaming(self, tmp_path):
        ctype, body = _multipart([("video", "a.mp4", b"x" * 50_000)])
        seen = []

        async def counting():
            async for c in _chunks(body):
                seen.append(len(c))
                yield c

        with pytest.raises(UploadError) as err:
            asyncio.run(parse_multipart(ctype, counting(), tmp_path, max_bytes=10_000, max_files=1))
        assert err.value.status == 413
        assert sum(seen) <= 11_000, "stopped reading at the cap"

    def test_truncated_body_is_400(self, tmp_path):
        ctype, body = _multipart([("video", "a.mp4", b"x" * 5000)])
        with pytest.raises(UploadError) as err:
            asyncio.run(parse_multipart(ctype, _chunks(body[:3000]), tmp_path, max_bytes=10**6, max_files=1))
        assert err.value.status == 400

    def test_not_multipart_is_415(self, tmp_path):
        with pytest.raises(UploadError) as err:
            asyncio.run(parse_multipart("application/json", _chunks(b"{}"), tmp_path, max_bytes=10**6, max_files=1))
        assert err.value.status == 415

    def test_too_many_files_is_422(self, tmp_path):
        ctype, body = _multipart([("videos", "a.mp4", b"1"), ("videos", "b.mp4", b"2")])
        with pytest.raises(UploadError) as err:
            asyncio.run(parse_multipart(ctype, _chunks(body), tmp_path, max_bytes=10**6, max_files=1))
        assert err.value.status == 422 and "one file" in str(err.value)

    def test_unknown_suffix_becomes_bin(self, tmp_path):
        ctype, body = _multipart([("video", "evil.sh", b"#!/bin/sh")])
        form = asyncio.run(parse_multipart(ctype, _chunks(body), tmp_path, max_bytes=10**6, max_files=1))
        assert form.files[0].path.suffix == ".bin"


class TestClientHelpers:
    def test_folder_is_zipped_in_order(self, tmp_path):
        from clients.http_client import _as_upload

        for name in ("0002.png", "0001.png", "notes.txt"):
            (tmp_path / name).write_bytes(b"x")
        with _as_upload(tmp_path) as archive:
            assert zipfile.ZipFile(archive).namelist() == ["0001.png", "0002.png"]
        assert not archive.exists()

    def test_missing_path_is_input_not_found(self, tmp_path):
        from clients.http_client import _as_upload
        from common.errors import InputNotFoundError

        with pytest.raises(InputNotFoundError):
            with _as_upload(tmp_path / "nope.mp4"):
                pass

    def test_retries_503_then_succeeds(self, tmp_path):
        import httpx

        from clients.http_client import VideoGPAClient

        calls = []

        def handler(request: httpx.Request) -> httpx.Response:
            calls.append(request.url.path)
            if len(calls) < 3:
                return httpx.Response(503, headers={"Retry-After": "0"}, json={"detail": "busy"})
            return httpx.Response(200, json={"status": "ok"})

        video = tmp_path / "v.mp4"
        video.write_bytes(b"data")
        with VideoGPAClient("http://test", transport=httpx.MockTransport(handler), backoff=0.001) as client:
            assert client.score(video) == {"status": "ok"}
        assert calls == ["/score"] * 3

    def test_error_carries_server_status_and_message(self, tmp_path):
        import httpx

        from clients.http_client import ServiceError, VideoGPAClient

        def handler(request):
            return httpx.Response(415, json={"detail": "Not a video.", "error": {"status": 415, "type": "NotAVideoError", "message": "Not a video."}})

        video = tmp_path / "v.mp4"
        video.write_bytes(b"data")
        with VideoGPAClient("http://test", transport=httpx.MockTransport(handler), retries=0) as client:
            with pytest.raises(ServiceError) as err:
                client.score(video)
        assert err.value.http_status == 415 and err.value.error_type == "NotAVideoError"
        assert "Not a video." in str(err.value)
