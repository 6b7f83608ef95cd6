"""Unlearning you can trust: ledger, crash-safe resume, locks, corrupt files, no residue."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_trees_equal, tiny_config, tiny_digits, without

import sisajax as sj
from experiments import cli

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """One trained run; tests copy it (training once keeps the module fast)."""
    d = tmp_path_factory.mktemp("base") / "run"
    ds = tiny_digits()
    cfg = tiny_config()
    sj.train(cfg, ds, d)
    return d, cfg, ds


def _copy(base_run, tmp_path, name="run"):
    src, cfg, ds = base_run
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return sj.open_run(dst), cfg, ds


def _pick(run, shard, slice_, n=1):
    d = run.shard_data(shard)
    return [int(i) for i in d.ids[d.slices == slice_][:n]]


def _cli(args, env_extra=None, timeout=120):
    env = dict(os.environ)
    env.setdefault("SISAJAX_CACHE_DIR", str(REPO / ".pytest_cache" / "jax-cli"))
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "experiments.cli", *args, "progress=false"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _files(run_dir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and "results" not in p.parts and not p.name.endswith(".lock")
    }


def _layout(run_dir: Path) -> list[str]:
    """Run-directory file names, with Orbax's random internal names collapsed."""
    out = set()
    for name in _files(run_dir):
        parts = name.split("/")
        out.add("/".join(parts[:2]) + ("/..." if len(parts) > 2 else ""))
    return sorted(out)


# -- ledger ---------------------------------------------------------------------------------


def test_ledger_records_are_chained_and_tamper_evident(base_run, tmp_path):
    run, _, _ = _copy(base_run, tmp_path)
    a, b = _pick(run, 0, 1), _pick(run, 2, 0)
    sj.forget(run, a)
    sj.forget(run, b)
    sj.forget(run, a)  # already forgotten: a record, no retrain
    recs = run.ledger.records()
    assert [r["state"] for r in recs] == ["pending", "done", "pending", "done", "done"]
    assert recs[0]["ids"] == a and recs[0]["locations"] == {str(a[0]): [0, 1]}
    assert recs[1]["files_removed"] and recs[1]["model_fingerprints"].keys() == {"0"}
    assert recs[4]["already_forgotten"] == a
    assert run.ledger.verify().ok and sj.audit(run).ok

    path = run.run_dir / "ledger.jsonl"
    original = path.read_text()
    path.write_text(original.replace(f'"ids": [{b[0]}]', f'"ids": [{b[0] + 1}]'))
    assert "edited" in " ".join(run.ledger.verify().problems)
    path.write_text("".join(original.splitlines(keepends=True)[:-1]))  # truncated
    assert "truncated" in " ".join(run.ledger.verify().problems)
    path.write_text(original + '{"seq": 5')  # torn write
    assert not run.ledger.verify().ok
    r = _cli(["audit", f"run_dir={run.run_dir}"])
    assert r.returncode == 1 and "BROKEN" in r.stdout


def test_hash_ids_keeps_no_raw_ids(tmp_path):
    ds = tiny_digits()
    cfg = tiny_config()
    cfg = sj.RunConfig(cfg.data, cfg.model, cfg.optim, cfg.sisa, sj.LedgerConfig(hash_ids=True))
    run, _ = sj.train(cfg, ds, tmp_path / "run")
    ids = _pick(run, 1, 2, n=2)
    sj.forget(run, ids)
    assert sj.forget(run, ids[:1]).already_forgotten == ids[:1]  # still idempotent

    def ints(obj):
        if isinstance(obj, dict):
            return [v for x in obj.values() for v in ints(x)] + [
                int(k) for k in obj if k.lstrip("-").isdigit()
            ]
        if isinstance(obj, list):
            return [v for x in obj for v in ints(x)]
        return [obj] if isinstance(obj, int) and not isinstance(obj, bool) else []

    stored = [v for r in run.ledger.records() for v in ints(r)]
    assert not set(ids) & set(stored)
    assert not np.isin(ids, run.partition.removed).any()
    assert sj.audit(run).ok


