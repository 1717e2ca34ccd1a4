"""Image sources: scikit-learn's digits, a folder of images, CIFAR-10, existing WebDataset shards.

Each returns an :class:`~pipeline.data.imageset.ImageSet` at the model's resolution with stable keys;
:func:`split` makes the deterministic train/held-out split. Writing them as shards is
:mod:`pipeline.data.shards`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.data.imageset import DataError, ImageSet, fit_square, safe_key, stack_images
from pipeline.data.shards import check_blobs, check_shards, read_manifest
from pipeline.data.storage import StorageError, Store, open_store
from pipeline.data.tars import concat, read_tar

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


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


def folder_digest(root: str | Path) -> dict[str, Any]:
    """What :func:`folder_source` reads from ``root``, as ``{"files", "bytes", "sha256"}``: a sha256
    over each image file's relative name, size and content sha256, walked one directory at a time in
    sorted order (files read in 1 MiB chunks), so memory stays one directory listing. Any change to
    the images (added, removed, renamed, rewritten) changes it; other files do not."""
    import hashlib
    import os

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    listing, files, size = hashlib.sha256(), 0, 0
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(names):
            path = Path(folder) / name
            if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
                continue
            content, n = hashlib.sha256(), 0
            with open(path, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    content.update(chunk)
                    n += len(chunk)
            rel = path.relative_to(root).as_posix()
            listing.update(f"{rel}\0{n}\0{content.hexdigest()}\n".encode())
            files, size = files + 1, size + n
    return {"files": files, "bytes": size, "sha256": listing.hexdigest()}


def _load_image(path: Path, image_size: int) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            img = im.copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"unreadable image {path}: {exc}") from exc
    return fit_square(img, image_size)


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
    keys = [safe_key(str(p.relative_to(root).with_suffix("")).replace("/", "__")) for p in files]
    return ImageSet(keys=keys, images=stack_images(loaded))


def cifar10_source(root: str | Path, download: bool = False, train: bool = True) -> ImageSet:
    """CIFAR-10 via ``torchvision.datasets.CIFAR10(root, train=..., download=...)`` (32x32 RGB).

    torchvision unpickles the batch files, but only after checking their md5 against the official
    archive's, so nothing but the official files is ever unpickled.
    """
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(str(root), train=train, download=download)
    except RuntimeError as exc:
        raise DataError(
            f"CIFAR-10 not found or corrupted under {root}: expected the official "
            f"'cifar-10-batches-py' folder (md5-checked by torchvision); pass --download with "
            f"network access ({exc})"
        ) from None
    except OSError as exc:
        raise DataError(f"cannot read or download CIFAR-10 under {root}: {exc}") from None
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


def webdataset_source(
    spec: str, image_size: int | None = None, s3_endpoint: str | None = None
) -> ImageSet:
    """Images of existing WebDataset shards (made by ``webdataset.ShardWriter`` or anyone else).

    ``spec``: a shard path or ``s3://`` URI, a brace pattern (``shards-{000000..000009}.tar``), or a
    folder/prefix whose ``*.tar`` shards are all read. Keys are made safe (no dots or slashes);
    labels come from ``.json`` ``label`` or ``.cls``. ``image_size`` None keeps the stored size,
    which must then be the same for every image. Shards of a project dataset (a split folder with
    ``manifest.json`` one level up, as make_shards writes) are checked against it: names and sha256.
    """
    parts = []
    for store, name, entries in webdataset_inputs(spec, s3_endpoint):
        data = store.read_bytes(name)
        if entries is not None:
            check_blobs(store, "", entries, {name: data})
        parts.append(read_tar(data, store.uri_of(name), image_size))
    images = concat(parts, spec)
    images.keys = [safe_key(k) for k in images.keys]
    ImageSet.__post_init__(images)  # the safe keys must still be unique
    return images


def webdataset_inputs(
    spec: str, s3_endpoint: str | None = None
) -> list[tuple[Store, str, list[dict] | None]]:
    """The input tars of a WebDataset ``spec`` (see :func:`webdataset_source`), as ``(store, name,
    entries)``: the tar is ``name`` under ``store``; ``entries`` is None, or the manifest's shard
    entries it must match when it belongs to a project dataset. Lists, reads no tar."""
    from braceexpand import braceexpand

    inputs = []
    for item in braceexpand(spec):
        is_s3 = item.startswith("s3://")
        parent, _, base = item.rstrip("/").rpartition("/")
        if is_s3 and parent == "s3:/":  # a bare bucket
            parent, base = item.rstrip("/"), ""
        single = base.endswith((".tar", ".tar.gz", ".tgz"))
        store = open_store(parent if single else item, s3_endpoint, create=False)
        if not is_s3 and not single and not Path(item).is_dir():
            raise DataError(f"WebDataset input {item} is neither a shard nor a folder of shards")
        names = [base] if single else [
            n for n in store.listdir() if n.endswith((".tar", ".tar.gz", ".tgz"))
        ]  # fmt: skip
        if not names:
            raise DataError(f"no .tar shards under {store.uri}")
        entries = _manifest_entries(store, whole=not single, s3_endpoint=s3_endpoint)
        inputs += [(store, n, entries) for n in names]
    return inputs


def _manifest_entries(store: Store, whole: bool, s3_endpoint: str | None) -> list[dict] | None:
    """The manifest's shard entries when ``store`` (a folder of shards) is a split folder of a project
    dataset, else None (shards made by anyone else have no manifest). ``whole``: the whole folder is
    read, so its tars must be exactly the manifest's."""
    parent, _, split_name = store.uri.rstrip("/").rpartition("/")
    if not parent or parent.endswith(":/"):
        return None
    try:
        dataset = open_store(parent, s3_endpoint, create=False)
        manifest = read_manifest(dataset, "")
    except StorageError:  # e.g. read access to this prefix only
        return None
    if manifest is None or split_name not in manifest["splits"]:
        return None
    if whole:
        return check_shards(dataset, split_name, manifest, split_name, None)
    return manifest["splits"][split_name]["shards"]
