"""Membership-inference attacks on a diffusion model and the metrics that score them (Ray-free).

Attacks (each returns per-image *errors*; members are expected to have the smaller ones):
- :func:`reconstruction_errors`: the loss attack of Matsumoto et al. 2023 ("Membership Inference
  Attacks against Diffusion Models", sec. 3): noise ``x_0`` to ``x_t`` with the forward process
  (Ho et al. 2020, eq. 4), predict the noise and measure ``||eps_hat(x_t, t) - eps||^2``, averaged over
  a few ``t`` and noise draws. With CPSample, ``eps_hat`` is the classifier-corrected estimate of the
  guidance function (CPSample supplement: the attacker sees the protected model's noise estimate).
- :func:`secmi_errors`: SecMI's t-error (Duan et al. 2023, eq. 8): invert ``x_0`` deterministically
  with DDIM to ``x_t``, take one deterministic step up to ``x_{t+k}`` and one DDIM step back down, and
  measure ``||x_t - x~_t||^2``.
- :func:`nn_similarity_scores`: the nearest-generated-sample attack: a member's similarity to its
  nearest generated sample is higher than a non-member's when the model copies. The samples stream
  through :class:`NearestSamples` in bounded chunks (an exact FAISS index per chunk, a running top-1
  per query), never as a dense (queries x samples) matrix.
  :class:`SampleOnlyAttack` runs it on any set of samples (one sweep point), per member group too.

The attacks work in eps whatever the network predicts: the denoiser adapter converts a v-prediction
or x_0 model's output (:class:`pipeline.core.sampler.UNetDenoiser`).

Metrics (:func:`attack_metrics`): ROC AUC (the Mann-Whitney U statistic, ties counted 1/2), TPR at a
fixed FPR, and a two-sided permutation-test p-value for the difference of means.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata

from pipeline.core.diffusion import Schedule, pred_xstart_from_eps, q_sample
from pipeline.core.guidance import GuidanceFn
from pipeline.core.sampler import DenoiserFn, check_denoiser, derive_seed

DEFAULT_TIMESTEPS = (50, 100, 150, 200, 300)


# ------------------------------------------------------------------------------------------ metrics
def roc_auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """``P(score_member > score_nonmember) + 0.5 P(=)``: AUC as the normalised Mann-Whitney U.

    Scores are "membership scores" (higher = more likely a member).
    """
    m = np.asarray(member_scores, dtype=np.float64).reshape(-1)
    n = np.asarray(nonmember_scores, dtype=np.float64).reshape(-1)
    if m.size == 0 or n.size == 0:
        raise ValueError(f"need members and non-members, got {m.size} and {n.size} scores")
    ranks = rankdata(np.concatenate([m, n]))  # average ranks for ties
    u = ranks[: m.size].sum() - m.size * (m.size + 1) / 2.0
    return float(u / (m.size * n.size))


def roc_curve(
    member_scores: np.ndarray, nonmember_scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct threshold, from (0, 0) to (1, 1), predicting "member" when
    ``score >= threshold``."""
    m = np.asarray(member_scores, dtype=np.float64).reshape(-1)
    n = np.asarray(nonmember_scores, dtype=np.float64).reshape(-1)
    scores = np.concatenate([m, n])
    labels = np.concatenate([np.ones(m.size), np.zeros(n.size)])
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    last = np.r_[np.nonzero(np.diff(scores))[0], scores.size - 1]  # last index of each threshold
    tpr = np.r_[0.0, np.cumsum(labels)[last] / m.size]
    fpr = np.r_[0.0, np.cumsum(1 - labels)[last] / n.size]
    return fpr, tpr


def tpr_at_fpr(member_scores: np.ndarray, nonmember_scores: np.ndarray, fpr: float = 0.01) -> float:
    """The largest TPR among thresholds whose FPR is at most ``fpr`` (Carlini et al. 2022's metric)."""
    f, t = roc_curve(member_scores, nonmember_scores)
    return float(t[f <= fpr + 1e-12].max())


