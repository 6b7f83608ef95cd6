"""Exactness: after forget, every stored state equals a from-scratch run on the retained ids."""

import json

import numpy as np
import pytest
from conftest import assert_trees_equal, tiny_config, tiny_digits, without

import sisajax as sj
from sisajax.store.rows import read_row


def _assert_run_equals_scratch(run, cfg, ds, removed, tmp_path):
    scratch, _ = sj.train(cfg, without(ds, removed), tmp_path / "scratch", overwrite=True)
    for k in range(run.num_shards):
        # every slice's checkpoint, not only the final model
        assert_trees_equal(run.restore_block(k), scratch.restore_block(k))
        assert run.manifest.shards[k].fingerprints == scratch.manifest.shards[k].fingerprints
    assert np.array_equal(run.partition.ids, scratch.partition.ids)
    return scratch


def _ids_in(run, shard, slice_):
    d = run.shard_data(shard)
    return d.ids[d.slices == slice_]


@pytest.fixture
def trained(tmp_path):
    ds = tiny_digits()
    cfg = tiny_config()
    run, _ = sj.train(cfg, ds, tmp_path / "run")
    return run, cfg, ds


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_forget_one_id_is_exact(trained, tmp_path, where):
    run, cfg, ds = trained
    j = {"first": 0, "middle": 2, "last": cfg.sisa.slices - 1}[where]
    target = int(_ids_in(run, 1, j)[0])
    before = run.manifest
    rep = sj.forget(run, [target])
    assert rep.restart == {1: j}
    assert rep.cost.shard_slices == cfg.sisa.slices - j
    for k in (0, 2):  # other shards are not touched
        assert run.manifest.shards[k] == before.shards[k]
    # rows before the restart slice are kept by name (not rewritten), the rest are new
    rows_before, rows_after = before.shards[1].rows, run.manifest.shards[1].rows
    assert rows_after[:j] == rows_before[:j]
    assert all(r.generation == run.generation for r in rows_after[j:])
    _assert_run_equals_scratch(run, cfg, ds, [target], tmp_path)


def test_forget_several_shards_and_a_whole_slice(trained, tmp_path):
    run, cfg, ds = trained
    whole_slice = _ids_in(run, 0, 1)  # empties slice 1 of shard 0
    others = [int(_ids_in(run, 2, 3)[0]), int(_ids_in(run, 1, 0)[1])]
    ids = np.concatenate([whole_slice, others])
    rep = sj.forget(run, ids)
    assert rep.restart == {0: 1, 1: 0, 2: 3}
    assert run.partition.sizes()[0, 1] == 0
    _assert_run_equals_scratch(run, cfg, ds, ids, tmp_path)


def test_sequential_forgets_equal_one_scratch_run(trained, tmp_path):
    run, cfg, ds = trained
    a = [int(_ids_in(run, 0, 2)[0])]
    b = [int(_ids_in(run, 0, 1)[0]), int(_ids_in(run, 2, 0)[0])]
    sj.forget(run, a)
    sj.forget(run, b)
    reopened = sj.open_run(run.run_dir)
    _assert_run_equals_scratch(reopened, cfg, ds, a + b, tmp_path)


def test_sequential_forgets_read_the_test_split_once(trained, monkeypatch):
    """Every forget adopts a new partition; the held-out split each forget checks ids against is
    kept (least recently used goes first), not re-read and re-hashed per request."""
    run, _, _ = trained
    reads: list[str] = []
    npz = run._npz
    monkeypatch.setattr(run, "_npz", lambda ref: reads.append(ref.path) or npz(ref))
    run.test_data()
    for k in range(6):
        sj.forget(run, [int(_ids_in(run, k % 3, 3)[0])])
    test_reads = [p for p in reads if p == run.manifest.test_data.path]
    assert len(test_reads) == 1, reads
    assert run.partition.sizes().sum() == len(run.partition.ids)


@pytest.mark.parametrize(
    "sisa", [{"shard_exec": "vmap"}, {"optim": {"name": "adam", "learning_rate": 0.003}}]
)
def test_exact_with_vmap_and_adam(tmp_path, sisa):
    ds = tiny_digits()
    cfg = tiny_config(**sisa)
    run, _ = sj.train(cfg, ds, tmp_path / "run")
    ids = [int(_ids_in(run, 0, 1)[0]), int(_ids_in(run, 2, 2)[0])]
    sj.forget(run, ids)
    _assert_run_equals_scratch(run, cfg, ds, ids, tmp_path)


def test_forget_changes_the_model(trained):
    run, _, _ = trained
    before = run.restore_block(1)
    target = int(_ids_in(run, 1, 1)[0])
    sj.forget(run, [target])
    after = run.restore_block(1)
    w0, w1 = (
        before.params["Dense_0"]["kernel"],
        after.params["Dense_0"]["kernel"],
    )
    assert np.array_equal(w0[0], w1[0])  # slice 0 checkpoint kept
    assert not np.array_equal(w0[1], w1[1])  # slice 1 onwards retrained


