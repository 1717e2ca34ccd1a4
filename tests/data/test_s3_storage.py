"""S3 stores against a real S3 HTTP API on loopback (moto server): objects, atomicity, pickling to
processes that lack the environment, Ray Data over the pyarrow filesystem, and every failure mode
with a clear, credential-free message."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from pipeline.data.s3 import resolve_endpoint, resolve_s3_access
from pipeline.data.storage import ObjectNotFound, StorageError, open_store
from tests.conftest import S3_TEST_ENV
from tests.ports import free_ports

ROOT = Path(__file__).resolve().parents[2]
SECRETS = (S3_TEST_ENV["AWS_ACCESS_KEY_ID"], S3_TEST_ENV["AWS_SECRET_ACCESS_KEY"])


def _keys(endpoint: str, bucket: str) -> list[str]:
    listed = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=bucket)
    return [o["Key"] for o in listed.get("Contents", [])]


def test_s3_store_objects(s3_bucket, s3_env):
    store = open_store(f"s3://{s3_bucket}/root/")
    assert store.uri == f"s3://{s3_bucket}/root"
    assert not store.is_local
    assert store.uri_of("a", "b.txt") == f"s3://{s3_bucket}/root/a/b.txt"
    assert store.write_bytes(b"hello", "a", "b.txt") == f"s3://{s3_bucket}/root/a/b.txt"
    assert store.read_bytes("a", "b.txt") == b"hello"
    assert store.exists("a", "b.txt") and store.exists("a") and not store.exists("a", "c.txt")
    assert store.listdir("a") == ["b.txt"]
    # pyarrow (Ray Train) leaves zero-byte "folder/" marker objects: they are not files
    boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"]).put_object(
        Bucket=s3_bucket, Key="root/a/", Body=b""
    )
    assert store.listdir("a") == ["b.txt"]
    assert store.listdir("absent") == [] and store.listdir() == []
    import hashlib

    assert store.sha256("a", "b.txt") == hashlib.sha256(b"hello").hexdigest()
    assert store.sha256("a", "nope") is None
    with pytest.raises(ObjectNotFound, match=rf"s3://{s3_bucket}/root/a/nope does not exist"):
        store.read_bytes("a", "nope")
    store.delete("a", "b.txt")
    assert _keys(s3_env["AWS_ENDPOINT_URL"], s3_bucket) == ["root/a/"]


def test_s3_put_dir_replaces_and_get_dir(s3_bucket, s3_env, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "old.bin").write_bytes(b"old")
    (src / "sub" / "w.bin").write_bytes(b"\x00" * 10)
    store = open_store(f"s3://{s3_bucket}")
    store.put_dir(src, "models", "m")
    first = json.loads(store.read_bytes("models", "m", ".current"))["version"]
    (src / "old.bin").unlink()
    (src / "new.bin").write_bytes(b"new")
    assert store.put_dir(src, "models", "m") == f"s3://{s3_bucket}/models/m"
    pointer = json.loads(store.read_bytes("models", "m", ".current"))
    second = pointer["version"]
    assert pointer["files"] == ["config.json", "new.bin", "sub/w.bin"] and second != first
    # the version before stays for readers still copying it; the pointer names the new one
    assert sorted(_keys(s3_env["AWS_ENDPOINT_URL"], s3_bucket)) == sorted([
        "models/m/.current",
        f"models/m/.versions/{first}/config.json",
        f"models/m/.versions/{first}/old.bin",
        f"models/m/.versions/{first}/sub/w.bin",
        f"models/m/.versions/{second}/config.json",
        f"models/m/.versions/{second}/new.bin",
        f"models/m/.versions/{second}/sub/w.bin",
    ])  # fmt: skip
    got = store.get_dir(tmp_path / "copy", "models", "m")
    assert sorted(p.relative_to(got).as_posix() for p in got.rglob("*") if p.is_file()) == [
        "config.json", "new.bin", "sub/w.bin"
    ]  # fmt: skip
    assert (got / "sub" / "w.bin").read_bytes() == b"\x00" * 10
    assert (got / "new.bin").read_bytes() == b"new"
    # every read through the store sees the current version at the folder's own paths
    assert store.read_bytes("models", "m", "new.bin") == b"new"
    assert store.exists("models/m/config.json") and not store.exists("models", "m", "old.bin")
    assert store.listdir("models", "m") == ["config.json", "new.bin"]
    assert store.sha256("models", "m", "new.bin") == hashlib.sha256(b"new").hexdigest()
    with pytest.raises(ObjectNotFound, match=r"models/m/old\.bin does not exist"):
        store.read_bytes("models", "m", "old.bin")
    # the same files again: nothing is written (a rerun leaves the store as it was)
    keys = _keys(s3_env["AWS_ENDPOINT_URL"], s3_bucket)
    store.put_dir(src, "models", "m")
    assert _keys(s3_env["AWS_ENDPOINT_URL"], s3_bucket) == keys
    assert json.loads(store.read_bytes("models", "m", ".current")) == pointer
    # a third version removes the first
    (src / "new.bin").write_bytes(b"newer")
    store.put_dir(src, "models", "m")
    assert not [k for k in _keys(s3_env["AWS_ENDPOINT_URL"], s3_bucket) if first in k]
    assert store.read_bytes("models", "m", "new.bin") == b"newer"
    with pytest.raises(ObjectNotFound, match="models/none does not exist"):
        store.get_dir(tmp_path / "x", "models", "none")


def _model(root: Path, tag: str, files: dict[str, int]) -> Path:
    """A model folder whose config names its tag and every weight file holds only that tag."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"tag": tag, "files": sorted(files)}))
    for name, size in files.items():
        (root / name).write_bytes(tag.encode() * size)
    return root


