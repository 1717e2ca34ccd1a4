"""Attack 3 on stored samples: members copied into the samples, chunked streaming equal to the dense
scores, and per-group AUCs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.core.config import EvalConfig
from pipeline.data.imageset import ImageSet
from pipeline.data.shards import read_image_shards, write_image_shards
from pipeline.data.storage import open_store
from pipeline.evaluation.evaluate import attack_sets
from pipeline.evaluation.nn_attack import nn_attack


def _samples(store, run: str, sampler: str, images: np.ndarray) -> None:
    """Sample shards of ``images``, 4 per shard."""
    keys = [f"{sampler}-{i:06d}" for i in range(len(images))]
    write_image_shards(
        store, f"samples/{run}/{sampler}", ImageSet(keys=keys, images=images), shard_size=4
    )


def test_nn_attack_finds_members_copied_into_the_samples(digits_store, tmp_path):
    members, nonmembers, train_mean, _ = attack_sets(digits_store, "digits", 8, 40, seed=0)
    store = open_store(str(tmp_path / "s"))
    # ddim "memorised" every member; cpsample made noise; no samples at all for another run
    _samples(store, "r", "ddim", members.images.copy())
    noise = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 1), dtype=np.uint8)
    _samples(store, "r", "cpsample", noise)
    cfg = EvalConfig(num_permutations=200, seed=0)
    out = nn_attack(store, "r", members, nonmembers, train_mean, cfg)
    assert set(out) == {"ddim", "cpsample"}
    d = out["ddim"]
    assert d["num_members"] == 8 and d["num_nonmembers"] == 40 and d["num_generated"] == 8
    assert d["member_mean"] == pytest.approx(1.0, abs=1e-5)
    assert d["nonmember_mean"] < 0.95
    assert d["auc"] > 0.95 and d["tpr_at_fpr"] > 0.5 and d["fpr"] == 0.01
    assert d["p_value"] == pytest.approx(1 / 201)  # no relabelling beats the copies
    fpr, tpr = d["roc"]["fpr"], d["roc"]["tpr"]
    assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0
    assert out["cpsample"]["num_generated"] == 6 and out["cpsample"]["member_mean"] < 0.9
    json.dumps(out)  # report-ready: plain JSON types only
    assert nn_attack(store, "absent", members, nonmembers, train_mean, cfg) == {}


# ------------------------------------------------------------------------------------ fid_section


def test_nn_attack_streams_the_samples_in_chunks_to_the_dense_scores(digits_store, tmp_path):
    """Chunks of 3 samples (several per shard, several shards) give the dense computation's scores."""
    from pipeline.evaluation.mia import pixel_embedding

    members, nonmembers, train_mean, _ = attack_sets(digits_store, "digits", 8, 40, seed=0)
    store = open_store(str(tmp_path / "s"))
    holdout = read_image_shards(digits_store, "data/digits/holdout")
    gen = np.concatenate([members.images[:3], holdout.images[200:217]])  # 20 samples, 5 shards
    _samples(store, "r", "ddim", gen)
    cfg = EvalConfig(num_permutations=50, seed=0)
    out = nn_attack(store, "r", members, nonmembers, train_mean, cfg, chunk=3)["ddim"]
    g = pixel_embedding(gen, train_mean)
    dense_m = (pixel_embedding(members.images, train_mean) @ g.T).max(1)
    dense_n = (pixel_embedding(nonmembers.images, train_mean) @ g.T).max(1)
    assert out["num_generated"] == 20
    assert out["member_mean"] == pytest.approx(float(dense_m.mean()), abs=1e-6)
    assert out["nonmember_mean"] == pytest.approx(float(dense_n.mean()), abs=1e-6)
    whole = nn_attack(store, "r", members, nonmembers, train_mean, cfg, chunk=4096)["ddim"]
    assert out["auc"] == whole["auc"] and out["roc"] == whole["roc"]


def test_nn_attack_scores_each_member_group_against_the_non_members(digits_store, tmp_path):
    members, nonmembers, train_mean, _ = attack_sets(digits_store, "digits", 8, 40, seed=0)
    store = open_store(str(tmp_path / "s"))
    _samples(store, "r", "ddim", members.images[:4].copy())  # only the first 4 members copied
    groups = {
        "duplicated": set(members.keys[:4]) | {"some-other-key"},
        "unique": set(members.keys[4:]),
        "absent": {"not-a-member"},
    }
    out = nn_attack(
        store, "r", members, nonmembers, train_mean, EvalConfig(num_permutations=50), groups
    )
    g = out["ddim"]["groups"]
    assert g["duplicated"]["num_members"] == 4 and g["duplicated"]["auc"] == 1.0
    assert g["duplicated"]["member_mean"] == pytest.approx(1.0, abs=1e-5)
    assert g["unique"]["num_members"] == 4 and g["unique"]["auc"] < 1.0
    assert g["unique"]["member_mean"] < 0.95
    assert g["absent"] == {"auc": None, "num_members": 0, "member_mean": None}
    # the overall AUC is the members-weighted mix of the two halves
    assert out["ddim"]["auc"] == pytest.approx((g["duplicated"]["auc"] + g["unique"]["auc"]) / 2)
    json.dumps(out)
    assert (
        "groups" not in nn_attack(store, "r", members, nonmembers, train_mean, EvalConfig())["ddim"]
    )
