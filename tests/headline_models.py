"""The headline's models, trained once per test session and shared (the ``headline_models`` fixture
in ``tests/conftest.py``).

A diffusers ``UNet2DModel`` trained on 8 handwritten digits (8x8) until plain DDIM reproduces them,
and the random-label classifier fitted to the same 8 images' random bits plus 120 held-out images
with their own bits (as the pipeline does). About 40 s on one CPU thread, so every module that needs
them (``tests/core/test_guidance_headline.py``,
``tests/integrations/test_pixel_pipeline_protection.py``) shares one training run.

:class:`ReplicaScorer` is the project's replica rule as the headline applies it: centred-pixel cosine
to the nearest of the 8 training images (FAISS flat index), threshold of :class:`ReplicaConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.core.config import (
    ClassifierArchConfig,
    ClassifierTrainConfig,
    DenoiserTrainConfig,
    ReplicaConfig,
    UNetConfig,
)
from pipeline.core.diffusion import Schedule, linear_schedule
from pipeline.core.labels import random_bits
from pipeline.core.models import NoiseClassifier, build_unet
from pipeline.data.datasets import digits_source, split
from pipeline.data.imageset import ImageSet, images_from_tensor
from pipeline.fanout.index import build_index, centred_pixel_embedding, embed_pixels, nearest
from pipeline.train.loops import EMA, fit_classifier, fit_denoiser

SEED = 2  # the train/held-out split and every training and sampling seed of the headline
NUM_TRAIN = 8
NUM_BIT_IMAGES = 120  # held-out images with their own bits in the classifier's fit (calibration)
NUM_NEVER_SEEN = 64  # further held-out images: seen by neither model
NUM_SAMPLES = 128
SAMPLE_SEEDS = tuple(range(10_000, 10_000 + NUM_SAMPLES))  # one sample per seed
SAMPLE_STEPS = 20
LABEL_SEED = 1234
T_MAX = 600  # the classifier's t range and the guided range (the project's defaults)
ALPHA, SCALE = 0.5, 5.0  # the project's default CPSample knobs
CLASSIFIER_ARCH = ClassifierArchConfig(
    sample_size=8,
    channels=1,
    base_channels=16,
    channel_mults=(1, 2),
    time_embed_dim=16,
    num_groups=4,
)


def train_denoiser(x: torch.Tensor, schedule: Schedule):
    """A 164k-parameter UNet2DModel that memorises 8 images in 500 steps (EMA weights returned)."""
    torch.manual_seed(SEED)
    unet = build_unet(
        UNetConfig(sample_size=8, channels=1, block_out_channels=(16, 32), norm_num_groups=8)
    )
    cfg = DenoiserTrainConfig(
        steps=500,
        batch_size=64,
        lr=5e-3,
        warmup_steps=20,
        ema_decay=0.99,
        lr_schedule="cosine",
        seed=SEED,
    )
    ema = EMA(unet, cfg.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    fit_denoiser(unet, ema, opt, schedule, x, cfg)
    return ema.shadow.eval().requires_grad_(False)


def train_classifier(
    x_fit: torch.Tensor, y_fit: torch.Tensor, n_train: int, schedule: Schedule
) -> NoiseClassifier:
    """The noise-conditioned random-label classifier, fitted as the pipeline does (Algorithm 1)."""
    torch.manual_seed(SEED)
    clf = NoiseClassifier(CLASSIFIER_ARCH)
    cfg = ClassifierTrainConfig(
        steps=400, batch_size=64, lr=3e-3, t_max=T_MAX, warmup_steps=20, seed=SEED
    )
    opt = torch.optim.AdamW(clf.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    fit_classifier(clf, opt, schedule, x_fit, y_fit, n_train, cfg)
    return clf.eval().requires_grad_(False)


@dataclass(frozen=True)
class HeadlineModels:
    """The trained EMA denoiser and classifier, their schedule, and the data they were fitted on.

    ``train`` (8 images, bits ``y_train``), ``bit_images`` (the 120 held-out images in the
    classifier's fit, bits ``y_bit_images``), ``never`` (64 further held-out images, seen by
    neither model, bits ``y_never``), ``holdout`` (every held-out image). Treat as read-only: the
    models are shared by the whole session (eval mode, parameters frozen).
    """

    unet: torch.nn.Module
    classifier: NoiseClassifier
    schedule: Schedule
    train: ImageSet
    holdout: ImageSet
    bit_images: ImageSet
    never: ImageSet
    y_train: torch.Tensor
    y_bit_images: torch.Tensor
    y_never: torch.Tensor


def train_headline_models() -> HeadlineModels:
    """Split the 8x8 digits, train both models on one CPU thread (deterministic kernels)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train, holdout = split(digits_source(8), NUM_TRAIN, SEED)
        bit_images = holdout.subset(range(NUM_BIT_IMAGES))
        never = holdout.subset(range(NUM_BIT_IMAGES, NUM_BIT_IMAGES + NUM_NEVER_SEEN))
        schedule = linear_schedule()
        x_train = train.to_tensor()
        y_train = random_bits(train.keys, LABEL_SEED)
        y_bit_images = random_bits(bit_images.keys, LABEL_SEED)

        unet = train_denoiser(x_train, schedule)
        x_fit = torch.cat([x_train, bit_images.to_tensor()])
        y_fit = torch.cat([y_train, y_bit_images])
        clf = train_classifier(x_fit, y_fit, NUM_TRAIN, schedule)
        return HeadlineModels(
            unet=unet,
            classifier=clf,
            schedule=schedule,
            train=train,
            holdout=holdout,
            bit_images=bit_images,
            never=never,
            y_train=y_train,
            y_bit_images=y_bit_images,
            y_never=random_bits(never.keys, LABEL_SEED),
        )
    finally:
        torch.set_num_threads(threads)


class ReplicaScorer:
    """The project's replica rule over the training images: centred-pixel cosine to the nearest
    one (exact FAISS index), a copy at or above ``ReplicaConfig().threshold``."""

    def __init__(self, train: ImageSet, cfg: ReplicaConfig | None = None):
        self.cfg = cfg or ReplicaConfig()
        self.threshold = self.cfg.threshold
        self.embed = centred_pixel_embedding(train.images)
        self.index = build_index(self.embed(train.images), self.cfg.index)

    def nn_similarity(self, images: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """(N, C, H, W) images in [-1, 1] -> nearest-training similarity (N,) and its row (N,)."""
        sims, idx = nearest(self.index, embed_pixels(images_from_tensor(images), self.embed.mean))
        return sims[:, 0], torch.from_numpy(idx[:, 0].astype(np.int64))

    def amg_parts(self, train: ImageSet):
        """AMG's ``nearest(x0) -> (sims, neighbours in [-1, 1])`` over ``train`` (the images this
        scorer indexes) and the centring image in [-1, 1], for :func:`pipeline.core.amg.amg_guidance`."""
        train_x = train.to_tensor()
        c, h, w = train_x.shape[1:]
        centre = torch.from_numpy(self.embed.mean.reshape(h, w, c)).permute(2, 0, 1) * 2 - 1

        def nearest_images(x0: torch.Tensor):
            sims, rows = self.nn_similarity(x0)
            return torch.from_numpy(sims), train_x[rows]

        return nearest_images, centre

    def rate(self, images: torch.Tensor) -> float:
        """The share of ``images`` at or above the threshold."""
        return float((self.nn_similarity(images)[0] >= self.threshold).mean())
