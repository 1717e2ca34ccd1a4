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


def test_is_trained_holdout_is_a_keyed_hash_at_the_fraction():
    from pipeline.core.labels import is_trained_holdout

    keys = [f"digits-{i:05d}" for i in range(4000)]
    assert not any(is_trained_holdout(k, 1234, 0.0) for k in keys[:200])
    assert all(is_trained_holdout(k, 1234, 1.0) for k in keys[:200])
    roles = [is_trained_holdout(k, 1234, 0.3) for k in keys]
    assert 0.27 < sum(roles) / len(keys) < 0.33
    assert roles == [is_trained_holdout(k, 1234, 0.3) for k in keys]  # stable
    # nested in the fraction: a key trained at 0.3 is trained at 0.5
    assert all(is_trained_holdout(k, 1234, 0.5) for k, r in zip(keys, roles) if r)
    # another label seed: other roles; and the role is independent of the image's bit
    other = [is_trained_holdout(k, 7, 0.3) for k in keys]
    assert 0.3 < sum(a != b for a, b in zip(roles, other)) / len(keys) < 0.5
    bits = [random_bit(k, 1234) for k in keys]
    trained_bits = [b for b, r in zip(bits, roles) if r]
    assert 0.45 < sum(trained_bits) / len(trained_bits) < 0.55


def test_holdout_roles_by_hash_in_any_order():
    import random

    from pipeline.core.labels import holdout_fraction, holdout_roles, is_trained_holdout

    keys = [f"h{i:04d}" for i in range(1000)]
    trained, never = holdout_roles(keys, 300, 5)
    assert sorted(trained + never) == list(range(1000))
    assert 250 < len(trained) < 350
    assert all(is_trained_holdout(keys[i], 5, 0.3) for i in trained)
    shuffled = keys[:]
    random.Random(0).shuffle(shuffled)  # read order does not matter: no global sort
    t2, n2 = holdout_roles(shuffled, 300, 5)
    assert {shuffled[i] for i in t2} == {keys[i] for i in trained}
    assert {shuffled[i] for i in n2} == {keys[i] for i in never}
    # at most all but one in expectation; none when n_bits is 0
    assert holdout_fraction(5000, 1000) == 0.999 and holdout_fraction(10, 0) == 0.0
    assert len(holdout_roles(keys, 5000, 5)[1]) <= 10
    assert holdout_roles(keys[:7], 0, 5) == ([], list(range(7)))


def test_cluster_bits_give_every_copy_its_clusters_bit():
    from pipeline.core.labels import label_key

    keys = [f"img-{i}" for i in range(200)]
    copies = [f"img-7-dup{j}" for j in range(40)]
    label_of = {k: "img-7" for k in copies} | {"img-7": "img-7"}
    cluster = random_bits(["img-7", *copies], 5, label_of)
    assert set(cluster.tolist()) == {float(random_bit("img-7", 5))}  # one bit for the picture
    keyed = random_bits(["img-7", *copies], 5)
    assert 0.2 < float(keyed.mean()) < 0.8  # key bits: independent, contradictory labels
    # keys outside any cluster keep their own bit: both sources agree there
    assert random_bits(keys, 5, label_of).tolist() == random_bits(keys, 5).tolist()
    assert label_key("img-3", label_of) == "img-3" and label_key("img-7-dup3", label_of) == "img-7"
    assert label_key("img-7-dup3", None) == "img-7-dup3"
