"""Every reader of a dataset shard checks its sha256 against the manifest: one byte changed in a
shard (in a tar's padding, so the tar itself still parses and decodes) makes the IVF index build, the
held-out reader of its measurement, the streaming check scoring held-out shards and the cluster member reader raise
DataError naming the shard, and no valid index is left behind (real local Ray, real FAISS)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.config import ReplicaConfig
from pipeline.data.imageset import DataError, ImageSet
from pipeline.data.shards import write_dataset
from pipeline.data.storage import open_store
from pipeline.data.tars import read_tar
from pipeline.fanout.clusters import member_images
from pipeline.fanout.replica_index import ensure_replica_index, index_folder
from pipeline.fanout.replica_store import read_sidecar
from pipeline.fanout.scoring_stream import score_shard_summaries

IVF = ReplicaConfig(index="ivf", pca_dims=16, rows_per_task=200, measure_queries=32)


def corrupt_one_byte(path: Path) -> None:
    """Change one padding byte after the first ``.json`` member: the shard's bytes (and sha256)
    change, its images and metadata do not, so only the checksum can tell."""
    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".json"))
    at = member.offset_data + member.size
    assert at % 512, "the member must leave padding"
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    assert len(read_tar(bytes(data), path.name)) > 0  # still a readable tar


@pytest.fixture
def syn_store(tmp_path):
    """400 training images (4 shards) and 40 held out (2 shards), with a manifest."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (440, 8, 8, 3), dtype=np.uint8)
    store = open_store(str(tmp_path / "store"))
    train = ImageSet([f"t-{i:04d}" for i in range(400)], images[:400])
    holdout = ImageSet([f"h-{i:04d}" for i in range(40)], images[400:])
    write_dataset(store, "syn", {"train": train, "holdout": holdout}, shard_size=100)
    return store


def _shard(store, split: str, name: str) -> Path:
    return Path(store.join("data", "syn", split, name))


def test_ivf_build_refuses_a_corrupt_training_shard(syn_store, ray_local):
    corrupt_one_byte(_shard(syn_store, "train", "shard-000002.tar"))
    with pytest.raises(DataError, match=r"checksum mismatch for \S*/data/syn/train/shard-000002"):
        ensure_replica_index(syn_store, "syn", IVF)
    assert read_sidecar(syn_store, index_folder("syn", "centred", "ivf")) is None


def test_ivf_build_refuses_a_corrupt_held_out_shard(syn_store, ray_local):
    """The build's recall measurement reads held-out images as queries."""
    corrupt_one_byte(_shard(syn_store, "holdout", "shard-000000.tar"))
    with pytest.raises(DataError, match=r"checksum mismatch for \S*/data/syn/holdout/shard-000000"):
        ensure_replica_index(syn_store, "syn", IVF)
    assert read_sidecar(syn_store, index_folder("syn", "centred", "ivf")) is None


def test_held_out_scoring_refuses_a_corrupt_shard(syn_store, ray_local):
    cfg = ReplicaConfig()
    ensure_replica_index(syn_store, "syn", cfg)  # a valid exact index; then a held-out shard rots
    corrupt_one_byte(_shard(syn_store, "holdout", "shard-000000.tar"))
    before = syn_store.read_bytes("data", "syn", "holdout", "shard-000000.tar")
    with pytest.raises(DataError, match=r"checksum mismatch for \S*/data/syn/holdout/shard-000000"):
        score_shard_summaries(syn_store, "data/syn/holdout", "syn", cfg, "reports/h/held-out",
                              annotate=False)  # fmt: skip
    assert not any("000000" in n for n in syn_store.listdir("reports/h/held-out"))
    assert syn_store.read_bytes("data", "syn", "holdout", "shard-000000.tar") == before


def test_cluster_member_reader_refuses_a_corrupt_shard(syn_store):
    assert sorted(member_images(syn_store, "syn", {"t-0150", "t-0399"})) == ["t-0150", "t-0399"]
    corrupt_one_byte(_shard(syn_store, "train", "shard-000001.tar"))
    with pytest.raises(DataError, match=r"checksum mismatch for \S*/data/syn/train/shard-000001"):
        member_images(syn_store, "syn", {"t-0150"})
