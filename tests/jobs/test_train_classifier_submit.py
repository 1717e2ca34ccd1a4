"""Real job submission: a real Ray head (`ray start --head --block`) and `ray job submit --working-dir .`
of jobs/train_classifier.py, with Ray's token authentication left on.

The head runs in its own process group with a private --temp-dir, ports and 127.0.0.1; it is stopped by
terminating that group, and leftovers are killed by their command line (never `ray stop`, which would kill
every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from pipeline.core.config import UNetConfig
from pipeline.core.diffusion import linear_schedule
from pipeline.core.models import build_unet, load_classifier, load_classifier_config, save_denoiser
from pipeline.train.workers import read_checkpoint
from tests.ports import free_ports

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# the bin folder of the interpreter running the tests (a venv's, conda's, the system's): its `ray`
# CLI and its `python`, whichever environment the package was installed into
VENV_BIN = Path(sys.executable).parent
# what `--working-dir .` must never upload (Ray also honours .gitignore; these make it explicit)
EXCLUDES = [".venv", ".git", "demo-out", "out", "build", "**/__pycache__", ".pytest_cache"]


def _pids_with(marker: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmd:
                pids.append(int(d.name))
    return pids


def _stop_head(head: subprocess.Popen | None, temp_dir: str) -> None:
    """SIGTERM the head's process group, then SIGKILL what is left of it and of its temp dir."""
    if head is not None:
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(5)  # `ray start --block` may linger on SIGTERM: SIGKILL follows
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
    deadline = time.time() + 20
    while (left := _pids_with(temp_dir)) and time.time() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
    if not _pids_with(temp_dir):
        shutil.rmtree(temp_dir, ignore_errors=True)


class _PortTaken(Exception):
    """The head exited: a port it was given was taken meanwhile."""


