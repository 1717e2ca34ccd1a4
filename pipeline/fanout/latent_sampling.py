"""Ray Data edge: plain and CPSample sampling of a latent text-to-image model (Stable Diffusion style).

The pixel sampler's actor pool, shard plan, seeds, resume and guard mode
(:class:`pipeline.fanout.sampling.ShardSampler`) with another model: each actor loads a Stable
Diffusion directory once, samples latents with classifier-free guidance
(:class:`pipeline.core.latent.CFGDenoiser`) and, for CPSample, the random-label classifier's guidance
in latent space, then decodes with the VAE and writes PNG samples. So the replica check, the guard
and the reports work on decoded pixels exactly as for pixel models.

Sample ``i`` of shard ``s`` gets the prompt ``prompts[(s * samples_per_shard + i) % len(prompts)]``
and the seed of the pixel sampler: the same prompt and starting latent under ``ddim`` and ``cpsample``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.config import SamplerConfig, from_dict
from pipeline.core.guidance import cpsample_guidance
from pipeline.core.latent import (
    CFGDenoiser,
    LatentModel,
    TextConditioned,
    TextGuidance,
    decode_latents,
    encode_prompts,
    load_latent_model,
)
from pipeline.core.models import CheckpointError, load_classifier, load_classifier_config
from pipeline.core.sampler import sample
from pipeline.data.checkpoints import check_classifier_fits, resolve_model_dir
from pipeline.data.imageset import images_from_tensor
from pipeline.data.provenance import dir_digest
from pipeline.data.storage import Store
from pipeline.fanout.sampling import ModelFamily, ShardSampler, sample_seed


def open_latent_models(
    store: Store,
    model: str,
    classifier: str | None,
    cfg: SamplerConfig,
    device: str,
    tmp: str,
) -> tuple[LatentModel, torch.nn.Module | None, dict[str, str]]:
    """(the Stable Diffusion model, the latent classifier for CPSample or None, the digests of both
    directories). The classifier must have been trained on this model's latents: its recorded
    schedule and guided t range are checked before weights load
    (:func:`pipeline.data.checkpoints.check_classifier_fits`), then its input shape against the
    UNet's latent shape; each mismatch raises :class:`CheckpointError`."""
    model_dir = resolve_model_dir(store, model, Path(tmp) / "model")
    digests = {"denoiser": dir_digest(model_dir)}
    clf_dir = None
    if cfg.sampler == "cpsample":
        if classifier is None:
            raise CheckpointError("sampler 'cpsample' needs a classifier checkpoint (--classifier)")
        clf_dir = resolve_model_dir(store, classifier, Path(tmp) / "classifier")
        digests["classifier"] = dir_digest(clf_dir)
    latent = load_latent_model(model_dir, device)
    clf = None
    if clf_dir is not None:
        check_classifier_fits(
            load_classifier_config(clf_dir), latent.schedule, cfg, classifier, model
        )
        clf = load_classifier(clf_dir, latent.latent_shape, device)
    return latent, clf, digests


def latent_family(text: TextGuidance) -> ModelFamily:
    """:func:`pipeline.fanout.sampling.run_sampling`'s ``family`` for a Stable Diffusion directory
    sampled with these prompts and classifier-free guidance; the prompts and CFG scale are part of
    the samples' provenance."""
    import dataclasses

    return ModelFamily(LatentShardSampler, open_latent_models, {"text": dataclasses.asdict(text)})


