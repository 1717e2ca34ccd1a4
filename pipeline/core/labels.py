"""Random binary labels from a keyed hash: the same bit for a key on every worker, shard and rerun."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch


def random_bit(key: str, label_seed: int) -> int:
    """``y_k``: the low bit of BLAKE2b(key) keyed with the label seed (CPSample's random labels)."""
    digest = hashlib.blake2b(
        key.encode(), key=str(int(label_seed)).encode(), digest_size=8
    ).digest()
    return digest[0] & 1


def random_bits(keys: Iterable[str], label_seed: int) -> torch.Tensor:
    """``(N,)`` float tensor of the keys' bits, ready for ``BCEWithLogitsLoss``."""
    return torch.tensor([float(random_bit(k, label_seed)) for k in keys])


def holdout_roles(keys: list[str], n_bits: int) -> tuple[list[int], list[int]]:
    """(trained, never seen): indices of held-out images by role in the classifier's training.

    The classifier trains on the held-out images whose keys sort first, ``n_bits`` of them (at most
    all but one), each with its own random bit; the rest are never seen by any model, so they alone
    measure calibration and serve as membership-inference non-members."""
    order = sorted(range(len(keys)), key=keys.__getitem__)
    n_bits = min(max(0, n_bits), max(0, len(keys) - 1))
    return order[:n_bits], order[n_bits:]
