"""The stored replica index with a TorchScript module embedding, on a real local Ray and real FAISS:
flat and IVF builds find copies, the sidecar records the weights' digest, and changed weights make
the stored index stale (refused, then rebuilt)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from pipeline.core.config import ReplicaConfig
from pipeline.data.imageset import ImageSet
from pipeline.data.provenance import StaleArtifactError
from pipeline.data.shards import write_dataset, write_image_shards
from pipeline.data.storage import open_store
from pipeline.fanout.embedders import embedding_id
from pipeline.fanout.replica_index import (
    SIDECAR,
    ensure_replica_index,
    exact_search,
    index_folder,
    load_replica_index,
    open_replica_index,
    stale_reasons,
)
from pipeline.fanout.replica_store import current_state
from pipeline.fanout.scoring_stream import score_shard_summaries
from pipeline.orchestration.replica_report import iter_per_sample, parts_folder
from tests.fanout.test_embedders import save_module

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
N = 400


def _images(rng, n: int) -> np.ndarray:
    blocks = rng.integers(0, 256, (n, 2, 2, 3)).astype(np.float32)
    up = np.repeat(np.repeat(blocks, 4, 1), 4, 2)
    return np.clip(up + rng.normal(0, 12, up.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def module_store(tmp_path_factory, ray_local):
    """400 training images (8x8 RGB) in 4 shards, 40 held out, and a random 32-d TorchScript net."""
    root = tmp_path_factory.mktemp("module-index")
    rng = np.random.default_rng(0)
    store = open_store(str(root / "store"))
    train = ImageSet([f"t-{i:04d}" for i in range(N)], _images(rng, N))
    holdout = ImageSet([f"h-{i:04d}" for i in range(40)], _images(rng, 40))
    write_dataset(store, "ph", {"train": train, "holdout": holdout}, shard_size=100)
    return store, train, save_module(root / "net.pt")


def _cfg(path, **kw) -> ReplicaConfig:
    return ReplicaConfig(embedding=f"module:{path}", threshold=0.5, measure_queries=64, **kw)


def test_flat_index_finds_copies_and_records_the_digest(module_store):
    store, train, path = module_store
    cfg = _cfg(path, index="flat")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    sidecar = ensure_replica_index(store, "ph", cfg)
    folder = index_folder("ph", f"module-{sha[:12]}", "flat")
    assert embedding_id(cfg) == f"module-{sha[:12]}"
    assert json.loads(store.read_bytes(folder, SIDECAR)) == sidecar
    assert sidecar["module"]["sha256"] == sha and sidecar["params"]["module"]["sha256"] == sha
    assert sidecar["module"]["path"] == str(path.resolve())
    assert sidecar["dims"] == sidecar["index_dims"] == 32 and sidecar["embedding"] == cfg.embedding
    assert "mean.npy" not in store.listdir(sidecar["path"])
    index = load_replica_index(store, "ph", cfg)
    copies = [0, 123, 399]
    sims, idx = index.search(train.images[copies])
    assert list(idx) == copies and (sims >= 0.999).all()
    emb = index.embed(train.images[:5])
    assert emb.shape == (5, 32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    exact_s, exact_i = exact_search(index, train.images[copies], chunk=150)
    assert list(exact_i) == copies
    np.testing.assert_allclose(exact_s, sims, atol=1e-5)
    index.close()
    assert ensure_replica_index(store, "ph", cfg)["build_id"] == sidecar["build_id"]  # reused


def test_ivf_index_and_the_scorers_find_copies(module_store):
    store, train, path = module_store
    cfg = _cfg(path, index="ivf", rows_per_task=150)
    sidecar = ensure_replica_index(store, "ph", cfg)
    assert sidecar["kind"] == "ivf" and [p["count"] for p in sidecar["parts"]] == [100] * 4
    assert sidecar["params"]["pca_dims"] is None and sidecar["index_dims"] == 32  # 32 < pca_dims
    assert sidecar["measurement"]["queries"] == 64
    assert sidecar["measurement"]["recall_at_1"] >= 0.9
    rng = np.random.default_rng(3)
    copies = [7, 250, 301]
    queries = np.concatenate([train.images[copies], _images(rng, 5)])
    keys = [f"ddim-{i:06d}" for i in range(len(queries))]
    write_image_shards(store, "samples/m/ddim", ImageSet(keys=keys, images=queries), 4)
    out = parts_folder("m", "ddim")
    summaries = score_shard_summaries(store, "samples/m/ddim", "ph", cfg, out, concurrency=1)
    assert {s.inputs["index_build"] for s in summaries} == {sidecar["build_id"]}
    rows = list(iter_per_sample(store, "m", "ddim"))
    assert [r["key"] for r in rows] == keys
    for i, t in enumerate(copies):
        assert rows[i]["nn_key"] == train.keys[t]
        assert rows[i]["nn_similarity"] >= 0.999 and rows[i]["is_replicate"]
    # the closest pairs name the copies' training rows
    pairs = [p for s in summaries for p in s.closest if p["key"] in keys[: len(copies)]]
    assert pairs and all(p["nn_row"] == copies[keys.index(p["key"])] for p in pairs)


def test_changed_weights_make_the_index_stale_and_it_is_rebuilt(module_store, tmp_path):
    store, train, _ = module_store
    path = save_module(tmp_path / "weights.pt", seed=5)
    cfg = _cfg(path, index="flat")
    first = ensure_replica_index(store, "ph", cfg)
    save_module(path, seed=6)  # the same file name, other weights
    state = current_state(store, "ph", cfg)
    assert state["folder"] != index_folder("ph", first["params"]["embedding"], "flat")
    assert "the embedding module's weights changed (sha256)" in stale_reasons(first, state)
    with pytest.raises(StaleArtifactError, match="no stored index"):
        load_replica_index(store, "ph", cfg)
    old = open_replica_index(store, first, cfg)  # the old build, by its sidecar: never used
    with pytest.raises(StaleArtifactError, match="changed since the index was built"):
        old.search(train.images[:1])
    old.close()
    second = ensure_replica_index(store, "ph", cfg)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert second["build_id"] != first["build_id"] and second["module"]["sha256"] == sha
    sims, idx = load_replica_index(store, "ph", cfg).search(train.images[[42]])
    assert idx[0] == 42 and sims[0] >= 0.999
