"""ReplicaGuard's redraw logic over a real exact FAISS index of a few training images: copies are
redrawn from derived seeds, a sample still a copy after the last redraw is blacked out and flagged,
and nothing else changes. (On a memorising model with a stored index:
tests/integrations/test_pixel_pipeline_protection.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.core.sampler import derive_seed
from pipeline.data.imageset import images_from_tensor
from pipeline.fanout.index import build_index, centred_pixel_embedding, embed_pixels, nearest
from pipeline.integrations.guard import ReplicaGuard
from pipeline.integrations.protection import redraw_generators, sample_seeds


class _FlatIndex:
    """The replica rule over in-memory training images: centred pixels, exact inner product."""

    def __init__(self, train: np.ndarray):
        self.embed = centred_pixel_embedding(train)
        self.index = build_index(self.embed(train))
        self.sidecar = {"image_shape": list(train.shape[1:])}

    def search(self, images: np.ndarray, k: int = 1):
        sims, rows = nearest(self.index, embed_pixels(images, self.embed.mean), k)
        return sims[:, 0], rows[:, 0]

    def keys_of(self, rows) -> list[str]:
        return [f"train-{int(r)}" for r in rows]


@pytest.fixture
def train() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(3, 1, 4, 4, generator=gen) * 2 - 1


def test_copies_are_redrawn_then_blacked_out(train):
    index = _FlatIndex(images_from_tensor(train))
    guard = ReplicaGuard(index, threshold=0.97, max_redraws=2)
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    images = torch.stack([train[1], noise[0].clamp(-1, 1)])  # a copy of train-1, and not a copy
    calls = []

    def redraw(positions, gens):  # always draws the copy again: the guard must give up
        calls.append((positions.tolist(), [g.initial_seed() for g in gens]))
        return train[1].expand(len(positions), -1, -1, -1).clone()

    out = guard.apply(images, [7, 8], redraw)
    assert calls == [([0], [derive_seed(7, "guard", 1)]), ([0], [derive_seed(7, "guard", 2)])]
    assert out.flagged.tolist() == [True, False] and out.redraws.tolist() == [2, 0]
    assert torch.all(out.images[0] == -1.0)  # black
    assert torch.equal(out.images[1], images[1])  # untouched
    assert out.similarity[0] >= 0.97 > out.similarity[1] and out.keys[0] == "train-1"


def test_a_redraw_below_the_threshold_is_kept(train):
    guard = ReplicaGuard(_FlatIndex(images_from_tensor(train)), threshold=0.97, max_redraws=3)
    fresh = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(5)).clamp(-1, 1)
    out = guard.apply(train[:1].clone(), [3], lambda pos, gens: fresh)
    assert out.redraws.tolist() == [1] and not out.flagged[0]
    assert torch.equal(out.images[0], fresh[0]) and out.similarity[0] < 0.97


def test_bad_settings_and_shapes_are_refused(train):
    index = _FlatIndex(images_from_tensor(train))
    with pytest.raises(ValueError, match="threshold must be in"):
        ReplicaGuard(index, threshold=1.5)
    with pytest.raises(ValueError, match="max_redraws"):
        ReplicaGuard(index, max_redraws=-1)
    with pytest.raises(ValueError, match="holds"):
        ReplicaGuard(index).similarity(torch.zeros(1, 3, 4, 4))


def test_redraw_seeds_are_per_sample_and_reproducible():
    gens = [torch.Generator().manual_seed(s) for s in (4, 5)]
    assert sample_seeds(gens, 2) == [4, 5]
    one = torch.Generator().manual_seed(9)
    assert sample_seeds(one, 2) == [derive_seed(9, 0), derive_seed(9, 1)]
    assert len(set(sample_seeds(None, 3))) == 3
    a, b = redraw_generators([4, 5], 1), redraw_generators([4, 5], 1)
    assert [torch.randn(2, generator=g).tolist() for g in a] == [
        torch.randn(2, generator=g).tolist() for g in b
    ]
    assert redraw_generators([4], 2)[0].initial_seed() != a[0].initial_seed()
