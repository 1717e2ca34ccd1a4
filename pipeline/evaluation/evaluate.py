"""A run's evaluation (``jobs/evaluate.py``, the demo): membership attacks, FID, threshold-free
replication shares, and the sweep with attacks.

Reads the run's data and sample shards from the store, loads its models, and returns report sections.
``dataset`` is a name or a :class:`pipeline.data.handle.DatasetHandle`: a job opens its dataset once
and passes the handle down, so no stage fetches ``manifest.json`` again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
from tqdm.auto import tqdm

from pipeline.core.labels import holdout_fraction, is_trained_holdout
from pipeline.data.handle import DatasetHandle, as_handle
from pipeline.data.imageset import DataError, ImageSet
from pipeline.data.subsets import iter_shards, pick_images, split_mean
from pipeline.evaluation.domain import DomainEvaluator
from pipeline.evaluation.extraction import extraction_section
from pipeline.evaluation.inputs import classifier_bits, sampler_folders, sampler_knobs
from pipeline.evaluation.nn_attack import MemberGroups, nn_attack
from pipeline.evaluation.shares import holdout_percentiles, streamed_shares

DEFAULT_MAX_HOLDOUT = 2000  # held-out images whose nearest-neighbour similarities set p95 / p99
SEARCH_CHUNK = 4096


class AttackSets(NamedTuple):
    """The images a membership attack scores: ``members`` and ``nonmembers`` (ImageSets), the training
    split's mean image (``train_mean``: flattened, in [0, 1], the centring of the nearest-sample
    attack) and where the non-members come from (``nonmember_pool``)."""

    members: ImageSet
    nonmembers: ImageSet
    train_mean: np.ndarray
    nonmember_pool: dict[str, Any]


def attack_sets(
    store,
    dataset: str | DatasetHandle,
    num_members: int,
    num_nonmembers: int,
    seed: int = 0,
    bits: int = 0,
    label_seed: int = 0,
    fraction: float | None = None,
    mean: np.ndarray | None = None,
) -> AttackSets:
    """A seeded uniform subset of the denoiser's training images (members) and of the held-out images
    that no model has seen (non-members), read shard by shard (:func:`pipeline.data.subsets.pick_images`:
    only the shards holding picked rows, never a whole split).

    The classifier trained on about ``bits`` held-out images, chosen by a keyed hash of their keys
    (:func:`pipeline.core.labels.is_trained_holdout` with ``label_seed`` and ``fraction``, the share
    the classifier records: :func:`classifier_bits`), so those are never non-members. ``fraction``
    None: computed from ``bits`` and the held-out count, as the classifier's workers did. ``mean``:
    the split mean the index build stored (``sidecar_mean``); None: one pass over the split."""
    ds = as_handle(store, dataset)
    train_folder, holdout_folder, m = ds.split("train"), ds.split("holdout"), ds.manifest
    if fraction is None:  # no manifest: no count, as the classifier's workers saw it
        fraction = holdout_fraction(bits, ds.count("holdout") or 0)

    def never_seen(key: str) -> bool:
        return not is_trained_holdout(key, label_seed, fraction)

    members, _ = pick_images(store, train_folder, num_members, seed, manifest=m)
    try:
        nonmembers, info = pick_images(store, holdout_folder, num_nonmembers, seed + 1, never_seen, manifest=m)  # fmt: skip
    except DataError as exc:  # every held-out image got bits: none is a non-member
        raise DataError(f"{exc}: the classifier trained on about {bits} held-out images (fraction {fraction:.3g}), so none is a never-seen non-member; retrain it with a lower --holdout-images or use a larger held-out split") from None  # fmt: skip
    pool = {
        "source": "held-out images no model has seen",
        "num_holdout": info["num_images"],
        "classifier_trained_fraction": fraction,
        "num_candidates": info["num_candidates"],
        "num_never_seen_candidates": info["num_kept_candidates"],
        "num_nonmembers": len(nonmembers),
    }
    mean = mean if mean is not None else split_mean(store, train_folder, m)
    return AttackSets(members, nonmembers, mean, pool)


def membership_inference(unet, schedule, guidance, members, nonmembers, cfg) -> dict:
    """Attack 1 (reconstruction loss), attack 2 (SecMI t-error) and PIA (Kong et al. 2024,
    :mod:`pipeline.evaluation.pia`) against plain DDIM (``ddim``) and the classifier-corrected noise
    estimate (``cpsample``). ``cfg`` is an ``EvalConfig``."""
    from pipeline.evaluation.mia import reconstruction_attack, secmi_attack
    from pipeline.evaluation.pia import pia_attack

    xm, xn = members.to_tensor(), nonmembers.to_tensor()
    models = {"ddim": None, "cpsample": guidance}
    rec, sec, pia = {}, {}, {}
    for name, g in tqdm(models.items(), desc="membership attacks", leave=False):
        if name == "cpsample" and g is None:
            continue
        rec[name] = reconstruction_attack(
            unet, schedule, xm, xn, g, cfg.timesteps, cfg.draws, cfg.seed, cfg.num_permutations
        )
        sec[name] = secmi_attack(
            unet, schedule, xm, xn, g, cfg.secmi_t, cfg.secmi_k, cfg.seed, cfg.num_permutations
        )
        pia[name] = pia_attack(unet, schedule, xm, xn, g, cfg.pia_t, cfg.pia_p, cfg.seed, cfg.num_permutations)  # fmt: skip
    return {"reconstruction": rec, "secmi": sec, "pia": pia}


def sample_only_attack(sets: AttackSets, member_groups: MemberGroups | None = None):
    """The nearest-generated-sample attack of :func:`attack_sets`' images, ready to score any set of
    samples (:class:`pipeline.evaluation.mia.SampleOnlyAttack`; ``member_groups`` by member key)."""
    from pipeline.evaluation.mia import SampleOnlyAttack, group_masks

    return SampleOnlyAttack(
        sets.members.images, sets.nonmembers.images, np.asarray(sets.train_mean, np.float32),
        group_masks(sets.members.keys, member_groups) or None,
    )  # fmt: skip


def search_similarities(index, images: np.ndarray, chunk: int = SEARCH_CHUNK) -> np.ndarray:
    """Nearest-training-image similarity (N,) of uint8 (N, H, W, C) images: ``index`` is the stored
    replica index (:class:`pipeline.fanout.replica_index.LazyReplicaIndex` or ``ReplicaIndex``: its
    embedding and its search), queried ``chunk`` images at a time."""
    parts = [
        np.asarray(index.search(images[lo : lo + chunk])[0], dtype=np.float64).reshape(-1)
        for lo in range(0, len(images), chunk)
    ]
    return np.concatenate(parts) if parts else np.zeros(0)


def holdout_similarities(
    store, dataset: str | DatasetHandle, index, max_images: int = DEFAULT_MAX_HOLDOUT, seed: int = 0
) -> np.ndarray:
    """The held-out real images' nearest-training similarities (the reference of the threshold-free
    shares, :mod:`pipeline.evaluation.shares`): a seeded uniform subset of at most ``max_images``
    held-out images (:func:`pipeline.data.subsets.pick_images`, shard by shard) searched in
    ``index``. No model trains the denoiser on held-out images, so all of them qualify."""
    ds = as_handle(store, dataset)
    images, _ = pick_images(store, ds.split("holdout"), max_images, seed, manifest=ds.manifest)
    return search_similarities(index, images.images)


def threshold_free_section(
    store,
    run: str,
    dataset: str | DatasetHandle,
    index,
    max_holdout: int = DEFAULT_MAX_HOLDOUT,
    seed: int = 0,
    holdout_sims: np.ndarray | None = None,
) -> dict[str, Any]:
    """The report's ``threshold_free`` section: the held-out p95 / p99 of nearest-training similarity
    (``holdout``; from ``holdout_sims`` when given, else :func:`holdout_similarities`) and, per
    sampler with shards under ``samples/<run>/``, the share of its samples above each (held-out real
    images: 5% and 1% by construction), folded from per-shard counts (one shard in memory)."""
    if holdout_sims is None:
        holdout_sims = holdout_similarities(store, dataset, index, max_holdout, seed)
    pct = holdout_percentiles(holdout_sims)
    out: dict[str, Any] = {
        "holdout": {**pct, "num_images": int(np.asarray(holdout_sims).size), "seed": seed},
        "samplers": {},
    }
    for name, folder in sampler_folders(store, run).items():
        sims = (search_similarities(index, sh.images) for sh in iter_shards(store, folder))
        out["samplers"][name] = streamed_shares(sims, pct)  # one shard in memory at a time
    return out


def fid_section(
    store,
    run: str,
    dataset: str | DatasetHandle,
    weights: str | None,
    batch_size: int = 32,
    max_reference: int = 10_000,
    use_gpu: bool = False,
    actors: int = 1,
    block_size: int = 256,
) -> dict:
    """FID of each sampler's samples against the held-out real images (a seeded subset of at most
    ``max_reference`` of them, read shard by shard), or why it was skipped.

    Streamed (:mod:`pipeline.fanout.features`): ``actors`` feature actors (one GPU each with
    ``use_gpu``) load the Inception once and return, per ``block_size`` images, only their partial
    moments, which are folded here (:mod:`pipeline.evaluation.moments`); ``batch_size`` images go
    through the network at a time. The driver holds moments, never the samples' features."""
    import functools
    from pathlib import Path

    from pipeline.evaluation.fid import inception_embedder, load_inception
    from pipeline.evaluation.moments import Moments, fold, frechet_distance_moments
    from pipeline.fanout.features import array_moments, require_gpus, shard_moments

    if weights is None:
        return {"skipped": "no --inception-weights file given (offline: each sampler's `quality`)"}
    require_gpus(use_gpu)
    _, name = load_inception(weights)  # a clear error before any work
    data = Path(weights).read_bytes()  # shipped once to the actors: nodes need not have the file
    make = functools.partial(inception_embedder, weights, batch_size, data=data)
    stream = {"actors": actors, "use_gpu": use_gpu, "batch_size": block_size}
    ds = as_handle(store, dataset)
    reference, _ = pick_images(store, ds.split("holdout"), max_reference, 0, manifest=ds.manifest)
    ref = fold(Moments.from_partial(p) for p in array_moments(reference.images, make, **stream))
    values = {}
    for sampler, folder in sampler_folders(store, run).items():
        parts = shard_moments(store, folder, make, **stream)
        values[sampler] = frechet_distance_moments(fold(map(Moments.from_partial, parts)), ref)
    return {"name": name, "reference": "held-out real images",
            "num_reference": len(reference), "values": values}  # fmt: skip