# -- crash safety -----------------------------------------------------------------------------

FAULTS = [
    "after_pending",
    "mid_retrain:2",
    "mid_save",
    "before_commit",
    "after_commit",
    "before_done",
]


@pytest.fixture(scope="module")
def reference(base_run, tmp_path_factory):
    """The uninterrupted result of forgetting the fault-test ids."""
    run, cfg, ds = _copy(base_run, tmp_path_factory.mktemp("ref"))
    ids = _pick(run, 0, 1) + _pick(run, 2, 0)
    sj.forget(run, ids)
    return run, ids


@pytest.mark.slow
@pytest.mark.parametrize("point", FAULTS)
def test_kill_mid_forget_then_resume_equals_uninterrupted(base_run, reference, tmp_path, point):
    ref, ids = reference
    run, _, _ = _copy(base_run, tmp_path)
    before = json.loads((run.run_dir / "MANIFEST.json").read_text())
    r = _cli(
        ["forget", f"run_dir={run.run_dir}", f"ids=[{','.join(map(str, ids))}]"],
        {"SISAJAX_FAULT": point},
    )
    assert r.returncode == -9, r.stdout + r.stderr  # SIGKILL at the fault point
    # the ledger never says done for work not done
    states = [x["state"] for x in run.ledger.records()]
    assert states == ["pending"]
    # a reader sees a complete generation: before, or (after the commit point) after
    reader = sj.open_run(run.run_dir)
    committed = point in ("after_commit", "before_done")
    assert reader.generation == (1 if committed else before["generation"])
    assert reader.evaluate().num_examples > 0
    # the next forget (or resume) finishes the job first
    assert _cli(["status", f"run_dir={run.run_dir}"]).stdout.count("pending requests 1") == 1
    sj.resume(run)
    assert [x["state"] for x in run.ledger.records()] == ["pending", "done"]
    for k in range(run.num_shards):
        assert_trees_equal(run.restore_block(k), ref.restore_block(k))
        assert run.shard_entry(k)["fingerprints"] == ref.shard_entry(k)["fingerprints"]
    assert _layout(run.run_dir) == _layout(ref.run_dir)
    rep = sj.audit(run)
    assert rep.ok, rep.problems


def test_forget_finishes_a_pending_request_first(base_run, tmp_path):
    run, cfg, ds = _copy(base_run, tmp_path)
    a = _pick(run, 1, 1)
    r = _cli(["forget", f"run_dir={run.run_dir}", f"ids=[{a[0]}]"], {"SISAJAX_FAULT": "mid_save"})
    assert r.returncode == -9
    b = _pick(run, 2, 3)
    sj.forget(run, b)
    states = [(x["state"], x.get("resumed")) for x in run.ledger.records()]
    assert states == [("pending", None), ("done", True), ("pending", None), ("done", False)]
    scratch, _ = sj.train(cfg, without(ds, a + b), tmp_path / "scratch")
    for k in range(run.num_shards):
        assert_trees_equal(run.restore_block(k), scratch.restore_block(k))


# -- concurrency ------------------------------------------------------------------------------


def test_second_writer_waits_or_fails_clearly(base_run, tmp_path):
    run, cfg, ds = _copy(base_run, tmp_path)
    a = _pick(run, 0, 0)
    with run.writer_lock():
        r = _cli(["forget", f"run_dir={run.run_dir}", f"ids=[{a[0]}]", "ledger.lock_timeout_s=0.5"])
    assert r.returncode == 2 and "locked by pid" in r.stdout
    assert run.ledger.records() == []
    # two writers at once: the second waits, neither request is lost
    b = _pick(run, 1, 2)
    p1 = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "experiments.cli",
            "forget",
            f"run_dir={run.run_dir}",
            f"ids=[{a[0]}]",
            "progress=false",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    p2 = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "experiments.cli",
            "forget",
            f"run_dir={run.run_dir}",
            f"ids=[{b[0]}]",
            "progress=false",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert p1.wait(timeout=120) == 0 and p2.wait(timeout=120) == 0
    run.reload()
    done = [x for x in run.ledger.records() if x["state"] == "done"]
    assert sorted(
        i for x in run.ledger.records() if x["state"] == "pending" for i in x["ids"]
    ) == sorted(a + b)
    assert len(done) == 2 and run.generation == 2
    scratch, _ = sj.train(cfg, without(ds, a + b), tmp_path / "scratch")
    for k in range(run.num_shards):
        assert_trees_equal(run.restore_block(k), scratch.restore_block(k))