def _whole(folder: Path) -> str:
    """The tag of a copied model folder, asserting it is one whole model (no file missing, none of
    another model, nothing extra)."""
    config = json.loads((folder / "config.json").read_text())
    files = sorted(p.name for p in folder.iterdir() if p.name != "config.json")
    assert files == config["files"], (files, config)
    for name in files:
        assert set((folder / name).read_bytes()) == set(config["tag"].encode()), name
    return config["tag"]


OLD = {"weights.safetensors": 4000, "extra.bin": 100}
NEW = {"weights.safetensors": 5000, "head.bin": 300}


def test_s3_swap_every_step_leaves_a_whole_model(s3_bucket, s3_env, tmp_path, monkeypatch):
    """A reader run between every step of the swap (each write and delete of the writer) copies the
    whole old model or the whole new one. Before: the configs went first, and a reader then found
    no config (or weights that no config described)."""
    from pipeline.data.storage import Store

    store = open_store(f"s3://{s3_bucket}")
    store.put_dir(_model(tmp_path / "a", "A", OLD), "models", "r", "denoiser")
    seen: list[str] = []
    real_write, real_delete = Store.write_bytes, Store.delete

    def read_now() -> None:
        copy = tmp_path / f"read-{len(seen)}"
        seen.append(_whole(store.get_dir(copy, "models", "r", "denoiser")))

    def write(self, data, *parts):
        out = real_write(self, data, *parts)
        read_now()
        return out

    def delete(self, *parts):
        real_delete(self, *parts)
        read_now()

    monkeypatch.setattr(Store, "write_bytes", write)
    monkeypatch.setattr(Store, "delete", delete)
    store.put_dir(_model(tmp_path / "b", "B", NEW), "models", "r", "denoiser")
    monkeypatch.undo()
    # 3 version files, the pointer; then the new model only, from the pointer's write on
    assert seen[:3] == ["A"] * 3 and set(seen[3:]) == {"B"}, seen
    assert _whole(store.get_dir(tmp_path / "final", "models", "r", "denoiser")) == "B"


def test_s3_swap_with_a_concurrent_reader_thread(s3_bucket, s3_env, tmp_path):
    """A reader thread copying the model in a loop while the writer swaps it back and forth: every
    copy is whole, and single-file reads never miss."""
    import threading

    store = open_store(f"s3://{s3_bucket}")
    sources = {t: _model(tmp_path / t, t, OLD if t == "A" else NEW) for t in "AB"}
    store.put_dir(sources["A"], "models", "r", "classifier")
    stop, seen, errors = threading.Event(), [], []

    def reader() -> None:
        try:
            while not stop.is_set():
                copy = tmp_path / f"copy-{len(seen)}"
                seen.append(_whole(store.get_dir(copy, "models", "r", "classifier")))
                config = json.loads(store.read_bytes("models", "r", "classifier", "config.json"))
                assert config["tag"] in "AB"
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(8):
            store.put_dir(sources["AB"[(i + 1) % 2]], "models", "r", "classifier")
    finally:
        stop.set()
        thread.join(60)
    assert not errors, errors[0]
    assert len(seen) >= 3 and set(seen) <= {"A", "B"}


