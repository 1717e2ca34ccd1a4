"""The end-to-end demo: every stage on embedded defaults, through a local Ray, into one store.

Layout and report.json follow DESIGN.md sections 4 and 5.
"""

from __future__ import annotations

import dataclasses
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import DemoConfig, SamplerConfig
from pipeline.core.guidance import validate_knobs
from pipeline.data.datasets import digits_source, folder_digest, folder_source, split
from pipeline.data.imageset import DataError, ImageSet, images_to_tensor
from pipeline.data.provenance import PROVENANCE, StaleArtifactError, require_same, value_digest
from pipeline.data.shards import images_of
from pipeline.data.storage import Store, open_store
from pipeline.evaluation.displacement import displacement, pair_by_seed
from pipeline.evaluation.evaluate import sweep_and_attack
from pipeline.evaluation.folder_quality import quality_evaluator
from pipeline.evaluation.report import grid_figure, histogram_figure, pairs_figure, write_report
from pipeline.evaluation.shares import holdout_percentiles, threshold_free_shares
from pipeline.evaluation.sweep import point_label, score_point
from pipeline.fanout.ray_init import init_ray
from pipeline.fanout.sampling import run_sampling
from pipeline.fanout.scoring import train_index_spec
from pipeline.orchestration.compare import Sampled, compare_samplers
from pipeline.orchestration.stages import (
    check_samplers_and_holdout,
    make_shards,
    train_classifier,
    train_denoiser,
)

RUN = "demo"
OUTPUTS = ("data", "models", "samples", "reports", "checkpoints")
EXECUTION_FIELDS = ("ray_cpus", "sample_concurrency")  # how the demo runs, not what it makes


def with_seed(cfg: DemoConfig, seed: int) -> DemoConfig:
    """``cfg`` with every seed offset by ``seed``: the train/held-out split, both models' training
    (initialisation and batches), the classifier's random labels and the sampling seeds. Seed 0 keeps
    the configured seeds; seed 1 is an independent replicate (other training images, other bits)."""
    cfg = dataclasses.replace(cfg, seed=cfg.seed + seed, split_seed=cfg.split_seed + seed)
    cfg.denoiser = dataclasses.replace(cfg.denoiser, seed=cfg.denoiser.seed + seed)
    cfg.classifier = dataclasses.replace(
        cfg.classifier,
        seed=cfg.classifier.seed + seed,
        label_seed=cfg.classifier.label_seed + seed,
    )
    return cfg


def demo_inputs(cfg: DemoConfig, folder: dict[str, Any] | None) -> dict[str, str]:
    """The demo's inputs as digests, one per top-level config field (less :data:`EXECUTION_FIELDS`),
    plus the image source: the digits, or an image folder's :func:`data_record`."""
    inputs = {
        name: value_digest(value)
        for name, value in dataclasses.asdict(cfg).items()
        if name not in EXECUTION_FIELDS and not (name == "duplicates" and value is None)
    }
    inputs["data"] = value_digest(folder if folder is not None else "digits")
    return inputs


def data_record(data: str) -> dict[str, Any]:
    """An image folder as the demo's provenance records it: the dataset name it gets (its folder's
    name) and :func:`pipeline.data.datasets.folder_digest` of its images, read before anything is
    written; the path itself is not recorded (a moved folder is the same data)."""
    return {"dataset": _dataset_name(data), **folder_digest(data)}


def _dataset_name(data: str) -> str:
    return Path(data).resolve().name or "images"


def claim_output(store: Store, cfg: DemoConfig, data: str | None, overwrite: bool) -> None:
    """Make the output store this demo's before anything is written to it.

    An output folder made by a demo with other settings (its ``provenance.json`` names them), or
    holding outputs of unknown origin, is refused with :class:`StaleArtifactError` naming what
    changed: its checkpoints, samples and report would otherwise mix with this run's. ``overwrite``
    deletes the previous outputs first. The same settings rerun: every stage resumes or skips."""
    images = data_record(data) if data else None  # the folder's contents, before any write
    inputs = demo_inputs(cfg, images)
    if overwrite:
        for folder in OUTPUTS:
            store.delete_dir(folder)
        for name in ("report.json", PROVENANCE):
            if store.exists(name):
                store.delete(name)
    elif store.exists(PROVENANCE):
        recorded = json.loads(store.read_bytes(PROVENANCE)).get("provenance")
        require_same(f"the demo output {store.uri}", recorded, inputs, fresh="another --out")
    elif any(store.exists(name) for name in (*OUTPUTS, "report.json")):
        raise StaleArtifactError(
            f"{store.uri} holds outputs that no demo recorded (no {PROVENANCE}); use another --out, "
            "or pass --overwrite to discard them"
        )
    record = {"provenance": inputs, "config": dataclasses.asdict(cfg), "data": data}
    if images is not None:
        record["data_folder"] = images
    store.write_bytes(
        json.dumps(record, indent=2, sort_keys=True, default=str).encode(), PROVENANCE
    )


