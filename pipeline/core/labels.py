"""Random binary labels from a keyed hash: the same bit for a key on every worker, shard and rerun."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch


def random_bit(key: str, label_seed: int) -> int:
    """``y_k``: the low bit of BLAKE2b(key) keyed with the label seed (CPSample's random labels)."""
    digest = hashlib.blake2b(
        key.encode(), key=str(int(label_seed)).encode(), digest_size=8
    ).digest()
    return digest[0] & 1


def label_key(key: str, label_of: Mapping[str, str] | None) -> str:
    """What a row's bit is drawn from: its near-duplicate cluster's id when ``label_of`` names one
    (cluster bits: every copy of a picture carries the same bit), else the key itself (key bits, the
    paper's labels; a singleton's cluster id is its own key, so both agree off the duplicates)."""
    return key if not label_of else label_of.get(key, key)


def random_bits(
    keys: Iterable[str], label_seed: int, label_of: Mapping[str, str] | None = None
) -> torch.Tensor:
    """``(N,)`` float tensor of the keys' bits ``y = random_bit(label_key(key), label_seed)``, ready
    for ``BCEWithLogitsLoss``; ``label_of``: key -> cluster id (:func:`label_key`)."""
    return torch.tensor([float(random_bit(label_key(k, label_of), label_seed)) for k in keys])


def is_trained_holdout(key: str, label_seed: int, fraction: float) -> bool:
    """Whether the classifier trains on held-out image ``key`` (with its own random bit).

    A keyed hash of the key alone, so any worker decides any row without a global sort or count:
    ``u_k = BLAKE2b_64(key) / 2**64`` keyed with ``f"holdout:{label_seed}"`` (domain-separated from
    :func:`random_bit`'s key, so the role says nothing about the bit), trained iff ``u_k < fraction``.
    ``fraction`` is ``min(1, holdout_images / number of held-out images)``."""
    digest = hashlib.blake2b(
        key.encode(), key=f"holdout:{int(label_seed)}".encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big") < min(1.0, max(0.0, fraction)) * 2.0**64


def holdout_fraction(holdout_images: int, num_holdout: int) -> float:
    """The share of held-out images trained on: ``min(holdout_images, N - 1) / N`` for ``N`` held-out
    images (at most all but one in expectation, so the never-seen set is rarely empty; 0 if none).
    Training (from the manifest's count) and evaluation (from the keys) compute the same value."""
    if num_holdout <= 0:
        return 0.0
    return min(max(0, holdout_images), num_holdout - 1) / num_holdout


def holdout_roles(keys: list[str], n_bits: int, label_seed: int) -> tuple[list[int], list[int]]:
    """(trained, never seen): indices (in ``keys`` order) of held-out images by role in the
    classifier's training.

    A pure per-key rule, :func:`is_trained_holdout` at ``fraction = holdout_fraction(n_bits,
    len(keys))``: about ``n_bits`` images (at most ``len(keys) - 1`` in expectation) are trained on,
    each with its own random bit; the rest are never seen by any model, so they alone measure
    calibration and serve as membership-inference non-members. ``keys`` must be the whole held-out
    split (its size sets the fraction), in any order."""
    fraction = holdout_fraction(n_bits, len(keys))
    trained, never = [], []
    for i, k in enumerate(keys):
        (trained if is_trained_holdout(k, label_seed, fraction) else never).append(i)
    return trained, never


def holdout_info(info: dict[str, Any] | None, holdout_images: int) -> dict[str, Any] | None:
    """The held-out split's ``info`` (``pipeline.train.ingest.split_info``) with the share of it
    trained on with bits: ``fraction`` (``holdout_fraction(holdout_images, rows)``) and ``bits``, the
    expected bit rows. None without ``info``."""
    if info is None:
        return None
    fraction = holdout_fraction(holdout_images, info["rows"])
    return {**info, "fraction": fraction, "bits": round(info["rows"] * fraction)}
