"""What both protected pipelines share: the guidance function, per-step records, seeds for redraws.

:func:`protection` turns a :class:`CPSampleClassifier` and the knobs into the guidance callable of
:func:`pipeline.core.guidance.cpsample_guidance` (the one the Ray samplers call), after checking
the knobs and that the classifier was trained on the pipeline's noise schedule. :class:`StepRecord`
counts, per sample, the steps at which guidance fired, as the project's sampler reports them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.core.guidance import GuidanceFn, GuidanceOutput, cpsample_guidance, validate_knobs
from pipeline.core.sampler import derive_seed
from pipeline.integrations.classifier import CPSampleClassifier


class _Bound(nn.Module):
    """The classifier as guidance calls it, ``c(x, t) -> (B,) float32 logits``: inputs cast to its
    dtype (a float16 pipeline may hold a float32 classifier, or the reverse) and, for a
    text-conditioned classifier, the batch's pooled text embeddings bound."""

    def __init__(self, classifier: CPSampleClassifier, pooled: torch.Tensor | None = None):
        super().__init__()
        self.classifier, self.pooled = classifier, pooled

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        dtype = self.classifier.dtype
        cond = None if self.pooled is None else self.pooled.to(dtype)
        return self.classifier(x.to(dtype), t, cond).float()


def protection(
    classifier: CPSampleClassifier | None,
    scheduler: Any,
    alpha: float,
    scale: float,
    t_max: int | None = None,
    input_mode: str = "x_t",
    pooled: torch.Tensor | None = None,
) -> GuidanceFn | None:
    """The CPSample guidance function for one call, or None (no classifier, or ``scale == 0``).

    ``alpha`` in (0, 0.5] and ``scale >= 0`` are checked first (``ValueError``). ``t_max`` defaults
    to the ``t_max`` the classifier was trained at (its record), else 1000; a larger one than it was
    trained at is refused. A classifier trained on another noise schedule than ``scheduler``'s is
    refused (:meth:`CPSampleClassifier.check_scheduler`). A text-conditioned classifier needs the
    batch's ``pooled`` (B, cond_dim) text embeddings.
    """
    validate_knobs(alpha, scale)
    if classifier is None or scale == 0:
        return None
    classifier.check_scheduler(scheduler)
    trained = classifier.t_max
    if t_max is None:
        t_max = trained if trained is not None else 1000
    elif trained is not None and t_max > trained:
        raise ValueError(
            f"cpsample_t_max {t_max} exceeds the t_max {trained} the classifier was trained at: "
            f"guidance would query it at noise levels it never saw (use <= {trained})"
        )
    if classifier.config.cond_dim > 0 and pooled is None:
        raise ValueError(
            "this classifier is text-conditioned: it needs the prompts' pooled text embeddings"
        )
    if classifier.config.cond_dim == 0:
        pooled = None
    return cpsample_guidance(_Bound(classifier, pooled), alpha, scale, input_mode, t_max)


class StepRecord:
    """Per sample: the steps at which guidance fired and the classifier's last p (NaN if never
    asked), accumulated on the device and read back once."""

    def __init__(self, batch: int, device: torch.device):
        self.fired = torch.zeros(batch, dtype=torch.long, device=device)
        self.last_p = torch.full((batch,), float("nan"), device=device)
        self.steps = 0

    def add(self, out: GuidanceOutput | None) -> None:
        self.steps += 1
        if out is None:
            return
        self.fired += out.fired.long().to(self.fired.device)
        p = out.p.float().to(self.last_p.device)
        self.last_p = torch.where(torch.isnan(p), self.last_p, p)

    def fired_fraction(self) -> torch.Tensor:
        return self.fired.float().cpu() / max(self.steps, 1)


def sample_seeds(generator: torch.Generator | list | None, batch: int) -> list[int]:
    """A seed per sample, from which a guard redraw derives its noise (attempt k of sample i:
    ``derive_seed(seed_i, "guard", k)``): a list of generators gives their initial seeds, one
    generator its seed and the sample's position, none a fresh random seed per sample."""
    if isinstance(generator, list):
        return [int(g.initial_seed()) for g in generator]
    if isinstance(generator, torch.Generator):
        return [derive_seed(int(generator.initial_seed()), i) for i in range(batch)]
    return [int(s) for s in torch.randint(0, 2**62, (batch,)).tolist()]


def redraw_generators(seeds: list[int], attempt: int) -> list[torch.Generator]:
    """Per-sample CPU generators for guard redraw ``attempt`` (1, 2, ...): the same noise on any
    device (``randn_tensor`` draws on the CPU and moves it)."""
    return [torch.Generator().manual_seed(derive_seed(s, "guard", attempt)) for s in seeds]
