"""The model a random-label classifier protects: its noise schedule and its input shape.

The model itself is not trained here, and not even loaded: a pixel denoiser (any diffusers
``UNet2DModel`` directory) gives the image shape (C, H, W) and the schedule; a Stable Diffusion
directory gives the latent shape (C, h, w) from ``unet/config.json`` and the schedule from
``scheduler/scheduler_config.json``. A latent dataset (made by the latent precompute stage: its
manifest has a ``latent`` section) fixes the classifier's channels and sample size itself.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from typing import Any

from pipeline.core.config import ClassifierArchConfig, ConfigError, from_dict, to_dict
from pipeline.data.handle import DatasetHandle, as_handle
from pipeline.data.provenance import dir_digest
from pipeline.data.storage import Store

log = logging.getLogger(__name__)


@dataclass
class ClassifierTarget:
    """What a classifier is trained for. ``arch``: with the model's (or latent dataset's) input
    shape; ``betas``: the noise schedule (None: DDPM's linear); ``inputs``: the model directory's
    digest for the training provenance (``{"denoiser": ...}`` for pixel data, ``{"model": ...}``
    for latents); ``latent``: None for images, else ``{"scaling_factor", "model", "cond_dim"}``,
    recorded in the classifier's config.json; ``reading``: how the model reads its schedule
    (:func:`schedule_reading`; None: DDPM's, epsilon and leading), recorded with the schedule so
    that sampling can compare it with the denoiser's."""

    arch: ClassifierArchConfig
    betas: list[float] | None
    inputs: dict[str, str | None]
    latent: dict[str, Any] | None = None
    reading: dict[str, Any] | None = None


def schedule_reading(schedule) -> dict[str, Any]:
    """``prediction_type``, ``timestep_spacing`` and ``steps_offset`` of a model's schedule."""
    return {
        "prediction_type": schedule.prediction_type,
        "timestep_spacing": schedule.timestep_spacing,
        "steps_offset": schedule.steps_offset,
    }


def check_image_shape(
    store: Store, dataset: str | DatasetHandle, channels: int, size: int, model: str
) -> None:
    """The dataset's images (its manifest's ``channels`` and ``image_size``) must be the model's
    (C, H, W): a UNet runs on any size its downsampling divides, so a mismatch would train silently.
    ``dataset``: a name, or a handle already opened (its manifest is not read again)."""
    ds = as_handle(store, dataset)
    if ds.manifest is None:
        return
    h, w = ds.manifest.get("image_size", (size, size))
    c = ds.manifest.get("channels", channels)
    if (c, h, w) != (channels, size, size):
        raise ConfigError(
            f"dataset {ds.dataset!r} has images (C, H, W) = {(c, h, w)} but the {model} is configured "
            f"for {(channels, size, size)}; set its sample_size and channels to the data's"
        )


def classifier_target(
    store: Store,
    dataset: str | DatasetHandle,
    arch: ClassifierArchConfig,
    betas: list[float] | None = None,
    denoiser: str | None = None,
    model: str | None = None,
    text_cond: bool = False,
) -> ClassifierTarget:
    """The classifier's inputs for ``data/<dataset>``: images (optionally of a pixel ``denoiser``)
    or latents (optionally of a Stable Diffusion ``model``; ``text_cond`` conditions on the
    dataset's pooled text embeddings). Mismatches raise :class:`ConfigError` before any training.
    ``dataset``: a name, or a handle already opened (its manifest is not read again)."""
    ds = as_handle(store, dataset)
    dataset = ds.dataset
    if denoiser is not None and model is not None:
        raise ConfigError(
            "give either a denoiser (a pixel UNet2DModel directory) or a model (a Stable "
            "Diffusion directory), not both"
        )
    if ds.latent is not None:
        if denoiser is not None:
            raise ConfigError(
                f"dataset {dataset!r} holds latents: give the Stable Diffusion directory that made "
                f"them as model (--model), not a pixel denoiser ({denoiser!r})"
            )
        return _latent_target(store, dataset, ds.manifest, arch, betas, model, text_cond)
    if model is not None or text_cond or arch.cond_dim:
        raise ConfigError(
            f"dataset {dataset!r} holds images, not latents (its manifest has no 'latent' section): "
            "a Stable Diffusion model (--model) and text conditioning (--text-cond, cond_dim) need "
            "a latent dataset"
        )
    if denoiser is None:
        check_image_shape(store, ds, arch.channels, arch.sample_size, "classifier (arch)")
        return ClassifierTarget(arch, betas, {"denoiser": None})
    return _denoiser_target(store, ds, arch, denoiser)


def _denoiser_target(
    store: Store, dataset: DatasetHandle, arch: ClassifierArchConfig, denoiser: str
) -> ClassifierTarget:
    """The arch with the denoiser's image shape, its betas and its directory's digest; checks the
    dataset's shape."""
    from pipeline.core.models import load_denoiser, load_schedule, unet_image_shape
    from pipeline.data.checkpoints import resolve_model_dir

    with tempfile.TemporaryDirectory() as tmp:
        den_dir = resolve_model_dir(store, denoiser, tmp)
        channels, size, _ = unet_image_shape(load_denoiser(den_dir))
        schedule = load_schedule(den_dir)
        digest = dir_digest(den_dir)
    check_image_shape(store, dataset, channels, size, f"denoiser {denoiser!r}")
    shaped = {**to_dict(arch), "sample_size": size, "channels": channels}
    return ClassifierTarget(
        from_dict(ClassifierArchConfig, shaped), schedule.betas.tolist(), {"denoiser": digest},
        reading=schedule_reading(schedule),
    )  # fmt: skip


def latent_shape(manifest: dict[str, Any]) -> tuple[int, int, int]:
    """(C, h, w) of a latent dataset's latents: ``latent.latent_shape``, else its ``channels`` and
    ``image_size`` (which a latent manifest gives in latent units)."""
    shape = manifest["latent"].get("latent_shape")
    if not shape:
        shape = (manifest.get("channels", 4), *manifest.get("image_size", (0, 0)))
    c, h, w = (int(v) for v in shape)
    return (c, h, w)


def _latent_target(
    store: Store,
    dataset: str,
    manifest: dict[str, Any],
    arch: ClassifierArchConfig,
    betas: list[float] | None,
    model: str | None,
    text_cond: bool,
) -> ClassifierTarget:
    """The arch with the latents' shape (and ``cond_dim`` = the pooled embedding size with
    ``text_cond``), the model's betas and its directory's digest; checks the model's unet denoises
    latents of the dataset's shape."""
    from pipeline.core.models import load_schedule, unet_config_shape
    from pipeline.data.checkpoints import resolve_model_dir

    shape, lat = latent_shape(manifest), manifest["latent"]
    if shape[1] != shape[2]:
        raise ConfigError(f"dataset {dataset!r} has non-square latents {shape}; not supported")
    pooled_dim = int(lat.get("pooled_dim") or 0)
    cond_dim = pooled_dim if text_cond else arch.cond_dim
    if (text_cond or cond_dim) and (cond_dim != pooled_dim or not pooled_dim):
        asked = "text conditioning" if text_cond else f"cond_dim {cond_dim}"
        raise ConfigError(
            f"{asked} needs pooled text embeddings of that size in dataset {dataset!r} "
            f"(latent.pooled_dim = {pooled_dim or 'none'}); --text-cond takes the size from the data"
        )
    digest, reading = None, None
    if model is not None:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = resolve_model_dir(store, model, tmp)
            unet_shape = unet_config_shape(model_dir)
            schedule = load_schedule(model_dir)
            betas, reading = schedule.betas.tolist(), schedule_reading(schedule)
            digest = dir_digest(model_dir)
        if unet_shape != shape:
            raise ConfigError(
                f"dataset {dataset!r} has latents (C, h, w) = {shape} but the unet of model "
                f"{model!r} denoises {unet_shape}; encode the dataset with this model's VAE"
            )
    elif betas is None:
        log.warning(
            "dataset %r holds latents but no model was given: the classifier learns DDPM's linear "
            "schedule, not the latent model's (pass the Stable Diffusion directory as model)",
            dataset,
        )  # fmt: skip
    shaped = {**to_dict(arch), "channels": shape[0], "sample_size": shape[1], "cond_dim": cond_dim}
    record = {"scaling_factor": lat.get("scaling_factor"), "model": model, "cond_dim": cond_dim}
    return ClassifierTarget(
        from_dict(ClassifierArchConfig, shaped), betas, {"model": digest}, record, reading
    )
