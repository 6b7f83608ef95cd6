"""Partition: every training id -> (shard, slice), as a pure function of (seed, id).

A keyed 64-bit hash (splitmix64 finaliser) places each id independently of every other id, so
removing ids never moves any other id, and a from-scratch run on the retained ids reproduces the
same assignment. Shards and slices are balanced in expectation (multinomial), not exactly.

Slices are numbered ``0..R-1`` in code; "the checkpoint after slice j" is the state after training
on slices ``0..j``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np

from sisajax.errors import DAMAGED_ARCHIVE_ERRORS, UserInputError

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


class PartitionError(UserInputError, ValueError):
    """Ids are unknown, duplicated, already removed, or the partition is infeasible."""

    def __init__(self, message: str, ids: np.ndarray | None = None):
        super().__init__(message)
        self.ids = None if ids is None else np.asarray(ids)


def _mix_int(z: int) -> int:
    z &= _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def key_word(*keys: int) -> int:
    """Fold integer keys (seed, shard, slice, epoch, ...) into one 64-bit word."""
    h = 0x5151A7A7
    for k in keys:
        h = _mix_int(h + _GOLDEN + (int(k) & _MASK))
    return h


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def hash64(ids: np.ndarray, *keys: int) -> np.ndarray:
    """``[N]`` uint64 keyed hash of int64 ids: a pure function of (keys, id)."""
    word = np.uint64(key_word(*keys))
    z = np.asarray(ids, dtype=np.int64).view(np.uint64)
    return _mix(_mix(z ^ word) + np.uint64(_GOLDEN))


def uniform_hash(ids: np.ndarray, *keys: int, stream: int = 0) -> np.ndarray:
    """``[N]`` float64 in [0, 1): a keyed uniform variate per id."""
    return (hash64(ids, stream, *keys) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def fingerprint_ids(ids: np.ndarray) -> str:
    """sha256 of the sorted int64 ids: names exactly the set of examples a model has seen."""
    return _fingerprint_sorted(np.sort(np.asarray(ids, dtype=np.int64)))


def _fingerprint_sorted(sorted_ids: np.ndarray) -> str:
    return hashlib.sha256(sorted_ids.astype("<i8").tobytes()).hexdigest()


def prefix_fingerprints(ids: np.ndarray, slices: np.ndarray, upto: int) -> list[str]:
    """``[fingerprint_ids(ids[slices <= j]) for j in range(upto)]``, sorting once.

    Args:
      ids: ``[N]`` int ids of a shard's data; slices: ``[N]`` their slice numbers.
    """
    ids = np.asarray(ids, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    sorted_ids, sorted_slices = ids[order], np.asarray(slices)[order]
    return [_fingerprint_sorted(sorted_ids[sorted_slices <= j]) for j in range(upto)]


@dataclasses.dataclass(frozen=True)
class Partition:
    """Which (shard, slice) each retained training id belongs to.

    Attributes:
      ids: ``[N]`` int64, sorted, the retained training ids.
      shard: ``[N]`` int32 shard of each id.
      slice: ``[N]`` int32 slice of each id (``0..R-1``).
      num_shards: S.  num_slices: R.
      removed: ``[M]`` int64, sorted, ids that were forgotten.
    """

    ids: np.ndarray
    shard: np.ndarray
    slice: np.ndarray
    num_shards: int
    num_slices: int
    removed: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))

    def __post_init__(self) -> None:
        if not (len(self.ids) == len(self.shard) == len(self.slice)):
            raise PartitionError("partition arrays differ in length")
        # compare neighbours, not their difference: ids 2**63 apart overflow int64 in np.diff
        if len(self.ids) > 1 and not np.all(self.ids[1:] > self.ids[:-1]):
            raise PartitionError("partition ids must be sorted and unique")

    # -- look-ups -------------------------------------------------------------------------
    def _find(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(row [K], found [K])``: binary search in the sorted ids (no index to build)."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        row = np.searchsorted(self.ids, ids)
        found = row < len(self.ids)
        found[found] = self.ids[row[found]] == ids[found]
        return row, found

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """``[K]`` bool: which ids are retained training ids."""
        return self._find(ids)[1]

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(shard [K], slice [K])`` of retained ids; unknown ids raise."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        row, found = self._find(ids)
        if not found.all():
            missing = ids[~found].tolist()
            raise PartitionError(f"ids not in the retained training set: {missing[:20]}", missing)
        return self.shard[row], self.slice[row]

    def shards_of(self, ids: np.ndarray) -> np.ndarray:
        """Sorted distinct shards holding any of ``ids`` ``[K]`` (ids not retained are ignored)."""
        row, found = self._find(ids)
        return np.unique(self.shard[row[found]])

    def shard_ids(self, k: int) -> np.ndarray:
        """Sorted ids of shard k."""
        return self.ids[self.shard == k]

    def shard_slices(self, k: int) -> np.ndarray:
        """Slice of each id of :meth:`shard_ids` (same order)."""
        return self.slice[self.shard == k]

    def sizes(self) -> np.ndarray:
        """``[S, R]`` number of retained ids per (shard, slice)."""
        if len(self.ids) and not (
            0 <= self.shard.min() <= self.shard.max() < self.num_shards
            and 0 <= self.slice.min() <= self.slice.max() < self.num_slices
        ):
            raise PartitionError(
                f"partition places ids outside its {self.num_shards} shards x "
                f"{self.num_slices} slices"
            )
        cells = self.shard.astype(np.int64) * self.num_slices + self.slice
        n = self.num_shards * self.num_slices
        return np.bincount(cells, minlength=n).reshape(self.num_shards, self.num_slices)

    def prefix_fingerprints(self) -> list[list[str]]:
        """``[S][R]`` fingerprint of the ids in slices ``0..j`` of each shard."""
        out = []
        for k in range(self.num_shards):
            ids, sl = self.shard_ids(k), self.shard_slices(k)
            out.append([fingerprint_ids(ids[sl <= j]) for j in range(self.num_slices)])
        return out

    # -- changes ----------------------------------------------------------------------------
    def drop(self, ids: np.ndarray, removed_keys: np.ndarray | None = None) -> Partition:
        """A new partition without ``ids`` (which must all be retained); nobody else moves.

        ``removed_keys`` is what to remember of them (default: the ids themselves; a run that
        keeps no raw ids passes salted hashes).
        """
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        self.locate(ids)
        keep = ~np.isin(self.ids, ids)
        keys = ids if removed_keys is None else np.asarray(removed_keys, np.int64)
        return Partition(
            self.ids[keep],
            self.shard[keep],
            self.slice[keep],
            self.num_shards,
            self.num_slices,
            np.union1d(self.removed, keys),
        )

    def without(self, ids: np.ndarray) -> Partition:
        """A new partition without ``ids`` (any that it holds), remembering nothing of them: for
        ids that leave before training (a validation split), not forgotten ones."""
        keep = ~np.isin(self.ids, np.asarray(ids, dtype=np.int64))
        return dataclasses.replace(
            self, ids=self.ids[keep], shard=self.shard[keep], slice=self.slice[keep]
        )

    def tombstone(self, keys: np.ndarray) -> Partition:
        """The same partition remembering ``keys`` as forgotten too (ids that were never in it,
        e.g. validation ids, keep their "already forgotten" answer this way)."""
        return dataclasses.replace(
            self, removed=np.union1d(self.removed, np.asarray(keys, dtype=np.int64))
        )

    # -- persistence ------------------------------------------------------------------------
    def save(self, path: str | Path, *, durable: bool = True) -> tuple[str, int]:
        """Write atomically (temp file, rename); return ``(sha256, size)`` of the file."""
        import io

        from sisajax.store.files import write_file

        buf = io.BytesIO()
        np.savez(
            buf,
            ids=self.ids,
            shard=self.shard,
            slice=self.slice,
            removed=self.removed,
            shape=np.array([self.num_shards, self.num_slices]),
        )
        return write_file(Path(path), buf.getbuffer(), durable=durable)

    @classmethod
    def load(cls, path: str | Path) -> Partition:
        """Read a partition file (never following a link); :class:`PartitionError` if malformed."""
        import io

        from sisajax.store.files import read_bytes

        try:
            with np.load(io.BytesIO(read_bytes(Path(path))), allow_pickle=False) as z:
                s, r = (int(v) for v in z["shape"])
                return cls(z["ids"], z["shard"], z["slice"], s, r, z["removed"])
        except (KeyError, ValueError, OSError, EOFError, *DAMAGED_ARCHIVE_ERRORS) as e:
            if isinstance(e, FileNotFoundError):
                raise
            raise PartitionError(f"{Path(path).name} is not a partition file") from None


VALIDATION_STREAM = 3  # hash stream of the validation split (1 and 2 place shards and slices)


def validation_mask(ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """``[N]`` bool: which of ``ids`` form the run's validation split, never trained on.

    A keyed hash of (seed, id) against ``fraction``, so the split is a pure function of each id:
    removing ids never moves another id in or out of it, and applying it to ids that already
    excludes it selects nothing more (a retrain on a run's retained ids carves the same split).
    Independent of the shard count, so runs with different S share one validation split.
    """
    ids = np.asarray(ids, dtype=np.int64)
    if not fraction:
        return np.zeros(len(ids), bool)
    return uniform_hash(ids, seed, stream=VALIDATION_STREAM) < float(fraction)


def hash_partition(ids: np.ndarray, num_shards: int, num_slices: int, seed: int) -> Partition:
    """Assign each id to (shard, slice) by keyed hash of (seed, id).

    Raises:
      PartitionError: on duplicate ids or more shards than ids.
    """
    ids = np.asarray(ids, dtype=np.int64)
    if len(np.unique(ids)) != len(ids):
        raise PartitionError("training ids are not unique")
    if num_shards > len(ids):
        raise PartitionError(f"{num_shards} shards but only {len(ids)} training examples")
    ids = np.sort(ids)
    shard = np.floor(uniform_hash(ids, seed, stream=1) * num_shards).astype(np.int32)
    sl = np.floor(uniform_hash(ids, seed, stream=2) * num_slices).astype(np.int32)
    return Partition(ids, shard, sl, num_shards, num_slices)


def distribution_aware_partition(
    ids: np.ndarray, probs: np.ndarray, bound: float, num_slices: int, seed: int
) -> Partition:
    """The paper's Algorithm 1: shards sized by expected deletions.

    Points are sorted by deletion probability (highest first, ties by keyed hash) and a shard is
    filled until the sum of its points' probabilities reaches ``bound`` (C <= 1, the expected
    number of deletions per shard); then the next shard starts. High-risk points land in small
    shards that are cheap to retrain. Slices within a shard are assigned by keyed hash.

    Unlike :func:`hash_partition` the shard of an id depends on the other ids, so the partition
    is computed once, persisted with the run, and deletions only remove ids from it (a from-scratch
    reference run must be given the same, reduced, partition).

    Args:
      ids: ``[N]`` int64 training ids.
      probs: ``[N]`` deletion probability of each id (any non-negative scale).
      bound: C, expected deletions per shard, in the units of ``probs``.
      num_slices: R.
      seed: keys tie-breaking and the slice hash.
    """
    ids = np.asarray(ids, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if len(ids) != len(probs) or not np.all(np.isfinite(probs)) or (probs < 0).any():
        raise PartitionError("probs must be one finite, non-negative probability per id")
    if len(ids) == 0:
        raise PartitionError("no ids to partition")
    if not bound > 0:
        raise PartitionError(f"bound must be > 0, got {bound}")
    tie = hash64(ids, seed, 3).astype(np.float64)
    order = np.lexsort((tie, -probs))
    shard_of_sorted = np.zeros(len(ids), np.int32)
    k, acc = 0, 0.0
    for pos, i in enumerate(order):
        if acc >= bound:
            k, acc = k + 1, 0.0
        shard_of_sorted[pos] = k
        acc += probs[i]
    shard = np.empty(len(ids), np.int32)
    shard[order] = shard_of_sorted
    sort = np.argsort(ids)
    sl = np.floor(uniform_hash(ids, seed, stream=2) * num_slices).astype(np.int32)
    return Partition(ids[sort], shard[sort], sl[sort], int(shard.max()) + 1, num_slices)
