"""Models in a store: a model location is a local folder or a store-relative path, fetched on demand.

``load_models`` rebuilds the denoiser, its schedule and (for CPSample) the guidance function from the
saved directories alone (their configs travel inside them), and refuses a classifier that does not fit
the denoiser (another schedule, a guided t range beyond the one it was trained on, other images) or
that does not fit its own random bits (its model card, below ``SamplerConfig.min_fit``).
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path
from typing import Any

from pipeline.core.config import SamplerConfig
from pipeline.core.diffusion import Schedule
from pipeline.core.guidance import cpsample_guidance
from pipeline.core.models import (
    CheckpointError,
    load_classifier,
    load_classifier_config,
    load_denoiser,
    load_schedule,
    schedule_record,
    unet_image_shape,
)
from pipeline.data.storage import Store, open_store

log = logging.getLogger(__name__)


def resolve_model_dir(store, location: str, tmp: str | Path) -> Path:
    """A model location is a local folder, or a store-relative path (``models/<run>/denoiser``)."""
    if Path(location).is_dir():
        return Path(location)
    parts = tuple(p for p in location.split("/") if p)
    if not store.exists(*parts):
        raise CheckpointError(f"model {location!r} is neither a local folder nor under {store.uri}")
    return store.get_dir(Path(tmp) / "/".join(parts), *parts)


def _describe(rec: dict[str, Any]) -> str:
    """``T=1000, betas 0.0001..0.02 (all betas sha256:1a2b3c4d5e6f, epsilon, leading, 0)``: a record
    of a schedule (:func:`schedule_record`); the part in brackets only where the record has it."""
    first, last = rec.get("beta_first"), rec.get("beta_last")
    ends = (
        f"{first:.6g}..{last:.6g}"
        if isinstance(first, float | int) and isinstance(last, float | int)
        else f"{first!r}..{last!r}"
    )
    text = f"T={rec.get('num_train_timesteps')}, betas {ends}"
    if "betas_digest" not in rec:
        return text
    digest = str(rec["betas_digest"]).removeprefix("sha256:")[:12]
    reading = (rec.get("prediction_type"), rec.get("timestep_spacing"), rec.get("steps_offset"))
    return f"{text} (all betas sha256:{digest}, {', '.join(map(str, reading))})"


def _same_schedule(rec: dict[str, Any], ours: dict[str, Any], where: str) -> bool:
    """Whether a classifier's schedule record is the denoiser's: the betas digest, the prediction
    type, the timestep spacing and offset; a record without a digest (before it existed) only by T
    and the end betas (to a relative 1e-5), with a warning that only those were compared."""
    if rec.get("num_train_timesteps") != ours["num_train_timesteps"]:
        return False
    if "betas_digest" in rec:
        keys = ("betas_digest", "prediction_type", "timestep_spacing", "steps_offset")
        return all(rec.get(k) == ours[k] for k in keys)
    log.warning(
        "classifier %s records its schedule without a betas digest (trained before it was "
        "recorded): only T and the first and last beta are compared; retrain it to have every "
        "beta, the prediction type and the timestep spacing checked", where,
    )  # fmt: skip
    return all(
        isinstance(rec.get(k), int | float) and math.isclose(rec[k], ours[k], rel_tol=1e-5)
        for k in ("beta_first", "beta_last")
    )


def check_fit(record: dict[str, Any], cfg: SamplerConfig, where: str) -> None:
    """Refuse a classifier whose model card (``fit`` in its config.json, written by
    ``train_classifier``) says it fits its own training bits at t < 100 less than
    ``cfg.min_fit``: it is then unsure of the very images it should steer away from, and CPSample
    is plain DDIM at a cost (DESIGN.md section 10). ``cfg.allow_unfit`` takes it anyway, with a warning. A classifier
    without a card (saved by hand) cannot be judged and is taken with a warning."""
    fit = record.get("fit")
    acc = fit.get("accuracy") if isinstance(fit, dict) else None
    if not isinstance(acc, int | float):
        log.warning(
            "classifier %s has no fit card (config.json 'fit', written by train_classifier): "
            "its fit on its own bits is unknown, so CPSample may not protect", where,
        )  # fmt: skip
        return
    if acc >= cfg.min_fit:
        return
    lo, hi = fit.get("t_range") or [0, 100]
    margin = fit.get("mean_margin")
    margin = f"{margin:.3f}" if isinstance(margin, int | float) else "unknown"
    measured = (
        f"classifier {where} fits {acc:.1%} of its own training bits at {lo} <= t < {hi} (model "
        f"card: {fit.get('rows')} training rows, seed {fit.get('seed')}, mean |p - 1/2| {margin}), "
        f"below min_fit {cfg.min_fit:.0%}"
    )
    if cfg.allow_unfit:
        log.warning("%s; sampling with it anyway (allow_unfit)", measured)
        return
    raise CheckpointError(
        f"{measured}: CPSample protects only where the classifier knows a training image's bit, so "
        "with this one it would be plain DDIM at a cost. Train it further (more --steps, a wider "
        "classifier: --base-channels or arch.channel_mults) and sample again, or pass "
        "--allow-unfit (SamplerConfig.allow_unfit) to sample with it anyway"
    )


def check_classifier_fits(
    record: dict[str, Any], schedule: Schedule, cfg: SamplerConfig, where: str, denoiser: str
) -> None:
    """Refuse a classifier whose recorded training does not cover what the sampler asks of it.

    ``record`` is the classifier's ``config.json`` (:func:`load_classifier_config`):
    - its ``schedule`` (:func:`schedule_record`) must be the denoiser's: the same T, every beta
      (their digest), prediction type and timestep spacing. The classifier learned
      ``p(label | x_t)`` at the noise levels of that schedule, and ``x_t`` of another schedule at
      the same ``t`` is noised differently (linear and ``scaled_linear`` 1e-4..0.02 differ by up to
      0.357 in abar). A record from before the digest is compared by T and the end betas;
    - ``cfg.guidance_t_max`` must not exceed its trained ``train.t_max``: it was trained at
      ``t < t_max`` and guidance queries it at ``t < guidance_t_max``;
    - its model card must show the fit ``cfg.min_fit`` (:func:`check_fit`).
    A record without ``schedule`` or ``train`` (a classifier saved by hand, not by
    ``train_classifier``, which writes both) cannot be checked, and is taken as it is.
    """
    rec = record.get("schedule")
    if isinstance(rec, dict):
        ours = schedule_record(schedule)
        if not _same_schedule(rec, ours, where):
            raise CheckpointError(
                f"classifier {where} was trained on the schedule {_describe(rec)} but the "
                f"denoiser {denoiser} has {_describe(ours)}: retrain the classifier with "
                f"--denoiser {denoiser}"
            )
    t_max = (record.get("train") or {}).get("t_max")
    if isinstance(t_max, int) and cfg.guidance_t_max > t_max:
        raise CheckpointError(
            f"guidance_t_max {cfg.guidance_t_max} exceeds the t_max {t_max} that classifier {where} "
            f"was trained on (t < {t_max}): guidance would query it at noise levels it never saw; "
            f"set guidance_t_max <= {t_max} or retrain the classifier with t_max >= {cfg.guidance_t_max}"
        )
    check_fit(record, cfg, where)


def load_models(
    store, denoiser: str, classifier: str | None, cfg: SamplerConfig, device: str, tmp: str
):
    """(unet, schedule, image shape, guidance fn or None); checks the classifier fits the denoiser.

    The configs are checked before any weights load: the schedule, guided t range and model card
    (:func:`check_classifier_fits`), then the image shape. Each mismatch raises
    :class:`CheckpointError`. A ``ddim`` sampler uses no classifier and checks none.
    """
    den_dir = resolve_model_dir(store, denoiser, tmp)
    schedule = load_schedule(den_dir)
    clf_dir = None
    if cfg.sampler == "cpsample":
        if classifier is None:
            raise CheckpointError("sampler 'cpsample' needs a classifier checkpoint (--classifier)")
        clf_dir = resolve_model_dir(store, classifier, tmp)
        record = load_classifier_config(clf_dir)
        check_classifier_fits(record, schedule, cfg, classifier, denoiser)
    unet = load_denoiser(den_dir, device)
    shape = unet_image_shape(unet)
    guidance = None
    if clf_dir is not None:
        clf = load_classifier(clf_dir, shape, device)
        guidance = cpsample_guidance(clf, cfg.alpha, cfg.scale, cfg.input_mode, cfg.guidance_t_max)
    return unet, schedule, shape, guidance


def preflight_models(
    store_uri: str | Store,
    denoiser: str,
    classifier: str | None,
    sampler: SamplerConfig,
    s3_endpoint: str | None = None,
) -> None:
    """Load the models once in the driver so that missing or mismatched checkpoints fail fast."""
    with tempfile.TemporaryDirectory() as tmp:
        load_models(
            open_store(store_uri, s3_endpoint, create=False),
            denoiser,
            classifier,
            sampler,
            "cpu",
            tmp,
        )
