"""Provenance: content hashes of what made an artifact, and the refusal to reuse an artifact made by others.

Every artifact (checkpoint, exported model, sample shard, report) records the digests of its inputs in
its JSON under ``"provenance"``: a mapping of input name (``"config"``, ``"data"``, ``"denoiser"``,
``"classifier"``, ``"sampler"``) to a ``sha256:<hex>`` digest. A resume or a reuse compares the recorded
mapping with the one the rerun would record, and on any difference raises :class:`StaleArtifactError`
naming the inputs that changed and the two ways on: a new ``--run``, or ``--overwrite``.

Digests:
- a JSON-able value (a resolved config, a manifest): sha256 of its canonical JSON (sorted keys, no spaces);
- a file: sha256 of its bytes;
- a directory (an exported model): sha256 over the sorted relative paths and file digests, leaving out
  ``provenance.json`` itself, so that the digest names the weights and configs, not where they lie.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

PROVENANCE = "provenance.json"
_CHUNK = 1 << 20


class StaleArtifactError(RuntimeError):
    """An existing artifact was made from other inputs than the ones a rerun asks for (exit 2)."""


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def value_digest(value: Any) -> str:
    """Digest of a JSON-able value: sha256 of its canonical JSON (key order and spacing do not matter)."""
    return _sha(json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode())


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def dir_digest(path: str | Path, exclude: tuple[str, ...] = (PROVENANCE,)) -> str:
    """Digest of a directory's files (relative paths and contents), ``provenance.json`` left out."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        if f.name in exclude or "__pycache__" in f.parts:
            continue
        h.update(f"{rel}\0{file_digest(f)}\n".encode())
    return "sha256:" + h.hexdigest()


def manifest_digest(manifest: dict[str, Any] | None) -> str | None:
    """Digest of a dataset manifest (its stored form: the transient ``written`` list is left out)."""
    if manifest is None:
        return None
    return value_digest({k: v for k, v in manifest.items() if k != "written"})


def changed_inputs(recorded: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """The input names whose digests differ (an input missing on one side counts as changed).

    An artifact with no recorded provenance at all (written before provenance existed) differs in
    every input: it cannot be shown to match, so it is not reused."""
    if not recorded:
        return sorted(current)
    return sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))


def require_same(
    what: str, recorded: dict[str, Any] | None, current: dict[str, Any], fresh: str = "a new --run"
) -> None:
    """Raise :class:`StaleArtifactError` unless ``recorded`` equals ``current`` input by input; the
    message names the changed inputs and the two ways on (``fresh``, or ``--overwrite``)."""
    changed = changed_inputs(recorded, current)
    if changed:
        raise StaleArtifactError(
            f"{what} was made from other inputs (changed: {', '.join(changed)}); "
            f"use {fresh}, or pass --overwrite to discard the old results"
        )


def write_provenance(directory: str | Path, inputs: dict[str, Any]) -> Path:
    """Write ``provenance.json`` ({"provenance": inputs, "digest": <dir digest>}) into ``directory``."""
    path = Path(directory) / PROVENANCE
    record = {"provenance": inputs, "digest": dir_digest(directory)}
    path.write_text(json.dumps(record, indent=2, sort_keys=True))
    return path


def read_provenance(directory: str | Path) -> dict[str, Any] | None:
    """The ``provenance.json`` record of a directory, None when it has none."""
    path = Path(directory) / PROVENANCE
    if not path.is_file():
        return None
    return json.loads(path.read_text())
