"""The cost projection: GPU hours, vCPU hours and dollars for N training images, each number tagged.

    python bench/run.py --only cost_projection       # reads bench/results.json, writes its block
    python bench/cost_projection.py                  # prints the block

Every number is ``{"value": x, "unit": u, "basis": "measured" | "projected" | "assumption", "from": ...}``.
"measured" numbers come from bench/results.json (this machine) or are counted here exactly (FLOPs);
"projected" ones are arithmetic on measured numbers and stated assumptions; "assumption" are inputs
(prices, sustained GPU throughput) to be replaced by measurements when a GPU is lent (P7).

- Classifier training: what ``jobs/train_classifier.py`` would choose at N
  (:func:`pipeline.core.classifier_sizing.size_classifier`) from the measured per-width fits in
  results.json (``classifier_scaling.fits``: steps to 95% at t < 100 ~ a N^k, batch 128): the width
  with the least predicted compute and its steps (the fit x the sizing margin), times the FLOPs of one
  training image of that width (forward + backward, counted with
  ``torch.utils.flop_counter.FlopCounterMode`` at 64x64x3). An older entry without fits uses its
  curve's two largest N.
- Sampling: the FLOPs of one DDIM step of a stated realistic 64x64 diffusers ``UNet2DModel`` (counted
  the same way), plus CPSample's classifier forward and input-gradient backward on the steps with
  t < 600, at a stated sustained TFLOP/s on an H100 and an A10G.
- The replica index: its build (P8's parts bench, vCPU-hours), downloads (every scoring actor loads
  the index once; rows are fetched by byte range) and storage, at S3 list prices stated with a date.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

PRICES = {  # assumptions: AWS us-east-1 on-demand list prices, as stated; check before use
    "date": "2025-06 (AWS public price list as the authors knew it; not fetched: no network)",
    "h100_gpu_hour": 6.88,  # p5.48xlarge after the June 2025 reduction, $55.04/h / 8 GPUs
    "a10g_gpu_hour": 1.006,  # g5.xlarge (1 A10G, 4 vCPUs)
    "vcpu_hour": 0.0446,  # c7i.large $0.0893/h / 2 vCPUs
    "s3_gb_month": 0.023,  # S3 Standard, first 50 TB
    "s3_put_per_1000": 0.005,
    "s3_get_per_1000": 0.0004,
    "s3_to_ec2_same_region_gb": 0.0,
}
SUSTAINED_TFLOPS = {"h100": 300.0, "a10g": 35.0}  # assumption: bf16, ~30-50% of dense peak
REALISTIC_UNET = {  # a DDPM-style 64x64 UNet: google/ddpm-cifar10-32's layout with one more level
    "sample_size": 64, "in_channels": 3, "out_channels": 3, "layers_per_block": 2,
    "block_out_channels": [128, 256, 256, 512],
    "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
}  # fmt: skip
DDIM_STEPS = 50
GUIDANCE_T_MAX = 600
EPOCHS_DENOISER = 100  # assumption for the denoiser's training (not measured here)
SIZES = (1_000_000, 100_000_000)
INDEX_BYTES_PER_VECTOR = 256 + 8  # SQ8 codes of 256 PCA dims + an int64 id
ROW_BYTES_64 = 64 * 64 * 3  # the uint8 rows the index re-ranks with
SCORING_ACTORS = 64  # assumption: actors that each download the index once


def tag(value: float | None, unit: str, basis: str, source: str) -> dict:
    """One tagged number (``basis``: measured, projected or assumption)."""
    if basis not in ("measured", "projected", "assumption"):
        raise ValueError(f"basis must be measured, projected or assumption, got {basis!r}")
    v = None if value is None else float(f"{value:.4g}")
    return {"value": v, "unit": unit, "basis": basis, "from": source}


# ------------------------------------------------------------------------------------- FLOPs
def count_flops(fn) -> int:
    """FLOPs of ``fn()`` as ``FlopCounterMode`` counts them (2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def unet_step_flops(config: dict = REALISTIC_UNET) -> tuple[int, int]:
    """(FLOPs of one denoiser forward per image, parameters) of a ``UNet2DModel(**config)``."""
    import torch
    from diffusers import UNet2DModel

    unet = UNet2DModel(**config).eval()
    x = torch.zeros(1, config["in_channels"], config["sample_size"], config["sample_size"])
    with torch.no_grad():
        flops = count_flops(lambda: unet(x, torch.tensor([500])))
    return flops, sum(p.numel() for p in unet.parameters())


def classifier_flops(arch: dict, size: int = 64, channels: int = 3) -> dict:
    """Per image FLOPs of the NoiseClassifier ``arch`` at ``size``: ``guide`` (forward + the input
    gradient, weights frozen: what CPSample adds to a step) and ``train`` (forward + backward to the
    weights and the input), and its parameters."""
    import torch

    from pipeline.core.config import ClassifierArchConfig
    from pipeline.core.models import NoiseClassifier

    cfg = ClassifierArchConfig(sample_size=size, channels=channels, **arch)
    model = NoiseClassifier(cfg)
    t = torch.tensor([50])

    def guide():
        x = torch.zeros(1, channels, size, size, requires_grad=True)
        model(x, t).sum().backward()  # weights frozen: only the input gradient

    model.requires_grad_(False)
    g = count_flops(guide)
    model.requires_grad_(True)
    train = count_flops(lambda: model(torch.zeros(1, channels, size, size), t).sum().backward())
    return {"guide": g, "train": train, "params": sum(p.numel() for p in model.parameters())}


def fired_fraction(steps: int = DDIM_STEPS, t_max: int = GUIDANCE_T_MAX) -> float:
    """Share of the DDIM steps with t < ``t_max``, where CPSample's guidance runs."""
    from pipeline.core.diffusion import ddim_timesteps

    return float((ddim_timesteps(steps) < t_max).float().mean())


# ------------------------------------------------------------------------------------ scaling
def steps_to_fit(scaling: dict, n: int) -> tuple[float, float]:
    """(steps to fit ``n`` bits, exponent k) from the measured ``steps_to_95_by_n``: a power law
    through the two largest N that reached 95%, extended to ``n``."""
    pts = sorted((int(k), float(v)) for k, v in scaling["steps_to_95_by_n"].items() if v)
    if len(pts) < 2:
        raise ValueError("the scaling curve needs two N that reached 95%")
    (n0, s0), (n1, s1) = pts[-2], pts[-1]
    k = math.log(s1 / s0) / math.log(n1 / n0)
    return s1 * (n / n1) ** k, k


def classifier_choice(scaling: dict, n: int, flops: dict) -> dict:
    """The classifier at ``n`` bits: ``width``, ``steps`` (trained), ``predicted`` (fitted steps to
    95%), ``train``/``guide`` FLOPs per image and ``source``. With per-width ``fits`` and
    ``flops["clf_by_width"]`` it is the job's sizing rule on the measured fits; else the two-point
    curve (:func:`steps_to_fit`) and ``flops["clf_train"]``/``["clf_guide"]``."""
    from pipeline.core.classifier_sizing import MARGIN, WidthFit, size_classifier

    by_width = flops.get("clf_by_width")
    if scaling.get("fits") and by_width:
        fits = tuple(
            WidthFit(int(w), f["a"], f["k"], f["n_max"], by_width[int(w)]["train"])
            for w, f in scaling["fits"].items()
            if f and int(w) in by_width
        )
        s = size_classifier(n, 128, fits=fits)  # the job's rule and floors
        fit = next(f for f in fits if f.base_channels == s.base_channels)
        source = (f"width {s.base_channels} (least predicted compute of the widths >= 16): steps "
                  f"to 95% ~ {fit.a:.3g} N^{fit.k:.2f}, measured at N <= {fit.n_max:,} (8x8 RGB), "
                  f"x {MARGIN:g} (the job's sizing margin), batch 128")  # fmt: skip
        w = by_width[s.base_channels]
        return {"width": s.base_channels, "steps": s.steps, "predicted": s.predicted_steps_to_95,
                "train": w["train"], "guide": w["guide"], "params": w["params"], "source": source}  # fmt: skip
    steps, k = steps_to_fit(scaling, n)
    source = f"steps to 95% ~ N^{k:.2f}, batch 128, measured at N <= 1,024 (16x16 digits)"
    return {"width": None, "steps": steps, "predicted": steps, "train": flops["clf_train"],
            "guide": flops["clf_guide"], "params": None, "source": source}  # fmt: skip


def gpu_hours(flops: float, tflops: float) -> float:
    """Hours at a sustained ``tflops`` TFLOP/s."""
    return flops / (tflops * 1e12) / 3600


def gpu_costs(flops: float, what: str) -> dict:
    """Projected GPU hours and dollars on each stated GPU for ``flops``."""
    out = {}
    for gpu, tflops in SUSTAINED_TFLOPS.items():
        h = gpu_hours(flops, tflops)
        out[f"{gpu}_hours"] = tag(h, "GPU-hour", "projected", f"{what} / {tflops} TFLOP/s")
        out[f"{gpu}_usd"] = tag(h * PRICES[f"{gpu}_gpu_hour"], "USD", "projected",
                                f"x ${PRICES[f'{gpu}_gpu_hour']}/GPU-hour")  # fmt: skip
    return out


# --------------------------------------------------------------------------------- the blocks
def s3_requests_per_image(p8: dict) -> dict | None:
    """Measured requests per image of P8's loopback S3 run, split by S3's price classes: PUT, COPY,
    POST and LIST at the PUT rate (``put``), GET and HEAD at the GET rate (``get``); DELETE is free."""
    s3 = p8.get("s3")
    if not s3:
        return None
    put = get = 0
    for res in s3["stages"].values():
        req = res.get("requests", {})
        put += req.get("PUT", 0) + req.get("POST", 0)
        get += req.get("GET", 0) + req.get("HEAD", 0)
    return {"put": put / s3["size"], "get": get / s3["size"], "size": s3["size"]}


def index_block(n: int, p8: dict) -> dict:
    """The replica index at N: build vCPU-hours (P8), downloads by the scoring actors, storage."""
    out: dict = {}
    parts = p8.get("parts_index", {}).get("projection_100m")
    build_1m = p8.get("index", {}).get("build_index", {}).get("wall_s")
    if build_1m and n <= p8["index"]["index_n"]:
        h = build_1m * 2 / 3600 * n / p8["index"]["index_n"]
        out["build_vcpu_hours"] = tag(h, "vCPU-hour", "projected",
                                      "P8 1M build on 2 vCPUs (32x32x3), linear in N")  # fmt: skip
    elif parts:
        h = parts["vcpu_hours_projected"] * n / parts["target_vectors"]
        out["build_vcpu_hours"] = tag(h, "vCPU-hour", "projected",
                                      "P8 parts bench: parts x per-part cost (256-d vectors)")  # fmt: skip
    elif build_1m:
        h = build_1m * 2 / 3600 * n / p8["index"]["index_n"]
        out["build_vcpu_hours"] = tag(h, "vCPU-hour", "projected",
                                      "P8 1M build on 2 vCPUs (32x32x3), linear in N")  # fmt: skip
    if "build_vcpu_hours" in out:
        usd = out["build_vcpu_hours"]["value"] * PRICES["vcpu_hour"]
        out["build_usd"] = tag(usd, "USD", "projected", f"x ${PRICES['vcpu_hour']}/vCPU-hour")
    gb = n * INDEX_BYTES_PER_VECTOR / 1e9
    out["index_gb"] = tag(
        gb, "GB", "projected", f"{INDEX_BYTES_PER_VECTOR} B/vector (SQ8, 256-d, id)"
    )
    out["downloads_gb"] = tag(gb * SCORING_ACTORS, "GB", "projected",
                              f"{SCORING_ACTORS} actors (assumption) x the index once; rows by byte range")  # fmt: skip
    out["downloads_usd"] = tag(
        0.0, "USD", "projected", "S3 to EC2 in one region: no transfer charge"
    )
    return out


SOURCES = {
    "shards": "N x 12,288 B (uint8 64x64x3; PNG is smaller: an upper bound)",
    "index_rows": "N x 12,288 B: the rows the index re-ranks with",
    "index_codes": f"N x {INDEX_BYTES_PER_VECTOR} B",
    "samples": "N/10 x 12,288 B (upper bound)",
}


def storage_block(n: int, samples: int) -> dict:
    """Monthly S3 storage at N images of 64x64x3: shards (uint8 upper bound: PNG is smaller), the
    index's rows and codes, and ``samples`` sample shards."""
    gb = {
        "shards": n * ROW_BYTES_64 / 1e9, "index_rows": n * ROW_BYTES_64 / 1e9,
        "index_codes": n * INDEX_BYTES_PER_VECTOR / 1e9, "samples": samples * ROW_BYTES_64 / 1e9,
    }  # fmt: skip
    total = sum(gb.values())
    return {
        "gb": {k: tag(v, "GB", "projected", SOURCES[k]) for k, v in gb.items()},
        "usd_per_month": tag(total * PRICES["s3_gb_month"], "USD/month", "projected",
                             f"x ${PRICES['s3_gb_month']}/GB-month (S3 Standard)"),
    }  # fmt: skip


def project(results: dict, flops: dict, sizes: tuple[int, ...] = SIZES) -> dict:
    """The cost block for each N in ``sizes`` from ``results`` (results.json) and ``flops``
    (:func:`unet_step_flops`, :func:`classifier_flops`, ``fired``)."""
    scaling, p8 = results["classifier_scaling"], results.get("P8", {})
    req = s3_requests_per_image(p8)
    batch = 128  # the scaling curve's batch
    out = {}
    for n in sizes:
        choice = classifier_choice(scaling, n, flops)
        steps = choice["steps"]
        per_sample = DDIM_STEPS * (flops["unet"] + flops["fired"] * choice["guide"])
        clf = steps * batch * choice["train"]
        den = EPOCHS_DENOISER * n * 3 * flops["unet"]  # forward + backward ~ 3 forwards
        samples = n // 10
        block = {
            "classifier_steps": tag(steps, "steps", "projected", choice["source"]),
            "classifier_steps_to_95": tag(choice["predicted"], "steps", "projected",
                                          "the fit alone, without the margin"),
            "classifier_width": {"base_channels": choice["width"], "params": choice["params"]},
            "classifier_train": gpu_costs(clf, f"steps x {batch} x {choice['train']:.3g} FLOP"),
            "denoiser_train": gpu_costs(den, f"{EPOCHS_DENOISER} epochs (assumption) x 3 x UNet forward"),
            "samples": tag(samples, "samples", "assumption", "N/10, as P8"),
            "sampling": gpu_costs(samples * per_sample,
                                  f"{DDIM_STEPS} DDIM steps x (UNet + {flops['fired']:.2f} x classifier guide)"),
            "index": index_block(n, p8),
            "storage": storage_block(n, samples),
        }  # fmt: skip
        if req:
            usd = (
                n
                * (req["put"] * PRICES["s3_put_per_1000"] + req["get"] * PRICES["s3_get_per_1000"])
                / 1000
            )
            block["s3_requests_usd"] = tag(usd, "USD", "projected",
                                           f"measured requests/image at N={req['size']} (P8 S3 run) x N")  # fmt: skip
        out[str(n)] = block
    return out


def run(results_path: str | Path = HERE / "results.json", results: dict | None = None) -> dict:
    """The ``cost_projection`` entry: FLOPs counted now, the rest from ``results`` (the results.json
    entries; default: read from ``results_path``)."""
    if results is None:
        results = json.loads(Path(results_path).read_text())
    scaling = results["classifier_scaling"]
    widths = scaling.get("arch", {}).get("widths") or [scaling["arch"]["base_channels"]]
    mults = list(scaling["arch"].get("channel_mults", (1, 2, 2)))
    unet, unet_params = unet_step_flops()
    by_width = {int(w): classifier_flops({"base_channels": int(w), "channel_mults": mults})
                for w in widths}  # fmt: skip
    arch = {"base_channels": int(widths[-1]), "channel_mults": mults}
    clf = by_width[int(widths[-1])]
    flops = {"unet": unet, "clf_guide": clf["guide"], "clf_train": clf["train"],
             "clf_by_width": by_width, "fired": fired_fraction()}  # fmt: skip
    return {
        "unet": {"config": REALISTIC_UNET, "params": unet_params,
                 "flops_per_step": tag(unet, "FLOP/image", "measured", "FlopCounterMode, batch 1")},
        "classifier_by_width": {str(w): {k: tag(v, "FLOP/image", "measured", f"{k}, 64x64x3")
                                         for k, v in f.items() if k != "params"} | {"params": f["params"]}
                                for w, f in by_width.items()},
        "classifier": {"arch": arch, "size": 64, "params": clf["params"],
                       "guide_flops": tag(clf["guide"], "FLOP/image", "measured", "forward + input grad"),
                       "train_flops": tag(clf["train"], "FLOP/image", "measured", "forward + backward")},
        "fired_fraction": tag(flops["fired"], "share of steps", "measured",
                              f"DDIM-{DDIM_STEPS} steps with t < {GUIDANCE_T_MAX}"),
        "sustained_tflops": {g: tag(v, "TFLOP/s", "assumption", "bf16; replace with P7 on a GPU")
                             for g, v in SUSTAINED_TFLOPS.items()},
        "prices": PRICES,
        "by_n": project(results, flops),
        "note": "projected = arithmetic on measured counts and stated assumptions; no GPU was "
        "lent, so no GPU throughput here is measured",
    }  # fmt: skip


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else HERE / "results.json"), indent=2))
