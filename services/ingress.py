"""The HTTP ingress: FastAPI routes in front of the scorer and sampler deployments.

The ingress does I/O only: it streams uploads to disk (size cap and receive time limits while
streaming), checks from its first bytes that an upload is a video or a zip of images before it
takes a place in the scorer's queue, hands the file's path to a scorer replica through a
`DeploymentHandle`, maps every outcome to an HTTP answer in one JSON shape, and removes the
upload whatever happens. Paths only travel between deployments; no request can name a path on
the server, and no answer carries one (or an exception's text). OpenAPI: /docs and /openapi.json.

Requests with a body hold one of `ingress_max_ongoing_requests` body slots (503 + Retry-After
when all are taken); probes, the page and downloads never wait for one, and /readyz answers from
Serve's own view of the deployments, so probes stay fast whatever the uploads do.

No `from __future__ import annotations` here: FastAPI must resolve the route methods'
`Request` annotations at class creation, which postponed annotations break under @serve.ingress.
"""

import asyncio
import hmac
import logging
import math
import re
import shutil
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from common import storage
from common.containers import HEAD_BYTES, require_frames_source, sniff_container
from common.errors import ErrorInfo, VideoGPAError, invalid_settings
from common.result import ScoreResult
from common.sampling import SampleAnswer, SampleRequest
from common.scorer import REQUEST_FIELDS, ScoreAnswer, ScoreRequest
from services.config import ServiceArgs
from services.uploads import ParsedForm, UploadedFile, UploadError, parse_multipart, read_json_object, timed_chunks

logger = logging.getLogger("ray.serve")

