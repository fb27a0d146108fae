"""The HTTP ingress: FastAPI routes in front of the scorer and sampler deployments.

The ingress does I/O only: it streams uploads to disk (size cap while streaming), hands the
file's path to a scorer replica through a `DeploymentHandle`, maps every outcome to an HTTP
answer, and removes the upload whatever happens. Paths only travel between deployments; no
request can name a path on the server. OpenAPI: /docs and /openapi.json.

No `from __future__ import annotations` here: FastAPI must resolve the route methods'
`Request` annotations at class creation, which postponed annotations break under @serve.ingress.
"""

import asyncio
import hmac
import json
import logging
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from common.result import ScoreResult
from services.config import REQUEST_SCORE_FIELDS, ServiceArgs
from services.uploads import ParsedForm, UploadError, parse_multipart

logger = logging.getLogger("ray.serve")

STATIC_DIR = Path(__file__).resolve().parent / "static"
_ID = re.compile(r"^[0-9a-f]{32}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


# ---- OpenAPI documentation of the bodies we parse by hand (streamed) ----------------------------
class ErrorBody(BaseModel):
    status: int = Field(description="The HTTP status, repeated.")
    type: str = Field(description="Error class, e.g. NotAVideoError, InputTooLargeError, Overloaded.")
    message: str = Field(description="A complete sentence for a person.")


class ErrorResponse(BaseModel):
    detail: str = Field(description="Same as error.message (FastAPI's convention).")
    error: ErrorBody


class BatchItem(BaseModel):
    filename: str
    status_code: int
    result: Optional[dict] = Field(None, description="The ScoreResult JSON when status_code is 200.")
    error: Optional[ErrorBody] = None


class BatchResponse(BaseModel):
    results: list[BatchItem]


class SampleItem(BaseModel):
    seed: int
    video_url: str = Field(description="GET this URL for the mp4.")
    latents_url: str = Field(description="The final latents ([F, C, h, w], scaled, torch .pt).")
    prompt_embeds_url: str = Field(description="The prompt's text embeddings ([L, D], torch .pt).")
    video: str = Field(description="Reference on the cluster's shared storage (relative to the sampler's output_dir).")


class SampleResponse(BaseModel):
    sample_id: str
    adapter: Optional[str]
    samples: list[SampleItem]
    timings_s: dict[str, float]


_SCORE_FORM_SCHEMA = {
    "type": "object",
    "required": ["video"],
    "properties": {
        "video": {"type": "string", "format": "binary", "description": "mp4/webm/mov/mkv/avi/gif, or a zip of ordered frames."},
        "frames": {"type": "integer", "minimum": 2, "description": "T: frames sampled uniformly and scored."},
        "backend": {"type": "string", "description": "Geometry backend name."},
        "max_side": {"type": "integer", "minimum": 32, "description": "Long side of scored frames (px)."},
        "lambda": {"type": "number", "minimum": 0, "description": "Weight of the perceptual term."},
        "preview": {"type": "boolean", "description": "Also write original | reprojection | error previews (URLs in `previews`)."},
        "timeout_s": {"type": "number", "description": "Deadline for this request (s), at most the service's own."},
    },
}
_BATCH_FORM_SCHEMA = {
    "type": "object",
    "required": ["videos"],
    "properties": {
        "videos": {"type": "array", "items": {"type": "string", "format": "binary"}},
        **{k: v for k, v in _SCORE_FORM_SCHEMA["properties"].items() if k != "video"},
    },
}
_SAMPLE_FORM_SCHEMA = {
    "type": "object",
    "required": ["prompt"],
    "properties": {
        "prompt": {"type": "string"},
        "negative_prompt": {"type": "string"},
        "image": {"type": "string", "format": "binary", "description": "First frame (image-to-video models only)."},
        "seeds": {"type": "string", "description": "Comma-separated integer seeds, e.g. '0,1,2,3'."},
        "num_seeds": {"type": "integer", "description": "Seeds 0..N-1 when `seeds` is not given."},
        "steps": {"type": "integer"},
        "guidance": {"type": "number"},
        "frames": {"type": "integer"},
        "height": {"type": "integer"},
        "width": {"type": "integer"},
        "adapter": {"type": "string", "description": "Name of a configured LoRA adapter; empty: the base model."},
        "timeout_s": {"type": "number"},
    },
}


def _multipart_doc(schema: dict) -> dict:
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 415, 422, 500, 503, 504)}

