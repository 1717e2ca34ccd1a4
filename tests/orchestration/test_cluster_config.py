"""Cluster configs, checked offline with Ray's own validators (no cloud calls, no cluster)."""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.orchestration.cluster_config import (
    FAKE_HEAD_NODE_TYPE,
    ClusterConfigError,
    autoscaling_config,
    check_gpu_worker_types,
    fake_autoscaling_config,
    gpu_worker_problems,
    load_cluster_yaml,
    worker_types,
)

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
AWS_YAML = CLUSTER / "aws.yaml"
RAYCLUSTER_YAML = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB_YAML = CLUSTER / "kuberay" / "rayjob-sample.yaml"
# GPUs per instance of the AWS types we use: resources.GPU must not promise more (or fewer).
AWS_GPUS = {"g5.xlarge": 1, "g5.2xlarge": 1, "g5.12xlarge": 4, "g5.48xlarge": 8, "g6.xlarge": 1}


@pytest.fixture
def no_cloud_calls(monkeypatch):
    """Any AWS API call (botocore) fails the test: validation must stay offline."""
    import botocore.client

    def refuse(self, operation, params):
        raise AssertionError(f"cloud call during offline validation: {operation}")

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", refuse)


@pytest.fixture
def aws() -> dict:
    return load_cluster_yaml(AWS_YAML)


def prepared(config: dict) -> dict:
    """What ``ray up`` validates: the config merged with the provider's defaults."""
    return autoscaling_config(config)


# ------------------------------------------------------------------------------------------- AWS
def test_aws_yaml_passes_rays_validator(aws, no_cloud_calls):
    cfg = prepared(aws)
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    assert set(types) == {"head_cpu", "gpu_sample_1x", "gpu_train_4x"}
    assert cfg["head_node_type"] == "head_cpu"
    assert types["head_cpu"]["max_workers"] == 0
    assert "GPU" not in types["head_cpu"]["resources"]  # GPU work never lands on the head
    assert sum(t["min_workers"] for t in types.values()) == 0  # nothing runs (or costs) when idle
    assert cfg["max_workers"] >= max(t["max_workers"] for t in worker_types(cfg).values())
    assert 0 < cfg["idle_timeout_minutes"] <= 10


