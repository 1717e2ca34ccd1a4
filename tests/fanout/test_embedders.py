"""Pluggable embeddings without Ray: a local TorchScript module (loaded once, batched, L2-normalised),
its id and digest, preprocessing, and clear refusals of missing and non-TorchScript files (which are
never unpickled)."""

from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.config import ConfigError, ReplicaConfig
from pipeline.data.provenance import StaleArtifactError
from pipeline.fanout.embedders import (
    EmbeddingError,
    ModuleEmbedding,
    RowEmbedder,
    check_torchscript,
    embedding_id,
    load_module,
    module_params,
    module_spec,
)
from pipeline.fanout.index import embed_pixels, make_embedding

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")


class TinyNet(torch.nn.Module):
    """conv -> relu -> pool -> linear to 32-d: a stand-in for a copy-detection descriptor."""

    def __init__(self, channels: int = 3):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, 8, 3, padding=1)
        self.pool = torch.nn.AdaptiveAvgPool2d(2)
        self.fc = torch.nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


def save_module(path: Path, seed: int = 0, channels: int = 3) -> Path:
    torch.manual_seed(seed)
    torch.jit.script(TinyNet(channels).eval()).save(str(path))
    return path


def _touch(path: str) -> None:  # what unpickling the malicious file would call
    Path(path).write_text("unpickled")


class Trap:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch, (self.marker,))


def _images(rng, n: int, size: int = 8, channels: int = 3) -> np.ndarray:
    return rng.integers(0, 256, (n, size, size, channels)).astype(np.uint8)


