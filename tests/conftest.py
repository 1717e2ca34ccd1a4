"""Shared fixtures: tiny model configs, a real in-process Ray, the digits store, loopback S3, the quick
demo run once a session."""

from __future__ import annotations

import os

import pytest
import torch

from pipeline.core.config import ClassifierArchConfig, UNetConfig
from tests.ports import free_ports

# ------------------------------------------------------------------ parallel runs (pytest-xdist)
# Session fixtures that train or run something for minutes: with `-n 2 --dist loadgroup` (make test),
# every test file that uses one of them runs on the same worker, so each is built once per run.
SHARED_SESSION_FIXTURES = ("demo_quick_run", "demo_quick_store", "headline_models")


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config, items):
    """Under ``--dist loadgroup``, one xdist group per test file, merged across the files that share
    a costly session fixture; slow groups first, so that the last groups to start are short ones.
    A wrapper, so that the groups exist before xdist's own hook reads them."""
    if config.getoption("loadgroup", default=False):
        _group_by_file_and_shared_fixture(items)
    return (yield)


def _group_by_file_and_shared_fixture(items) -> None:
    files: dict[str, str] = {}  # file -> group (union of files sharing a fixture)
    by_fixture: dict[str, str] = {}
    for item in items:
        path = item.nodeid.split("::")[0]
        group = files.setdefault(path, path)
        for name in SHARED_SESSION_FIXTURES:
            if name in item.fixturenames:
                other = by_fixture.setdefault(name, group)
                if other != group:
                    files.update({f: other for f, g in files.items() if g == group})
                    by_fixture.update({n: other for n, g in by_fixture.items() if g == group})
                    group = other
    group_of = {item.nodeid: files[item.nodeid.split("::")[0]] for item in items}
    slow = {group_of[i.nodeid] for i in items if i.get_closest_marker("slow")}
    slow |= set(by_fixture.values())
    for item in items:
        item.add_marker(pytest.mark.xdist_group(group_of[item.nodeid]))
    order = {g: n for n, g in enumerate(dict.fromkeys(files.values()))}
    items.sort(key=lambda i: (group_of[i.nodeid] not in slow, order[group_of[i.nodeid]]))


# The jobs the tests start as processes need no Ray dashboard (pipeline.fanout.ray_init): about
# 2 CPU-seconds less per job on a 2-core machine. ray_local keeps its own (the state API needs it).
os.environ.setdefault("CPSAMPLE_RAY_DASHBOARD", "0")
# Two xdist workers share 2 vCPUs with the Ray workers and jobs they start: OpenMP threads that spin
# while they wait for work burn the other worker's CPU. Passive waiting cut two concurrent tiny trainings
# from 77 to 67 s of wall time (144 to 120 CPU-seconds). Processes started from here inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(autouse=True, scope="session")
def _core_single_thread():
    """The test machine is shared: keep torch on one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def core_tiny_unet_cfg() -> UNetConfig:
    """A diffusers UNet2DModel small enough to run in milliseconds on 8x8 images."""
    return UNetConfig(
        sample_size=8,
        channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        attention_levels=(),
        norm_num_groups=8,
    )


@pytest.fixture
def core_tiny_clf_cfg() -> ClassifierArchConfig:
    """A NoiseClassifier for 8x8 grayscale images."""
    return ClassifierArchConfig(
        sample_size=8,
        channels=1,
        base_channels=8,
        channel_mults=(1, 2),
        time_embed_dim=8,
        num_groups=4,
    )


@pytest.fixture(scope="session")
def ray_local():
    """A real in-process local Ray with 2 CPUs, shared by the Ray tests of the session."""
    import ray

    from pipeline.fanout.ray_init import init_ray

    # a private instance: never a head another test or session started
    init_ray(num_cpus=2, include_dashboard=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_store(tmp_path_factory):
    """A local store with 16x16 digit shards: 32 training images, the rest held out."""
    from pipeline.data.datasets import digits_source, split
    from pipeline.data.storage import open_store
    from pipeline.orchestration.stages import make_shards

    store = open_store(str(tmp_path_factory.mktemp("store")))
    train, holdout = split(digits_source(16), 32, 0)
    make_shards(store, "digits", train, holdout.subset(range(300)), shard_size=100)
    return store


# ------------------------------------------------------------------------------ S3 on loopback (moto)
@pytest.fixture(scope="session")
def s3_server():
    """A real S3 HTTP API (moto in server mode) on 127.0.0.1; yields its endpoint URL.

    moto checks no credentials by default; tests that need "wrong credentials" refused start their own
    server with ``INITIAL_NO_AUTH_ACTION_COUNT=0`` in its environment.
    """
    from moto.server import ThreadedMotoServer

    (port,) = free_ports()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "cpsample-test-key",
    "AWS_SECRET_ACCESS_KEY": "cpsample-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> dict[str, str]:
    """Fake credentials, a region and ``AWS_ENDPOINT_URL`` in this process's environment (and hence in
    subprocesses). Note: Ray workers started before this fixture ran do not see these variables."""
    env = {**S3_TEST_ENV, "AWS_ENDPOINT_URL": s3_server}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def s3_bucket(s3_env) -> str:
    """A fresh, empty bucket on the loopback endpoint; yields its name."""
    import uuid

    import boto3

    name = f"cps-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A tiny randomly initialised Stable Diffusion directory (the real diffusers/transformers classes,
    a locally built byte-level CLIP tokenizer) saved with ``save_pretrained``: 16x16 grayscale images,
    4x8x8 latents, a 32-dim text encoder. Nothing is downloaded."""
    from pipeline.core.latent_build import LatentArchConfig, build_latent_model, save_latent_model

    model = build_latent_model(LatentArchConfig(image_size=16, image_channels=1), seed=0)
    return save_latent_model(model, tmp_path_factory.mktemp("tiny-sd") / "sd")