def test_aws_gpu_worker_types_scale_from_zero(aws):
    check_gpu_worker_types(aws, str(AWS_YAML))  # explicit in the YAML, not filled in by defaults
    for name, spec in worker_types(aws).items():
        instance = spec["node_config"]["InstanceType"]
        assert spec["resources"]["GPU"] == AWS_GPUS[instance], (name, instance)
        assert spec["resources"]["CPU"] >= 1
    workers = worker_types(aws)
    assert workers["gpu_sample_1x"]["resources"]["GPU"] == 1  # one actor, one GPU
    assert workers["gpu_sample_1x"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert workers["gpu_train_4x"]["resources"]["GPU"] >= 2  # multi-GPU Ray Train
    assert "InstanceMarketOptions" not in workers["gpu_train_4x"]["node_config"]


def test_aws_nodes_install_the_project_and_use_token_auth(aws):
    cfg = prepared(aws)
    assert cfg["file_mounts"]["~/cpsample-ray"] == "."
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for commands in (cfg["head_setup_commands"], cfg["worker_setup_commands"]):
        assert any('pip install --quiet -e "$HOME/cpsample-ray[gpu]"' in c for c in commands)
    assert any("RAY_AUTH_MODE=token ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any(
        "RAY_AUTH_MODE=token ray start --address" in c for c in cfg["worker_start_ray_commands"]
    )
    for name, spec in cfg["available_node_types"].items():
        arn = spec["node_config"]["IamInstanceProfile"]["Arn"]  # S3 access: the user fills it in
        assert arn.startswith("arn:aws:iam::") and ":instance-profile/" in arn, name
        assert "AccessKey" not in str(spec["node_config"])  # never credentials in the config


# ------------------------------------------------------------------ the GPU check can fail
def _break(config: dict, how: str) -> dict:
    broken = copy.deepcopy(config)
    types = broken["available_node_types"]
    if how == "no GPU resource":
        del types["gpu_sample_1x"]["resources"]["GPU"]
    elif how == "zero GPUs":
        types["gpu_train_4x"]["resources"]["GPU"] = 0
    elif how == "no max_workers":
        del types["gpu_sample_1x"]["max_workers"]
    elif how == "max_workers 0":
        types["gpu_train_4x"]["max_workers"] = 0
    elif how == "min_workers 1":
        types["gpu_sample_1x"]["min_workers"] = 1
    elif how == "no GPU type":
        for name in [n for n in types if "gpu" in n]:
            spec = types.pop(name)
            spec["resources"].pop("GPU")
            types[name.replace("gpu", "cpu")] = spec
    return broken


@pytest.mark.parametrize(
    "how, message",
    [
        ("no GPU resource", r"'gpu_sample_1x': resources.GPU must be >= 1, got 0"),
        ("zero GPUs", r"'gpu_train_4x': resources.GPU must be >= 1, got 0"),
        ("no max_workers", r"'gpu_sample_1x': max_workers must be a positive integer, got None"),
        ("max_workers 0", r"'gpu_train_4x': max_workers must be a positive integer, got 0"),
        ("min_workers 1", r"'gpu_sample_1x': min_workers must be 0"),
        ("no GPU type", r"no GPU worker type"),
    ],
)
def test_gpu_check_fails_on_a_broken_copy(aws, how, message):
    broken = _break(aws, how)
    with pytest.raises(ClusterConfigError, match=message):
        check_gpu_worker_types(broken, "broken copy")
    assert gpu_worker_problems(aws) == []  # the real file still passes


def test_gpu_check_catches_what_rays_validator_accepts(aws):
    """Ray's validator is happy without GPUs or per-type bounds; only our check stops it."""
    broken = _break(_break(aws, "no GPU resource"), "no max_workers")
    prepared(broken)  # valid for Ray: max_workers defaults to the global bound
    assert len(gpu_worker_problems(broken)) == 2


# ------------------------------------------------------------------------------------- KubeRay
def derive_kuberay(cr: dict) -> dict:
    """Ray's KubeRay deriver, then ``validate_config``."""
    return autoscaling_config(cr)


def test_kuberay_raycluster_converts_and_validates():
    cr = load_cluster_yaml(RAYCLUSTER_YAML)
    assert cr["kind"] == "RayCluster" and cr["spec"]["enableInTreeAutoscaling"] is True
    config = derive_kuberay(cr)
    check_gpu_worker_types(config, str(RAYCLUSTER_YAML))
    types = config["available_node_types"]
    assert set(types) == {"headgroup", "gpu-sample", "gpu-train"}
    assert "GPU" not in types["headgroup"]["resources"]
    assert types["gpu-sample"]["resources"]["GPU"] == 1
    assert types["gpu-train"]["resources"]["GPU"] == 4
    assert (types["gpu-sample"]["max_workers"], types["gpu-train"]["max_workers"]) == (8, 2)
    assert config["idle_timeout_minutes"] == 5.0
    for group in cr["spec"]["workerGroupSpecs"]:
        assert group["minReplicas"] == 0
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1


def test_kuberay_gpu_check_fails_without_gpu_limits():
    cr = load_cluster_yaml(RAYCLUSTER_YAML)
    for group in cr["spec"]["workerGroupSpecs"]:
        if group["groupName"] == "gpu-sample":
            for section in group["template"]["spec"]["containers"][0]["resources"].values():
                section.pop("nvidia.com/gpu")
    with pytest.raises(ClusterConfigError, match=r"'gpu-sample': resources.GPU must be >= 1"):
        check_gpu_worker_types(derive_kuberay(cr))


# ------------------------------------------------------------------ the commands use real flags
# Every job's --help, from one interpreter (the jobs share their heavy imports).
_HELP_ALL = """
import contextlib, io, json, runpy, sys
out = {}
for path in sys.argv[1:]:
    buf = io.StringIO()
    sys.argv = [path, "--help"]
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        runpy.run_path(path, run_name="__main__")
    out[path] = buf.getvalue()
print(json.dumps(out))
"""


def job_helps(scripts: list[str]) -> dict[str, str]:
    """``--help`` text of each ``jobs/<script>``."""
    import json

    paths = [str(ROOT / "jobs" / s) for s in scripts]
    proc = subprocess.run(
        [sys.executable, "-c", _HELP_ALL, *paths],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    helps = json.loads(proc.stdout.strip().splitlines()[-1])
    return {Path(p).name: text for p, text in helps.items()}


def _job_commands(text: str) -> list[tuple[str, list[str]]]:
    """``(script, flags)`` of every ``python jobs/X.py --flag ...`` command in ``text``."""
    text = text.replace("\\\n", " ")
    out = []
    for m in re.finditer(r"python (?:\S*/)?jobs/(\w+\.py)([^\n`|]*)", text):
        flags = [t.split("=")[0] for t in shlex.split(m.group(2)) if t.startswith("--")]
        out.append((m.group(1), flags))
    return out


def test_rayjob_and_readme_commands_use_flags_the_jobs_accept():
    job = load_cluster_yaml(RAYJOB_YAML)
    cr = load_cluster_yaml(RAYCLUSTER_YAML)
    assert job["kind"] == "RayJob"
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cr["metadata"]["name"]
    entry = job["spec"]["entrypoint"]
    assert "jobs/sample.py" in entry and "--store s3://" in entry
    commands = _job_commands(entry) + _job_commands((CLUSTER / "README.md").read_text())
    scripts = {script for script, _ in commands}
    assert {"make_shards.py", "train_denoiser.py", "train_classifier.py", "sample.py"} <= scripts
    helps = job_helps(sorted(scripts))
    assert all("usage:" in text for text in helps.values()), helps
    for script, flags in commands:
        unknown = [f for f in flags if not re.search(rf"{re.escape(f)}(?![\w-])", helps[script])]
        assert not unknown, f"{script} does not accept {unknown}"


# ------------------------------------------------------------ the fake twin of the AWS node types
def test_fake_autoscaling_config_mirrors_aws_yaml(aws):
    from ray.autoscaler._private.util import validate_config

    fake = fake_autoscaling_config(aws, "127.0.0.1:6390")
    validate_config(fake)
    assert fake["provider"]["type"] == "fake_multinode"
    assert fake["provider"]["gcs_address"] == "127.0.0.1:6390"
    assert fake["head_node_type"] == FAKE_HEAD_NODE_TYPE
    assert set(worker_types(fake)) == set(worker_types(aws))
    for name, spec in worker_types(fake).items():
        assert spec["resources"]["GPU"] == aws["available_node_types"][name]["resources"]["GPU"]
        assert (spec["min_workers"], spec["max_workers"]) == (0, 1)
    check_gpu_worker_types(fake)
    assert fake["idle_timeout_minutes"] == 0.1
