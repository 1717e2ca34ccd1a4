"""Autoscaling behaviour: the node types of cluster/aws.yaml, as fake nodes, under Ray's real autoscaler.

A private head (``ray start --head --block`` in its own process group, its own ports and temp dir)
runs the ``fake_multinode`` provider: each "node" the autoscaler launches is a set of extra Ray
processes on this machine with the node type's logical resources, GPUs included. The head advertises
0 CPUs, as in aws.yaml. A CPU-only task (make_shards' and the index build's kind) must scale the CPU
type from zero and run there, with no GPU node launched. The sampling stage then asks for one GPU per
actor; the cluster must launch the GPU sampling type, finish the job (the actor falls back to the
CPU: no CUDA here), and remove every worker once idle.

Isolation: these tests never run ``ray stop``. Every process of the fake cluster carries a marker in
its environment (and the private temp dir in most command lines); teardown ends exactly those.
The driver runs in a subprocess (this file, run as a script), so this pytest process holds no Ray
connection at all.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.ports import free_ports

ROOT = Path(__file__).resolve().parents[2]
AWS_YAML = ROOT / "cluster" / "aws.yaml"
MARKER = "CPSAMPLE_FAKE_CLUSTER_ID"

pytestmark = pytest.mark.autoscaling


# ------------------------------------------------------------------------------- the private head
@dataclass
class FakeCluster:
    proc: subprocess.Popen
    port: int
    temp_dir: str
    marker: str
    env: dict[str, str]
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def start_fake_cluster(config: dict, workdir: Path, timeout_s: float = 90.0) -> FakeCluster:
    """``ray start --head --block`` with the fake provider; returns once the head is up."""
    port, dash, client, agent = free_ports(4)
    from pipeline.orchestration.cluster_config import FAKE_HEAD_NODE_TYPE, fake_autoscaling_config

    fake = fake_autoscaling_config(config, f"127.0.0.1:{port}")
    head_cpus = fake["available_node_types"][FAKE_HEAD_NODE_TYPE]["resources"]["CPU"]
    cfg_path = workdir / "fake-autoscaling.json"
    cfg_path.write_text(json.dumps(fake))
    temp_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: socket paths live under it
    marker = secrets.token_hex(8)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({
        "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_USAGE_STATS_ENABLED": "0", MARKER: marker,
    })  # fmt: skip
    cmd = [
        str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
        f"--autoscaling-config={cfg_path}", f"--num-cpus={head_cpus}", "--num-gpus=0",
        f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}", f"--temp-dir={temp_dir}",
        f"--object-store-memory={150 * 1024**2}", "--disable-usage-stats",
    ]  # fmt: skip
    log = workdir / "head.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    cluster = FakeCluster(proc, port, temp_dir, marker, env, log)
    deadline = time.monotonic() + timeout_s
    while "Ray runtime started" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            leftovers = stop_fake_cluster(cluster)
            raise RuntimeError(
                f"fake head did not start (exit {proc.poll()}, leftovers {leftovers}):\n"
                + log.read_text(errors="replace")[-3000:]
            )
        time.sleep(0.5)
    return cluster


def cluster_pids(cluster: FakeCluster) -> list[int]:
    """Processes of this fake cluster only: the marker in their environment, or the private temp dir
    or GCS address in their command line (Ray workers rename their command line to ``ray::...``)."""
    me, found = os.getpid(), []
    needles = (cluster.temp_dir.encode(), f"127.0.0.1:{cluster.port}".encode())
    marker = f"{MARKER}={cluster.marker}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if marker in environ.split(b"\0") or any(n in cmdline for n in needles):
            found.append(int(entry.name))
    return found


def stop_fake_cluster(cluster: FakeCluster, grace_s: float = 20.0) -> list[int]:
    """Terminate the head's process group, then kill what is left of this cluster (the fake nodes
    are processes the autoscaler started, not children of the head's group). Returns survivors."""
    try:
        os.killpg(cluster.proc.pid, signal.SIGTERM)
        cluster.proc.wait(timeout=grace_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(cluster.proc.pid, signal.SIGKILL)
    cluster.proc.wait(timeout=10)
    deadline = time.monotonic() + 15
    while (pids := cluster_pids(cluster)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
    survivors = cluster_pids(cluster)
    if not survivors:
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)
    return survivors


def run_driver(cluster: FakeCluster, store: str, run: str, logs: Path, timeout_s: float = 420.0):
    """This file as a script, connected to the fake cluster; killed (rc -9) if it overruns."""
    logs.mkdir(parents=True, exist_ok=True)
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    with (logs / "driver.out").open("w") as out, (logs / "driver.err").open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, __file__, cluster.address, store, run],
            env={**cluster.env, "PYTHONPATH": pythonpath}, stdout=out, stderr=err, cwd=ROOT,
        )  # fmt: skip
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(
        proc.args, proc.returncode, (logs / "driver.out").read_text(), _tail(logs / "driver.err")
    )


