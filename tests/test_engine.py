import jax
import numpy as np
import pytest
from conftest import assert_trees_equal, tiny_config, tiny_digits

import sisajax as sj
from sisajax.costs import slice_schedule_cost
from sisajax.data.partition import hash_partition
from sisajax.engine import Engine, ShardData, ShardJob, stack_states, unstack_state
from sisajax.step import StepMeta


def _shards(ds, cfg):
    p = hash_partition(ds.train_ids, cfg.sisa.shards, cfg.sisa.slices, cfg.sisa.seed)
    out = []
    for k in range(cfg.sisa.shards):
        sel = p.shard == k
        pos = np.searchsorted(ds.train_ids, p.ids[sel])
        out.append(ShardData(p.ids[sel], ds.x_train[pos], ds.y_train[pos], p.slice[sel]))
    return out


def _engine(cfg, ds):
    return Engine(cfg, ds.feature_shape, ds.x_train.dtype, ds.num_classes)


def _train(eng, shards, data, cap=None, **kw):
    jobs = [ShardJob(k, d) for k, d in zip(shards, data, strict=True)]
    return eng.run(jobs, capacity=cap, **kw)


@pytest.mark.parametrize("shard_exec", ["vmap", "map"])
def test_all_shards_together_equals_each_shard_alone(shard_exec):
    """A shard trained with the others (width 4) and alone (a width-1 program; for map also at
    another position of the width-4 program): with lax.map bit-identical, the property exact
    unlearning rests on; with vmap another width is another program (equal to rounding)."""
    ds = tiny_digits()
    cfg = tiny_config(shards=4, slices=3, shard_exec=shard_exec)
    eng = _engine(cfg, ds)
    solo = Engine(cfg, ds.feature_shape, ds.x_train.dtype, ds.num_classes, vmap_width=1)
    data = _shards(ds, cfg)
    cap = max(len(d) for d in data)
    together, _ = _train(eng, range(4), data, cap)
    for k in range(4):
        alone, _ = _train(solo, [k], [data[k]], cap)
        if shard_exec == "map":
            assert_trees_equal(together[k], alone[0])
            moved, _ = _train(eng, [k], [data[k]], cap)  # a forget's placement: position 0
            assert_trees_equal(together[k], moved[0])
        else:
            for a, b in zip(jax.tree.leaves(together[k]), jax.tree.leaves(alone[0]), strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_restart_from_a_middle_slice_equals_one_go():
    """Training slices 0..R-1 in one call equals stopping after slice j and continuing from the
    saved state: what forget relies on."""
    ds = tiny_digits()
    cfg = tiny_config(shards=2, slices=4, optim={"name": "adam", "learning_rate": 3e-3})
    eng = _engine(cfg, ds)
    data = _shards(ds, cfg)
    cap = max(len(d) for d in data)
    rows = {}
    _train(eng, range(2), data, cap, on_slice=lambda out: rows.update({out.slice: out.fetch()}))
    resumed, _ = eng.run([ShardJob(1, data[1], 2, rows[1][1])], capacity=cap)
    assert_trees_equal(resumed[0], rows[3][1])


@pytest.mark.parametrize("trip", ["static", "dynamic"])
def test_fully_masked_steps_leave_state_unchanged_adam(trip):
    """A chunk whose steps are all masked for one shard leaves that shard's state bit-identical
    (Adam's count and moments included) while the other shard trains every step."""
    ds = tiny_digits()
    cfg = tiny_config(
        shards=2, slices=1, chunk_trip=trip, optim={"name": "adam", "learning_rate": 1e-3}
    )
    eng = _engine(cfg, ds)
    data = _shards(ds, cfg)
    cap = max(len(d) for d in data)
    finals, _ = _train(eng, range(2), data, cap)
    state = stack_states(finals)
    program = eng.compiled(2, cap)
    c, b = cfg.sisa.chunk_steps, cfg.sisa.batch_size
    x = np.zeros((2, cap, *ds.feature_shape), np.float32)
    rows = np.zeros((2, c, b), np.int32)
    mask = np.zeros((2, c, b), bool)
    mask[1] = True  # shard 1 gets real (zero) batches, shard 0 only masked ones
    labels = np.zeros((2, c, b), np.int32)
    meta = StepMeta.stack([0, 1], [0, 0], [0, 0], [c, c])
    after, loss = jax.device_get(program(jax.device_put(state), x, rows, mask, labels, meta))
    assert_trees_equal(unstack_state(after, 0), unstack_state(state, 0))
    assert float(loss[0]) == 0.0 and float(loss[1]) > 0.0
    assert int(after.step[0]) == int(state.step[0])
    assert int(after.step[1]) == int(state.step[1]) + c  # the unmasked shard did move
    count = after.opt_state[0].count
    assert int(count[0]) == int(state.opt_state[0].count[0])
    assert int(count[1]) == int(state.opt_state[0].count[1]) + c


def test_recalibrated_epochs_and_no_skipped_slice_steps():
    ds = tiny_digits()
    cfg = tiny_config(shards=2, slices=8, epochs=1.0)  # 2e/(R+1) = 0.22 epochs per slice step
    eng = _engine(cfg, ds)
    data = _shards(ds, cfg)
    seen, losses = [], []

    def on_slice(out):
        rows = out.fetch()
        seen.append([int(rows[i].step) for i in range(2)])
        losses.append(out.mean_loss())

    _, stats = _train(eng, range(2), data, on_slice=on_slice)
    steps = np.array(seen)  # [R, S] cumulative gradient steps after each slice
    assert np.all(np.diff(steps, axis=0) >= 1), "a slice step was skipped"
    assert stats.shard_slices == 16
    sizes = np.array([[int((d.slices == j).sum()) for j in range(8)] for d in data])
    examples, grad_steps = slice_schedule_cost(sizes, cfg.sisa.shard_epochs, cfg.sisa.batch_size)
    assert (stats.examples, stats.grad_steps) == (examples, grad_steps)
    assert steps[-1].sum() == grad_steps  # the states counted every step the schedule planned
    # the logged loss per slice step is the mean cross-entropy of its examples: about ln(10)
    # at the start of training, falling as the models learn
    first = np.mean(list(losses[0].values()))
    last = np.mean(list(losses[-1].values()))
    assert abs(first - np.log(10)) < 0.5
    assert last < first


def test_no_recompilation_when_shards_shrink(tmp_path):
    ds = tiny_digits()
    cfg = tiny_config()
    run, _ = sj.train(cfg, ds, tmp_path / "r")
    eng = run.engine
    sj.forget(run, run.partition.shard_ids(0)[:1])
    # a one-shard forget runs a narrow program (a power of two per device, <= the run's width)
    widths = [w for w, _ in eng._compiled]
    assert all(w <= cfg.sisa.shards for w in widths)
    assert all(cap == run.capacity for _, cap in eng._compiled)  # deletions never change shapes
    compiled_after_first = dict(eng._compiled)
    sj.forget(run, run.partition.shard_ids(1)[:2])
    sj.forget(run, run.partition.shard_ids(0)[3:5])
    assert eng._compiled.keys() == compiled_after_first.keys()
    assert all(eng._compiled[k] is v for k, v in compiled_after_first.items())


def test_vmap_width_may_change_last_bits_but_not_the_model():
    """Why a vmapped run retrains at its training width: on CPU a 600-128-100 MLP vmapped at
    width 8 can differ in the last bits from the same shard alone (width 1); the models agree to
    float32 rounding. (lax.map is bit-identical at any width: see the test above.)"""
    ds = sj.load_dataset("purchase_synthetic", n_train=1600, n_test=10)
    cfg = sj.RunConfig(
        model=sj.ModelConfig(hidden=(128,)),
        optim=sj.OptimConfig(learning_rate=0.01),
        sisa=sj.SisaConfig(shards=8, slices=1, epochs=1, batch_size=16, shard_exec="vmap"),
    )
    wide_eng = _engine(cfg, ds)
    alone_eng = Engine(cfg, ds.feature_shape, ds.x_train.dtype, ds.num_classes, vmap_width=1)
    data = _shards(ds, cfg)
    cap = max(len(d) for d in data)
    wide, _ = _train(wide_eng, range(8), data, cap)
    alone, _ = alone_eng.run([ShardJob(0, data[0])], capacity=cap)
    a = jax.tree.leaves(wide[0].params)
    b = jax.tree.leaves(alone[0].params)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shard_exec", ["vmap", "map"])
def test_chunk_steps_auto_and_the_steps_a_static_loop_wastes(shard_exec, tmp_path):
    """``sisa.chunk_steps=auto`` is 32 under a static chunk loop (vmap) and 128 under a dynamic
    one (map on a CPU), recorded in the run; :func:`sisajax.costs.chunk_fill` counts exactly the
    steps a static loop dispatches (one shard: calls x C) and the live ones it trains."""
    from sisajax.costs import chunk_fill

    ds = tiny_digits()
    cfg = tiny_config(shards=1, slices=4, chunk_steps="auto", shard_exec=shard_exec)
    run, _ = sj.train(cfg, ds, tmp_path / "run")
    want = {"vmap": 32, "map": 128}[shard_exec]
    assert run.config.sisa.chunk_steps == want and run.engine.chunk_steps == want
    assert run.manifest.layout["chunk_trip"] == {"vmap": "static", "map": "dynamic"}[shard_exec]
    for chunk in (8, 32):
        static = tiny_config(shards=1, slices=4, chunk_steps=chunk, chunk_trip="static")
        eng = _engine(static, ds)
        data = _shards(ds, static)
        _, stats = _train(eng, [0], data)
        sizes = np.array([[int((data[0].slices == j).sum()) for j in range(4)]])
        live, dispatched = chunk_fill(sizes, static.sisa.epochs, static.sisa.batch_size, chunk)
        assert stats.grad_steps == live
        assert stats.program_calls * chunk == dispatched
        assert dispatched >= live
    # four shards in one vmapped program: every position runs the longest shard's chunks
    cfg4 = tiny_config(shards=4, slices=3, chunk_steps=8, shard_exec="vmap", chunk_trip="static")
    eng = _engine(cfg4, ds)
    data = _shards(ds, cfg4)
    _, stats = _train(eng, range(4), data)
    sizes = np.array([[int((d.slices == j).sum()) for j in range(3)] for d in data])
    live, dispatched = chunk_fill(sizes, cfg4.sisa.epochs, 8, 8, together=True)
    assert stats.grad_steps == live and stats.program_calls * 8 * 4 == dispatched
    with pytest.raises(sj.ConfigError, match="integer or .auto."):
        tiny_config(chunk_steps="some")


def test_a_seed_jax_keys_cannot_hold_is_refused():
    """Every model key derives from ``PRNGKey(seed)``, which keeps 32 bits: seeds 0 and 2**32
    would train the same initial models on different partitions. Such seeds are refused
    with one line, not truncated (and 2**64 no longer fails deep inside training)."""
    assert tiny_config(seed=2**32 - 1).sisa.seed == 2**32 - 1
    for seed in (2**32, 2**64, -1):
        with pytest.raises(sj.ConfigError, match="sisa.seed must be"):
            tiny_config(seed=seed)
