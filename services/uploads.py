"""Streamed request bodies: file parts go to disk chunk by chunk, with a cap on the whole body and
time limits on receiving it.

Starlette's `request.form()` spools files but has no size cap, so a 10 GB upload would fill the
disk before anyone said no. Here the body is read from `request.stream()` and fed to
python-multipart's streaming parser; the running byte count is checked on every chunk, and the
request folder is removed by the caller (`finally`) whatever happens. `timed_chunks` bounds the
wait for each chunk and for the whole body, so a client sending one byte a second cannot hold an
ingress slot for longer than `upload_timeout_s` (408).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Optional

from python_multipart.multipart import MultipartParser, parse_options_header

#: Suffixes kept on uploaded files (the scorer picks its reader by suffix). Anything else -> ".bin".
KNOWN_SUFFIXES = {".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif", ".zip", ".m4v", ".mpg", ".mpeg", ".ogv"}
MAX_FIELD_BYTES = 64 * 1024


class UploadError(Exception):
    """A malformed or oversized upload; `status` is the HTTP answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class UploadedFile:
    field: str
    filename: str  # as the client named it (display only; never used as a path)
    path: Path  # where it lies, inside the request folder
    size: int = 0


@dataclass
class ParsedForm:
    fields: dict[str, str] = field(default_factory=dict)
    files: list[UploadedFile] = field(default_factory=list)


async def timed_chunks(stream: AsyncIterator[bytes], idle_timeout_s: float, total_timeout_s: float) -> AsyncIterator[bytes]:
    """The chunks of `stream`, or UploadError(408) when one takes longer than `idle_timeout_s` to come
    or the whole body takes longer than `total_timeout_s` (counted from this call)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + total_timeout_s
    chunks = stream.__aiter__()
    while True:
        left = end - loop.time()
        if left <= 0:
            raise UploadError(408, f"The request body was not received within {total_timeout_s:g} s.")
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), timeout=min(idle_timeout_s, left))
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            if loop.time() >= end:
                raise UploadError(408, f"The request body was not received within {total_timeout_s:g} s.") from None
            raise UploadError(408, f"No part of the request body arrived for {idle_timeout_s:g} s.") from None
        yield chunk


async def read_json_object(stream: AsyncIterator[bytes], max_bytes: int) -> dict:
    """A JSON object body, refused (413) as soon as more than `max_bytes` have arrived."""
    body = bytearray()
    async for chunk in stream:
        body += chunk
        if len(body) > max_bytes:
            raise UploadError(413, f"The JSON body is over {max_bytes // 1000} kB.")
    try:
        value = json.loads(bytes(body))
    except ValueError:
        raise UploadError(400, "The body is not valid JSON.") from None
    if not isinstance(value, dict):
        raise UploadError(400, "The body is not a JSON object.")
    return value


def safe_suffix(filename: str) -> str:
    suffix = Path(filename or "").suffix.lower()
    return suffix if suffix in KNOWN_SUFFIXES else ".bin"


def _disposition(value: bytes) -> tuple[Optional[str], Optional[str]]:
    _, params = parse_options_header(value)
    name = params.get(b"name")
    filename = params.get(b"filename")
    return (name.decode("utf-8", "replace") if name is not None else None,
            filename.decode("utf-8", "replace") if filename is not None else None)


async def parse_multipart(
    content_type: str,
    stream: AsyncIterator[bytes],
    folder: Path,
    max_bytes: int,
    max_files: int,
) -> ParsedForm:
    """Stream a multipart/form-data body into `folder`. Raises UploadError (413, 400, 415)."""
    ctype, params = parse_options_header(content_type)
    if ctype != b"multipart/form-data":
        raise UploadError(415, "Send the video as multipart/form-data (field 'video').")
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadError(400, "The multipart body has no boundary.")

    form = ParsedForm()
    state: dict = {"headers": {}, "hname": b"", "hvalue": b"", "file": None, "handle": None, "buf": None, "name": None}
    problems: list[UploadError] = []

    def on_part_begin() -> None:
        state.update(headers={}, hname=b"", hvalue=b"", file=None, handle=None, buf=None, name=None)

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["hname"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["hvalue"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["hname"].lower()] = state["hvalue"]
        state["hname"], state["hvalue"] = b"", b""

    def on_headers_finished() -> None:
        name, filename = _disposition(state["headers"].get(b"content-disposition", b""))
        state["name"] = name or ""
        if filename is not None:
            if len(form.files) >= max_files:
                # A count, not a size: the request is malformed for this route (422), not too large.
                many = "one file" if max_files == 1 else f"at most {max_files} files"
                problems.append(UploadError(422, f"Send {many} per request."))
                return
            path = folder / f"upload-{len(form.files):03d}{safe_suffix(filename)}"
            upload = UploadedFile(field=state["name"], filename=Path(filename).name, path=path)
            form.files.append(upload)
            state["file"] = upload
            state["handle"] = open(path, "wb")
        else:
            state["buf"] = bytearray()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["handle"] is not None:
            state["handle"].write(data[start:end])
            state["file"].size += end - start
        elif state["buf"] is not None:
            state["buf"] += data[start:end]
            if len(state["buf"]) > MAX_FIELD_BYTES and not problems:
                problems.append(UploadError(413, f"Form field '{state['name']}' is over {MAX_FIELD_BYTES} bytes."))

    def on_part_end() -> None:
        if state["handle"] is not None:
            state["handle"].close()
            state["handle"] = None
        elif state["buf"] is not None:
            form.fields[state["name"]] = bytes(state["buf"]).decode("utf-8", "replace")
            state["buf"] = None

    def on_end() -> None:
        state["ended"] = True

    parser = MultipartParser(
        boundary,
        {
            "on_end": on_end,
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    received = 0
    try:
        async for chunk in stream:
            received += len(chunk)
            if received > max_bytes:
                raise UploadError(413, f"The upload is over this service's limit of {max_bytes / 1e6:g} MB.")
            try:
                parser.write(chunk)
            except Exception as err:  # python-multipart's MultipartParseError and friends
                raise UploadError(400, f"Malformed multipart body ({err}).") from None
            if problems:
                raise problems[0]
        try:
            parser.finalize()
        except Exception as err:
            raise UploadError(400, f"Malformed multipart body ({err}).") from None
    finally:
        if state["handle"] is not None:
            state["handle"].close()
    if problems:
        raise problems[0]
    if not state.get("ended"):
        raise UploadError(400, "The multipart body ended early (truncated upload).")
    return form