def test_reader_waits_for_commit_and_sees_a_whole_generation(base_run, tmp_path):
    run, _, _ = _copy(base_run, tmp_path)
    reader = sj.open_run(run.run_dir)
    with run.reader_lock(exclusive=True):  # a writer mid-switch
        t0 = time.monotonic()
        with pytest.raises(sj.RunBusyError):
            reader.config = reader.config.replace(ledger={"lock_timeout_s": 0.2})
            reader.final_states()
        assert time.monotonic() - t0 >= 0.2


# -- bad input and corrupt files ----------------------------------------------------------------


@pytest.mark.parametrize("damage", ["bitflip", "truncate", "delete_block", "data_bitflip"])
def test_corrupt_files_are_detected_and_nothing_changes(base_run, tmp_path, damage):
    run, _, _ = _copy(base_run, tmp_path)
    entry = run.shard_entry(1)
    block = run.run_dir / "checkpoints" / entry["checkpoint"]["block"]
    biggest = max((p for p in block.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    if damage == "bitflip":
        raw = bytearray(biggest.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        biggest.write_bytes(bytes(raw))
    elif damage == "truncate":
        biggest.write_bytes(biggest.read_bytes()[:-10])
    elif damage == "delete_block":
        shutil.rmtree(block)
    else:
        data = run.run_dir / entry["data"]
        raw = bytearray(data.read_bytes())
        raw[-100] ^= 0x01
        data.write_bytes(bytes(raw))
    before = _files(run.run_dir)
    with pytest.raises((sj.CheckpointError, sj.RunError), match="corrupt|missing"):
        sj.forget(run, _pick(run, 1, 0))
    assert _files(run.run_dir) == before
    assert run.ledger.records() == []
    assert not sj.audit(run).ok


def test_emptying_a_shard_drops_it_from_the_ensemble(base_run, tmp_path):
    run, cfg, ds = _copy(base_run, tmp_path)
    all0 = run.shard_data(0).ids.tolist()
    sj.forget(run, all0)
    assert run.active_shards().tolist() == [False, True, True]
    ev = run.evaluate()
    assert ev.active_shards == 2 and np.isnan(ev.shard_accuracy[0]) and ev.vote_accuracy > 0.5
    # identical to a from-scratch run that allows the empty shard
    cfg_empty = cfg.replace(sisa={"allow_empty_shards": True})
    scratch, _ = sj.train(cfg_empty, without(ds, all0), tmp_path / "scratch")
    for k in range(3):
        assert_trees_equal(run.restore_block(k), scratch.restore_block(k))
    with pytest.raises(sj.PartitionError, match="no training examples"):
        sj.train(cfg, without(ds, all0), tmp_path / "strict")
    with pytest.raises(sj.ForgetError, match="every remaining"):
        sj.forget(run, run.partition.ids)
    assert sj.audit(run).ok


def test_every_file_is_free_of_forgotten_ids(base_run, tmp_path):
    run, _, _ = _copy(base_run, tmp_path)
    ids = _pick(run, 0, 0, 2) + _pick(run, 1, 3) + _pick(run, 2, 1)
    sj.forget(run, ids)
    sj.forget(run, _pick(run, 0, 2))
    for p in run.run_dir.rglob("*"):
        if p.suffix == ".npz" and p.name.startswith("shard_"):
            with np.load(p) as z:
                assert not np.isin(ids, z["ids"]).any(), p
        if p.name == "sisa_meta.json":
            assert not np.isin(ids, json.loads(p.read_text())["ids"]).any(), p
        if p.name.startswith("partition"):
            part = sj.Partition.load(p)
            assert not np.isin(ids, part.ids).any()
    # storage stays bounded: one block per shard, nothing pending, nothing stray
    assert len(list((run.run_dir / "checkpoints").iterdir())) == run.num_shards
    assert not any((run.run_dir / "pending").iterdir())
    rep = sj.audit(run)
    assert rep.ok and rep.residual_exposure == 0 and rep.checkpoints_checked == 12


def test_audit_detects_residual_exposure(base_run, tmp_path):
    run, _, _ = _copy(base_run, tmp_path)
    target = _pick(run, 2, 1)
    keep = run.run_dir / "keep"
    shutil.copytree(run.run_dir / "checkpoints", keep)
    old_manifest = json.loads((run.run_dir / "MANIFEST.json").read_text())
    sj.forget(run, target)
    # simulate a buggy forget: put the old shard-2 checkpoint (trained on the id) back
    m = json.loads((run.run_dir / "MANIFEST.json").read_text())
    m["shards"]["2"]["checkpoint"] = old_manifest["shards"]["2"]["checkpoint"]
    shutil.copytree(
        keep / old_manifest["shards"]["2"]["checkpoint"]["block"],
        run.run_dir / "checkpoints" / m["shards"]["2"]["checkpoint"]["block"],
    )
    (run.run_dir / "MANIFEST.json").write_text(json.dumps(m))
    shutil.rmtree(keep)
    rep = sj.audit(run)
    assert not rep.ok and rep.residual_exposure == 3  # slices 1, 2, 3 of shard 2 saw the id
    assert {e["slice"] for e in rep.exposures} == {1, 2, 3}


# -- request streams --------------------------------------------------------------------------


def test_request_distributions_are_seeded_and_skewed():
    ids = np.arange(10_000, dtype=np.int64)
    a = sj.sample_requests(ids, 50, "pareto", seed=3)
    assert np.array_equal(a, sj.sample_requests(ids, 50, "pareto", seed=3))
    assert not np.array_equal(a, sj.sample_requests(ids, 50, "pareto", seed=4))
    from sisajax.requests import request_weights

    for dist in ("exponential", "pareto"):
        w = np.sort(request_weights(ids, dist, seed=0))[::-1]
        assert w[:2000].sum() > 0.5 and np.isclose(w.sum(), 1.0)  # top 20% hold most mass
    assert np.allclose(request_weights(ids, "uniform", 0), 1e-4)
    with pytest.raises(ValueError, match="unknown request distribution"):
        sj.sample_requests(ids, 5, "zipf")


def test_sequential_and_batched_streams_reach_the_same_model(base_run, tmp_path):
    seq, _, _ = _copy(base_run, tmp_path, "seq")
    bat, _, _ = _copy(base_run, tmp_path, "bat")
    ids = sj.sample_requests(seq.partition.ids, 4, "exponential", seed=1)
    s = sj.serve_requests(seq, ids, "sequential")
    b = sj.serve_requests(bat, ids, "batched")
    assert len(s.costs) == 4 and len(b.costs) == 1
    assert s.total.examples >= b.total.examples
    for k in range(seq.num_shards):
        assert_trees_equal(seq.restore_block(k), bat.restore_block(k))


def test_status_cli(base_run, tmp_path, capsys):
    run, _, _ = _copy(base_run, tmp_path)
    sj.forget(run, _pick(run, 0, 0))
    assert cli.main(["status", f"run_dir={run.run_dir}"]) == 0
    out = capsys.readouterr().out
    assert "forgotten 1" in out and "pending requests 0" in out
    assert cli.main(["audit", f"run_dir={run.run_dir}"]) == 0
    assert "PASS" in capsys.readouterr().out