class LatentShardSampler(ShardSampler):
    """Ray Data actor: a :class:`ShardSampler` whose model is a Stable Diffusion directory."""

    def __init__(self, *args: Any, text: dict[str, Any], **kwargs: Any):
        self.text = from_dict(TextGuidance, text)
        super().__init__(*args, **kwargs)

    def _load_models(self, denoiser: str, classifier: str | None, tmp: str) -> dict[str, str]:
        self.latent, self.classifier, digests = open_latent_models(
            self.store, denoiser, classifier, self.cfg, self.device, tmp
        )
        self.schedule, self.shape = self.latent.schedule, self.latent.latent_shape
        self.uncond = encode_prompts(self.latent, [self.text.negative_prompt], self.device)[0]
        return digests

    def _guidance(self, pooled: torch.Tensor):
        """CPSample guidance in latent space; a text-conditioned classifier sees the batch's
        pooled prompt embeddings."""
        if self.classifier is None:
            return None
        cfg, clf = self.cfg, self.classifier
        if getattr(clf.config, "cond_dim", 0):
            clf = TextConditioned(clf, pooled)
        return cpsample_guidance(clf, cfg.alpha, cfg.scale, cfg.input_mode, cfg.guidance_t_max)

    def _draw(self, shard: int, slots: list[int], attempts: list[int]) -> list[dict[str, Any]]:
        cfg, text, drawn = self.cfg, self.text, []
        seeds = [sample_seed(cfg.seed, shard, i, attempts[i]) for i in slots]
        prompts = [text.prompt_of(shard * cfg.samples_per_shard + i) for i in slots]
        for lo in range(0, len(slots), cfg.batch_size):
            hi = min(lo + cfg.batch_size, len(slots))
            hidden, pooled = encode_prompts(self.latent, prompts[lo:hi], self.device)
            denoiser = CFGDenoiser(
                self.latent.unet, self.schedule, hidden,
                self.uncond.expand(hi - lo, -1, -1), text.cfg_scale,
            )  # fmt: skip
            out = sample(
                denoiser, self.schedule, seeds[lo:hi], self.shape, cfg.steps, cfg.eta,
                self._guidance(pooled), clip_sample=False, device=self.device, final_clamp=False,
            )  # fmt: skip
            with torch.no_grad():
                decoded = decode_latents(
                    self.latent.vae, out.images.to(self.device), self.latent.scaling_factor
                )
            for j, image in enumerate(images_from_tensor(decoded.float().cpu())):
                p = float(out.last_p[j])
                drawn.append({
                    "index": slots[lo + j], "seed": seeds[lo + j], "image": image,
                    "fired": int(out.fired_steps[j]), "final_p": None if np.isnan(p) else p,
                    "extra": {"prompt": prompts[lo + j], "cfg_scale": text.cfg_scale},
                })  # fmt: skip
        return drawn


def read_captions(store: Store, dataset: str, split: str = "train", limit: int = 1000) -> list[str]:
    """Up to ``limit`` captions of ``data/<dataset>/<split>`` in shard and key order, streamed shard by
    shard: a ``<key>.txt`` member, else the ``caption`` of ``<key>.json``. A split with no caption
    raises :class:`DataError` naming it."""
    import json
    import tarfile

    from pipeline.data.imageset import DataError
    from pipeline.data.layout import data_folder
    from pipeline.data.shards import checked_stream, manifest_shards

    folder = data_folder(dataset, split)
    captions: list[str] = []
    entries = manifest_shards(store, folder)  # each shard's sha256 checked as it is streamed
    for name in sorted(n for n in store.listdir(folder) if n.endswith(".tar")):
        found: dict[str, str] = {}
        with (
            checked_stream(store, folder, name, entries) as stream,
            tarfile.open(fileobj=stream, mode="r|*") as tar,
        ):
            for member in tar:
                key, _, ext = member.name.partition(".")
                if ext == "txt":
                    found[key] = tar.extractfile(member).read().decode().strip()
                elif ext == "json" and key not in found:
                    caption = json.loads(tar.extractfile(member).read()).get("caption")
                    if caption:
                        found[key] = str(caption)
        captions += [found[k] for k in found]
        if len(captions) >= limit:
            return captions[:limit]
    if not captions:
        raise DataError(f"{store.uri_of(folder)} has no captions (<key>.txt or a json 'caption')")
    return captions