@pytest.fixture(scope="session")
def headline_models():
    """The headline's 8x8-digits denoiser (it memorises its 8 training images) and random-label
    classifier, trained once per session (about 40 s on one thread): :mod:`tests.headline_models`."""
    from tests.headline_models import train_headline_models

    return train_headline_models()


# ------------------------------------------------------------------ the quick demo, run once a session
@pytest.fixture(scope="session")
def demo_quick_run(s3_server, tmp_path_factory) -> dict:
    """`jobs/demo.py --quick --out s3://cps-demo-e2e/run` as a real process on the loopback S3 (about
    100 s), once per session; the prefix's current layout (all but ``checkpoints/``, a model folder's
    current version only) is mirrored to a local folder.

    Keys: ``out`` (Path of the mirror), ``report`` (its report.json), ``proc`` (the CompletedProcess),
    ``argv``, ``client`` (boto3), ``bucket``, ``keys`` (every object key after the run, sorted) and
    ``env`` (the fake credentials and ``AWS_ENDPOINT_URL``). The S3 objects may change later in the
    session (tests/orchestration/test_demo_quick.py reruns the command into them); the mirror does not.
    """
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import boto3

    root = Path(__file__).resolve().parents[1]
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
        [sys.executable, str(root / "jobs" / "demo.py"), "--quick", "--no-progress",
         "--out", f"s3://{bucket}/run"],
        capture_output=True, text=True, timeout=900, cwd=root, env={**os.environ, **env_vars},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    keys = _all_keys(client, bucket)
    out = tmp_path_factory.mktemp("demo") / "out"
    for key, rel in _current_layout(client, bucket, keys).items():
        if not rel.startswith("checkpoints/"):
            dest = out / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    report = json.loads((out / "report.json").read_text())
    return {"out": out, "report": report, "proc": proc, "client": client, "bucket": bucket,
            "keys": sorted(keys), "env": env_vars, "argv": proc.args}  # fmt: skip


@pytest.fixture(scope="session")
def demo_quick_store(demo_quick_run) -> tuple[str, dict]:
    """``(path, report)`` of the session's quick demo: ``path`` a local folder (str) holding the run's
    store layout (``open_store(path)`` reads it: data/, models/demo/{denoiser,classifier}, samples/,
    indexes/, reports/demo/, report.json; no checkpoints/), ``report`` the demo's report dict (the
    return value of ``run_demo``, as report.json holds it). Read-only: shared by every test."""
    return str(demo_quick_run["out"]), demo_quick_run["report"]


def _all_keys(client, bucket: str) -> list[str]:
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return sorted(keys)


def _current_layout(client, bucket: str, keys: list[str]) -> dict[str, str]:
    """S3 key -> its path under ``run/`` as a reader sees it: a model folder's files are those of the
    version its ``.current`` pointer names (``Store.put_dir``); other versions are left out."""
    import json

    current = {
        key[: -len("/.current")]: json.loads(
            client.get_object(Bucket=bucket, Key=key)["Body"].read()
        )
        for key in keys
        if key.endswith("/.current")
    }
    layout = {}
    for key in keys:
        folder = next((f for f in current if key.startswith(f + "/")), None)
        if folder is not None:
            head = f"{folder}/.versions/{current[folder]['version']}/"
            if not key.startswith(head):
                continue
            key_rel = f"{folder}/{key[len(head) :]}"
        else:
            key_rel = key
        if not key.endswith("/"):
            layout[key] = key_rel[len("run/") :]
    return layout