def keep_autoscaler_logs(cluster: FakeCluster, logs: Path) -> None:
    """Copy the autoscaler's log out of the temp dir (teardown removes it)."""
    logs.mkdir(parents=True, exist_ok=True)
    src = Path(cluster.temp_dir) / "session_latest" / "logs"
    for name in ("monitor.log", "monitor.err", "monitor.out"):
        if (src / name).is_file():
            shutil.copy(src / name, logs / name)


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else f"({path.name} missing)"


# ---------------------------------------------------------------------------------- tiny models
def make_tiny_store(root: Path, run: str) -> str:
    """A local store with an untrained 8x8 denoiser and classifier under models/<run>/."""
    import torch

    from pipeline.core.config import ClassifierArchConfig, UNetConfig, to_dict
    from pipeline.core.diffusion import linear_schedule
    from pipeline.core.models import NoiseClassifier, build_unet, save_classifier, save_denoiser

    torch.manual_seed(0)
    unet_cfg = UNetConfig(
        sample_size=8, channels=1, block_out_channels=(8, 16), layers_per_block=1,
        attention_levels=(), norm_num_groups=8,
    )  # fmt: skip
    clf_cfg = ClassifierArchConfig(
        sample_size=8, channels=1, base_channels=8, channel_mults=(1, 2), time_embed_dim=8,
        num_groups=4,
    )  # fmt: skip
    models = root / "models" / run
    save_denoiser(
        build_unet(unet_cfg), models / "denoiser", {"unet": to_dict(unet_cfg)}, linear_schedule()
    )
    save_classifier(NoiseClassifier(clf_cfg), models / "classifier", {"label_seed": 0})
    return str(root)


# ------------------------------------------------------------------------------- the behaviour test
def test_cpu_and_gpu_groups_scale_up_for_their_demand_and_down_when_idle(tmp_path):
    from pipeline.orchestration.cluster_config import (
        check_gpu_worker_types,
        cpu_worker_problems,
        head_problems,
        load_cluster_yaml,
    )

    aws = load_cluster_yaml(AWS_YAML)
    check_gpu_worker_types(aws, str(AWS_YAML))
    assert cpu_worker_problems(aws) == [] and head_problems(aws) == []
    store = make_tiny_store(tmp_path / "store", "tiny")
    cluster = start_fake_cluster(aws, tmp_path)
    logs = tmp_path / "logs"
    try:
        driver = run_driver(cluster, store, "tiny", logs)
    finally:
        keep_autoscaler_logs(cluster, logs)
        leftovers = stop_fake_cluster(cluster)
    assert driver.returncode == 0, (
        f"driver failed ({driver.returncode}):\n{driver.stderr[-4000:]}\n"
        f"autoscaler:\n{_tail(logs / 'monitor.log')}"
    )
    out = json.loads(driver.stdout.strip().splitlines()[-1])

    assert out["cpus_before"] == 0 and out["gpus_before"] == 0 and out["workers_before"] == 0
    # a CPU-only demand: the CPU type, from zero, was the only type launched, and ran the task
    assert out["cpu_phase_types"] == ["cpu_ingest"]
    assert out["cpu_task_node"] == {"on_head": False, "GPU": 0, "CPU": 1}  # fake cpu_ingest: 1 CPU
    # a GPU demand: the sampling actor launched a worker of the GPU sampling type
    assert out["peak_gpus"] >= 1
    assert set(out["gpu_phase_types"]) <= set(aws["available_node_types"])
    assert [t for t in out["gpu_phase_types"] if "gpu" in t] == ["gpu_sample_1x"]  # 1 CPU + 1 GPU
    # the job finished, on the CPU, and wrote its shards
    assert out["result"]["num_samples"] == 8 and out["result"]["num_shards"] == 2
    shards = sorted((Path(store) / "samples" / "tiny" / "cpsample").glob("shard-*.tar"))
    assert [p.name for p in shards] == ["shard-000000.tar", "shard-000001.tar"]
    assert out["actor_device"] == "cpu"
    # scale down: every idle worker went away, CPU and GPU
    assert out["gpus_after"] == 0 and out["workers_after"] == 0, out
    # teardown left nothing of this cluster behind
    assert leftovers == [], f"processes of the fake cluster still alive: {leftovers}"
    # Ray's own shutdown may log a traceback once the head gets SIGTERM (draining the node races the
    # GCS going away: "RpcError: CANCELLED"); any traceback before that is the cluster's failure
    head_log = (tmp_path / "head.log").read_text().split("received SIGTERM", 1)[0]
    assert "Traceback" not in head_log, "head logged a traceback before teardown"
    print(
        f"CPU node ran the task {out['cpu_task_s']:.1f} s after it was submitted; first GPU node "
        f"{out['scale_up_s']:.1f} s after run_sampling started, job {out['job_s']:.1f} s, "
        f"workers gone {out['scale_down_s']:.1f} s after the job"
    )


