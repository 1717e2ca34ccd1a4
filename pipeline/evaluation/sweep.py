"""The protection/quality trade-off: sample at several (alpha, s), check replicas, measure quality.

The maths of one point (:func:`evaluate_point`) and of the choice (:func:`pareto_front`,
:func:`recommend`) are Ray-free. :func:`run_sweep` fans the points out as Ray Tune trials
(``tune.grid_search`` over the points, 1 CPU per trial): each trial loads the tiny models once and
samples in process with :func:`pipeline.core.sampler.sample`, with the same seeds at every point.

Quality (lower is better; the choice uses the first of :data:`QUALITY_KEYS` every point carries):
``fd``, the domain CNN's Fréchet distance (the digits, or an image folder's label subfolders);
``fd_encoder``, an image folder's held-out-trained autoencoder's
(:mod:`pipeline.evaluation.folder_quality`); else ``fd_pixels``, the Fréchet distance
(Heusel et al. 2017, eq. 6) between samples and held-out real images in raw pixel space.

Privacy has up to three axes per point: the replication rate (share at or above the replica
threshold), the threshold-free shares (:mod:`pipeline.evaluation.shares`: samples above the held-out
real images' p95 / p99 nearest-neighbour similarity, when held-out similarities are given) and the
AUC of the sample-only membership attack (:class:`pipeline.evaluation.mia.SampleOnlyAttack`, when an
attack is given), overall and per member group.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.config import ReplicaConfig, SamplerConfig
from pipeline.core.guidance import cpsample_guidance, validate_knobs
from pipeline.core.sampler import derive_seed, sample, unet_denoiser
from pipeline.data.handle import DatasetHandle, as_handle
from pipeline.data.imageset import images_from_tensor
from pipeline.evaluation.fid import frechet_distance_features
from pipeline.evaluation.shares import SHARE_PREFIX, as_percentiles, threshold_free_shares
from pipeline.fanout.index import build_index, l2_normalise, nearest, replica_stats

PARETO_FIGURE = "pareto.png"
DEFAULT_TARGET_ABOVE_P99 = 0.05
# the quality measures the choice may use, in order of preference (lower is better)
QUALITY_KEYS = ("fd", "fd_encoder", "fd_pixels")
# the optional per-row privacy keys: threshold-free shares and the sample-only attack's AUCs
OPTIONAL_ROW_PREFIXES = ("holdout_p", SHARE_PREFIX, "mia_auc")


def point_label(point: dict[str, Any]) -> str:
    if point.get("sampler") == "ddim":
        return "ddim"
    return f"a={point['alpha']:g} s={point['scale']:g}"


def make_points(
    pairs: Sequence[tuple[float, float]], include_ddim: bool = True
) -> list[dict[str, Any]]:
    """Sweep points from (alpha, s) pairs (validated), plus the unprotected DDIM reference."""
    points = [{"sampler": "ddim", "alpha": None, "scale": 0.0}] if include_ddim else []
    for alpha, scale in pairs:
        validate_knobs(float(alpha), float(scale))
        points.append({"sampler": "cpsample", "alpha": float(alpha), "scale": float(scale)})
    if not points:
        raise ValueError("the sweep needs at least one (alpha, s) point")
    for i, p in enumerate(points):
        p.update(index=i, label=point_label(p))
    return points


def quality_of(images: torch.Tensor, evaluator=None, reference: torch.Tensor | None = None):
    """``evaluator.quality`` (``fd``, ``confident_fraction``, ``fd_encoder``) or ``fd_pixels``."""
    if evaluator is not None:
        return evaluator.quality(images)
    if reference is None:
        return {}
    flat = images.flatten(1).double().numpy()
    return {"fd_pixels": frechet_distance_features(flat, reference.flatten(1).double().numpy())}


def evaluate_point(
    unet,
    schedule,
    classifier,
    point: dict[str, Any],
    sampler: SamplerConfig,
    num_samples: int,
    seed: int,
    train_embeddings: np.ndarray,
    train_mean: np.ndarray | None,
    threshold: float,
    evaluator=None,
    reference: torch.Tensor | None = None,
    holdout_sims=None,
    attack=None,
) -> dict[str, Any]:
    """Sample ``num_samples`` at one point (seeds from ``seed`` alone), then replication rate against
    the training embeddings, quality and, when given, the threshold-free shares and the sample-only
    attack's AUCs (:func:`score_point`). Ray-free."""
    t0 = time.perf_counter()
    guidance = None
    if point["sampler"] == "cpsample":
        guidance = cpsample_guidance(
            classifier, point["alpha"], point["scale"], sampler.input_mode, sampler.guidance_t_max
        )
    seeds = [derive_seed("sweep", seed, i) for i in range(num_samples)]
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    images, fired = [], []
    for lo in range(0, num_samples, sampler.batch_size):
        out = sample(
            unet_denoiser(unet, schedule), schedule, seeds[lo : lo + sampler.batch_size], shape,
            sampler.steps, sampler.eta, guidance, sampler.clip_sample,
        )  # fmt: skip
        images.append(out.images)
        fired.append(out.fired_fraction)
    pixels = images_from_tensor(torch.cat(images))  # uint8, as the samples would be stored
    return score_point(
        point, pixels, float(torch.cat(fired).mean()), train_embeddings, train_mean, threshold,
        evaluator, reference, time.perf_counter() - t0, holdout_sims, attack,
    )  # fmt: skip


