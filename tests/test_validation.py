"""The run's validation split: carved from the training ids by a keyed hash, stored in the run,
never trained on, evaluated on request, and forgotten like any other stored copy."""

import numpy as np
import pytest
from conftest import assert_trees_equal, tiny_config, tiny_digits, without

import sisajax as sj
from sisajax.data.partition import fingerprint_ids, validation_mask
from sisajax.errors import RunError, UserInputError
from sisajax.store.rows import read_row


def _cfg(**data):
    cfg = tiny_config()
    return cfg.replace(data=data) if data else cfg


def test_the_split_is_a_pure_function_of_seed_and_id():
    ids = np.arange(5000, dtype=np.int64)
    m = validation_mask(ids, 0.1, seed=0)
    assert 0.08 < m.mean() < 0.12
    # removing ids moves nobody else in or out of the split
    sub = ids[::3]
    assert np.array_equal(validation_mask(sub, 0.1, 0), m[::3])
    # carving the rest again selects nothing more: a retrain on retained ids finds the same split
    assert not validation_mask(ids[~m], 0.1, 0).any()
    # another seed, another split; fraction 0, none
    assert not np.array_equal(validation_mask(ids, 0.1, 1), m)
    assert not validation_mask(ids, 0.0, 0).any()


def test_validation_fraction_is_checked():
    with pytest.raises(sj.ConfigError, match="val_fraction"):
        sj.DataConfig(val_fraction=0.9)
    with pytest.raises(sj.ConfigError, match="val_fraction"):
        sj.DataConfig(val_fraction="a")


def test_validation_ids_never_reach_a_shard_or_a_row(tmp_path):
    ds = tiny_digits()
    run, _ = sj.train(_cfg(val_fraction=0.2), ds, tmp_path / "r", metrics=False)
    val_ids = run.val_data()[0]
    want = ds.train_ids[validation_mask(ds.train_ids, 0.2, run.config.sisa.seed)]
    assert np.array_equal(val_ids, np.sort(want)) and len(val_ids) > 0
    assert not np.isin(val_ids, run.partition.ids).any()
    assert len(run.partition.ids) + len(val_ids) == len(ds.train_ids)
    spec = run.row_spec()
    for k in range(run.num_shards):
        data = run.shard_data(k)
        assert not np.isin(val_ids, data.ids).any()
        for j, ref in enumerate(run.manifest.shards[k].rows):
            rel = f"checkpoints/s{k:03d}r{j:03d}.g{ref.generation:06d}.row"
            header, _ = read_row(run.files.path(rel), ref.sha256, spec, rel)
            assert header["ids_fingerprint"] == fingerprint_ids(data.ids[data.slices <= j])
    # the validation accuracy is the ensemble's accuracy on exactly those rows
    pos = np.searchsorted(ds.train_ids, val_ids)
    expect = run.evaluate(ds.x_train[pos], ds.y_train[pos]).accuracy
    assert run.evaluate(split="val").accuracy == expect
    assert run.evaluate(split="val").num_examples == len(val_ids)
    with pytest.raises(UserInputError, match="split"):
        run.evaluate(split="train")


def test_a_run_without_a_split_says_so(tmp_path):
    run, _ = sj.train(_cfg(val_fraction=0.0), tiny_digits(), tmp_path / "r", metrics=False)
    assert not run.has_validation and run.manifest.val_data is None
    assert len(run.partition.ids) == len(tiny_digits().train_ids)
    with pytest.raises(RunError, match="no validation split"):
        run.evaluate(split="val")


def test_forgetting_validation_ids_drops_them_without_retraining(tmp_path):
    ds = tiny_digits()
    run, _ = sj.train(_cfg(), ds, tmp_path / "r", metrics=False)
    val_ids = run.val_data()[0]
    rows_before = {e.rows for e in run.manifest.shards}
    old_val_file = run.files.path(run.manifest.val_data.path)
    rep = sj.forget(run, [int(val_ids[0])], metrics=False)
    assert rep.ids == [int(val_ids[0])] and rep.restart == {} and rep.cost.examples == 0
    assert rep.validation_ids == 1
    assert {e.rows for e in run.manifest.shards} == rows_before  # no checkpoint rewritten
    assert int(val_ids[0]) not in run.val_data()[0].tolist()
    assert len(run.val_data()[0]) == len(val_ids) - 1
    assert not old_val_file.exists()  # the stored copy that held it is gone
    state = [r for r in run.ledger.records() if r.get("kind") == "forget"][-1]
    assert state["state"] == "done" and state["generation"] == run.generation == 1
    again = sj.forget(run, [int(val_ids[0])], metrics=False)
    assert again.is_noop and again.already_forgotten == [int(val_ids[0])]


