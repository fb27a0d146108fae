"""The sampling engine: CogVideoX or Wan (text- or image-to-video) from a local diffusers folder.

    info = inspect_video_model("models/CogVideoX-5b-I2V")          # what the folder holds, nothing loaded
    sampler = Sampler(SamplingConfig(model_dir=...), output_dir="samples/")
    answer = sampler.sample(SampleRequest(prompt="...", seeds=[0, 1]), image_path="first.png")

`inspect_video_model` is the one place that recognises and validates a model folder (the mining
job, the trainer, `vgpa cache`, `vgpa compare-lora` and the sampler all ask it);
`load_video_model` loads the pipeline after that check. One request = one prompt (optionally a
first frame) and N seeds. For each seed the engine writes, under `<output_dir>/<sample_id>/`:

    seed-<s>.mp4             the decoded video (H.264)
    seed-<s>.latents.pt      the final latents in the transformer's space and layout, float32:
                             CogVideoX [F, C, h, w] (x the VAE scaling factor), Wan [C, F, h, w]
                             (normalised with the VAE's latents_mean / latents_std); see common.families
    prompt_embeds.pt         the prompt's T5 (Wan: UMT5) embeddings [L, D], float32 (shared by all seeds)
    request.json             the request, the model folder's name, the pipeline and sizes (provenance;
                             no server path: HTTP clients can download it)

and answers a `SampleAnswer` with those paths, never video bytes (or the error envelope). LoRA
adapters are loaded once from folders named in the config and selected per request by name.
No Ray here: the Serve deployment (`services/sampler.py`) and the mining job's actor pool hold
one of these.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any, Iterable, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.families import FAMILIES, FULL_STACK, family_of_pipeline, supported_pipelines
from common.errors import Answer, ConfigError, ErrorInfo, VideoGPAError, invalid_settings
from common.storage import is_uri, join, local_copy, publishing

logger = logging.getLogger(__name__)

#: Absolute bounds of any sampler (a running sampler's own limits are `SamplingConfig` fields).
MAX_SEEDS_PER_REQUEST = 64
MAX_SAMPLE_STEPS = 1000
MAX_GUIDANCE = 100.0
#: diffusers pipeline class (model_index.json's `_class_name`) -> image-to-video?
COGVIDEOX_PIPELINES = FAMILIES["cogvideox"].pipelines
PIPELINE_PARTS = FAMILIES["cogvideox"].parts


class _Strict(BaseModel):
    # allow_inf_nan=False: every float setting is finite (nan passes every `ge`/`le` comparison).
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


# ---- the model folder ----------------------------------------------------------------------------
class VideoModelInfo(BaseModel):
    """What a diffusers video pipeline folder holds (read from its files, nothing loaded)."""

    folder: Path
    pipeline: str = Field(description="model_index.json's _class_name, e.g. CogVideoXImageToVideoPipeline.")
    i2v: bool = Field(description="Image-to-video (the first frame is a request's input).")
    family: str = Field("cogvideox", description="The model family (common.families), e.g. cogvideox or wan.")


def inspect_video_model(folder: str | Path, need: Iterable[str] = FULL_STACK) -> VideoModelInfo:
    """Recognise a diffusers video pipeline folder of a supported family; ConfigError with the reason when it is not one.

    `need`: what the caller will do with it (`common.families.USES`); default the whole pipeline
    (sample, encode, mine, train). A folder of a recognised family that does not (yet) support all
    of `need` is refused with what it does support.
    """
    folder = Path(folder)
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise ConfigError(f"{folder} is not a diffusers pipeline folder (model_index.json is missing)")
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{index_path} is not valid JSON ({err})") from err
    name = index.get("_class_name")
    family = family_of_pipeline(name)
    if family is None:
        raise ConfigError(f"{folder} holds a {name}, a model family videogpa does not support "
                          f"(supported: {supported_pipelines()})")
    family.check_folder(folder, index)
    for part in family.parts:
        if not (folder / part).is_dir():
            raise ConfigError(f"{folder} is not a complete {family.name} pipeline folder: {part}/ is missing")
    missing = [use for use in need if use not in family.uses(name)]
    if missing:
        able = ", ".join(sorted(family.uses(name))) or "nothing yet"
        full = ", ".join(f.name for f in FAMILIES.values() if set(need) <= f.uses(next(iter(f.pipelines))))
        raise ConfigError(f"{folder} holds a {name} ({family.name}): videogpa does not yet {'/'.join(missing)} with it "
                          f"(it supports {able} for {name}; {full or 'no family'} supports {', '.join(need)})")
    return VideoModelInfo(folder=folder, pipeline=name, i2v=family.pipelines[name], family=family.name)


def resolve_device_dtype(device: str = "auto", dtype: str = "auto"):
    """('auto' | 'cpu' | 'cuda[:N]', 'auto' | 'float32' | 'float16' | 'bfloat16') -> (torch.device, torch.dtype).

    'auto': CUDA when available; bfloat16 on CUDA, float32 on the CPU.
    """
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return torch.device(device), getattr(torch, dtype)


def load_video_model(folder: str | Path, *, device: str = "auto", dtype: str = "auto", need: Iterable[str] = ("sample",)):
    """(pipeline on `device`, VideoModelInfo) from a checked folder; loaded from local files only, never downloaded.

    `need`: as `inspect_video_model`'s (default: the sampler's use).
    """
    from diffusers import DiffusionPipeline

    info = inspect_video_model(folder, need=need)
    torch_device, torch_dtype = resolve_device_dtype(device, dtype)
    pipe = DiffusionPipeline.from_pretrained(str(info.folder), dtype=torch_dtype, local_files_only=True).to(torch_device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, info


# ---- configuration and requests ------------------------------------------------------------------
class SamplingOptions(_Strict):
    """How the sampling engine runs any model: its adapters, dtype, device, defaults and limits."""

    adapters: dict[str, Path] = Field(
        default_factory=dict,
        description="LoRA adapters by name -> local folder; requests select one by name, never by path.",
    )
    dtype: str = Field("auto", description="'auto' (bfloat16 on CUDA, float32 on CPU), 'float32', 'float16' or 'bfloat16'.")
    device: str = Field("auto", description="'auto' (CUDA when available), 'cpu' or 'cuda[:N]'.")
    max_sequence_length: Optional[int] = Field(
        None, ge=1, le=4096, description="Prompt tokens; default: the tokenizer's model_max_length capped at 226 (CogVideoX) or 512 (Wan)."
    )
    default_steps: int = Field(50, ge=1, le=MAX_SAMPLE_STEPS, description="Denoising steps when the request gives none.")
    default_guidance: float = Field(
        6.0, ge=0, le=MAX_GUIDANCE, description="Classifier-free guidance scale when the request gives none."
    )
    max_seeds: int = Field(8, ge=1, le=MAX_SEEDS_PER_REQUEST, description="Most seeds one request may ask for.")
    max_steps: int = Field(100, ge=1, le=MAX_SAMPLE_STEPS, description="Most denoising steps one request may ask for.")
    fps: int = Field(8, ge=1, le=240, description="Frame rate of the written mp4 files.")

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in {"auto", "float32", "float16", "bfloat16"}:
            raise ValueError(f"dtype must be auto, float32, float16 or bfloat16, not {v!r}")
        return v


class SamplingConfig(SamplingOptions):
    """The sampling engine: which model, where it writes, and its `SamplingOptions`."""

    model_dir: Path = Field(description="A diffusers pipeline folder (model_index.json); loaded with from_pretrained, never downloaded.")
    output_dir: Optional[Path] = Field(
        None, description="Where videos, latents and text embeddings are written (storage all nodes share). Default: <work_dir>/samples."
    )


class SampleRequest(_Strict):
    """One sampling request (POST /sample, or the mining job's call), with absolute bounds.

    Limits of the running sampler (its `max_seeds`, `max_steps`, adapters, model kind) are checked
    by the engine against its `SamplingConfig`; what is here holds for any sampler, so that nothing
    is built from a field before it is bounded (a `num_seeds` of ten million is refused, not listed).
    Form fields arrive as strings: `seeds` may be "0,1,2".
    """

    prompt: str = Field(min_length=1, max_length=10_000, description="What to sample.")
    negative_prompt: str = Field("", max_length=10_000, description="What classifier-free guidance steers away from.")
    seeds: Optional[list[Annotated[int, Field(ge=0, le=2**63 - 1)]]] = Field(
        None, min_length=1, max_length=MAX_SEEDS_PER_REQUEST,
        description="One video per seed (distinct); default: seeds 0..num_seeds-1.",
    )
    num_seeds: Optional[int] = Field(
        None, ge=1, le=MAX_SEEDS_PER_REQUEST, description="Seeds 0..N-1 when `seeds` is not given (default 1)."
    )
    steps: Optional[int] = Field(None, ge=1, le=MAX_SAMPLE_STEPS, description="Denoising steps (default: the sampler's).")
    guidance: Optional[float] = Field(None, ge=0, le=MAX_GUIDANCE, description="Guidance scale (default: the sampler's).")
    frames: Optional[int] = Field(None, ge=1, le=4096, description="Frames, 4k+1 (the CogVideoX and Wan VAEs compress 4 frames into one latent frame).")
    height: Optional[int] = Field(None, ge=8, le=4096, description="Pixel height, a multiple of 8.")
    width: Optional[int] = Field(None, ge=8, le=4096, description="Pixel width, a multiple of 8.")
    adapter: Optional[str] = Field(None, max_length=200, description="A configured LoRA adapter's name; empty: the base model.")

    @field_validator("prompt", "negative_prompt", mode="before")
    @classmethod
    def _strip(cls, v: Any) -> Any:
        return v.strip() if isinstance(v, str) else v

    @field_validator("adapter", mode="before")
    @classmethod
    def _empty_is_none(cls, v: Any) -> Any:
        return (v.strip() or None) if isinstance(v, str) else v

    @field_validator("seeds", mode="before")
    @classmethod
    def _split_seeds(cls, v: Any) -> Any:
        if isinstance(v, str):  # "0,1,2" or "[0, 1, 2]" from a form; counted before any int is made
            parts = [p for p in v.strip().strip("[]").split(",") if p.strip()]
            if len(parts) > MAX_SEEDS_PER_REQUEST:
                raise ValueError(f"at most {MAX_SEEDS_PER_REQUEST} seeds")
            return [p.strip() for p in parts]
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "SampleRequest":
        if self.seeds is not None and len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds must be distinct")
        if self.frames is not None and (self.frames - 1) % 4 != 0:
            raise ValueError("frames must be 4k+1 (the CogVideoX and Wan VAEs compress 4 frames into one latent frame)")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and value % 8 != 0:
                raise ValueError(f"{name} must be a multiple of 8")
        return self

    def seed_list(self) -> list[int]:
        return list(self.seeds) if self.seeds is not None else list(range(self.num_seeds or 1))


class SampleFiles(BaseModel):
    """The files of one seed (absolute paths on the sampler's storage)."""

    seed: int
    video: str
    latents: str
    prompt_embeds: str


class SampleResult(BaseModel):
    sample_id: str
    adapter: Optional[str]
    samples: list[SampleFiles]
    timings_s: dict[str, float]


class SampleAnswer(Answer):
    """What the sampler answers: a `SampleResult`, or the error envelope."""

    result: Optional[SampleResult] = None


# ---- the engine ----------------------------------------------------------------------------------
class Sampler:
    """Holds one diffusers pipeline (CogVideoX or Wan); `sample(request)` runs N seeds and writes files.

    What differs between families (default size, prompt length, latent layout, decoding) comes from
    the folder's `common.families` adapter.

    Args:
        config (`SamplingConfig`): the model, adapters, defaults and limits.
        output_dir (`str`, defaults to `config.output_dir`): where sample folders are written.
    """

    def __init__(self, config: SamplingConfig, output_dir: Optional[str | Path] = None):
        from common.lora import load_lora, select_adapter

        self.config = config
        out = output_dir if output_dir is not None else config.output_dir
        if out is None:
            raise ConfigError("the sampler needs an output folder (SamplingConfig.output_dir)")
        self._out = str(out)  # a folder, or a storage URI (common.storage): each sample is written here, then copied
        if not is_uri(self._out):
            Path(self._out).mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        self._pipe, self.model = load_video_model(config.model_dir, device=config.device, dtype=config.dtype)
        self._device = self._pipe.device
        for name, folder in config.adapters.items():
            load_lora(self._pipe, folder, name)  # the project's one loading path: the trained alpha / r
        if config.adapters:
            select_adapter(self._pipe, None)
        self._family = FAMILIES[self.model.family]
        self._max_seq = config.max_sequence_length or self._family.max_sequence_length(self._pipe)
        self._lock = threading.Lock()
        logger.info("sampler loaded %s (%s) in %.1f s", config.model_dir, self.model.pipeline, time.perf_counter() - t0)

    @property
    def pipeline_name(self) -> str:
        return type(self._pipe).__name__

    def sample(self, request: SampleRequest | dict, image_path: Optional[str] = None) -> SampleAnswer:
        """Sample `request` (a dict is validated as a SampleRequest). Never raises for the request's sake."""
        try:
            req = request if isinstance(request, SampleRequest) else SampleRequest.model_validate(request)
        except ValidationError as err:
            return SampleAnswer.failed(422, "ValidationError", str(invalid_settings(err, "sample request field")))
        try:
            with local_copy(image_path) if image_path is not None else nullcontext(None) as image_here:
                return self._sample(req, image_here)
        except VideoGPAError as err:  # a first frame that storage does not have
            return SampleAnswer(error=ErrorInfo.of(err))
        except MemoryError:
            return SampleAnswer.failed(413, "InputTooLargeError", "The request needs more memory than this replica has.")
        except Exception as err:  # a bug or a broken process: the request fails, the caller lives
            # The log has the details; the answer names the error class only (no text, no paths).
            logger.exception("internal error while sampling")
            return SampleAnswer.failed(500, "InternalError", f"Internal error while sampling ({type(err).__name__}).")

    def _check(self, req: SampleRequest, image_path: Optional[str]) -> Optional[SampleAnswer]:
        """This sampler's own limits (absolute bounds were checked by SampleRequest)."""
        c = self.config

        def invalid(message: str) -> SampleAnswer:
            return SampleAnswer.failed(422, "ValidationError", message)

        if len(req.seed_list()) > c.max_seeds:
            return invalid(f"At most {c.max_seeds} seeds per request.")
        if req.steps is not None and req.steps > c.max_steps:
            return invalid(f"steps must be between 1 and {c.max_steps}.")
        if req.adapter is not None and req.adapter not in c.adapters:
            known = ", ".join(sorted(c.adapters)) or "none"
            return invalid(f"Unknown adapter {req.adapter!r} (configured: {known}).")
        if self.model.i2v and image_path is None:
            return invalid("This is an image-to-video model: upload the first frame as 'image'.")
        if not self.model.i2v and image_path is not None:
            return invalid("This is a text-to-video model: it takes no image.")
        return None

    def _first_frame(self, image_path: str):
        """(PIL image, None) or (None, the error answer) for an uploaded first frame."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(image_path) as opened:
                # Header first: a first frame is resized to the sample size, so anything larger
                # than the largest sample is refused before its pixels are decoded.
                if max(opened.size) > 4096:
                    return None, SampleAnswer.failed(413, "InputTooLargeError", "The uploaded 'image' is over 4096 px on its long side.")
                return opened.convert("RGB"), None
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            return None, SampleAnswer.failed(415, "NotAnImageError", "The uploaded 'image' is not an image this server can read.")

    def _sample(self, req: SampleRequest, image_path: Optional[str]) -> SampleAnswer:
        bad = self._check(req, image_path)
        if bad is not None:
            return bad
        image = None
        if image_path is not None:
            image, bad = self._first_frame(image_path)
            if bad is not None:
                return bad
        c = self.config
        steps = c.default_steps if req.steps is None else req.steps
        guidance = c.default_guidance if req.guidance is None else req.guidance
        default_frames, default_height, default_width = self._family.default_video_size(self._pipe.transformer.config)
        height, width, frames = req.height or default_height, req.width or default_width, req.frames or default_frames
        sample_id = uuid.uuid4().hex
        with publishing(join(self._out, sample_id)) as (here, publish):
            folder = Path(here)
            folder.mkdir(parents=True, exist_ok=True)
            result = self._denoise(req, image, folder, steps, guidance, frames, height, width)
            # 3. Provenance.
            meta = {"request": req.model_dump(mode="json", exclude_none=True), "model": Path(c.model_dir).name,
                    "pipeline": self.pipeline_name, "height": height, "width": width, "frames": frames,
                    "steps": steps, "guidance": guidance}
            (folder / "request.json").write_text(json.dumps(meta, indent=2))
            files = [str(p) for p in sorted(folder.iterdir())]
            where = {Path(f).name: location for f, location in zip(files, publish(files))}
        samples = [SampleFiles(seed=seed, **{key: where[Path(path).name] for key, path in paths.items()})
                   for seed, paths in result["samples"]]
        return SampleAnswer(result=SampleResult(sample_id=sample_id, adapter=req.adapter, samples=samples,
                                                timings_s=result["timings_s"]))

    def _denoise(self, req: SampleRequest, image, folder: Path, steps: int, guidance: float, frames: int,
                 height: int, width: int) -> dict:
        """Every seed of `req` into `folder`: {"samples": [(seed, {video, latents, prompt_embeds: path})], "timings_s"}."""
        import torch

        from common.lora import select_adapter
        from common.video import write_video

        c = self.config
        seeds = req.seed_list()
        timings: dict[str, float] = {}
        with self._lock, torch.inference_mode():
            # 1. Adapter and prompt (encoded once for every seed).
            t0 = time.perf_counter()
            if c.adapters:
                select_adapter(self._pipe, req.adapter)
            do_cfg = guidance > 1.0
            prompt_embeds, negative_embeds = self._pipe.encode_prompt(
                req.prompt, req.negative_prompt, do_classifier_free_guidance=do_cfg,
                num_videos_per_prompt=1, max_sequence_length=self._max_seq, device=self._device,
            )
            torch.save(prompt_embeds[0].float().cpu(), folder / "prompt_embeds.pt")
            timings["encode_prompt"] = time.perf_counter() - t0
            # 2. One denoising run per seed: latents, then the decoded video.
            samples = []
            for seed in seeds:
                t1 = time.perf_counter()
                kwargs: dict[str, Any] = dict(
                    prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds if do_cfg else None,
                    height=height, width=width, num_frames=frames, num_inference_steps=steps,
                    guidance_scale=guidance, generator=torch.Generator(device="cpu").manual_seed(seed),
                    output_type="latent", max_sequence_length=self._max_seq,
                )
                if image is not None:
                    kwargs["image"] = image.resize((width, height))
                latents = self._pipe(**kwargs).frames  # CogVideoX [1, F', C, h, w], Wan [1, C, F, h, w]
                latents = self._family.video_latents(latents, frames)
                video = self._family.decode(self._pipe, latents)  # [1, 3, T, H, W] in [-1, 1]
                video = self._pipe.video_processor.postprocess_video(video=video, output_type="np")[0]  # [T, H, W, 3] in [0, 1]
                video_u8 = (video.clip(0, 1) * 255).round().astype("uint8")
                mp4 = write_video(folder / f"seed-{seed}.mp4", video_u8, fps=c.fps)
                lat = folder / f"seed-{seed}.latents.pt"
                torch.save(latents[0].float().cpu(), lat)
                samples.append((seed, {"video": str(mp4), "latents": str(lat), "prompt_embeds": str(folder / "prompt_embeds.pt")}))
                timings[f"seed_{seed}"] = time.perf_counter() - t1
        return {"samples": samples, "timings_s": timings}