def permutation_test(
    a: np.ndarray, b: np.ndarray, num_permutations: int = 10_000, seed: int = 0
) -> float:
    """Two-sided permutation p-value for ``mean(a) - mean(b)``: ``(1 + #{|d*| >= |d|}) / (1 + P)``.

    Vectorised: all ``P`` relabellings are drawn at once as rows of a random permutation matrix.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.size == 0 or b.size == 0:
        raise ValueError(f"need two non-empty samples, got {a.size} and {b.size} values")
    pooled = np.concatenate([a, b])
    observed = abs(a.mean() - b.mean())
    rng = np.random.default_rng(seed)
    hits = 0
    for lo in range(0, num_permutations, 2048):  # bounded memory: (chunk, n) at a time
        rows = min(2048, num_permutations - lo)
        perm = rng.random((rows, pooled.size)).argsort(axis=1)
        shuffled = pooled[perm]
        diff = shuffled[:, : a.size].mean(1) - shuffled[:, a.size :].mean(1)
        hits += int((np.abs(diff) >= observed - 1e-12).sum())
    return float((1 + hits) / (1 + num_permutations))


def attack_metrics(
    member_errors: np.ndarray,
    nonmember_errors: np.ndarray,
    fpr: float = 0.01,
    num_permutations: int = 10_000,
    seed: int = 0,
) -> dict[str, Any]:
    """AUC, TPR at ``fpr`` and the permutation p-value for an error-based attack (score = -error)."""
    m = np.asarray(member_errors, dtype=np.float64)
    n = np.asarray(nonmember_errors, dtype=np.float64)
    return {
        "auc": roc_auc(-m, -n),
        "tpr_at_fpr": tpr_at_fpr(-m, -n, fpr),
        "fpr": fpr,
        "p_value": permutation_test(m, n, num_permutations, seed),
        "member_mean": float(m.mean()),
        "nonmember_mean": float(n.mean()),
        "num_members": int(m.size),
        "num_nonmembers": int(n.size),
    }


def error_attack_report(
    member_errors: np.ndarray, nonmember_errors: np.ndarray, num_permutations: int, seed: int
) -> dict[str, Any]:
    """:func:`attack_metrics` of an error-based attack plus its ROC curve (score = -error), as
    the reconstruction, SecMI and PIA attacks report it."""
    out = attack_metrics(
        member_errors, nonmember_errors, num_permutations=num_permutations, seed=seed
    )
    fpr, tpr = roc_curve(-np.asarray(member_errors), -np.asarray(nonmember_errors))
    out["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    return out


# ------------------------------------------------------------------------------------------ attacks
def _noise(shape: tuple[int, ...], *parts: int | str) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(derive_seed(*parts)))


def _eps(
    denoiser: DenoiserFn,
    schedule: Schedule,
    x_t: torch.Tensor,
    t: int,
    guidance: GuidanceFn | None,
) -> torch.Tensor:
    """The model's noise estimate at ``(x_t, t)``; the guided one when ``guidance`` is given.

    Always eps, whatever the network predicts: ``denoiser`` converts (``unet_denoiser(unet, schedule)``,
    e.g. ``eps = sqrt(abar) v + sqrt(1 - abar) x_t`` for v-prediction, Salimans & Ho 2022), and one
    adapted for another prediction type than the schedule's is refused.
    """
    check_denoiser(denoiser, schedule)
    t_batch = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
    with torch.no_grad():
        eps = denoiser(x_t, t_batch).float()
    if guidance is not None:
        eps = guidance(x_t, t_batch, eps, schedule.abar(t_batch)).eps.detach()
    return eps


def reconstruction_errors(
    denoiser: DenoiserFn,
    schedule: Schedule,
    x0: torch.Tensor,
    timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
    draws: int = 2,
    seed: int = 0,
    guidance: GuidanceFn | None = None,
    batch_size: int = 256,
) -> dict[str, np.ndarray]:
    """Per-image ``mean_pixels ||eps_hat(x_t, t) - eps||^2`` (Matsumoto et al. 2023), x_0 (N, C, H, W).

    The noise of image ``i`` at ``(t, draw)`` comes from a seed of ``(seed, t, draw, i)``, so every
    model is attacked with the same noise. Returns ``{"mean": (N,), "t<t>": (N,) per t}``.
    """
    per_t: dict[str, np.ndarray] = {}
    for t in timesteps:
        total = torch.zeros(len(x0))
        for d in range(draws):
            for lo in range(0, len(x0), batch_size):
                xb = x0[lo : lo + batch_size].float()
                noise = torch.stack(
                    [
                        _noise(tuple(xb.shape[1:]), "mia-rec", seed, t, d, lo + i)
                        for i in range(len(xb))
                    ]
                )
                t_batch = torch.full((len(xb),), t, dtype=torch.long)
                x_t = q_sample(schedule, xb, t_batch, noise)
                eps = _eps(denoiser, schedule, x_t, t, guidance)
                total[lo : lo + len(xb)] += (eps - noise).pow(2).flatten(1).mean(1).cpu()
        per_t[f"t{t}"] = (total / draws).numpy()
    per_t["mean"] = np.mean([per_t[f"t{t}"] for t in timesteps], axis=0)
    return per_t


def _ddim_move(schedule: Schedule, x: torch.Tensor, eps: torch.Tensor, t_from: int, t_to: int):
    """Deterministic DDIM map between any two timesteps (Song et al. 2021, eq. 12 with sigma = 0),
    used upward for inversion and downward for denoising; no clipping, so it is invertible."""
    abar_from = schedule.abar(torch.full((x.shape[0],), t_from, dtype=torch.long))
    abar_to = float(schedule.alphas_cumprod[t_to])
    x0 = pred_xstart_from_eps(x, eps, abar_from)
    return abar_to**0.5 * x0 + (1.0 - abar_to) ** 0.5 * eps


def secmi_errors(
    denoiser: DenoiserFn,
    schedule: Schedule,
    x0: torch.Tensor,
    t_sec: int = 100,
    k: int = 10,
    guidance: GuidanceFn | None = None,
    batch_size: int = 256,
) -> np.ndarray:
    """SecMI t-error (Duan et al. 2023, eq. 8) per image: ``||x_t - psi(phi(x_t, t), t + k)||^2``.

    ``x_t`` is the deterministic DDIM inversion of ``x_0`` in steps of ``k`` (0 -> k -> ... -> t_sec),
    ``phi`` one more inversion step to ``t_sec + k`` and ``psi`` the DDIM step back down to ``t_sec``.
    """
    if t_sec % k or t_sec <= 0 or t_sec + k >= schedule.num_train_timesteps:
        raise ValueError(f"need 0 < t_sec < T - k and t_sec divisible by k, got {t_sec}, {k}")
    out = []
    for lo in range(0, len(x0), batch_size):
        x = x0[lo : lo + batch_size].float()
        s, x_s = 0, x  # x_0 sits at t = 0 (abar_0 = 1 - beta_0)
        while s < t_sec:
            x_s = _ddim_move(schedule, x_s, _eps(denoiser, schedule, x_s, s, guidance), s, s + k)
            s += k
        x_up = _ddim_move(schedule, x_s, _eps(denoiser, schedule, x_s, s, guidance), s, s + k)
        x_back = _ddim_move(
            schedule, x_up, _eps(denoiser, schedule, x_up, s + k, guidance), s + k, s
        )
        out.append((x_back - x_s).pow(2).flatten(1).mean(1).cpu())
    return torch.cat(out).numpy()


def pixel_embedding(images: np.ndarray, mean: np.ndarray | None = None) -> np.ndarray:
    """uint8 (N, H, W, C) -> L2-normalised float32 (N, H W C) rows of ``x / 255 - mean`` (``mean``:
    the training split's flattened mean image in [0, 1]; None: raw pixels); inner product = cosine."""
    flat = images.reshape(len(images), -1).astype(np.float32) / 255.0
    flat = flat - mean if mean is not None else flat
    return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)


