"""Membership inference: does a model still behave as if it had trained on a point?

Two attacks, both scored so that a *higher* score means "more likely a member":

* **Threshold attacks** (Yeom et al. 2018): the score is the negative cross-entropy loss of the
  true label, or the model's maximum probability. No reference models needed.
* **LiRA** (Carlini et al., "Membership Inference Attacks From First Principles", S&P 2022):
  train shadow models on random halves of a population, record for every example the
  logit-scaled confidence ``phi = log(p_y / (1 - p_y))`` of the shadows that trained on it (IN)
  and of those that did not (OUT), fit a Gaussian to each, and score the target's ``phi`` by the
  likelihood ratio ``log N(phi; mu_in, s_in) - log N(phi; mu_out, s_out)`` (online LiRA). The
  offline variant uses only OUT models: the score is ``(phi - mu_out) / s_out``, which ranks
  exactly like the one-sided p-value LiRA reports. With few shadows, use one pooled variance
  (``fix_variance=True``), as the LiRA paper recommends below 64 shadow models.

Shadow models are trained with the project's engine in *one* compiled program: a shadow SISA
ensemble of S constituents is S "shards" of one :meth:`~sisajax.engine.Engine.train_slices`
call, and E ensembles are ``E * S`` shards of the same call (each keyed by its own shard index,
so every model has its own init and batch order). Single-model shadows are the special case
``S = R = 1``.

Metrics come from the exact empirical ROC: :func:`roc_curve` walks every distinct threshold,
:func:`auc_score` is the Mann-Whitney rank statistic (ties count one half), and
:func:`tpr_at_fpr` is the largest TPR among ROC points with FPR <= the target. With ``n``
non-members the smallest non-zero FPR is ``1/n``: below it, "TPR at FPR x" is the TPR at FPR 0.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from sisajax.aggregation import softmax
from sisajax.config import RunConfig
from sisajax.data.partition import hash_partition, key_word
from sisajax.engine import Engine, ShardData, ShardJob, stack_states
from sisajax.layout import resolve_shard_exec

PyTree = Any
DEFAULT_FPRS = (0.01, 0.001)

# ---------------------------------------------------------------------------------------------
# ROC metrics


def _check_scores(scores: np.ndarray, is_member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    is_member = np.asarray(is_member, dtype=bool).ravel()
    if scores.shape != is_member.shape:
        raise ValueError(f"{scores.shape[0]} scores but {is_member.shape[0]} membership labels")
    if is_member.all() or not is_member.any():
        raise ValueError("need at least one member and one non-member")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    return scores, is_member


def roc_curve(
    scores: np.ndarray, is_member: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact empirical ROC of the rule "member iff score >= threshold".

    Args:
      scores: ``[n]`` attack scores (higher = more likely a member).
      is_member: ``[n]`` bool ground truth.

    Returns:
      ``(fpr [T+1], tpr [T+1], thresholds [T+1])`` over the ``T`` distinct scores in decreasing
      order, starting at ``(0, 0)`` (threshold ``+inf``) and ending at ``(1, 1)``.
    """
    scores, is_member = _check_scores(scores, is_member)
    order = np.argsort(-scores, kind="stable")
    s, m = scores[order], is_member[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # last index of each tie group
    tp = np.cumsum(m)[last]
    fp = np.cumsum(~m)[last]
    fpr = np.r_[0.0, fp / (~is_member).sum()]
    tpr = np.r_[0.0, tp / is_member.sum()]
    return fpr, tpr, np.r_[np.inf, s[last]]


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given their average rank."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    starts = np.r_[0, np.flatnonzero(np.diff(xs) != 0) + 1]
    ends = np.r_[starts[1:], len(xs)]
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auc_score(scores: np.ndarray, is_member: np.ndarray) -> float:
    """Area under the ROC curve by the Mann-Whitney rank statistic.

    ``P(score(member) > score(non-member)) + P(tie) / 2``, computed from mid-ranks in
    ``O(n log n)``.
    """
    scores, is_member = _check_scores(scores, is_member)
    n1, n0 = int(is_member.sum()), int((~is_member).sum())
    r = _midranks(scores)[is_member].sum()
    return float((r - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """Largest TPR among ROC points with FPR <= ``target`` (ROC from :func:`roc_curve`)."""
    ok = np.asarray(fpr) <= target + 1e-12
    return float(np.max(np.asarray(tpr)[ok]))


@dataclasses.dataclass
class AttackResult:
    """ROC and summary of one attack on one set of members vs non-members.

    Attributes:
      name: what was attacked and how (free text).
      fpr, tpr: ``[T+1]`` the exact ROC curve.
      auc: area under it.
      tpr_at: ``{fpr target: TPR}`` (see :func:`tpr_at_fpr`).
      n_members, n_nonmembers: sample sizes.
    """

    name: str
    fpr: np.ndarray
    tpr: np.ndarray
    auc: float
    tpr_at: dict[float, float]
    n_members: int
    n_nonmembers: int

    @property
    def auc_null_sd(self) -> float:
        """Standard deviation of the AUC of a useless attack at these sample sizes (no ties):
        ``sqrt((n1 + n0 + 1) / (12 n1 n0))``. An AUC within ~2 of these from 0.5 is noise."""
        n1, n0 = self.n_members, self.n_nonmembers
        return math.sqrt((n1 + n0 + 1) / (12.0 * n1 * n0))

    @property
    def advantage(self) -> float:
        """Membership advantage: max over thresholds of TPR - FPR."""
        return float(np.max(self.tpr - self.fpr))

    def to_dict(self, curve: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "auc": self.auc,
            "auc_null_sd": self.auc_null_sd,
            "advantage": self.advantage,
            "n_members": self.n_members,
            "n_nonmembers": self.n_nonmembers,
        }
        for t, v in self.tpr_at.items():
            d[f"tpr_at_{t:g}_fpr"] = v
        if curve:
            d["fpr"] = self.fpr.tolist()
            d["tpr"] = self.tpr.tolist()
        return d


def evaluate_attack(
    member_scores: np.ndarray,
    nonmember_scores: np.ndarray,
    name: str = "attack",
    fprs: Sequence[float] = DEFAULT_FPRS,
) -> AttackResult:
    """ROC, AUC and TPR at low FPR of scores ``[n1]`` (members) vs ``[n0]`` (non-members)."""
    s1 = np.asarray(member_scores, dtype=np.float64).ravel()
    s0 = np.asarray(nonmember_scores, dtype=np.float64).ravel()
    scores = np.r_[s1, s0]
    truth = np.r_[np.ones(len(s1), bool), np.zeros(len(s0), bool)]
    fpr, tpr, _ = roc_curve(scores, truth)
    return AttackResult(
        name,
        fpr,
        tpr,
        auc_score(scores, truth),
        {float(t): tpr_at_fpr(fpr, tpr, t) for t in fprs},
        len(s1),
        len(s0),
    )


# ---------------------------------------------------------------------------------------------
# Per-example statistics of a model's output


def _true_class(a: np.ndarray, labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    idx = np.broadcast_to(labels, a.shape[:-1])[..., None]
    return np.take_along_axis(a, idx, axis=-1)[..., 0]


def _logsumexp(z: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(z, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return (m + np.log(np.sum(np.exp(z - m), axis=axis, keepdims=True)))[..., 0]


def loss_score(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Negative cross-entropy of the true label. logits ``[..., M, C]``, labels ``[M]`` -> ``[..., M]``."""
    z = np.asarray(logits, dtype=np.float64)
    return _true_class(z, labels) - _logsumexp(z)


def confidence_score(logits: np.ndarray) -> np.ndarray:
    """Maximum softmax probability. logits ``[..., M, C]`` -> ``[..., M]``."""
    return softmax(np.asarray(logits)).max(-1)


def scaled_logit(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """LiRA's ``phi = log(p_y / (1 - p_y))``, computed stably from logits.

    ``log p_y - log(1 - p_y) = z_y - logsumexp_{c != y} z_c``. logits ``[..., M, C]``,
    labels ``[M]`` -> ``[..., M]``.
    """
    z = np.asarray(logits, dtype=np.float64)
    zy = _true_class(z, labels)
    idx = np.broadcast_to(np.asarray(labels), z.shape[:-1])[..., None]
    others = z.copy()
    np.put_along_axis(others, idx, -np.inf, axis=-1)
    return zy - _logsumexp(others)


def prob_scaled_logit(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """``phi`` from probabilities (e.g. an ensemble's mean probability). ``[..., M, C]`` -> ``[..., M]``."""
    p = np.clip(_true_class(np.asarray(probs, dtype=np.float64), labels), eps, 1 - eps)
    return np.log(p) - np.log1p(-p)


@dataclasses.dataclass(frozen=True)
class ModelView:
    """The per-example outputs one attack needs, for one model (or an ensemble as a whole).

    Attributes:
      loss: ``[M]`` negative cross-entropy of the true label.
      confidence: ``[M]`` maximum probability.
      phi: ``[M]`` logit-scaled confidence of the true label.
    """

    loss: np.ndarray
    confidence: np.ndarray
    phi: np.ndarray

    @classmethod
    def from_logits(cls, logits: np.ndarray, labels: np.ndarray) -> ModelView:
        """One model's logits ``[M, C]`` (or ``[..., M, C]``)."""
        return cls(
            loss_score(logits, labels), confidence_score(logits), scaled_logit(logits, labels)
        )

    @classmethod
    def from_probs(cls, probs: np.ndarray, labels: np.ndarray) -> ModelView:
        """Probabilities ``[M, C]`` (an ensemble's mean probability vector)."""
        p = np.asarray(probs, dtype=np.float64)
        py = np.clip(_true_class(p, labels), 1e-300, 1.0)
        return cls(np.log(py), p.max(-1), prob_scaled_logit(p, labels))


def ensemble_probs(logits: np.ndarray, active: np.ndarray | None = None) -> np.ndarray:
    """Mean probability over (active) constituents: logits ``[S, M, C]`` -> ``[M, C]``."""
    lg = np.asarray(logits)
    if active is not None:
        lg = lg[np.asarray(active, bool)]
    return softmax(lg).mean(0)


# ---------------------------------------------------------------------------------------------
# LiRA


def lira_scores(
    target_phi: np.ndarray,
    shadow_phi: np.ndarray,
    shadow_in: np.ndarray,
    *,
    online: bool = True,
    fix_variance: bool = True,
    min_sd: float = 1e-3,
) -> np.ndarray:
    """Per-example LiRA likelihood-ratio scores (higher = more likely a member).

    Args:
      target_phi: ``[M]`` the target model's ``phi`` of each example.
      shadow_phi: ``[N, M]`` every shadow model's ``phi`` of each example.
      shadow_in: ``[N, M]`` bool, whether shadow ``n`` trained on example ``m``.
      online: use IN and OUT Gaussians (likelihood ratio); False: OUT only (offline LiRA).
      fix_variance: one pooled standard deviation for all IN (and one for all OUT) statistics
        instead of per-example ones (better with few shadows).
      min_sd: floor on standard deviations.

    Returns:
      ``[M]`` scores. An example with no IN shadow (online) gets ``mu_in = mu_out + d`` with ``d``
      the mean IN-OUT shift over the other examples; one with no OUT shadow gets the symmetric
      fallback.
    """
    phi = np.asarray(shadow_phi, np.float64)
    inn = np.asarray(shadow_in, bool)
    t = np.asarray(target_phi, np.float64)
    if phi.shape != inn.shape or phi.shape[1:] != t.shape:
        raise ValueError(f"shapes differ: target {t.shape}, shadow {phi.shape}, in {inn.shape}")

    def stats(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        n = mask.sum(0)
        mu = np.where(n > 0, (phi * mask).sum(0) / np.maximum(n, 1), np.nan)
        dev = np.where(mask, phi - np.nan_to_num(mu), 0.0)
        sd = np.sqrt((dev**2).sum(0) / np.maximum(n - 1, 1))
        pooled = float(np.sqrt((dev**2).sum() / max(int(n.sum() - (n > 0).sum()), 1)))
        return mu, sd, n, pooled

    mu_out, sd_out, n_out, pool_out = stats(~inn)
    mu_in, sd_in, n_in, pool_in = stats(inn)
    both = (n_in > 0) & (n_out > 0)
    shift = float(np.mean(mu_in[both] - mu_out[both])) if both.any() else 0.0
    mu_out = np.where(n_out > 0, mu_out, mu_in - shift)
    mu_in = np.where(n_in > 0, mu_in, mu_out + shift)
    if fix_variance:
        sd_in = np.full_like(t, pool_in)
        sd_out = np.full_like(t, pool_out)
    else:  # per example; fall back to the pooled value where a side has < 2 models
        sd_in = np.where(n_in > 1, sd_in, pool_in)
        sd_out = np.where(n_out > 1, sd_out, pool_out)
    sd_in, sd_out = np.maximum(sd_in, min_sd), np.maximum(sd_out, min_sd)
    if not online:
        return (t - mu_out) / sd_out

    def loglik(x, mu, sd):
        return -0.5 * ((x - mu) / sd) ** 2 - np.log(sd)

    return loglik(t, mu_in, sd_in) - loglik(t, mu_out, sd_out)


@dataclasses.dataclass(frozen=True)
class Population:
    """Examples the attacker can train shadow models on: ids ``[P]``, x ``[P, *feat]``, y ``[P]``."""

    ids: np.ndarray
    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if not len(self.ids) == len(self.x) == len(self.y):
            raise ValueError("population ids, x and y differ in length")
        if len(np.unique(self.ids)) != len(self.ids):
            raise ValueError("population ids are not unique")


@dataclasses.dataclass
class ShadowSet:
    """E shadow ensembles of S constituent models each, trained on random halves of a population.

    Attributes:
      config: the recipe the shadows were trained with (the target's, with its own seed).
      logits: ``[E*S, P, C]`` every shadow constituent's logits on the population (model
        ``e*S + k`` is constituent ``k`` of ensemble ``e``).
      member: ``[E*S, P]`` bool, constituent trained on the example.
      ensemble_member: ``[E, P]`` bool, the example was in ensemble ``e``'s training half.
      active: ``[E*S]`` bool, constituent holds data (empty ones drop out of the ensemble mean).
      train_s: wall seconds of training (compile included).
    """

    config: RunConfig
    logits: np.ndarray
    member: np.ndarray
    ensemble_member: np.ndarray
    active: np.ndarray
    train_s: float

    @property
    def num_ensembles(self) -> int:
        return self.ensemble_member.shape[0]

    @property
    def ensemble_size(self) -> int:
        return self.member.shape[0] // self.num_ensembles

    def constituent_phi(self, labels: np.ndarray) -> np.ndarray:
        """``[E*S, P]`` phi of every shadow constituent."""
        return scaled_logit(self.logits, labels)

    def ensemble_phi(self, labels: np.ndarray) -> np.ndarray:
        """``[E, P]`` phi of every shadow ensemble's mean probability (active constituents)."""
        s = self.ensemble_size
        out = []
        for e in range(self.num_ensembles):
            probs = ensemble_probs(
                self.logits[e * s : (e + 1) * s], self.active[e * s : (e + 1) * s]
            )
            out.append(prob_scaled_logit(probs, labels))
        return np.stack(out)


def balanced_halves(num_models: int, n: int, seed: int, fraction: float = 0.5) -> np.ndarray:
    """``[num_models, n]`` bool: each example is IN for ``round(fraction * num_models)`` models,
    chosen uniformly (the LiRA paper's balanced assignment)."""
    if num_models < 2:
        raise ValueError("need at least 2 shadow models (some IN and some OUT for every example)")
    k = min(max(int(round(fraction * num_models)), 1), num_models - 1)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x11BA]))
    ranks = rng.random((num_models, n)).argsort(0).argsort(0)
    return ranks < k


def train_shadows(
    config: RunConfig,
    population: Population,
    num_classes: int,
    num_ensembles: int,
    *,
    fraction: float = 0.5,
    seed: int = 0,
    preprocessing: dict[str, float] | None = None,
) -> ShadowSet:
    """Train ``num_ensembles`` shadow SISA ensembles (the recipe of ``config``) in one program.

    Ensemble ``e`` trains on a random ``fraction`` of the population (balanced: each example is
    in ``fraction * E`` ensembles), split into ``config.sisa.shards`` shards and
    ``config.sisa.slices`` slices by :func:`~sisajax.data.hash_partition`, with the same model,
    optimizer, epochs, batch size and slice schedule as the target. For single-model shadows pass a
    config with ``shards = slices = 1``.

    Args:
      config: the target's training recipe.
      population: the examples ``[P]``.
      num_classes: C.
      num_ensembles: E (>= 2).
      fraction: share of the population each ensemble trains on.
      seed: seeds the halves and the shadows' init and batch order (never equal to the target's).
      preprocessing: the target data set's input map (see :class:`~sisajax.data.Dataset`).

    Returns:
      a :class:`ShadowSet` with ``[E*S, P, C]`` logits.
    """
    t0 = time.perf_counter()
    s, r = config.sisa.shards, config.sisa.slices
    shadow_seed = key_word(seed, config.sisa.seed, 0x5AD0) & 0x7FFFFFFF
    width = num_ensembles * s
    # The recipe keeps S (the learning rate and epochs scale with S, not with the program's
    # width); the program is E*S wide.
    cfg = config.replace(
        sisa={"seed": shadow_seed, "shard_exec": resolve_shard_exec(config.sisa.shard_exec)}
    )
    in_ens = balanced_halves(num_ensembles, len(population.ids), seed, fraction)
    member = np.zeros((width, len(population.ids)), bool)
    data: list[ShardData] = []
    for e in range(num_ensembles):
        rows = np.flatnonzero(in_ens[e])  # population.ids[rows] need not be sorted
        part = hash_partition(population.ids[rows], s, r, key_word(shadow_seed, e) & 0x7FFFFFFF)
        order = np.argsort(population.ids[rows], kind="stable")
        rows = rows[order]  # now aligned with part.ids (sorted)
        for k in range(s):
            sel = part.shard == k
            member[e * s + k, rows[sel]] = True
            data.append(
                ShardData(
                    part.ids[sel], population.x[rows[sel]], population.y[rows[sel]], part.slice[sel]
                )
            )
    x = np.asarray(population.x)
    engine = Engine(
        cfg, x.shape[1:], x.dtype, num_classes, vmap_width=width, preprocessing=preprocessing
    )
    capacity = int(-(-max(1, max(len(d) for d in data)) // 8) * 8)
    jobs = [ShardJob(w, d) for w, d in enumerate(data)]
    final, _ = engine.run(jobs, capacity=capacity)
    logits = engine.logits(stack_states(final), x)
    active = np.array([len(d) > 0 for d in data])
    return ShadowSet(cfg, logits, member, in_ens, active, time.perf_counter() - t0)


__all__ = [
    "AttackResult",
    "ModelView",
    "Population",
    "ShadowSet",
    "auc_score",
    "balanced_halves",
    "confidence_score",
    "ensemble_probs",
    "evaluate_attack",
    "lira_scores",
    "loss_score",
    "prob_scaled_logit",
    "roc_curve",
    "scaled_logit",
    "tpr_at_fpr",
    "train_shadows",
]
