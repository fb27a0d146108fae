"""Files that travel between nodes: a local path, or a storage URI that `pyarrow.fs` opens.

A *location* is a string: a path on a filesystem the reader shares with the writer (one machine,
or a shared POSIX mount), or a URI (`s3://bucket/prefix/...`, `gs://bucket/...`, `file:///...`)
that any node can open with `pyarrow.fs.FileSystem.from_uri` and its own credentials (for S3 and
GCS: the usual environment variables or instance roles). With a URI, nothing relies on two nodes
seeing the same folder: a writer works in its own temporary folder and copies the result to the
URI; a reader copies the object into its own temporary folder first.

    with local_copy("s3://b/uploads/1/clip.mp4") as path:   # a node-local file, removed afterwards
        ...
    with publishing("s3://b/previews/7") as (folder, publish):
        write files into folder; uris = publish()            # copied to s3://b/previews/7/<name>
"""

from __future__ import annotations

import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from common.errors import InputNotFoundError

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(location: Optional[str | Path]) -> bool:
    """A storage URI (`scheme://...`), as opposed to a plain path."""
    return isinstance(location, str) and bool(_SCHEME.match(location))


def join(location: str, *parts: str) -> str:
    """`location/part/...` for a URI or a path (a URI keeps its `scheme://`)."""
    if is_uri(location):
        return "/".join([location.rstrip("/"), *parts])
    return str(Path(location, *parts))


def _open(uri: str):
    """(pyarrow filesystem, path inside it) of a URI."""
    from pyarrow import fs

    return fs.FileSystem.from_uri(uri)


def name_of(location: str) -> str:
    """The last part of a location (a file's name)."""
    return location.rstrip("/").rsplit("/", 1)[-1] if is_uri(location) else Path(location).name


def read_bytes(location: str) -> bytes:
    """The whole file at `location`. FileNotFoundError when there is none."""
    if not is_uri(location):
        return Path(location).read_bytes()
    filesystem, path = _open(location)
    with filesystem.open_input_stream(path) as stream:
        return stream.readall()


def put_file(local: str | Path, location: str) -> str:
    """Copy a local file to `location` (a URI or a path); returns `location`."""
    if not is_uri(location):
        Path(location).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, location)
        return location
    from pyarrow import fs

    filesystem, path = _open(location)
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    fs.copy_files(str(local), path, source_filesystem=fs.LocalFileSystem(), destination_filesystem=filesystem)
    return location


def delete(location: str) -> None:
    """Remove the file or folder at `location` (nothing there: nothing to do)."""
    if not is_uri(location):
        path = Path(location)
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        return
    from pyarrow import fs

    filesystem, path = _open(location)
    info = filesystem.get_file_info(path)
    if info.type == fs.FileType.Directory:
        filesystem.delete_dir(path)
    elif info.type == fs.FileType.File:
        filesystem.delete_file(path)


def entries(location: str) -> list[tuple[str, Optional[float]]]:
    """(name, modification time as time.time() or None) of what is directly in the folder `location`.

    Object stores have no time for a "folder" (a key prefix): such entries come with None.
    """
    if not is_uri(location):
        folder = Path(location)
        out = []
        for entry in folder.iterdir() if folder.is_dir() else ():
            try:
                out.append((entry.name, entry.stat().st_mtime))
            except FileNotFoundError:
                pass
        return out
    from pyarrow import fs

    filesystem, path = _open(location)
    infos = filesystem.get_file_info(fs.FileSelector(path, allow_not_found=True))
    return [(info.base_name, info.mtime.timestamp() if info.mtime is not None else None) for info in infos]


@contextmanager
def local_copy(location: str) -> Iterator[str]:
    """A path on this node for the file at `location`: the path itself, or a temporary copy of a URI's object."""
    if not is_uri(location):
        yield location
        return
    from pyarrow import fs

    folder = Path(tempfile.mkdtemp(prefix="vgpa-in-"))
    try:
        local = folder / name_of(location)
        try:
            filesystem, path = _open(location)
            fs.copy_files(path, str(local), source_filesystem=filesystem, destination_filesystem=fs.LocalFileSystem())
        except (OSError, ValueError) as err:  # pyarrow: FileNotFoundError, or OSError from a remote store
            raise InputNotFoundError(f"Cannot read {name_of(location)} from storage ({type(err).__name__}).") from None
        yield str(local)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def publishing(location: Optional[str]) -> Iterator[tuple[Optional[str], Callable[[list[str]], list[str]]]]:
    """(a folder on this node to write into, publish(files) -> their locations) for files meant for `location`.

    For a path the folder is `location` itself and publish changes nothing; for a URI it is a
    temporary folder, publish copies the files to `location/<name>`, and the folder is removed
    when the block ends (what was not published is gone).
    """
    if location is None or not is_uri(location):
        yield location, list
        return
    folder = Path(tempfile.mkdtemp(prefix="vgpa-out-"))

    def publish(files: list[str]) -> list[str]:
        return [put_file(f, join(location, Path(f).name)) for f in files]

    try:
        yield str(folder), publish
    finally:
        shutil.rmtree(folder, ignore_errors=True)
