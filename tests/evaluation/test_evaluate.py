"""A run's evaluation: seeded attack sets, the nearest-sample attack, FID's section, and evaluate_run."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.config import ClassifierArchConfig, ConfigError, EvalConfig, UNetConfig
from pipeline.core.diffusion import linear_schedule
from pipeline.core.guidance import cpsample_guidance
from pipeline.core.models import NoiseClassifier, build_unet, save_classifier, save_denoiser
from pipeline.data.imageset import DataError, ImageSet
from pipeline.data.provenance import StaleArtifactError, value_digest
from pipeline.data.shards import read_image_shards, write_image_shards
from pipeline.data.storage import open_store
from pipeline.evaluation.evaluate import (
    attack_sets,
    evaluate_run,
    fid_section,
    membership_inference,
    run_sets,
)
from pipeline.evaluation.fid import InceptionWeightsError
from pipeline.evaluation.fragments import write_fragment

PNG = b"\x89PNG\r\n\x1a\n"
FAST = EvalConfig(
    num_members=4,
    num_nonmembers=6,
    timesteps=(50,),
    draws=1,
    secmi_t=20,
    secmi_k=10,
    num_permutations=50,
)
UNET16 = UNetConfig(
    sample_size=16,
    channels=1,
    block_out_channels=(8, 16),
    layers_per_block=1,
    attention_levels=(),
    norm_num_groups=8,
)
CLF16 = ClassifierArchConfig(
    sample_size=16,
    channels=1,
    base_channels=8,
    channel_mults=(1, 2),
    time_embed_dim=8,
    num_groups=4,
)


@pytest.fixture(scope="module")
def tiny_models16(tmp_path_factory) -> Path:
    """A random-weight 16x16 denoiser and classifier, fitting digits_store's images."""
    root = tmp_path_factory.mktemp("models16")
    torch.manual_seed(0)
    save_denoiser(build_unet(UNET16), root / "denoiser", {"unet": {}}, linear_schedule())
    torch.manual_seed(1)
    save_classifier(NoiseClassifier(CLF16), root / "classifier", {})
    return root


