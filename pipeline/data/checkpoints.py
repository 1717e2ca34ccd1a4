"""Models in a store: a model location is a local folder or a store-relative path, fetched on demand.

``load_models`` rebuilds the denoiser, its schedule and (for CPSample) the guidance function from the
saved directories alone (their configs travel inside them), and refuses a classifier that does not fit
the denoiser: another schedule, a guided t range beyond the one it was trained on, other images.
"""

from __future__ import annotations

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
    unet_image_shape,
)
from pipeline.data.storage import Store, open_store


def resolve_model_dir(store, location: str, tmp: str | Path) -> Path:
    """A model location is a local folder, or a store-relative path (``models/<run>/denoiser``)."""
    if Path(location).is_dir():
        return Path(location)
    parts = tuple(p for p in location.split("/") if p)
    if not store.exists(*parts):
        raise CheckpointError(f"model {location!r} is neither a local folder nor under {store.uri}")
    return store.get_dir(Path(tmp) / "/".join(parts), *parts)


def _describe(steps: Any, beta_first: Any, beta_last: Any) -> str:
    """``T=1000, betas 0.0001..0.02``: a schedule as the classifier's record keeps it."""
    if isinstance(beta_first, float | int) and isinstance(beta_last, float | int):
        return f"T={steps}, betas {beta_first:.6g}..{beta_last:.6g}"
    return f"T={steps}, betas {beta_first!r}..{beta_last!r}"


def check_classifier_fits(
    record: dict[str, Any], schedule: Schedule, cfg: SamplerConfig, where: str, denoiser: str
) -> None:
    """Refuse a classifier whose recorded training does not cover what the sampler asks of it.

    ``record`` is the classifier's ``config.json`` (:func:`load_classifier_config`):
    - its ``schedule`` (``num_train_timesteps``, ``beta_first``, ``beta_last``) must be the denoiser's
      (betas equal to a relative 1e-5): the classifier learned ``p(label | x_t)`` at the noise levels
      of that schedule, and ``x_t`` of another schedule at the same ``t`` is noised differently;
    - ``cfg.guidance_t_max`` must not exceed its trained ``train.t_max``: it was trained at
      ``t < t_max`` and guidance queries it at ``t < guidance_t_max``.
    A record without ``schedule`` or ``train`` (a classifier saved by hand, not by
    ``train_classifier``, which writes both) cannot be checked, and is taken as it is.
    """
    rec = record.get("schedule")
    if isinstance(rec, dict):
        betas = (float(schedule.betas[0]), float(schedule.betas[-1]))
        theirs = (rec.get("num_train_timesteps"), rec.get("beta_first"), rec.get("beta_last"))
        same = theirs[0] == schedule.num_train_timesteps and all(
            isinstance(b, int | float) and math.isclose(b, ours, rel_tol=1e-5)
            for b, ours in zip(theirs[1:], betas)
        )
        if not same:
            raise CheckpointError(
                f"classifier {where} was trained on the schedule {_describe(*theirs)} but the "
                f"denoiser {denoiser} has {_describe(schedule.num_train_timesteps, *betas)}: "
                f"retrain the classifier with --denoiser {denoiser}"
            )
    t_max = (record.get("train") or {}).get("t_max")
    if isinstance(t_max, int) and cfg.guidance_t_max > t_max:
        raise CheckpointError(
            f"guidance_t_max {cfg.guidance_t_max} exceeds the t_max {t_max} that classifier {where} "
            f"was trained on (t < {t_max}): guidance would query it at noise levels it never saw; "
            f"set guidance_t_max <= {t_max} or retrain the classifier with t_max >= {cfg.guidance_t_max}"
        )


def load_models(
    store, denoiser: str, classifier: str | None, cfg: SamplerConfig, device: str, tmp: str
):
    """(unet, schedule, image shape, guidance fn or None); checks the classifier fits the denoiser.

    The configs are checked before any weights load: the schedule and guided t range
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
