"""Sizing the random-label classifier from N, the number of images whose bits it must fit.

The fit is bench/classifier_scaling.py's measurement (bench/results.json "classifier_scaling"): the
optimizer steps to reach 95% accuracy on its own bits at t < 100, batch 128, per width
(``base_channels``, channel_mults (1, 2, 2)), fitted as a power law ``steps_95(N) = a N^k``. A test
checks that :data:`SCALING_FITS` matches that file, so rerunning the bench and forgetting to copy the
fit here fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.core.config_base import ConfigError


@dataclass(frozen=True)
class WidthFit:
    """``steps_95(N) = a N^k`` for one width, measured up to ``n_max``; ``train_flops``: forward +
    backward FLOPs per 8x8x3 training image (FlopCounterMode), the width's cost per image."""

    base_channels: int
    a: float
    k: float
    n_max: int
    train_flops: float

    def steps_to_95(self, n: int, batch_size: int = 128) -> float:
        """The fitted steps to 95% at ``n`` bits, ``a n^k``, at the bench's batch 128; another batch
        scales the steps by 128 / batch (the same images seen)."""
        return self.a * n**self.k * 128 / batch_size


# bench/results.json "classifier_scaling" fits (synthetic 8x8 RGB images, 1 torch thread); keep in
# sync with the bench (tests/core/test_classifier_sizing.py checks)
SCALING_FITS: tuple[WidthFit, ...] = (
    WidthFit(base_channels=8, a=0.2186, k=1.23, n_max=1024, train_flops=1114496),
    WidthFit(base_channels=16, a=0.00222, k=1.746, n_max=4096, train_flops=3891968),
    WidthFit(base_channels=32, a=0.004236, k=1.611, n_max=4096, train_flops=14829056),
    WidthFit(base_channels=64, a=0.00267, k=1.654, n_max=16384, train_flops=58231808),
)
# steps = MARGIN x the fitted steps to 95%: the fit is at t < 100 with a constant learning rate, the
# job trains on t < t_max (600 by default) with a cosine decay, and 95% is the least it should reach
MARGIN = 2.0


@dataclass(frozen=True)
class ClassifierSizing:
    """What :func:`size_classifier` chose for ``n`` bits, and why (``reason``, one line)."""

    n: int
    base_channels: int
    steps: int
    predicted_steps_to_95: int
    reason: str


def size_classifier(
    n: int,
    batch_size: int = 128,
    min_width: int = 16,
    min_steps: int = 1600,
    fits: tuple[WidthFit, ...] = SCALING_FITS,
    margin: float = MARGIN,
) -> ClassifierSizing:
    """Width and steps for fitting ``n`` random bits: of the measured widths >= ``min_width`` whose
    fit was measured up to ``n`` (beyond every measurement: those measured farthest), the one with
    the least predicted training compute ``steps_95(n) x train_flops`` (the power-law fit per width,
    :meth:`WidthFit.steps_to_95`); steps = max(``min_steps``, ``margin`` x its ``steps_95(n)``),
    rounded up to 100.

    ``min_width`` and ``min_steps`` are the calibrated defaults (base_channels 16, 1,600 steps at
    the demo's ~1,000 bits): sizing only ever grows the classifier from them.
    """
    if n < 1:
        raise ConfigError(f"n (images with random bits) must be >= 1, got {n}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be > 0, got {batch_size}")
    usable = [f for f in fits if f.base_channels >= min_width]
    if not usable:
        widths = sorted(f.base_channels for f in fits)
        raise ConfigError(f"no measured width >= min_width {min_width} (measured: {widths})")
    # a fit is trusted up to where it was measured: beyond it only the widths measured farthest
    usable = [f for f in usable if f.n_max >= min(n, max(g.n_max for g in usable))]
    best = min(
        usable, key=lambda f: (f.steps_to_95(n, batch_size) * f.train_flops, -f.base_channels)
    )
    predicted = best.steps_to_95(n, batch_size)
    steps = max(min_steps, 100 * math.ceil(margin * predicted / 100))
    beyond = f", extrapolated beyond N={best.n_max}" if n > best.n_max else ""
    reason = (
        f"N={n}: base_channels {best.base_channels} has the least predicted compute; steps to 95% "
        f"~ {best.a:.3g} N^{best.k:.2f} = {predicted:,.0f} at batch {batch_size}{beyond}; "
        f"steps = max({min_steps}, {margin:g} x that) = {steps}"
    )
    return ClassifierSizing(n, best.base_channels, steps, round(predicted), reason)


def images_with_bits(n_train: int, n_holdout: int, holdout_images: int) -> int:
    """N for :func:`size_classifier`: the training images plus the held-out images trained on with
    their own bits, ``round(n_holdout x holdout_fraction(holdout_images, n_holdout))`` (as the
    classifier stage counts them)."""
    from pipeline.core.labels import holdout_fraction

    if n_train < 0 or n_holdout < 0:
        raise ConfigError(f"image counts must be >= 0, got {n_train} and {n_holdout}")
    return n_train + round(n_holdout * holdout_fraction(holdout_images, n_holdout))