class NearestSamples:
    """Running top-1: each query's cosine similarity to its nearest generated sample, with the
    samples streamed in chunks (:meth:`update`) and never held together.

    Each chunk of at most ``chunk`` samples is embedded (:func:`pixel_embedding`), put in an exact
    FAISS ``IndexFlatIP`` and searched with all the queries; ``best = max(best, top-1 of the chunk)``.
    Memory: the queries' embeddings plus one chunk's, whatever the number of samples, and the result
    equals the dense ``max_j <q_i, g_j>`` (float32 inner products)."""

    def __init__(self, queries: np.ndarray, mean: np.ndarray | None = None, chunk: int = 2048):
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1 sample, got {chunk}")
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float32).reshape(-1)
        self.queries = pixel_embedding(np.asarray(queries), self.mean)
        self.chunk = chunk
        self.best = np.full(len(self.queries), -np.inf, dtype=np.float32)
        self.count = 0  # samples seen

    def update(self, generated: np.ndarray) -> NearestSamples:
        """Fold a batch of generated uint8 (G, H, W, C) samples (any G), ``chunk`` at a time."""
        import faiss

        generated = np.asarray(generated)
        dim = int(np.prod(generated.shape[1:])) if generated.ndim > 1 else -1
        if dim != self.queries.shape[1]:
            raise ValueError(
                f"generated samples of shape {generated.shape[1:]} ({dim} values) do not match the "
                f"queries' {self.queries.shape[1]} values per image"
            )
        for lo in range(0, len(generated), self.chunk):
            emb = pixel_embedding(generated[lo : lo + self.chunk], self.mean)
            index = faiss.IndexFlatIP(emb.shape[1])
            index.add(emb)
            sims, _ = index.search(self.queries, 1)  # (Q, 1)
            np.maximum(self.best, sims[:, 0], out=self.best)
            self.count += len(emb)
        return self

    def scores(self) -> np.ndarray:
        """Each query's nearest-sample similarity (Q,), float32."""
        if self.count == 0:
            raise ValueError("no generated samples to attack with")
        return self.best.copy()


