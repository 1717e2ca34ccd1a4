"""What keeps a training step on its device (Ray-free): seeded device-side draws, host-to-device
copies that do not block, batches made ahead, and loss sums that stay on the device.

A CUDA step never waits for the host and the host never waits for the GPU between log or
checkpoint steps: noise, timesteps and mixup weights come from a ``torch.Generator`` on the model's
device; batches are copied from pinned memory with ``non_blocking=True`` (:func:`to_device`) and
made :data:`PREFETCH` steps ahead (:class:`Prefetch`); the loss is summed on the device and read
back only when a window's mean is logged (:class:`LossWindows`). On the CPU every one of these is
the plain operation, so a CPU run draws exactly what it drew with a CPU generator.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

import torch

from pipeline.core.diffusion import Schedule

PREFETCH = 2  # batches made (and their copies issued) ahead of the step that uses them
T = TypeVar("T")


def step_generator(seed: int, rank: int, start: int, device: torch.device) -> torch.Generator:
    """The loops' generator of noise, timesteps and mixup draws, on ``device``: seeded with
    ``seed * 1_000_003 + rank * 7919 + start`` (each rank its own stream; a resume at step ``start``
    its own). On the CPU it is the CPU generator the loops always used."""
    gen = torch.Generator(device=torch.device(device))
    return gen.manual_seed(seed * 1_000_003 + rank * 7919 + start)


def draw_device(generator: torch.Generator | None, like: torch.Tensor) -> torch.device:
    """Where draws from ``generator`` happen: the generator's own device (``like``'s without one)."""
    return like.device if generator is None else generator.device


def schedule_on(schedule: Schedule, device: torch.device) -> Schedule:
    """``schedule`` with its (T,) tensors on ``device``, copied once: ``abar(t)`` for device
    timesteps then indexes on the device instead of copying the table every step."""
    return dataclasses.replace(
        schedule,
        betas=to_device(schedule.betas, device),
        alphas_cumprod=to_device(schedule.alphas_cumprod, device),
    )


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; a CPU tensor bound for CUDA goes through pinned memory with
    ``non_blocking=True``, so the host queues the copy and moves on (the caching host allocator keeps
    the pinned block until the copy is done)."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def johnk_proposals(a: float, miss: float = 1e-12) -> int:
    """Proposals per draw so that Jöhnk's sampler of Beta(a, a) accepts none with probability at
    most ``miss``: its acceptance is ``Gamma(a+1)^2 / Gamma(2a+1)`` (at least 1/2 for a <= 1)."""
    accept = math.exp(2 * math.lgamma(a + 1) - math.lgamma(2 * a + 1))
    return max(1, math.ceil(math.log(miss) / math.log1p(-accept))) if accept < 1 else 1


def beta_symmetric(a: float, n: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """``n`` float32 draws of Beta(a, a), ``0 < a <= 1``, on ``device`` from ``generator``, with no
    host round trip: Jöhnk's rejection sampler (Jöhnk 1964; Devroye 1986, IX.3.5) run on
    :func:`johnk_proposals` proposals per draw at once, in log space (stable for small ``a``),
    keeping each draw's first accepted proposal. ``X = U^(1/a)``, ``Y = V^(1/a)``; accept when
    ``X + Y <= 1``; the draw is ``X / (X + Y)``."""
    if not 0 < a <= 1:
        raise ValueError(f"mixup must be in (0, 1] for device Beta draws, got {a}")
    k = johnk_proposals(a)
    uv = torch.rand((2, k, n), generator=generator, device=device, dtype=torch.float64)
    log_xy = torch.log1p(-uv) / a  # log U^(1/a) with U in (0, 1]: no log(0)
    log_sum = torch.logaddexp(log_xy[0], log_xy[1])  # (K, n)
    first = (log_sum <= 0).to(torch.uint8).argmax(dim=0, keepdim=True)  # first accepted (or 0)
    return torch.exp(log_xy[0] - log_sum).gather(0, first).squeeze(0).float()


class Prefetch(Generic[T]):
    """Items of ``make()`` made up to ``depth`` ahead of the one :meth:`next` returns, never more than
    ``total`` in all (so a loop of ``total`` steps reads no batch, and opens no epoch, it will not
    train on). ``make`` returns device tensors whose copies it issued without blocking
    (:func:`to_device`): while the device runs step k the host prepares steps k+1 .. k+depth."""

    def __init__(self, make: Callable[[], T], total: int, depth: int = PREFETCH):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self.make, self.left, self.depth = make, int(total), depth
        self.queue: deque[T] = deque()

    def _fill(self) -> None:
        while self.left > 0 and len(self.queue) < self.depth:
            self.queue.append(self.make())
            self.left -= 1

    def next(self) -> T:
        self._fill()
        if not self.queue:
            raise StopIteration("the prefetcher made all the items it was asked for")
        item = self.queue.popleft()
        self._fill()  # issue the next copies before the caller computes on this item
        return item


class LossWindows:
    """Running sums of the per-step loss over named windows (e.g. "log", "checkpoint"), kept on the
    device: :meth:`add` is a device op with no host sync, :meth:`mean` (the window's mean loss since
    it was last read) is the only read-back. float64 sums, in step order, as the loops' Python sums
    of ``float(loss)`` were."""

    def __init__(self, device: torch.device, *names: str):
        dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64
        self.sums = {n: torch.zeros((), dtype=dtype, device=device) for n in names}
        self.counts = dict.fromkeys(names, 0)

    def add(self, loss: torch.Tensor) -> None:
        value = loss.detach()
        for name, total in self.sums.items():
            total.add_(value.to(total.dtype))
            self.counts[name] += 1

    def count(self, name: str) -> int:
        return self.counts[name]

    def mean(self, name: str) -> float:
        """The window's mean loss (nan when empty); resets it."""
        total, n = float(self.sums[name]), self.counts[name]
        self.sums[name].zero_()
        self.counts[name] = 0
        return total / n if n else math.nan