def score_point(
    point: dict[str, Any],
    pixels: np.ndarray,
    fired_fraction: float,
    train_embeddings: np.ndarray,
    train_mean: np.ndarray | None,
    threshold: float,
    evaluator=None,
    reference: torch.Tensor | None = None,
    time_s: float = 0.0,
    holdout_sims=None,
    attack=None,
) -> dict[str, Any]:
    """A sweep row for images already drawn at ``point``: ``pixels`` (N, H, W, C) uint8 as stored;
    replication rate against the training embeddings (exact inner-product search) and quality.

    ``holdout_sims``: the held-out real images' nearest-training similarities (same embedding), or
    their :func:`pipeline.evaluation.shares.holdout_percentiles`; the row then carries
    ``holdout_p95/p99`` and ``above_holdout_p95/p99`` (share of samples strictly above; held-out real
    images: 5% / 1%). ``attack``: a :class:`pipeline.evaluation.mia.SampleOnlyAttack`; the row then
    carries ``mia_auc`` (members vs never-seen non-members, scored by their similarity to the nearest
    of these samples) and ``mia_auc_<group>`` per member group."""
    if hasattr(train_embeddings, "search"):  # the stored replica index (loaded by the trial)
        nn_sims, _ = train_embeddings.search(pixels)
    else:
        flat = pixels.reshape(len(pixels), -1).astype(np.float32) / 255.0
        emb = l2_normalise(flat - train_mean if train_mean is not None else flat)
        sims, _ = nearest(build_index(train_embeddings), emb, k=1)
        nn_sims = sims[:, 0]
    stats = replica_stats(nn_sims, threshold)
    quantised = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    row = {
        **{k: point[k] for k in ("index", "label", "sampler", "alpha", "scale")},
        **stats.to_dict(),
        "guidance_fired_fraction": fired_fraction,
        "quality": quality_of(quantised, evaluator, reference),
        "time_s": round(time_s, 2),
    }
    if holdout_sims is not None:
        row.update(threshold_free_shares(nn_sims, as_percentiles(holdout_sims)))
    if attack is not None:
        row.update(attack.aucs(pixels))
    return row


def merge_points(
    sweep: dict[str, Any],
    extra: list[dict[str, Any]],
    target_rate: float,
    target_above_p99: float = DEFAULT_TARGET_ABOVE_P99,
) -> dict[str, Any]:
    """The ``sweep`` section with rows scored elsewhere (for example the demo's main DDIM and CPSample
    runs) added: rows re-indexed as DDIM first, then by (alpha, s); front and choice recomputed."""
    rows = sorted(
        [*sweep["points"], *extra],
        key=lambda r: (r["sampler"] != "ddim", r["alpha"] or 0.0, r["scale"]),
    )
    for i, r in enumerate(rows):
        r["index"] = i
    details = {
        k: v
        for k, v in sweep.items()
        if k not in ("points", "pareto_front", "recommended", "figure", "target_rate",
                     "target_above_p99", "quality_metric")
    }  # fmt: skip
    return summarise(rows, target_rate, target_above_p99, **details)


