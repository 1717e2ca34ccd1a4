"""The WebDataset tar format (``<key>.png`` + ``<key>.json``): write and read one shard.

Tars are written as plain POSIX tars with fixed mtimes, so that the same records give the same bytes.
Readers accept any WebDataset tar (optionally gzipped, ``.cls`` labels, ``.txt`` captions) and reject
cut ones.
"""

from __future__ import annotations

import io
import json
import tarfile
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.data.imageset import DataError, ImageSet, fit_square, stack_images

# the image members a sample may have, in preference order
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


def encode_png(image: np.ndarray) -> bytes:
    """(H, W, C) uint8 -> PNG bytes (mode L or RGB)."""
    img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def build_tar(records: list[tuple[str, bytes, dict[str, Any]]]) -> bytes:
    """A WebDataset tar of ``(key, png_bytes, meta)`` records, byte-for-byte reproducible."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, png, meta in records:
            for name, data in (
                (f"{key}.png", png),
                (f"{key}.json", json.dumps(meta, sort_keys=True).encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ readers
def _tar_members(data: bytes, name: str) -> dict[str, dict[str, bytes]]:
    """``{key: {ext: bytes}}`` of a (optionally gzipped) tar; WebDataset's key = basename up to the
    first dot. A cut or damaged tar raises :class:`DataError` naming ``name``."""
    import gzip

    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise DataError(f"corrupt or truncated tar {name}: bad gzip stream ({exc})") from None
    # A complete tar ends with two zero blocks; tarfile silently accepts a tar cut at a member boundary.
    if len(data) < 1024 or len(data) % 512 or data[-1024:].count(0) != 1024:
        raise DataError(
            f"corrupt or truncated tar {name}: no end-of-archive marker ({len(data)} bytes)"
        )
    groups: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                key, _, ext = base.partition(".")
                groups.setdefault(key, {})[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"corrupt or truncated tar {name}: {exc}") from None
    return groups


def _decode(parts: dict[str, bytes], key: str, name: str) -> Image.Image:
    ext = next((e for e in IMAGE_EXTS if e in parts), None)
    if ext is None:
        raise DataError(f"{name}: sample {key!r} has no image member (found {sorted(parts)})")
    try:
        with Image.open(io.BytesIO(parts[ext])) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"{name}: member {key}.{ext} is not a readable image: {exc}") from None


def _meta(parts: dict[str, bytes], key: str, name: str) -> dict[str, Any]:
    try:
        meta = json.loads(parts["json"]) if "json" in parts else {}
        meta = meta if isinstance(meta, dict) else {"value": meta}
        if "cls" in parts and "label" not in meta:  # webdataset's class-label convention
            meta["label"] = int(parts["cls"].decode().strip())
        if "txt" in parts and "caption" not in meta:  # a caption (LAION-style image + .txt)
            meta["caption"] = parts["txt"].decode("utf-8").strip()
    except (ValueError, UnicodeDecodeError):
        raise DataError(f"{name}: sample {key!r} has unreadable .json/.cls/.txt metadata") from None
    return meta


def read_records(data: bytes, name: str) -> tuple[list[str], list[dict[str, Any]]]:
    """The sorted keys of one WebDataset tar and each key's JSON record (as :func:`read_tar` reads
    them), without decoding an image: every key must still have an image member. A truncated or
    corrupt tar raises :class:`DataError`."""
    groups = _tar_members(data, name)
    keys = sorted(groups)
    for key in keys:
        if not any(e in groups[key] for e in IMAGE_EXTS):
            raise DataError(
                f"{name}: sample {key!r} has no image member (found {sorted(groups[key])})"
            )
    return keys, [_meta(groups[k], k, name) for k in keys]


def read_tar(data: bytes, name: str, image_size: int | None = None) -> ImageSet:
    """Parse one WebDataset tar (an image and optional ``.json``/``.cls``/``.txt`` (caption) per key).

    ``image_size`` None: every image must already have one size; otherwise each is centre-cropped and
    resized. Grayscale stays 1 channel unless some image is colour (then all become RGB)."""
    groups = _tar_members(data, name)
    keys = sorted(groups)
    loaded = [_decode(groups[k], k, name) for k in keys]
    if image_size is not None:
        loaded = [fit_square(im, image_size) for im in loaded]
    sizes = {im.size for im in loaded}
    if len(sizes) > 1:
        raise DataError(
            f"{name}: mixed image sizes {sorted(sizes)} (width, height); one size is required "
            "(pass an image size to resize)"
        )
    metas = [_meta(groups[k], k, name) for k in keys]
    labels = [m["label"] for m in metas] if metas and all("label" in m for m in metas) else None
    return ImageSet(keys=keys, images=stack_images(loaded), labels=labels, meta=metas)


def concat(parts: list[ImageSet], where: str) -> ImageSet:
    """One :class:`ImageSet` from several (one image size required; grayscale promoted to RGB)."""
    parts = [p for p in parts if len(p)]
    if not parts:
        raise DataError(f"{where}: no images")
    sizes = {p.images.shape[1:3] for p in parts}
    if len(sizes) > 1:
        raise DataError(f"{where}: shards hold mixed image sizes {sorted(sizes)}")
    if len({p.images.shape[-1] for p in parts}) > 1:
        parts = [
            ImageSet(p.keys, np.repeat(p.images, 3, -1) if p.images.shape[-1] == 1 else p.images,
                     p.labels, p.meta)
            for p in parts
        ]  # fmt: skip
    labels = None
    if all(p.labels is not None for p in parts):
        labels = [lab for p in parts for lab in p.labels]
    keys = [k for p in parts for k in p.keys]
    dupes = sorted({k for k in keys if keys.count(k) > 1}) if len(set(keys)) < len(keys) else []
    if dupes:
        raise DataError(f"{where}: duplicate sample keys across shards {dupes[:5]}")
    return ImageSet(
        keys=keys,
        images=np.concatenate([p.images for p in parts]),
        labels=labels,
        meta=[m for p in parts for m in p.meta],
    )
