"""HTTP client of the videogpa service (httpx): retries with back-off on 503/504 and lost connections.

    from clients.http_client import VideoGPAClient, score_via_http
    with VideoGPAClient("http://127.0.0.1:8000") as client:
        result = client.score("video.mp4", frames=10, preview=True)   # the ScoreResult JSON
    result = score_via_http("http://127.0.0.1:8000", "video.mp4", frames=10)

Errors the server reports (4xx, 5xx after the retries) raise `ServiceError`, a `VideoGPAError`
whose `http_status` is the server's and whose message is the server's own sentence, so the CLI
prints it on one line. A folder of ordered images is zipped on the fly (the API takes files only).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import httpx

from common.errors import InputNotFoundError, VideoGPAError

RETRY_STATUSES = (503, 504)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
TOKEN_ENV = "VGPA_API_TOKEN"

PathLike = Union[str, Path]


class ServiceError(VideoGPAError):
    """The service answered with an error; `http_status` and `error_type` are the server's."""

    def __init__(self, http_status: int, message: str, error_type: str = "", retry_after: Optional[float] = None):
        super().__init__(message)
        self.http_status = http_status
        self.error_type = error_type
        self.retry_after = retry_after


def _retry_after(response: httpx.Response) -> Optional[float]:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body = response.json()
        err = body.get("error") or {}
        message = err.get("message") or body.get("detail") or response.text
        kind = err.get("type", "")
    except ValueError:
        message, kind = response.text.strip() or response.reason_phrase, ""
    if not isinstance(message, str):
        message = str(message)
    raise ServiceError(response.status_code, f"{message} (HTTP {response.status_code})", kind, _retry_after(response))


