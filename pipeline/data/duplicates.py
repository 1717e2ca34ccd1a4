"""The duplicated-data scenario: near-duplicate copies of a few training images under new keys.

At scale, copies come mostly from training images that appear many times (Carlini et al. 2023,
Somepalli et al. 2023). :func:`add_near_duplicates` reproduces that on any :class:`ImageSet`: it
picks ``k`` training images and adds ``m`` jittered copies of each (a random shift, brightness and
contrast jitter, pixel noise), so that no byte hash finds them and only a near-duplicate search does.
The truth (copy key -> source key) is returned for the report and for clustering tests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from pipeline.data.imageset import DataError, ImageSet

_SPEC = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class DuplicateSpec:
    """``k`` training images, each given ``m`` near-duplicate copies (``K:M`` on the command line).

    ``shift``: the largest translation in pixels (each axis, uniform integer, edge-padded);
    ``brightness``: the largest additive brightness change (fraction of the range);
    ``contrast``: the largest relative contrast change; ``noise``: the Gaussian pixel noise's
    standard deviation (fraction of the range)."""

    k: int
    m: int
    shift: int = 0
    brightness: float = 0.06
    contrast: float = 0.1
    noise: float = 0.02

    def __post_init__(self) -> None:
        if self.k < 1 or self.m < 1:
            raise DataError(f"duplicates K:M needs K >= 1 and M >= 1, got {self.k}:{self.m}")
        if self.shift < 0 or min(self.brightness, self.contrast, self.noise) < 0:
            raise DataError("duplicate jitter (shift, brightness, contrast, noise) must be >= 0")

    @classmethod
    def parse(cls, text: str) -> DuplicateSpec:
        """``"32:25"`` -> ``DuplicateSpec(k=32, m=25)``; anything else is a :class:`DataError`."""
        match = _SPEC.match(str(text))
        if not match:
            raise DataError(f"--duplicates must be K:M with integers (e.g. 32:25), got {text!r}")
        return cls(k=int(match.group(1)), m=int(match.group(2)))

    def to_dict(self) -> dict:
        return {
            "k": self.k,
            "m": self.m,
            "shift": self.shift,
            "brightness": self.brightness,
            "contrast": self.contrast,
            "noise": self.noise,
        }


def jitter(image: np.ndarray, rng: np.random.Generator, spec: DuplicateSpec) -> np.ndarray:
    """One near-duplicate of an (H, W, C) uint8 image: ``clip(c * (shift(x) - mu) + mu + b + n)``
    with an integer shift (edge-padded), contrast ``c ~ U(1 - contrast, 1 + contrast)`` about the
    image mean ``mu``, brightness ``b ~ U(-brightness, brightness)`` and ``n ~ N(0, noise^2)``, all on
    the [0, 1] scale; rounded back to uint8."""
    x = image.astype(np.float32) / 255.0
    if spec.shift:
        dy, dx = (int(v) for v in rng.integers(-spec.shift, spec.shift + 1, size=2))
        p = spec.shift
        padded = np.pad(x, ((p, p), (p, p), (0, 0)), mode="edge")
        h, w = x.shape[:2]
        x = padded[p + dy : p + dy + h, p + dx : p + dx + w]
    mu = float(x.mean())
    c = 1.0 + rng.uniform(-spec.contrast, spec.contrast)
    b = rng.uniform(-spec.brightness, spec.brightness)
    x = c * (x - mu) + mu + b + rng.normal(0.0, spec.noise, size=x.shape)
    return (np.clip(x, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def add_near_duplicates(
    train: ImageSet, spec: DuplicateSpec, seed: int
) -> tuple[ImageSet, dict[str, str]]:
    """``train`` plus ``spec.m`` jittered copies of ``spec.k`` of its images (a seeded pick), under new
    keys ``<source key>-dup<j>``; returns the new set and ``{copy key: source key}``.

    The copies keep the source's class label (and meta). The sources stay in the set, so each picked picture
    appears ``m + 1`` times."""
    if spec.k > len(train):
        raise DataError(f"duplicates K = {spec.k} exceeds the {len(train)} training images")
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(len(train), size=spec.k, replace=False))
    keys, images, labels, meta, truth = [], [], [], [], {}
    for i in picks:
        for j in range(spec.m):
            key = f"{train.keys[i]}-dup{j:03d}"
            keys.append(key)
            images.append(jitter(train.images[i], rng, spec))
            if train.labels is not None:
                labels.append(train.labels[i])
            if train.meta:
                meta.append(dict(train.meta[i]))
            truth[key] = train.keys[i]
    copies = ImageSet(
        keys=list(train.keys) + keys,
        images=np.concatenate([train.images, np.stack(images)]),
        labels=None if train.labels is None else list(train.labels) + labels,
        meta=list(train.meta) + meta if train.meta else [],
    )
    return copies, truth


def duplicated_sources(truth: dict[str, str]) -> set[str]:
    """Every key of a duplicated picture: the sources and all their copies."""
    return set(truth) | set(truth.values())
