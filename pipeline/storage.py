"""Store URIs (a local folder or ``s3://bucket/prefix``), filesystems and atomic writes.

pyarrow filesystems serve Ray Data and Ray Train alike. pyarrow ignores ``AWS_ENDPOINT_URL``, so the
S3 endpoint is passed explicitly (``endpoint_override``); credentials come from the usual AWS chain
and never appear in messages.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs


class StorageError(RuntimeError):
    """A store location cannot be read or written."""


@dataclass(frozen=True)
class Store:
    """A root URI and the filesystem that serves it; ``path`` is the filesystem-relative root."""

    uri: str
    fs: pafs.FileSystem
    path: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def join(self, *parts: str) -> str:
        """A filesystem path (no scheme) under the root."""
        return "/".join([self.path.rstrip("/"), *[p.strip("/") for p in parts if p]])

    def uri_of(self, *parts: str) -> str:
        """A full URI under the root (``s3://...`` or an absolute local path)."""
        rel = self.join(*parts)
        return rel if self.is_local else f"s3://{rel}"

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.join(*parts)).type != pafs.FileType.NotFound

    def read_bytes(self, *parts: str) -> bytes:
        with self.fs.open_input_stream(self.join(*parts)) as fh:
            return fh.read()

    def write_bytes(self, data: bytes, *parts: str) -> str:
        """Write an object atomically: whole or not at all. Returns its URI."""
        path = self.join(*parts)
        try:
            if self.is_local:
                atomic_write_local(Path(path), data)
            else:
                # An S3 PUT (and a completed multipart upload) is atomic.
                with self.fs.open_output_stream(path) as fh:
                    fh.write(data)
        except OSError as exc:
            raise StorageError(
                f"cannot write {self.uri_of(*parts)}: {exc.strerror or exc}"
            ) from exc
        return self.uri_of(*parts)

    def put_dir(self, local_dir: str | Path, *parts: str) -> str:
        """Copy a local folder to ``parts`` under the root, replacing what was there.

        Locally the copy is staged beside the target and renamed in; on S3 each object PUT is atomic and
        the folder's marker file (the last one written) says it is complete.
        """
        local_dir = Path(local_dir)
        files = sorted(p for p in local_dir.rglob("*") if p.is_file())
        if self.is_local:
            target = Path(self.join(*parts))
            target.parent.mkdir(parents=True, exist_ok=True)
            stage = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
            try:
                shutil.copytree(local_dir, stage, dirs_exist_ok=True)
                if target.exists():
                    shutil.rmtree(target)
                stage.rename(target)
            finally:
                shutil.rmtree(stage, ignore_errors=True)
        else:
            for f in files:
                self.write_bytes(f.read_bytes(), *parts, str(f.relative_to(local_dir)))
        return self.uri_of(*parts)

    def get_dir(self, local_dir: str | Path, *parts: str) -> Path:
        """Copy a folder under the root to a local folder (a no-op path for local stores)."""
        if self.is_local:
            return Path(self.join(*parts))
        local_dir = Path(local_dir)
        sel = pafs.FileSelector(self.join(*parts), recursive=True, allow_not_found=True)
        prefix = self.join(*parts).rstrip("/") + "/"
        for info in self.fs.get_file_info(sel):
            if info.type == pafs.FileType.File:
                dest = local_dir / info.path[len(prefix) :]
                dest.parent.mkdir(parents=True, exist_ok=True)
                with self.fs.open_input_stream(info.path) as fh:
                    dest.write_bytes(fh.read())
        return local_dir

    def listdir(self, *parts: str) -> list[str]:
        """Base names of the files directly under a folder (sorted; empty if absent)."""
        sel = pafs.FileSelector(self.join(*parts), allow_not_found=True)
        return sorted(
            Path(i.path).name for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File
        )


def s3_filesystem(endpoint: str | None = None) -> pafs.S3FileSystem:
    """pyarrow S3 filesystem with the endpoint from the argument or ``AWS_ENDPOINT_URL``."""
    endpoint = (
        endpoint or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    )
    kwargs: dict = {}
    if endpoint:
        scheme = "https" if endpoint.startswith("https://") else "http"
        kwargs["endpoint_override"] = endpoint.split("://", 1)[-1]
        kwargs["scheme"] = scheme
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def open_store(uri: str, s3_endpoint: str | None = None, create: bool = True) -> Store:
    """Resolve a store root. Local roots are created (and checked writable) when ``create``."""
    if uri.startswith("s3://"):
        return Store(uri=uri, fs=s3_filesystem(s3_endpoint), path=uri[len("s3://") :].rstrip("/"))
    if "://" in uri:
        raise StorageError(f"unsupported store URI {uri!r}: use a local path or s3://bucket/prefix")
    root = Path(uri).expanduser().resolve()
    if create:
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = root / f".write-probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StorageError(
                f"store {str(root)!r} is not writable: {exc.strerror or exc}"
            ) from exc
    return Store(uri=str(root), fs=pafs.LocalFileSystem(), path=str(root))


def atomic_write_local(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, fsync, then rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
