"""Cluster configs, checked offline with Ray's own validators (no cloud calls, no cluster)."""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.orchestration.cluster_config import (
    FAKE_HEAD_NODE_TYPE,
    ClusterConfigError,
    autoscaling_config,
    check_cluster_file,
    check_gpu_worker_types,
    cluster_problems,
    fake_autoscaling_config,
    gpu_worker_problems,
    k8s_bytes,
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
# vCPUs per instance of the AWS CPU types we use: a CPU worker type advertises all of them.
AWS_CPUS = {"m7i.2xlarge": 8, "m7i.4xlarge": 16, "m7i.8xlarge": 32, "c7i.4xlarge": 16}


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
    assert set(types) == {"head_cpu", "cpu_ingest", "gpu_sample_1x", "gpu_train_4x"}
    assert cfg["head_node_type"] == "head_cpu"
    assert types["head_cpu"]["max_workers"] == 0
    assert types["head_cpu"]["resources"] == {"CPU": 0}  # no task or actor lands on the head
    assert sum(t["min_workers"] for t in types.values()) == 0  # nothing runs (or costs) when idle
    assert cfg["max_workers"] >= max(t["max_workers"] for t in worker_types(cfg).values())
    assert 0 < cfg["idle_timeout_minutes"] <= 10


def test_aws_gpu_worker_types_scale_from_zero(aws):
    check_gpu_worker_types(aws, str(AWS_YAML))  # explicit in the YAML, not filled in by defaults
    workers = worker_types(aws)
    for name, spec in workers.items():
        instance = spec["node_config"]["InstanceType"]
        if name.startswith("gpu"):
            assert spec["resources"]["GPU"] == AWS_GPUS[instance], (name, instance)
            assert spec["resources"]["CPU"] >= 1
        else:
            assert spec["resources"] == {"CPU": AWS_CPUS[instance]}, (name, instance)
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
    assert set(types) == {"headgroup", "cpu-ingest", "gpu-sample", "gpu-train"}
    assert types["headgroup"]["resources"]["CPU"] == 0  # rayStartParams num-cpus "0"
    assert "GPU" not in types["headgroup"]["resources"]
    assert (
        types["cpu-ingest"]["resources"]["CPU"] == 14
        and "GPU" not in types["cpu-ingest"]["resources"]
    )
    assert types["gpu-sample"]["resources"]["GPU"] == 1
    assert types["gpu-train"]["resources"]["GPU"] == 4
    assert [types[g]["max_workers"] for g in ("cpu-ingest", "gpu-sample", "gpu-train")] == [8, 8, 2]
    assert config["idle_timeout_minutes"] == 5.0
    for group in cr["spec"]["workerGroupSpecs"]:
        assert group["minReplicas"] == 0
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits.get("nvidia.com/gpu", 0)) == (
            0
            if group["groupName"] == "cpu-ingest"
            else types[group["groupName"]]["resources"]["GPU"]
        )


def test_kuberay_gpu_check_fails_without_gpu_limits():
    cr = load_cluster_yaml(RAYCLUSTER_YAML)
    for group in cr["spec"]["workerGroupSpecs"]:
        if group["groupName"] == "gpu-sample":
            for section in group["template"]["spec"]["containers"][0]["resources"].values():
                section.pop("nvidia.com/gpu")
    with pytest.raises(ClusterConfigError, match=r"'gpu-sample': resources.GPU must be >= 1"):
        check_gpu_worker_types(derive_kuberay(cr))


# ----------------------------------- CPU group, head without CPUs, /dev/shm: each check can fail
def _group(cr: dict, name: str) -> dict:
    return next(g for g in cr["spec"]["workerGroupSpecs"] if g["groupName"] == name)


def _pod(group: dict) -> dict:
    return group["template"]["spec"]


def _break_file(how: str) -> dict:
    """A copy of a shipped cluster file with one field removed or changed."""
    if how.startswith("aws"):
        data = load_cluster_yaml(AWS_YAML)
        types = data["available_node_types"]
        if how == "aws: no CPU group":
            del types["cpu_ingest"]
        elif how == "aws: head CPUs unset":
            del types["head_cpu"]["resources"]["CPU"]
        elif how == "aws: head without resources":
            del types["head_cpu"]["resources"]
        elif how == "aws: head CPUs 8":
            types["head_cpu"]["resources"]["CPU"] = 8
        elif how == "aws: CPU group without CPUs":
            del types["cpu_ingest"]["resources"]["CPU"]
        elif how == "aws: CPU group min 1":
            types["cpu_ingest"]["min_workers"] = 1
        return data
    cr = load_cluster_yaml(RAYCLUSTER_YAML)
    head, train = cr["spec"]["headGroupSpec"], _group(cr, "gpu-train")
    if how == "kuberay: head num-cpus unset":
        del head["rayStartParams"]["num-cpus"]
    elif how == "kuberay: no CPU group":
        cr["spec"]["workerGroupSpecs"].remove(_group(cr, "cpu-ingest"))
    elif how == "kuberay: head without /dev/shm":
        del _pod(head)["containers"][0]["volumeMounts"]
    elif how == "kuberay: worker without /dev/shm":
        del _pod(train)["containers"][0]["volumeMounts"]
    elif how == "kuberay: /dev/shm on disk":
        del _pod(_group(cr, "cpu-ingest"))["volumes"][0]["emptyDir"]["medium"]
    elif how == "kuberay: /dev/shm volume missing":
        del _pod(_group(cr, "gpu-sample"))["volumes"]
    elif how == "kuberay: /dev/shm unbounded":
        del _pod(_group(cr, "gpu-sample"))["volumes"][0]["emptyDir"]["sizeLimit"]
    elif how == "kuberay: /dev/shm too small":
        _pod(train)["volumes"][0]["emptyDir"]["sizeLimit"] = "8Gi"
    return cr


