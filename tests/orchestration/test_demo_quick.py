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
def s3_quick_demo(demo_quick_run):
    """The session's one `jobs/demo.py --quick` run on loopback S3 (tests/conftest.py)."""
    return demo_quick_run


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
    import numpy as np

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
    metas = {}
    for name in ("ddim", "cpsample"):
        s = report["samplers"][name]
        assert set(s) >= SAMPLER_KEYS
        assert s["num_samples"] == 64
        # the figures are the ones the stored samples' own records give
        shards = sorted((out / "samples/demo" / name).glob("shard-*.tar"))
        metas[name] = [m for shard in shards for m in _metas(shard).values()]
        sims = np.asarray([m["nn_similarity"] for m in metas[name]])
        assert len(sims) == 64 and s["replication_rate"] == float((sims >= 0.97).mean())
        assert s["mean_nn_similarity"] == pytest.approx(float(sims.mean()), abs=1e-9)
        assert {"fd", "confident_fraction"} <= set(s["quality"])
        assert s["quality"]["fd"] >= 0
        assert (s["quality"]["confident_fraction"] * 64).is_integer()  # a share of the 64 samples
    cps = report["samplers"]["cpsample"]
    assert {"alpha", "scale", "guidance_fired_fraction"} <= set(cps)
    fired = [m["guidance_steps_fired"] / m["steps"] for m in metas["cpsample"]]
    assert cps["guidance_fired_fraction"] == pytest.approx(sum(fired) / 64, abs=1e-12)
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
        assert (p["replication_rate"] * 32).is_integer() and p["num_samples"] == 32
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
    ddim_copies = sum(m["nn_similarity"] >= 0.97 for m in metas["ddim"])
    assert moved["near"]["count"] == ddim_copies
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

    from pipeline.data.tars import read_tar

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
    from pipeline.core.diffusion import ddim_timesteps

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
        # alpha 0.5 opens the gate for every sample, so guidance fires at every DDIM step below
        # guidance_t_max (the demo's denoiser uses diffusers' default "leading" spacing)
        assert meta["alpha"] == 0.5
        below = ddim_timesteps(meta["steps"]) < meta["guidance_t_max"]
        assert meta["guidance_steps_fired"] == int(below.sum())
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
    # every object, binary ones included (pickles, checkpoints, tars, indexes), as bytes, in the
    # encodings a pickle or a text file would hold a string in
    needles = [n for s in secrets for n in (s.encode(), s.encode("utf-16-le"))]
    assert len(keys) > 50
    for key in keys:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert not any(n in body for n in needles), key


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


# ------------------------------------------------------------------- --scenario duplicates --config
def test_duplicates_scenario_with_a_config_without_the_section_runs_the_scenario(tmp_path):
    """Before: a --config without a ``duplicates`` section silently ran the plain demo."""
    from pipeline.core.config import DuplicatesConfig
    from pipeline.orchestration.duplicates import duplicates_config

    sys.path.insert(0, str(ROOT / "jobs"))
    from demo import build_config, parse_args

    path = tmp_path / "dup.yaml"
    path.write_text("mia_members: 12\nreplicas:\n  nprobe: 64\n")
    args = ["--out", "o", "--scenario", "duplicates", "--config", str(path), "--seed", "1"]
    cfg = build_config(parse_args(args))
    scenario = duplicates_config(1)
    assert cfg.duplicates == DuplicatesConfig() == scenario.duplicates
    assert cfg.mia_members == 12 and cfg.replicas.nprobe == 64  # the file's fields win
    assert cfg.replicas.threshold == 0.98 and cfg.num_train == 1797  # the rest: the scenario's
    assert (cfg.seed, cfg.split_seed, cfg.classifier.label_seed) == (
        scenario.seed,
        scenario.split_seed,
        scenario.classifier.label_seed,
    )
    cfg = build_config(parse_args([*args[:-2], "--quick"]))
    assert cfg.duplicates == DuplicatesConfig(k=4, m=3) and cfg.num_train == 300


def test_duplicates_scenario_refuses_a_config_that_turns_it_off(tmp_path):
    path = tmp_path / "off.yaml"
    path.write_text("duplicates: null\n")
    out = tmp_path / "o"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs/demo.py"), "--scenario", "duplicates", "--config",
         str(path), "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: {path}: 'duplicates: null' turns the scenario off; drop it for --scenario "
        "duplicates"
    ]
    assert not out.exists()


# ----------------------------------------------------------------------------- --data's contents
def _image_folder(path: Path, n: int) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    path.mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(
            path / f"im{i:03d}.png"
        )
    (path / "notes.txt").write_text("not an image: not part of the data")
    return path