@contextmanager
def _as_upload(path: PathLike) -> Iterator[Path]:
    """A file to upload: the file itself, or a zip of a folder's ordered images (removed afterwards)."""
    p = Path(path)
    if p.is_file():
        yield p
        return
    if not p.is_dir():
        raise InputNotFoundError(f"No such file or folder: {p}")
    images = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise InputNotFoundError(f"The folder {p} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    tmp = Path(tempfile.mkdtemp(prefix="vgpa-upload-"))
    try:
        archive = tmp / f"{p.name or 'frames'}.zip"
        with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zf:
            for f in images:
                zf.write(f, arcname=f.name)
        yield archive
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _form(fields: dict[str, Any]) -> dict[str, str]:
    """Python values -> multipart form strings; None is left out; `lambda_` is sent as `lambda`."""
    out = {}
    for key, value in fields.items():
        if value is None:
            continue
        key = "lambda" if key in ("lambda_", "lam") else key
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        out[key] = str(value)
    return out


class VideoGPAClient:
    """One connection pool to one service. Retries 503/504 and connection failures with back-off.

    Args:
        url (`str`): the service root, e.g. `http://127.0.0.1:8000`.
        token (`str`, defaults to $VGPA_API_TOKEN): bearer token, when the service asks for one.
        timeout (`float`, defaults to 900): seconds for one HTTP exchange (upload + scoring).
        retries (`int`, defaults to 5): extra attempts after a 503/504 or a failed connection.
        backoff (`float`, defaults to 0.5): first wait (s); doubles each attempt, with jitter,
            capped at `max_backoff`; a server's Retry-After wins when it is longer.
    """

    def __init__(
        self,
        url: str,
        token: Optional[str] = None,
        timeout: float = 900.0,
        retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        transport: Optional[httpx.BaseTransport] = None,
    ):
        self.url = url.rstrip("/")
        token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout, connect=10.0),
                                  transport=transport)

    def __enter__(self) -> "VideoGPAClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ---- plumbing ---------------------------------------------------------------------------
    def _wait(self, attempt: int, response: Optional[httpx.Response]) -> None:
        delay = min(self.max_backoff, self.backoff * (2**attempt)) * (0.5 + random.random() / 2)
        hinted = _retry_after(response) if response is not None else None
        if hinted is not None:
            delay = max(delay, min(hinted, self.max_backoff))
        time.sleep(delay)

    def request(self, method: str, path: str, *, files_from: Optional[list[tuple[str, Path]]] = None, **kwargs) -> httpx.Response:
        """One request with retries. `files_from` [(field, path)] is reopened on every attempt."""
        last_error: Optional[Exception] = None
        for attempt in range(self.retries + 1):
            handles = []
            try:
                if files_from is not None:
                    files = []
                    for field, p in files_from:
                        h = open(p, "rb")
                        handles.append(h)
                        files.append((field, (p.name, h, "application/octet-stream")))
                    kwargs["files"] = files
                response = self._http.request(method, path, **kwargs)
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as err:
                last_error = err
                if attempt < self.retries:
                    self._wait(attempt, None)
                    continue
                raise ServiceError(503, f"Could not reach the service at {self.url}: {err}", "ConnectionError") from None
            finally:
                for h in handles:
                    h.close()
            if response.status_code in RETRY_STATUSES and attempt < self.retries:
                self._wait(attempt, response)
                continue
            return response
        raise ServiceError(503, f"No answer from {self.url}: {last_error}", "ConnectionError")  # pragma: no cover

    def _json(self, method: str, path: str, **kwargs) -> dict:
        response = self.request(method, path, **kwargs)
        _raise_for(response)
        return response.json()

    # ---- API --------------------------------------------------------------------------------
    def healthz(self) -> dict:
        return self._json("GET", "/healthz")

    def readyz(self) -> dict:
        return self._json("GET", "/readyz")

    def info(self) -> dict:
        return self._json("GET", "/info")

    def wait_ready(self, timeout: float = 300.0, interval: float = 1.0) -> dict:
        """Poll /readyz until it answers 200 (raises ServiceError after `timeout` s)."""
        end = time.monotonic() + timeout
        while True:
            try:
                r = self._http.get("/readyz", timeout=10)
                if r.status_code == 200:
                    return r.json()
            except httpx.HTTPError:
                pass
            if time.monotonic() > end:
                raise ServiceError(503, f"The service at {self.url} was not ready within {timeout:g} s.", "NotReady")
            time.sleep(interval)

    def score(self, path: PathLike, **form: Any) -> dict:
        """POST /score: `path` is a video file, a zip of frames or a folder of images.

        Form fields: frames, backend, max_side, lambda_ (or lambda), preview, timeout_s.
        Returns the ScoreResult JSON (previews as URLs relative to the service root).
        """
        with _as_upload(path) as upload:
            return self._json("POST", "/score", files_from=[("video", upload)], data=_form(form))

    def score_batch(self, paths: list[PathLike], **form: Any) -> dict:
        """POST /score/batch: one result or error per file, in order."""
        from contextlib import ExitStack

        with ExitStack() as stack:
            uploads = [("videos", stack.enter_context(_as_upload(p))) for p in paths]
            return self._json("POST", "/score/batch", files_from=uploads, data=_form(form))

    def sample(self, prompt: str, image: Optional[PathLike] = None, **form: Any) -> dict:
        """POST /sample: seeds (list), steps, guidance, frames, height, width, adapter, negative_prompt."""
        if image is None:
            return self._json("POST", "/sample", json=_form({"prompt": prompt, **form}))
        if not Path(image).is_file():
            raise InputNotFoundError(f"No such image: {image}")
        data = _form({"prompt": prompt, **form})
        return self._json("POST", "/sample", files_from=[("image", Path(image))], data=data)

    def download(self, url_path: str, dest: PathLike) -> Path:
        """GET a preview or sample file (a URL path the API returned) into `dest`."""
        response = self.request("GET", url_path)
        _raise_for(response)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(response.content)
        return dest


def score_via_http(url: str, path: PathLike, *, token: Optional[str] = None,
                   preview_dir: Optional[PathLike] = None, **form: Any) -> dict:
    """Score `path` through a running service: the same dict as `vgpa score --json` prints.

    `form`: frames, backend, max_side, lambda (or lambda_), preview, timeout_s. With
    `preview_dir`, previews are requested, downloaded there, and listed as local paths (as a
    local `vgpa score --preview DIR` lists them); otherwise `previews` holds URL paths.
    """
    with VideoGPAClient(url, token=token) as client:
        if preview_dir is None:
            return client.score(path, **form)
        result = client.score(path, **{**form, "preview": True})
        folder = Path(preview_dir)
        result["previews"] = [str(client.download(u, folder / u.rsplit("/", 1)[-1])) for u in result.get("previews") or []]
        return result
