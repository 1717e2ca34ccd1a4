"""The latent scenario: CPSample on a small text-to-image latent diffusion model.

The CPU-sized stand-in for a fine-tuned Stable Diffusion (Rombach et al. 2022) on a private set:

1. a small ``AutoencoderKL`` is fitted on the *held-out* digits (the public data a base model saw),
   with a frozen, randomly initialised CLIP text encoder: captions such as "a handwritten 3" only
   need distinct embeddings. This base model is saved as a diffusers Stable Diffusion directory;
2. the latent precompute (:func:`pipeline.fanout.latents.encode_dataset`, Ray Data) encodes the
   private training digits and the held-out ones, with their captions;
3. a small ``UNet2DConditionModel`` is fine-tuned on the private latents until it copies them
   (:func:`pipeline.train.latent_fit.fit_latent_unet`, 10% caption dropout for classifier-free
   guidance) and saved as ``models/<run>/sd``;
4. the random-label classifier trains on the noised latents (Ray Train, the pixel job's loop);
5. plain DDIM and CPSample (guidance in latent space) sample on the same seeds and prompts with
   classifier-free guidance (Ray Data), decode with the VAE and write PNG shards;
6. the replica check runs in *pixel* space after decoding, against the private pixel images.

The report gives replication, the threshold-free shares above held-out percentiles, quality (the
digit CNN's Fréchet distance and confident fraction), prompt agreement, and the VAE's ceiling: the
share of private images whose own VAE reconstruction already counts as a copy, the most a decoded
latent copy can reach.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.guidance import validate_knobs
from pipeline.data.datasets import digits_source
from pipeline.data.imageset import ImageSet, images_to_tensor
from pipeline.data.layout import data_folder
from pipeline.data.shards import checked_stream, manifest_shards, read_image_shards
from pipeline.data.storage import Store, open_store
from pipeline.evaluation.report import (
    num,
    pct,
    relative_to_ddim,
    sampler_figures,
    write_scenario_report,
)
from pipeline.orchestration.latent_config import (  # noqa: F401  (re-exported: the scenario API)
    LatentDemoConfig,
    latent_config,
    offset_seeds,
)

RUN = "latent"
DATASET = "digits-captioned"
LATENTS = f"{DATASET}-latents"
SAMPLERS = ("ddim", "cpsample")


# ------------------------------------------------------------------------------------- the stages
def _fit_base(store: Store, cfg: LatentDemoConfig, holdout: ImageSet, progress: bool) -> dict:
    """The base model (VAE fitted on the held-out images, random frozen text encoder, untrained
    UNet) as ``models/<run>/base``; skipped when it exists (the output is this config's)."""
    from pipeline.core.latent_build import build_latent_model, save_latent_model
    from pipeline.train.latent_fit import fit_vae

    if store.exists("models", RUN, "base", "model_index.json"):
        return json.loads(store.read_bytes("reports", RUN, "vae_fit.json"))
    torch.manual_seed(cfg.seed)
    model = build_latent_model(cfg.arch, seed=cfg.seed)
    v = cfg.vae
    fit = fit_vae(
        model.vae, holdout.to_tensor(), v.steps, v.batch_size, v.lr, v.kl_weight, v.seed, progress
    )
    store.write_bytes(json.dumps(fit, indent=2).encode(), "reports", RUN, "vae_fit.json")
    with tempfile.TemporaryDirectory() as tmp:
        save_latent_model(model, Path(tmp) / "base")
        store.put_dir(Path(tmp) / "base", "models", RUN, "base")
    return fit


def read_latent_split(store: Store, dataset: str, split: str) -> dict[str, Any]:
    """``{"keys", "latent" (N, C, h, w), "hidden" (N, L, D), "captions"}`` of a latent dataset's
    split (:mod:`pipeline.fanout.latents`' members), in shard and key order, as float32 tensors."""
    from pipeline.data.imageset import DataError

    folder = data_folder(dataset, split)
    rows: dict[str, dict[str, Any]] = {}
    entries = manifest_shards(store, folder)  # each shard's sha256 checked as it is streamed
    for name in sorted(n for n in store.listdir(folder) if n.endswith(".tar")):
        with (
            checked_stream(store, folder, name, entries) as stream,
            tarfile.open(fileobj=stream, mode="r|*") as tar,
        ):
            for member in tar:
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read()
                row = rows.setdefault(key, {})
                if ext in ("latent.npy", "hidden.npy"):
                    row[ext[:-4]] = np.load(io.BytesIO(data), allow_pickle=False)
                elif ext == "txt":
                    row["caption"] = data.decode().strip()
    keys = [k for k, r in rows.items() if {"latent", "hidden"} <= set(r)]
    if not keys:
        raise DataError(f"{store.uri_of(folder)} holds no latents (<key>.latent.npy, .hidden.npy)")
    return {
        "keys": keys,
        "latent": torch.from_numpy(np.stack([rows[k]["latent"] for k in keys]).astype(np.float32)),
        "hidden": torch.from_numpy(np.stack([rows[k]["hidden"] for k in keys]).astype(np.float32)),
        "captions": [rows[k].get("caption", "") for k in keys],
    }


def _fine_tune(store: Store, cfg: LatentDemoConfig, progress: bool) -> dict:
    """The fine-tuned model ``models/<run>/sd``: the base directory with its UNet fitted on the
    private latents (VAE, text encoder, tokenizer and scheduler byte-identical to the base's)."""
    from pipeline.core.latent import encode_prompts, load_latent_model
    from pipeline.data.checkpoints import resolve_model_dir
    from pipeline.train.latent_fit import fit_latent_unet

    if store.exists("models", RUN, "sd", "model_index.json"):
        return json.loads(store.read_bytes("reports", RUN, "unet_fit.json"))
    data = read_latent_split(store, LATENTS, "train")
    with tempfile.TemporaryDirectory() as tmp:
        base = resolve_model_dir(store, f"models/{RUN}/base", Path(tmp) / "base")
        model = load_latent_model(base)
        with torch.no_grad():
            empty = encode_prompts(model, [""])[0]
        u = cfg.unet
        torch.manual_seed(u.seed)
        fit = fit_latent_unet(
            model.unet, model.schedule, data["latent"], data["hidden"], u.steps, u.batch_size,
            u.lr, u.cond_dropout, u.seed, u.ema_decay, progress, empty, u.warmup_steps,
            u.lr_schedule,
        )  # fmt: skip
        sd = Path(tmp) / "sd"
        shutil.copytree(base, sd)
        shutil.rmtree(sd / "unet")
        model.unet.save_pretrained(str(sd / "unet"), safe_serialization=True)
        store.write_bytes(json.dumps(fit, indent=2).encode(), "reports", RUN, "unet_fit.json")
        store.put_dir(sd, "models", RUN, "sd")
    return fit


def run_latent_demo(
    cfg: LatentDemoConfig, out: str, progress: bool = True, overwrite: bool = False
) -> dict[str, Any]:
    """Every stage of the latent scenario into the store at ``out``; returns the report (also
    ``reports/latent/report.{json,md}`` with its figures, and ``report.json``). ``out`` must be new,
    this scenario's with the same settings (every stage resumes or skips), or ``overwrite``."""
    import ray

    from pipeline.core.latent import TextGuidance
    from pipeline.fanout.latent_sampling import latent_family, read_captions
    from pipeline.fanout.latents import encode_dataset
    from pipeline.fanout.ray_init import init_ray
    from pipeline.fanout.sampling import run_sampling
    from pipeline.orchestration.demo import Timer, claim_output, demo_split
    from pipeline.orchestration.stages import (
        check_samplers_and_holdout,
        make_shards,
        train_classifier,
    )

    validate_knobs(cfg.sampler.alpha, cfg.sampler.scale)
    timer, t_start = Timer(), time.perf_counter()
    images = digits_source(cfg.arch.image_size)
    store = open_store(out)
    claim_output(store, cfg, None, overwrite)
    threads = max(1, cfg.ray_cpus)
    torch.set_num_threads(threads)
    with timer.stage("make_shards"):
        train, holdout = demo_split(images, cfg)
        make_shards(store, DATASET, train, holdout, source={"name": "digits"})
    with timer.stage("fit_vae"):
        vae_fit = _fit_base(store, cfg, holdout, progress)
    init_ray(num_cpus=cfg.ray_cpus)
    ray.data.DataContext.get_current().enable_progress_bars = progress
    with timer.stage("encode_latents"):
        encoded = encode_dataset(
            store, DATASET, f"models/{RUN}/base", LATENTS, caption_template=cfg.caption_template,
            num_actors=1, cpus_per_actor=threads, ray_cpus=cfg.ray_cpus,
        )  # fmt: skip
    with timer.stage("fit_latent_unet"):
        unet_fit = _fine_tune(store, cfg, progress)
    model = f"models/{RUN}/sd"
    with timer.stage("train_classifier"):
        clf = train_classifier(
            store, RUN, LATENTS, cfg.classifier_arch, cfg.classifier, threads, model=model,
            text_cond=cfg.text_cond,
        )  # fmt: skip
    prompts = read_captions(store, LATENTS, "train", cfg.num_train)
    text = TextGuidance(tuple(prompts), cfg.cfg_scale)
    runs = {}
    for name in SAMPLERS:
        scfg = dataclasses.replace(cfg.sampler, sampler=name, seed=cfg.seed)
        with timer.stage(f"sample_{name}"):
            runs[name] = run_sampling(
                store, RUN, scfg, model, f"models/{RUN}/classifier" if name == "cpsample" else None,
                concurrency=cfg.sample_concurrency,
                cpus_per_actor=max(1, cfg.ray_cpus // cfg.sample_concurrency),
                family=latent_family(text),
            )  # fmt: skip
    with timer.stage("check_replicas"):
        folders = {name: runs[name]["folder"] for name in SAMPLERS}
        checked, (_, base_rows) = check_samplers_and_holdout(
            store, RUN, DATASET, folders, cfg.replicas, cfg.sample_concurrency
        )
    with timer.stage("evaluate"):
        section, figures = evaluate_latent(store, cfg, runs, checked, base_rows, train, holdout)
    report = {
        "scenario": "latent",
        "dataset": DATASET,
        "latents": {k: encoded[k] for k in ("out_dataset", "images", "shards", "images_per_s")},
        "num_train": len(train),
        "num_holdout": len(holdout),
        "threshold": cfg.replicas.threshold,
        "embedding": cfg.replicas.embedding,
        "seed": cfg.seed,
        "cfg_scale": cfg.cfg_scale,
        "num_prompts": len(set(prompts)),
        **section,
        "vae": vae_fit,
        "unet": unet_fit,
        "classifier": clf["metrics"],
        # its model card; below min_fit it was sampled with only under sampler.allow_unfit
        "classifier_fit": {"card": clf.get("fit"), "allow_unfit": cfg.sampler.allow_unfit},
        "timings_s": {**timer.timings, "total": round(time.perf_counter() - t_start, 2)},
        "config": dataclasses.asdict(cfg),
    }
    md = latent_markdown(report, sorted(figures))
    write_scenario_report(store, RUN, report, figures, md)
    print(f"report: {store.uri_of('reports', RUN, 'report.md')}", flush=True)
    return report


# ---------------------------------------------------------------------------------- the evaluation
def _centred_cosine(a: np.ndarray, b: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Row-wise cosine of mean-centred pixels (the replica check's ``centred`` embedding)."""
    a = a.reshape(len(a), -1).astype(np.float32) / 255.0 - mean
    b = b.reshape(len(b), -1).astype(np.float32) / 255.0 - mean
    num = (a * b).sum(1)
    return num / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def vae_ceiling(store: Store, train: ImageSet, threshold: float) -> dict[str, float]:
    """The VAE's own reconstructions of the private images, ``D(E(x))``, against ``x`` under the
    centred embedding: a latent model that reproduces a training latent exactly decodes to this, so
    ``share_above_threshold`` bounds the replication a latent model can show in pixel space."""
    from pipeline.core.latent import decode_latents, encode_images, load_latent_model
    from pipeline.data.checkpoints import resolve_model_dir
    from pipeline.data.imageset import images_from_tensor

    with tempfile.TemporaryDirectory() as tmp:
        model = load_latent_model(resolve_model_dir(store, f"models/{RUN}/sd", tmp))
    with torch.no_grad():
        z = encode_images(model.vae, train.to_tensor(), model.scaling_factor)
        recon = images_from_tensor(decode_latents(model.vae, z, model.scaling_factor))
    mean = train.images.reshape(len(train), -1).astype(np.float32).mean(0) / 255.0
    cos = _centred_cosine(recon, train.images, mean)
    return {
        "mean_cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
        "share_above_threshold": float((cos >= threshold).mean()),
    }


def prompt_digits(metas: list[dict[str, Any]]) -> np.ndarray:
    """The digit each sample was prompted with (its prompt's last word), -1 when none."""
    out = []
    for meta in metas:
        word = str(meta.get("prompt", "")).split()[-1:]
        out.append(int(word[0]) if word and word[0].isdigit() else -1)
    return np.asarray(out)


def evaluate_latent(
    store: Store, cfg: LatentDemoConfig, runs, checked, base_rows, train: ImageSet,
    holdout: ImageSet,
) -> tuple[dict[str, Any], dict[str, bytes]]:  # fmt: skip
    """The per-sampler table (replication, shares above held-out percentiles, quality, prompt
    agreement), the held-out baseline, the VAE ceiling and the figures."""
    from pipeline.evaluation.domain import train_domain_evaluator
    from pipeline.evaluation.report import histogram_figure
    from pipeline.evaluation.shares import holdout_percentiles, threshold_free_shares
    from pipeline.fanout.index import replica_stats

    threshold = cfg.replicas.threshold
    base = np.asarray([r["nn_similarity"] for r in base_rows])
    pct = holdout_percentiles(base)
    evaluator = train_domain_evaluator(
        holdout.to_tensor(), torch.tensor(holdout.labels), cfg.quality_epochs, seed=cfg.seed
    )
    samplers, figures, sims_by = {}, {}, {}
    for name in SAMPLERS:
        stats, rows = checked[name]
        drawn = read_image_shards(store, runs[name]["folder"])
        pos = {k: i for i, k in enumerate(drawn.keys)}
        order = [pos[r["key"]] for r in rows]
        pixels = drawn.images[order]
        sims = np.asarray([r["nn_similarity"] for r in rows])
        x = images_to_tensor(pixels)
        with torch.no_grad():
            predicted = torch.cat([evaluator.model(b).argmax(-1) for b in x.split(512)]).numpy()
        asked = prompt_digits([drawn.meta[i] if drawn.meta else {} for i in order])
        entry = {
            **stats.to_dict(),
            **threshold_free_shares(sims, pct),
            "quality": evaluator.quality(x),
            "prompt_agreement": float((predicted == asked).mean()),
            "guidance_fired_fraction": runs[name].get("guidance_fired_fraction"),
        }
        samplers[name] = entry
        sims_by[name] = sims
        figures.update(
            sampler_figures(name, pixels, rows, train, threshold, f"latent {name} samples")
        )
    relative_to_ddim(samplers)
    sims_by["held-out real"] = base
    figures["nn_similarity_hist.png"] = histogram_figure(sims_by, threshold, pct)
    section = {
        "holdout_baseline": {**replica_stats(base, threshold).to_dict(), **pct},
        "samplers": samplers,
        "vae_ceiling": vae_ceiling(store, train, threshold),
        "quality_metric": "FD-domaincnn and the digit CNN's confident fraction (> 0.9); prompt "
        "agreement: the CNN's digit equals the prompt's",
    }
    return section, figures


# -------------------------------------------------------------------------------------- the report
def latent_markdown(report: dict[str, Any], figures: list[str]) -> str:
    """The scenario's report.md: the table the README quotes, the VAE ceiling, the fits."""
    b, c, s = report["holdout_baseline"], report["vae_ceiling"], report["config"]["sampler"]
    lines = [
        "# CPSample on a latent text-to-image model",
        "",
        f"A latent diffusion model (VAE, frozen random CLIP text encoder, conditional UNet) "
        f"fine-tuned on {report['num_train']} private digits with captions "
        f"({report['num_prompts']} distinct prompts), sampled with classifier-free guidance "
        f"w = {report['cfg_scale']} and DDIM-{s['steps']}; CPSample alpha {s['alpha']}, "
        f"scale {s['scale']} in latent space (seed {report['seed']}). Copies are counted after "
        f"decoding, in pixel space: threshold {report['threshold']} ({report['embedding']}); "
        f"held-out real digits: {pct(b['replication_rate'])} above it, p95 "
        f"{num(b['holdout_p95'], 4)}, p99 {num(b['holdout_p99'], 4)}.",
        "",
        "| sampler | replication | > held-out p95 | > held-out p99 | mean NN sim "
        "| confident fraction (x DDIM) | FD-domaincnn | prompt agreement | guidance fired |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in report["samplers"].items():
        q = e.get("quality") or {}
        lines.append(
            f"| {name} | {pct(e['replication_rate'])} | {pct(e['above_holdout_p95'])} | "
            f"{pct(e['above_holdout_p99'])} | {num(e['mean_nn_similarity'], 4)} | "
            f"{num(q.get('confident_fraction'))} ({num(e.get('confident_fraction_vs_ddim'), 2)}x)"
            f" | {num(q.get('fd'), 2)} | {pct(e['prompt_agreement'])} | "
            f"{num(e.get('guidance_fired_fraction'))} |"
        )
    v, u = report["vae"], report["unet"]
    lines += [
        "",
        f"VAE ceiling: the VAE's own reconstructions of the private digits have centred cosine "
        f"{num(c['mean_cosine'], 4)} on average (min {num(c['min_cosine'], 4)}) with their "
        f"originals; {pct(c['share_above_threshold'])} of them count as copies. A sample that "
        "reproduces a training latent exactly cannot score higher.",
        "",
        f"VAE fit: {v['steps']} steps, loss {num(v['loss_last'], 4)}, scaling factor "
        f"{num(v['scaling_factor'], 3)}. UNet fit: {u['steps']} steps, loss "
        f"{num(u['loss_first'], 4)} -> {num(u['loss_last'], 4)}. Latents: "
        f"{report['latents']['images']} images encoded in {report['latents']['shards']} shards.",
        "",
        f"Timings (s): {report['timings_s']}",
        "",
    ]
    lines += [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"