def test_folder_digest_sees_every_image_change_and_nothing_else(tmp_path):
    from pipeline.data.datasets import folder_digest

    data = _image_folder(tmp_path / "imgs", 4)
    first = folder_digest(data)
    assert (first["files"], first["bytes"]) == (
        4,
        sum(p.stat().st_size for p in data.glob("*.png")),
    )
    (data / "notes.txt").write_text("edited")
    assert folder_digest(data) == first
    blob = bytearray((data / "im001.png").read_bytes())
    blob[-13] ^= 1  # same size, other bytes
    (data / "im001.png").write_bytes(bytes(blob))
    assert folder_digest(data)["sha256"] != first["sha256"]
    (data / "im001.png").rename(data / "im009.png")
    assert folder_digest(data)["files"] == 4 and folder_digest(data) != first


def test_demo_rerun_on_a_changed_data_folder_is_refused_before_writing(tmp_path):
    """The first run's writes before its first Ray stage (the output claim, the shards and the
    manifest), then one image changes: the rerun exits 2 naming ``data`` and the store keeps every
    byte. Before, only the path was recorded: the rerun passed and rewrote data/ beside old models."""
    import numpy as np
    from PIL import Image

    from pipeline.data.storage import open_store
    from pipeline.orchestration.demo import _source, claim_output, demo_split, quick_config
    from pipeline.orchestration.stages import make_shards

    data = _image_folder(tmp_path / "imgs", 80)
    out = tmp_path / "out"
    cfg = quick_config()
    dataset, images = _source(cfg, str(data))
    store = open_store(str(out))
    claim_output(store, cfg, str(data), overwrite=False)
    make_shards(store, dataset, *demo_split(images, cfg))
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    assert (out / "data/imgs/manifest.json") in before
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(data / "im007.png")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs/demo.py"), "--quick", "--no-progress", "--data",
         str(data), "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "was made from other inputs (changed: data)" in proc.stderr
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    assert after == before
    record = json.loads((out / "provenance.json").read_text())
    assert record["data_folder"]["files"] == 80 and record["data_folder"]["dataset"] == "imgs"


# ------------------------------------------------ rerun with the same settings (last: it rewrites)
def _objects(client, bucket: str) -> dict[str, tuple[str, object]]:
    """Every object's (ETag, LastModified): a rewrite with the same bytes still changes the second."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        out.update((o["Key"], (o["ETag"], o["LastModified"])) for o in page.get("Contents", []))
    return out


def _without_timings(value):
    if isinstance(value, dict):
        return {
            k: _without_timings(v)
            for k, v in value.items()
            if k not in ("timings_s", "wall_s", "time_s")
        }
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def test_s3_demo_rerun_with_the_same_settings_retrains_and_rewrites_nothing(s3_quick_demo):
    """The README's promise that every stage resumes or skips: the same command again trains no
    step (no Ray Train worker starts: both runs are finished), leaves every checkpoint, model, data and sample object
    as the first run wrote it, and writes the same report.json but for its timings."""
    import os
    import time

    client, bucket, env = (s3_quick_demo[k] for k in ("client", "bucket", "env"))
    before = _objects(client, bucket)
    report = json.loads(client.get_object(Bucket=bucket, Key="run/report.json")["Body"].read())
    time.sleep(1.1)  # LastModified has a resolution of one second
    proc = subprocess.run(
        s3_quick_demo["argv"], capture_output=True, text=True, timeout=900, cwd=ROOT,
        env={**os.environ, **env},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    logs = proc.stdout + proc.stderr
    assert "denoiser already trained: " in logs and "classifier already trained: " in logs
    assert "resumed denoiser" not in logs and "resumed classifier" not in logs  # no worker started
    after = _objects(client, bucket)

    def made(key: str) -> bool:
        return key.startswith(("run/models/", "run/data/", "run/samples/")) or "/checkpoint_" in key

    kept = sorted(k for k in before if made(k))
    assert len([k for k in kept if "/checkpoint_" in k]) >= 4 and len(kept) > 20
    assert {k: after.get(k) for k in kept} == {k: before[k] for k in kept}
    assert sorted(k for k in after if made(k)) == kept  # nothing new either
    rerun = json.loads(client.get_object(Bucket=bucket, Key="run/report.json")["Body"].read())
    assert _without_timings(rerun) == _without_timings(report)
    assert rerun["timings_s"]["total"] != report["timings_s"]["total"]  # it is the rerun's report
