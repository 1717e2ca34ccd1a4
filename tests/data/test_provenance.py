"""Digests name contents, not layout or key order; a changed input is named; old artifacts are stale."""

from __future__ import annotations

import pytest

from pipeline.data.provenance import (
    PROVENANCE,
    StaleArtifactError,
    changed_inputs,
    dir_digest,
    file_digest,
    manifest_digest,
    read_provenance,
    require_same,
    value_digest,
    write_provenance,
)


def test_value_digest_ignores_key_order_but_not_values():
    assert value_digest({"a": 1, "b": [1, 2]}) == value_digest({"b": [1, 2], "a": 1})
    assert value_digest({"a": 1}) != value_digest({"a": 2})
    assert value_digest({"a": 1}).startswith("sha256:") and len(value_digest(1)) == 7 + 64


def test_dir_digest_follows_contents_and_names_and_skips_provenance(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w.safetensors").write_bytes(b"weights")
    (tmp_path / "m" / "config.json").write_text("{}")
    first = dir_digest(tmp_path / "m")
    write_provenance(tmp_path / "m", {"config": "sha256:x"})
    assert dir_digest(tmp_path / "m") == first  # provenance.json is not part of the digest
    assert read_provenance(tmp_path / "m") == {
        "provenance": {"config": "sha256:x"},
        "digest": first,
    }
    (tmp_path / "m" / "w.safetensors").write_bytes(b"weightz")
    assert dir_digest(tmp_path / "m") != first
    (tmp_path / "m" / "w.safetensors").write_bytes(b"weights")
    (tmp_path / "m" / "config.json").rename(tmp_path / "m" / "other.json")
    assert dir_digest(tmp_path / "m") != first


def test_file_digest_and_missing_directory(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    assert file_digest(tmp_path / "f") == (
        "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    with pytest.raises(FileNotFoundError):
        dir_digest(tmp_path / "nope")
    assert read_provenance(tmp_path) is None and not (tmp_path / PROVENANCE).exists()


def test_manifest_digest_leaves_out_the_transient_written_list():
    m = {"splits": {"train": {"count": 3}}, "image_size": 8}
    assert manifest_digest({**m, "written": ["shard-000000.tar"]}) == manifest_digest(m)
    assert manifest_digest(None) is None


def test_changed_inputs_names_each_difference_and_treats_no_record_as_all_changed():
    cur = {"config": "a", "data": "b", "denoiser": "c"}
    assert changed_inputs(cur, dict(cur)) == []
    assert changed_inputs({**cur, "data": "x"}, cur) == ["data"]
    assert changed_inputs({"config": "a"}, cur) == ["data", "denoiser"]
    assert changed_inputs(None, cur) == ["config", "data", "denoiser"]


def test_require_same_says_what_changed_and_the_ways_on():
    require_same("checkpoint", {"config": "a"}, {"config": "a"})
    with pytest.raises(StaleArtifactError, match=r"changed: classifier.*new --run.*--overwrite"):
        require_same("samples/demo/cpsample", {"classifier": "a"}, {"classifier": "b"})
