"""The latent scenario's configuration (:mod:`pipeline.orchestration.latent_demo`): typed and
validated, every seed offset together."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from pipeline.core.config import (
    ClassifierArchConfig,
    ClassifierTrainConfig,
    ReplicaConfig,
    SamplerConfig,
)
from pipeline.core.config_base import _check, _positive
from pipeline.core.latent_build import LatentArchConfig


@dataclass
class VAEFitConfig:
    """:func:`pipeline.train.latent_fit.fit_vae` on the held-out images."""

    steps: int = 400
    batch_size: int = 32
    lr: float = 2e-3
    kl_weight: float = 1e-2
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "lr"):
            _positive(name, getattr(self, name))
        _check(self.kl_weight >= 0, f"kl_weight must be >= 0, got {self.kl_weight}")


@dataclass
class LatentUNetFitConfig:
    """:func:`pipeline.train.latent_fit.fit_latent_unet` on the private latents."""

    steps: int = 900
    batch_size: int = 64
    lr: float = 2e-3
    cond_dropout: float = 0.1
    ema_decay: float | None = 0.995
    warmup_steps: int = 50
    lr_schedule: str = "cosine"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "lr"):
            _positive(name, getattr(self, name))
        _check(
            0 <= self.cond_dropout <= 1, f"cond_dropout must be in [0, 1], got {self.cond_dropout}"
        )
        _check(
            self.lr_schedule in ("cosine", "constant"),
            f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}",
        )


def _latent_arch() -> LatentArchConfig:
    return LatentArchConfig(
        image_size=16, image_channels=1, vae_channels=(16, 32), unet_channels=(32, 64), text_dim=32
    )


@dataclass
class LatentDemoConfig:
    """Every stage of the latent scenario; the defaults are the calibrated ones (README, "Protect a
    Stable Diffusion fine-tune")."""

    num_train: int = 64
    num_holdout: int | None = None  # cap on the held-out images (None: all the rest)
    split_seed: int = 0
    seed: int = 0
    ray_cpus: int = 2
    sample_concurrency: int = 2
    caption_template: str = "a handwritten {label}"
    cfg_scale: float = 3.0  # classifier-free guidance weight w
    text_cond: bool = False  # condition the classifier on the pooled caption embedding
    arch: LatentArchConfig = field(default_factory=_latent_arch)
    vae: VAEFitConfig = field(default_factory=VAEFitConfig)
    unet: LatentUNetFitConfig = field(default_factory=LatentUNetFitConfig)
    classifier_arch: ClassifierArchConfig = field(
        default_factory=lambda: ClassifierArchConfig(sample_size=8, channels=4)
    )
    classifier: ClassifierTrainConfig = field(
        default_factory=lambda: ClassifierTrainConfig(steps=1200, holdout_images=500)
    )
    # CPSample's scale in latent space: a sampling-only sweep of the seed-0 models (256 samples a
    # point, README) gave copies 40% / 24% / 11% / 2.3% / 1.6% at s = 5 / 10 / 20 / 30 / 40 (DDIM:
    # 71%) with the digit CNN's confident fraction at 1.00x / 1.00x / 0.99x / 0.93x / 0.88x DDIM's
    sampler: SamplerConfig = field(
        default_factory=lambda: SamplerConfig(
            num_samples=256, steps=25, alpha=0.5, scale=30.0, batch_size=128, samples_per_shard=128
        )
    )
    replicas: ReplicaConfig = field(default_factory=ReplicaConfig)
    quality_epochs: int = 30

    def __post_init__(self) -> None:
        _check(self.num_train >= 2, f"num_train must be >= 2, got {self.num_train}")
        _check(
            self.num_holdout is None or self.num_holdout >= 2,
            f"num_holdout must be >= 2 (or unset), got {self.num_holdout}",
        )
        _check(self.cfg_scale >= 0, f"cfg_scale must be >= 0, got {self.cfg_scale}")
        for name in ("ray_cpus", "sample_concurrency", "quality_epochs"):
            _positive(name, getattr(self, name))
        _check(
            self.arch.image_size == 16 and self.arch.image_channels == 1,
            "the latent scenario runs on the 16x16 grayscale digits: arch.image_size 16, "
            "arch.image_channels 1",
        )


def latent_config(seed: int = 0, quick: bool = False) -> LatentDemoConfig:
    """The scenario's configuration with every seed offset by ``seed`` (the split, the VAE, the
    UNet, the classifier's initialisation and random bits, sampling); ``quick``: every stage runs
    in about two minutes, nothing is expected to memorise (tests)."""
    cfg = LatentDemoConfig()
    if quick:
        cfg = dataclasses.replace(cfg, num_train=16, num_holdout=120, quality_epochs=2)
        cfg.sample_concurrency = 1
        cfg.vae = dataclasses.replace(cfg.vae, steps=20)
        cfg.unet = dataclasses.replace(cfg.unet, steps=20, batch_size=16, warmup_steps=5)
        cfg.classifier_arch = dataclasses.replace(cfg.classifier_arch, channel_mults=(1, 2))
        cfg.classifier = dataclasses.replace(
            cfg.classifier, steps=20, holdout_images=40, warmup_steps=5, checkpoint_every=20
        )
        # a 20-step classifier may be below min_fit: sampled with knowingly (recorded in the config)
        cfg.sampler = dataclasses.replace(
            cfg.sampler, num_samples=16, steps=5, batch_size=16, samples_per_shard=8,
            allow_unfit=True,
        )  # fmt: skip
    return offset_seeds(cfg, seed)


def offset_seeds(cfg: LatentDemoConfig, seed: int) -> LatentDemoConfig:
    """``cfg`` with every seed offset by ``seed``; 0 keeps the configured seeds."""
    return dataclasses.replace(
        cfg,
        seed=cfg.seed + seed,
        split_seed=cfg.split_seed + seed,
        vae=dataclasses.replace(cfg.vae, seed=cfg.vae.seed + seed),
        unet=dataclasses.replace(cfg.unet, seed=cfg.unet.seed + seed),
        classifier=dataclasses.replace(
            cfg.classifier,
            seed=cfg.classifier.seed + seed,
            label_seed=cfg.classifier.label_seed + seed,
        ),
    )
