"""Image sources -> WebDataset shards (``<key>.png`` + ``<key>.json``), and shard readers.

Sources return :class:`ImageSet` (uint8 images at the model's resolution, stable keys, optional class
labels). Shards are plain POSIX tars written in one atomic put, with fixed mtimes so that rewriting the
same data gives the same bytes.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.storage import Store

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


class DataError(ValueError):
    """Input data is missing, unreadable, or inconsistent."""


@dataclass
class ImageSet:
    """``images``: (N, H, W, C) uint8; ``keys``: N unique WebDataset keys; ``labels``: class ids or None."""

    keys: list[str]
    images: np.ndarray
    labels: list[int] | None = None
    meta: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.keys) != len(self.images):
            raise DataError(f"{len(self.keys)} keys for {len(self.images)} images")
        if len(set(self.keys)) != len(self.keys):
            raise DataError("duplicate keys in image set")

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, idx: list[int] | np.ndarray) -> ImageSet:
        idx = [int(i) for i in idx]
        return ImageSet(
            keys=[self.keys[i] for i in idx],
            images=self.images[idx],
            labels=None if self.labels is None else [self.labels[i] for i in idx],
            meta=[self.meta[i] for i in idx] if self.meta else [],
        )

    def to_tensor(self):
        """(N, C, H, W) float32 in [-1, 1], the scaling the diffusion models use."""
        import torch

        return torch.from_numpy(self.images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def images_from_tensor(x) -> np.ndarray:
    """Inverse of :meth:`ImageSet.to_tensor`: (N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    arr = ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(dtype=__import__("torch").uint8)
    return arr.permute(0, 2, 3, 1).cpu().numpy()


# ------------------------------------------------------------------------------------------ sources
def digits_source(image_size: int = 16) -> ImageSet:
    """The 1,797 8x8 handwritten digits that scikit-learn ships, bilinearly upsampled to ``image_size``."""
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images).float()[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    if image_size != 8:
        x = torch.nn.functional.interpolate(
            x, size=(image_size, image_size), mode="bilinear", align_corners=False
        )
    images = (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    keys = [f"digits-{i:04d}" for i in range(len(images))]
    return ImageSet(keys=keys, images=images, labels=[int(v) for v in digits.target])


def _safe_key(rel: Path) -> str:
    """A WebDataset key from a relative path: no dots (they start extensions), no separators."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(rel.with_suffix("")).replace("/", "__"))


def _load_image(path: Path, image_size: int) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            img = im.copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"unreadable image {path}: {exc}") from exc
    w, h = img.size
    side = min(w, h)  # centre crop to a square, then resize
    img = img.crop(
        ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    )
    return (
        img.resize((image_size, image_size), Image.Resampling.BICUBIC)
        if side != image_size
        else img
    )


def folder_source(root: str | Path, image_size: int) -> ImageSet:
    """Every PNG/JPEG under ``root`` (recursively), centre-cropped and resized to ``image_size``.

    All-grayscale folders give 1 channel; any colour image makes the set RGB (grayscale replicated).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"data folder {root} contains no PNG or JPEG images")
    loaded = [_load_image(p, image_size) for p in files]
    gray = all(im.mode in ("L", "LA", "1", "I", "I;16", "F") for im in loaded)
    mode = "L" if gray else "RGB"
    arrays = [np.asarray(im.convert(mode), dtype=np.uint8) for im in loaded]
    images = np.stack([a[..., None] if a.ndim == 2 else a for a in arrays])
    keys = [_safe_key(p.relative_to(root)) for p in files]
    return ImageSet(keys=keys, images=images)


def cifar10_source(root: str | Path, download: bool = False, train: bool = True) -> ImageSet:
    """CIFAR-10 via ``torchvision.datasets.CIFAR10(root, download=...)`` (32x32 RGB)."""
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(str(root), train=train, download=download)
    except RuntimeError as exc:
        raise DataError(
            f"CIFAR-10 not found under {root} (pass download=True with network): {exc}"
        ) from exc
    split = "train" if train else "test"
    keys = [f"cifar10-{split}-{i:05d}" for i in range(len(ds.data))]
    return ImageSet(
        keys=keys, images=np.asarray(ds.data, dtype=np.uint8), labels=[int(t) for t in ds.targets]
    )


def split(images: ImageSet, num_train: int, seed: int) -> tuple[ImageSet, ImageSet]:
    """Deterministic train/holdout split from a seed; at least one fifth stays held out."""
    n = len(images)
    if n < 2:
        raise DataError(f"need at least 2 images, got {n}")
    num_train = min(num_train, n - max(1, n // 5))
    perm = np.random.default_rng(seed).permutation(n)
    return images.subset(np.sort(perm[:num_train])), images.subset(np.sort(perm[num_train:]))


# ------------------------------------------------------------------------------------------- shards
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


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def write_image_shards(
    store: Store, folder: str, images: ImageSet, shard_size: int = 1000
) -> list[str]:
    """Write ``images`` as WebDataset shards under ``folder``; returns the shard URIs."""
    if shard_size <= 0:
        raise DataError(f"shard_size must be > 0, got {shard_size}")
    uris = []
    for s, start in enumerate(range(0, len(images), shard_size)):
        records = []
        for i in range(start, min(start + shard_size, len(images))):
            meta = dict(images.meta[i]) if images.meta else {}
            if images.labels is not None:
                meta["label"] = images.labels[i]
            records.append((images.keys[i], encode_png(images.images[i]), meta))
        uris.append(store.write_bytes(build_tar(records), folder, shard_name(s)))
    return uris


def read_tar(data: bytes, name: str) -> ImageSet:
    """Parse one WebDataset tar (``.png`` and optional ``.json`` per key) with clear errors."""
    groups: dict[str, dict[str, bytes]] = {}
    # A complete tar ends with two zero blocks; tarfile silently accepts a tar cut at a member boundary.
    if len(data) < 1024 or len(data) % 512 or data[-1024:].count(0) != 1024:
        raise DataError(
            f"corrupt or truncated tar {name}: no end-of-archive marker ({len(data)} bytes)"
        )
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                key, _, ext = base.partition(".")
                groups.setdefault(key, {})[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"corrupt or truncated tar {name}: {exc}") from exc
    keys, images, metas = [], [], []
    for key in sorted(groups):
        parts = groups[key]
        ext = next((e for e in ("png", "jpg", "jpeg") if e in parts), None)
        if ext is None:
            raise DataError(f"{name}: sample {key!r} has no image member (found {sorted(parts)})")
        try:
            with Image.open(io.BytesIO(parts[ext])) as im:
                arr = np.asarray(im.convert("L" if im.mode in ("L", "1", "I", "I;16") else "RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{name}: member {key}.{ext} is not a readable image: {exc}") from exc
        keys.append(key)
        images.append(arr[..., None] if arr.ndim == 2 else arr)
        metas.append(json.loads(parts["json"]) if "json" in parts else {})
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise DataError(f"{name}: mixed image sizes {sorted(shapes)}; one size is required")
    labels = [m["label"] for m in metas] if metas and all("label" in m for m in metas) else None
    stacked = np.stack(images) if images else np.zeros((0, 1, 1, 1), np.uint8)
    return ImageSet(keys=keys, images=stacked, labels=labels, meta=metas)


def read_image_shards(store: Store, folder: str) -> ImageSet:
    """Read every ``shard-*.tar`` under ``folder`` into one :class:`ImageSet` (one size required)."""
    names = [n for n in store.listdir(folder) if n.startswith("shard-") and n.endswith(".tar")]
    if not names:
        raise DataError(f"no shards under {store.uri_of(folder)}")
    parts = [read_tar(store.read_bytes(folder, n), store.uri_of(folder, n)) for n in names]
    shapes = {p.images.shape[1:] for p in parts if len(p)}
    if len(shapes) > 1:
        raise DataError(f"{store.uri_of(folder)}: shards hold mixed image sizes {sorted(shapes)}")
    labels = None
    if all(p.labels is not None for p in parts):
        labels = [lab for p in parts for lab in p.labels]
    return ImageSet(
        keys=[k for p in parts for k in p.keys],
        images=np.concatenate([p.images for p in parts]),
        labels=labels,
        meta=[m for p in parts for m in p.meta],
    )