def test_endpoint_from_argument_beats_environment(s3_bucket, s3_env, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert resolve_endpoint() is None
    store = open_store(f"s3://{s3_bucket}", s3_endpoint=s3_env["AWS_ENDPOINT_URL"])
    store.write_bytes(b"x", "f")
    assert _keys(s3_env["AWS_ENDPOINT_URL"], s3_bucket) == ["f"]
    with pytest.raises(StorageError, match=r"S3 endpoint 'localhost:9000' must look like http"):
        open_store(f"s3://{s3_bucket}", s3_endpoint="localhost:9000")


def test_store_pickles_without_secrets_in_reprs_and_works_without_environment(
    s3_bucket, s3_env, tmp_path
):
    """A Ray worker started before the variables were set still reaches the endpoint."""
    store = open_store(f"s3://{s3_bucket}/p")
    store.write_bytes(b"payload", "obj")
    for text in (repr(store), repr(store.s3), repr(store.fs), str(store)):
        assert not any(s in text for s in SECRETS), text
    blob = tmp_path / "store.pkl"
    blob.write_bytes(pickle.dumps(store))
    code = (
        "import pickle,sys; s=pickle.load(open(sys.argv[1],'rb')); "
        "print(s.read_bytes('obj').decode()); "
        "print(s.fs.open_input_stream(s.join('obj')).read().decode())"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    clean["HOME"] = str(tmp_path)  # no ~/.aws either
    out = subprocess.run(
        [sys.executable, "-c", code, str(blob)],
        env={**clean, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["payload", "payload"]


def test_region_and_endpoint_resolution(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1/")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://s3.example.test")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    access = resolve_s3_access()
    assert access.endpoint == "https://s3.example.test" and access.region == "eu-west-3"
    assert "secret" not in repr(access)


def test_missing_bucket_names_bucket_and_endpoint(s3_env):
    with pytest.raises(StorageError) as info:
        open_store("s3://no-such-bucket-here/x")
    msg = str(info.value)
    assert "bucket 'no-such-bucket-here' does not exist" in msg
    assert s3_env["AWS_ENDPOINT_URL"] in msg
    assert not any(s in msg for s in SECRETS)


def test_invalid_bucket_name_and_scheme():
    with pytest.raises(StorageError, match="invalid bucket name 'ab'"):
        open_store("s3://ab/x")
    with pytest.raises(StorageError, match="invalid bucket name 'Upper_case'"):
        open_store("s3://Upper_case/x")


def test_unreachable_endpoint(s3_env):
    dead = f"http://127.0.0.1:{free_ports()[0]}"
    t0 = time.perf_counter()
    with pytest.raises(StorageError, match=rf"S3 endpoint {dead} is unreachable"):
        open_store("s3://some-bucket/x", s3_endpoint=dead)
    assert time.perf_counter() - t0 < 30


def test_make_shards_job_missing_bucket_exits_2(s3_env):
    out = subprocess.run(
        [sys.executable, "jobs/make_shards.py", "--store", "s3://absent-bucket-x/data"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "bucket 'absent-bucket-x' does not exist" in out.stderr
    assert "Traceback" not in out.stderr


# ------------------------------------------------------------------------ wrong credentials refused
@pytest.fixture(scope="module")
def strict_s3_server():
    """A second moto server, in its own process, that refuses unknown access keys."""
    (port,) = free_ports()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    import urllib.request

    for _ in range(100):
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
            break
        except Exception:
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(timeout=20)
    assert proc.poll() is not None


def test_wrong_credentials_refused_without_leaking_them(strict_s3_server, monkeypatch):
    wrong = {
        "AWS_ACCESS_KEY_ID": "AKIAWRONGKEY0000TEST",
        "AWS_SECRET_ACCESS_KEY": "wr0ngS3cret/xyz",
    }
    for k, v in {**S3_TEST_ENV, **wrong, "AWS_ENDPOINT_URL": strict_s3_server}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(StorageError) as info:
        open_store("s3://guarded-bucket/run")
    msg = str(info.value)
    assert "access denied" in msg and "InvalidAccessKeyId" in msg and "guarded-bucket" in msg
    assert not any(s in msg for s in wrong.values())
    out = subprocess.run(
        [sys.executable, "jobs/make_shards.py", "--store", "s3://guarded-bucket/run"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    assert "access denied" in out.stderr and "s3://guarded-bucket/run" in out.stderr
    assert not any(s in out.stderr + out.stdout for s in wrong.values())


def test_loopback_s3_roundtrip(s3_bucket, s3_env):
    client = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    assert s3_env["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
    client.put_object(Bucket=s3_bucket, Key="a/b.txt", Body=b"hello")
    assert client.get_object(Bucket=s3_bucket, Key="a/b.txt")["Body"].read() == b"hello"
    listed = client.list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert [o["Key"] for o in listed] == ["a/b.txt"]


def test_s3_only_model_folders_are_versioned(s3_bucket, tmp_path, monkeypatch):
    """put_dir writes under models/ only, so reads elsewhere (data and sample shards) look for no
    pointer: a shard costs one GET, not one more per path level."""
    store = open_store(f"s3://{s3_bucket}")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"a")
    with pytest.raises(ValueError, match="under models/<run>/ only, got data/d"):
        store.put_dir(src, "data", "d")
    store.write_bytes(b"tar", "samples", "r", "ddim", "shard-000000.tar")
    store.put_dir(src, "models", "r", "denoiser")
    looked: list[tuple[str, ...]] = []
    real = type(store)._pointer
    monkeypatch.setattr(type(store), "_pointer", lambda s, *p: looked.append(p) or real(s, *p))
    assert store.read_bytes("samples", "r", "ddim", "shard-000000.tar") == b"tar"
    assert store.listdir("samples", "r", "ddim") == ["shard-000000.tar"]
    assert looked == []
    assert store.read_bytes("models", "r", "denoiser", "a.bin") == b"a"
    assert looked == [("models", "r"), ("models", "r", "denoiser")]