def quality_key(points: list[dict[str, Any]]) -> str | None:
    """The quality metric the points share, lower is better: the first of :data:`QUALITY_KEYS`."""
    for key in QUALITY_KEYS:
        if all(key in p["quality"] for p in points):
            return key
    return None


def pareto_front(points: list[dict[str, Any]], key: str) -> list[str]:
    """Labels of the points no other point beats on both replication rate and quality (both lower)."""
    front = []
    for p in points:
        r, q = p["replication_rate"], p["quality"][key]
        dominated = any(
            o["replication_rate"] <= r
            and o["quality"][key] <= q
            and (o["replication_rate"] < r or o["quality"][key] < q)
            for o in points
        )
        if not dominated:
            front.append(p["label"])
    return front


def selection_rule(key: str, target_rate: float, target_above_p99: float | None) -> str:
    """The recommendation rule in words (``target_above_p99`` None: the points carry no shares)."""
    rule = f"best {key} among CPSample points with replication rate <= {target_rate:g}"
    if target_above_p99 is not None:
        rule += f" and share above the held-out p99 <= {target_above_p99:g} (where measured)"
    return rule + "; ties: the lower replication rate"


def _excess(p: dict[str, Any], target_rate: float, target_above_p99: float) -> float:
    """How far a point misses the targets (0 = it meets them): the rate's and the p99 share's
    excess, the share counting only where the row carries it."""
    share = p.get("above_holdout_p99")
    over = max(0.0, p["replication_rate"] - target_rate)
    return over + (max(0.0, share - target_above_p99) if share is not None else 0.0)


def recommend(
    points: list[dict[str, Any]],
    key: str,
    target_rate: float,
    target_above_p99: float = DEFAULT_TARGET_ABOVE_P99,
) -> dict[str, Any]:
    """The protected point with the best quality among those that meet the targets (ties: the lower
    replication rate). Without one, ``label`` is None and ``closest`` names the point that misses them
    by the least (the summed excess over the targets; then the lower rate, then quality).

    The targets: replication rate <= ``target_rate`` and, for rows that carry the threshold-free
    shares (:mod:`pipeline.evaluation.shares`), ``above_holdout_p99 <= target_above_p99``: a point
    whose samples pile up just under the replica threshold but above nearly every held-out real
    image's nearest-neighbour similarity is refused. Rows without the shares are judged on the rate
    alone (the rule before the shares existed). The returned dict says the rule (``"rule"``) and,
    with a DDIM point, the chosen point's quality relative to it (``quality_vs_ddim``:
    :func:`quality_ratios`)."""
    protected = [p for p in points if p["sampler"] == "cpsample"]
    measured = any("above_holdout_p99" in p for p in points)
    rule = selection_rule(key, target_rate, target_above_p99 if measured else None)
    ok = [p for p in protected if _excess(p, target_rate, target_above_p99) == 0.0]
    if ok:
        best = min(ok, key=lambda p: (p["quality"][key], p["replication_rate"]))
        out = {"label": best["label"], "alpha": best["alpha"], "scale": best["scale"],
               "replication_rate": best["replication_rate"], key: best["quality"][key]}  # fmt: skip
        if "above_holdout_p99" in best:
            out["above_holdout_p99"] = best["above_holdout_p99"]
        ddim = next((p for p in points if p["sampler"] == "ddim"), None)
        if ddim is not None:  # what the protection costs, in every quality measure both carry
            out["quality_vs_ddim"] = quality_ratios(best["quality"], ddim["quality"])
        return {**out, "rule": rule}
    closest = min(
        protected or points,
        key=lambda p: (_excess(p, target_rate, target_above_p99), p["replication_rate"],
                       p["quality"][key]),
    )  # fmt: skip
    reason = f"no point reaches replication rate <= {target_rate}"
    if measured:
        reason += f" and share above the held-out p99 <= {target_above_p99}"
    return {"label": None, "reason": reason, "closest": closest["label"], "rule": rule}


def quality_ratios(quality: dict[str, float], reference: dict[str, float]) -> dict[str, float]:
    """``quality[k] / reference[k]`` for each measure both carry (reference 0 skipped): worse than
    the reference is > 1 for the Fréchet distances, < 1 for ``confident_fraction``."""
    return {
        k: float(v) / float(reference[k])
        for k, v in quality.items()
        if isinstance(reference.get(k), int | float) and reference[k] != 0
    }


