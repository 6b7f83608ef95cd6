"""Aggregation of constituent predictions, and accuracy metrics.

Shards that hold no training data (all their ids were forgotten) drop out: ``active`` masks them
and the vote / mean is taken over the remaining shards only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

METHODS = ("vote", "mean_prob")


def check_method(method: str) -> str:
    """``method`` if it is an aggregation sisajax knows, else a :class:`ConfigError`."""
    if method not in METHODS:
        from sisajax.config import ConfigError

        raise ConfigError(f"sisa.aggregation must be one of {', '.join(METHODS)}; got {method!r}")
    return method


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (float64 for stable averaging)."""
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _active(logits: np.ndarray, active: np.ndarray | None) -> np.ndarray:
    active = np.ones(logits.shape[0], bool) if active is None else np.asarray(active, bool)
    if not active.any():
        raise ValueError("no active shard: every shard's data has been forgotten")
    return active


def vote(logits: np.ndarray, active: np.ndarray | None = None) -> np.ndarray:
    """Majority vote of labels. logits ``[S, M, C]`` -> labels ``[M]``.

    Ties are broken by the mean probability of the tied classes, then by the lowest label.
    """
    active = _active(logits, active)
    lg = logits[active]
    counts = np.zeros(lg.shape[1:], np.float64)
    np.add.at(counts, (np.arange(lg.shape[1])[None, :], lg.argmax(-1)), 1.0)
    # mean prob < 1 never outweighs a whole vote: it only separates tied counts
    return (counts + softmax(lg).mean(0) * 0.5).argmax(-1)


def mean_prob(logits: np.ndarray, active: np.ndarray | None = None) -> np.ndarray:
    """Mean of probability vectors. logits ``[S, M, C]`` -> probabilities ``[M, C]``."""
    active = _active(logits, active)
    return softmax(logits[active]).mean(0)


def aggregate(logits: np.ndarray, method: str, active: np.ndarray | None = None) -> np.ndarray:
    """Labels ``[M]`` by ``method`` (``vote`` or ``mean_prob``)."""
    if check_method(method) == "vote":
        return vote(logits, active)
    return mean_prob(logits, active).argmax(-1)


def accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.asarray(pred) == np.asarray(y))) if len(y) else float("nan")


@dataclasses.dataclass
class EvalReport:
    """Accuracy of every constituent model and of the aggregate.

    Attributes:
      shard_accuracy: ``[S]`` accuracy of each constituent model (NaN for empty shards).
      vote_accuracy / mean_prob_accuracy: aggregate accuracy by each aggregation.
      aggregation: which of the two ``accuracy`` reports.
      num_examples: evaluated examples; active_shards: shards in the ensemble.
    """

    shard_accuracy: list[float]
    vote_accuracy: float
    mean_prob_accuracy: float
    aggregation: str
    num_examples: int
    active_shards: int

    @property
    def accuracy(self) -> float:
        return self.vote_accuracy if self.aggregation == "vote" else self.mean_prob_accuracy

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shard_accuracy"] = [None if a != a else a for a in self.shard_accuracy]
        return {**d, "accuracy": self.accuracy}


def eval_report(
    logits: np.ndarray, y: np.ndarray, active: np.ndarray, method: str = "vote"
) -> EvalReport:
    """:class:`EvalReport` of ``logits [S, M, C]`` against labels ``y [M]``; ``active [S]``
    masks shards that hold no data (their accuracy is NaN and they do not vote)."""
    check_method(method)
    shard_acc = [
        accuracy(logits[k].argmax(-1), y) if active[k] else float("nan") for k in range(len(logits))
    ]
    return EvalReport(
        shard_acc,
        accuracy(vote(logits, active), y),
        accuracy(mean_prob(logits, active).argmax(-1), y),
        method,
        len(y),
        int(np.sum(active)),
    )
