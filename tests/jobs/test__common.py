"""Bad input to the jobs: a clear message, exit status 2, and nothing half-written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.config import ClassifierArchConfig, UNetConfig
from pipeline.core.diffusion import linear_schedule
from pipeline.core.models import NoiseClassifier, build_unet, save_classifier, save_denoiser

ROOT = Path(__file__).resolve().parents[2]


def run_job(script: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / script), *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )  # fmt: skip


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--alpha", "0"], "alpha must be in (0, 0.5]"),
        (["--alpha", "0.7"], "alpha must be in (0, 0.5]"),
        (["--scale", "-1"], "scale must be >= 0"),
    ],
)
def test_demo_rejects_out_of_range_knobs(tmp_path, flags, message):
    out = tmp_path / "out"
    proc = run_job("demo.py", "--out", str(out), "--quick", *flags)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_demo_rejects_missing_and_empty_data_folders(tmp_path):
    out = tmp_path / "out"
    proc = run_job("demo.py", "--out", str(out), "--quick", "--data", str(tmp_path / "nope"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    proc = run_job("demo.py", "--out", str(out), "--quick", "--data", str(empty))
    assert proc.returncode == 2 and "contains no PNG or JPEG" in proc.stderr
    assert not out.exists()


def test_demo_rejects_unreadable_image(tmp_path):
    from PIL import Image

    data = tmp_path / "imgs"
    data.mkdir()
    for i in range(4):
        Image.new("L", (20, 24), color=i * 40).save(data / f"ok{i}.png")
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "out"
    proc = run_job("demo.py", "--out", str(out), "--quick", "--data", str(data))
    assert proc.returncode == 2
    assert "unreadable image" in proc.stderr and "broken.png" in proc.stderr
    assert not out.exists()


def test_demo_rejects_unwritable_out(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a regular file, not a folder")
    proc = run_job("demo.py", "--out", str(blocker / "out"), "--quick")
    assert proc.returncode == 2
    assert "not writable" in proc.stderr
    assert blocker.read_text() == "a regular file, not a folder"


def test_demo_rejects_unknown_config_keys(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("sampler:\n  alpha: 0.2\n  warp_speed: 9\n")
    proc = run_job("demo.py", "--out", str(tmp_path / "out"), "--config", str(cfg))
    assert proc.returncode == 2
    assert "sampler.warp_speed" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_sample_rejects_classifier_that_does_not_match_denoiser(tmp_path):
    unet_cfg = UNetConfig(sample_size=16, block_out_channels=(8, 16), attention_levels=())
    save_denoiser(build_unet(unet_cfg), tmp_path / "den", {"unet": {}}, linear_schedule())
    small = ClassifierArchConfig(sample_size=8, base_channels=8, channel_mults=(1, 2))
    save_classifier(NoiseClassifier(small), tmp_path / "clf", {})
    store = tmp_path / "store"
    proc = run_job(
        "sample.py", "--store", str(store), "--denoiser", str(tmp_path / "den"),
        "--classifier", str(tmp_path / "clf"), "--num-samples", "4",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "classifier was trained on images of shape (1, 8, 8)" in proc.stderr
    assert "(1, 16, 16)" in proc.stderr
    assert not (store / "samples").exists()


def test_sample_rejects_missing_checkpoint(tmp_path):
    proc = run_job("sample.py", "--store", str(tmp_path / "store"), "--run", "nothing-here")
    assert proc.returncode == 2
    assert "models/nothing-here/denoiser" in proc.stderr


@pytest.mark.parametrize(
    "script",
    [
        "demo.py",
        "make_shards.py",
        "train_denoiser.py",
        "train_classifier.py",
        "sample.py",
        "check_replicas.py",
    ],
)
def test_every_job_documents_itself(script):
    proc = run_job(script, "--help")
    assert proc.returncode == 0
    assert ("usage:" in proc.stdout and "--store" in proc.stdout) or "--out" in proc.stdout


# ------------------------------------------------------------------ project errors raised inside Ray
def _raise_config_error() -> None:
    from pipeline.core.config import ConfigError

    raise ConfigError("sampler.alpha must be in (0, 0.5], got 0.9")


class _CorruptCheckpointActor:
    """A Ray Data actor whose constructor fails as a scoring or sampling actor does on a bad model."""

    def __init__(self) -> None:
        from pipeline.core.models import CheckpointError

        raise CheckpointError("models/demo/denoiser: weights do not match config.json")

    def __call__(self, batch):
        return batch


def _raise_data_error(batch):
    from pipeline.data.imageset import DataError

    raise DataError("data/digits/train/shard-000001.tar: sha256 does not match the manifest")


def _run(main) -> int | str | None:
    sys.path.insert(0, str(ROOT / "jobs"))
    from _common import run_main

    with pytest.raises(SystemExit) as exit_info:
        run_main(main)
    return exit_info.value.code


def _errors(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def test_run_main_unwraps_a_ray_task_error(ray_local, capsys):
    task = ray_local.remote(_raise_config_error)
    assert _run(lambda: ray_local.get(task.remote())) == 2
    assert _errors(capsys) == ["error: sampler.alpha must be in (0, 0.5], got 0.9"]


def test_run_main_unwraps_a_ray_data_actor_constructor(ray_local, capsys):
    ds = ray_local.data.range(4).map_batches(_CorruptCheckpointActor, concurrency=1)
    assert _run(ds.take_all) == 2
    assert _errors(capsys) == ["error: models/demo/denoiser: weights do not match config.json"]


def test_run_main_unwraps_a_ray_data_task(ray_local, capsys):
    ds = ray_local.data.range(4).map_batches(_raise_data_error)
    assert _run(ds.take_all) == 2
    assert _errors(capsys) == [
        "error: data/digits/train/shard-000001.tar: sha256 does not match the manifest"
    ]


def test_run_main_keeps_the_traceback_of_a_bug_inside_ray(ray_local):
    sys.path.insert(0, str(ROOT / "jobs"))
    from _common import run_main

    task = ray_local.remote(lambda: {}["missing"])
    with pytest.raises(ray_local.exceptions.RayTaskError) as info:
        run_main(lambda: ray_local.get(task.remote()))
    assert isinstance(info.value, KeyError)


def test_run_main_makes_a_multi_line_message_one_line(capsys):
    from pipeline.core.config import ConfigError

    def main():
        raise ConfigError("cluster.yaml: two problems:\n  min_workers must be 0\n  GPU >= 1")

    assert _run(main) == 2
    assert capsys.readouterr().err == (
        "error: cluster.yaml: two problems: min_workers must be 0 GPU >= 1\n"
    )