def test_audit_and_verify_check_the_stored_validation_split(tmp_path):
    """The validation copy is a stored copy like the others: audit checks its checksum and that
    it holds no forgotten id, and verify counts a forgotten id in it as an inconsistency (here
    the old copy, id included, is put back with a manifest that vouches for it)."""
    import hashlib
    import io
    import json

    run, _ = sj.train(_cfg(), tiny_digits(), tmp_path / "r", metrics=False)
    old = run.val_data()
    gone = int(old[0][0])
    sj.forget(run, [gone], metrics=False)
    assert sj.audit(run).ok and sj.verify(run, write=False).ok
    path = run.files.path(run.manifest.val_data.path)
    good = path.read_bytes()
    path.write_bytes(good[:-8] + b"X" * 8)
    assert any("val" in p and "corrupt" in p for p in sj.audit(sj.open_run(run.run_dir)).problems)
    buf = io.BytesIO()
    np.savez(buf, ids=old[0], x=old[1], y=old[2])
    path.write_bytes(buf.getvalue())
    manifest = json.loads((run.run_dir / "MANIFEST.json").read_text())
    manifest["val_data"]["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    manifest["val_data"]["size"] = len(buf.getvalue())
    (run.run_dir / "MANIFEST.json").write_text(json.dumps(manifest))
    tampered = sj.open_run(run.run_dir)
    assert gone in tampered.val_data()[0].tolist()
    rep = sj.audit(tampered)
    assert "the stored validation split still holds forgotten ids" in rep.problems
    v = sj.verify(tampered, write=False)
    assert not v.ok and not v.partition_consistent


def test_a_mixed_request_is_exact_and_the_split_survives_a_retrain(tmp_path):
    ds = tiny_digits()
    cfg = _cfg()
    run, _ = sj.train(cfg, ds, tmp_path / "r", metrics=False)
    val_ids = run.val_data()[0]
    gone = [int(val_ids[1]), int(run.partition.ids[7]), int(run.partition.ids[100])]
    rep = sj.forget(run, gone, metrics=False)
    assert sorted(rep.ids) == sorted(gone) and rep.restart
    # training from scratch on the retained ids gives the same bits and the same split
    ref, _ = sj.train(cfg, without(ds, gone), tmp_path / "ref", metrics=False)
    assert np.array_equal(ref.val_data()[0], run.val_data()[0])
    assert np.array_equal(ref.partition.ids, run.partition.ids)
    for k in range(run.num_shards):
        for j in range(run.num_slices):
            assert_trees_equal(run.read_row(k, j), ref.read_row(k, j))
    # a retrain in place keeps the forgotten validation id out
    again, _ = sj.train(cfg, ds, tmp_path / "r", overwrite=True, metrics=False)
    assert np.array_equal(again.val_data()[0], run.val_data()[0])
    # the full-retrain baseline carves the same split from the run's retained data
    full, _ = sj.full_retrain(again, tmp_path / "full")
    assert np.array_equal(full.val_data()[0], again.val_data()[0])
    assert np.array_equal(full.partition.ids, again.partition.ids)


def test_val_metrics_log_each_slice_steps_validation_accuracy(tmp_path):
    from sisajax.metrics import read_metrics

    ds = tiny_digits()
    cfg = tiny_config(shards=3, slices=3).replace(data={"val_fraction": 0.2})
    plain, _ = sj.train(cfg, ds, tmp_path / "plain", metrics=False)
    run, _ = sj.train(cfg, ds, tmp_path / "tracked", val_metrics=True)
    recs = read_metrics(run.run_dir, "val_slice")
    assert [r["slice"] for r in recs] == [0, 1, 2]
    _, xv, yv = run.val_data()
    assert all(r["examples"] == len(yv) and set(r["shard_accuracy"]) == {"0", "1", "2"}
               for r in recs)  # fmt: skip
    # the last slice step's scores are the trained run's own
    ev = run.evaluate(split="val")
    assert recs[-1]["vote_accuracy"] == pytest.approx(ev.vote_accuracy)
    assert recs[-1]["mean_prob_accuracy"] == pytest.approx(ev.mean_prob_accuracy)
    assert [recs[-1]["shard_accuracy"][str(k)] for k in range(3)] == pytest.approx(
        ev.shard_accuracy
    )
    # tracking reads the states; it never changes the bits
    for k in range(3):
        for j in range(3):
            assert run.manifest.shards[k].rows[j].sha256 == plain.manifest.shards[k].rows[j].sha256
    assert not (plain.run_dir / "metrics.jsonl").exists()  # metrics=False: nothing logged
