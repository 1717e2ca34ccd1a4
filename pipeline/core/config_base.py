"""The config machinery: typed dataclass fields from plain dicts (YAML/JSON/CLI), unknown keys and
out-of-range values rejected with a message naming the field. The stage configs are in
:mod:`pipeline.core.config`, which re-exports these names.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive(name: str, value: float) -> None:
    _check(value > 0, f"{name} must be > 0, got {value!r}")


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Convert a plain value (from YAML/JSON/CLI) to the annotated field type."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        _check(
            isinstance(value, dict),
            f"{where} must be a mapping of {tp.__name__} fields, got {value!r}",
        )
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(args[0], value, where)
    if origin is tuple:
        (inner, *_) = typing.get_args(tp)
        _check(isinstance(value, (list, tuple)), f"{where} must be a list, got {value!r}")
        return tuple(_coerce(inner, v, where) for v in value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        _check(
            isinstance(value, tp) and not (tp is int and isinstance(value, bool)),
            f"{where} must be of type {tp.__name__}, got {value!r}",
        )
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build a config dataclass from a dict, rejecting unknown keys (with the allowed ones)."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    prefix = f"{where}." if where else ""
    _check(not unknown, f"unknown config key(s) {[prefix + u for u in unknown]}; allowed: {names}")
    kwargs = {k: _coerce(hints[k], v, prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML syntax error on one line: where, what, and what it was inside of."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and context_mark and not (mark and context_mark.line == mark.line):
        what += f" ({context} from line {context_mark.line + 1}, column {context_mark.column + 1})"
    return f"malformed YAML{where}: {what}"


def read_yaml(path: str | Path) -> Any:
    """A YAML file's contents. A missing, unreadable or malformed file is a :class:`ConfigError` that
    names the file (and, for a syntax error, its line), never a parser traceback."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text (UTF-8) file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror or exc})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: {_yaml_problem(exc)}") from exc


def load_yaml(cls: type[T], path: str | Path) -> T:
    """Load a config from a YAML file (a missing or malformed file is a :class:`ConfigError`)."""
    data = read_yaml(path) or {}
    _check(
        isinstance(data, dict), f"{path}: top level must be a mapping, got {type(data).__name__}"
    )
    return from_dict(cls, data)