# ------------------------------------------------------------------- driver (runs as a subprocess)
def _workers(ray) -> list[dict]:
    """Alive nodes other than the head (the driver's node: it connects through the head's raylet)."""
    head = ray.get_runtime_context().get_node_id()
    return [n for n in ray.nodes() if n["Alive"] and n["NodeID"] != head]


def _launched_node_types() -> set[str]:
    """Worker node types the autoscaler reports as active or launching (its status in the GCS)."""
    from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
    from ray.experimental.internal_kv import _internal_kv_get

    from pipeline.orchestration.cluster_config import FAKE_HEAD_NODE_TYPE

    raw = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
    report = json.loads(raw).get("autoscaler_report", {}) if raw else {}
    types = set(report.get("active_nodes") or {}) | set(report.get("pending_launches") or {})
    return types - {FAKE_HEAD_NODE_TYPE}


class _Watcher:
    """Polls the autoscaler's launched node types and the cluster's GPUs every 0.5 s."""

    def __init__(self, ray):
        import threading

        self.ray, self.types, self.peak_gpus, self.first_gpu_at = ray, set(), 0.0, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # a slow GCS reply only skips one look
                self.types.update(_launched_node_types())
                gpus = self.ray.cluster_resources().get("GPU", 0)
                if gpus and self.first_gpu_at is None:
                    self.first_gpu_at = time.monotonic()
                self.peak_gpus = max(self.peak_gpus, gpus)
            self._stop.wait(0.5)

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(Exception):
            self.types.update(_launched_node_types())
        return sorted(self.types)


def _node_of_this_task() -> dict:
    """The ID and logical CPUs and GPUs of the node this task runs on."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
    return {"id": node_id, **{r: node["Resources"].get(r, 0) for r in ("CPU", "GPU")}}


def _driver(address: str, store: str, run: str) -> dict:
    """Connect; run a CPU-only task, then sample with 1 GPU per actor while watching the node
    types the autoscaler launches; then wait for every worker to go."""
    import ray

    from pipeline.core.config import SamplerConfig
    from pipeline.fanout.sampling import run_sampling

    ray.init(address=address, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    out = {
        "cpus_before": ray.cluster_resources().get("CPU", 0),
        "gpus_before": ray.cluster_resources().get("GPU", 0),
        "workers_before": len(_workers(ray)),
    }
    watcher, t0 = _Watcher(ray), time.monotonic()
    node = ray.get(ray.remote(num_cpus=1)(_node_of_this_task).remote())
    node["on_head"] = node.pop("id") == ray.get_runtime_context().get_node_id()
    out["cpu_task_node"] = node
    out["cpu_task_s"] = time.monotonic() - t0
    out["cpu_phase_types"] = watcher.stop()

    watcher, t0 = _Watcher(ray), time.monotonic()
    cfg = SamplerConfig(
        sampler="cpsample", num_samples=8, steps=4, batch_size=4, samples_per_shard=4, seed=0
    )
    out["result"] = run_sampling(
        store, run, cfg, f"models/{run}/denoiser", f"models/{run}/classifier",
        concurrency=1, cpus_per_actor=1, gpus_per_actor=1.0,
    )  # fmt: skip
    t_job = time.monotonic()
    out["gpu_phase_types"] = watcher.stop()
    out.update(peak_gpus=watcher.peak_gpus, job_s=t_job - t0)
    out["scale_up_s"] = (watcher.first_gpu_at - t0) if watcher.first_gpu_at else None
    out["actor_device"] = ray.get(_device_on_gpu_node.remote())
    deadline = time.monotonic() + 120
    while (_workers(ray) or ray.cluster_resources().get("GPU", 0)) and time.monotonic() < deadline:
        time.sleep(1)
    out["scale_down_s"] = time.monotonic() - t_job
    out["gpus_after"] = ray.cluster_resources().get("GPU", 0)
    out["workers_after"] = len(_workers(ray))
    ray.shutdown()
    return out


def _remote_device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    import ray

    _device_on_gpu_node = ray.remote(num_gpus=1, num_cpus=1)(_remote_device)
    print(json.dumps(_driver(*sys.argv[1:4])))