def test_bad_requests_change_nothing(trained):
    run, _, ds = trained
    manifest = json.dumps(run.manifest.to_json(), sort_keys=True)
    ok = int(run.partition.ids[0])
    cases = [
        ([10**9], "not training ids"),
        ([int(ds.test_ids[0])], "test split"),
        ([ok, ok], "more than once"),
        ([], "no ids"),
        ([[1, 2], [3, 4]], "integers"),
        (["a"], "integers"),
        ([1.5], "integers"),
        ([45.0], "integers"),
        ([True], "integers"),
        ("12", "list of integers"),
        ([2**70], "64-bit"),
        (np.array([2**64 - 1], np.uint64), "64-bit"),  # would wrap to the id -1
        (np.array([[ok]]), "flat array"),
    ]
    for ids, msg in cases:
        with pytest.raises(sj.ForgetError, match=msg):
            sj.forget(run, ids)
    assert json.dumps(sj.open_run(run.run_dir).manifest.to_json(), sort_keys=True) == manifest


def test_already_forgotten_is_idempotent(trained):
    run, _, _ = trained
    target = int(run.partition.ids[5])
    sj.forget(run, [target])
    gen = run.generation
    rep = sj.forget(run, [target])
    assert rep.ids == [] and rep.already_forgotten == [target] and run.generation == gen
    assert rep.cost.examples == 0 and rep.examples_ratio is None


def test_no_residue_in_run_directory(trained):
    run, _, _ = trained
    targets = [int(_ids_in(run, 0, 0)[0]), int(_ids_in(run, 1, 2)[0])]
    old_files = run.manifest.files()
    rep = sj.forget(run, targets)
    # superseded checkpoints and data copies are gone; every file on disk is live
    on_disk = {
        str(p.relative_to(run.run_dir))
        for p in [*(run.run_dir / "checkpoints").iterdir(), *(run.run_dir / "data").iterdir()]
    }
    assert on_disk == {f for f in run.manifest.files() if "/" in f}
    assert "checkpoints/s000r000.g000000.row" in rep.removed_files
    assert set(rep.removed_files) == old_files - run.manifest.files()
    # every stored data copy lacks the ids; every checkpoint's fingerprint names only retained ids
    for path in (run.run_dir / "data").glob("shard_*.npz"):
        with np.load(path) as z:
            assert not np.isin(targets, z["ids"]).any()
    spec = run.row_spec()
    for k in range(run.num_shards):
        d = run.shard_data(k)
        for j, ref in enumerate(run.manifest.shards[k].rows):
            rel = f"checkpoints/s{k:03d}r{j:03d}.g{ref.generation:06d}.row"
            header, _ = read_row(run.run_dir / rel, ref.sha256, spec)
            assert header["ids_fingerprint"] == sj.data.fingerprint_ids(d.ids[d.slices <= j])
    # exactly one checkpoint per (shard, slice) and one data file per shard
    assert len(list((run.run_dir / "checkpoints").iterdir())) == run.num_shards * run.num_slices
    assert len(list((run.run_dir / "data").glob("shard_*.npz"))) == run.num_shards


def test_full_retrain_baseline(trained, tmp_path):
    run, cfg, ds = trained
    target = int(run.partition.ids[3])
    n_before = len(run.partition.ids)
    sj.forget(run, [target])
    full, cost = sj.full_retrain(run, tmp_path / "full")
    assert full.num_shards == 1 and full.num_slices == 1
    assert target not in full.partition.ids
    # the same retained training ids, the same validation split held out
    assert np.array_equal(full.partition.ids, run.partition.ids)
    assert len(full.partition.ids) == n_before - 1
    assert np.array_equal(full.val_data()[0], run.val_data()[0])
    expected = sj.full_retrain_cost(n_before - 1, cfg.sisa.epochs, cfg.sisa.batch_size)
    assert (cost.examples, cost.grad_steps) == expected
    assert full.evaluate().accuracy > 0.5


def test_vmap_forget_is_exact_at_realistic_width(tmp_path):
    """On CPU the bits of a vmapped shard depend on the vmap width once matrices are large enough
    (measured: width 8 vs 1 or 2 differ for a 600-128-100 MLP), so a vmap run must retrain at the
    width it was trained at."""
    ds = sj.load_dataset("purchase_synthetic", n_train=1600, n_test=50)
    cfg = sj.RunConfig(
        model=sj.ModelConfig(hidden=(128,)),
        optim=sj.OptimConfig(learning_rate=0.01),
        sisa=sj.SisaConfig(shards=8, slices=2, epochs=1, batch_size=16, shard_exec="vmap"),
    )
    run, _ = sj.train(cfg, ds, tmp_path / "run")
    target = [int(run.partition.shard_ids(3)[0])]
    sj.forget(run, target)
    _assert_run_equals_scratch(run, cfg, ds, target, tmp_path)
