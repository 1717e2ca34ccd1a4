"""Bad input to the job CLIs, end to end: each case runs the real job as a subprocess and expects exit
status 2, exactly one ``error:`` line on stderr (the last one), no traceback, and nothing written: the
prepared store unchanged, or a store that did not exist still absent.

Most cases fail before Ray starts. The few that start a local Ray first (train_denoiser, build_index,
evaluate) may add Ray's own startup log lines to stderr; those are not errors.

The README's table of bad inputs (section "Jobs") lists these cases by id.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import S3_TEST_ENV

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Case:
    """One bad input: the job, its arguments ({store}, {new}, {models}, {cfg}, {s3} are filled in),
    the text the error line must contain, and which store must stay as it was."""

    job: str
    args: tuple[str, ...]
    message: str
    store: str = "new"  # "new": must not be created; "store"/"corrupt": must be unchanged
    config: str | None = None  # text of the --config file {cfg}
    timeout: int = 120


CASES = {
    # ---------------------------------------------------------------------- configs and flags
    "demo-config-missing": Case(
        "demo.py", ("--out", "{new}", "--config", "{tmp}/missing.yaml"),
        "missing.yaml: no such config file",
    ),
    "demo-config-malformed": Case(
        "demo.py", ("--out", "{new}", "--config", "{cfg}"),
        "malformed YAML at line 3, column 1", config="sampler:\n  alpha: [0.2\n",
    ),
    "demo-config-unknown-key": Case(
        "demo.py", ("--out", "{new}", "--config", "{cfg}"),
        "unknown config key(s) ['sampler.warp_speed']",
        config="sampler:\n  alpha: 0.2\n  warp_speed: 9\n",
    ),
    "demo-config-alpha-out-of-range": Case(
        "demo.py", ("--out", "{new}", "--config", "{cfg}"),
        "alpha must be in (0, 0.5], got 0.9", config="sampler:\n  alpha: 0.9\n",
    ),
    "demo-flag-alpha-out-of-range": Case(
        "demo.py", ("--out", "{new}", "--quick", "--alpha", "0.7"),
        "alpha must be in (0, 0.5], got 0.7",
    ),
    "demo-flag-scale-negative": Case(
        "demo.py", ("--out", "{new}", "--quick", "--scale", "-1"), "scale must be >= 0",
    ),
    "demo-duplicates-config-turns-scenario-off": Case(
        "demo.py", ("--out", "{new}", "--quick", "--scenario", "duplicates", "--config", "{cfg}"),
        "'duplicates: null' turns the scenario off", config="duplicates: null\n", timeout=90,
    ),
    "train_denoiser-config-malformed": Case(
        "train_denoiser.py", ("--store", "{store}", "--config", "{cfg}"),
        "malformed YAML at line 2, column 1", store="store", config="denoiser:\n\tsteps: 2\n",
    ),
    "evaluate-config-missing": Case(
        "evaluate.py", ("--store", "{store}", "--config", "{tmp}/missing.yaml"),
        "missing.yaml: no such config file", store="store",
    ),
    "check_replicas-config-unknown-section": Case(
        "check_replicas.py", ("--store", "{store}", "--config", "{cfg}"),
        "unknown config sections ['sampler']", store="store",
        config="replicas:\n  threshold: 0.9\nsampler:\n  alpha: 0.2\n",
    ),
    "build_index-config-not-a-mapping": Case(
        "build_index.py", ("--store", "{store}", "--config", "{cfg}"),
        "top level must be a mapping", store="store", config="- replicas\n- threshold\n",
    ),
    "check_cluster-malformed": Case(
        "check_cluster.py", ("{cfg}",), "malformed YAML at line 2, column 6",
        config="cluster_name: x\n  bad: [\n",
    ),
    "check_cluster-missing": Case(
        "check_cluster.py", ("{tmp}/missing.yaml",), "missing.yaml: no such cluster file",
    ),
    "sample-flag-alpha-out-of-range": Case(
        "sample.py", ("--store", "{new}", "--denoiser", "{models}/den16", "--alpha", "0.7"),
        "alpha must be in (0, 0.5], got 0.7",
    ),
    "sweep-alphas-out-of-range": Case(
        "sweep.py", ("--store", "{store}", "--alphas", "0.9"),
        "alphas entries must be in (0, 0.5], got 0.9", store="store",
    ),
    "make_shards-duplicates-spec": Case(
        "make_shards.py", ("--store", "{new}", "--source", "digits", "--duplicates", "3x"),
        "--duplicates must be K:M with integers",
    ),
    # ------------------------------------------------------------------ files, models, data
    "sample-prompts-missing": Case(
        "sample.py", ("--store", "{new}", "--model", "{sd}", "--prompts", "{tmp}/missing.txt"),
        "missing.txt",
    ),
    "sample-missing-model": Case(
        "sample.py", ("--store", "{store}", "--run", "nothing-here"),
        "models/nothing-here/denoiser", store="store",
    ),
    "sample-classifier-wrong-shape": Case(
        "sample.py", ("--store", "{store}", "--denoiser", "{models}/den16",
                      "--classifier", "{models}/clf8", "--num-samples", "4"),
        "classifier was trained on images of shape (1, 8, 8)", store="store",
    ),
    "sample-weights-do-not-match-config": Case(
        "sample.py", ("--store", "{store}", "--denoiser", "{models}/den-wide-config",
                      "--sampler", "ddim", "--num-samples", "4"),
        "den-wide-config: cannot load UNet2DModel: Error(s) in loading state_dict for UNet2DModel: "
        "size mismatch for conv_in.weight", store="store",
    ),
    "train_denoiser-wrong-dataset": Case(
        "train_denoiser.py", ("--store", "{store}", "--dataset", "cifar10", "--steps", "2"),
        "no shards under", store="store",
    ),
    "train_denoiser-corrupt-shard": Case(
        "train_denoiser.py", ("--store", "{corrupt}", "--steps", "2"),
        "checksum mismatch", store="corrupt",
    ),
    "build_index-corrupt-shard": Case(
        "build_index.py", ("--store", "{corrupt}"), "checksum mismatch", store="corrupt",
    ),
    "cluster_duplicates-missing-dataset": Case(
        "cluster_duplicates.py", ("--store", "{store}", "--dataset", "nope"),
        "no dataset 'nope'", store="store",
    ),
    "check_replicas-no-samples": Case(
        "check_replicas.py", ("--store", "{store}", "--run", "nothing-here"),
        "no sample shards under", store="store",
    ),
    "sweep-missing-model": Case(
        "sweep.py", ("--store", "{store}", "--run", "nothing-here"),
        "models/nothing-here/denoiser", store="store",
    ),
    "evaluate-missing-model": Case(
        "evaluate.py", ("--store", "{store}", "--run", "nothing-here"),
        "models/nothing-here/denoiser", store="store",
    ),
    "encode_latents-missing-model": Case(
        "encode_latents.py", ("--store", "{store}", "--model", "{tmp}/no-model"),
        "no-model", store="store",
    ),
    "make_shards-missing-folder": Case(
        "make_shards.py", ("--store", "{new}", "--source", "folder", "--path", "{tmp}/no-images"),
        "no-images does not exist",
    ),
    "make_shards-missing-bucket": Case(
        "make_shards.py", ("--store", "s3://no-such-bucket/cps", "--s3-endpoint", "{s3}",
                           "--source", "digits"),
        "no-such-bucket",
    ),
    "check_replicas-missing-bucket": Case(
        "check_replicas.py", ("--store", "s3://no-such-bucket/cps", "--s3-endpoint", "{s3}"),
        "no-such-bucket",
    ),
}  # fmt: skip


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and mtime: what "unchanged" compares."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def _run_job(case: Case, args: list[str], cwd: Path, env: dict[str, str]):
    """Run the job in its own process group, so that a job still working at the timeout is stopped
    with everything it started (a local Ray's daemons included)."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "jobs" / case.job), *args], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd=cwd, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=case.timeout)
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=15)
        pytest.fail(f"{case.job} was still running after {case.timeout} s: it did not refuse")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_sd_dir) -> dict[str, Path]:
    """A small digits store, a copy with one flipped byte in a training shard, and three model
    folders outside the store: a 16x16 denoiser, an 8x8 classifier, and a denoiser whose
    config.json names wider blocks than its weights hold."""
    from pipeline.core.config import ClassifierArchConfig, UNetConfig
    from pipeline.core.diffusion import linear_schedule
    from pipeline.core.models import NoiseClassifier, build_unet, save_classifier, save_denoiser
    from pipeline.data.datasets import digits_source, split
    from pipeline.data.storage import open_store
    from pipeline.orchestration.stages import make_shards

    base = tmp_path_factory.mktemp("bad-inputs")
    train, holdout = split(digits_source(16), 32, 0)
    make_shards(open_store(str(base / "store")), "digits", train, holdout.subset(range(64)), 16)
    shutil.copytree(base / "store", base / "corrupt")
    shard = base / "corrupt" / "data" / "digits" / "train" / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # inside the first PNG: same size, another sha256
    shard.write_bytes(bytes(data))

    models = base / "models"
    unet = UNetConfig(sample_size=16, block_out_channels=(8, 16), attention_levels=())
    for name in ("den16", "den-wide-config"):
        save_denoiser(build_unet(unet), models / name, {"unet": {}}, linear_schedule())
    config = models / "den-wide-config" / "config.json"
    config.write_text(
        json.dumps({**json.loads(config.read_text()), "block_out_channels": [16, 32]})
    )
    small = ClassifierArchConfig(sample_size=8, base_channels=8, channel_mults=(1, 2))
    save_classifier(NoiseClassifier(small), models / "clf8", {})
    return {"store": base / "store", "corrupt": base / "corrupt", "models": models,
            "sd": tiny_sd_dir}  # fmt: skip


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case_id, prepared, s3_server, tmp_path):
    case = CASES[case_id]
    cfg = tmp_path / "config.yaml"
    if case.config is not None:
        cfg.write_text(case.config)
    new = tmp_path / "new-store"
    fill = {"store": prepared["store"], "corrupt": prepared["corrupt"], "new": new, "cfg": cfg,
            "models": prepared["models"], "sd": prepared["sd"], "tmp": tmp_path, "s3": s3_server}  # fmt: skip
    args = [a.format(**fill) for a in case.args]
    watched = None if case.store == "new" else prepared[case.store]
    before = _tree(watched) if watched else None
    env = {**os.environ, **S3_TEST_ENV, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)  # a private local Ray where a job starts one
    proc = _run_job(case, args, tmp_path, env)
    lines = proc.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-3000:]
    print(errors[0])  # pytest -rP lists what each bad input prints (the README's table)
    assert case.message in errors[0] and len(errors[0]) <= 800  # one line a person can read
    assert "Traceback" not in proc.stderr
    assert not new.exists(), f"{case.job} created {new}: {sorted(os.listdir(new))}"
    if watched:
        assert _tree(watched) == before
    if "{s3}" in case.args:  # the bucket was not created on the way
        import boto3

        s3 = boto3.client("s3", endpoint_url=s3_server, **_boto_credentials())
        assert "no-such-bucket" not in [b["Name"] for b in s3.list_buckets()["Buckets"]]


def _boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": S3_TEST_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_TEST_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": S3_TEST_ENV["AWS_REGION"],
    }


def test_the_table_has_at_least_twenty_bad_inputs():
    assert len(CASES) >= 20