def _samples(
    store, run: str, sampler: str, images: np.ndarray, models: Path | None = None, **knobs
) -> None:
    """Sample shards of ``images`` (4 per shard); with ``models`` (a folder with ``denoiser`` and
    ``classifier``) every record carries what ShardSampler writes: the models' digests, the run
    fingerprint and the plain sampler settings."""
    from pipeline.core.config import SamplerConfig
    from pipeline.data.provenance import dir_digest
    from pipeline.fanout.resume import run_fingerprint, sampler_settings, sampling_provenance

    keys = [f"{sampler}-{i:06d}" for i in range(len(images))]
    meta = None
    if models is not None:
        cfg = SamplerConfig(sampler=sampler, samples_per_shard=4, **knobs)
        prov = sampling_provenance(
            cfg, dir_digest(models / "denoiser"), dir_digest(models / "classifier")
        )
        record = {"provenance": prov, "run_fingerprint": run_fingerprint(prov),
                  "sampler_settings": sampler_settings(cfg)}  # fmt: skip
        meta = [
            dict(record, shard_members=min(4, len(images) - i // 4 * 4)) for i in range(len(images))
        ]
    write_image_shards(
        store, f"samples/{run}/{sampler}", ImageSet(keys=keys, images=images, meta=meta or []),
        shard_size=4,
    )  # fmt: skip


# ------------------------------------------------------------------------------------ attack_sets
def test_attack_sets_are_seeded_capped_subsets_read_shard_by_shard(digits_store):
    train = read_image_shards(digits_store, "data/digits/train")
    holdout = read_image_shards(digits_store, "data/digits/holdout")
    assert (len(train), len(holdout)) == (32, 300)
    members, nonmembers, train_mean, pool = attack_sets(digits_store, "digits", 10, 20, seed=3)
    drawn = pool.pop("num_candidates")  # rows pick_images drew: at least k, at most the split
    assert 20 <= drawn <= 300 and pool.pop("num_never_seen_candidates") == drawn  # all kept
    assert pool == {
        "source": "held-out images no model has seen", "num_holdout": 300,
        "classifier_trained_fraction": 0.0, "num_nonmembers": 20,
    }  # fmt: skip
    assert (len(members), len(nonmembers)) == (10, 20)
    # the training split's mean image, streamed shard by shard
    expected = train.images.reshape(32, -1).astype(np.float64).mean(0) / 255.0
    np.testing.assert_allclose(train_mean, expected, atol=1e-6)
    # members come from the training split, non-members from the held-out one, sorted by key
    assert members.keys == sorted(members.keys) and nonmembers.keys == sorted(nonmembers.keys)
    tpos = [train.keys.index(k) for k in members.keys]
    hpos = [holdout.keys.index(k) for k in nonmembers.keys]
    np.testing.assert_array_equal(members.images, train.images[tpos])
    np.testing.assert_array_equal(nonmembers.images, holdout.images[hpos])
    assert members.labels == [train.labels[i] for i in tpos]
    # the same seed gives the same sets; another seed other sets
    again = attack_sets(digits_store, "digits", 10, 20, seed=3)
    assert again[0].keys == members.keys and again[1].keys == nonmembers.keys
    other = attack_sets(digits_store, "digits", 10, 20, seed=4)
    assert other[0].keys != members.keys and other[1].keys != nonmembers.keys
    # sizes are capped at what the splits hold
    m, n, *_ = attack_sets(digits_store, "digits", 1000, 1000, seed=3)
    assert m.keys == train.keys and n.keys == holdout.keys


def test_attack_sets_never_take_a_non_member_the_classifier_trained_on(digits_store):
    """The classifier trains on a keyed-hash share of the held-out images (``holdout_images`` of
    them, roles from ``label_seed``): those are never non-members. Before roles existed, ~58% of the
    demo's non-members were such images."""
    from pipeline.core.labels import is_trained_holdout

    holdout = read_image_shards(digits_store, "data/digits/holdout")
    seen = {k for k in holdout.keys if is_trained_holdout(k, 7, 250 / 300)}
    assert 200 < len(seen) < 300
    _, nonmembers, _, pool = attack_sets(digits_store, "digits", 4, 1000, 0, 250, label_seed=7)
    assert len(nonmembers) == 300 - len(seen) and not set(nonmembers.keys) & seen
    assert pool["classifier_trained_fraction"] == 250 / 300
    _, some, _, _ = attack_sets(digits_store, "digits", 4, 20, 0, 250, label_seed=7)
    assert len(some) == 20 and not set(some.keys) & seen
    # a classifier that trained on every held-out image leaves no non-member: said, with the fix
    with pytest.raises(DataError, match=r"trained on about 300 held-out images.*--holdout-images"):
        attack_sets(digits_store, "digits", 4, 20, 0, 300, label_seed=7, fraction=1.0)


def test_fid_section_without_weights_says_why_it_was_skipped(tmp_path):
    empty = open_store(str(tmp_path / "empty"))
    out = fid_section(empty, "r", "digits", None)
    assert set(out) == {"skipped"} and "--inception-weights" in out["skipped"]


def test_fid_section_rejects_a_missing_weights_file_before_reading_data(tmp_path):
    empty = open_store(str(tmp_path / "empty"))  # no shards: reading them would fail differently
    with pytest.raises(InceptionWeightsError, match="does not exist"):
        fid_section(empty, "r", "digits", str(tmp_path / "pt_inception.pth"))


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory) -> Path:
    """An FID Inception with random (He) weights, saved as a plain state dict like the real file."""
    from pipeline.evaluation.fid import FID_WEIGHTS_NAME, build_inception

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / FID_WEIGHTS_NAME
    torch.save(build_inception("fid", random_init=True).state_dict(), path)
    return path


def test_fid_section_streams_moments_equal_to_the_in_memory_fid(
    ray_local, run_store, random_inception
):
    """The samples' features stream through the actor pool as per-block moments (blocks of 3 of the
    8 samples and 10 reference images) and give the FID of the features computed in one process."""
    from pipeline.data.subsets import pick_images
    from pipeline.evaluation.fid import InceptionFeatures, frechet_distance_features
    from pipeline.fanout.features import GpuUnavailableError

    weights = str(random_inception)
    out = fid_section(run_store, "e", "digits", weights, 4, max_reference=10, block_size=3)
    assert out["name"] == "FID" and out["num_reference"] == 10 and set(out["values"]) == {"ddim"}
    features = InceptionFeatures.from_file(weights, batch_size=4)
    reference, _ = pick_images(run_store, "data/digits/holdout", 10, seed=0)
    samples = read_image_shards(run_store, "samples/e/ddim")
    expected = frechet_distance_features(
        features(samples.to_tensor()), features(reference.to_tensor())
    )
    assert out["values"]["ddim"] == pytest.approx(expected, rel=1e-6)
    with pytest.raises(GpuUnavailableError, match="the Ray cluster has no GPU"):
        fid_section(run_store, "e", "digits", weights, 4, max_reference=10, use_gpu=True)


# --------------------------------------------------------------------------- membership_inference
def test_membership_inference_attacks_ddim_and_the_guided_model(digits_store, tiny_models16):
    from pipeline.core.models import load_classifier, load_denoiser, load_schedule

    members, nonmembers, *_ = attack_sets(digits_store, "digits", 4, 6, seed=0)
    unet = load_denoiser(tiny_models16 / "denoiser")
    schedule = load_schedule(tiny_models16 / "denoiser")
    clf = load_classifier(tiny_models16 / "classifier", (1, 16, 16))
    guidance = cpsample_guidance(clf, alpha=0.5, scale=50.0)
    out = membership_inference(unet, schedule, guidance, members, nonmembers, FAST)
    assert set(out) == {"reconstruction", "secmi", "pia"}
    for attack in ("reconstruction", "secmi", "pia"):
        assert set(out[attack]) == {"ddim", "cpsample"}
        for r in out[attack].values():
            assert r["num_members"] == 4 and r["num_nonmembers"] == 6
            assert 0.0 <= r["auc"] <= 1.0 and 1 / 51 <= r["p_value"] <= 1.0
            assert r["member_mean"] > 0 and r["nonmember_mean"] > 0
    rec = out["reconstruction"]
    assert rec["ddim"]["timesteps"] == [50] and rec["ddim"]["draws"] == 1
    assert out["secmi"]["ddim"]["t_sec"] == 20 and out["secmi"]["ddim"]["k"] == 10
    # guidance at alpha 0.5 fires on every image: the guided errors are not plain DDIM's
    assert rec["cpsample"]["member_mean"] != pytest.approx(rec["ddim"]["member_mean"])
    # without a guidance function only plain DDIM is attacked, with the same (seeded) numbers
    plain = membership_inference(unet, schedule, None, members, nonmembers, FAST)
    assert set(plain["reconstruction"]) == set(plain["secmi"]) == {"ddim"}
    assert plain["reconstruction"]["ddim"] == rec["ddim"]
    assert plain["secmi"]["ddim"] == out["secmi"]["ddim"]
    assert plain["pia"]["ddim"] == out["pia"]["ddim"] and set(plain["pia"]) == {"ddim"}
    assert out["pia"]["cpsample"]["member_mean"] != pytest.approx(out["pia"]["ddim"]["member_mean"])


# ----------------------------------------------------------------------------------- evaluate_run


@pytest.fixture
def run_store(digits_store, tiny_models16, tmp_path):
    """A store with digits_store's data, run "e"'s models and its ddim samples (copies of training
    images), so that the shared session store stays untouched."""
    store = open_store(str(tmp_path / "run"))
    store.put_dir(Path(digits_store.join("data", "digits")), "data", "digits")
    store.put_dir(tiny_models16 / "denoiser", "models", "e", "denoiser")
    store.put_dir(tiny_models16 / "classifier", "models", "e", "classifier")
    train = read_image_shards(store, "data/digits/train")
    _samples(store, "e", "ddim", train.images[:8], tiny_models16)
    return store


def test_evaluate_run_reports_attacks_and_roc_figures(run_store):
    report, figures = evaluate_run(run_store, "e", "digits", FAST)
    assert set(report) == {"fid", "membership_inference", "extraction", "inputs"}
    assert "skipped" in report["fid"]
    mi = report["membership_inference"]
    assert set(mi) == {"reconstruction", "secmi", "pia", "nn_distance", "cpsample_knobs", "nonmembers"}  # fmt: skip
    assert mi["nonmembers"]["num_nonmembers"] == 6
    assert set(mi["reconstruction"]) == set(mi["secmi"]) == set(mi["pia"]) == {"ddim", "cpsample"}
    assert mi["pia"]["ddim"]["t"] == 200 and mi["pia"]["ddim"]["p"] == 4.0  # EvalConfig's defaults
    # the run's ddim samples are 8 copies of training images: all extracted, no held-out image is
    ex = report["extraction"]
    assert ex["samplers"]["ddim"]["num_samples"] == 8 and ex["samplers"]["ddim"]["extracted"] == 8
    assert ex["holdout"]["extracted"] == 0 and ex["holdout"]["num_samples"] > 0
    assert set(mi["nn_distance"]) == {"ddim"}  # no cpsample samples in this run
    assert mi["nn_distance"]["ddim"]["num_generated"] == 8
    assert mi["reconstruction"]["ddim"]["num_members"] == 4
    assert mi["reconstruction"]["ddim"]["num_nonmembers"] == 6
    # no report.json yet: SamplerConfig's defaults
    assert mi["cpsample_knobs"] == {
        "alpha": 0.5,
        "scale": 5.0,
        "input_mode": "x_t",
        "guidance_t_max": 600,
    }
    assert sorted(figures) == [
        "roc_nn_distance.png", "roc_pia.png", "roc_reconstruction.png", "roc_secmi.png"
    ]  # fmt: skip
    for data in figures.values():
        assert data[:8] == PNG
        assert Image.open(io.BytesIO(data)).size[0] > 100
    json.dumps(report)


def test_a_job_opens_its_dataset_once_and_passes_it_down(run_store):
    """attack_sets fetched data/<dataset>/manifest.json for the held-out count, each pick and the
    split mean; evaluate_run once more per check. Now: once per job, none given a handle."""
    from pipeline.data.handle import open_dataset
    from pipeline.evaluation.inputs import check_run
    from tests.data.test_handle import CountingStore

    store = CountingStore(run_store.uri, run_store.fs, run_store.path)
    manifest = "data/digits/manifest.json"
    sets = attack_sets(store, "digits", 4, 6, seed=0, bits=100)
    assert store.reads.count(manifest) == 1
    assert sets.nonmember_pool["classifier_trained_fraction"] == 100 / 300  # the manifest's count
    ds = open_dataset(store, "digits")
    store.reads.clear()
    checked = check_run(store, "e", ds)
    again = attack_sets(store, ds, 4, 6, seed=0, bits=100)
    assert again.members.keys == sets.members.keys and again.nonmembers.keys == sets.nonmembers.keys
    np.testing.assert_array_equal(again.train_mean, sets.train_mean)
    assert store.reads.count(manifest) == 0 and checked["data"] == ds.digest
    train = read_image_shards(run_store, "data/digits/train")
    store.reads.clear()
    report, _ = evaluate_run(store, "e", "digits", FAST, replica_index=ExactIndex(train.images))
    assert report["threshold_free"]["holdout"]["num_images"] == 300
    assert report["membership_inference"]["nonmembers"]["num_nonmembers"] == 6
    assert store.reads.count(manifest) == 1  # evaluate_run opened it; every stage took the handle


def test_evaluate_run_takes_the_knobs_its_cpsample_samples_record(run_store, tiny_models16):
    """CPSample's knobs come from the samples' records, never from a report (jobs/sample.py never
    wrote them there: before, evaluate took a report's alpha and scale or the defaults)."""
    train = read_image_shards(run_store, "data/digits/train")
    _samples(run_store, "e", "cpsample", train.images[8:12], tiny_models16,
             alpha=0.25, scale=9.0, guidance_t_max=300)  # fmt: skip
    recorded = {"config": {"sampler": {"alpha": 0.4, "scale": 3.0}},
                "samplers": {"cpsample": {"alpha": 0.1, "num_samples": 8}}}  # fmt: skip
    write_fragment(run_store, "e", recorded, "replace")
    report, _ = evaluate_run(run_store, "e", "digits", FAST)
    knobs = report["membership_inference"]["cpsample_knobs"]
    assert knobs == {"alpha": 0.25, "scale": 9.0, "input_mode": "x_t", "guidance_t_max": 300}
    assert report["membership_inference"]["nn_distance"]["cpsample"]["num_generated"] == 4
    # the same knobs may be repeated; others would mix two settings in one report
    report, _ = evaluate_run(run_store, "e", "digits", FAST, alpha=0.25, scale=9.0)
    assert report["membership_inference"]["cpsample_knobs"]["alpha"] == 0.25
    with pytest.raises(ConfigError, match=r"--alpha 0.1: the cpsample samples were drawn with "
                       r"alpha=0.25; drop --alpha"):  # fmt: skip
        evaluate_run(run_store, "e", "digits", FAST, alpha=0.1)


def test_evaluate_run_refuses_samples_of_a_retrained_model(run_store, tiny_models16, tmp_path):
    """After retraining (the run's denoiser replaced), the old samples are stale: evaluating would
    attack the new model and score the old one's samples in one report."""
    torch.manual_seed(7)
    save_denoiser(build_unet(UNET16), tmp_path / "den2", {"unet": {}}, linear_schedule())
    run_store.delete_dir("models", "e", "denoiser")
    run_store.put_dir(tmp_path / "den2", "models", "e", "denoiser")
    with pytest.raises(StaleArtifactError, match=r"samples under .*samples/e/ddim are stale: drawn "
                       r"by other models than the ones evaluated \(changed: denoiser\)"):  # fmt: skip
        evaluate_run(run_store, "e", "digits", FAST)


def test_evaluate_run_refuses_a_dataset_the_denoiser_was_not_trained_on(run_store, digits_store):
    """The denoiser's provenance names the manifest of the data it was trained on: a wrong
    --dataset (other members, other non-members) is refused, naming both digests."""
    from pipeline.data.datasets import digits_source, split
    from pipeline.data.provenance import manifest_digest, write_provenance
    from pipeline.data.shards import read_manifest
    from pipeline.orchestration.stages import make_shards

    digest = manifest_digest(read_manifest(run_store, "data/digits"))
    local = Path(run_store.join("models", "e", "denoiser"))
    write_provenance(local, {"data": digest})  # as train_denoiser writes it
    evaluate_run(run_store, "e", "digits", FAST)  # the right dataset passes
    train, holdout = split(digits_source(16), 40, 1)
    make_shards(run_store, "other", train, holdout.subset(range(50)), shard_size=100)
    with pytest.raises(StaleArtifactError, match=r"trained on data with manifest digest "
                       rf"{digest[:19]}.*data/other has sha256:.*a wrong --dataset"):  # fmt: skip
        evaluate_run(run_store, "e", "other", FAST)


def test_evaluate_run_refuses_shards_without_provenance_or_from_two_runs(run_store, tmp_path):
    train = read_image_shards(run_store, "data/digits/train")
    _samples(run_store, "e", "cpsample", train.images[:4])  # hand-made: no records
    with pytest.raises(
        StaleArtifactError, match=r"cpsample/shard-000000.tar records no provenance"
    ):
        evaluate_run(run_store, "e", "digits", FAST)
    run_store.delete_dir("samples", "e", "cpsample")
    torch.manual_seed(8)
    other = tmp_path / "other"
    save_denoiser(build_unet(UNET16), other / "denoiser", {"unet": {}}, linear_schedule())
    save_classifier(NoiseClassifier(CLF16), other / "classifier", {})
    _samples(run_store, "x", "ddim", train.images[:8], other)
    folder = "samples/e/ddim"
    run_store.write_bytes(run_store.read_bytes("samples/x/ddim", "shard-000001.tar"), folder,
                          "shard-000001.tar")  # fmt: skip
    with pytest.raises(StaleArtifactError, match=r"ddim/shard-000001.tar was drawn from other "
                       r"inputs than shard-000000.tar \(changed: denoiser\)"):  # fmt: skip
        evaluate_run(run_store, "e", "digits", FAST)


def test_evaluate_run_reports_its_inputs(run_store, tiny_models16):
    from pipeline.data.provenance import dir_digest, manifest_digest, value_digest
    from pipeline.data.shards import read_manifest
    from pipeline.fanout.resume import first_meta

    # a build that stored no split mean: the attacks take it from one pass over the split
    sidecar = {"embedding": "centred", "kind": "flat", "build_id": "b1", "path": "indexes/b1"}
    report, _ = evaluate_run(run_store, "e", "digits", FAST, sidecar=sidecar)
    heads = [
        first_meta(run_store, "samples/e/ddim", n) for n in ("shard-000000.tar", "shard-000001.tar")
    ]
    rows = [[f"shard-00000{i}.tar", h["run_fingerprint"], 4] for i, h in enumerate(heads)]
    assert report["inputs"] == {
        "denoiser": dir_digest(tiny_models16 / "denoiser"),
        "classifier": dir_digest(tiny_models16 / "classifier"),
        "data": manifest_digest(read_manifest(run_store, "data/digits")),
        "samples": {"ddim": value_digest(rows)},
        "replica_index": {"centred/flat": value_digest(sidecar)},
        "package_version": "0.1.0",
    }


def test_the_never_seen_fraction_comes_from_the_classifiers_record(run_store):
    """The share of held-out images the classifier trained on is its own record's, not recomputed
    from the held-out split as it is now (250 of 300 would give 0.833)."""
    from pipeline.core.models import CheckpointError
    from pipeline.evaluation.evaluate import classifier_bits, run_sets

    path = ("models", "e", "classifier", "config.json")
    config = json.loads(run_store.read_bytes(*path))
    config["train"] = {"holdout_images": 250, "label_seed": 7}
    run_store.write_bytes(json.dumps(config).encode(), *path)
    with pytest.raises(CheckpointError, match=r"does not record which share .*holdout_fraction"):
        classifier_bits(run_store, "e")
    config["metrics"] = {"holdout_fraction": 0.25}
    run_store.write_bytes(json.dumps(config).encode(), *path)
    assert classifier_bits(run_store, "e") == (250, 7, 0.25)
    sets = run_sets(run_store, "e", "digits", EvalConfig(num_members=4, num_nonmembers=1000))
    assert sets.nonmember_pool["classifier_trained_fraction"] == 0.25
    from pipeline.core.labels import is_trained_holdout

    holdout = read_image_shards(run_store, "data/digits/holdout")
    never = [k for k in holdout.keys if not is_trained_holdout(k, 7, 0.25)]
    assert sets.nonmembers.keys == never


# ------------------------------------------------- member groups, threshold-free shares, the wiring
class ExactIndex:
    """A stand-in for the stored replica index: exact cosine search in the centred embedding."""

    def __init__(self, train_images: np.ndarray):
        from pipeline.fanout.index import embed_pixels

        flat = train_images.reshape(len(train_images), -1).astype(np.float32) / 255.0
        self.mean = flat.mean(0)
        self.emb = embed_pixels(train_images, self.mean)
        self.queries = 0

    def search(self, images: np.ndarray, k: int = 1):
        from pipeline.fanout.index import embed_pixels

        self.queries += len(images)
        sims = embed_pixels(images, self.mean) @ self.emb.T
        return sims.max(1), sims.argmax(1)


def test_threshold_free_section_uses_held_out_similarities_as_the_reference(run_store):
    from pipeline.evaluation.evaluate import holdout_similarities, threshold_free_section
    from pipeline.evaluation.shares import holdout_percentiles

    train = read_image_shards(run_store, "data/digits/train")
    index = ExactIndex(train.images)
    sims = holdout_similarities(run_store, "digits", index, 50, seed=1)
    assert sims.shape == (50,) and index.queries == 50 and np.all(sims < 0.999)
    again = holdout_similarities(run_store, "digits", index, 50, seed=1)
    np.testing.assert_array_equal(sims, again)  # a seeded subset
    section = threshold_free_section(run_store, "e", "digits", index, 50, seed=1)
    pct = holdout_percentiles(sims)
    assert section["holdout"] == {**pct, "num_images": 50, "seed": 1}
    # run e's ddim samples are 8 training images: all above both percentiles
    assert section["samplers"] == {
        "ddim": {"num_samples": 8, "above_holdout_p95": 1.0, "above_holdout_p99": 1.0}
    }
    # given held-out similarities are used as they are
    forced = threshold_free_section(run_store, "e", "digits", index, holdout_sims=np.full(9, 2.0))
    assert forced["holdout"]["num_images"] == 9
    assert forced["samplers"]["ddim"]["above_holdout_p99"] == 0.0


def test_evaluate_run_adds_the_threshold_free_section_and_group_aucs(run_store):
    train = read_image_shards(run_store, "data/digits/train")
    report, _ = evaluate_run(
        run_store, "e", "digits", FAST, replica_index=ExactIndex(train.images), max_holdout=40,
        member_groups={"copied": set(train.keys[:8])},
    )  # fmt: skip
    tf = report["threshold_free"]
    assert tf["holdout"]["num_images"] == 40 and tf["holdout"]["seed"] == FAST.seed
    assert tf["samplers"]["ddim"]["above_holdout_p99"] == 1.0
    groups = report["membership_inference"]["nn_distance"]["ddim"]["groups"]
    members = run_sets(run_store, "e", "digits", FAST).members.keys  # the same seeded draw
    copied = len(set(members) & set(train.keys[:8]))
    assert set(groups) == {"copied"} and groups["copied"]["num_members"] == copied
    json.dumps(report)


def test_sweep_and_attack_draws_the_attack_sets_once_and_threads_them(run_store, monkeypatch):
    """The wiring alone (Tune and the model attacks replaced): one draw of the attack sets feeds
    the sweep's sample-only attack and the membership attacks."""
    import pipeline.evaluation.evaluate as ev
    import pipeline.evaluation.sweep as sw
    from pipeline.core.config import ReplicaConfig, SamplerConfig
    from pipeline.evaluation.mia import SampleOnlyAttack

    calls = {"sets": 0}
    real_attack_sets = ev.attack_sets

    def counting_attack_sets(*args, **kwargs):
        calls["sets"] += 1
        return real_attack_sets(*args, **kwargs)

    def fake_sweep(store, run, dataset, points, num_samples, seed, evaluator, target_rate,
                   sampler, replicas, include_ddim, **kw):  # fmt: skip
        calls["sweep"] = kw
        row = {"index": 0, "label": "a=0.5 s=3", "sampler": "cpsample", "alpha": 0.5,
               "scale": 3.0, "replication_rate": 0.0, "mean_nn_similarity": 0.5,
               "guidance_fired_fraction": 0.5, "quality": {"fd": 2.0},
               "above_holdout_p99": 0.2, **kw["attack"].aucs(sets_seen["members"])}  # fmt: skip
        return sw.summarise([row], target_rate, kw["target_above_p99"])

    def fake_attacks(
        store, run, dataset, sampler, cfg, member_groups=None, sets=None, checked=None
    ):
        calls["attacks"] = {"groups": member_groups, "sets": sets, "checked": checked}
        return {}

    import pipeline.fanout.replica_index as ri

    sidecar = {"embedding": "centred", "kind": "flat", "build_id": "b"}
    monkeypatch.setattr(ri, "ensure_replica_index", lambda *a, **k: sidecar)

    sets_seen = {}
    monkeypatch.setattr(ev, "attack_sets", counting_attack_sets)
    monkeypatch.setattr(sw, "run_sweep", fake_sweep)
    monkeypatch.setattr(ev, "run_attacks", fake_attacks)
    train = read_image_shards(run_store, "data/digits/train")
    members = ev.run_sets(run_store, "e", "digits", EvalConfig(num_members=4, num_nonmembers=6))
    sets_seen["members"] = members.members.images
    calls["sets"] = 0
    groups = {"dup": set(members.members.keys[:2])}
    extra = {"index": 0, "label": "ddim", "sampler": "ddim", "alpha": None, "scale": 0.0,
             "replication_rate": 0.3, "mean_nn_similarity": 0.9, "guidance_fired_fraction": 0.0,
             "quality": {"fd": 1.0}, "source": "main"}  # fmt: skip
    out, figures = ev.sweep_and_attack(
        run_store, "e", "digits", SamplerConfig(), ReplicaConfig(), num_members=4,
        num_nonmembers=6, extra_rows=[extra], holdout_sims=np.linspace(0, 1, 11),
        member_groups=groups, target_above_p99=0.25, extra_pixels={"ddim": train.images[:3]},
    )  # fmt: skip
    assert calls["sets"] == 1  # drawn once for the sweep and the attacks
    kw = calls["sweep"]
    assert isinstance(kw["attack"], SampleOnlyAttack) and kw["target_above_p99"] == 0.25
    assert kw["attack"].describe()["groups"] == {"dup": 2}
    np.testing.assert_array_equal(kw["holdout_sims"], np.linspace(0, 1, 11))
    assert calls["attacks"]["groups"] == groups
    assert calls["attacks"]["sets"].members.keys == members.members.keys
    # the run's samples were checked once, and the inputs go into the demo's report
    assert set(calls["attacks"]["checked"]["samples"]) == {"ddim"}
    assert out["inputs"]["samples"] == {
        "ddim": calls["attacks"]["checked"]["samples"]["ddim"]["fingerprint"]
    }
    assert out["inputs"]["replica_index"] == {"centred/flat": value_digest(sidecar)}
    # Carlini et al.'s criterion on the run's samples (8 copies of training images)
    assert out["extraction"]["samplers"]["ddim"]["extracted"] == 8
    rows = {p["label"]: p for p in out["sweep"]["points"]}
    assert rows["a=0.5 s=3"]["mia_auc"] == 1.0 and rows["a=0.5 s=3"]["mia_auc_dup"] == 1.0
    # the extra row, scored on its pixels by the same attack
    assert rows["ddim"]["mia_auc"] == kw["attack"].aucs(train.images[:3])["mia_auc"]
    assert "mia_auc" not in extra  # the caller's row is left alone
    assert out["sweep"]["target_above_p99"] == 0.25
    assert out["sweep"]["recommended"]["label"] == "a=0.5 s=3"  # 0.2 <= 0.25
    assert figures["pareto.png"][:8] == PNG


def test_evaluate_job_after_retraining_exits_2_naming_the_stale_samples(run_store, tmp_path):
    """jobs/evaluate.py on a run whose denoiser was retrained since its samples were drawn: exit 2,
    one line naming the samples, and the report is left as it was (before, it attacked the new
    model and scored the old model's samples in one report)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, str(root / "jobs" / "evaluate.py"), "--store", run_store.uri,
           "--run", "e", "--no-shares", "--num-members", "4", "--num-nonmembers", "6",
           "--draws", "1"]  # fmt: skip
    from pipeline.evaluation.report import merge_report

    updates, figures = evaluate_run(run_store, "e", "digits", FAST)  # what the job merges
    merge_report(run_store, "e", updates, figures, inputs=updates.pop("inputs"))
    report = json.loads(run_store.read_bytes("reports", "e", "report.json"))
    assert set(report["inputs"]["samples"]) == {"ddim"}
    torch.manual_seed(9)  # retrain: another denoiser under models/e
    save_denoiser(build_unet(UNET16), tmp_path / "den2", {"unet": {}}, linear_schedule())
    run_store.delete_dir("models", "e", "denoiser")
    run_store.put_dir(tmp_path / "den2", "models", "e", "denoiser")
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert "samples/e/ddim are stale" in lines[0] and "(changed: denoiser)" in lines[0]
    assert json.loads(run_store.read_bytes("reports", "e", "report.json")) == report


def test_evaluate_job_with_use_gpu_on_a_cluster_without_gpus_exits_2(run_store):
    """--use-gpu asks one GPU per feature actor: on a cluster with none, exit 2 naming it, before
    any work (no report)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, str(root / "jobs" / "evaluate.py"), "--store", run_store.uri,
           "--run", "e", "--no-shares", "--use-gpu"]  # fmt: skip
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "--use-gpu: the Ray cluster has no GPU" in lines[0]
    assert not run_store.exists("reports", "e", "report.json")
