"""The side-by-side comparison on a finished demo's store, on other sampling seeds (jobs/compare.py):
:func:`pipeline.orchestration.compare.compare_samplers` with the demo's models, index, config and
quality evaluator, read back from the store."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from pipeline.core.config import CompareConfig, DemoConfig, from_dict, to_dict
from pipeline.data.imageset import DataError
from pipeline.data.layout import data_folder
from pipeline.data.provenance import PROVENANCE
from pipeline.data.shards import read_image_shards
from pipeline.data.storage import open_store
from pipeline.evaluation.comparison import comparison_markdown
from pipeline.evaluation.folder_quality import quality_evaluator
from pipeline.orchestration.compare import compare_samplers
from pipeline.orchestration.duplicates import DATASET, RUN, allow_unfit
from pipeline.orchestration.replica_report import iter_per_sample


def compare_demo_store(
    out: str,
    seed: int,
    overrides: dict[str, Any] | None = None,
    s3_endpoint: str | None = None,
) -> tuple[dict[str, Any], str]:
    """The comparison on a finished demo's (or duplicates scenario's) store at ``out``, on another
    set of sampling seeds (jobs/compare.py): the demo's sampling seed plus ``seed``, every contender
    sampled afresh under the run ``<run>-cmp<seed>`` with the demo's models, index and config
    (``provenance.json``; ``overrides``: CompareConfig fields over the demo's), quality scored by an
    evaluator trained as the demo's was. Writes
    ``reports/<run>/comparison-seed<seed>.{json,md,png}``; returns the section and the report's URI.
    A store without a finished pixel demo is a :class:`~pipeline.data.imageset.DataError`."""
    store = open_store(out, s3_endpoint, create=False)
    if not (store.exists(PROVENANCE) and store.exists("report.json")):
        raise DataError(f"{store.uri} holds no finished demo (no {PROVENANCE} and report.json); run jobs/demo.py --out {out} first")  # fmt: skip
    report = json.loads(store.read_bytes("report.json"))
    cfg = from_dict(DemoConfig, json.loads(store.read_bytes(PROVENANCE))["config"], "config")
    ccfg = from_dict(CompareConfig, {**to_dict(cfg.compare), **(overrides or {})}, "compare")
    if not ccfg.contenders:
        raise DataError("no contenders to compare (compare.contenders is empty)")
    sampler = dataclasses.replace(cfg.sampler, seed=cfg.seed + seed)
    if report.get("scenario") == "duplicates":
        run, dataset, classifier = RUN, DATASET, f"models/{RUN}-cluster/classifier"
        sampler = dataclasses.replace(sampler, allow_unfit=allow_unfit(cfg, "cluster"))
    elif report.get("scenario") is None and "samplers" in report:
        run, dataset, classifier = "demo", report["dataset"], "models/demo/classifier"
    else:
        raise DataError(f"{store.uri}: the comparison runs on the pixel demo and the duplicates scenario, not on scenario {report.get('scenario')!r}")  # fmt: skip
    holdout = read_image_shards(store, data_folder(dataset, "holdout"))
    evaluator, _ = quality_evaluator(holdout, cfg.quality_epochs, cfg.seed, progress=True)
    holdout_sims = np.asarray([r["nn_similarity"] for r in iter_per_sample(store, run, "holdout")])
    if holdout_sims.size == 0:
        raise DataError(f"{store.uri}: no held-out replica check under reports/{run}/replicas-holdout")  # fmt: skip
    section, figures = compare_samplers(
        store, f"{run}-cmp{seed}", dataset, ccfg, sampler, cfg.replicas, f"models/{run}/denoiser",
        classifier, evaluator, holdout_sims, {}, cfg.sample_concurrency,
        max(1, cfg.ray_cpus // cfg.sample_concurrency),
    )  # fmt: skip
    section["seed_offset"] = seed
    name = f"comparison-seed{seed}"
    store.write_bytes(figures["comparison.png"], "reports", run, f"{name}.png")
    md = "\n".join(comparison_markdown(section)).strip() + f"\n\n![{name}.png]({name}.png)\n"
    store.write_bytes(md.encode(), "reports", run, f"{name}.md")
    store.write_bytes(json.dumps(section, indent=2).encode(), "reports", run, f"{name}.json")
    return section, store.uri_of("reports", run, f"{name}.md")
