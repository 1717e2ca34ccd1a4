"""A run's report as an append-only log of fragments, folded on read: safe for concurrent jobs.

Several jobs add to one run's report (``sample`` per sampler, ``check_replicas``, ``evaluate``, ``sweep``),
possibly at the same time on different machines. A read-modify-write of one ``report.json`` would let
the later writer drop the earlier one's section. Instead each update is written as its own object,
``reports/<run>/parts/<time_ns>-<random>.json`` = ``{"mode": ..., "updates": {...}}``, and the report is
the fold of all fragments in name order:

- ``"replace"``: the whole report becomes ``updates`` (the demo's full report; older fragments are then
  pruned, since nothing before it can show through);
- ``"shallow"``: top-level sections are replaced;
- ``"deep"``: nested mappings are merged key by key.

Object writes are atomic on both stores, and a fragment is never rewritten, so no update is lost. The
``report.json`` beside the fragments is a materialised copy for people and tools; :func:`read_report`
is the source of truth. Order across machines follows their clocks (nanoseconds since the epoch).
A run written before fragments existed (a ``report.json`` and no ``parts/``) is read as its base.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from pipeline.data.storage import Store

PARTS = "parts"
MODES = ("replace", "shallow", "deep")


def deep_merge(base: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def fold(fragments: list[dict[str, Any]], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report that ``fragments`` (in order) make from ``base``."""
    report = dict(base or {})
    for frag in fragments:
        mode, updates = frag["mode"], frag["updates"]
        if mode == "replace":
            report = dict(updates)
        elif mode == "shallow":
            report = {**report, **updates}
        else:
            report = deep_merge(report, updates)
    return report


def fragment_names(store: Store, run: str) -> list[str]:
    return sorted(n for n in store.listdir("reports", run, PARTS) if n.endswith(".json"))


def _append(store: Store, run: str, updates: dict[str, Any], mode: str) -> str:
    name = f"{time.time_ns():020d}-{secrets.token_hex(6)}.json"
    data = json.dumps({"mode": mode, "updates": updates}, indent=1).encode()
    store.write_bytes(data, "reports", run, PARTS, name)
    return name


def write_fragment(store: Store, run: str, updates: dict[str, Any], mode: str) -> str:
    """Append one fragment to the run's report log; returns its name.

    A run whose report.json predates fragments gets that report as its first ("replace") fragment."""
    if mode not in MODES:
        raise ValueError(f"unknown fragment mode {mode!r}; allowed: {MODES}")
    names = fragment_names(store, run)
    if not names and mode != "replace" and store.exists("reports", run, "report.json"):
        _append(store, run, json.loads(store.read_bytes("reports", run, "report.json")), "replace")
    name = _append(store, run, updates, mode)
    if mode == "replace":  # everything before a full replacement is dead weight
        for old in names:
            if old < name:
                store.delete("reports", run, PARTS, old)
    return name


def read_report(store: Store, run: str) -> dict[str, Any]:
    """The run's report: its fragments folded in order; a pre-fragment report.json; or {}."""
    names = fragment_names(store, run)
    if not names:
        if store.exists("reports", run, "report.json"):
            return json.loads(store.read_bytes("reports", run, "report.json"))
        return {}
    frags = []
    for name in names:
        try:
            frags.append(json.loads(store.read_bytes("reports", run, PARTS, name)))
        except FileNotFoundError:  # pruned by a concurrent full replacement after we listed
            continue
    return fold(frags)