def summarise(
    points: list[dict[str, Any]],
    target_rate: float,
    target_above_p99: float = DEFAULT_TARGET_ABOVE_P99,
    **details,
) -> dict[str, Any]:
    """The ``sweep`` section of report.json: the points in input order, the front, the choice
    (:func:`recommend`: replication rate <= ``target_rate`` and, where rows carry it, share above the
    held-out p99 <= ``target_above_p99``)."""
    if not 0.0 <= target_above_p99 <= 1.0:
        raise ValueError(f"target_above_p99 must be in [0, 1], got {target_above_p99}")
    points = sorted(points, key=lambda p: p["index"])
    key = quality_key(points)
    out: dict[str, Any] = {"target_rate": target_rate, "target_above_p99": target_above_p99,
                           "quality_metric": key, **details}  # fmt: skip
    out["points"] = points
    if key is not None:
        out["pareto_front"] = pareto_front(points, key)
        out["recommended"] = recommend(points, key, target_rate, target_above_p99)
    out["figure"] = PARETO_FIGURE
    return out


# ----------------------------------------------------------------------------------- Ray Tune edge
def _trial(config: dict[str, Any], *, context: dict[str, Any]) -> dict[str, Any]:
    """One Tune trial: load the models once, evaluate the point, return the result (final report)."""
    from pipeline.core.models import load_classifier
    from pipeline.data.checkpoints import load_models, resolve_model_dir
    from pipeline.data.storage import open_store

    torch.set_num_threads(context["threads"])
    store = open_store(context["store_uri"], context.get("s3_endpoint"), create=False)
    sampler: SamplerConfig = context["sampler"]
    with tempfile.TemporaryDirectory() as tmp:
        ddim = dataclasses.replace(sampler, sampler="ddim")
        unet, schedule, shape, _ = load_models(store, context["denoiser"], None, ddim, "cpu", tmp)
        clf = None
        if config["point"]["sampler"] == "cpsample":
            clf_dir = resolve_model_dir(store, context["classifier"], tmp)
            clf = load_classifier(clf_dir, shape, "cpu")
    return evaluate_point(
        unet, schedule, clf, config["point"], sampler, context["num_samples"], context["seed"],
        context["train_embeddings"], context["train_mean"], context["threshold"],
        context.get("evaluator"), context.get("reference"), context.get("holdout_percentiles"),
        context.get("attack"),
    )  # fmt: skip


