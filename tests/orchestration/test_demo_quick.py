"""The `--quick` demo end to end: real local Ray, Ray Train, Ray Data, Ray Tune, FAISS, the whole
store layout. Its store is in S3 (moto server on loopback), so one run covers both contracts: every stage
reads and writes s3:// objects, and the layout, mirrored to a local folder with boto3, is checked file by
file (the local-folder store is exercised by the job tests)."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SAMPLER_KEYS = {"num_samples", "replication_rate", "mean_nn_similarity", "quality"}


@pytest.fixture(scope="module")
def s3_quick_demo(s3_server, tmp_path_factory):
    """Run `jobs/demo.py --quick --out s3://<bucket>/run`; mirror the prefix to a local folder."""
    import os

    import boto3

    from tests.conftest import S3_TEST_ENV

    env_vars = {**S3_TEST_ENV, "AWS_ENDPOINT_URL": s3_server}
    client = boto3.client(
        "s3",
        endpoint_url=s3_server,
        aws_access_key_id=env_vars["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env_vars["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    bucket = "cps-demo-e2e"
    client.create_bucket(Bucket=bucket)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "demo.py"), "--quick", "--no-progress",
         "--out", f"s3://{bucket}/run"],
        capture_output=True, text=True, timeout=900, cwd=ROOT, env={**os.environ, **env_vars},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys += [o["Key"] for o in page.get("Contents", [])]
    out = tmp_path_factory.mktemp("demo") / "out"
    for key in keys:
        if key.startswith("run/checkpoints/") or key.endswith("/"):
            continue
        dest = out / key[len("run/") :]
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    return {"out": out, "proc": proc, "client": client, "bucket": bucket, "keys": sorted(keys),
            "env": env_vars}  # fmt: skip


@pytest.fixture(scope="module")
def quick_demo(s3_quick_demo):
    return s3_quick_demo["out"], s3_quick_demo["proc"]


def test_quick_demo_writes_the_layout(quick_demo):
    out, _ = quick_demo
    for rel in [
        "data/digits/train/shard-000000.tar",
        "data/digits/holdout/shard-000000.tar",
        "data/digits/manifest.json",
        "models/demo/denoiser/config.json",
        "models/demo/denoiser/diffusion_pytorch_model.safetensors",
        "models/demo/denoiser/run_config.json",
        "models/demo/denoiser/scheduler_config.json",
        "models/demo/classifier/model.safetensors",
        "models/demo/classifier/config.json",
        "samples/demo/ddim/shard-000000.tar",
        "samples/demo/cpsample/shard-000000.tar",
        "reports/demo/report.json",
        "reports/demo/report.md",
        "report.json",
    ]:
        assert (out / rel).is_file(), rel
    for fig in [
        "pairs_ddim.png",
        "pairs_cpsample.png",
        "nn_similarity_hist.png",
        "pareto.png",
        "roc_reconstruction.png",
    ]:
        assert (out / "reports/demo" / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # no temporary files were left behind by the atomic writes
    assert not [p for p in out.rglob("*.tmp") if "checkpoints" not in p.parts]


def test_quick_demo_report_has_every_key(quick_demo):
    out, _ = quick_demo
    report = json.loads((out / "report.json").read_text())
    assert {
        "dataset",
        "num_train",
        "threshold",
        "samplers",
        "holdout_baseline",
        "timings_s",
    } <= set(report)
    assert report["dataset"] == "digits" and report["threshold"] == 0.97
    assert report["num_train"] == 64
    for name in ("ddim", "cpsample"):
        s = report["samplers"][name]
        assert set(s) >= SAMPLER_KEYS
        assert s["num_samples"] == 64
        assert 0.0 <= s["replication_rate"] <= 1.0 and -1.0 <= s["mean_nn_similarity"] <= 1.0
        assert {"fd", "confident_fraction"} <= set(s["quality"])
        assert s["quality"]["fd"] >= 0 and 0 <= s["quality"]["confident_fraction"] <= 1
    cps = report["samplers"]["cpsample"]
    assert {"alpha", "scale", "guidance_fired_fraction"} <= set(cps)
    assert 0.0 <= cps["guidance_fired_fraction"] <= 1.0
    assert {"replication_rate", "mean_nn_similarity"} <= set(report["holdout_baseline"])
    assert report["timings_s"]["total"] > 0
    assert {"train_accuracy_by_t", "holdout_accuracy", "lipschitz_proxy"} <= set(
        report["classifier"]
    )
    # the privacy block: the (alpha, s) sweep and membership-inference attack 1
    sweep = report["sweep"]
    labels = [p["label"] for p in sweep["points"]]
    # Tune sampled s=3 and s=7; DDIM and s=5 are the main runs, scored on their first 32 samples
    assert labels == ["ddim", "a=0.5 s=3", "a=0.5 s=5", "a=0.5 s=7"]
    assert [p["index"] for p in sweep["points"]] == [0, 1, 2, 3]
    assert [bool(p.get("source")) for p in sweep["points"]] == [True, False, True, False]
    for p in sweep["points"]:
        assert 0.0 <= p["replication_rate"] <= 1.0 and p["num_samples"] == 32
        assert p["quality"]["fd"] >= 0
    assert set(sweep["pareto_front"]) <= set(labels)
    # the three membership attacks ran on this run, for both samplers, against never-seen images
    mi = report["membership_inference"]
    for attack in ("reconstruction", "secmi", "nn_distance"):
        for name in ("ddim", "cpsample"):
            r = mi[attack][name]
            assert 0.0 <= r["auc"] <= 1.0 and 0.0 < r["p_value"] <= 1.0, (attack, name)
            assert r["num_members"] == 16 and r["num_nonmembers"] == 32
    pool = mi["nonmembers"]
    assert pool["source"] == "held-out images no model has seen" and pool["num_holdout"] == 500
    assert pool["classifier_trained_fraction"] == 200 / 500 and pool["num_nonmembers"] == 32
    assert mi["nn_distance"]["cpsample"]["num_generated"] == 64
    # provenance: the samples name the very model directories the training exported
    prov = report["provenance"]
    for name in ("ddim", "cpsample"):
        assert prov["samples"][name]["denoiser"] == prov["denoiser"]["digest"]
    assert prov["samples"]["cpsample"]["classifier"] == prov["classifier"]["digest"]
    assert "classifier" not in prov["samples"]["ddim"]
    assert prov["denoiser"]["provenance"]["data"] == prov["classifier"]["provenance"]["data"]
    # how far CPSample moved each same-seed DDIM sample, scaled by unrelated pairs
    moved = report["displacement"]
    assert moved["all"]["count"] == 64 and moved["unrelated_pairs"]["mean"] > 0
    assert 0.0 <= moved["all"]["relative"] < 2.0
    assert moved["near"]["count"] + moved["far"]["count"] <= 64
    md = (out / "reports/demo/report.md").read_text()
    assert "## Membership inference" in md and "## (alpha, s) trade-off sweep" in md
    assert (
        "Non-members: 32 held-out images that no model has seen, drawn at random from the 500" in md
    )
    assert "## How far CPSample moves a sample" in md
    for fig in ("roc_secmi.png", "roc_nn_distance.png"):
        assert (out / "reports/demo" / fig).read_bytes()[:4] == b"\x89PNG"


def test_quick_demo_train_shards_hold_exactly_the_training_images(quick_demo):
    out, _ = quick_demo
    import numpy as np

    from pipeline.data.shards import read_tar

    train = read_tar((out / "data/digits/train/shard-000000.tar").read_bytes(), "train")
    assert len(train) == 64 and train.images.shape[1:] == (16, 16, 1)
    manifest = json.loads((out / "data/digits/manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 64
    assert train.images.dtype == np.uint8


def _metas(path: Path) -> dict[str, dict]:
    with tarfile.open(path) as tar:
        return {
            m.name.split(".")[0]: json.loads(tar.extractfile(m).read())
            for m in tar.getmembers()
            if m.name.endswith(".json")
        }


def test_quick_demo_sample_metadata(quick_demo):
    out, _ = quick_demo
    cps = _metas(out / "samples/demo/cpsample/shard-000000.tar")
    ddim = _metas(out / "samples/demo/ddim/shard-000000.tar")
    assert len(cps) == len(ddim) == 32
    for meta in cps.values():
        assert {
            "seed",
            "guidance_steps_fired",
            "final_p",
            "nn_key",
            "nn_similarity",
            "alpha",
            "scale",
        } <= set(meta)
        assert 0 <= meta["guidance_steps_fired"] <= meta["steps"]
        assert meta["nn_key"].startswith("digits-")
    # both samplers use the same seed for the same index: the comparison is paired
    assert sorted(m["seed"] for m in cps.values()) == sorted(m["seed"] for m in ddim.values())
    assert all(m["guidance_steps_fired"] == 0 and m["final_p"] is None for m in ddim.values())


def test_quick_demo_shards_are_readable_by_webdataset(quick_demo):
    import webdataset as wds

    out, _ = quick_demo
    url = str(out / "samples/demo/cpsample/shard-000000.tar")
    rows = list(wds.WebDataset(url, shardshuffle=False).decode("l"))
    assert len(rows) == 32
    assert rows[0]["png"].shape == (16, 16)


# ------------------------------------------------------------------------------ the S3 side of the run
def test_s3_demo_wrote_checkpoints_and_no_partial_objects(s3_quick_demo):
    keys = s3_quick_demo["keys"]
    # Ray Train wrote its checkpoints through the pyarrow S3 filesystem
    assert any(k.startswith("run/checkpoints/demo-denoiser/") for k in keys)
    assert any(k.startswith("run/checkpoints/demo-classifier/") for k in keys)
    assert not [k for k in keys if k.endswith(".tmp")]


def test_s3_demo_sample_shards_read_by_webdataset_over_http(s3_quick_demo):
    import numpy as np
    import webdataset as wds

    client, bucket, keys = (s3_quick_demo[k] for k in ("client", "bucket", "keys"))
    report = json.loads(client.get_object(Bucket=bucket, Key="run/report.json")["Body"].read())
    for sampler in ("ddim", "cpsample"):
        shards = [k for k in keys if k.startswith(f"run/samples/demo/{sampler}/shard-")]
        urls = [
            client.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": k}, ExpiresIn=600
            )
            for k in shards
        ]
        samples = list(wds.WebDataset(urls, shardshuffle=False).decode("l8"))  # curl over HTTP
        assert len(samples) == report["samplers"][sampler]["num_samples"]
        assert len({s["__key__"] for s in samples}) == len(samples)
        for s in samples:
            assert isinstance(s["png"], np.ndarray) and s["png"].shape == (16, 16)
            assert {"seed", "nn_similarity"} <= set(s["json"])


def test_s3_demo_leaks_no_credentials(s3_quick_demo):
    client, bucket, keys, proc, env = (
        s3_quick_demo[k] for k in ("client", "bucket", "keys", "proc", "env")
    )
    secrets = [env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]]
    assert not any(s in proc.stdout + proc.stderr for s in secrets)
    for key in keys:
        if key.endswith((".json", ".md", ".jsonl", ".txt", ".yaml")):
            body = client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
            assert not any(s in body for s in secrets), key


def test_s3_demo_rerun_with_another_seed_is_refused_before_writing(s3_quick_demo):
    """--seed 1 into the seed-0 output: exit 2 naming the changed settings, nothing written (before
    provenance, it reused the seed-0 checkpoints and failed only later)."""
    import os

    client, bucket, keys, env = (s3_quick_demo[k] for k in ("client", "bucket", "keys", "env"))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "demo.py"), "--quick", "--no-progress", "--seed", "1",
         "--out", f"s3://{bucket}/run"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, **env},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (
        "was made from other inputs (changed: classifier, denoiser, seed, split_seed); use another "
        "--out, or pass --overwrite" in proc.stderr
    )
    after = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        after += [o["Key"] for o in page.get("Contents", [])]
    assert sorted(after) == keys
