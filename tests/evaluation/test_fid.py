"""FID from a local Inception weights file: the pipeline with random weights, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.evaluation.domain import frechet_distance
from pipeline.evaluation.fid import (
    FID_WEIGHTS_NAME,
    InceptionFeatures,
    InceptionWeightsError,
    build_inception,
    fid,
    frechet_distance_features,
    load_inception,
)


@pytest.mark.parametrize("n1,n2,d", [(30, 20, 10), (5, 7, 10), (40, 40, 3)])
def test_low_rank_frechet_matches_matrix_square_root(n1, n2, d):
    rng = np.random.default_rng(n1 + d)
    a, b = rng.normal(size=(n1, d)), rng.normal(size=(n2, d)) * 1.5 + 0.3
    expected = frechet_distance(
        a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    )
    assert frechet_distance_features(a, b) == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert frechet_distance_features(b, a) == pytest.approx(expected, rel=1e-6, abs=1e-9)


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """An FID Inception with random (He) weights, saved as a plain state dict like the real file."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / FID_WEIGHTS_NAME
    torch.save(build_inception("fid", random_init=True).state_dict(), path)
    return path


def test_fid_of_a_set_with_itself_is_zero(random_weights):
    features = InceptionFeatures.from_file(random_weights, batch_size=4)
    assert features.name == "FID"
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(6, 1, 16, 16, generator=gen) * 2 - 1
    y = torch.rand(6, 3, 16, 16, generator=gen) * 2 - 1
    fx, fy = features(x), features(y)
    assert fx.shape == (6, 2048) and np.isfinite(fx).all()
    assert frechet_distance_features(fx, fx) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance_features(fx, fy) > 1e-3  # different images: clearly not 0
    # same images in a different order and batching: the same set, FID about 0
    assert fid(InceptionFeatures(features.net, "FID", 5), x.flip(0), x) == pytest.approx(
        0.0, abs=1e-6
    )


def test_the_uint8_embedder_is_the_tensor_pipeline(random_weights):
    """What a feature actor builds (``inception_embedder``) embeds uint8 images as the models scale
    them: the same features as the tensor path."""
    from pipeline.data.imageset import images_to_tensor
    from pipeline.evaluation.fid import inception_embedder

    images = np.random.default_rng(2).integers(0, 256, (3, 12, 12, 1), dtype=np.uint8)
    embed = inception_embedder(random_weights, 2, "cpu")
    got = embed(images)
    features = InceptionFeatures.from_file(random_weights, batch_size=2)
    assert got.shape == (3, 2048) and got.dtype == np.float64
    np.testing.assert_array_equal(got, features(images_to_tensor(images)))
    assert next(features.net.parameters()).device.type == "cpu"


def test_the_embedder_builds_from_shipped_bytes_where_the_file_is_absent(random_weights, tmp_path):
    """Feature actors on other nodes get the weights file's bytes, not its path."""
    from safetensors.torch import save_file

    from pipeline.evaluation.fid import inception_embedder

    images = np.random.default_rng(3).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    local = inception_embedder(random_weights, 2)(images)
    absent = tmp_path / "other-node" / FID_WEIGHTS_NAME
    shipped = inception_embedder(absent, 2, "cpu", data=random_weights.read_bytes())
    np.testing.assert_array_equal(shipped(images), local)
    st = tmp_path / "w.safetensors"
    save_file(torch.load(random_weights, weights_only=True), str(st))
    from_st = inception_embedder(tmp_path / "absent.safetensors", 2, data=st.read_bytes())
    np.testing.assert_array_equal(from_st(images), local)
    with pytest.raises(InceptionWeightsError, match="not a readable weights file"):
        inception_embedder(absent, 2, data=b"not a weights file")


def test_missing_weights_file_names_what_to_provide(tmp_path):
    with pytest.raises(InceptionWeightsError) as err:
        load_inception(tmp_path / "nope.pth")
    msg = str(err.value)
    assert "does not exist" in msg and FID_WEIGHTS_NAME in msg and "state dict" in msg


def test_wrong_weights_files_are_rejected(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(InceptionWeightsError, match="not a readable weights file"):
        load_inception(garbage)
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    with pytest.raises(InceptionWeightsError, match="not an Inception v3 state dict"):
        load_inception(other)
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(10, 2048), "fc.bias": torch.zeros(10)}, wrong)
    with pytest.raises(InceptionWeightsError, match="10 classes"):
        load_inception(wrong)
    truncated = tmp_path / "truncated.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}, truncated)
    with pytest.raises(InceptionWeightsError, match="do not fit Inception v3"):
        load_inception(truncated)


def test_pickled_objects_are_refused(tmp_path):
    """``weights_only=True``: a file that pickles arbitrary objects is not unpickled."""
    import os
    import pickle

    path = tmp_path / "evil.pth"
    path.write_bytes(
        pickle.dumps({"fc.weight": os.system}, protocol=2)
    )  # a reference to a callable
    with pytest.raises(InceptionWeightsError, match="not a readable weights file"):
        load_inception(path)
