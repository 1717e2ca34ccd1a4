"""Streaming input of the training loops, Ray-free: row sources, exact batches, resume positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.core.config import ClassifierTrainConfig, DenoiserTrainConfig
from pipeline.core.diffusion import linear_schedule
from pipeline.core.models import NoiseClassifier, build_unet
from pipeline.data.imageset import DataError
from pipeline.train.ingest import (
    MEMBERS,
    EpochBatches,
    MemoryRows,
    StreamRows,
    cache_rows,
    decode_rows,
    expected_bytes,
    split_info,
)
from pipeline.train.loops import EMA, classifier_metrics, fit_classifier, fit_denoiser


def _rows(n: int, size: int = 8, prefix: str = "k") -> dict:
    keys = np.asarray([f"{prefix}{i:03d}" for i in range(n)], dtype=object)
    images = np.arange(n * size * size, dtype=np.int64).reshape(n, size, size, 1) % 251
    return {"key": keys, "image": images.astype(np.uint8)}


def _chunks(rows: dict, size: int):
    """A stream's pass: the rows in fixed chunks (as Ray Data's iter_batches)."""
    n = len(rows["key"])
    return lambda: ({k: v[s : s + size] for k, v in rows.items()} for s in range(0, n, size))


def _keys(batches: EpochBatches, steps: int) -> list[str]:
    return [str(k) for _ in range(steps) for k in batches.next()["key"]]


@pytest.mark.parametrize("kind", ["cache", "stream"])
def test_epochs_are_seeded_permutations_in_exact_batches(kind):
    rows = _rows(12)

    def source(rank=0, seed=3):
        if kind == "cache":  # read in another order: the cache sorts by key
            shuffled = {k: v[::-1] for k, v in rows.items()}
            return cache_rows(_chunks(shuffled, 5)(), seed, rank)
        return StreamRows(_chunks(rows, 3), buffer=4, seed=seed, rank=rank, size=12)

    batches = EpochBatches(source(), 5)
    seen = _keys(batches, 12)  # 60 rows: 5 epochs of 12, batches span epochs
    epochs = [seen[i : i + 12] for i in range(0, 60, 12)]
    assert all(sorted(e) == sorted(rows["key"]) for e in epochs)  # without replacement
    assert len({tuple(e) for e in epochs}) == 5  # each epoch in its own order
    state = batches.state()
    assert state == {"input": kind, "epoch": 4, "offset": 12, "epochs": 5, "rows": 60,
                     "rows_read": 60 if kind == "stream" else 12}  # fmt: skip
    assert _keys(EpochBatches(source(), 5), 12) == seen  # seeded
    assert _keys(EpochBatches(source(rank=1), 5), 12) != seen  # by rank
    assert _keys(EpochBatches(source(seed=4), 5), 12) != seen  # by seed
    # a resume at a recorded position continues the same order (skipping the consumed rows)
    first = EpochBatches(source(), 5)
    _keys(first, 5)  # 25 rows: epoch 2, row 1
    pos = first.state()
    assert (pos["epoch"], pos["offset"]) == (2, 1)
    resumed = EpochBatches(source(), 5, pos["epoch"], pos["offset"])
    assert _keys(resumed, 7) == seen[25:]
    assert resumed.state()["epochs"] == 3


def test_stream_buffer_is_bounded_and_an_empty_shard_fails():
    rows = _rows(40)
    src = StreamRows(_chunks(rows, 3), buffer=4, seed=0)
    first = next(src.epoch(0))
    # the first rows out come from the first buffer + chunk rows in, not from anywhere in the pass
    assert {int(k[1:]) for k in first["key"]} <= set(range(7))
    assert len(first["key"]) <= 3 and src.rows_read <= 6
    empty = StreamRows(lambda: iter([]), buffer=4)
    with pytest.raises(DataError, match="has no rows"):
        EpochBatches(empty, 2).next()
    with pytest.raises(DataError, match="is empty"):
        cache_rows(iter([]))


def test_loops_consume_a_stream_step_driven_and_resume_mid_epoch(
    core_tiny_unet_cfg, core_tiny_clf_cfg
):
    """Every rank runs cfg.steps whatever its shard size; a resume restores epoch and position."""
    schedule = linear_schedule()
    cfg = DenoiserTrainConfig(steps=4, batch_size=6, checkpoint_every=2, warmup_steps=0)
    ends = {}
    for n in (7, 13):  # two shard sizes: same steps, other epochs
        torch.manual_seed(0)
        unet = build_unet(core_tiny_unet_cfg)
        src = StreamRows(_chunks(_rows(n), 4), buffer=3, seed=0, size=n)
        reports = []
        end = fit_denoiser(
            unet, EMA(unet, 0.9), torch.optim.Adam(unet.parameters()), schedule, src, cfg,
            on_checkpoint=lambda s, m, out=reports: out.append((s, m["data"])),
        )  # fmt: skip
        assert [s for s, _ in reports] == [2, 4] and end["train"]["rows"] == 24
        ends[n] = end["train"]
    assert ends[7]["input"] == "stream" and (ends[7]["epoch"], ends[7]["offset"]) == (3, 3)
    assert (ends[13]["epoch"], ends[13]["offset"]) == (1, 11)

    # the classifier from step 2 at the recorded position ends where an uninterrupted run does
    ccfg = ClassifierTrainConfig(
        steps=4, batch_size=8, checkpoint_every=2, warmup_steps=0, train_fraction=0.5
    )
    clf = NoiseClassifier(core_tiny_clf_cfg)

    def run(start=0, position=None):
        train = StreamRows(_chunks(_rows(5), 2), buffer=2, seed=0, size=5)
        bits = MemoryRows(_rows(9, prefix="h"), seed=0, stream=1)
        seen = []
        end = fit_classifier(
            clf, torch.optim.Adam(clf.parameters()), schedule, train, bits, None, ccfg, start,
            on_checkpoint=lambda s, m: seen.append((s, m["data"])), position=position,
        )  # fmt: skip
        return seen, end

    full, end = run()
    assert {k: v["rows"] for k, v in end.items()} == {"train": 16, "bits": 16}
    half = full[0][1]
    _, end2 = run(2, {k: {"epoch": v["epoch"], "offset": v["offset"]} for k, v in half.items()})
    for k in ("train", "bits"):
        assert (end2[k]["epoch"], end2[k]["offset"]) == (end[k]["epoch"], end[k]["offset"])


def test_classifier_metrics_run_in_bounded_batches(core_tiny_clf_cfg):
    clf = NoiseClassifier(core_tiny_clf_cfg)
    sizes = []
    clf.register_forward_pre_hook(lambda m, args: sizes.append(len(args[0])))
    x, y = torch.randn(50, 1, 8, 8), (torch.rand(50) > 0.5).float()
    m = classifier_metrics(clf, linear_schedule(), x, y, x[:30], y[:30], batch_size=16)
    assert max(sizes) <= 16 and sum(sizes) == 4 * 4 * 50 + 4 * 30 + 30 + 50
    assert m.lipschitz_proxy > 0 and 0 <= m.holdout_accuracy <= 1


# ------------------------------------------------------------------------------------ latent rows
def _npy(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_latent_members_decode_to_float32_rows():
    """``<key>.latent.npy`` (float16 or float32) and ``<key>.pooled.npy`` become float32 columns;
    the raw rows are what read_webdataset makes of them (key, then "latent.npy", ...)."""
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((3, 4, 8, 8)).astype(np.float16)
    pooled = rng.standard_normal((3, 32)).astype(np.float32)
    raw = {
        "__key__": np.asarray(["a", "b", "c"], dtype=object),
        "latent.npy": np.asarray([_npy(z) for z in latents], dtype=object),
        "pooled.npy": np.asarray([_npy(p) for p in pooled], dtype=object),
    }
    rows = decode_rows(raw)
    assert set(rows) == {"key", "latent", "pooled"} and list(rows["key"]) == ["a", "b", "c"]
    assert rows["latent"].dtype == np.float32 and rows["latent"].shape == (3, 4, 8, 8)
    assert np.array_equal(rows["latent"], latents.astype(np.float32))
    assert rows["pooled"].dtype == np.float32 and np.array_equal(rows["pooled"], pooled)
    no_text = decode_rows({k: v for k, v in raw.items() if k != "pooled.npy"})
    assert set(no_text) == {"key", "latent"}
    empty = decode_rows({k: v[:0] for k, v in raw.items()})  # a role filter kept nothing
    assert empty["latent"].shape[0] == empty["pooled"].shape[0] == 0
    assert {"*.png", "*.latent.npy", "*.pooled.npy"} == set(MEMBERS)  # never the (L, D) hidden


def test_split_info_of_a_latent_dataset_counts_decoded_float32_bytes():
    splits = {"train": {"count": 48, "shards": []}}
    latent = {"scaling_factor": 0.18215, "latent_shape": [4, 8, 8], "pooled_dim": 32,
              "dtype": "float16"}  # fmt: skip
    manifest = {"image_size": [8, 8], "channels": 4, "latent": latent, "splits": splits}
    info = split_info(manifest, "train")
    assert info == {"rows": 48, "row_bytes": 4 * (4 * 8 * 8 + 32)}  # float32 after decoding
    image = {"image_size": [16, 16], "channels": 1, "splits": splits}
    assert split_info(image, "train") == {"rows": 48, "row_bytes": 256}  # uint8 images: unchanged
    # a worker caches its share only when its decoded size fits
    assert expected_bytes(info, 2) == 24 * 4 * 288
    assert expected_bytes(info, 1) > expected_bytes(split_info(image, "train"), 1)
