"""The sampler deployment (tiny random CogVideoX saved with save_pretrained, a LoRA adapter in the
trainer's export format) and bearer-token auth, on the real Serve app. One deployment."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray.serve")
pytest.importorskip("diffusers")
pytest.importorskip("common.scoring")

from tests.services.conftest import deployed  # noqa: E402

pytestmark = pytest.mark.ray

APP = "vgpa-test-sampler"
TOKEN = "test-token-5f2c"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    import torch

    from training.fixtures.tiny_cogvideox import save_tiny_cogvideox, tiny_transformer
    from training.lora import add_lora, export_lora

    root = tmp_path_factory.mktemp("sampler-models")
    t2v = save_tiny_cogvideox(root / "t2v")
    i2v = save_tiny_cogvideox(root / "i2v", i2v=True)
    # An adapter that changes the output: B != 0 (a freshly added LoRA is a no-op).
    transformer = add_lora(tiny_transformer(), rank=4, alpha=4)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    adapter = export_lora(root / "lora-geo", transformer).parent
    return {"t2v": t2v, "i2v": i2v, "adapter": adapter}


@pytest.fixture(scope="module")
def url(serve_url, models, tmp_path_factory):
    work = tmp_path_factory.mktemp("sampler-work")
    (work / "token").write_text(TOKEN + "\n")
    args = {
        "work_dir": str(work),
        "auth_token_file": str(work / "token"),
        "scorer": {"score": {"frames": 4, "max_side": 240, "recon_frames": 8}, "num_replicas": 1, "warmup": False},
        "sampler": {
            "model_dir": str(models["t2v"]),
            "adapters": {"geo": str(models["adapter"])},
            "default_steps": 2,
            "max_seeds": 4,
            "graceful_shutdown_timeout_s": 60,
        },
    }
    with deployed(args, APP, serve_url) as u:
        yield u


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def sample(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/sample", json=body, headers=AUTH, timeout=300)


class TestAuth:
    def test_probes_are_open(self, url):
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert httpx.get(f"{url}/readyz").json()["sampler"]["adapters"] == ["geo"]

    @pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}])
    def test_401_without_the_token(self, url, headers):
        for method, path in (("POST", "/score"), ("POST", "/sample"), ("GET", "/info"),
                             ("GET", "/previews/" + "0" * 32 + "/a.png")):
            r = httpx.request(method, f"{url}{path}", headers=headers, files={"video": ("a.mp4", b"x")} if method == "POST" else None)
            assert r.status_code == 401, (path, r.status_code)
            assert "Bearer" in r.json()["detail"]

    def test_token_accepted(self, url):
        assert httpx.get(f"{url}/info", headers=AUTH).json()["auth"] is True

    def test_python_client_sends_the_token(self, url):
        from clients.http_client import ServiceError, VideoGPAClient

        with VideoGPAClient(url, token=TOKEN) as client:
            assert client.info()["sampler"] is True
        with VideoGPAClient(url, token="nope", retries=0) as client, pytest.raises(ServiceError) as err:
            client.info()
        assert err.value.http_status == 401


class TestWebPageWithAuth:
    def test_token_field_and_scoring(self, url, videos, page):
        page.goto(url + "/")
        page.wait_for_selector("#token-label:not([hidden])")  # /info answered 401: the page asks for a token
        page.set_input_files("#video", str(videos["static"]))
        page.click("#submit")
        page.wait_for_selector("#status .verdict.error")
        assert "Error 401" in page.inner_text("#status")
        page.fill("#token", TOKEN)
        page.click("#submit")
        page.wait_for_selector("#status:has-text('Done.')", timeout=300_000)
        assert page.inner_text("#verdict").startswith("unscorable")


class TestSampling:
    def test_seeds_give_videos_latents_and_embeddings(self, url, tmp_path):
        import av
        import torch

        from training.fixtures.tiny_cogvideox import HEIGHT, LATENT_CHANNELS, LATENT_FRAMES, LATENT_HEIGHT, NUM_FRAMES, TEXT_EMBED_DIM, TEXT_SEQ_LEN, WIDTH
        from clients.http_client import VideoGPAClient

        r = sample(url, prompt="a red cube orbit", seeds=[3, 7])
        assert r.status_code == 200, r.text
        body = r.json()
        assert [s["seed"] for s in body["samples"]] == [3, 7] and body["adapter"] is None
        with VideoGPAClient(url, token=TOKEN) as client:
            item = body["samples"][0]
            mp4 = client.download(item["video_url"], tmp_path / "v.mp4")
            lat = torch.load(client.download(item["latents_url"], tmp_path / "l.pt"))
            emb = torch.load(client.download(item["prompt_embeds_url"], tmp_path / "e.pt"))
        with av.open(str(mp4)) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert len(frames) == NUM_FRAMES and frames[0].shape == (HEIGHT, WIDTH, 3)
        assert lat.shape == (LATENT_FRAMES, LATENT_CHANNELS, LATENT_HEIGHT, LATENT_HEIGHT)
        assert emb.shape == (TEXT_SEQ_LEN, TEXT_EMBED_DIM)
        assert not item["video"].startswith("/"), "HTTP clients get references, not server paths"

    def test_seed_determinism_and_adapter_switch(self, url):
        import torch
        from ray import serve

        from common.sampling import SampleRequest

        handle = serve.get_deployment_handle("Sampler", app_name=APP)

        def latents(adapter):
            request = SampleRequest(prompt="a blue sphere", seeds=[5], steps=2, adapter=adapter)
            out = handle.sample.remote(request).result(timeout_s=300).result  # typed: a SampleAnswer crosses the handle
            path = Path(out.samples[0].latents)  # inside the cluster: paths on shared storage
            assert path.is_file() and Path(out.samples[0].video).is_file()
            return torch.load(path)

        base = latents(None)
        geo = latents("geo")
        again = latents(None)
        assert torch.equal(base, again), "same seed, adapter off: identical"
        assert not torch.allclose(base, geo), "the adapter changes the sample"

    @pytest.mark.parametrize("body,status", [
        ({"prompt": "x", "adapter": "unknown"}, 422),
        ({"prompt": "x", "seeds": [0, 1, 2, 3, 4]}, 422),
        ({"prompt": "x", "seeds": [1, 1]}, 422),
        ({"prompt": "x", "steps": 0}, 422),
        ({"prompt": "x", "frames": 10}, 422),
        ({"prompt": ""}, 422),
        ({"prompt": "x", "seeds": "abc"}, 422),
        ({"prompt": "x", "num_seeds": 10_000_000}, 422),  # refused before any list is made
        ({"prompt": "x", "seeds": [2**70]}, 422),
        ({"prompt": "x", "guidance": float("nan")}, 422),  # Python's json writes NaN, and reads it back
        ({"prompt": "x", "guidance": 1e308}, 422),
        ({"prompt": "x", "timeout_s": float("nan")}, 422),
        ({"prompt": "x", "width": 12}, 422),
        ({"prompt": "x", "unknown_field": 1}, 422),
    ])
    def test_bad_requests(self, url, body, status):
        import json

        # json.dumps writes NaN (httpx's json= refuses it); a client may send it all the same.
        r = httpx.post(f"{url}/sample", content=json.dumps(body), timeout=300,
                       headers={**AUTH, "content-type": "application/json"})
        assert r.status_code == status, r.text
        assert r.json()["detail"] and r.json()["error"]["status"] == status

    @pytest.mark.parametrize("field,value", [("num_seeds", "10000000"), ("seeds", str(2**70)), ("guidance", "nan")])
    def test_bad_form_fields(self, url, field, value):
        form = {"prompt": (None, "x"), field: (None, value)}  # multipart, as the web form and the client send
        r = httpx.post(f"{url}/sample", headers=AUTH, files=form, timeout=60)
        assert r.status_code == 422 and field in r.json()["detail"], r.text

    def test_json_body_is_capped_while_reading(self, url):
        def body():
            yield b'{"prompt": "'
            for _ in range(30):
                yield b"x" * 100_000  # 3 MB in all, no Content-Length: refused after about 1 MB
            yield b'"}'

        r = httpx.post(f"{url}/sample", headers={**AUTH, "content-type": "application/json"}, content=body(), timeout=60)
        assert r.status_code == 413, r.text

    def test_two_images_is_422(self, url):
        files = [("image", ("a.png", b"\x89PNG")), ("image", ("b.png", b"\x89PNG"))]
        r = httpx.post(f"{url}/sample", headers=AUTH, data={"prompt": "x"}, files=files, timeout=60)
        assert r.status_code == 422, r.text

    def test_provenance_names_no_server_path(self, url):
        body = sample(url, prompt="a green cone", seeds=[1], steps=1).json()
        r = httpx.get(f"{url}/samples/{body['sample_id']}/request.json", headers=AUTH)
        assert r.status_code == 200
        meta = r.json()
        assert meta["model"] == "t2v" and "model_dir" not in meta and "pid" not in meta
        assert "/tmp/" not in r.text and "/work/" not in r.text

    def test_image_to_t2v_model_is_422(self, url, tmp_path):
        from PIL import Image

        Image.new("RGB", (32, 32)).save(tmp_path / "first.png")
        with open(tmp_path / "first.png", "rb") as f:
            r = httpx.post(f"{url}/sample", headers=AUTH, data={"prompt": "x"}, files={"image": ("first.png", f)}, timeout=120)
        assert r.status_code == 422 and "text-to-video" in r.json()["detail"]


class TestImageToVideoEngine:
    """The deployment's engine on an image-to-video folder, called directly (no Serve)."""

    def test_first_frame_conditioning(self, models, tmp_path):
        from PIL import Image

        from common.sampling import SampleRequest, Sampler, SamplingConfig

        engine = Sampler(SamplingConfig(model_dir=models["i2v"], default_steps=2), tmp_path / "out")
        assert engine.pipeline_name == "CogVideoXImageToVideoPipeline" and engine.model.i2v
        Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "first.png")
        out = engine.sample(SampleRequest(prompt="a red cube", seeds=[0]), str(tmp_path / "first.png"))
        assert Path(out.result.samples[0].video).is_file()
        missing = engine.sample(SampleRequest(prompt="a red cube"), None)
        assert missing.result is None and missing.error.status == 422
        (tmp_path / "bad.png").write_bytes(b"not an image")
        bad = engine.sample({"prompt": "a red cube"}, str(tmp_path / "bad.png"))
        assert bad.error.status == 415

    def test_samples_go_to_a_storage_uri(self, models, tmp_path):
        """With a storage URI as output (a cluster without a shared folder), every file is copied there."""
        import io

        import torch
        from PIL import Image

        from common import storage
        from common.sampling import SampleRequest, Sampler, SamplingConfig
        from training.fixtures.tiny_cogvideox import LATENT_CHANNELS, LATENT_FRAMES, LATENT_HEIGHT

        root = (tmp_path / "store").as_uri()
        Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "first.png")
        first = storage.put_file(tmp_path / "first.png", storage.join(root, "uploads", "first.png"))
        engine = Sampler(SamplingConfig(model_dir=models["i2v"], default_steps=2), storage.join(root, "samples"))
        out = engine.sample(SampleRequest(prompt="a red cube", seeds=[0]), first).result
        files = out.samples[0]
        folder = storage.join(root, "samples", out.sample_id)
        assert all(getattr(files, key).startswith(folder + "/") for key in ("video", "latents", "prompt_embeds"))
        assert {name for name, _ in storage.entries(folder)} == {"seed-0.mp4", "seed-0.latents.pt", "prompt_embeds.pt", "request.json"}
        latents = torch.load(io.BytesIO(storage.read_bytes(files.latents)))
        assert latents.shape == (LATENT_FRAMES, LATENT_CHANNELS, LATENT_HEIGHT, LATENT_HEIGHT)