def evaluate_run(
    store,
    run: str,
    dataset: str | DatasetHandle,
    cfg,
    inception_weights: str | None = None,
    alpha: float | None = None,
    scale: float | None = None,
    replica_index=None,
    member_groups: MemberGroups | None = None,
    max_holdout: int = DEFAULT_MAX_HOLDOUT,
    sidecar: dict[str, Any] | None = None,
    checked: dict[str, Any] | None = None,
    use_gpu: bool = False,
    feature_actors: int = 1,
) -> tuple[dict, dict[str, bytes]]:
    """FID and the membership attacks for a run's models and samples: (report keys, figures).

    First the inputs are checked (:func:`pipeline.evaluation.inputs.check_run`): the samples of
    every sampler were drawn by ``models/<run>/``, which were trained on ``data/<dataset>``; else
    :class:`pipeline.data.provenance.StaleArtifactError`. CPSample's knobs are the ones its samples
    record (``sampler_settings``; :func:`sampler_knobs`), never a report's; ``alpha``/``scale`` may
    only repeat them (or set them when there are no CPSample samples).

    With ``replica_index`` (the stored replica index, anything with ``search(images)``; its
    ``sidecar`` goes into ``inputs``) the report also gets ``threshold_free``
    (:func:`threshold_free_section`, at most ``max_holdout`` held-out images seeded by ``cfg.seed``).
    ``member_groups`` adds per-group AUCs to the nearest-sample attack. ``extraction``: Carlini et
    al.'s criterion per sampler (:func:`pipeline.evaluation.extraction.extraction_section`, held-out
    baseline as above). The report keys include
    ``inputs`` (:func:`pipeline.evaluation.inputs.run_inputs`); ``checked``: ``check_run``'s result
    when the caller already checked. FID's features come from ``feature_actors`` Ray actors, one GPU
    each with ``use_gpu`` (:func:`fid_section`).
    """
    from pipeline.evaluation.inputs import check_run, run_inputs

    ds = as_handle(store, dataset)  # the dataset opened once (or by the caller), passed down
    checked = checked if checked is not None else check_run(store, run, ds)
    sampler = sampler_knobs(checked["samples"], alpha, scale)
    fid = fid_section(
        store, run, ds, inception_weights, cfg.fid_batch_size, use_gpu=use_gpu,
        actors=feature_actors,
    )  # fmt: skip
    sets = None
    if sidecar is not None:  # the split mean the index build stored: no pass over the split
        from pipeline.fanout.replica_store import sidecar_mean

        if (mean := sidecar_mean(store, sidecar)) is not None:
            sets = run_sets(store, run, ds, cfg, mean)
    mi = run_attacks(store, run, ds, sampler, cfg, member_groups, sets, checked=checked)
    mi["cpsample_knobs"] = {"alpha": sampler.alpha, "scale": sampler.scale,
                            "input_mode": sampler.input_mode, "guidance_t_max": sampler.guidance_t_max}  # fmt: skip
    out = {"fid": fid, "membership_inference": mi}
    if replica_index is not None:
        out["threshold_free"] = threshold_free_section(
            store, run, ds, replica_index, max_holdout, cfg.seed
        )
    out["extraction"] = extraction_section(store, run, ds, max_holdout, cfg.seed)
    out["inputs"] = run_inputs(checked["models"], checked["data"], checked["samples"], sidecar)
    return out, attack_figures(mi)


