"""Where shards sit in a stacked program, and the host-side inputs of one slice step: pure
functions, tested without compiling anything."""

from __future__ import annotations

import numpy as np
import pytest

from sisajax.jobs import ShardData, ShardJob, row_offsets, slice_step_inputs
from sisajax.layout import place_shards


def test_vmap_keeps_each_shard_at_its_index():
    assert place_shards([3, 0, 7], [5, 9, 1], "vmap", 8, 2) == (8, [3, 0, 7])
    with pytest.raises(ValueError, match="distinct shards"):
        place_shards([1, 9], [1, 1], "vmap", 8, 1)  # 9 % 8 == 1


def test_map_balances_work_over_devices():
    width, pos = place_shards([0, 1, 2, 3], [10, 9, 2, 1], "map", 8, 2)
    assert width == 4  # two positions per device, no inert padding beyond that
    device = [p // 2 for p in pos]
    load = [sum(w for w, d in zip([10, 9, 2, 1], device, strict=True) if d == k) for k in (0, 1)]
    assert sorted(load) == [11, 11]
    assert len(set(pos)) == 4


@pytest.mark.parametrize(("jobs", "devices", "width"), [(1, 1, 1), (1, 2, 2), (3, 1, 4), (5, 1, 8)])
def test_map_width_is_a_power_of_two_per_device_capped_by_the_run(jobs, devices, width):
    got, pos = place_shards(list(range(jobs)), [1] * jobs, "map", 8, devices)
    assert got == width
    assert len(set(pos)) == jobs and max(pos) < got
    # never wider than the run's own programs, even when more jobs than positions per device
    assert place_shards(list(range(6)), [1] * 6, "map", 4, 1)[0] == 6


def _data(ids: np.ndarray, slices: int) -> ShardData:
    n = len(ids)
    return ShardData(
        ids.astype(np.int64),
        np.zeros((n, 2), np.float32),
        (ids % 3).astype(np.int32),
        (np.arange(n) * slices // n).astype(np.int32),
    )


def test_slice_step_inputs_depend_only_on_each_shards_own_data():
    a = ShardJob(0, _data(np.arange(0, 40, 2), 4), start_slice=0)
    b = ShardJob(1, _data(np.arange(1, 60, 2), 4), start_slice=3)
    kw = dict(chunk_steps=4, batch_size=3, seed=11, epochs=2)
    both = slice_step_inputs(
        [a, b], [0, 1], 2, width=2, offsets=row_offsets("vmap", 2, 30, 1), **kw
    )
    alone = slice_step_inputs([a], [0], 2, width=1, offsets=np.zeros(1, np.int64), **kw)
    assert both.active == {0: 0}  # b starts at slice 3: inert in slice step 2
    assert both.steps[1] == 0 and not both.mask[:, 1].any()
    np.testing.assert_array_equal(both.rows[:, 0], alone.rows[:, 0])
    np.testing.assert_array_equal(both.mask[:, 0], alone.mask[:, 0])
    # slice step 2 of a trains on slices 0..2: 15 of its 20 rows, twice, in batches of 3
    assert both.examples[0] == 2 * 15 and both.steps[0] == 10 and both.n_chunks == 3
    live = both.mask[:, 0]
    labels = both.labels[:, 0][live]
    np.testing.assert_array_equal(labels, a.data.y[both.rows[:, 0][live]])
    assert not both.labels[:, 0][~live].any()


def test_map_offsets_point_into_each_positions_block():
    a = ShardJob(0, _data(np.arange(10), 2))
    b = ShardJob(1, _data(np.arange(10, 20), 2))
    inp = slice_step_inputs(
        [a, b],
        [0, 1],
        1,
        width=2,
        offsets=row_offsets("map", 2, 16, 1),
        chunk_steps=8,
        batch_size=2,
        seed=0,
        epochs=1,
    )
    live0, live1 = inp.mask[:, 0], inp.mask[:, 1]
    assert inp.rows[:, 0][live0].max() < 10
    assert inp.rows[:, 1][live1].min() >= 16 and inp.rows[:, 1][live1].max() < 26