@pytest.mark.parametrize(
    "how, message",
    [
        ("aws: no CPU group", r"available_node_types: no CPU worker type"),
        (
            "aws: head CPUs unset",
            r"available_node_types.head_cpu.resources.CPU must be 0 .*got None",
        ),
        ("aws: head without resources", r"Ray's validator refuses it: 'resources' is a required"),
        ("aws: head CPUs 8", r"available_node_types.head_cpu.resources.CPU must be 0 .*got 8"),
        ("aws: CPU group without CPUs", r"'cpu_ingest': resources.CPU must be >= 1, got None"),
        ("aws: CPU group min 1", r"'cpu_ingest': min_workers must be 0"),
        ("kuberay: head num-cpus unset", r'spec.headGroupSpec.rayStartParams.num-cpus must be "0"'),
        ("kuberay: no CPU group", r"spec.workerGroupSpecs: no CPU worker type"),
        (
            "kuberay: head without /dev/shm",
            r"spec.headGroupSpec.template.spec.containers\['ray-head'\].volumeMounts: nothing at /dev/shm",
        ),
        (
            "kuberay: worker without /dev/shm",
            r"spec.workerGroupSpecs\['gpu-train'\].template.spec.containers\['ray-worker'\]"
            r".volumeMounts: nothing at /dev/shm",
        ),
        (
            "kuberay: /dev/shm on disk",
            r"workerGroupSpecs\['cpu-ingest'\].template.spec.volumes\['dshm'\]: /dev/shm must be an "
            r"emptyDir with medium: Memory",
        ),
        (
            "kuberay: /dev/shm volume missing",
            r"\['gpu-sample'\].template.spec.volumes: no volume named 'dshm' for the /dev/shm mount",
        ),
        (
            "kuberay: /dev/shm unbounded",
            r"\['gpu-sample'\].*volumes\['dshm'\].emptyDir.sizeLimit is missing",
        ),
        (
            "kuberay: /dev/shm too small",
            r"\['gpu-train'\].*sizeLimit 8Gi is below 30% of the memory limit 160Gi",
        ),
    ],
)
def test_cluster_check_fails_on_a_copy_missing_a_field(tmp_path, how, message):
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(_break_file(how)))
    with pytest.raises(ClusterConfigError, match=message) as caught:
        check_cluster_file(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert str(caught.value).count(";") == 0, caught.value  # exactly the one broken field


def test_shipped_cluster_files_pass_every_check(no_cloud_calls):
    for path in (AWS_YAML, RAYCLUSTER_YAML):
        summary = check_cluster_file(path)
        assert summary["head_cpus"] == 0
        cpu_groups = [n for n, w in summary["workers"].items() if w["GPU"] == 0]
        assert cpu_groups == [{"launcher": "cpu_ingest"}.get(summary["kind"], "cpu-ingest")]
        data = load_cluster_yaml(path)
        assert cluster_problems(data, autoscaling_config(data)) == []


def test_kuberay_shm_holds_rays_default_object_store():
    cr = load_cluster_yaml(RAYCLUSTER_YAML)
    groups = [cr["spec"]["headGroupSpec"], *cr["spec"]["workerGroupSpecs"]]
    assert len(groups) == 4
    for group in groups:
        pod = _pod(group)
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        memory = k8s_bytes(pod["containers"][0]["resources"]["limits"]["memory"])
        shm = k8s_bytes(volume["emptyDir"]["sizeLimit"])
        assert (
            0.3 * memory <= shm <= 0.4 * memory
        )  # the store fits; the rest stays for the processes


def test_k8s_bytes_parses_quantities():
    assert k8s_bytes("16Gi") == 16 * 2**30
    assert k8s_bytes("500M") == 5e8
    assert k8s_bytes("1.5Ki") == 1536
    assert k8s_bytes(1024) == 1024
    for bad in ("16GB", "Gi", "-1Gi", "16 gi"):
        with pytest.raises(ClusterConfigError, match="is not a Kubernetes quantity"):
            k8s_bytes(bad)


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
        real = aws["available_node_types"][name]["resources"]
        assert spec["resources"].get("GPU") == real.get("GPU")
        assert (spec["min_workers"], spec["max_workers"]) == (0, 1)
    check_gpu_worker_types(fake)
    assert fake["idle_timeout_minutes"] == 0.1
    assert fake["available_node_types"][FAKE_HEAD_NODE_TYPE]["resources"] == {
        "CPU": 0
    }  # as aws.yaml
    assert (
        worker_types(fake)["cpu_ingest"]["resources"]["CPU"] == 1
    )  # capped: a fake node is a few processes
    assert "GPU" not in worker_types(fake)["cpu_ingest"]["resources"]