def quick_config(seed: int = 0) -> DemoConfig:
    """A tiny configuration for tests: every stage runs, nothing is expected to memorise."""
    # one sampling actor (the 2-actor path is tested on its own): each actor start-up imports diffusers
    cfg = DemoConfig(seed=seed, quality_epochs=2, num_holdout=500, sample_concurrency=1)
    cfg.unet = dataclasses.replace(cfg.unet, block_out_channels=(16, 32), attention_levels=(1,))
    cfg.denoiser = dataclasses.replace(cfg.denoiser, steps=30, batch_size=32, checkpoint_every=30)
    cfg.classifier_arch = dataclasses.replace(
        cfg.classifier_arch, base_channels=16, channel_mults=(1, 2)
    )
    cfg.classifier = dataclasses.replace(
        cfg.classifier, steps=30, holdout_images=200, checkpoint_every=30
    )
    # a 30-step classifier may be below min_fit: sampled with knowingly (the tests check that the
    # stages run, not that it protects); recorded in the report's config
    cfg.sampler = dataclasses.replace(
        cfg.sampler, num_samples=64, steps=10, samples_per_shard=32, batch_size=32,
        allow_unfit=True,
    )  # fmt: skip
    cfg.sweep = dataclasses.replace(cfg.sweep, scales=(3.0, 7.0), num_samples=32)
    cfg.mia_members, cfg.mia_nonmembers = 16, 32
    cfg.compare = dataclasses.replace(cfg.compare, num_samples=16)
    return cfg