def nn_similarity_scores(
    queries: np.ndarray, generated: np.ndarray, mean: np.ndarray | None = None, chunk: int = 2048
) -> np.ndarray:
    """Cosine similarity of each query image to its nearest generated image (N,), on mean-centred
    pixels when ``mean`` (the training mean image, flattened, in [0, 1]) is given. Images are uint8
    (N, H, W, C); the samples are searched ``chunk`` at a time (:class:`NearestSamples`)."""
    return NearestSamples(queries, mean, chunk).update(generated).scores()


def group_masks(
    keys: Sequence[str], groups: Mapping[str, Collection[str]] | None
) -> dict[str, np.ndarray]:
    """``{name: bool mask over keys}``: which of ``keys`` each group (a collection of keys, possibly
    holding keys beyond ``keys``) contains. Empty without groups."""
    out = {}
    for name, members in (groups or {}).items():
        chosen = set(members)
        out[name] = np.fromiter((k in chosen for k in keys), dtype=bool, count=len(keys))
    return out


@dataclass
class SampleOnlyAttack:
    """The nearest-generated-sample membership attack on one set of samples (for example one sweep
    point): score = the candidate's cosine similarity to its nearest generated sample in the centred
    pixel embedding (``mean``: the training split's flattened mean image in [0, 1]); members are
    training images, non-members held-out images no model has seen. It needs only the samples, no
    model.

    ``members``/``nonmembers``: uint8 (N, H, W, C). ``groups``: optional bool masks over the members
    (``"duplicated"``, ``"unique"``, ...); each group is scored against all the non-members."""

    members: np.ndarray
    nonmembers: np.ndarray
    mean: np.ndarray | None
    groups: dict[str, np.ndarray] | None = None

    def __post_init__(self) -> None:
        if len(self.members) == 0 or len(self.nonmembers) == 0:
            raise ValueError(
                f"need members and non-members, got {len(self.members)} and {len(self.nonmembers)}"
            )
        self.groups = {
            k: np.asarray(v, dtype=bool).reshape(-1) for k, v in (self.groups or {}).items()
        }
        for name, mask in self.groups.items():
            if mask.size != len(self.members):
                raise ValueError(
                    f"group {name!r} masks {mask.size} members, the attack has {len(self.members)}"
                )

    def scores(self, generated: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(member scores, non-member scores) against ``generated`` uint8 (G, H, W, C)."""
        if len(generated) == 0:
            raise ValueError("no generated samples to attack with")
        return (
            nn_similarity_scores(self.members, generated, self.mean),
            nn_similarity_scores(self.nonmembers, generated, self.mean),
        )

    def aucs(self, generated: np.ndarray) -> dict[str, float]:
        """``{"mia_auc": .., "mia_auc_<group>": ..}`` (0.5 = no better than chance, 1 = every member
        is closer to a sample than every non-member); groups without members are left out."""
        sm, sn = self.scores(generated)
        out = {"mia_auc": roc_auc(sm, sn)}
        for name, mask in (self.groups or {}).items():
            if mask.any():
                out[f"mia_auc_{name}"] = roc_auc(sm[mask], sn)
        return out

    def describe(self) -> dict[str, Any]:
        """Sizes for a report: members, non-members and members per group."""
        return {
            "attack": "nearest generated sample (cosine, centred pixels)",
            "num_members": len(self.members),
            "num_nonmembers": len(self.nonmembers),
            "groups": {k: int(v.sum()) for k, v in (self.groups or {}).items()},
        }


def reconstruction_attack(
    unet: torch.nn.Module,
    schedule: Schedule,
    members: torch.Tensor,
    nonmembers: torch.Tensor,
    guidance: GuidanceFn | None = None,
    timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
    draws: int = 2,
    seed: int = 0,
    num_permutations: int = 10_000,
) -> dict[str, Any]:
    """Attack 1 end to end on (N, C, H, W) tensors in [-1, 1]: metrics on the t-averaged error, the
    AUC per t (an attacker would pick the best t), and the ROC curve for the figure."""
    from pipeline.core.sampler import unet_denoiser

    den = unet_denoiser(unet, schedule)
    em = reconstruction_errors(den, schedule, members, timesteps, draws, seed, guidance)
    en = reconstruction_errors(den, schedule, nonmembers, timesteps, draws, seed + 1, guidance)
    out = error_attack_report(em["mean"], en["mean"], num_permutations, seed)
    out["auc_per_t"] = {k: roc_auc(-em[k], -en[k]) for k in em if k != "mean"}
    out["timesteps"] = list(timesteps)
    out["draws"] = draws
    return out


def secmi_attack(
    unet: torch.nn.Module,
    schedule: Schedule,
    members: torch.Tensor,
    nonmembers: torch.Tensor,
    guidance: GuidanceFn | None = None,
    t_sec: int = 100,
    k: int = 10,
    seed: int = 0,
    num_permutations: int = 10_000,
) -> dict[str, Any]:
    """Attack 2 (SecMI t-error) end to end; same keys as :func:`reconstruction_attack`'s metrics."""
    from pipeline.core.sampler import unet_denoiser

    den = unet_denoiser(unet, schedule)
    em = secmi_errors(den, schedule, members, t_sec, k, guidance)
    en = secmi_errors(den, schedule, nonmembers, t_sec, k, guidance)
    return {**error_attack_report(em, en, num_permutations, seed), "t_sec": t_sec, "k": k}
