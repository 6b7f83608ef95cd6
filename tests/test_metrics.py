"""The metrics a researcher plots: per-call loss records, forget with TensorBoard, evaluate and
verify records, and the history plot's axes (whole-number ticks, the full-retrain reference)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from conftest import pick, tiny_config, tiny_digits

import sisajax as sj
from sisajax.cli import main as cli
from sisajax.experiments.history import history_figure
from sisajax.experiments.report import plot_accuracy, plt
from sisajax.metrics import read_metrics

TINY = [
    "sisa.shards=3",
    "sisa.slices=2",
    "sisa.epochs=2",
    "sisa.batch_size=8",
    "sisa.chunk_steps=8",
    "model.hidden=[16]",
    "progress=false",
]


def _tb_tags(folder) -> set[str]:
    """Every scalar tag in the TensorBoard event files under ``folder`` (TFRecord framing)."""
    from tensorboardX.proto import event_pb2

    tags: set[str] = set()
    for f in folder.glob("events.out.tfevents.*"):
        data, i = f.read_bytes(), 0
        while i + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            ev = event_pb2.Event()
            ev.ParseFromString(data[i + 12 : i + 12 + n])
            tags.update(v.tag for v in ev.summary.value)
            i += 12 + n + 4
    return tags


def _integer_ticks(ax) -> bool:
    ax.figure.canvas.draw()
    lo, hi = sorted(ax.get_xlim())
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    return bool(ticks) and all(float(t).is_integer() for t in ticks)


def test_every_program_call_gets_a_loss_record_even_at_one_slice(tmp_path):
    run, _ = sj.train(tiny_config(slices=1, chunk_steps=8), tiny_digits(), tmp_path / "r1")
    chunks = read_metrics(run.run_dir, "train_chunk")
    slices = {r["shard"]: r for r in read_metrics(run.run_dir, "train_slice")}
    steps = np.asarray(run.final_states().step)
    for k in range(3):
        own = [r for r in chunks if r["shard"] == k]
        assert len(own) > 2  # a curve, not the one point per slice step R=1 gives
        assert [r["chunk"] for r in own] == list(range(len(own)))
        assert sum(r["examples"] for r in own) == slices[k]["examples"]
        mean = sum(r["loss"] * r["examples"] for r in own) / slices[k]["examples"]
        assert mean == pytest.approx(slices[k]["loss"], rel=1e-9)
        assert all(r["step"] == r["first_step"] + r["steps"] for r in own)
        assert [r["global_step"] for r in own] == [r["step"] for r in own]  # R=1: one slice step
        assert own[-1]["global_step"] == steps[k]
    fig = history_figure(read_metrics(run.run_dir))
    try:
        (ax,) = fig.axes
        mean_line = next(ln for ln in ax.lines if ln.get_label() == "mean over shards")
        assert len(mean_line.get_xdata()) > 2
        assert _integer_ticks(ax)
    finally:
        plt().close(fig)


def test_a_forget_continues_each_shards_global_step(tmp_path):
    run, _ = sj.train(tiny_config(slices=3, chunk_steps=8), tiny_digits(), tmp_path / "r")
    before = read_metrics(run.run_dir, "train_chunk")
    sj.forget(run, pick(run, 1, 1))
    after = [r for r in read_metrics(run.run_dir, "train_chunk") if r["generation"] == 1]
    assert {r["shard"] for r in after} == {1} and min(r["slice"] for r in after) == 1
    first = min(after, key=lambda r: (r["slice"], r["chunk"]))
    kept = [r for r in before if r["shard"] == 1 and r["slice"] == 0]
    assert first["global_step"] - first["step"] == kept[-1]["global_step"]
    assert max(r["global_step"] for r in after) == np.asarray(run.final_states().step)[1]


def test_forget_writes_tensorboard_events(tmp_path):
    d = tmp_path / "run"
    assert cli(["train", f"run_dir={d}", *TINY]) == 0
    assert not (d / "tensorboard").exists()
    ids = pick(sj.open_run(d), 0, 1)
    args = [f"ids=[{ids[0]}]", "progress=false", "tensorboard=true"]
    assert cli(["forget", f"run_dir={d}", *args]) == 0
    tags = _tb_tags(d / "tensorboard")
    assert "forget/examples" in tags
    assert any(t.startswith("loss_per_chunk/gen_000001/shard_000") for t in tags)
    stream = ["requests.k=1", "requests.mode=sequential", "evaluate=false"]
    code = cli(["forget", f"run_dir={d}", *stream, "progress=false", "tensorboard=true"])
    assert code == 0
    tags = _tb_tags(d / "tensorboard")
    assert "stream_request/examples" in tags
    assert any(t.startswith("loss_per_chunk/gen_000002/") for t in tags)


def test_evaluate_and_verify_append_their_records(tmp_path):
    d = tmp_path / "run"
    assert cli(["train", f"run_dir={d}", *TINY]) == 0
    assert cli(["evaluate", f"run_dir={d}", "aggregation=mean_prob"]) == 0
    val_ev, ev = read_metrics(d, "evaluate")  # train scores its validation split first
    assert val_ev["split"] == "val" and ev["split"] == "test"
    assert ev["generation"] == 0 and ev["aggregation"] == "mean_prob" and ev["time"] > 0
    assert ev["accuracy"] == ev["mean_prob_accuracy"] and 0 < ev["vote_accuracy"] <= 1
    assert len(ev["shard_accuracy"]) == 3 and ev["wall_s"] >= 0
    assert cli(["verify", f"run_dir={d}", "shards=[0,2]"]) == 0
    (ver,) = read_metrics(d, "verify")
    assert ver["ok"] and ver["verified_shards"] == 2 and ver["identical_shards"] == 2
    assert ver["generation"] == 0 and ver["max_abs_diff"] == 0.0 and ver["time"] > 0


def _forget_record(examples: int, full: int) -> dict:
    return {"event": "forget", "generation": 1, "examples": examples, "full_retrain_examples": full}


def test_history_plot_has_whole_number_ticks_and_the_full_retrain_with_one_request():
    loss = [
        {"event": "train_slice", "generation": 0, "shard": k, "slice": j, "loss": 2.0 - j}
        for k in range(2)
        for j in range(2)
    ]
    stream = [{"event": "stream_request", "accuracy": 0.9 - i / 100} for i in range(3)]
    fig = history_figure([*loss, _forget_record(120, 3000), *stream])
    try:
        loss_ax, cost_ax, acc_ax = fig.axes
        for ax in (loss_ax, cost_ax, acc_ax):
            assert _integer_ticks(ax), ax.get_xticks()
        (full,) = [ln for ln in cost_ax.lines if ln.get_label() == "full retrain"]
        assert len(set(full.get_xdata())) == 2 and set(full.get_ydata()) == {3000}
    finally:
        plt().close(fig)
    fig = history_figure([_forget_record(120, 3000), _forget_record(90, 2990)])
    try:
        (cost_ax,) = fig.axes
        (full,) = [ln for ln in cost_ax.lines if ln.get_label() == "full retrain"]
        assert list(full.get_ydata()) == [3000, 2990] and _integer_ticks(cost_ax)
    finally:
        plt().close(fig)


def test_accuracy_plot_of_one_configuration_has_whole_number_ticks(tmp_path):
    row = {"shards": 5, "seed": 0, "vote": 0.9, "mean_prob": 0.91, "shard_mean": 0.8}
    pyplot = plt()
    fig, ax = pyplot.subplots()
    try:
        plot_accuracy(
            {"rows": [row], "name": "shards", "data": {"name": "digits"}},
            "shards",
            "S",
            tmp_path / "x.png",
            ax=ax,
        )
        assert _integer_ticks(ax), ax.get_xticks()
    finally:
        pyplot.close(fig)


def test_a_metrics_record_that_cannot_be_written_never_fails_the_forget(tmp_path, monkeypatch):
    """metrics.jsonl is a log: when the disk is full for it, the forget (whose records come
    after its commit) still completes and is recorded done; the loss is said once."""
    import errno
    import warnings

    from sisajax.metrics import MetricsLog

    run, _ = sj.train(tiny_config(), tiny_digits(), tmp_path / "run")
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().count("\n")

    def full(self, line):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(MetricsLog, "_append", full)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = sj.forget(run, pick(run, 1, 1))
    said = [w for w in caught if "metrics.jsonl could not be written" in str(w.message)]
    assert len(said) == 1 and "No space left" in str(said[0].message)
    assert rep.ids and [r["state"] for r in run.ledger.records()] == ["pending", "done"]
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == lines
    assert sj.audit(run).ok
