"""Classifier scaling: optimizer steps needed to fit N random bits to 95% accuracy at small t (t < 100).

The seed paper's open question 1 is that random labels are hard to fit beyond ~180k images. This records
the curve steps(N) for the N this 2-core machine affords (16x16 digits), with the knobs the config
offers for large N: width (``base_channels``), steps and the learning-rate schedule. Training is the
same :func:`pipeline.train.loops.fit_classifier` loop Ray Train runs (1 worker, in-process: the curve is
about optimisation, not distribution), with a constant learning rate after warm-up (so that the step
count at which 95% is first reached does not depend on a cosine horizon) and ``t_max = 100``.
Accuracy is measured every ``eval_every`` steps on 4 noisy copies of every training image at t ~ U[0, 100).
"""

from __future__ import annotations

import math
import time

import torch

from pipeline.core.config import ClassifierArchConfig, ClassifierTrainConfig
from pipeline.core.diffusion import linear_schedule
from pipeline.core.labels import random_bits
from pipeline.core.models import NoiseClassifier, num_parameters
from pipeline.data.datasets import digits_source
from pipeline.train.loops import _noisy_logits, fit_classifier


class _Reached(Exception):
    pass


def steps_to_fit(
    n: int,
    arch: ClassifierArchConfig,
    max_steps: int,
    eval_every: int = 100,
    target: float = 0.95,
    lr: float = 3e-3,
    batch_size: int = 128,
    threads: int = 1,
) -> dict:
    """Train on the first ``n`` digits' random bits until accuracy at t < 100 reaches ``target``."""
    torch.set_num_threads(threads)
    data = digits_source(arch.sample_size)
    x = data.to_tensor()[:n]
    y = random_bits(data.keys[:n], 1234)
    schedule = linear_schedule()
    cfg = ClassifierTrainConfig(
        steps=max_steps, batch_size=batch_size, lr=lr, t_max=100, train_fraction=0.0,
        holdout_images=0, lr_schedule="constant", warmup_steps=100, checkpoint_every=eval_every,
    )  # fmt: skip
    torch.manual_seed(cfg.seed)
    clf = NoiseClassifier(arch)
    opt = torch.optim.AdamW(clf.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    curve: list[tuple[int, float]] = []
    gen = torch.Generator().manual_seed(7)

    def on_checkpoint(step: int, metrics: dict) -> None:
        logits, _ = _noisy_logits(clf.eval(), schedule, x, 0, 100, gen)
        clf.train()
        acc = float(((logits > 0).float() == y.repeat(4)).float().mean())
        curve.append((step, round(acc, 4)))
        if acc >= target:
            raise _Reached

    t0 = time.perf_counter()
    try:
        fit_classifier(clf, opt, schedule, x, y, n, cfg, on_checkpoint=on_checkpoint)
        reached = None
    except _Reached:
        reached = curve[-1][0]
    return {
        "n": n,
        "steps_to_95": reached,
        "max_steps": max_steps,
        "final_accuracy": curve[-1][1],
        "images_seen_per_train_image": (curve[-1][0] * batch_size) / n,
        "seconds": round(time.perf_counter() - t0, 1),
        "curve": curve,
    }


def run(
    ns: tuple[int, ...] = (64, 256, 1024), max_steps: int = 4000, eval_every: int = 100
) -> dict:
    arch = ClassifierArchConfig()  # the demo's width: base_channels 32, mults (1, 2, 2)
    rows = []
    for n in ns:
        row = steps_to_fit(n, arch, max_steps, eval_every)
        print(f"[classifier_scaling] N={n}: steps to 95% = {row['steps_to_95']}", flush=True)
        rows.append(row)
    return summarise(rows, arch)


def summarise(rows: list[dict], arch: ClassifierArchConfig) -> dict:
    """The curve plus its growth exponent k in steps ~ N^k between the two largest N that fit."""
    reached = [r for r in rows if r["steps_to_95"]]
    exponent = None
    if len(reached) >= 2:
        a, b = reached[-2], reached[-1]
        exponent = math.log(b["steps_to_95"] / a["steps_to_95"]) / math.log(b["n"] / a["n"])
    return {
        # k = 1: the steps grow linearly with N (a constant number of passes over each image)
        "ratio": exponent,
        "ratio_is": "exponent k of steps_to_95 ~ N^k between the two largest N that reached 95%",
        "steps_to_95_by_n": {str(r["n"]): r["steps_to_95"] for r in rows},
        "metric": "optimizer steps to 95% random-bit accuracy at t<100, batch 128, lr 3e-3 constant",
        "arch": {"base_channels": arch.base_channels, "channel_mults": list(arch.channel_mults)},
        "classifier_params": num_parameters(NoiseClassifier(arch)),
        "rows": rows,
        "note": "16x16 digits, 1 torch thread, on 2 shared, contended CPU cores (steps, not seconds)",
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
