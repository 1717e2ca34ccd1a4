"""Classifier scaling: optimizer steps needed to fit N random bits to 95% accuracy at small t (t < 100).

The seed paper's open question 1 is that random labels are hard to fit beyond ~180k images. This
records the curve steps(N) across widths (``base_channels``, channel_mults (1, 2, 2)) for the N a
2-core machine affords, and fits it. Training is the same :func:`pipeline.train.loops.fit_classifier`
loop Ray Train runs (1 worker, in-process: the curve is about optimisation, not distribution), batch
128, lr 3e-3 constant after a 100-step warm-up (so that the step at which 95% is first reached does
not depend on a cosine horizon) and ``t_max = 100``.

Images, 8x8: ``synthetic`` (the default): :func:`pipeline.data.synthetic.synthetic_image` (seed 0,
index i; a procedural gradient plus shapes) in RGB, any N, all distinct (at N = 16,384 the median
nearest neighbour is 0.39 rms per pixel in [-1, 1], above the noise at t < 100: luminance alone
brings that to 0.17 and caps the reachable accuracy). ``digits``: scikit-learn's 1,797 digits at
their native 8x8, grayscale (N <= 1,797). Accuracy is estimated on a fixed random subsample of at
most 2,048 training images x 4 noisy copies at t ~ U[0, 100), at :func:`eval_steps` (every 100 up to
1,000, then about every 12.5%), so a reported step is an upper bound within one interval.

Fits (:func:`summarise`): least squares of log steps on log N per width (steps_to_95 ~ a N^k); per N
the cheapest width (least steps x training FLOPs per image); and the parameters needed against N:
per step budget, the smallest width that reached 95% within it. Rows go to a JSON-lines file as
they finish (``--rows``; a rerun skips the rows already there), so passes can run in parallel and
be merged into bench/results.json with ``--merge``.

    python bench/run.py --only classifier_scaling     # the full pass (about an hour on 2 cores)
    PYTHONPATH=. python bench/classifier_scaling.py --widths 32 --ns 256,1024,4096,16384 \
        --rows /tmp/rows_a.jsonl &                     # or one pass per width, in parallel,
    PYTHONPATH=. python bench/classifier_scaling.py --widths 16,8 --rows /tmp/rows_b.jsonl
    PYTHONPATH=. python bench/classifier_scaling.py --merge /tmp/rows_a.jsonl /tmp/rows_b.jsonl
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.core.config import ClassifierArchConfig, ClassifierTrainConfig
from pipeline.core.diffusion import linear_schedule
from pipeline.core.labels import random_bits
from pipeline.core.models import NoiseClassifier, num_parameters
from pipeline.train.loops import _noisy_logits, fit_classifier

BATCH, LR, T_MAX, TARGET, LABEL_SEED = 128, 3e-3, 100, 0.95, 1234
WIDTHS = (8, 16, 32)
RESULTS = Path(__file__).resolve().parent / "results.json"
NS = (256, 1024, 4096, 16384)


class _Reached(Exception):
    pass


class _OutOfTime(Exception):
    pass


def scaling_images(source: str, n: int, size: int = 8) -> tuple[torch.Tensor, list[str]]:
    """(N, C, size, size) float images in [-1, 1] and their keys: ``synthetic`` (RGB) or ``digits``
    (grayscale)."""
    if source == "digits":
        from pipeline.data.datasets import digits_source

        data = digits_source(size)
        if n > len(data):
            raise ValueError(f"digits has {len(data)} images, asked for {n}: use 'synthetic'")
        return data.to_tensor()[:n], data.keys[:n]
    if source != "synthetic":
        raise ValueError(f"source must be 'synthetic' or 'digits', got {source!r}")
    from pipeline.data.synthetic import synthetic_image

    rgb = np.stack([synthetic_image(0, i, size) for i in range(n)])  # (N, H, W, 3) uint8
    x = torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, [f"synthetic-{i:07d}" for i in range(n)]


def eval_steps(max_steps: int, every: int = 100) -> list[int]:
    """Steps at which accuracy is measured: every ``every`` up to 10 x ``every``, then at ~12.5%
    intervals rounded to ``every`` (bounds evaluation cost at large N)."""
    out, s = [], every
    while s <= max_steps:
        out.append(s)
        s += every if s < 10 * every else every * max(1, round(s / 8 / every))
    if not out or out[-1] != max_steps:
        out.append(max_steps)
    return out


def steps_to_fit(
    x: torch.Tensor,
    keys: list[str],
    base_channels: int,
    max_steps: int,
    eval_images: int = 2048,
    device: str = "cpu",
    threads: int = 1,
    deadline: float | None = None,
) -> dict:
    """Train on ``x``'s random bits until the accuracy at t < 100 reaches 95%, ``max_steps``, or the
    wall clock ``deadline`` (time.time(); then ``stopped`` says so and the curve is a lower bound)."""
    if device == "cpu":
        torch.set_num_threads(threads)
    n = len(x)
    dev = torch.device(device)
    y = random_bits(keys, LABEL_SEED)
    arch = ClassifierArchConfig(sample_size=x.shape[-1], channels=x.shape[1],
                                base_channels=base_channels)  # fmt: skip
    cfg = ClassifierTrainConfig(
        steps=max_steps, batch_size=BATCH, lr=LR, t_max=T_MAX, train_fraction=0.0,
        holdout_images=0, lr_schedule="constant", warmup_steps=100, checkpoint_every=100,
    )  # fmt: skip
    torch.manual_seed(cfg.seed)
    clf = NoiseClassifier(arch).to(dev)
    opt = torch.optim.AdamW(clf.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sub = torch.randperm(n, generator=torch.Generator().manual_seed(3))[:eval_images]
    x_eval, y_eval = x[sub].to(dev), y[sub].repeat(4)
    checks, curve = set(eval_steps(max_steps)), []

    def on_checkpoint(step: int, metrics: dict) -> None:
        if deadline and time.time() > deadline:
            checks.add(step)  # measure where it stopped
        if step not in checks:
            return
        gen = torch.Generator().manual_seed(7)  # the same noisy copies at every evaluation
        logits, _ = _noisy_logits(clf.eval(), linear_schedule(), x_eval, 0, T_MAX, gen)
        clf.train()
        acc = float(((logits > 0).float() == y_eval).float().mean())
        curve.append((step, round(acc, 4)))
        if acc >= TARGET:
            raise _Reached
        if deadline and time.time() > deadline:
            raise _OutOfTime

    t0 = time.perf_counter()
    reached, stopped = None, None
    try:
        fit_classifier(clf, opt, linear_schedule(), x.to(dev), y.to(dev), n, cfg,
                       on_checkpoint=on_checkpoint)  # fmt: skip
    except _Reached:
        reached = curve[-1][0]
    except _OutOfTime:
        stopped = "deadline"
    return {
        "n": n, "base_channels": base_channels, "params": num_parameters(clf),
        "steps_to_95": reached, "max_steps": max_steps, "final_accuracy": curve[-1][1],
        "epochs": round(curve[-1][0] * BATCH / n, 2), "seconds": round(time.perf_counter() - t0, 1),
        "curve": curve, **({"stopped": stopped} if stopped else {}),
    }  # fmt: skip


def power_fit(points: list[tuple[int, float]]) -> dict | None:
    """Least-squares fit of log y = log a + k log N over ``points`` (N, y): y ~ a N^k."""
    pts = [(n, y) for n, y in points if y]
    if len(pts) < 2:
        return None
    k, log_a = np.polyfit(np.log([p[0] for p in pts]), np.log([p[1] for p in pts]), 1)
    pts_out = [[int(n), float(y)] for n, y in pts]
    return {"a": float(f"{math.exp(log_a):.4g}"), "k": round(float(k), 3), "points": pts_out}


def train_flops(widths, size: int = 8, channels: int = 3) -> dict[int, int]:
    """Forward + backward FLOPs per training image of each width (cost_projection's counter)."""
    from cost_projection import classifier_flops  # bench/ is on sys.path

    arch = {"channel_mults": (1, 2, 2)}
    return {
        w: classifier_flops({**arch, "base_channels": w}, size, channels)["train"] for w in widths
    }


def _width_fit(rows: list[dict], w: int) -> dict | None:
    """The power law of one width over the N that reached 95% above the first evaluation (a row
    that reached it at step 100 only bounds it), and the N where it stopped short."""
    mine = [r for r in rows if r["base_channels"] == w]
    fit = power_fit([(r["n"], r["steps_to_95"]) for r in mine if (r["steps_to_95"] or 0) > 100])
    if fit is None:
        return None
    short = [r["n"] for r in mine if r["steps_to_95"] is None and "stopped" not in r]
    # rows cut by the wall clock: (N, steps run, accuracy then), steps_to_95 > steps run
    bounds = [[r["n"], *r["curve"][-1]] for r in mine if "stopped" in r and r["curve"]]
    return {**fit, "n_max": max(p[0] for p in fit["points"]), "not_reached_at_n": short,
            "stopped_short_at": bounds}  # fmt: skip


def summarise(rows: list[dict], source: str, budgets=(1000, 4000, 30_000)) -> dict:
    """Per-width fits of steps_to_95 ~ a N^k; per N the cheapest width (least steps x train FLOPs);
    per step budget the smallest width (its params) that reached 95% within it, and its fit."""
    widths = sorted({r["base_channels"] for r in rows})
    flops = train_flops(widths)
    for r in rows:
        s = r["steps_to_95"]
        r["train_flops_to_95"] = None if s is None else float(s * BATCH * flops[r["base_channels"]])
    by_n = sorted({r["n"] for r in rows})
    cheapest = {}
    for n in by_n:
        ok = [r for r in rows if r["n"] == n and r["steps_to_95"]]
        if ok:
            best = min(ok, key=lambda r: r["train_flops_to_95"])
            cheapest[str(n)] = {k: best[k] for k in ("base_channels", "params", "steps_to_95")}
    needed = {}
    for b in budgets:
        pts = {}
        for n in by_n:
            ok = [r for r in rows if r["n"] == n and r["steps_to_95"] and r["steps_to_95"] <= b]
            if ok:
                best = min(ok, key=lambda r: r["params"])
                pts[str(n)] = {k: best[k] for k in ("base_channels", "params", "steps_to_95")}
        fit = power_fit([(int(n), v["params"]) for n, v in pts.items()])
        needed[str(b)] = {"by_n": pts, "fit": fit}
    fits = {str(w): _width_fit(rows, w) for w in widths}
    widest = fits.get(str(widths[-1])) or {}
    return {
        "ratio": widest.get("k"),
        "ratio_is": f"exponent k of steps_to_95 ~ a N^k for the widest width ({widths[-1]})",
        "metric": f"optimizer steps to {TARGET:.0%} random-bit accuracy at t<{T_MAX}, batch {BATCH}, "
        f"lr {LR} constant; accuracy on <= 2,048 training images x 4 noisy copies, evaluated "
        "every 100 steps to 1,000 then about every 12.5% (steps are upper bounds at that resolution)",
        "images": f"{source}: "
        + (
            "pipeline.data.synthetic.synthetic_image(0, i, 8), 8x8 RGB (all distinct)"
            if source == "synthetic"
            else "scikit-learn digits, 8x8 grayscale"
        ),
        "arch": {"channel_mults": [1, 2, 2], "widths": widths},
        "fits": fits,
        "fit_is": "steps_to_95 ~ a * N^k per base_channels: least squares in log-log over the N "
        "that reached 95% after more than one evaluation interval",
        "params_by_width": {
            str(w): next(r["params"] for r in rows if r["base_channels"] == w) for w in widths
        },
        "train_flops_by_width": {str(w): flops[w] for w in widths},
        "cheapest_width_by_n": cheapest,
        "params_needed": needed,
        "params_needed_is": "per step budget: the fewest parameters that reached 95% within it, "
        "by N, and its fit params ~ a N^k",
        "steps_to_95": {f"{r['n']}@{r['base_channels']}": r["steps_to_95"] for r in rows},
        "rows": rows,
    }


def read_rows(paths) -> list[dict]:
    rows = []
    for path in paths:
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows


def entry(rows: list[dict], previous: dict | None, source: str = "synthetic") -> dict:
    """The ``classifier_scaling`` entry from ``rows``, keeping the earlier 16x16 digits curve of
    ``previous`` (the entry it replaces) under ``digits16``."""
    out = summarise(rows, source)
    prev = previous or {}
    old = prev.get("digits16") or {
        k: prev.get(k)
        for k in ("steps_to_95_by_n", "metric", "arch", "classifier_params", "measured_at")
    }
    if old.get("steps_to_95_by_n"):
        out["digits16"] = old
    out["note"] = "1 torch thread, on 2 shared, heavily contended CPU cores (steps, not seconds)"
    return out


def merge_into_results(rows: list[dict], path: Path = RESULTS) -> dict:
    """Write the entry into results.json, re-read right before writing (other benches' entries
    stay as they are)."""
    import platform

    results = json.loads(path.read_text()) if path.exists() else {}
    out = entry(rows, results.get("classifier_scaling"))
    out["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["classifier_scaling"] = out
    path.write_text(json.dumps(results, indent=2) + "\n")
    return out


def measure(
    ns: tuple[int, ...] = NS,
    widths: tuple[int, ...] = WIDTHS,
    max_steps: int = 20_000,
    source: str = "synthetic",
    device: str = "cpu",
    deadline: float | None = None,
    rows_file: str | None = None,
) -> list[dict]:
    """The rows over ``ns`` x ``widths`` (widest first at each N, so a deadline cuts narrow widths).

    A width that failed to reach 95% at some N is not tried at larger N; ``deadline`` (time.time())
    skips what is left once passed."""
    rows, failed = [], set()
    done = set()
    if rows_file and Path(rows_file).exists():  # resume: rows already in the file are kept
        rows = read_rows([rows_file])
        done = {(r["n"], r["base_channels"]) for r in rows}
        failed = {
            r["base_channels"] for r in rows if r["steps_to_95"] is None and "stopped" not in r
        }
    for n in ns:
        x, keys = scaling_images(source, n)
        for w in sorted(widths, reverse=True):
            if w in failed or (n, w) in done or (deadline and time.time() > deadline):
                continue
            row = steps_to_fit(x, keys, w, max_steps, device=device, deadline=deadline)
            print(f"[classifier_scaling] N={n} width={w}: steps to 95% = {row['steps_to_95']} "
                  f"({row['seconds']} s)", flush=True)  # fmt: skip
            row["source"] = source
            rows.append(row)
            if rows_file:  # one JSON line per row: parallel passes merge with --merge
                with open(rows_file, "a") as f:
                    f.write(json.dumps(row) + "\n")
            if row["steps_to_95"] is None and "stopped" not in row:
                failed.add(w)
    return rows


def run(previous: dict | None = None, quick: bool = False, rows_file: str | None = None) -> dict:
    """The ``classifier_scaling`` entry (``python bench/run.py --only classifier_scaling``): the full
    curve, or with ``quick`` a calibration pass (N 256 and 1,024, widths 8 and 32)."""
    if quick:
        rows = measure(ns=(256, 1024), widths=(8, 32), max_steps=4000, rows_file=rows_file)
    else:
        rows = measure(max_steps=30_000, rows_file=rows_file)
    return entry(rows, previous)


def _main() -> None:
    import argparse
    import datetime as dt

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a calibration pass at small N")
    p.add_argument("--ns", help=f"comma-separated N (default: {','.join(map(str, NS))})")
    p.add_argument("--widths", help="comma-separated base_channels (default: 8,16,32)")
    p.add_argument("--max-steps", type=int, default=30_000)
    p.add_argument("--source", default="synthetic", choices=("synthetic", "digits"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--deadline", help="HH:MM UTC: stop (the row's curve so far is kept)")
    p.add_argument("--rows", help="append each row to this JSON-lines file")
    p.add_argument("--merge", nargs="+", metavar="ROWS",
                   help="summarise these rows files into bench/results.json (no training)")  # fmt: skip
    args = p.parse_args()
    if args.merge:
        out = merge_into_results(read_rows(args.merge))
        print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=2))
        return
    if args.quick:
        print(json.dumps(run(quick=True), indent=2))
        return
    deadline = None
    if args.deadline:
        hh, mm = map(int, args.deadline.split(":"))
        now = dt.datetime.now(dt.timezone.utc)
        at = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
        deadline = (at if at > now else at + dt.timedelta(days=1)).timestamp()  # the next HH:MM
    ns = tuple(int(v) for v in args.ns.split(",")) if args.ns else NS
    widths = tuple(int(v) for v in args.widths.split(",")) if args.widths else WIDTHS
    rows = measure(ns, widths, args.max_steps, args.source, args.device, deadline, args.rows)
    if not rows:
        raise SystemExit("no row was measured (the deadline had passed?)")
    print(json.dumps(summarise(rows, args.source), indent=2))


if __name__ == "__main__":
    _main()
