"""Retraining a run in place never brings forgotten ids back (unless explicitly asked, recorded)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import assert_trees_equal, cli_run, copy_run, pick, tiny_config, tiny_digits, without

import sisajax as sj
from sisajax.cli import main as cli


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    run, _ = sj.train(tiny_config(), tiny_digits(), tmp_path_factory.mktemp("base") / "run")
    return run.run_dir


def _forgotten_everywhere(run, ids) -> list[str]:
    """Where a forgotten id still is (empty: nowhere)."""
    found = []
    if np.isin(ids, run.partition.ids).any():
        found.append("partition")
    for k in range(run.num_shards):
        if np.isin(ids, run.shard_data(k).ids).any():
            found.append(f"data copy {k}")
    return found


def test_overwrite_keeps_forgotten_ids_out_and_carries_the_ledger(base_run, tmp_path):
    run = copy_run(base_run, tmp_path / "run")
    ids = pick(run, 0, 1) + pick(run, 2, 3)
    sj.forget(run, ids)
    cfg = tiny_config(shards=4)  # a new recipe, same source data (which still holds the ids)
    run2, _ = sj.train(cfg, tiny_digits(), run.run_dir, overwrite=True)
    assert run2.num_shards == 4 and run2.generation == 2
    assert _forgotten_everywhere(run2, ids) == []
    assert set(ids) <= set(run2.partition.removed.tolist())  # tombstones carried forward
    recs = run2.ledger.records()
    assert [(r.get("kind"), r["state"]) for r in recs] == [
        ("forget", "pending"),
        ("forget", "done"),
        ("retrain", "pending"),
        ("retrain", "done"),
    ]
    assert recs[2]["excluded_forgotten"] == 2 and recs[2]["discard_deletion_history"] is False
    assert sj.audit(run2).ok
    # the new checkpoints are exactly a from-scratch run on the retained data
    scratch, _ = sj.train(cfg, without(tiny_digits(), ids), tmp_path / "scratch")
    for k in range(4):
        assert_trees_equal(run2.restore_block(k), scratch.restore_block(k))
    with pytest.raises(sj.ForgetError, match="not training ids"):
        sj.forget(run2, [10**6])
    assert sj.forget(run2, ids).already_forgotten == sorted(ids)  # still known as forgotten


def test_discarding_the_history_is_explicit_and_recorded(base_run, tmp_path):
    run = copy_run(base_run, tmp_path / "run")
    ids = pick(run, 1, 0)
    sj.forget(run, ids)
    with pytest.raises(sj.UserInputError, match="not empty"):
        sj.train(tiny_config(), tiny_digits(), run.run_dir)
    run2, _ = sj.train(
        tiny_config(), tiny_digits(), run.run_dir, overwrite=True, discard_deletion_history=True
    )
    assert np.isin(ids, run2.partition.ids).all()  # trained on again: the user asked for it
    last = run2.ledger.records()[-2]
    assert last["kind"] == "retrain" and last["discard_deletion_history"] is True
    assert last["forgotten_before"] == 1
    assert sj.audit(run2).ok


def test_overwrite_waits_for_the_writer_lock(base_run, tmp_path):
    run = copy_run(base_run, tmp_path / "run")
    with run.writer_lock():
        r = cli_run(
            [
                "train",
                f"run_dir={run.run_dir}",
                "overwrite=true",
                "sisa.shards=3",
                "sisa.slices=4",
                "sisa.epochs=3",
                "sisa.batch_size=8",
                "sisa.chunk_steps=16",
                "model.hidden=[16]",
                "ledger.lock_timeout_s=0.3",
                "progress=false",
            ]
        )
    assert r.returncode == 1 and "held by pid" in r.stderr
    assert sj.open_run(run.run_dir).generation == 0


@pytest.mark.slow
def test_crash_mid_retrain_keeps_the_old_run_and_resume_records_it(base_run, tmp_path):
    run = copy_run(base_run, tmp_path / "run")
    ids = pick(run, 2, 0)
    sj.forget(run, ids)
    before = [r.sha256 for e in run.manifest.shards for r in e.rows]
    r = cli_run(
        ["train", f"run_dir={run.run_dir}", "overwrite=true", "sisa.shards=2", "progress=false"],
        {"SISAJAX_FAULT": "retrain_before_commit"},
    )
    assert r.returncode == -9
    run = sj.open_run(run.run_dir)
    assert [r.sha256 for e in run.manifest.shards for r in e.rows] == before
    # config.json (for people) still describes the live run, not the uncommitted retrain
    config_json = json.loads((run.run_dir / "config.json").read_text())
    assert config_json == run.manifest.config and config_json["sisa"]["shards"] != 2
    assert cli(["resume", f"run_dir={run.run_dir}", "progress=false"]) == 0
    states = [(r.get("kind"), r["state"]) for r in sj.open_run(run.run_dir).ledger.records()]
    assert states[-2:] == [("retrain", "pending"), ("retrain", "aborted")]
    assert sj.audit(sj.open_run(run.run_dir)).ok
    # the same retrain after a commit crash is recorded as done by resume
    r = cli_run(
        ["train", f"run_dir={run.run_dir}", "overwrite=true", "sisa.shards=2", "progress=false"],
        {"SISAJAX_FAULT": "retrain_after_commit"},
    )
    assert r.returncode == -9
    assert cli(["resume", f"run_dir={run.run_dir}", "progress=false"]) == 0
    run = sj.open_run(run.run_dir)
    assert run.num_shards == 2 and _forgotten_everywhere(run, ids) == []
    assert [r["state"] for r in run.ledger.records()][-1] == "done"
    assert json.loads((run.run_dir / "config.json").read_text()) == run.manifest.config
    assert sj.audit(run).ok


def test_train_cli_overwrite_from_source_keeps_tombstones(base_run, tmp_path, capsys):
    run = copy_run(base_run, tmp_path / "run")
    ids = pick(run, 0, 0, n=2)
    assert (
        cli(["forget", f"run_dir={run.run_dir}", f"ids=[{ids[0]},{ids[1]}]", "progress=false"]) == 0
    )
    assert cli(["train", f"run_dir={run.run_dir}", "overwrite=true", "progress=false"]) == 0
    out = capsys.readouterr().out
    run = sj.open_run(run.run_dir)
    assert _forgotten_everywhere(run, ids) == [] and sj.audit(run).ok, out


def test_an_open_handle_follows_a_retrain_in_place_by_another_writer(base_run, tmp_path):
    """A handle opened before another writer retrained the run in place with a new recipe (here
    a new learning rate) forgets with the new recipe: after it, the run is exactly a from-scratch
    training of the new recipe on the retained data (a handle that kept its old engine would
    retrain the shard with the old learning rate)."""
    run = copy_run(base_run, tmp_path / "run")
    held = sj.open_run(run.run_dir)
    _ = held.engine  # built for the old recipe
    cfg = tiny_config(optim={"learning_rate": 0.2})
    sj.train(cfg, tiny_digits(), run.run_dir, overwrite=True)
    ids = pick(sj.open_run(run.run_dir), 1, 2)
    sj.forget(held, ids)
    assert held.config.optim.learning_rate == 0.2
    scratch, _ = sj.train(cfg, without(tiny_digits(), ids), tmp_path / "scratch")
    done = sj.open_run(run.run_dir)
    for k in range(scratch.num_shards):
        assert_trees_equal(done.restore_block(k), scratch.restore_block(k))


def test_a_retrain_that_names_another_id_salt_is_refused(tmp_path):
    """The kept deletion history is hashed with the run's salt: a retrain in place given another
    salt file is refused before anything is written (it would leave a run whose later forgets
    cannot match its ledger); with the run's own salt it goes ahead."""
    salt_a, salt_b = tmp_path / "salt_a", tmp_path / "salt_b"
    salt_a.write_text("first-salt-0123456789abcdef\n")
    salt_b.write_text("second-salt-0123456789abcdef\n")
    cfg = tiny_config().replace(ledger={"hash_ids": True, "salt_file": str(salt_a)})
    run, _ = sj.train(cfg, tiny_digits(), tmp_path / "run")
    sj.forget(run, pick(run, 0, 1))
    before = run.ledger.records()
    other = cfg.replace(ledger={"salt_file": str(salt_b)})
    with pytest.raises(sj.LedgerError, match="salt"):
        sj.train(other, tiny_digits(), run.run_dir, overwrite=True)
    again = sj.open_run(run.run_dir)
    assert again.generation == 1 and again.ledger.records() == before
    assert sj.audit(again).ok
    run2, _ = sj.train(cfg, tiny_digits(), run.run_dir, overwrite=True)
    assert run2.generation == 2 and sj.forget(run2, pick(run2, 1, 0)).ids


def test_a_folder_that_is_not_a_run_gets_an_honest_answer(tmp_path):
    """A non-empty folder without a manifest (here what a training killed before it recorded
    anything leaves) is neither retrained nor deleted, with or without overwrite: the error says
    what it is and what to do, instead of suggesting overwrite=True that then fails."""
    d = tmp_path / "half"
    (d / "checkpoints").mkdir(parents=True)
    (d / "checkpoints" / "s000r000.g000000.row").write_bytes(b"partial")
    for overwrite in (False, True):
        with pytest.raises(sj.UserInputError, match="holds no sisajax run") as e:
            sj.train(tiny_config(), tiny_digits(), d, overwrite=overwrite)
        assert "overwrite=True" not in str(e.value)
    assert (d / "checkpoints" / "s000r000.g000000.row").read_bytes() == b"partial"