def test_vectors_are_l2_normalised_batched_and_copies_score_one(tmp_path):
    path = save_module(tmp_path / "net.pt")
    rng = np.random.default_rng(0)
    images = _images(rng, 10)
    embed = ModuleEmbedding(path, batch=3, device="cpu")
    emb = embed(images)
    assert emb.shape == (10, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(
        emb, ModuleEmbedding(path, batch=64, device="cpu")(images), atol=1e-6
    )
    again = embed(images[[4, 4]])
    assert float(again[0] @ again[1]) == pytest.approx(1.0, abs=1e-6)
    assert float(again[0] @ emb[4]) >= 0.9999
    sims = emb @ emb.T
    assert (sims[~np.eye(10, dtype=bool)] < 0.9999).all()  # distinct images stay distinct
    assert embed(images[:0]).shape[0] == 0


def test_preprocessing_channels_resize_and_norm(tmp_path):
    rng = np.random.default_rng(1)
    grey = _images(rng, 4, channels=1)
    rgb3 = ModuleEmbedding(save_module(tmp_path / "rgb.pt"), device="cpu")
    # grey images are replicated to RGB: the same vectors as the RGB copies
    np.testing.assert_allclose(rgb3(grey), rgb3(np.repeat(grey, 3, -1)), atol=1e-6)
    assert rgb3(grey[..., 0]).shape == (4, 32)  # (N, H, W) is grey too
    one = ModuleEmbedding(save_module(tmp_path / "grey.pt", channels=1), channels=1, device="cpu")
    assert one(_images(rng, 2)).shape == (2, 32)  # RGB made grey for a one-channel module
    sized = ModuleEmbedding(rgb3.path, size=16, device="cpu")
    x = sized._prepare(_images(rng, 2))
    assert tuple(x.shape) == (2, 3, 16, 16)
    raw = ModuleEmbedding(rgb3.path, norm="none", device="cpu")._prepare(
        np.full((1, 8, 8, 3), 255, np.uint8)
    )
    assert float(raw.min()) == float(raw.max()) == 1.0
    net = ModuleEmbedding(rgb3.path, device="cpu")._prepare(np.full((1, 8, 8, 3), 255, np.uint8))
    assert float(net[0, 0, 0, 0]) == pytest.approx((1 - 0.485) / 0.229, rel=1e-5)


def test_embedding_id_digest_and_params(tmp_path):
    path = save_module(tmp_path / "net.pt")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    cfg = ReplicaConfig(embedding=f"module:{path}", embedding_size=16, threshold=0.5)
    assert embedding_id(cfg) == f"module-{sha[:12]}"
    assert embedding_id(ReplicaConfig()) == "centred"
    assert module_params(ReplicaConfig()) is None
    assert module_params(cfg) == {"sha256": sha, "size": 16, "norm": "imagenet", "channels": 3}
    spec = module_spec(cfg)
    assert spec["path"] == str(path.resolve()) and spec["batch"] == 64
    # make_embedding accepts module names too (in-memory users: figures, clusters)
    emb = make_embedding(f"module:{path}", np.zeros((1, 8, 8, 3), np.uint8), size=16)
    assert emb(np.zeros((2, 8, 8, 3), np.uint8)).shape == (2, 32)
    # changed weights: a new id, and a spec of the old file refuses to load
    save_module(path, seed=1)
    assert embedding_id(cfg) != f"module-{sha[:12]}"
    with pytest.raises(StaleArtifactError, match="changed since the index was built"):
        load_module(spec)


def test_row_embedder_pixels_equal_embed_pixels(tmp_path):
    rng = np.random.default_rng(2)
    rows = _images(rng, 5)
    mean = rows.reshape(5, -1).mean(0).astype(np.float32) / 255.0
    got = RowEmbedder((8, 8, 3), mean)(rows.reshape(5, -1))
    np.testing.assert_array_equal(got, embed_pixels(rows, mean))
    np.testing.assert_array_equal(RowEmbedder((8, 8, 3))(rows), embed_pixels(rows, None))
    spec = module_spec(ReplicaConfig(embedding=f"module:{save_module(tmp_path / 'n.pt')}"))
    flat = RowEmbedder((8, 8, 3), None, spec)(rows.reshape(5, -1))  # flat rows reshaped
    np.testing.assert_allclose(flat, load_module(spec)(rows), atol=1e-6)


def test_a_missing_file_is_a_clear_error_naming_the_path(tmp_path):
    missing = tmp_path / "nope" / "sscd.pt"
    with pytest.raises(ConfigError, match=re.escape(f"embedding module file not found: {missing}")):
        ReplicaConfig(embedding=f"module:{missing}")
    with pytest.raises(ConfigError, match="embedding module file not found"):
        ModuleEmbedding(missing)
    with pytest.raises(ConfigError, match="'module:<path"):
        ReplicaConfig(embedding="module:")
    with pytest.raises(ConfigError, match="'centred', 'raw' or 'module:<path"):
        ReplicaConfig(embedding="clip")
    with pytest.raises(ConfigError, match="embedding_norm"):
        ReplicaConfig(embedding_norm="zscore")
    with pytest.raises(ConfigError, match="embedding_channels must be 1 or 3"):
        ReplicaConfig(embedding_channels=2)
    with pytest.raises(ConfigError, match="embedding_size must be >= 0"):
        ReplicaConfig(embedding_size=-1)


def test_a_pickled_file_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled.txt"
    trap = tmp_path / "trap.pt"
    torch.save({"state_dict": TinyNet().state_dict(), "trap": Trap(marker)}, trap)
    with pytest.raises(EmbeddingError, match=r"is not a TorchScript file \(a torch.save archive"):
        ModuleEmbedding(trap)
    cfg = ReplicaConfig(embedding=f"module:{trap}")  # the file exists: refused when loaded
    with pytest.raises(EmbeddingError, match=r"torch\.jit\.script"):
        load_module(module_spec(cfg))
    legacy = tmp_path / "legacy.pkl"
    legacy.write_bytes(pickle.dumps(Trap(marker)))
    with pytest.raises(EmbeddingError, match="not a zip archive"):
        check_torchscript(legacy)
    assert not marker.exists()  # nothing was unpickled
    # the files are real traps: unpickling either runs code
    torch.load(trap, weights_only=False)
    assert marker.read_text() == "unpickled"
    marker.unlink()
    pickle.loads(legacy.read_bytes())
    assert marker.read_text() == "unpickled"


def test_a_module_with_the_wrong_input_or_output_is_a_clear_error(tmp_path):
    class Spatial(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    path = tmp_path / "spatial.pt"
    torch.jit.script(Spatial()).save(str(path))
    with pytest.raises(EmbeddingError, match=r"must map \(N, C, H, W\) to \(N, D\)"):
        ModuleEmbedding(path, device="cpu")(np.zeros((1, 8, 8, 3), np.uint8))
    grey_net = ModuleEmbedding(save_module(tmp_path / "g.pt", channels=1), device="cpu")
    with pytest.raises(EmbeddingError, match="embedding_channels"):
        grey_net(np.zeros((1, 8, 8, 3), np.uint8))  # 3 channels into a 1-channel conv
