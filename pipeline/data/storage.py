"""Store URIs (a local folder or ``s3://bucket/prefix``), filesystems and atomic writes.

One storage layer for the jobs and for Ray: object operations use boto3 (single PUTs are atomic,
errors carry S3 codes); Ray Data (``read_webdataset(..., filesystem=store.fs)``) and Ray Train
(``RunConfig(storage_filesystem=...)``) get the store's pyarrow filesystem, and a store pickles to
Ray workers whole. How S3 is reached (endpoint, region, credentials, credential-free errors) is
:mod:`pipeline.data.s3`.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from pipeline.data.s3 import (
    ObjectNotFound,
    S3Access,
    StorageError,
    _client,
    resolve_s3_access,
    s3_error,
)

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
POINTER = ".current"  # S3: a put_dir folder's pointer object, naming its current version
VERSIONS = ".versions"  # S3: a put_dir folder's versions, each complete before the pointer names it
# S3: the only subtree put_dir writes (models/<run>/<name>/, section 4 of the layout), so the only one
# whose reads look for a pointer: a data or sample shard costs no extra request
VERSIONED_ROOT = "models"


@dataclass(frozen=True)
class Store:
    """A root URI and the filesystem that serves it; ``path`` is the filesystem-relative root
    (``bucket/prefix`` on S3). ``s3`` is set for S3 stores; a store pickles to Ray workers whole."""

    uri: str
    fs: pafs.FileSystem
    path: str
    s3: S3Access | None = None

    @property
    def is_local(self) -> bool:
        return self.s3 is None

    def join(self, *parts: str) -> str:
        """A filesystem path (no scheme) under the root."""
        return "/".join([self.path.rstrip("/"), *[p.strip("/") for p in parts if p]])

    def uri_of(self, *parts: str) -> str:
        """A full URI under the root (``s3://...`` or an absolute local path)."""
        rel = self.join(*parts)
        return rel if self.is_local else f"s3://{rel}"

    # ---------------------------------------------------------------------------------- S3 helpers
    def _bucket_key(self, *parts: str) -> tuple[str, str]:
        bucket, _, key = self.join(*parts).partition("/")
        return bucket, key

    def _call(self, action: str, parts: tuple[str, ...], fn, **kwargs):
        try:
            return fn(**kwargs)
        except Exception as exc:  # boto3/botocore raise many types; all become StorageError
            raise s3_error(exc, self.uri_of(*parts), action, self.s3) from None

    def _list(self, parts: tuple[str, ...], recursive: bool) -> list[dict]:
        bucket, key = self._bucket_key(*parts)
        prefix = key.rstrip("/") + "/" if key else ""
        pages = (
            _client(self.s3)
            .get_paginator("list_objects_v2")
            .paginate(Bucket=bucket, Prefix=prefix, **({} if recursive else {"Delimiter": "/"}))
        )
        out: list[dict] = []
        try:
            for page in pages:  # keys ending in "/" are folder markers (pyarrow makes them)
                out.extend(o for o in page.get("Contents", []) if not o["Key"].endswith("/"))
        except Exception as exc:
            raise s3_error(exc, self.uri_of(*parts), "list", self.s3) from None
        return out

    def _pointer(self, *parts: str) -> dict | None:
        """The pointer object of the folder ``parts`` (S3), None when it has none."""
        bucket, key = self._bucket_key(*parts, POINTER)
        try:
            body = _client(self.s3).get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:
            err = s3_error(exc, self.uri_of(*parts, POINTER), "read", self.s3)
            if isinstance(err, ObjectNotFound):
                return None
            raise err from None
        return json.loads(body)

    def _resolve(self, parts: tuple[str, ...], folder: bool) -> tuple[str, ...]:
        """``parts`` with the put_dir folder among its ancestors (or itself, when ``folder``: the path
        may be a folder) replaced by its current version's prefix; unchanged locally and where no
        pointer is found. The shallowest pointer wins; one request per level."""
        segs = [s for p in parts for s in p.strip("/").split("/") if s]
        if self.is_local or POINTER in segs or VERSIONS in segs:  # already a version's path
            return tuple(segs)
        if not segs or segs[0] != VERSIONED_ROOT:  # no put_dir folder outside models/
            return tuple(segs)
        for i in range(2, len(segs) + (1 if folder else 0)):
            pointer = self._pointer(*segs[:i])
            if pointer is not None:
                return (*segs[:i], VERSIONS, pointer["version"], *segs[i:])
        return tuple(segs)

    # ---------------------------------------------------------------------------------- operations
    def check(self) -> None:
        """Fail early, with a clear message, when the bucket is missing or access is refused."""
        if self.is_local:
            return
        bucket, key = self._bucket_key()
        self._call(
            "open", (), _client(self.s3).list_objects_v2, Bucket=bucket, Prefix=key, MaxKeys=1
        )

    def exists(self, *parts: str) -> bool:
        """Whether a file or a non-empty folder exists at ``parts``."""
        if self.is_local:
            return Path(self.join(*parts)).exists()
        parts = self._resolve(parts, folder=True)
        bucket, key = self._bucket_key(*parts)
        if not key:
            return bool(self._list(parts, recursive=True)[:1])
        try:
            _client(self.s3).head_object(Bucket=bucket, Key=key)
            return True
        except Exception as exc:
            err = s3_error(exc, self.uri_of(*parts), "check", self.s3)
            if not isinstance(err, ObjectNotFound):
                raise err from None
        return bool(self._list(parts, recursive=True)[:1])

    def read_bytes(self, *parts: str) -> bytes:
        if self.is_local:
            try:
                return Path(self.join(*parts)).read_bytes()
            except FileNotFoundError:
                raise ObjectNotFound(f"{self.uri_of(*parts)} does not exist") from None
            except OSError as exc:
                raise StorageError(f"cannot read {self.uri_of(*parts)}: {exc.strerror}") from None
        return self._get(parts, self._resolve(parts, folder=False))

    def _get(self, shown: tuple[str, ...], parts: tuple[str, ...]) -> bytes:
        """The S3 object at ``parts`` (resolved), errors naming ``shown``."""
        bucket, key = self._bucket_key(*parts)
        resp = self._call("read", shown, _client(self.s3).get_object, Bucket=bucket, Key=key)
        try:
            return resp["Body"].read()
        except Exception as exc:
            raise s3_error(exc, self.uri_of(*shown), "read", self.s3) from None

    def write_bytes(self, data: bytes, *parts: str) -> str:
        """Write an object atomically (whole or not at all), recording its sha256. Returns its URI."""
        if self.is_local:
            try:
                atomic_write_local(Path(self.join(*parts)), data)
            except OSError as exc:
                raise StorageError(
                    f"cannot write {self.uri_of(*parts)}: {exc.strerror or exc}"
                ) from exc
        else:
            # One PUT: S3 makes the object visible only once the whole body has arrived.
            bucket, key = self._bucket_key(*parts)
            digest = hashlib.sha256(data).hexdigest()
            self._call(
                "write", parts, _client(self.s3).put_object,
                Bucket=bucket, Key=key, Body=data, Metadata={"sha256": digest},
            )  # fmt: skip
        return self.uri_of(*parts)

    def sha256(self, *parts: str) -> str | None:
        """The sha256 of a stored object (from its S3 metadata when recorded), None if absent."""
        if not self.is_local:
            parts = self._resolve(parts, folder=False)
            bucket, key = self._bucket_key(*parts)
            try:
                head = _client(self.s3).head_object(Bucket=bucket, Key=key)
            except Exception as exc:
                err = s3_error(exc, self.uri_of(*parts), "check", self.s3)
                if isinstance(err, ObjectNotFound):
                    return None
                raise err from None
            recorded = head.get("Metadata", {}).get("sha256")
            if recorded:
                return recorded
        try:
            return hashlib.sha256(self.read_bytes(*parts)).hexdigest()
        except ObjectNotFound:
            return None

    def delete(self, *parts: str) -> None:
        """Remove one object (no error if absent)."""
        if self.is_local:
            Path(self.join(*parts)).unlink(missing_ok=True)
            return
        bucket, key = self._bucket_key(*parts)
        self._call("delete", parts, _client(self.s3).delete_object, Bucket=bucket, Key=key)

    def put_dir(self, local_dir: str | Path, *parts: str) -> str:
        """Copy a local folder to ``parts`` under the root, replacing what was there, so that a reader
        sees the whole old folder or the whole new one, never a mix, and a crash loses neither.

        Locally a staged copy is swapped in (:func:`replace_dir_local`). S3 has no rename, only
        atomic PUTs: the files go under a new ``.versions/<version>/`` prefix, then one PUT of the
        pointer object ``.current`` (naming the version, its files and their sha256) swaps it in;
        the version before stays for readers still copying it, older ones and files of the
        unversioned layout go. The same files as the current version's are not put again. Every
        read through the store resolves the pointer (:meth:`_resolve`)."""
        local_dir = Path(local_dir)
        if self.is_local:
            replace_dir_local(local_dir, Path(self.join(*parts)))
            return self.uri_of(*parts)
        segs = [s for p in parts for s in p.strip("/").split("/") if s]
        if len(segs) < 2 or segs[0] != VERSIONED_ROOT:
            raise ValueError(
                f"put_dir writes model folders under {VERSIONED_ROOT}/<run>/ only, got {'/'.join(segs)}"
            )
        files = sorted(
            f.relative_to(local_dir).as_posix() for f in local_dir.rglob("*") if f.is_file()
        )
        digests = {rel: file_sha256(local_dir / rel) for rel in files}
        previous = self._pointer(*parts)
        if previous is not None and previous.get("sha256") == digests:
            return self.uri_of(*parts)  # the same files: a rerun rewrites nothing
        version = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{uuid.uuid4().hex[:8]}"
        for rel in files:
            self.write_bytes((local_dir / rel).read_bytes(), *parts, VERSIONS, version, rel)
        pointer = {"version": version, "files": files, "sha256": digests}
        self.write_bytes(json.dumps(pointer, sort_keys=True).encode(), *parts, POINTER)  # the swap
        keep = {version, previous["version"] if previous else version}
        prefix = self._bucket_key(*parts)[1].rstrip("/") + "/"
        for obj in self._list(parts, recursive=True):
            rel = obj["Key"][len(prefix) :]
            head, _, rest = rel.partition("/")
            if rel != POINTER and not (head == VERSIONS and rest.split("/", 1)[0] in keep):
                self.delete(*parts, rel)
        return self.uri_of(*parts)

    def delete_dir(self, *parts: str) -> None:
        """Remove a folder and everything under it, S3 folder markers included (none: no error)."""
        try:
            self.fs.delete_dir(self.join(*parts))
        except FileNotFoundError:
            pass
        except OSError as exc:
            msg = f"cannot delete {self.uri_of(*parts)}: {exc}"
            raise StorageError(self.s3.scrub(msg) if self.s3 else msg) from None

    def get_dir(self, local_dir: str | Path, *parts: str) -> Path:
        """Copy a folder under the root to a local folder (a no-op path for local stores). On S3 the
        copy is of one version (:meth:`put_dir`); a swap that removes it midway restarts the copy on
        the new one."""
        if self.is_local:
            return Path(self.join(*parts))
        local_dir = Path(local_dir)
        for attempt in range(3):
            resolved = self._resolve(parts, folder=True)
            written: list[Path] = []
            try:
                return self._copy_prefix(local_dir, resolved, parts, written)
            except ObjectNotFound:
                for path in written:
                    path.unlink(missing_ok=True)
                if attempt == 2 or self._resolve(parts, folder=True) == resolved:
                    raise
        raise AssertionError("unreachable")

    def _copy_prefix(
        self, local_dir: Path, resolved: tuple[str, ...], parts: tuple[str, ...], written: list
    ) -> Path:
        prefix = self._bucket_key(*resolved)[1].rstrip("/") + "/"
        rels = [o["Key"][len(prefix) :] for o in self._list(resolved, recursive=True)]
        rels = [r for r in rels if r.partition("/")[0] not in (POINTER, VERSIONS)]
        if not rels:
            raise ObjectNotFound(f"{self.uri_of(*parts)} does not exist or is empty")
        for rel in rels:
            dest = local_dir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(self._get((*parts, rel), (*resolved, rel)))
            written.append(dest)
        return local_dir

    def listdir(self, *parts: str) -> list[str]:
        """Base names of the files directly under a folder (sorted; empty if absent)."""
        if self.is_local:
            folder = Path(self.join(*parts))
            return (
                sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
            )
        names = (o["Key"].rsplit("/", 1)[-1] for o in self._list(self._resolve(parts, True), False))
        return sorted(n for n in names if n != POINTER)


def open_store(uri: str | Store, s3_endpoint: str | None = None, create: bool = True) -> Store:
    """Resolve a store root (a :class:`Store` is returned as is).

    ``create``: a local root is created and checked writable; an S3 root is checked reachable (the
    bucket exists and the credentials are accepted), so that bad input fails before any work.
    """
    if isinstance(uri, Store):
        return uri
    if uri.startswith("s3://"):
        path = uri[len("s3://") :].strip("/")
        bucket = path.split("/", 1)[0]
        if not _BUCKET_RE.match(bucket):
            raise StorageError(
                f"invalid bucket name {bucket!r} in {uri!r}: 3-63 lowercase letters, digits, '.', '-'"
            )
        access = resolve_s3_access(s3_endpoint)
        store = Store(uri=f"s3://{path}", fs=access.filesystem(), path=path, s3=access)
        if create:
            store.check()
        return store
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


def file_sha256(path: Path) -> str:
    """The sha256 of a local file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


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


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where that fails."""
    renameat2 = getattr(ctypes.CDLL(None), "renameat2", None)  # -100: AT_FDCWD, 2: RENAME_EXCHANGE
    return renameat2 is not None and renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0


def replace_dir_local(source: Path, target: Path) -> None:
    """Replace the folder ``target`` by a copy of ``source`` so that a crash never loses both: copy
    beside it, swap, then remove the old copy. The swap is an atomic exchange where the filesystem has
    it, else two renames (old -> ``.<name>.old-*``, staged -> target; undone if the second fails)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        shutil.copytree(source, stage, dirs_exist_ok=True)
        if not target.exists():
            stage.rename(target)
        elif not _exchange(stage, target):  # after an exchange the old folder lies at `stage`
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            target.rename(old)
            try:
                stage.rename(target)
            except BaseException:
                old.rename(target)
                raise
            stage = old
    except OSError as exc:
        raise StorageError(f"cannot write {target}: {exc}") from exc
    finally:
        shutil.rmtree(stage, ignore_errors=True)
