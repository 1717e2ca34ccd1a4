"""Models in a store: a model location is a local folder or a store-relative path, fetched on demand.

``load_models`` rebuilds the denoiser, its schedule and (for CPSample) the guidance function from the
saved directories alone (their configs travel inside them), and refuses a classifier that does not fit
the denoiser's images.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from pipeline.core.config import SamplerConfig
from pipeline.core.guidance import cpsample_guidance
from pipeline.core.models import (
    CheckpointError,
    load_classifier,
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


def load_models(
    store, denoiser: str, classifier: str | None, cfg: SamplerConfig, device: str, tmp: str
):
    """(unet, schedule, image shape, guidance fn or None); checks the classifier fits the denoiser."""
    den_dir = resolve_model_dir(store, denoiser, tmp)
    unet = load_denoiser(den_dir, device)
    schedule = load_schedule(den_dir)
    shape = unet_image_shape(unet)
    guidance = None
    if cfg.sampler == "cpsample":
        if classifier is None:
            raise CheckpointError("sampler 'cpsample' needs a classifier checkpoint (--classifier)")
        clf = load_classifier(resolve_model_dir(store, classifier, tmp), shape, device)
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
