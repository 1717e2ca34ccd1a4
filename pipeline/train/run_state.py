"""A training run's checkpoint folder, seen from the driver without Ray: claimed for this run's inputs
(:func:`claim_checkpoints`), or already finished (:func:`finished_run`).

Rerunning a finished training command used to start Ray Train's controller and worker group, verify every
shard's sha256 and resume at the last step only to train nothing. :func:`finished_run` recognises that
case from the store alone: the run's latest checkpoint *registered* by Ray Train (the one it would resume
from) is at the final step and was made from the same inputs. The stage then exports that checkpoint as
a resumed run would, with the metrics Ray Train recorded beside it, and no worker starts.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from safetensors.torch import load as load_safetensors

from pipeline.data.provenance import PROVENANCE, require_same
from pipeline.data.storage import ObjectNotFound, Store
from pipeline.train.workers import STATE

# Ray Train V2's record of a run's registered checkpoints, under its storage path (``RunConfig.name``).
SNAPSHOT = "checkpoint_manager_snapshot.json"


class Finished(NamedTuple):
    """The final checkpoint of a finished run: its safetensors state dicts by file stem (the optimizer's
    state is not read: nothing continues), its ``state.json`` and the metrics reported with it."""

    tensors: dict[str, Any]
    state: dict[str, Any]
    metrics: dict[str, Any]
    folder: str


def claim_checkpoints(
    store: Store, name: str, provenance: dict[str, Any], overwrite: bool = False
) -> None:
    """Make ``checkpoints/<name>`` this run's before Ray Train resumes from it.

    Existing checkpoints are resumed only when the ``provenance.json`` beside them records the same
    inputs; otherwise :class:`pipeline.data.provenance.StaleArtifactError` names what changed (a run
    from before provenance existed has no record and is refused too). ``overwrite`` deletes them
    first. Then the record is written, so the checkpoints that follow are known to be this run's."""
    folder = ("checkpoints", name)
    if overwrite:
        store.delete_dir(*folder)
    elif store.exists(*folder):
        recorded = None
        if store.exists(*folder, PROVENANCE):
            recorded = json.loads(store.read_bytes(*folder, PROVENANCE)).get("provenance")
        require_same(f"the checkpoints under {store.uri_of(*folder)}", recorded, provenance)
    record = json.dumps({"provenance": provenance}, indent=2, sort_keys=True)
    store.write_bytes(record.encode(), *folder, PROVENANCE)


def finished_run(
    store: Store, name: str, provenance: dict[str, Any], steps: int
) -> Finished | None:
    """The final checkpoint of ``checkpoints/<name>`` when the run has nothing left to train, else None.

    Finished means: Ray Train's snapshot names a latest checkpoint whose reported ``step`` is ``steps``;
    that checkpoint's ``state.json`` records the same step and ``provenance``; and the run's own record
    (``checkpoints/<name>/provenance.json``, :func:`claim_checkpoints`) is the same too. Anything missing, unreadable or different gives None: the caller then runs Ray
    Train as before, which resumes, or refuses stale checkpoints naming what changed."""
    folder = ("checkpoints", name)
    try:  # one read per record: a missing one is ObjectNotFound
        recorded = json.loads(store.read_bytes(*folder, PROVENANCE)).get("provenance")
        latest = json.loads(store.read_bytes(*folder, SNAPSHOT))["latest_checkpoint_result"]
        dirname, metrics = str(latest["checkpoint_dir_name"]), dict(latest["metrics"])
        if recorded != provenance or metrics.get("step") != steps:
            return None
        state = json.loads(store.read_bytes(*folder, dirname, STATE))
    except (ObjectNotFound, ValueError, KeyError, TypeError, AttributeError):
        return None
    if state.get("step") != steps or state.get("provenance") != provenance:
        return None
    weights = [n for n in store.listdir(*folder, dirname) if n.endswith(".safetensors")]
    if not weights:
        return None
    tensors = {
        n.removesuffix(".safetensors"): load_safetensors(store.read_bytes(*folder, dirname, n))
        for n in weights
    }
    return Finished(tensors, state, metrics, store.uri_of(*folder, dirname))


def finished_line(kind: str, done: Finished) -> str:
    """The driver's line for a rerun that trains nothing."""
    return (
        f"{kind} already trained: {done.folder} is at the final step {done.state['step']} and was "
        "made from the same config and data; exporting it without starting Ray Train (pass "
        "--overwrite to train again)"
    )
