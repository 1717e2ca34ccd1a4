"""When a training run counts as finished (pipeline/train/run_state.py), on a real local store.

The layout is what Ray Train V2 and the worker loops write: ``checkpoint_manager_snapshot.json`` naming
the latest registered checkpoint and its reported metrics, the checkpoint folder with ``state.json`` and
safetensors weights, and the run's own ``provenance.json``. A real run's layout is covered end to end
in tests/train/test_workers_resume_provenance.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.data.storage import open_store
from pipeline.train.run_state import SNAPSHOT, claim_checkpoints, finished_run

INPUTS = {"config": "sha256:c", "data": "sha256:d"}


def _run(tmp_path: Path, step: int = 4, reported: int | None = None, state_inputs=INPUTS):
    store = open_store(str(tmp_path / "store"))
    claim_checkpoints(store, "r-denoiser", INPUTS)
    folder = Path(store.join("checkpoints", "r-denoiser"))
    ckpt = folder / "checkpoint_2026-12-07_05-00-00.000000"
    ckpt.mkdir()
    save_file({"w": torch.arange(3.0)}, str(ckpt / "ema.safetensors"))
    (ckpt / "state.json").write_text(json.dumps({"step": step, "provenance": state_inputs}))
    metrics = {"step": step if reported is None else reported, "loss": 0.5}
    latest = {"checkpoint_dir_name": ckpt.name, "metrics": metrics}
    (folder / SNAPSHOT).write_text(json.dumps({"latest_checkpoint_result": latest}))
    return store, folder


def test_a_final_checkpoint_of_the_same_inputs_is_finished(tmp_path):
    store, _ = _run(tmp_path)
    done = finished_run(store, "r-denoiser", INPUTS, steps=4)
    assert done is not None
    assert torch.equal(done.tensors["ema"]["w"], torch.arange(3.0))
    assert done.state["step"] == 4 and done.metrics == {"step": 4, "loss": 0.5}
    assert done.folder.endswith("checkpoints/r-denoiser/checkpoint_2026-12-07_05-00-00.000000")


def test_anything_short_of_finished_trains(tmp_path):
    """None sends the stage to Ray Train, which resumes or refuses stale checkpoints."""
    store, folder = _run(tmp_path / "a", step=2)
    assert finished_run(store, "r-denoiser", INPUTS, steps=4) is None  # killed mid-run
    assert finished_run(store, "r-denoiser", {**INPUTS, "data": "sha256:x"}, steps=2) is None
    assert finished_run(store, "r-denoiser", INPUTS, steps=2) is not None
    assert finished_run(store, "other-denoiser", INPUTS, steps=2) is None  # no such run
    # the checkpoint's own record differs from the run's
    store, _ = _run(tmp_path / "b", state_inputs={**INPUTS, "config": "sha256:y"})
    assert finished_run(store, "r-denoiser", INPUTS, steps=4) is None
    # Ray Train registered an earlier step than the folder's newest state says
    store, folder = _run(tmp_path / "c", reported=2)
    assert finished_run(store, "r-denoiser", INPUTS, steps=4) is None
    # a snapshot it cannot read, or one without a latest checkpoint
    (folder / SNAPSHOT).write_text("{not json")
    assert finished_run(store, "r-denoiser", INPUTS, steps=4) is None
    (folder / SNAPSHOT).write_text(json.dumps({"latest_checkpoint_result": None}))
    assert finished_run(store, "r-denoiser", INPUTS, steps=4) is None
    # weights gone
    store, folder = _run(tmp_path / "d")
    for p in folder.glob("checkpoint_*/*.safetensors"):
        p.unlink()
    assert finished_run(store, "r-denoiser", INPUTS, steps=4) is None
