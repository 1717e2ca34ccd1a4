"""Fault tolerance of the Ray Train (V2) runs, with real process kills.

(a) SIGKILL one training worker (its pid found with Ray's state API) during a 2-worker denoiser run
    that streams its input (the keyless ``iter_torch_batches`` path) with the default ``max_failures``:
    the worker group restarts from the latest checkpoint and finishes.
(a') the classifier: rank 1 exits hard (``os._exit``, fault-injection key ``exit_at``) at a given
    step, once; the default ``max_failures`` restarts the group from the last registered checkpoint.
(b) SIGKILL the driver of ``jobs/train_denoiser.py`` after a checkpoint exists, then rerun the same
    command: the run continues from that checkpoint instead of starting again from step 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from pipeline.core.config import (
    ClassifierArchConfig,
    ClassifierTrainConfig,
    DenoiserTrainConfig,
    UNetConfig,
)
from pipeline.core.models import load_classifier_config, load_denoiser, load_schedule
from pipeline.train.workers import read_checkpoint

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TINY_UNET = UNetConfig(block_out_channels=(16, 32), attention_levels=(), norm_num_groups=8)


def _checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run (state.json is written last), oldest first."""
    return sorted(p for p in run_dir.glob("checkpoint_*") if (p / "state.json").exists())


def _wait_for_checkpoint(run_dir: Path, timeout: float, alive=lambda: True) -> Path:
    """The first complete checkpoint that Ray Train has registered (its snapshot names it)."""
    deadline = time.time() + timeout
    while time.time() < deadline and alive():
        snapshot = run_dir / "checkpoint_manager_snapshot.json"
        if _checkpoints(run_dir) and snapshot.exists():
            return _checkpoints(run_dir)[-1]
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint under {run_dir} within {timeout} s")


def _train_worker_pids() -> list[int]:
    """Pids of the live Ray Train worker actors of this process's Ray (other sessions run Rays too)."""
    import ray
    from ray.util.state import list_actors

    actors = list_actors(
        address=ray.get_runtime_context().gcs_address,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
        timeout=60,
    )
    return sorted(a.pid for a in actors if a.pid)


def test_killed_worker_resumes_from_last_checkpoint(ray_local, digits_store):
    from pipeline.orchestration.stages import train_denoiser

    steps, every = 24, 6
    # the default FailureConfig(max_failures) restarts the group; cache_max_bytes=0: each rank
    # streams its 16 rows every epoch, arriving as tensors via iter_torch_batches(device=...)
    train = DenoiserTrainConfig(
        steps=steps, batch_size=16, num_workers=2, checkpoint_every=every, num_to_keep=2,
        cache_max_bytes=0, shuffle_buffer=8,
    )  # fmt: skip
    assert train.max_failures >= 1
    run_dir = Path(digits_store.join("checkpoints", "ft-worker-denoiser"))
    killed: dict = {}

    def killer() -> None:
        try:
            _wait_for_checkpoint(run_dir, 600)
            pids = _train_worker_pids()
            killed["pids_before"] = pids
            killed["at_step"] = json.loads((_checkpoints(run_dir)[-1] / "state.json").read_text())[
                "step"
            ]
            os.kill(pids[-1], signal.SIGKILL)  # one training worker, nothing else
            killed["pid"] = pids[-1]
        except BaseException as exc:  # reported by the main thread
            killed["error"] = exc

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    # 0.3 s per forward pass: ~8 s of training, time to kill mid-run on a busy machine
    out = train_denoiser(
        digits_store, "ft-worker", "digits", TINY_UNET, train, loop_config={"step_delay_s": 0.3}
    )
    thread.join(10)
    assert "error" not in killed, killed.get("error")
    assert len(killed["pids_before"]) == 2 and killed["at_step"] < steps

    # the worker group restarted from a checkpoint (not step 0) and finished every step
    run_cfg = json.loads(
        Path(digits_store.join("models", "ft-worker", "denoiser", "run_config.json")).read_text()
    )
    assert run_cfg["step"] == steps
    (resumed,) = run_cfg["resumed_from"]
    assert resumed >= every and resumed % every == 0 and resumed < steps
    assert out["metrics"]["step"] == steps
    # the killed pid is gone; the new workers are other processes
    with pytest.raises(ProcessLookupError):
        os.kill(killed["pid"], 0)
    # the final checkpoint loads, and so does the exported model
    tensors, state, _ = read_checkpoint(_checkpoints(run_dir)[-1])
    assert state["step"] == steps and state["resumed_from"] == [resumed]
    # the restarted workers continued the data order at the recorded epoch and position: 24 steps of
    # 8 rows over each rank's 16 streamed rows end at the end of epoch 11, as without the kill
    data = [d["train"] for d in state["data"]]
    assert [(d["input"], d["epoch"], d["offset"]) for d in data] == [("stream", 11, 16)] * 2
    assert [d["rows"] for d in data] == [(steps - resumed) * 8] * 2  # rows since the restart
    assert {"model", "ema"} <= set(tensors)
    assert run_cfg["train"]["num_workers"] == 2 and out["metrics"]["loss"] > 0
    # Ray Train keeps num_to_keep=2 checkpoints under the store's checkpoints/
    assert len([p for p in run_dir.glob("checkpoint_*") if p.is_dir()]) == 2
    unet = load_denoiser(out["uri"])
    assert tuple(unet.config.block_out_channels) == TINY_UNET.block_out_channels
    assert load_schedule(out["uri"]).num_train_timesteps == 1000
    with torch.no_grad():
        eps = unet(torch.zeros(2, 1, 16, 16), torch.tensor([10, 500])).sample
    assert eps.shape == (2, 1, 16, 16) and torch.isfinite(eps).all()


