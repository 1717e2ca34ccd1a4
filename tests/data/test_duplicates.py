"""The duplicated-data scenario: jittered near-duplicate copies, their truth, and the K:M spec."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.duplicates import (
    DuplicateSpec,
    add_near_duplicates,
    duplicated_sources,
    jitter,
)
from pipeline.data.imageset import DataError, ImageSet
from pipeline.data.sources import synthetic_image
from pipeline.fanout.index import centred_pixel_embedding


def _train(n: int = 60, size: int = 16) -> ImageSet:
    images = np.stack([synthetic_image(0, i, size) for i in range(n)])
    return ImageSet(
        [f"s-{i:04d}" for i in range(n)], images, labels=[i % 3 for i in range(n)],
        meta=[{"i": i} for i in range(n)],
    )  # fmt: skip


@pytest.mark.parametrize("shape", [(16, 16, 1), (12, 10, 3)])
def test_jitter_keeps_shape_and_dtype_and_moves_pixels(shape):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, shape).astype(np.uint8)
    spec = DuplicateSpec(k=1, m=1, shift=2)
    out = jitter(image, rng, spec)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert not np.array_equal(out, image)
    # no jitter at all is the identity
    still = DuplicateSpec(k=1, m=1, shift=0, brightness=0, contrast=0, noise=0)
    np.testing.assert_array_equal(jitter(image, rng, still), image)


def test_copies_differ_bytewise_but_stay_close_in_the_centred_embedding():
    train = _train()
    spec = DuplicateSpec(k=5, m=4)
    out, truth = add_near_duplicates(train, spec, seed=3)
    assert len(out) == len(train) + 20 and len(truth) == 20
    assert out.keys[: len(train)] == train.keys  # the sources stay, in place
    np.testing.assert_array_equal(out.images[: len(train)], train.images)
    assert len(set(truth.values())) == 5 and set(truth.values()) <= set(train.keys)
    pos = {k: i for i, k in enumerate(out.keys)}
    embed = centred_pixel_embedding(out.images)
    for copy, src in truth.items():
        assert copy.startswith(f"{src}-dup")
        a, b = out.images[pos[copy]], out.images[pos[src]]
        assert a.tobytes() != b.tobytes()  # no byte hash finds them
        assert float((embed(a[None]) @ embed(b[None]).T)[0, 0]) >= 0.9
        assert out.labels[pos[copy]] == out.labels[pos[src]]
        assert out.meta[pos[copy]] == out.meta[pos[src]]
    assert duplicated_sources(truth) == set(truth) | set(truth.values())
    # seeded: the same seed gives the same copies, another seed others
    again, truth2 = add_near_duplicates(train, spec, seed=3)
    np.testing.assert_array_equal(again.images, out.images)
    assert truth2 == truth
    other, truth3 = add_near_duplicates(train, spec, seed=4)
    assert truth3 != truth or not np.array_equal(other.images, out.images)


def test_more_sources_than_images_raises():
    with pytest.raises(DataError, match="exceeds the 60 training images"):
        add_near_duplicates(_train(), DuplicateSpec(k=61, m=1), seed=0)


def test_parse_and_validate():
    assert DuplicateSpec.parse("32:25") == DuplicateSpec(k=32, m=25)
    assert DuplicateSpec.parse(" 3 : 4 ") == DuplicateSpec(k=3, m=4)
    for bad in ("32", "32:", ":5", "a:b", "3:4:5", "-1:3", "2.5:3", ""):
        with pytest.raises(DataError, match="K:M"):
            DuplicateSpec.parse(bad)
    for bad in ("0:5", "5:0"):
        with pytest.raises(DataError, match="K >= 1 and M >= 1"):
            DuplicateSpec.parse(bad)
    with pytest.raises(DataError, match="must be >= 0"):
        DuplicateSpec(k=1, m=1, noise=-0.1)
    d = DuplicateSpec(k=2, m=3).to_dict()
    assert d == {"k": 2, "m": 3, "shift": 0, "brightness": 0.06, "contrast": 0.1, "noise": 0.02}