def _start_head(log_path: Path, env: dict, temp_dir: str):
    """``(process, dashboard URL)`` of a head on 127.0.0.1 with 2 CPUs once its dashboard answers;
    ``(None, None)`` if it exited because a port it was given was taken."""
    # every port the head listens on is picked free: other Ray instances run on this machine
    port, dash, client, agent, agent_grpc, metrics, env_agent = free_ports(7)
    with open(log_path, "w") as log:
        head = subprocess.Popen(
            [
                str(VENV_BIN / "ray"), "start", "--head", "--block", "--num-cpus=2",
                "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--port={port}",
                f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
                f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={env_agent}",
                f"--temp-dir={temp_dir}", "--disable-usage-stats",
            ],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 150
    try:
        return _wait_for_dashboard(head, log_path, url, deadline)
    except _PortTaken:
        _stop_head(head, temp_dir)
        return None, None
    except BaseException:
        _stop_head(head, temp_dir)
        raise


def _wait_for_dashboard(head, log_path: Path, url: str, deadline: float):
    while True:
        if head.poll() is not None:
            text = log_path.read_text()
            if "port" in text and ("used by other components" in text or "in use" in text):
                raise _PortTaken
            raise AssertionError(text[-3000:])
        try:  # the dashboard is up once it answers: 401, since token auth is on
            urllib.request.urlopen(f"{url}/api/version", timeout=5)
            raise AssertionError("the head answered without a token: auth is off")
        except urllib.error.HTTPError as exc:
            assert exc.code == 401, exc
            return head, url
        except OSError:
            assert time.time() < deadline, "the Ray head did not come up"
            time.sleep(1)


@pytest.fixture
def ray_head(tmp_path):
    """A real head on 127.0.0.1 with 2 CPUs; yields (dashboard URL, client env)."""
    temp_dir = f"/tmp/r{uuid.uuid4().hex[:8]}"  # socket paths must stay short
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is the venv's
    head = None
    try:
        # another Ray on this machine (the suite runs two workers) may take a port between picking
        # and binding it: the head then exits naming the port, and starts again on others
        for attempt in range(3):
            head, url = _start_head(tmp_path / f"head{attempt}.log", env, temp_dir)
            if head is not None:
                break
        assert head is not None, (tmp_path / "head2.log").read_text()[-3000:]
        yield url, env, temp_dir
    finally:
        _stop_head(head, temp_dir)
    assert not _pids_with(temp_dir), "leftover Ray processes of the test head"


@pytest.fixture
def submit_store(tmp_path):
    """Tiny digit shards (8 train / 24 held out) and a tiny diffusers UNet2DModel directory."""
    from pipeline.data.datasets import digits_source, split
    from pipeline.data.storage import open_store
    from pipeline.orchestration.stages import make_shards

    store = open_store(str(tmp_path / "store"))
    train, holdout = split(digits_source(16), 8, 0)
    make_shards(store, "digits", train, holdout.subset(range(24)), shard_size=16)
    unet = build_unet(UNetConfig(block_out_channels=(8, 16), norm_num_groups=8))
    save_denoiser(unet, tmp_path / "denoiser", {"run": "tiny"}, linear_schedule(beta_end=0.03))
    return store, tmp_path / "denoiser"


def _submit(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """``ray job submit``, retried while the head's job agent is still starting (busy machine)."""
    for _ in range(30):
        proc = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
        )
        if "No available agent to submit job" not in proc.stdout + proc.stderr:
            return proc
        time.sleep(5)
    return proc


def test_ray_job_submit_trains_classifier_with_token_auth(ray_head, submit_store):
    url, env, temp_dir = ray_head
    store, denoiser = submit_store
    job = [
        "python", "jobs/train_classifier.py", "--store", store.uri, "--run", "submitted",
        "--denoiser", str(denoiser), "--steps", "20", "--batch-size", "16",
        "--holdout-images", "8", "--checkpoint-every", "10", "--num-to-keep", "1",
        "--num-workers", "1", "--base-channels", "8",
    ]  # fmt: skip
    job_id = f"cps-{uuid.uuid4().hex[:8]}"
    submit = [
        str(VENV_BIN / "ray"), "job", "submit", "--address", url, "--working-dir", ".",
        "--submission-id", job_id,
        "--runtime-env-json", json.dumps({"excludes": EXCLUDES}), "--", *job,
    ]  # fmt: skip
    # without the client's token mode the head refuses the job
    refused = _submit(submit, {**env, "RAY_AUTH_MODE": "disabled"}, 120)
    assert refused.returncode != 0
    assert "401" in refused.stdout + refused.stderr or "nauthori" in refused.stdout + refused.stderr
    # with it (the token is read from ~/.ray/auth_token, or RAY_AUTH_TOKEN) the job runs
    t0 = time.time()
    proc = _submit(submit, {**env, "RAY_AUTH_MODE": "token"}, 400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    print(f"job submitted and finished in {time.time() - t0:.1f} s")
    assert f"Job '{job_id}' succeeded" in out, out[-4000:]
    status = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "status", "--address", url, job_id],
        capture_output=True, text=True, timeout=120, env={**env, "RAY_AUTH_MODE": "token"},
    )  # fmt: skip
    assert f"Job '{job_id}' succeeded" in status.stdout + status.stderr, status.stdout
    # the working dir the head unpacked has the code, and nothing of .venv (GBs) or .git
    files = Path(temp_dir, "session_latest", "runtime_resources", "working_dir_files")
    pkgs = [d for d in files.iterdir() if (d / "jobs" / "train_classifier.py").exists()]
    assert pkgs, sorted(files.iterdir())
    for pkg in pkgs:
        assert (pkg / "pipeline").is_dir()
        assert not (pkg / ".venv").exists() and not (pkg / ".git").exists()
    # the job ran on the head (its driver is under the head's temp dir), checkpoints in the store
    run_dir = Path(store.join("checkpoints", "submitted-classifier"))
    ckpts = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert len(ckpts) == 1
    tensors, state, _ = read_checkpoint(ckpts[0])
    assert state["step"] == 20 and state["kind"] == "classifier"
    assert state["betas_from"] == str(denoiser)
    assert "model" in tensors
    clf = load_classifier(store.join("models", "submitted", "classifier"), (1, 16, 16))
    assert clf is not None
    # the model card, and the job's line on what sampling will do with it
    card = load_classifier_config(store.join("models", "submitted", "classifier"))["fit"]
    assert card == state["fit"] and card["step"] == 20 and card["rows"] == 8
    assert card["fits"] is (card["accuracy"] >= 0.9)
    assert f"fit: {card['accuracy']:.1%} of its own bits at 0 <= t < 100 (8 training rows" in out
    verdict = (
        "meets min_fit 90%"
        if card["fits"]
        else (
            "BELOW min_fit 90%: sample --sampler cpsample refuses it (exit 2) unless --allow-unfit"
        )
    )
    assert verdict in out
