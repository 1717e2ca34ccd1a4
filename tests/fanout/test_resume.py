"""What a sample shard records about its inputs, and the rerun check over every shard (Ray-free)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.config import SamplerConfig
from pipeline.data.provenance import StaleArtifactError
from pipeline.data.shards import shard_name
from pipeline.data.storage import open_store
from pipeline.data.tars import build_tar, encode_png
from pipeline.fanout.resume import (
    check_existing_run,
    first_meta,
    run_fingerprint,
    sampling_provenance,
)

DEN, CLF = "sha256:" + "d" * 64, "sha256:" + "c" * 64


def test_provenance_names_the_inputs_that_change_a_shard():
    cps = SamplerConfig(sampler="cpsample")
    prov = sampling_provenance(cps, DEN, CLF)
    assert set(prov) == {"sampler", "denoiser", "classifier"}
    # batch size and sample count do not change a shard's bytes; the guidance knobs do
    assert sampling_provenance(SamplerConfig(batch_size=7, num_samples=9), DEN, CLF) == prov
    assert sampling_provenance(SamplerConfig(scale=6.0), DEN, CLF)["sampler"] != prov["sampler"]
    # plain DDIM uses no classifier and ignores the guidance knobs
    ddim = sampling_provenance(SamplerConfig(sampler="ddim"), DEN, CLF)
    assert set(ddim) == {"sampler", "denoiser"}
    assert ddim == sampling_provenance(SamplerConfig(sampler="ddim", scale=9.0), DEN, None)
    guarded = sampling_provenance(SamplerConfig(guard=0.9), DEN, CLF, guard_data="sha256:g")
    assert guarded["guard_data"] == "sha256:g"
    assert run_fingerprint(prov) != run_fingerprint({**prov, "denoiser": "sha256:other"})
    assert len(run_fingerprint(prov)) == 16


def _shard(store, folder: str, index: int, provenance: dict, members: int = 3) -> None:
    image = np.zeros((4, 4, 1), np.uint8)
    meta = {"run_fingerprint": run_fingerprint(provenance), "provenance": provenance}
    records = [(f"ddim-{index:06d}-{i:05d}", encode_png(image), meta) for i in range(members)]
    store.write_bytes(build_tar(records), folder, shard_name(index))


def test_first_meta_reads_only_the_head_and_none_for_junk(tmp_path):
    store = open_store(str(tmp_path))
    prov = sampling_provenance(SamplerConfig(sampler="ddim"), DEN, None)
    _shard(store, "s", 0, prov, members=50)
    whole = store.read_bytes("s", shard_name(0))
    assert first_meta(store, "s", shard_name(0))["provenance"] == prov
    store.write_bytes(whole[:2048], "s", "cut.tar")  # a cut tar still has its first record
    assert first_meta(store, "s", "cut.tar")["run_fingerprint"] == run_fingerprint(prov)
    store.write_bytes(b"not a tar at all" * 100, "s", "junk.tar")
    assert first_meta(store, "s", "junk.tar") is None


def test_every_shard_is_checked_and_the_change_is_named(tmp_path):
    store = open_store(str(tmp_path))
    cfg = SamplerConfig(sampler="ddim")
    prov = sampling_provenance(cfg, DEN, None)
    plan = [{"shard": s, "count": 3} for s in range(4)]
    for s in (0, 1, 3):
        _shard(store, "f", s, prov)
    store.write_bytes(b"garbage", "f", shard_name(2))  # unreadable: the actor rewrites it
    assert check_existing_run(store, "f", plan, prov) == 4
    # shard 3 drawn by a retrained denoiser: the first shards match, the check still finds it
    _shard(store, "f", 3, {**prov, "denoiser": "sha256:" + "e" * 64})
    with pytest.raises(StaleArtifactError, match=r"shard-000003.tar was sampled from other inputs "
                       r"\(changed: denoiser\); use a new --run, or pass --overwrite"):  # fmt: skip
        check_existing_run(store, "f", plan, prov)
    # a shard beyond the plan: num_samples or samples_per_shard changed
    with pytest.raises(StaleArtifactError, match=r"holds shard-000003\.tar, beyond this run.s 3"):
        check_existing_run(store, "f", plan[:3], prov)
    assert check_existing_run(store, "absent", plan, prov) == 0