app = FastAPI(
    title="videogpa",
    version="0.1.0",
    description="Score the 3D geometric consistency of videos (reprojection error), and sample videos from a CogVideoX model.",
)


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str, retry_after: Optional[int] = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.retry_after = status, kind, message, retry_after


def error_response(status: int, kind: str, message: str, retry_after: Optional[int] = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    body = {"detail": message, "error": {"status": status, "type": kind, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


@app.exception_handler(ApiError)
async def _api_error(_: Request, err: ApiError) -> JSONResponse:
    return error_response(err.status, err.kind, err.message, err.retry_after)


_MEDIA_TYPES = {".png": "image/png", ".mp4": "video/mp4"}


def _stored_file(root: Optional[Path], folder_id: str, name: str, what: str) -> FileResponse:
    """A file this service wrote under root/folder_id/name; 404 for anything else.

    Both parts are checked against strict patterns first, so a request can never name a path
    outside `root` (no separators, no "..").
    """
    if root is None or not _ID.match(folder_id) or not _NAME.match(name):
        raise ApiError(404, "NotFound", f"No such {what}.")
    path = root / folder_id / name
    if not path.is_file():
        raise ApiError(404, "NotFound", f"No such {what}.")
    return FileResponse(path, media_type=_MEDIA_TYPES.get(path.suffix, "application/octet-stream"))


def _parse_bool(name: str, value: Optional[str]) -> bool:
    if value is None:
        return False
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ApiError(422, "ValidationError", f"Form field '{name}' must be true or false, not {value!r}.")


def _parse_number(name: str, value: str, kind: type) -> Any:
    try:
        return kind(value.strip())
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ApiError(422, "ValidationError", f"Form field '{name}' must be {what}, not {value!r}.") from None


def score_overrides(fields: dict[str, str]) -> dict[str, Any]:
    """The request's scorer settings (only REQUEST_SCORE_FIELDS), typed; the scorer validates ranges."""
    out: dict[str, Any] = {}
    for form_name, config_name in REQUEST_SCORE_FIELDS.items():
        raw = fields.get(form_name)
        if raw is None or raw.strip() == "":
            continue
        if form_name in ("frames", "max_side"):
            out[config_name] = _parse_number(form_name, raw, int)
        elif form_name == "lambda":
            out[config_name] = _parse_number(form_name, raw, float)
        else:
            out[config_name] = raw.strip()
    return out


def sample_request(fields: dict[str, str]) -> dict:
    """Typed sampler request from form/JSON fields (the sampler validates ranges against its config)."""
    prompt = (fields.get("prompt") or "").strip()
    if not prompt:
        raise ApiError(422, "ValidationError", "Field 'prompt' is required.")
    req: dict[str, Any] = {"prompt": prompt, "negative_prompt": fields.get("negative_prompt") or ""}
    seeds_raw = (fields.get("seeds") or "").strip()
    if seeds_raw:
        text = seeds_raw.strip("[]")
        req["seeds"] = [_parse_number("seeds", s, int) for s in text.split(",") if s.strip()]
    elif fields.get("num_seeds"):
        req["seeds"] = list(range(_parse_number("num_seeds", fields["num_seeds"], int)))
    for name, kind in (("steps", int), ("frames", int), ("height", int), ("width", int), ("guidance", float)):
        raw = fields.get(name)
        if raw is not None and str(raw).strip():
            req[name] = _parse_number(name, str(raw), kind)
    adapter = (fields.get("adapter") or "").strip()
    req["adapter"] = adapter or None
    return req


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    def __init__(self, args: dict, scorer: DeploymentHandle, sampler: Optional[DeploymentHandle] = None):
        self._args = ServiceArgs.model_validate(args)
        self._scorer = scorer
        self._sampler = sampler
        self._token = self._args.auth_token()
        work = self._args.resolved_work_dir()
        self._uploads = work / "uploads"
        self._previews = work / "previews"
        for d in (self._uploads, self._previews):
            d.mkdir(parents=True, exist_ok=True)
        self._samples_dir: Optional[Path] = None
        if self._args.sampler is not None:
            self._samples_dir = Path(self._args.sampler.output_dir or work / "samples")
        self._last_sweep = 0.0
        self._sweep(force=True)

    # ---- housekeeping ---------------------------------------------------------------------------
    def _sweep(self, force: bool = False) -> None:
        """Remove previews past their TTL and uploads left by a replica that died mid-request."""
        now = time.time()
        if not force and now - self._last_sweep < 60:
            return
        self._last_sweep = now
        limits = ((self._previews, self._args.preview_ttl_s), (self._uploads, 2 * self._args.request_timeout_s + 3600))
        for folder, ttl in limits:
            for entry in folder.iterdir() if folder.is_dir() else ():
                try:
                    if now - entry.stat().st_mtime > ttl:
                        shutil.rmtree(entry, ignore_errors=True)
                except FileNotFoundError:
                    pass

    def _check_auth(self, request: Request) -> None:
        if self._token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token.encode()):
            raise ApiError(401, "Unauthorized", "This service needs 'Authorization: Bearer <token>'.")

    async def _read_form(self, request: Request, folder: Path, max_files: int) -> ParsedForm:
        max_bytes = int(self._args.max_upload_mb * 1e6)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            raise ApiError(413, "InputTooLargeError", f"The upload is over this service's limit of {self._args.max_upload_mb:g} MB.")
        try:
            return await parse_multipart(request.headers.get("content-type", ""), request.stream(), folder, max_bytes, max_files)
        except UploadError as err:
            kind = "InputTooLargeError" if err.status == 413 else "BadRequest"
            raise ApiError(err.status, kind, str(err)) from None

    def _timeout(self, fields: dict[str, str]) -> float:
        limit = self._args.request_timeout_s
        raw = fields.get("timeout_s")
        if raw is None or not raw.strip():
            return limit
        value = _parse_number("timeout_s", raw, float)
        if value <= 0:
            raise ApiError(422, "ValidationError", "Form field 'timeout_s' must be positive.")
        return min(value, limit)

    async def _call(self, response, timeout: float, what: str) -> dict:
        """Await a handle call with a deadline; map Serve/Ray failures to ApiError."""
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError

        retry = self._args.retry_after_s
        try:
            return await asyncio.wait_for(response, timeout=timeout)
        except asyncio.TimeoutError:
            response.cancel()
            raise ApiError(504, "DeadlineExceeded", f"{what} did not finish within the {timeout:g} s deadline.") from None
        except BackPressureError:
            raise ApiError(503, "Overloaded", f"The {what.lower()} queue is full; retry later.", retry) from None
        except DeploymentUnavailableError:
            raise ApiError(503, "Unavailable", f"The {what.lower()} deployment is unavailable; retry later.", retry) from None
        except (RayActorError, RequestCancelledError) as err:
            logger.warning("%s replica failed mid-request: %s", what, type(err).__name__)
            raise ApiError(503, "ReplicaFailed", f"A {what.lower()} replica failed while working on this request; retry.", retry) from None
        except Exception as err:  # anything else from the deployment: a 500 that names it, the ingress lives on
            logger.exception("%s failed", what)
            raise ApiError(500, "InternalError", f"{what} failed ({type(err).__name__}).") from None

    def _previews_to_urls(self, result: dict, request_id: str) -> dict:
        folder = (self._previews / request_id).resolve()
        urls = []
        for p in result.get("previews") or []:
            path = Path(p).resolve()
            if path.parent == folder and _NAME.match(path.name):
                urls.append(f"/previews/{request_id}/{path.name}")
        result["previews"] = urls
        return result

    async def _score_one(self, path: Path, overrides: dict, preview: bool, deadline: float) -> tuple[int, dict]:
        request_id = uuid.uuid4().hex
        preview_dir = None
        if preview:
            preview_dir = self._previews / request_id
            preview_dir.mkdir(parents=True)
        try:
            timeout = max(0.0, deadline - time.time())
            answer = await self._call(
                self._scorer.score.remote(str(path), overrides, str(preview_dir) if preview_dir else None, deadline),
                timeout, "Scoring")
        except ApiError:
            if preview_dir is not None:
                shutil.rmtree(preview_dir, ignore_errors=True)
            raise
        if "error" in answer:
            if preview_dir is not None:
                shutil.rmtree(preview_dir, ignore_errors=True)
            return answer["error"]["status"], answer
        return 200, self._previews_to_urls(answer["result"], request_id)

    # ---- routes ---------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index(self) -> HTMLResponse:
        return HTMLResponse((STATIC_DIR / "index.html").read_text(encoding="utf-8"))

    @app.get("/healthz", summary="Liveness: the ingress answers.")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: scorer (and sampler) replicas have their models loaded.",
             responses={503: {"model": ErrorResponse}})
    async def readyz(self):
        try:
            scorer = await asyncio.wait_for(self._scorer.ready.remote(), timeout=10)
            sampler = None
            if self._sampler is not None:
                sampler = await asyncio.wait_for(self._sampler.ready.remote(), timeout=10)
        except Exception as err:  # not ready for whatever reason: the probe's answer is 503
            return error_response(503, "NotReady", f"Not ready ({type(err).__name__}).", self._args.retry_after_s)
        ready = bool(scorer.get("ready")) and (sampler is None or bool(sampler.get("ready")))
        body = {"ready": ready, "scorer": scorer, "sampler": sampler}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/info", summary="What this service offers: limits, default scorer settings, sampler, auth.")
    async def info(self, request: Request) -> dict:
        self._check_auth(request)
        scorer = self._args.scorer
        return {
            "max_upload_mb": self._args.max_upload_mb,
            "max_batch_files": self._args.max_batch_files,
            "request_timeout_s": self._args.request_timeout_s,
            "score_defaults": scorer.score.model_dump(mode="json", by_alias=True, include={"frames", "backend", "max_side", "lambda_"}),
            "max_request_frames": scorer.max_request_frames,
            "max_request_side": scorer.max_request_side,
            "sampler": self._sampler is not None,
            "auth": self._token is not None,
        }

    @app.post("/score", summary="Score one uploaded video.", openapi_extra=_multipart_doc(_SCORE_FORM_SCHEMA),
              responses={200: {"model": ScoreResult}, **_ERRORS})
    async def score(self, request: Request):
        self._check_auth(request)
        self._sweep()
        folder = self._uploads / uuid.uuid4().hex
        folder.mkdir(parents=True)
        try:
            form = await self._read_form(request, folder, max_files=1)
            video = next((f for f in form.files if f.field == "video"), form.files[0] if form.files else None)
            if video is None:
                raise ApiError(422, "ValidationError", "Upload the video as the multipart file field 'video'.")
            if video.size == 0:
                raise ApiError(422, "NotAVideoError", f"The uploaded file '{video.filename}' is empty.")
            overrides = score_overrides(form.fields)
            preview = _parse_bool("preview", form.fields.get("preview"))
            deadline = time.time() + self._timeout(form.fields)
            status, body = await self._score_one(video.path, overrides, preview, deadline)
            if status != 200:
                e = body["error"]
                return error_response(e["status"], e["type"], e["message"])
            return JSONResponse(body)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    @app.post("/score/batch", summary="Score several uploaded videos; one result or error per file, in order.",
              openapi_extra=_multipart_doc(_BATCH_FORM_SCHEMA), response_model=BatchResponse, responses=_ERRORS)
    async def score_batch(self, request: Request):
        self._check_auth(request)
        self._sweep()
        folder = self._uploads / uuid.uuid4().hex
        folder.mkdir(parents=True)
        try:
            form = await self._read_form(request, folder, max_files=self._args.max_batch_files)
            if not form.files:
                raise ApiError(422, "ValidationError", "Upload the videos as multipart file fields named 'videos'.")
            overrides = score_overrides(form.fields)
            preview = _parse_bool("preview", form.fields.get("preview"))
            deadline = time.time() + self._timeout(form.fields)

            # At most a few of the batch's videos wait in the scorer's queue at once, so a batch
            # does not fill the queue and turn its own tail into 503s.
            slots = asyncio.Semaphore(max(1, min(4, self._args.scorer.max_queued_requests // 2)))

            async def one(f) -> dict:
                async with slots:
                    return await score_file(f)

            async def score_file(f) -> dict:
                if f.size == 0:
                    return {"filename": f.filename, "status_code": 422,
                            "error": {"status": 422, "type": "NotAVideoError", "message": "The uploaded file is empty."}}
                try:
                    status, body = await self._score_one(f.path, overrides, preview, deadline)
                except ApiError as err:
                    return {"filename": f.filename, "status_code": err.status,
                            "error": {"status": err.status, "type": err.kind, "message": err.message}}
                if status == 200:
                    return {"filename": f.filename, "status_code": 200, "result": body}
                return {"filename": f.filename, "status_code": status, "error": body["error"]}

            results = await asyncio.gather(*(one(f) for f in form.files))
            return JSONResponse({"results": results})
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    @app.get("/previews/{request_id}/{name}", summary="A preview PNG written for a POST /score with preview=true.",
             response_class=FileResponse, responses={404: {"model": ErrorResponse}})
    async def preview(self, request_id: str, name: str, request: Request):
        self._check_auth(request)
        return _stored_file(self._previews, request_id, name, "preview (previews expire)")

    @app.post("/sample", summary="Sample videos for one prompt (N seeds) from the configured CogVideoX model.",
              openapi_extra=_multipart_doc(_SAMPLE_FORM_SCHEMA), response_model=SampleResponse, responses=_ERRORS)
    async def sample(self, request: Request):
        self._check_auth(request)
        if self._sampler is None:
            raise ApiError(404, "NotConfigured", "This service has no sampler (no model_dir configured).")
        folder = self._uploads / uuid.uuid4().hex
        folder.mkdir(parents=True)
        try:
            ctype = request.headers.get("content-type", "")
            image_path = None
            if ctype.startswith("application/json"):
                body = await request.body()
                if len(body) > 1_000_000:
                    raise ApiError(413, "InputTooLargeError", "JSON body over 1 MB.")
                try:
                    fields = {k: (json.dumps(v) if isinstance(v, list) else str(v))
                              for k, v in json.loads(body).items() if v is not None}
                except (ValueError, AttributeError):
                    raise ApiError(400, "BadRequest", "The body is not a JSON object.") from None
            else:
                form = await self._read_form(request, folder, max_files=1)
                fields = form.fields
                image = next((f for f in form.files if f.field == "image" and f.size > 0), None)
                image_path = str(image.path) if image is not None else None
            req = sample_request(fields)
            answer = await self._call(self._sampler.sample.remote(req, image_path), self._timeout(fields), "Sampling")
            if "error" in answer:
                e = answer["error"]
                return error_response(e["status"], e["type"], e["message"])
            sample_id = answer["sample_id"]
            for item in answer["samples"]:
                for key in ("video", "latents", "prompt_embeds"):
                    item[f"{key}_url"] = f"/samples/{sample_id}/{Path(item[key]).name}"
                item["video"] = f"{sample_id}/{Path(item['video']).name}"
                item.pop("latents", None)
                item.pop("prompt_embeds", None)
            return JSONResponse(answer)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    @app.get("/samples/{sample_id}/{name}", summary="A file written by POST /sample (mp4 or torch .pt).",
             response_class=FileResponse, responses={404: {"model": ErrorResponse}})
    async def sample_file(self, sample_id: str, name: str, request: Request):
        self._check_auth(request)
        return _stored_file(self._samples_dir, sample_id, name, "sample file")
