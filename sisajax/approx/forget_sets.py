"""Forget-set builders: which training ids a request asks to forget.

Pure functions of the ids, labels or features and an explicit key (``jax.random``); they return
numpy arrays of ids sorted ascending. Four kinds are common in the unlearning literature:
random ids, a whole class, a coherent subpopulation (the nearest neighbours of a random centre
in feature space) and mislabelled canaries (ids whose labels are flipped before training, so
their influence on the model is easy to measure).
"""

from __future__ import annotations

import jax
import numpy as np


def _choice(key: jax.Array, n: int, k: int) -> np.ndarray:
    """``k`` distinct positions of ``range(n)`` drawn from ``key``."""
    if not 0 <= k <= n:
        raise ValueError(f"cannot draw {k} of {n} ids")
    return np.asarray(jax.random.permutation(key, n))[:k]


def random_ids(ids: np.ndarray, k: int, key: jax.Array) -> np.ndarray:
    """``[k]`` distinct ids drawn uniformly from ``ids [N]``."""
    ids = np.asarray(ids)
    return np.sort(ids[_choice(key, len(ids), k)])


def class_ids(ids: np.ndarray, y: np.ndarray, cls: int) -> np.ndarray:
    """Every id of ``ids [N]`` whose label ``y [N]`` is ``cls``."""
    return np.sort(np.asarray(ids)[np.asarray(y) == cls])


def random_class_ids(ids: np.ndarray, y: np.ndarray, key: jax.Array) -> tuple[int, np.ndarray]:
    """``(class, its ids)`` for a class drawn uniformly among the labels present in ``y [N]``."""
    classes = np.unique(np.asarray(y))
    cls = int(classes[_choice(key, len(classes), 1)[0]])
    return cls, class_ids(ids, y, cls)


def subpopulation_ids(
    ids: np.ndarray, features: np.ndarray, k: int, key: jax.Array
) -> tuple[int, np.ndarray]:
    """``(centre id, the k ids nearest to it)``: a centre drawn uniformly from ``ids [N]`` and
    its ``k`` nearest neighbours (itself included) by Euclidean distance between the
    flattened ``features [N, *feat]`` (ties broken by position)."""
    ids = np.asarray(ids)
    if not 1 <= k <= len(ids):
        raise ValueError(f"cannot take {k} neighbours among {len(ids)} ids")
    f = np.asarray(features, np.float64).reshape(len(ids), -1)
    c = int(_choice(key, len(ids), 1)[0])
    d = np.sum(np.square(f - f[c]), axis=1)
    near = np.argsort(d, kind="stable")[:k]
    return int(ids[c]), np.sort(ids[near])


def mislabelled_canaries(
    ids: np.ndarray, y: np.ndarray, k: int, num_classes: int, key: jax.Array
) -> tuple[np.ndarray, np.ndarray]:
    """``(canary ids [k], their new labels [k])``: ``k`` ids drawn uniformly from ``ids [N]``,
    each given a label drawn uniformly among the ``num_classes - 1`` other classes. Build the
    training labels with :func:`relabel`."""
    if num_classes < 2:
        raise ValueError("flipping labels needs at least two classes")
    ids, y = np.asarray(ids), np.asarray(y)
    k_ids, k_lab = jax.random.split(key)
    pos = np.sort(_choice(k_ids, len(ids), k))
    shift = np.asarray(jax.random.randint(k_lab, (k,), 1, num_classes))
    return ids[pos], ((y[pos] + shift) % num_classes).astype(y.dtype)


def relabel(
    ids: np.ndarray, y: np.ndarray, canary_ids: np.ndarray, new_labels: np.ndarray
) -> np.ndarray:
    """A copy of the labels ``y [N]`` of ``ids [N]`` with ``canary_ids`` given ``new_labels``."""
    ids = np.asarray(ids)
    out = np.array(y, copy=True)
    pos = {int(i): p for p, i in enumerate(ids)}
    missing = [int(i) for i in canary_ids if int(i) not in pos]
    if missing:
        raise ValueError(f"canary ids not among the ids: {missing[:5]}")
    out[[pos[int(i)] for i in canary_ids]] = new_labels
    return out


__all__ = [
    "class_ids",
    "mislabelled_canaries",
    "random_class_ids",
    "random_ids",
    "relabel",
    "subpopulation_ids",
]
