"""Quality for image folders: subfolder labels, the held-out autoencoder's Fréchet distance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.datasets import digits_source, folder_source
from pipeline.data.imageset import ImageSet
from pipeline.evaluation.domain import DomainEvaluator
from pipeline.evaluation.folder_quality import (
    ENCODER_NAME,
    FolderEvaluator,
    quality_evaluator,
    subfolder_labels,
    train_autoencoder,
    train_folder_evaluator,
)


def test_subfolder_labels_follow_sorted_subfolder_names():
    keys = ["cat__a", "dog__b", "cat__c", "dog__d", "ant__e", "ant__f"]
    assert subfolder_labels(keys) == [1, 2, 1, 2, 0, 0]
    # a file at the top level, one subfolder only, or too few images a class: not labelled
    assert subfolder_labels(["cat__a", "cat__b", "loose"]) is None
    assert subfolder_labels(["cat__a", "cat__b"]) is None
    assert subfolder_labels(["cat__a", "cat__b", "dog__c"]) is None
    assert subfolder_labels(["cat__a", "cat__b", "dog__c"], min_per_class=1) == [0, 0, 1]
    assert subfolder_labels([]) is None
    with pytest.raises(ValueError, match="min_per_class"):
        subfolder_labels(keys, min_per_class=0)


def test_folder_source_keys_carry_the_subfolder_labels(tmp_path):
    rng = np.random.default_rng(0)
    expected = []
    for label, name in enumerate(["class_0", "class_1", "class_10"]):  # sorted as text
        (tmp_path / name).mkdir()
        for i in range(3):
            pixels = rng.integers(0, 256, (28, 28), dtype=np.uint8)
            Image.fromarray(pixels, mode="L").save(tmp_path / name / f"img_{i}.png")
            expected.append(label)
    images = folder_source(tmp_path, 16)
    assert images.labels is None  # the source itself records none: the keys do
    assert subfolder_labels(images.keys) == expected


@pytest.fixture(scope="module")
def digits8():
    """(held-out reference, other real images) at 8x8, seeded."""
    ds = digits_source(8)
    x = ds.to_tensor()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return ds, x[perm[:800]], x[perm[800:1056]], perm


@pytest.fixture(scope="module")
def encoder_ev(digits8):
    """A folder evaluator without labels, trained on the 800 reference digits for 300 steps."""
    return train_folder_evaluator(digits8[1], None, seed=0, encoder_steps=300)


def test_train_autoencoder_is_seeded_and_learns(digits8, encoder_ev):
    _, ref, _, _ = digits8
    a, mse_a = train_autoencoder(ref[:200], steps=20, seed=3)
    b, mse_b = train_autoencoder(ref[:200], steps=20, seed=3)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert mse_a == mse_b
    # far better than predicting the mean image, and better than after 20 steps
    assert encoder_ev.val_mse < 0.25 * float(ref.var()) and encoder_ev.val_mse < mse_a
    with pytest.raises(ValueError, match="steps"):
        train_autoencoder(ref, steps=0)
    with pytest.raises(ValueError, match="N >= 4"):
        train_autoencoder(ref[:3])
    with pytest.raises(ValueError, match=">= 4"):
        train_autoencoder(torch.zeros(8, 1, 3, 3))
    odd, _ = train_autoencoder(torch.rand(8, 3, 6, 6) * 2 - 1, steps=2)  # padded to 8x8 inside
    assert odd(torch.zeros(2, 3, 6, 6)).shape == (2, 3, 6, 6)
    assert odd.encode(torch.zeros(2, 3, 6, 6)).shape == (2, 64)


def test_encoder_fd_grows_with_grain_and_broken_strokes(digits8, encoder_ev):
    _, ref, other, _ = digits8
    ev = encoder_ev
    assert ev.domain is None and ev.val_accuracy is None
    gen = torch.Generator().manual_seed(1)
    real = ev.quality(other)["fd_encoder"]
    grainy = ev.quality((other + 0.4 * torch.randn(other.shape, generator=gen)).clamp(-1, 1))
    keep = (torch.rand(other.shape, generator=gen) > 0.3).float()
    broken = ev.quality(other * keep + (keep - 1))  # 30% of the pixels set to the background
    assert set(grainy) == {"fd_encoder"}
    assert real < 0.5 * grainy["fd_encoder"]
    assert real < 0.5 * broken["fd_encoder"]
    assert ev.quality(ref)["fd_encoder"] == pytest.approx(0.0, abs=1e-6)  # the reference itself


def test_quality_evaluator_picks_what_the_split_supports(digits8):
    ds, _, _, perm = digits8
    idx = perm[:300].tolist()
    digits = ds.subset(idx)  # labels of its own: the digits' domain classifier, as before
    ev, header = quality_evaluator(digits, epochs=1, seed=0)
    assert isinstance(ev, DomainEvaluator)
    assert header["_name"].startswith("FD-domaincnn") and "_domain_val_accuracy" in header
    # an image folder with label subfolders: the encoder and a label CNN
    keys = [f"class_{lab}__img_{i:04d}" for i, lab in zip(idx, digits.labels, strict=True)]
    folder = ImageSet(keys=keys, images=digits.images)
    ev, header = quality_evaluator(folder, epochs=1, seed=0, encoder_steps=20)
    assert isinstance(ev, FolderEvaluator) and ev.domain is not None
    q = ev.quality(folder.to_tensor()[:64])
    assert set(q) == {"fd_encoder", "fd", "confident_fraction"}
    assert 0.0 <= q["confident_fraction"] <= 1.0 and q["fd"] >= 0.0
    assert "label CNN" in header["_name"] and header["_labels"] == "the first-level subfolders"
    assert ev.describe()["labels"] is True
    # without subfolders: the encoder alone
    flat = ImageSet(keys=[f"img_{i:04d}" for i in idx], images=digits.images)
    ev, header = quality_evaluator(flat, epochs=1, seed=0, encoder_steps=20)
    assert ev.domain is None and header["_name"] == ENCODER_NAME
    assert header["_encoder_val_mse"] == ev.val_mse > 0.0
    # too few held-out images for any measure
    ev, header = quality_evaluator(flat.subset(range(3)), epochs=1)
    assert ev is None and header == {"_name": "none"}