class Timer:
    """Wall time per stage, printed as each stage ends."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        print(f"==> {name}", flush=True)
        t0 = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - t0, 2)
        print(f"<== {name}: {self.timings[name]:.1f} s", flush=True)


def demo_split(images: ImageSet, cfg: DemoConfig) -> tuple[ImageSet, ImageSet]:
    """The seeded train/held-out split (``num_train``, ``split_seed``), the held-out part capped at
    ``num_holdout``; fewer than 2 held-out images is a :class:`DataError`."""
    train, holdout = split(images, cfg.num_train, cfg.split_seed)
    if cfg.num_holdout is not None and len(holdout) > cfg.num_holdout:
        holdout = holdout.subset(range(cfg.num_holdout))
    if len(holdout) < 2:
        raise DataError(f"need at least 2 held-out images, got {len(holdout)}")
    return train, holdout


def _source(cfg: DemoConfig, data: str | None):
    size = cfg.unet.sample_size
    if data is None:
        return "digits", digits_source(size)
    images = folder_source(data, size)
    return _dataset_name(data), images


def _sampler_report(stats, run_info: dict, quality: dict, cfg: SamplerConfig) -> dict[str, Any]:
    out = {**stats.to_dict(), "quality": quality}
    if cfg.sampler == "cpsample":
        out.update(
            alpha=cfg.alpha,
            scale=cfg.scale,
            guidance_fired_fraction=run_info["guidance_fired_fraction"],
        )
    return out


def run_demo(
    cfg: DemoConfig,
    out: str,
    data: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run all stages into the store at ``out``; returns the report dict (also written to out).

    ``out`` must be new, or a previous demo's output with the same settings (it resumes), or
    ``overwrite`` discards it (:func:`claim_output`)."""
    import ray

    validate_knobs(cfg.sampler.alpha, cfg.sampler.scale)
    timer = Timer()
    t_start = time.perf_counter()
    dataset, images = _source(cfg, data)  # bad input fails here, before anything is written
    store = open_store(out)
    claim_output(store, cfg, data, overwrite)
    with timer.stage("make_shards"):
        channels = images.images.shape[-1]
        if channels != cfg.unet.channels:
            cfg.unet = dataclasses.replace(cfg.unet, channels=channels)
            cfg.classifier_arch = dataclasses.replace(cfg.classifier_arch, channels=channels)
        train, holdout = demo_split(images, cfg)
        make_shards(store, dataset, train, holdout)
    init_ray(num_cpus=cfg.ray_cpus)
    ray.data.DataContext.get_current().enable_progress_bars = progress
    threads = max(1, cfg.ray_cpus)
    with timer.stage("train_denoiser"):
        den = train_denoiser(store, RUN, dataset, cfg.unet, cfg.denoiser, threads)
    with timer.stage("train_classifier"):
        clf = train_classifier(store, RUN, dataset, cfg.classifier_arch, cfg.classifier, threads)
    runs = {}
    for name in ("ddim", "cpsample"):
        scfg = dataclasses.replace(cfg.sampler, sampler=name, seed=cfg.seed)
        with timer.stage(f"sample_{name}"):
            runs[name] = run_sampling(
                store, RUN, scfg, f"models/{RUN}/denoiser", f"models/{RUN}/classifier",
                concurrency=cfg.sample_concurrency, cpus_per_actor=max(1, cfg.ray_cpus // cfg.sample_concurrency),
            )  # fmt: skip
    with timer.stage("check_replicas"):
        # the stored replica index (built once, loaded by the scorers); the 64 training images' own
        # embeddings stay in memory only for the figures and the sweep's main rows
        spec, train_set = train_index_spec(store, dataset, cfg.replicas)
        folders = {name: run["folder"] for name, run in runs.items()}
        checked, (base_stats, base_rows) = check_samplers_and_holdout(
            store, RUN, dataset, folders, cfg.replicas, cfg.sample_concurrency
        )
    holdout_sims = np.asarray([r["nn_similarity"] for r in base_rows])
    percentiles = holdout_percentiles(holdout_sims)
    with timer.stage("quality"):
        quality, figures, evaluator, images = _quality_and_figures(
            store, runs, checked, base_rows, holdout, train_set, cfg
        )
    moved = _displacement(checked, images, base_rows, cfg.replicas.threshold)
    main_rows = _main_rows(cfg, runs, images, spec, evaluator, holdout_sims)
    with timer.stage("compare"):
        comparison, compare_figures = compare_samplers(
            store, RUN, dataset, cfg.compare, dataclasses.replace(cfg.sampler, seed=cfg.seed),
            cfg.replicas, f"models/{RUN}/denoiser", f"models/{RUN}/classifier", evaluator,
            holdout_sims, {n: Sampled(runs[n], checked[n][1], images[n]) for n in runs},
            cfg.sample_concurrency, max(1, cfg.ray_cpus // cfg.sample_concurrency),
        )  # fmt: skip
        figures.update(compare_figures)
    with timer.stage("sweep_and_attack"):
        sw = cfg.sweep
        main = (cfg.sampler.alpha, cfg.sampler.scale)
        privacy, privacy_figures = sweep_and_attack(
            store, RUN, dataset, dataclasses.replace(cfg.sampler, seed=cfg.seed), cfg.replicas,
            evaluator, cfg.seed,
            points=[(a, s) for a in sw.alphas for s in sw.scales if (a, s) != main],
            num_samples=sw.num_samples, target_rate=sw.target_rate, num_members=cfg.mia_members,
            num_nonmembers=cfg.mia_nonmembers, include_ddim=sw.include_ddim,
            extra_rows=main_rows, holdout_sims=holdout_sims,
            target_above_p99=sw.target_above_p99,
            extra_pixels={r["label"]: images[r["sampler"]][: sw.num_samples] for r in main_rows},
        )  # fmt: skip
        figures.update(privacy_figures)
    report = {
        "dataset": dataset,
        "num_train": len(train),
        "num_holdout": len(holdout),
        "threshold": cfg.replicas.threshold,
        "embedding": cfg.replicas.embedding,
        "seed": cfg.seed,
        "samplers": {
            name: {
                **_sampler_report(
                    checked[name][0],
                    runs[name],
                    quality[name],
                    dataclasses.replace(cfg.sampler, sampler=name),
                ),
                **threshold_free_shares(
                    np.asarray([r["nn_similarity"] for r in checked[name][1]]), percentiles
                ),
            }
            for name in runs
        },
        "holdout_baseline": {**base_stats.to_dict(), **percentiles},
        **({"comparison": comparison} if comparison else {}),
        "displacement": moved,
        "provenance": {
            **{m: _model_provenance(store, m) for m in ("denoiser", "classifier")},
            "samples": {name: runs[name]["provenance"] for name in runs},
        },
        "classifier": clf["metrics"],
        "denoiser": {"steps": cfg.denoiser.steps, "final_loss": den["metrics"].get("loss")},
        "quality_metric": quality["_name"],
        **privacy,
        "timings_s": {**timer.timings, "total": round(time.perf_counter() - t_start, 2)},
        "config": dataclasses.asdict(cfg),
    }
    write_report(store, RUN, report, figures)
    print(
        f"report: {store.uri_of('report.json')} and {store.uri_of('reports', RUN, 'report.md')}",
        flush=True,
    )
    return report


def _model_provenance(store: Store, model: str) -> dict[str, Any] | None:
    """``models/<run>/<model>/provenance.json``: the inputs it was trained from and its own digest."""
    if not store.exists("models", RUN, model, PROVENANCE):
        return None
    return json.loads(store.read_bytes("models", RUN, model, PROVENANCE))


def _displacement(checked, images, base_rows, threshold: float) -> dict[str, Any]:
    """How far CPSample moved each DDIM sample of the same seed (:mod:`pipeline.evaluation.displacement`):
    near = DDIM copies (similarity >= threshold), far = DDIM samples less similar to the training set
    than the median never-seen real image."""
    sets = {
        name: ImageSet(keys=[str(r["key"]) for r in checked[name][1]], images=images[name])
        for name in ("ddim", "cpsample")
    }
    ddim, guided, common = pair_by_seed(sets["ddim"], sets["cpsample"])
    sim_of = {str(r["key"]).split("-", 1)[1]: float(r["nn_similarity"]) for r in checked["ddim"][1]}
    far_below = float(np.median([float(r["nn_similarity"]) for r in base_rows]))
    return displacement(ddim, guided, np.asarray([sim_of[k] for k in common]), threshold, far_below)


def _main_rows(
    cfg: DemoConfig, runs, images, spec, evaluator, holdout_sims: np.ndarray
) -> list[dict[str, Any]]:
    """Sweep rows for the main DDIM and CPSample runs, scored on their first ``sweep.num_samples``
    samples (so that every point's Fréchet distance uses the same number of samples); the sweep then
    samples only the other (alpha, s) points."""
    n = cfg.sweep.num_samples
    rows = []
    for name in ("ddim", "cpsample"):
        point = {
            "index": 0,
            "sampler": name,
            "alpha": cfg.sampler.alpha if name == "cpsample" else None,
            "scale": cfg.sampler.scale if name == "cpsample" else 0.0,
        }
        point["label"] = point_label(point)
        fired = runs[name].get("guidance_fired_fraction") or 0.0
        row = score_point(
            point, images[name][:n], float(fired), spec.embeddings, spec.mean,
            cfg.replicas.threshold, evaluator, holdout_sims=holdout_sims,
        )  # fmt: skip
        row["source"] = f"the main {name} run (its first {min(n, len(images[name]))} samples)"
        rows.append(row)
    return rows


def _quality_and_figures(
    store: Store, runs, checked, base_rows, holdout, train_set, cfg: DemoConfig
):
    """Quality per sampler (the digits' domain classifier; for a folder, the held-out-trained
    encoder's FD and, with label subfolders, a label CNN: :func:`quality_evaluator`) and figures."""
    evaluator, quality = quality_evaluator(holdout, cfg.quality_epochs, cfg.seed)
    train_pos = {k: i for i, k in enumerate(train_set.keys)}
    figures: dict[str, bytes] = {}
    sims_by_name = {}
    images_by_name = {}
    for name in runs:
        stats, rows = checked[name]
        images, _ = images_of(rows, store, runs[name]["folder"])
        images_by_name[name] = images
        quality[name] = evaluator.quality(images_to_tensor(images)) if evaluator else {}
        sims = np.asarray([r["nn_similarity"] for r in rows])
        sims_by_name[name] = sims
        k = min(32, len(rows))
        neighbours = train_set.images[[train_pos[str(r["nn_key"])] for r in rows[:k]]]
        figures[f"pairs_{name}.png"] = pairs_figure(
            images[:k], neighbours, sims[:k], stats.threshold, name
        )
        figures[f"samples_{name}.png"] = grid_figure(images[:64], f"{name} samples")
    sims_by_name["held-out real"] = base = np.asarray([r["nn_similarity"] for r in base_rows])
    figures["nn_similarity_hist.png"] = histogram_figure(
        sims_by_name, cfg.replicas.threshold, holdout_percentiles(base)
    )
    figures["train_images.png"] = grid_figure(train_set.images[:64], "training images")
    return quality, figures, evaluator, images_by_name