def run_sweep(
    store,
    run: str,
    dataset: str | DatasetHandle,
    points: Sequence[tuple[float, float]] = ((0.5, 3.0), (0.5, 5.0), (0.5, 7.0)),
    num_samples: int = 256,
    seed: int = 0,
    evaluator=None,
    target_rate: float = 0.02,
    sampler: SamplerConfig | None = None,
    replicas: ReplicaConfig | None = None,
    include_ddim: bool = True,
    cpus_per_trial: float = 1.0,
    denoiser: str | None = None,
    classifier: str | None = None,
    write_figure: bool = True,
    verbose: int = 1,
    holdout_sims=None,
    attack=None,
    target_above_p99: float = DEFAULT_TARGET_ABOVE_P99,
) -> dict[str, Any]:
    """Ray Tune grid over (alpha, s) points on the run's models; returns the ``sweep`` report section.

    ``sampler`` supplies steps, eta, batch size, input mode and the guided t range (its alpha, scale,
    num_samples and seed are ignored). Writes ``reports/<run>/pareto.png`` when ``write_figure``.
    ``dataset``: a name, or the job's :class:`~pipeline.data.handle.DatasetHandle` (not read again).

    ``holdout_sims`` (held-out real images' nearest-training similarities in the replica index's
    embedding, or their percentiles) adds the threshold-free shares to every row and the p99 share
    to the choice (<= ``target_above_p99``); ``attack`` (a
    :class:`pipeline.evaluation.mia.SampleOnlyAttack`) adds ``mia_auc`` (and per group) to every row.
    """
    from ray import tune

    from pipeline.data.checkpoints import preflight_models
    from pipeline.data.subsets import pick_images
    from pipeline.evaluation.report import pareto_figure
    from pipeline.fanout.ray_init import init_ray
    from pipeline.fanout.replica_index import LazyReplicaIndex, ensure_replica_index

    sampler = sampler or SamplerConfig()
    replicas = replicas or ReplicaConfig()
    grid = make_points(points, include_ddim)
    denoiser = denoiser or f"models/{run}/denoiser"
    classifier = classifier or f"models/{run}/classifier"
    # the trials load the models themselves: mismatches (schedule, t range, shape) fail here first
    if any(p["sampler"] == "cpsample" for p in grid):
        preflight_models(
            store, denoiser, classifier, dataclasses.replace(sampler, sampler="cpsample")
        )
    else:
        preflight_models(store, denoiser, None, dataclasses.replace(sampler, sampler="ddim"))
    ds = as_handle(store, dataset)  # a name, or the job's handle: its manifest is not read again
    # the stored replica index (built once when missing or stale), loaded by each trial
    train_index = LazyReplicaIndex(
        store, ensure_replica_index(store, ds.dataset, replicas), replicas
    )
    reference = None
    if evaluator is None:
        # a seeded subset of the held-out images (all of them up to 10,000), read shard by shard
        held = pick_images(store, ds.split("holdout"), 10_000, seed, manifest=ds.manifest)[0]
        reference = held.to_tensor()
    percentiles = None if holdout_sims is None else as_percentiles(holdout_sims)
    context = {
        "store_uri": store.uri, "denoiser": denoiser, "classifier": classifier, "sampler": sampler,
        "num_samples": num_samples, "seed": seed, "train_embeddings": train_index,
        "train_mean": None, "threshold": replicas.threshold, "evaluator": evaluator,
        "reference": reference, "threads": max(1, int(cpus_per_trial)),
        "holdout_percentiles": percentiles, "attack": attack,
    }  # fmt: skip
    init_ray()
    t0 = time.perf_counter()
    trainable = tune.with_resources(
        tune.with_parameters(_trial, context=context), {"cpu": cpus_per_trial}
    )
    with tempfile.TemporaryDirectory(prefix="cpsample-tune-") as tune_dir:
        results = tune.Tuner(
            trainable,
            param_space={"point": tune.grid_search(grid)},
            # one worker process serves several trials: imports and start-up are paid once per CPU
            tune_config=tune.TuneConfig(reuse_actors=True),
            run_config=tune.RunConfig(
                name=f"sweep-{run}", storage_path=str(Path(tune_dir).resolve()), verbose=verbose
            ),
        ).fit()
        errors = [str(r.error) for r in results if r.error is not None]
        if errors:
            raise RuntimeError(f"{len(errors)} sweep trial(s) failed: {errors[0]}")
        rows = [_plain_result(r.metrics) for r in results]
    details = privacy_details(holdout_sims, attack)
    summary = summarise(
        rows, target_rate, target_above_p99, num_samples=num_samples, seed=seed,
        steps=sampler.steps, threshold=replicas.threshold, embedding=replicas.embedding,
        wall_s=round(time.perf_counter() - t0, 2), **details,
    )  # fmt: skip
    if write_figure:
        store.write_bytes(pareto_figure(summary), "reports", run, PARETO_FIGURE)
    return summary


def privacy_details(holdout_sims=None, attack=None) -> dict[str, Any]:
    """The sweep section's record of its privacy references: ``holdout_percentiles`` (with
    ``num_holdout`` when the similarities themselves were given) and ``mia`` (the attack's sizes)."""
    out: dict[str, Any] = {}
    if holdout_sims is not None:
        out["holdout_percentiles"] = as_percentiles(holdout_sims)
        if not isinstance(holdout_sims, Mapping):
            out["holdout_percentiles"]["num_holdout"] = int(np.asarray(holdout_sims).size)
    if attack is not None:
        out["mia"] = attack.describe()
    return out


def _plain_result(metrics: dict[str, Any]) -> dict[str, Any]:
    """A trial's result without Tune's bookkeeping keys (the optional privacy keys kept)."""
    keys = ("index", "label", "sampler", "alpha", "scale", "num_samples", "replication_rate",
            "mean_nn_similarity", "guidance_fired_fraction", "quality", "time_s")  # fmt: skip
    out = {k: metrics[k] for k in keys}
    out.update({k: v for k, v in metrics.items() if k.startswith(OPTIONAL_ROW_PREFIXES)})
    return out
