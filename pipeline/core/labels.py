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
