"""The evaluation configs: attacks and FID (jobs/evaluate.py), the (alpha, s) sweep (jobs/sweep.py)
and the side-by-side sampler comparison (pipeline.orchestration.compare). Validated like every config
(:mod:`pipeline.core.config_base`); re-exported by :mod:`pipeline.core.config`."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.config_base import _check, _positive


@dataclass
class EvalConfig:
    """Membership-inference attacks and FID (jobs/evaluate.py)."""

    num_members: int = 64  # training images attacked (all when fewer)
    num_nonmembers: int = 256  # held-out images attacked (a seeded random subset)
    timesteps: tuple[int, ...] = (50, 100, 150, 200, 300)  # attack 1: t values averaged over
    draws: int = 2  # attack 1: noise draws per t
    secmi_t: int = 100  # attack 2: SecMI's t
    secmi_k: int = 10  # attack 2: SecMI's DDIM interval
    pia_t: int = 200  # PIA (Kong et al. 2024): the one t attacked, eps_theta(x_0, 0) as its noise
    pia_p: float = 4.0  # PIA: the l_p norm of eps_theta(x_t, t) - eps_theta(x_0, 0) (authors: 4)
    num_permutations: int = 10_000
    seed: int = 0
    fid_batch_size: int = 32

    def __post_init__(self) -> None:
        for name in ("num_members", "num_nonmembers", "draws", "num_permutations",
                     "fid_batch_size", "pia_p"):  # fmt: skip
            _positive(name, getattr(self, name))
        _check(len(self.timesteps) >= 1, "timesteps must not be empty")
        for t in self.timesteps:
            _check(0 <= t < 1000, f"timesteps entries must be in [0, 1000), got {t}")
        _positive("secmi_k", self.secmi_k)
        _check(0 < self.secmi_t < 1000 - self.secmi_k and self.secmi_t % self.secmi_k == 0,
               f"secmi_t must be a multiple of secmi_k in (0, {1000 - self.secmi_k}), got {self.secmi_t}")  # fmt: skip
        _check(0 < self.pia_t < 1000, f"pia_t must be in (0, 1000) (PIA's t), got {self.pia_t}")


@dataclass
class SweepConfig:
    """The (alpha, s) trade-off sweep (jobs/sweep.py): the grid alphas x scales, plus plain DDIM."""

    alphas: tuple[float, ...] = (0.5,)
    scales: tuple[float, ...] = (3.0, 5.0, 7.0)
    num_samples: int = 256
    seed: int = 0
    target_rate: float = 0.02
    include_ddim: bool = True
    cpus_per_trial: float = 1.0
    quality_epochs: int = 30
    # the choice also needs share of samples above the held-out p99 NN similarity <= this (where
    # measured; held-out real images: 1% by construction)
    target_above_p99: float = 0.05
    max_holdout: int = 2000  # held-out images whose NN similarities set the p95 / p99 reference

    def __post_init__(self) -> None:
        _check(len(self.alphas) >= 1 and len(self.scales) >= 1, "alphas and scales must not be empty")  # fmt: skip
        for a in self.alphas:
            _check(0.0 < a <= 0.5, f"alphas entries must be in (0, 0.5], got {a}")
        for s in self.scales:
            _check(s >= 0, f"scales entries must be >= 0, got {s}")
        _check(0.0 <= self.target_rate <= 1.0, f"target_rate must be in [0, 1], got {self.target_rate}")  # fmt: skip
        _check(
            0.0 <= self.target_above_p99 <= 1.0,
            f"target_above_p99 must be in [0, 1], got {self.target_above_p99}",
        )
        for name in ("num_samples", "cpus_per_trial", "quality_epochs", "max_holdout"):
            _positive(name, getattr(self, name))


# the comparison's contenders (pipeline.evaluation.comparison.CONTENDERS): plain DDIM, CPSample,
# the guard (rejection against the training set), AMG (dissimilarity guidance) and CPSample + guard
CONTENDER_NAMES = ("ddim", "cpsample", "guard", "amg", "cpsample+guard")


@dataclass
class CompareConfig:
    """The side-by-side comparison of the samplers a user chooses between, on the same seeds
    (pipeline.orchestration.compare). ``contenders``: a subset of :data:`CONTENDER_NAMES` holding
    ``ddim`` (the time reference), or empty to skip the comparison. ``num_samples``: per contender;
    DDIM's and CPSample's are the main runs' samples of the same seeds."""

    contenders: tuple[str, ...] = CONTENDER_NAMES
    num_samples: int = 256

    def __post_init__(self) -> None:
        unknown = [c for c in self.contenders if c not in CONTENDER_NAMES]
        _check(not unknown, f"compare.contenders: unknown {unknown}; known: {list(CONTENDER_NAMES)}")  # fmt: skip
        _check(len(set(self.contenders)) == len(self.contenders), f"compare.contenders repeats a name: {list(self.contenders)}")  # fmt: skip
        _check(not self.contenders or "ddim" in self.contenders, "compare.contenders must include 'ddim' (every time is relative to it), or be empty")  # fmt: skip
        _positive("num_samples", self.num_samples)
