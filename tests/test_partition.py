import numpy as np
import pytest

from sisajax.data.partition import Partition, PartitionError, hash_partition
from sisajax.data.schedule import slice_step_batches, steps_for


def test_assignment_is_pure_function_of_seed_and_id():
    ids = np.arange(5000, dtype=np.int64) * 7 + 3
    a = hash_partition(ids, 8, 5, seed=1)
    b = hash_partition(ids[::-1].copy(), 8, 5, seed=1)
    assert np.array_equal(a.shard, b.shard) and np.array_equal(a.slice, b.slice)
    c = hash_partition(ids, 8, 5, seed=2)
    assert not np.array_equal(a.shard, c.shard)


def test_removing_ids_never_moves_others():
    ids = np.arange(3000, dtype=np.int64)
    p = hash_partition(ids, 6, 4, seed=0)
    gone = ids[::7]
    q = p.drop(gone)
    r = hash_partition(np.setdiff1d(ids, gone), 6, 4, seed=0)
    assert np.array_equal(q.ids, r.ids)
    assert np.array_equal(q.shard, r.shard) and np.array_equal(q.slice, r.slice)
    assert np.array_equal(q.removed, np.sort(gone))


def test_near_balanced():
    p = hash_partition(np.arange(20_000, dtype=np.int64), 10, 5, seed=0)
    sizes = p.sizes()
    assert sizes.sum() == 20_000
    assert np.all(np.abs(sizes.sum(1) - 2000) < 200)  # ~4.5 standard deviations
    assert np.all(np.abs(sizes - 400) < 100)


def test_locate_and_errors(tmp_path):
    p = hash_partition(np.arange(100, dtype=np.int64), 4, 2, seed=0)
    k, j = p.locate([5, 7])
    assert k.tolist() == [p.shard[5], p.shard[7]] and j.tolist() == [p.slice[5], p.slice[7]]
    with pytest.raises(PartitionError, match="1000"):
        p.locate([1000])
    with pytest.raises(PartitionError, match="shards but only"):
        hash_partition(np.arange(3, dtype=np.int64), 4, 1, seed=0)
    with pytest.raises(PartitionError, match="not unique"):
        hash_partition(np.array([1, 1, 2], dtype=np.int64), 1, 1, seed=0)
    p.drop([5]).save(tmp_path / "p.npz")
    q = Partition.load(tmp_path / "p.npz")
    assert q.removed.tolist() == [5] and 5 not in q.ids and len(q.ids) == 99


def test_steps_budget():
    assert steps_for(0, 3.0, 16) == 0
    assert steps_for(100, 1.0, 16) == 7
    assert steps_for(100, 2.0, 16) == 14
    assert steps_for(100, 0.1, 16) == 1  # fractional budgets never skip a slice step
    assert steps_for(100, 0.5, 16) == 4


def test_batch_order_depends_only_on_the_id_set():
    ids = np.arange(50, dtype=np.int64) * 3
    rows = np.arange(50, dtype=np.int32)
    kw = dict(seed=0, shard=1, slice_index=2, epochs=1.0, batch_size=8)
    a = slice_step_batches(ids, rows, **kw)
    perm = np.random.default_rng(0).permutation(50)
    b = slice_step_batches(ids[perm], rows[perm], **kw)
    assert np.array_equal(a.rows, b.rows) and np.array_equal(a.mask, b.mask)
    # every id exactly once per epoch; the last batch is partial and masked
    assert sorted(a.rows[a.mask].tolist()) == list(range(50))
    assert a.mask.sum() == 50 and a.mask[-1].sum() == 50 - 6 * 8
    # dropping ids keeps the others' relative order
    keep = np.ones(50, bool)
    keep[[4, 20, 33]] = False
    c = slice_step_batches(ids[keep], rows[keep], **kw)
    order_a = [r for r in a.rows[a.mask].tolist() if keep[r]]
    assert c.rows[c.mask].tolist() == order_a


def test_epochs_reshuffle_with_epoch_key():
    ids = np.arange(40, dtype=np.int64)
    s = slice_step_batches(
        ids, ids.astype(np.int32), seed=0, shard=0, slice_index=0, epochs=2, batch_size=8
    )
    first, second = s.rows[:5][s.mask[:5]], s.rows[5:][s.mask[5:]]
    assert sorted(first.tolist()) == sorted(second.tolist()) and first.tolist() != second.tolist()


def test_distribution_aware_partition_refuses_what_it_cannot_sort():
    """NaN probabilities would sort anywhere (and fill no shard); no ids is no partition."""
    from sisajax.data.partition import distribution_aware_partition

    ids = np.arange(6, dtype=np.int64)
    for probs in ([0.1, np.nan, 0.2, 0.1, 0.1, 0.1], [0.1, np.inf, 0.2, 0.1, 0.1, 0.1]):
        with pytest.raises(PartitionError, match="finite, non-negative"):
            distribution_aware_partition(ids, np.array(probs), 0.2, 1, seed=0)
    with pytest.raises(PartitionError, match="no ids"):
        distribution_aware_partition(ids[:0], np.zeros(0), 0.2, 1, seed=0)


def test_prefix_fingerprints_equal_one_fingerprint_per_prefix():
    from sisajax.data.partition import fingerprint_ids, prefix_fingerprints

    rng = np.random.default_rng(7)
    ids = rng.permutation(10_000)[:500].astype(np.int64)  # unsorted, as in a data copy
    slices = rng.integers(0, 6, 500)
    slices[slices == 3] = 4  # a slice with no ids
    want = [fingerprint_ids(ids[slices <= j]) for j in range(7)]
    assert prefix_fingerprints(ids, slices, 7) == want
    assert prefix_fingerprints(ids, slices, 0) == []