def run_sets(store, run: str, dataset: str | DatasetHandle, cfg, mean=None) -> AttackSets:
    """:func:`attack_sets` for a run: ``cfg``'s sizes and seed, the run's classifier's held-out roles
    (``mean``: the stored split mean, when known)."""
    bits, label_seed, fraction = classifier_bits(store, run)
    return attack_sets(
        store, dataset, cfg.num_members, cfg.num_nonmembers, cfg.seed, bits, label_seed, fraction,
        mean,
    )  # fmt: skip


def run_attacks(
    store,
    run: str,
    dataset: str | DatasetHandle,
    sampler,
    cfg,
    member_groups: MemberGroups | None = None,
    sets: AttackSets | None = None,
    checked: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The three membership attacks on a run (``cfg``: an ``EvalConfig``), each against plain DDIM
    and CPSample (``sampler``: the CPSample knobs): reconstruction loss and SecMI on the run's models,
    the nearest generated sample on its sample shards (per member group too, ``member_groups``:
    name -> member keys). Non-members are never-seen held-out images (:func:`attack_sets`, or
    ``sets`` when already drawn: :func:`run_sets`); the section says how many.

    The samples are checked against the models first (``checked``: when
    :func:`pipeline.evaluation.inputs.check_run` already ran): never attack new models and score
    old models' samples in one section. The attacks measure whatever classifier the run has, so a
    classifier below ``min_fit`` is attacked too (``allow_unfit``)."""
    import tempfile

    from pipeline.data.checkpoints import load_models
    from pipeline.evaluation.inputs import check_run

    ds = as_handle(store, dataset)
    if checked is None:
        check_run(store, run, ds)
    sets = sets if sets is not None else run_sets(store, run, ds, cfg)
    sampler = dataclasses.replace(sampler, allow_unfit=True)
    with tempfile.TemporaryDirectory() as tmp:
        unet, schedule, _, guidance = load_models(
            store, f"models/{run}/denoiser", f"models/{run}/classifier", sampler, "cpu", tmp
        )
    mi = membership_inference(unet, schedule, guidance, sets.members, sets.nonmembers, cfg)
    mi["nn_distance"] = nn_attack(
        store, run, sets.members, sets.nonmembers, sets.train_mean, cfg, member_groups
    )
    mi["nonmembers"] = sets.nonmember_pool
    return mi


def attack_figures(mi: dict[str, Any]) -> dict[str, bytes]:
    """One ROC figure per attack that ran (``roc_<attack>.png``)."""
    from pipeline.evaluation.report import roc_figure

    return {
        f"roc_{attack}.png": roc_figure(mi[attack], f"membership inference: {attack}")
        for attack in ("reconstruction", "secmi", "pia", "nn_distance")
        if mi.get(attack)
    }


def sweep_and_attack(
    store, run: str, dataset: str | DatasetHandle, sampler, replicas,
    evaluator: DomainEvaluator | None = None, seed: int = 0,
    points=((0.5, 3.0), (0.5, 5.0), (0.5, 7.0)), num_samples: int = 256,
    target_rate: float = 0.02, num_members: int = 64, num_nonmembers: int = 256,
    include_ddim: bool = True, extra_rows: list[dict] | None = None, holdout_sims=None,
    member_groups: MemberGroups | None = None, target_above_p99: float = 0.05,
    extra_pixels: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict, dict[str, bytes]]:  # fmt: skip
    """The demo's privacy block: the (alpha, s) sweep (Ray Tune) and the three membership attacks
    (:func:`run_attacks`) for DDIM and CPSample on this run.

    ``extra_rows``: sweep rows scored elsewhere (:func:`pipeline.evaluation.sweep.score_point`), added to the
    sweep's own points; the demo passes its main DDIM and CPSample runs so Tune samples only the rest.
    Pass them scored with the same ``holdout_sims`` (``score_point(..., holdout_sims=...)``) so they
    carry the threshold-free shares; ``extra_pixels`` (row label -> the uint8 images the row was
    scored on) gives them the sample-only attack's AUCs too.

    The attack sets (:func:`attack_sets`) are drawn once: the nearest-sample attack of every sweep
    row (``mia_auc``, ``mia_auc_<group>``) and the membership attacks use the same members and
    non-members. ``holdout_sims``: the held-out images' nearest-training similarities (or their
    percentiles), for the rows' threshold-free shares and the choice's p99 rule
    (``target_above_p99``); ``member_groups``: name -> member keys, for per-group AUCs.

    ``sampler``/``replicas`` are the run's ``SamplerConfig``/``ReplicaConfig``; returns the report keys
    ``sweep``, ``membership_inference``, ``extraction`` (Carlini et al.'s criterion) and ``inputs`` (the run's checked models, data, samples and
    the index: :func:`pipeline.evaluation.inputs.run_inputs`) and the figures ``pareto.png`` and
    ``roc_<attack>.png``
    (pass both to :func:`pipeline.evaluation.report.merge_report`, or into the report and ``write_report``).
    """
    from pipeline.core.config import EvalConfig
    from pipeline.evaluation.inputs import check_run, run_inputs
    from pipeline.evaluation.report import pareto_figure
    from pipeline.evaluation.sweep import merge_points, run_sweep
    from pipeline.fanout.replica_index import ensure_replica_index

    ds = as_handle(store, dataset)  # opened once, passed down
    checked = check_run(store, run, ds)  # the stored samples the attacks read are the run's
    cfg = EvalConfig(num_members=num_members, num_nonmembers=num_nonmembers, seed=seed)
    sets = run_sets(store, run, ds, cfg)
    attack = sample_only_attack(sets, member_groups)
    sweep = run_sweep(
        store, run, ds, points, num_samples, seed, evaluator, target_rate, sampler, replicas,
        include_ddim, write_figure=False, holdout_sims=holdout_sims, attack=attack,
        target_above_p99=target_above_p99,
    )  # fmt: skip
    if extra_rows:
        extra = [dict(r) for r in extra_rows]
        for row in extra:
            pixels = (extra_pixels or {}).get(row["label"])
            if pixels is not None and "mia_auc" not in row:
                row.update(attack.aucs(np.asarray(pixels)))
        sweep = merge_points(sweep, extra, target_rate, target_above_p99)
    mi = run_attacks(
        store, run, ds, dataclasses.replace(sampler, sampler="cpsample"), cfg, member_groups,
        sets, checked,
    )  # fmt: skip
    mi["cpsample_knobs"] = {"alpha": sampler.alpha, "scale": sampler.scale}
    figures = {"pareto.png": pareto_figure(sweep), **attack_figures(mi)}
    sidecar = ensure_replica_index(store, ds.dataset, replicas)  # the one the sweep loaded
    inputs = run_inputs(checked["models"], checked["data"], checked["samples"], sidecar)
    extraction = extraction_section(store, run, ds, seed=seed)  # Carlini et al.'s criterion
    return {"sweep": sweep, "membership_inference": mi, "extraction": extraction, "inputs": inputs}, figures  # fmt: skip
