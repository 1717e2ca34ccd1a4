"""The config machinery (pipeline.core.config_base): typed fields from plain dicts and YAML."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from pipeline.core.config_base import ConfigError, from_dict, load_yaml, read_yaml, to_dict


@dataclass
class _Inner:
    n: int = 1


@dataclass
class _Outer:
    rate: float = 0.5
    sizes: tuple[int, ...] = (1, 2)
    inner: _Inner = field(default_factory=_Inner)
    maybe: _Inner | None = None


def test_plain_values_become_typed_fields_and_round_trip():
    cfg = from_dict(_Outer, {"rate": 1, "sizes": [3, 4], "inner": {"n": 5}, "maybe": {"n": 2}})
    assert cfg.rate == 1.0 and isinstance(cfg.rate, float)
    assert cfg.sizes == (3, 4) and cfg.inner.n == 5 and cfg.maybe == _Inner(2)
    assert from_dict(_Outer, to_dict(cfg)) == cfg
    assert from_dict(_Outer, {"maybe": None}).maybe is None


def test_unknown_keys_and_wrong_types_name_the_field():
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['inner.m'\]"):
        from_dict(_Outer, {"inner": {"m": 1}})
    with pytest.raises(ConfigError, match=r"inner\.n must be of type int"):
        from_dict(_Outer, {"inner": {"n": True}})
    with pytest.raises(ConfigError, match="sizes must be a list"):
        from_dict(_Outer, {"sizes": 3})


def test_yaml_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_yaml(_Outer, path)
    path.write_text("rate: 0.25\n")
    assert load_yaml(_Outer, path).rate == 0.25


def test_missing_unreadable_and_malformed_yaml_are_one_line_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"^\S*nope\.yaml: no such config file$"):
        load_yaml(_Outer, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a folder, not a config file"):
        load_yaml(_Outer, tmp_path)
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(ConfigError, match=r"weights\.yaml: not a text \(UTF-8\) file"):
        load_yaml(_Outer, binary)
    bad = tmp_path / "bad.yaml"
    bad.write_text("rate: 0.25\ninner:\n  n: 1\n   m: 2\n")
    with pytest.raises(ConfigError) as info:
        load_yaml(_Outer, bad)
    assert str(info.value) == (
        f"{bad}: malformed YAML at line 4, column 5: mapping values are not allowed here"
    )
    bad.write_text("sizes: [1, 2\n")
    with pytest.raises(ConfigError) as info:
        read_yaml(bad)
    assert str(info.value) == (
        f"{bad}: malformed YAML at line 2, column 1: expected ',' or ']', but got '<stream end>' "
        "(while parsing a flow sequence from line 1, column 8)"
    )