STATIC_DIR = Path(__file__).resolve().parent / "static"
_ID = re.compile(r"^[0-9a-f]{32}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
MAX_JSON_BYTES = 1_000_000
#: /readyz answers from a view of the deployments at most this old (refreshed in the background).
READINESS_REFRESH_S = 2.0


# ---- OpenAPI documentation of the bodies we parse by hand (streamed) ----------------------------
class ErrorResponse(BaseModel):
    detail: str = Field(description="Same as error.message (FastAPI's convention).")
    error: ErrorInfo


class BatchItem(BaseModel):
    filename: str
    status_code: int
    result: Optional[dict] = Field(None, description="The ScoreResult JSON when status_code is 200.")
    error: Optional[ErrorInfo] = None


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


def _score_request_properties() -> dict:
    """The form fields of ScoreRequest, with its (ScoreConfig's) bounds, as OpenAPI properties."""
    properties = ScoreRequest.model_json_schema(by_alias=True)["properties"]
    out = {}
    for name, prop in properties.items():
        typed = next((p for p in prop.get("anyOf", [prop]) if p.get("type") != "null"), prop)
        out[name] = {**typed, "description": prop.get("description", "")}
    return out


_SCORE_FORM_SCHEMA = {
    "type": "object",
    "required": ["video"],
    "properties": {
        "video": {"type": "string", "format": "binary", "description": "mp4/webm/mov/mkv/avi/gif, or a zip of ordered frames."},
        **_score_request_properties(),
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


_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 408, 413, 415, 422, 500, 503, 504)}

app = FastAPI(
    title="videogpa",
    version="0.1.0",
    description="Score the 3D geometric consistency of videos (reprojection error), and sample videos from a CogVideoX or Wan model.",
)


class ApiError(Exception):
    """An HTTP error answer raised inside a route (the handler below sends it)."""

    def __init__(self, status: int, kind: str, message: str, retry_after: Optional[int] = None):
        super().__init__(message)
        self.info, self.retry_after = ErrorInfo(status=status, type=kind, message=message), retry_after


def _error_body(status: int, kind: str, message: str) -> dict:
    """`{"error": {...}}` (common.errors.ErrorInfo, the envelope every engine answers with)."""
    return ErrorInfo(status=status, type=kind, message=message).envelope()


def error_response(status: int, kind: str, message: str, retry_after: Optional[int] = None) -> JSONResponse:
    return info_response(ErrorInfo(status=status, type=kind, message=message), retry_after)


def info_response(error: ErrorInfo, retry_after: Optional[int] = None) -> JSONResponse:
    """The HTTP answer of an error: its envelope, plus FastAPI's `detail`."""
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return JSONResponse({"detail": error.message, **error.envelope()}, status_code=error.status, headers=headers)


@app.exception_handler(ApiError)
async def _api_error(_: Request, err: ApiError) -> JSONResponse:
    return info_response(err.info, err.retry_after)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
    """Starlette's own answers (unknown route 404, wrong method 405) in the same JSON shape."""
    kind = {404: "NotFound", 405: "MethodNotAllowed"}.get(err.status_code, "HTTPError")
    return error_response(err.status_code, kind, f"{err.detail}." if isinstance(err.detail, str) else "HTTP error.")


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    return error_response(422, "ValidationError", "The request's parameters are not valid.")


@app.exception_handler(Exception)
async def _internal_error(_: Request, err: Exception) -> JSONResponse:
    """Anything unexpected: the documented shape, the class name only (never its text or a path)."""
    logger.exception("unhandled error in the ingress")
    return error_response(500, "InternalError", f"Internal error ({type(err).__name__}).")


_MEDIA_TYPES = {".png": "image/png", ".mp4": "video/mp4"}


async def _stored_file(root: Optional[str], folder_id: str, name: str, what: str) -> Response:
    """A file this service wrote under root/folder_id/name (a folder, or a storage URI); 404 for anything else.

    Both parts are checked against strict patterns first, so a request can never name a path
    outside `root` (no separators, no ".."); in a folder the resolved path must then be exactly that
    file, so a symbolic link planted in the folder (to /etc/passwd, or to another request's file)
    is not followed.
    """
    if root is None or not _ID.match(folder_id) or not _NAME.match(name):
        raise ApiError(404, "NotFound", f"No such {what}.")
    media_type = _MEDIA_TYPES.get(Path(name).suffix, "application/octet-stream")
    if storage.is_uri(root):
        try:
            body = await asyncio.to_thread(storage.read_bytes, storage.join(root, folder_id, name))
        except OSError:  # missing (FileNotFoundError), or the store did not answer
            raise ApiError(404, "NotFound", f"No such {what}.") from None
        return Response(body, media_type=media_type)
    expected = Path(root).resolve() / folder_id / name
    try:
        resolved = expected.resolve(strict=True)
    except (OSError, RuntimeError):  # missing, or a link loop
        raise ApiError(404, "NotFound", f"No such {what}.") from None
    if resolved != expected or not resolved.is_file():
        raise ApiError(404, "NotFound", f"No such {what}.")
    return FileResponse(resolved, media_type=media_type)


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


_SCORE_FORM_FIELDS = [ScoreRequest.model_fields[name].alias or name for name in REQUEST_FIELDS]


def score_request(fields: dict[str, str]) -> ScoreRequest:
    """The request's scorer settings from its form fields, validated as `ScoreRequest` (empty fields are absent);
    the scorer checks its own caps."""
    given = {name: fields[name].strip() for name in _SCORE_FORM_FIELDS if (fields.get(name) or "").strip()}
    try:
        return ScoreRequest.model_validate(given)
    except ValidationError as err:
        raise ApiError(422, "ValidationError", str(invalid_settings(err, "form field"))) from None


def sample_request(fields: dict[str, Any]) -> SampleRequest:
    """The sampler's request from form or JSON fields, validated as `SampleRequest` (absolute bounds;
    the sampler checks its own limits). Empty form fields count as absent."""
    given = {k: v for k, v in fields.items() if k != "timeout_s" and v is not None and v != ""}
    try:
        return SampleRequest.model_validate(given)
    except ValidationError as err:
        raise ApiError(422, "ValidationError", str(invalid_settings(err, "field"))) from None


def _upload_api_error(err: UploadError) -> ApiError:
    kind = {408: "UploadTimeout", 413: "InputTooLargeError", 415: "UnsupportedMediaType",
            422: "ValidationError"}.get(err.status, "BadRequest")
    return ApiError(err.status, kind, str(err))


# Everything the class uses is defined above it: Serve serialises the class when it is decorated.
@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    def __init__(self, args: ServiceArgs, scorer: DeploymentHandle, sampler: Optional[DeploymentHandle] = None):
        self._args = args
        self._scorer = scorer
        self._sampler = sampler
        self._token = self._args.auth_token()
        # Uploads arrive in a folder on this node; with a storage URI they are copied there for the scorer, and
        # previews and samples are read back from it (common.storage), so no folder is shared between nodes.
        self._store = self._args.storage_uri()
        work = self._args.resolved_work_dir()
        self._uploads = work / "uploads"
        self._uploads.mkdir(parents=True, exist_ok=True)
        if self._store is None:
            (work / "previews").mkdir(parents=True, exist_ok=True)
        self._previews_at = self._args.location("previews")
        self._samples_at = self._args.samples_location() if self._args.sampler is not None else None
        self._body_slots = asyncio.Semaphore(self._args.ingress_max_ongoing_requests)
        self._readiness: Optional[tuple[int, dict]] = None  # (status, body) of the last refresh
        self._readiness_at = 0.0
        self._readiness_task: Optional[asyncio.Task] = None
        self._last_sweep = 0.0
        self._sweep(force=True)

    # ---- housekeeping ---------------------------------------------------------------------------
    def _sweep(self, force: bool = False) -> None:
        """Remove previews and samples past their TTL, and uploads left by a replica that died mid-request."""
        now = time.time()
        if not force and now - self._last_sweep < 60:
            return
        self._last_sweep = now
        limits = [(self._previews_at, self._args.preview_ttl_s),
                  (str(self._uploads), 2 * self._args.request_timeout_s + 3600)]
        if self._store is not None:
            limits.append((self._args.location("uploads"), 2 * self._args.request_timeout_s + 3600))
        if self._samples_at is not None and self._args.sampler.output_ttl_s is not None:
            limits.append((self._samples_at, self._args.sampler.output_ttl_s))
        for folder, ttl in limits:
            for name, mtime in storage.entries(folder):
                # Only folders we named; an object store's "folders" have no time: its lifecycle rules expire them.
                if _ID.match(name) and mtime is not None and now - mtime > ttl:
                    storage.delete(storage.join(folder, name))

    def _check_auth(self, request: Request) -> None:
        if self._token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token.encode()):
            raise ApiError(401, "Unauthorized", "This service needs 'Authorization: Bearer <token>'.")

    @asynccontextmanager
    async def _body_slot(self) -> AsyncIterator[None]:
        """One of the replica's slots for requests with a body; 503 at once when none is free.

        Serve's own limit for this replica is larger (see services.app), so that the requests
        without a body (probes, the page, downloads) always find room beside the uploads.
        """
        if self._body_slots.locked():
            raise ApiError(503, "Overloaded", "Every upload slot of the service is busy; retry later.",
                           self._args.retry_after_s)
        async with self._body_slots:
            yield

    @asynccontextmanager
    async def _request_folder(self) -> AsyncIterator[Path]:
        """work_dir/uploads/<uuid>/ for this request's files, removed whatever happens."""
        folder = self._uploads / uuid.uuid4().hex
        folder.mkdir(parents=True)
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            if self._store is not None:
                await asyncio.to_thread(storage.delete, self._args.location("uploads", folder.name))

    async def _shared(self, upload: UploadedFile) -> str:
        """Where the replicas behind this one read `upload`: its path, or its copy under the storage URI."""
        if self._store is None:
            return str(upload.path)
        return await asyncio.to_thread(storage.put_file, upload.path,
                                       self._args.location("uploads", upload.path.parent.name, upload.path.name))

    def _body(self, request: Request, arrived: float) -> AsyncIterator[bytes]:
        """The request body's chunks, within the idle and total receive limits (408)."""
        total = self._args.upload_timeout_s - (time.time() - arrived)
        return timed_chunks(request.stream(), self._args.upload_idle_timeout_s, max(total, 0.001))

    async def _read_form(self, request: Request, arrived: float, folder: Path, max_files: int) -> ParsedForm:
        max_bytes = int(self._args.max_upload_mb * 1e6)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            raise ApiError(413, "InputTooLargeError", f"The upload is over this service's limit of {self._args.max_upload_mb:g} MB.")
        try:
            return await parse_multipart(request.headers.get("content-type", ""), self._body(request, arrived), folder,
                                         max_bytes, max_files)
        except UploadError as err:
            raise _upload_api_error(err) from None

    def _deadline(self, arrived: float, raw: Any) -> float:
        """The request's deadline, counted from its arrival: the service's, or less when `timeout_s` asks."""
        limit = self._args.request_timeout_s
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return arrived + limit
        value = _parse_number("timeout_s", str(raw), float)
        if not math.isfinite(value) or value <= 0:
            raise ApiError(422, "ValidationError", "Form field 'timeout_s' must be a positive number of seconds.")
        return arrived + min(value, limit)

    async def _call(self, response, deadline: float, what: str) -> dict:
        """Await a handle call until `deadline`; map Serve/Ray failures to ApiError."""
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError

        retry = self._args.retry_after_s
        try:
            return await asyncio.wait_for(response, timeout=max(0.0, deadline - time.time()))
        except asyncio.TimeoutError:
            response.cancel()  # the replica stops the work at its next check (services.scorer)
            raise ApiError(504, "DeadlineExceededError", f"{what} did not finish within the request's deadline.") from None
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
        folder = storage.join(self._previews_at, request_id)
        urls = []
        for p in result.get("previews") or []:
            name = storage.name_of(p)
            if self._store is not None:
                ours = p == storage.join(folder, name)
            else:
                ours = Path(p).resolve().parent == Path(folder).resolve()
            if ours and _NAME.match(name):
                urls.append(f"/previews/{request_id}/{name}")
        result["previews"] = urls
        return result

    async def _score_one(self, upload: UploadedFile, request: ScoreRequest, preview: bool,
                         deadline: float) -> dict | ErrorInfo:
        """The ScoreResult JSON (preview URLs) or the error for one uploaded file; ApiError when the call failed."""
        if upload.size == 0:
            return ErrorInfo(status=422, type="NotAVideoError", message="The uploaded file is empty.")
        # A cheap look at the first bytes before the file takes a place in the scorer's queue.
        with open(upload.path, "rb") as f:
            head = f.read(HEAD_BYTES)
        try:
            require_frames_source(sniff_container(head), "The uploaded file")
        except VideoGPAError as err:
            return ErrorInfo.of(err)
        request_id = uuid.uuid4().hex
        preview_dir = None
        if preview:
            preview_dir = storage.join(self._previews_at, request_id)
            if self._store is None:
                Path(preview_dir).mkdir(parents=True)
        try:
            answer: ScoreAnswer = await self._call(
                self._scorer.score.remote(await self._shared(upload), request, preview_dir, deadline), deadline, "Scoring")
        except ApiError:
            if preview_dir is not None:
                await asyncio.to_thread(storage.delete, preview_dir)
            raise
        if answer.error is not None:
            if preview_dir is not None:
                await asyncio.to_thread(storage.delete, preview_dir)
            # The scorer names the file as stored here (upload-000.mp4); the client knows its own name.
            message = answer.error.message.replace(upload.path.name, upload.filename or "the uploaded file")
            return answer.error.model_copy(update={"message": message})
        return self._previews_to_urls(answer.result.to_json_dict(), request_id)

    async def _readiness_now(self) -> tuple[int, dict]:
        """Readiness from Serve's own view (the controller's), never through a replica's request queue.

        A scorer replica is RUNNING once its constructor has loaded the models and run the warm-up,
        and stops being so when its health check fails; asking the replica itself would wait
        behind the video it is scoring. The view is refreshed in the background, at most every
        READINESS_REFRESH_S, so a probe only waits for the very first one.
        """
        stale = time.monotonic() - self._readiness_at >= READINESS_REFRESH_S
        if self._readiness_task is None or (self._readiness_task.done() and stale):
            self._readiness_task = asyncio.create_task(self._refresh_readiness())
        if self._readiness is None:
            try:
                await asyncio.wait_for(asyncio.shield(self._readiness_task), timeout=10)
            except asyncio.TimeoutError:
                return 503, _error_body(503, "NotReady", "Not ready (Serve's status did not answer).")
        return self._readiness

    async def _refresh_readiness(self) -> None:
        def running(deployments: dict, name: str) -> int:
            overview = deployments.get(name)
            if overview is None:
                return 0
            return sum(n for state, n in overview.replica_states.items() if getattr(state, "value", state) == "RUNNING")

        try:
            status = await asyncio.to_thread(serve.status)  # a controller call; blocking, so off the event loop
            app_status = status.applications.get(serve.get_replica_context().app_name)
            deployments = app_status.deployments if app_status is not None else {}
            scorers = running(deployments, "Scorer")
            body: dict[str, Any] = {"scorer": {"ready": scorers > 0, "replicas": scorers,
                                               "backend": self._args.scorer.score.backend}, "sampler": None}
            if self._sampler is not None:
                samplers = running(deployments, "Sampler")
                body["sampler"] = {"ready": samplers > 0, "replicas": samplers,
                                   "adapters": sorted(self._args.sampler.adapters)}
            body["ready"] = body["scorer"]["ready"] and (body["sampler"] is None or body["sampler"]["ready"])
            self._readiness = (200 if body["ready"] else 503, body)
        except Exception as err:  # not ready for whatever reason: the probe's answer is 503
            logger.warning("readiness check failed: %s", type(err).__name__)
            self._readiness = (503, _error_body(503, "NotReady", f"Not ready ({type(err).__name__})."))
        self._readiness_at = time.monotonic()

    # ---- routes ---------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index(self) -> HTMLResponse:
        return HTMLResponse((STATIC_DIR / "index.html").read_text(encoding="utf-8"))

    @app.get("/healthz", summary="Liveness: the ingress answers (outside the upload slots).")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: scorer (and sampler) replicas are running, models loaded.",
             responses={503: {"model": ErrorResponse}})
    async def readyz(self):
        status, body = await self._readiness_now()
        headers = {"Retry-After": str(self._args.retry_after_s)} if status != 200 else None
        return JSONResponse(body, status_code=status, headers=headers)

    @app.get("/info", summary="What this service offers: limits, default scorer settings, sampler, auth.")
    async def info(self, request: Request) -> dict:
        self._check_auth(request)
        scorer = self._args.scorer
        return {
            "max_upload_mb": self._args.max_upload_mb,
            "max_batch_files": self._args.max_batch_files,
            "request_timeout_s": self._args.request_timeout_s,
            "upload_timeout_s": self._args.upload_timeout_s,
            "score_defaults": scorer.score.model_dump(mode="json", by_alias=True, include=set(REQUEST_FIELDS)),
            "max_request_frames": scorer.max_request_frames,
            "max_request_side": scorer.max_request_side,
            "sampler": self._sampler is not None,
            "auth": self._token is not None,
        }

    @app.post("/score", summary="Score one uploaded video.", openapi_extra=_multipart_doc(_SCORE_FORM_SCHEMA),
              responses={200: {"model": ScoreResult}, **_ERRORS})
    async def score(self, request: Request):
        arrived = time.time()
        self._check_auth(request)
        self._sweep()
        async with self._body_slot(), self._request_folder() as folder:
            form = await self._read_form(request, arrived, folder, max_files=1)
            video = next((f for f in form.files if f.field == "video"), form.files[0] if form.files else None)
            if video is None:
                raise ApiError(422, "ValidationError", "Upload the video as the multipart file field 'video'.")
            settings = score_request(form.fields)
            preview = _parse_bool("preview", form.fields.get("preview"))
            deadline = self._deadline(arrived, form.fields.get("timeout_s"))
            answer = await self._score_one(video, settings, preview, deadline)
            return info_response(answer) if isinstance(answer, ErrorInfo) else JSONResponse(answer)

    @app.post("/score/batch", summary="Score several uploaded videos; one result or error per file, in order.",
              openapi_extra=_multipart_doc(_BATCH_FORM_SCHEMA), response_model=BatchResponse, responses=_ERRORS)
    async def score_batch(self, request: Request):
        arrived = time.time()
        self._check_auth(request)
        self._sweep()
        async with self._body_slot(), self._request_folder() as folder:
            form = await self._read_form(request, arrived, folder, max_files=self._args.max_batch_files)
            if not form.files:
                raise ApiError(422, "ValidationError", "Upload the videos as multipart file fields named 'videos'.")
            settings = score_request(form.fields)
            preview = _parse_bool("preview", form.fields.get("preview"))
            deadline = self._deadline(arrived, form.fields.get("timeout_s"))

            # At most a few of the batch's videos wait in the scorer's queue at once, so a batch
            # does not fill the queue and turn its own tail into 503s.
            slots = asyncio.Semaphore(max(1, min(4, self._args.scorer.max_queued_requests // 2)))

            async def one(f) -> dict:
                async with slots:
                    return await score_file(f)

            async def score_file(f) -> dict:
                try:
                    answer = await self._score_one(f, settings, preview, deadline)
                except ApiError as err:
                    answer = err.info
                if isinstance(answer, ErrorInfo):
                    return {"filename": f.filename, "status_code": answer.status, **answer.envelope()}
                return {"filename": f.filename, "status_code": 200, "result": answer}

            results = await asyncio.gather(*(one(f) for f in form.files))
            return JSONResponse({"results": results})

    @app.get("/previews/{request_id}/{name}", summary="A preview PNG written for a POST /score with preview=true.",
             response_class=FileResponse, responses={404: {"model": ErrorResponse}})
    async def preview(self, request_id: str, name: str, request: Request):
        self._check_auth(request)
        return await _stored_file(self._previews_at, request_id, name, "preview (previews expire)")

    @app.post("/sample", summary="Sample videos for one prompt (N seeds) from the configured CogVideoX or Wan model.",
              openapi_extra=_multipart_doc(_SAMPLE_FORM_SCHEMA), response_model=SampleResponse, responses=_ERRORS)
    async def sample(self, request: Request):
        arrived = time.time()
        self._check_auth(request)
        if self._sampler is None:
            raise ApiError(404, "NotConfigured", "This service has no sampler (no model_dir configured).")
        self._sweep()
        async with self._body_slot(), self._request_folder() as folder:
            image_path = None
            if request.headers.get("content-type", "").startswith("application/json"):
                try:
                    fields = await read_json_object(self._body(request, arrived), MAX_JSON_BYTES)
                except UploadError as err:
                    raise _upload_api_error(err) from None
            else:
                form = await self._read_form(request, arrived, folder, max_files=1)
                fields = form.fields
                image = next((f for f in form.files if f.field == "image" and f.size > 0), None)
                image_path = await self._shared(image) if image is not None else None
            req = sample_request(fields)
            deadline = self._deadline(arrived, fields.get("timeout_s"))
            answer: SampleAnswer = await self._call(self._sampler.sample.remote(req, image_path), deadline, "Sampling")
            if answer.error is not None:
                return info_response(answer.error)
            result = answer.result
            sample_id = result.sample_id
            items = [SampleItem(seed=f.seed, video=f"{sample_id}/{Path(f.video).name}",
                                **{f"{key}_url": f"/samples/{sample_id}/{Path(getattr(f, key)).name}"
                                   for key in ("video", "latents", "prompt_embeds")})
                     for f in result.samples]
            return JSONResponse(SampleResponse(sample_id=sample_id, adapter=result.adapter, samples=items,
                                               timings_s=result.timings_s).model_dump(mode="json"))

    @app.get("/samples/{sample_id}/{name}", summary="A file written by POST /sample (mp4 or torch .pt).",
             response_class=FileResponse, responses={404: {"model": ErrorResponse}})
    async def sample_file(self, sample_id: str, name: str, request: Request):
        self._check_auth(request)
        return await _stored_file(self._samples_at, sample_id, name, "sample file")

