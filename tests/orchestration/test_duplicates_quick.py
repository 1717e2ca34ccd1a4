"""`jobs/demo.py --scenario duplicates --quick` end to end on a local store: near-duplicate shards,
the denoiser, the clusters, classifiers with key bits and with cluster bits, three samplers, the
replica checks and the scenario report (real local Ray, Ray Train, Ray Data, FAISS)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.labels import holdout_roles
from pipeline.data.shards import read_image_shards
from pipeline.data.storage import open_store

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    out = tmp_path_factory.mktemp("dup") / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "demo.py"), "--scenario", "duplicates", "--quick",
         "--no-progress", "--out", str(out)],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return out, proc, json.loads((out / "reports" / "dup" / "report.json").read_text())


def test_scenario_writes_shards_clusters_models_samples_and_report(scenario):
    out, proc, report = scenario
    manifest = json.loads((out / "data" / "digits-dup" / "manifest.json").read_text())
    copies = manifest["source"]["duplicates"]["copies"]
    assert len(copies) == 4 * 3 and len(set(copies.values())) == 4
    assert report["num_train"] == 300 + 12 and report["num_unique_train"] == 300
    for rel in ("clusters/digits-dup/centred/sidecar.json", "clusters/digits-dup/centred/members.json",
                "models/dup/denoiser/config.json", "models/dup-key/classifier/config.json",
                "models/dup-cluster/classifier/config.json", "samples/dup/ddim/shard-000000.tar",
                "samples/dup-key/cpsample/shard-000000.tar",
                "samples/dup-cluster/cpsample/shard-000000.tar", "reports/dup/report.md",
                "reports/dup/largest_clusters.png", "reports/dup/nn_similarity_hist.png"):  # fmt: skip
        assert (out / rel).is_file(), rel
    assert set(report["samplers"]) == {"ddim", "cpsample-key", "cpsample-cluster"}
    for s in report["samplers"].values():
        assert s["num_samples"] == 64
        parts = s["replication_duplicated"] + s["replication_unique"]
        assert abs(parts - s["replication_rate"]) < 1e-9
        assert s["above_holdout_p99"] <= s["above_holdout_p95"]
        for share in ("above_holdout_p99", "above_holdout_p95"):  # counts of the 64 samples
            assert s[share] * 64 == pytest.approx(round(s[share] * 64))
        assert {"auc_duplicated", "auc_unique", "auc_all"} <= set(s["attack"])
    assert "cpsample-cluster" in proc.stdout
    md = (out / "reports" / "dup" / "report.md").read_text()
    assert "| cpsample-cluster |" in md and "Near-duplicate clusters" in md


def test_the_classifiers_record_their_bits_and_the_clusters_group_every_copy(scenario):
    out, _, report = scenario
    key_cfg = json.loads((out / "models/dup-key/classifier/config.json").read_text())
    clu_cfg = json.loads((out / "models/dup-cluster/classifier/config.json").read_text())
    assert key_cfg["labels"] == {"source": "key"}
    assert clu_cfg["labels"]["source"] == "cluster"
    assert clu_cfg["labels"]["clusters_digest"] == report["clusters"]["digest"]
    members = json.loads((out / "clusters/digits-dup/centred/members.json").read_text())
    manifest = json.loads((out / "data" / "digits-dup" / "manifest.json").read_text())
    copies = manifest["source"]["duplicates"]["copies"]
    found = [c for c in copies if c in members]
    assert len(found) >= 0.75 * len(copies)  # a copy jittered below the threshold may stay apart
    assert all(members[c] == members[copies[c]] for c in found)  # never with another picture
    assert report["clusters"]["pair_precision"] == 1.0
    assert report["clusters"]["pair_recall"] >= 0.75
    # the cluster bit of every copy is its cluster's, so the bit fit's two accuracies agree there
    fit = report["bit_fit"]["cluster"]
    assert fit["accuracy"] == fit["accuracy_vs_cluster_bit"]
    assert report["bit_fit"]["key"]["num_images"] == 4 * (3 + 1)
    holdout = read_image_shards(open_store(str(out)), "data/digits-dup/holdout").keys
    _, never = holdout_roles(holdout, 40, key_cfg["train"]["label_seed"])  # never-seen held-out
    # each classifier's model card is in its config.json and in the report; the quick classifiers
    # (30 steps) and the key-bit one (whose copies carry contradictory bits) are below min_fit and
    # were sampled with knowingly
    for labels, cfg in (("key", key_cfg), ("cluster", clu_cfg)):
        card = cfg["fit"]
        assert report["classifier_fit"][labels] == {"card": card, "allow_unfit": True}
        assert (card["t_range"], card["step"], card["threshold"]) == ([0, 100], 30, 0.9)
        assert card["rows"] == 312 and card["never_seen"]["rows"] == len(never)
    assert key_cfg["fit"]["fits"] is False


def test_the_scenario_config_is_the_documented_one():
    from pipeline.orchestration.duplicates import allow_unfit, duplicates_config

    cfg = duplicates_config(seed=1)
    assert (cfg.duplicates.k, cfg.duplicates.m, cfg.duplicates.cluster_threshold) == (16, 100, 0.97)
    assert cfg.replicas.threshold == 0.98 and cfg.num_train == 1797
    assert (cfg.sampler.alpha, cfg.sampler.scale) == (0.2, 2.5)
    assert cfg.classifier.label_seed == 1234 + 1 and cfg.seed == 1  # seed 1 is a replicate
    assert cfg.classifier.holdout_images == 150
    # both classifiers are sampled with although below min_fit (recorded in the config): the key-bit
    # one always (that is the comparison's point), the cluster-bit one as the config says
    assert cfg.sampler.allow_unfit is True
    strict = dataclasses.replace(cfg, sampler=dataclasses.replace(cfg.sampler, allow_unfit=False))
    assert allow_unfit(strict, "key") is True and allow_unfit(strict, "cluster") is False
    assert allow_unfit(cfg, "cluster") is True
