"""Random binary labels from a keyed hash."""

from __future__ import annotations

import torch

from pipeline.core.labels import random_bit, random_bits


def test_random_bit_is_stable_and_binary():
    keys = [f"digits-{i:04d}" for i in range(50)]
    first = [random_bit(k, 1234) for k in keys]
    assert first == [random_bit(k, 1234) for k in keys]
    assert set(first) <= {0, 1}
    assert len(set(first)) == 2


def test_random_bit_depends_on_label_seed():
    keys = [f"img-{i}" for i in range(500)]
    a = [random_bit(k, 1) for k in keys]
    b = [random_bit(k, 2) for k in keys]
    disagree = sum(x != y for x, y in zip(a, b)) / len(keys)
    # independent seeds should disagree on about half of the keys
    assert 0.4 < disagree < 0.6


def test_random_bit_depends_on_key():
    bits = {random_bit(f"k{i}", 7) for i in range(40)}
    assert bits == {0, 1}


def test_random_bits_balanced_over_2000_keys():
    keys = [f"cifar10-train-{i:05d}" for i in range(2000)]
    for seed in (0, 1234):
        bits = random_bits(keys, seed)
        assert bits.shape == (2000,)
        assert bits.dtype == torch.float32
        assert set(bits.unique().tolist()) == {0.0, 1.0}
        assert 0.45 <= float(bits.mean()) <= 0.55
        assert bits.tolist() == [float(random_bit(k, seed)) for k in keys]


def test_random_bits_empty():
    assert random_bits([], 3).shape == (0,)
