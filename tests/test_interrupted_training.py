"""Ctrl-C during the training of a new run keeps its completed slice steps; training the same
configuration on the same data again (or `sisajax resume`) finishes it, bit-identical to an
uninterrupted training."""

import dataclasses
import json

import numpy as np
import pytest
from conftest import assert_trees_equal, tiny_config, tiny_digits

import sisajax as sj
from sisajax.costs import slice_schedule_cost
from sisajax.errors import RunError, UserInputError
from sisajax.generation_writer import GenerationWriter
from sisajax.store.interrupted import INTERRUPTED


def _interrupt_after(monkeypatch, n_slices: int) -> None:
    """Ctrl-C arrives when slice step ``n_slices`` is handed over (0: before any is done)."""
    real = GenerationWriter.on_slice

    def on_slice(self, shards):
        handle = real(self, shards)
        seen = []

        def wrapped(out):
            if len(seen) == n_slices:
                raise KeyboardInterrupt
            seen.append(out.slice)
            handle(out)

        return wrapped

    monkeypatch.setattr(GenerationWriter, "on_slice", on_slice)


def _rows(run):
    return [[run.read_row(k, j) for j in range(run.num_slices)] for k in range(run.num_shards)]


def test_an_interrupted_training_continues_bit_identically(tmp_path, monkeypatch):
    ds, cfg = tiny_digits(), tiny_config(slices=4)
    ref, _ = sj.train(cfg, ds, tmp_path / "ref", metrics=False)
    with monkeypatch.context() as m:
        _interrupt_after(m, 3)  # slice steps 0 and 1 are written; 2 was being fetched
        with pytest.raises(KeyboardInterrupt):
            sj.train(cfg, ds, tmp_path / "run", metrics=False)
    record = json.loads((tmp_path / "run" / INTERRUPTED).read_text())
    assert record["completed"] == 2 and len(record["rows"]) == cfg.sisa.shards
    assert not (tmp_path / "run" / "MANIFEST.json").exists()
    # another configuration or other data is refused, with one line, and changes nothing
    with pytest.raises(UserInputError, match="another configuration"):
        sj.train(cfg.replace(optim={"learning_rate": 0.2}), ds, tmp_path / "run", metrics=False)
    with pytest.raises(UserInputError, match="other data"):
        sj.continue_training(tmp_path / "run")  # the whole digits set, not the tiny one
    rescaled = dataclasses.replace(ds, preprocessing={"scale": 2.0})  # same rows, other input map
    with pytest.raises(UserInputError, match="other data"):
        sj.train(cfg, rescaled, tmp_path / "run", metrics=False)
    with pytest.raises(UserInputError, match="interrupted training, not a run"):
        sj.train(cfg, ds, tmp_path / "run", overwrite=True, discard_deletion_history=True)
    run, cost = sj.train(cfg, ds, tmp_path / "run", metrics=False)
    assert not (tmp_path / "run" / INTERRUPTED).exists()
    assert run.manifest.origin == {"op": "train", "continued_after_slice_steps": 2}
    # the continuation trained slice steps 2 and 3 only, nothing twice
    sizes, s = run.partition.sizes(), cfg.sisa.shards
    expect = slice_schedule_cost(sizes, cfg.sisa.shard_epochs, cfg.sisa.batch_size, np.full(s, 2))
    assert (cost.examples, cost.grad_steps) == expect
    for a, b in zip(_rows(run), _rows(ref), strict=True):
        for x, y in zip(a, b, strict=True):
            assert_trees_equal(x, y)
    assert sj.verify(run, write=False).ok
    assert np.array_equal(run.val_data()[0], ref.val_data()[0])


def test_an_interruption_before_any_slice_step_removes_the_new_directory(tmp_path, monkeypatch):
    _interrupt_after(monkeypatch, 0)
    with pytest.raises(KeyboardInterrupt):
        sj.train(tiny_config(), tiny_digits(), tmp_path / "run", metrics=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(RunError, match="no interrupted training"):
        sj.continue_training(tmp_path / "run")


def test_a_damaged_row_of_an_interrupted_training_is_refused(tmp_path, monkeypatch):
    ds, cfg = tiny_digits(), tiny_config()
    with monkeypatch.context() as m:
        _interrupt_after(m, 3)
        with pytest.raises(KeyboardInterrupt):
            sj.train(cfg, ds, tmp_path / "run", metrics=False)
    row = tmp_path / "run" / "checkpoints" / "s001r001.g000000.row"
    row.write_bytes(row.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(Exception, match="s001r001"):
        sj.train(cfg, ds, tmp_path / "run", metrics=False)


def test_continuing_logs_validation_accuracy_when_asked(tmp_path, monkeypatch):
    """``val_metrics=True`` on the call that continues an interrupted training logs the
    validation accuracy of the slice steps it trains (the stored ones are not trained again)."""
    from sisajax.metrics import read_metrics

    ds, cfg = tiny_digits(), tiny_config(slices=4)
    with monkeypatch.context() as m:
        _interrupt_after(m, 3)
        with pytest.raises(KeyboardInterrupt):
            sj.train(cfg, ds, tmp_path / "run")
    done = json.loads((tmp_path / "run" / INTERRUPTED).read_text())["completed"]
    sj.train(cfg, ds, tmp_path / "run", val_metrics=True)
    logged = {r["slice"] for r in read_metrics(tmp_path / "run", "val_slice")}
    assert logged == set(range(done, cfg.sisa.slices))


def test_resume_repairs_what_a_crash_after_the_commit_left(tmp_path):
    """A crash (or a full disk) between a training's commit and its last files leaves the
    interrupted-training record beside a live manifest and no config.json: ``resume`` removes the
    stale record and writes config.json from the manifest; the run is unchanged otherwise."""
    run, _ = sj.train(tiny_config(), tiny_digits(), tmp_path / "run")
    root = run.run_dir
    config = json.loads((root / "config.json").read_text())
    (root / "config.json").unlink()
    (root / INTERRUPTED).write_text("{}")
    rows = {p.name: p.read_bytes() for p in (root / "checkpoints").iterdir()}
    assert sj.resume(sj.open_run(root)) == []
    assert not (root / INTERRUPTED).exists()
    assert json.loads((root / "config.json").read_text()) == config
    assert {p.name: p.read_bytes() for p in (root / "checkpoints").iterdir()} == rows
    assert sj.audit(sj.open_run(root)).ok
