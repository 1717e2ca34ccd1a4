"""Local stores: creation, atomic writes, folders, and errors."""

from __future__ import annotations

import os

import pytest

from pipeline.data.storage import StorageError, atomic_write_local, open_store


def test_open_store_creates_local_root(tmp_path):
    root = tmp_path / "a" / "b" / "store"
    store = open_store(str(root))
    assert root.is_dir()
    assert store.is_local
    assert store.uri == str(root)
    assert os.listdir(root) == []  # the write probe is cleaned up
    assert store.join("x", "/y/", "") == f"{root}/x/y"
    assert store.uri_of("x", "f.txt") == f"{root}/x/f.txt"


def test_open_store_without_create(tmp_path):
    store = open_store(str(tmp_path / "later"), create=False)
    assert not (tmp_path / "later").exists()
    assert not store.exists("anything")


def test_open_store_resolves_relative_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = open_store("rel/store")
    assert store.uri == str(tmp_path / "rel" / "store")


def test_open_store_unwritable_location_raises(tmp_path):
    blocker = tmp_path / "regular-file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageError, match="is not writable") as info:
        open_store(str(blocker / "store"))
    assert str(blocker / "store") in str(info.value)


def test_open_store_unsupported_scheme():
    with pytest.raises(StorageError, match="unsupported store URI 'gs://bucket/x'"):
        open_store("gs://bucket/x")


def test_write_bytes_atomic_and_readable(tmp_path):
    store = open_store(str(tmp_path / "s"))
    uri = store.write_bytes(b"hello", "deep", "folder", "f.bin")
    assert uri == str(tmp_path / "s" / "deep" / "folder" / "f.bin")
    assert store.read_bytes("deep", "folder", "f.bin") == b"hello"
    assert store.exists("deep", "folder", "f.bin")
    assert not store.exists("deep", "folder", "g.bin")
    # overwrite replaces the whole content; no temporary files remain
    store.write_bytes(b"x" * 100_000, "deep", "folder", "f.bin")
    assert store.read_bytes("deep/folder/f.bin") == b"x" * 100_000
    assert os.listdir(tmp_path / "s" / "deep" / "folder") == ["f.bin"]
    assert store.listdir("deep", "folder") == ["f.bin"]
    assert store.listdir("deep") == []  # files directly under the folder only
    assert store.listdir("absent") == []


def test_atomic_write_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        atomic_write_local(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_write_bytes_under_a_file_fails(tmp_path):
    store = open_store(str(tmp_path))
    store.write_bytes(b"1", "f")
    with pytest.raises(StorageError, match=r"cannot write .*child"):
        store.write_bytes(b"2", "f", "child")
    assert store.read_bytes("f") == b"1"


def test_put_dir_and_get_dir_local(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("A")
    (src / "sub" / "b.bin").write_bytes(b"\x00\x01")
    store = open_store(str(tmp_path / "store"))
    uri = store.put_dir(src, "ckpt", "step-1")
    assert uri == str(tmp_path / "store" / "ckpt" / "step-1")
    got = store.get_dir(tmp_path / "unused", "ckpt", "step-1")
    assert got == tmp_path / "store" / "ckpt" / "step-1"
    assert (got / "a.txt").read_text() == "A"
    assert (got / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    assert not (tmp_path / "unused").exists()
    # no staging folders left beside the target
    assert os.listdir(tmp_path / "store" / "ckpt") == ["step-1"]

    # putting again replaces the folder: stale files disappear
    (src / "a.txt").unlink()
    (src / "c.txt").write_text("C")
    store.put_dir(src, "ckpt", "step-1")
    assert sorted(p.name for p in got.iterdir()) == ["c.txt", "sub"]
    assert (got / "c.txt").read_text() == "C"
    assert os.listdir(tmp_path / "store" / "ckpt") == ["step-1"]


def test_missing_object_sha256_delete_and_passthrough(tmp_path):
    import hashlib

    from pipeline.data.storage import ObjectNotFound

    store = open_store(str(tmp_path))
    with pytest.raises(ObjectNotFound, match=f"{tmp_path}/nope.bin does not exist"):
        store.read_bytes("nope.bin")
    with pytest.raises(FileNotFoundError):  # ObjectNotFound is also a FileNotFoundError
        store.read_bytes("nope.bin")
    assert store.sha256("nope.bin") is None
    store.write_bytes(b"abc", "d", "x.bin")
    assert store.sha256("d", "x.bin") == hashlib.sha256(b"abc").hexdigest()
    store.delete("d", "x.bin")
    store.delete("d", "x.bin")  # absent: no error
    assert store.listdir("d") == []
    assert open_store(store) is store


def test_store_pickles_and_local_repr(tmp_path):
    import pickle

    store = open_store(str(tmp_path))
    back = pickle.loads(pickle.dumps(store))
    assert back.uri == store.uri and back.is_local
    back.write_bytes(b"1", "f")
    assert store.read_bytes("f") == b"1"


# ------------------------------------------------------------------------ model directory replacement
def _model(path, text: str):
    path.mkdir(parents=True)
    (path / "weights.bin").write_text(text)
    (path / "config.json").write_text("{}")
    return path


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_replace_dir_local_swaps_then_removes_the_old_copy(tmp_path, monkeypatch, exchange):
    from pipeline.data import storage

    if not exchange:  # a filesystem without RENAME_EXCHANGE
        monkeypatch.setattr(storage, "_exchange", lambda a, b: False)
    target = _model(tmp_path / "models" / "denoiser", "old")
    storage.replace_dir_local(_model(tmp_path / "new", "new"), target)
    assert (target / "weights.bin").read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["denoiser"]  # no stage, no old copy


def test_replace_dir_local_keeps_the_old_model_when_the_copy_fails(tmp_path, monkeypatch):
    from pipeline.data import storage

    target = _model(tmp_path / "models" / "denoiser", "old")

    def full_disk(src, dst, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage.shutil, "copytree", full_disk)
    with pytest.raises(StorageError, match="No space left"):
        storage.replace_dir_local(_model(tmp_path / "new", "new"), target)
    assert (target / "weights.bin").read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["denoiser"]


def test_replace_dir_local_undoes_the_first_rename_when_the_second_fails(tmp_path, monkeypatch):
    from pathlib import Path

    from pipeline.data import storage

    monkeypatch.setattr(storage, "_exchange", lambda a, b: False)
    target = _model(tmp_path / "models" / "denoiser", "old")
    real_rename = Path.rename

    def rename(self, dest):
        if self.name.startswith(".denoiser.tmp-"):  # the staged copy moving into place
            raise OSError(5, "I/O error")
        return real_rename(self, dest)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(StorageError, match="I/O error"):
        storage.replace_dir_local(_model(tmp_path / "new", "new"), target)
    assert (target / "weights.bin").read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["denoiser"]