def test_classifier_worker_that_exits_restarts_from_the_last_checkpoint(
    ray_local, digits_store, tmp_path
):
    from pipeline.orchestration.stages import train_classifier

    steps, every, exit_step = 24, 4, 14
    train = ClassifierTrainConfig(
        steps=steps, batch_size=16, holdout_images=100, train_fraction=0.5, num_workers=2,
        checkpoint_every=every, warmup_steps=0, metrics_samples=16,
    )  # fmt: skip
    assert train.max_failures >= 1  # the default
    arch = ClassifierArchConfig(base_channels=8, channel_mults=(1, 2))
    # rank 1 dies before step 14's forward pass; 0.2 s steps give Ray Train time to register the
    # checkpoints before it (it restores the latest registered one)
    marker = tmp_path / "exited"
    out = train_classifier(
        digits_store, "ft-exit", "digits", arch, train,
        loop_config={"exit_at": {"rank": 1, "step": exit_step, "marker": str(marker)},
                     "step_delay_s": 0.2},
    )  # fmt: skip
    assert marker.exists()  # it did exit
    run_cfg = load_classifier_config(out["uri"])
    (resumed,) = run_cfg["resumed_from"]  # one restart, from a checkpoint before step 14
    assert resumed in (4, 8, 12)
    assert out["metrics"]["train_rows"] == 16 and out["fit"]["step"] == steps
    run_dir = Path(digits_store.join("checkpoints", "ft-exit-classifier"))
    _, state, _ = read_checkpoint(_checkpoints(run_dir)[-1])
    assert state["step"] == steps and [d["step"] for d in state["data"]] == [steps] * 2
    # both ranks ran the steps after the restart, 4 training rows each (train_fraction 0.5 of 8),
    # and stand where an uninterrupted run would: 96 of their 16 cached rows, epoch 5's end
    for d in state["data"]:
        assert d["train"]["rows"] == (steps - resumed) * 4
        assert (d["train"]["input"], d["train"]["epoch"], d["train"]["offset"]) == ("cache", 5, 16)


# ----------------------------------------------------------------------------------- driver killed
def _kill_tree(proc: subprocess.Popen, marker: str) -> None:
    """SIGKILL the process group of ``proc``, then any leftover whose command line has ``marker``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    deadline = time.monotonic() + 30  # SIGKILLed processes take a moment to leave /proc
    while (left := _pids_with(marker)) and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)


def _pids_with(marker: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if (d / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    continue  # a zombie has already exited
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                environ = (d / "environ").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if marker in cmd or marker in environ:
                pids.append(int(d.name))
    return pids


def test_killed_driver_rerun_continues_from_checkpoint(digits_store, tmp_path):
    steps, every = 80, 20  # the rerun trains steps 20..80 (about 0.14 s each here)
    (tmp_path / "cfg.yaml").write_text(
        "unet: {block_out_channels: [16, 32], attention_levels: [], norm_num_groups: 8}\n"
        f"train: {{batch_size: 16, checkpoint_every: {every}, num_to_keep: 2}}\n"
    )
    ray_tmp = f"/tmp/rft{uuid.uuid4().hex[:6]}"  # private Ray temp root: short socket paths
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, CPSAMPLE_TEST_MARKER=ray_tmp)
    cmd = [
        sys.executable, str(ROOT / "jobs" / "train_denoiser.py"), "--store", digits_store.uri,
        "--run", "ft-driver", "--config", str(tmp_path / "cfg.yaml"), "--steps", str(steps),
        "--ray-cpus", "2",
    ]  # fmt: skip
    run_dir = Path(digits_store.join("checkpoints", "ft-driver-denoiser"))
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_for_checkpoint(run_dir, 600, alive=lambda: first.poll() is None)
        os.kill(first.pid, signal.SIGKILL)  # the driver only
        first.wait(30)
    finally:
        _kill_tree(first, ray_tmp)  # then the local Ray it had started
    assert first.returncode == -signal.SIGKILL
    saved = json.loads((_checkpoints(run_dir)[-1] / "state.json").read_text())["step"]
    assert every <= saved < steps
    assert not _pids_with(ray_tmp), "leftover Ray processes of the killed driver"

    # the rerun may change how the run executes (checkpoints kept), not what it learns: it resumes
    rerun = [*cmd, "--num-to-keep", "3"]
    for _ in range(2):
        second = subprocess.Popen(
            rerun, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        try:
            output, _ = second.communicate(timeout=900)
        finally:
            _kill_tree(second, ray_tmp)
        # Ray gives its raylet a fixed 30 s to start; a heavily loaded shared machine can miss it
        if second.returncode == 0 or "timed out during startup" not in output:
            break
    assert second.returncode == 0, output[-3000:]
    assert not _pids_with(ray_tmp)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    run_cfg = json.loads(
        Path(digits_store.join("models", "ft-driver", "denoiser", "run_config.json")).read_text()
    )
    assert run_cfg["step"] == steps
    # continued from a checkpoint of the killed run, not from scratch: Ray Train resumes from the latest
    # checkpoint its controller *registered*, which may trail the newest directory a worker was still
    # writing when the driver died
    (resumed,) = run_cfg["resumed_from"]
    assert every <= resumed <= saved and resumed % every == 0
    assert f"resumed denoiser from step {resumed}" in output
