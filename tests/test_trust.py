"""Unlearning you can trust: ledger, crash-safe resume, locks, corrupt files, no residue."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import (
    REPO,
    assert_trees_equal,
    cli_env,
    cli_run,
    copy_run,
    pick,
    tiny_config,
    tiny_digits,
    tree_bytes,
    without,
)

import sisajax as sj
from sisajax.cli import main as cli
from sisajax.store.manifest import row_file


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
    return copy_run(src, tmp_path / name), cfg, ds


# -- ledger ---------------------------------------------------------------------------------


def test_ledger_records_are_chained_and_tamper_evident(base_run, tmp_path, capsys):
    run, _, _ = _copy(base_run, tmp_path)
    a, b = pick(run, 0, 1), pick(run, 2, 0)
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
    path.write_text("".join(original.splitlines(keepends=True)[:-1]))  # a record removed
    assert "records removed" in " ".join(run.ledger.verify().problems)
    path.write_text(original)
    assert cli(["audit", f"run_dir={run.run_dir}"]) == 0
    capsys.readouterr()
    lines = original.splitlines(keepends=True)
    path.write_text(lines[0] + lines[2] + lines[1] + "".join(lines[3:]))  # reordered
    assert cli(["audit", f"run_dir={run.run_dir}"]) == 1
    assert "BROKEN" in capsys.readouterr().out


def _raw_ints(obj) -> list[int]:
    if isinstance(obj, dict):
        return [v for x in obj.values() for v in _raw_ints(x)] + [
            int(k) for k in obj if isinstance(k, str) and k.lstrip("-").isdigit()
        ]
    if isinstance(obj, list):
        return [v for x in obj for v in _raw_ints(x)]
    return [obj] if isinstance(obj, int) and not isinstance(obj, bool) else []


def test_hash_ids_keeps_no_raw_ids_in_any_file(tmp_path, capsys, monkeypatch):
    """With hash_ids and the salt given from outside, no file of the run holds a forgotten id,
    and the run directory alone cannot confirm a guessed id."""
    salt = tmp_path / "salt.txt"
    salt.write_text("a-secret-salt-kept-outside-the-run")
    salt.chmod(0o600)
    monkeypatch.setenv("SISAJAX_LEDGER_SALT_FILE", str(salt))
    cfg = tiny_config().replace(ledger={"hash_ids": True})
    base = tiny_digits()  # ids far above any counter, so a leaked id cannot hide among them
    ds = dataclasses.replace(
        base, train_ids=base.train_ids + 7_000_000_000, test_ids=base.test_ids + 7_000_000_000
    )
    run, _ = sj.train(cfg, ds, tmp_path / "run")
    assert not (run.run_dir / "ledger.salt").exists()  # the salt lives outside the run
    ids = pick(run, 1, 2, n=2)
    rep = sj.forget(run, ids)
    assert rep.ids == ids and rep.to_dict()["ids"] != ids  # raw in memory, hashed in files
    assert sj.forget(run, ids[:1]).already_forgotten == ids[:1]  # still idempotent
    d = str(run.run_dir)
    assert cli(["forget", f"run_dir={d}", f"ids=[{pick(run, 0, 0)[0]}]", "progress=false"]) == 0
    assert (
        cli(
            ["forget", f"run_dir={d}", "requests.k=2", "requests.mode=sequential", "progress=false"]
        )
        == 0
    )
    assert cli(["forget", f"run_dir={d}", "ids=[99999]"]) == 2  # unknown id: not echoed
    err = capsys.readouterr().err
    assert "99999" not in err and "not training ids" in err
    after = sj.open_run(d)
    held_out = set(after.val_data()[0].tolist())  # the validation split: never trained on
    forgotten = set(ds.train_ids.tolist()) - set(after.partition.ids.tolist()) - held_out
    assert len(forgotten) == 5 and set(ids) <= forgotten
    texts = [str(i).encode() for i in forgotten]
    for p in run.run_dir.rglob("*"):
        if not p.is_file():
            continue
        raw = p.read_bytes()
        assert not any(t in raw for t in texts), p  # no decimal id in any text file
        if p.suffix in (".json", ".jsonl"):
            for line in raw.decode().splitlines() if p.suffix == ".jsonl" else [raw.decode()]:
                if line.strip():
                    assert not forgotten & set(_raw_ints(json.loads(line))), p
        if p.suffix == ".npz" or p.suffix == ".row":  # binary: no id as int64 either
            assert not any(np.int64(i).tobytes() in raw for i in forgotten), p
    assert not (run.run_dir / "pending").exists()
    assert not np.isin(sorted(forgotten), sj.open_run(d).partition.removed).any()
    assert sj.audit(sj.open_run(d)).ok
    # without the salt nothing can be checked or added: a clear error, not a guess
    monkeypatch.delenv("SISAJAX_LEDGER_SALT_FILE")
    fresh = sj.open_run(d)
    with pytest.raises(sj.LedgerError, match="salt"):
        sj.forget(fresh, pick(fresh, 0, 1))


def test_hash_ids_salt_in_the_run_is_private(tmp_path):
    cfg = tiny_config().replace(ledger={"hash_ids": True})
    run, _ = sj.train(cfg, tiny_digits(), tmp_path / "run")
    salt = run.run_dir / "ledger.salt"
    assert salt.exists() and (salt.stat().st_mode & 0o777) == 0o600


# -- crash safety -----------------------------------------------------------------------------

FAULTS = [
    "after_pending",
    "mid_retrain:2",
    "mid_save",
    "before_commit",
    "after_commit",
    "before_done",
    "ledger_after_line:2",
    "ledger_after_head",
]


@pytest.fixture(scope="module")
def reference(base_run, tmp_path_factory):
    """The uninterrupted result of forgetting the fault-test ids."""
    run, cfg, ds = _copy(base_run, tmp_path_factory.mktemp("ref"))
    ids = pick(run, 0, 1) + pick(run, 2, 0)
    sj.forget(run, ids)
    return run, ids


@pytest.mark.slow
@pytest.mark.parametrize("point", FAULTS)
def test_kill_mid_forget_then_resume_equals_uninterrupted(base_run, reference, tmp_path, point):
    ref, ids = reference
    run, _, _ = _copy(base_run, tmp_path)
    r = cli_run(
        ["forget", f"run_dir={run.run_dir}", f"ids=[{','.join(map(str, ids))}]", "progress=false"],
        {"SISAJAX_FAULT": point},
    )
    assert r.returncode == -9, r.stdout + r.stderr  # SIGKILL at the fault point
    # the ledger never says done for work not done
    states = [x["state"] for x in run.ledger.records()]
    done_line_written = point == "ledger_after_line:2"  # killed between done's line and head
    assert states == (["pending", "done"] if done_line_written else ["pending"])
    committed = point in ("after_commit", "before_done") or done_line_written
    # a reader sees a complete generation: before, or (after the commit point) after
    reader = sj.open_run(run.run_dir)
    assert reader.generation == (1 if committed else 0)
    assert reader.evaluate().num_examples > 0
    if point.startswith("ledger_after_line"):
        assert sj.audit(reader).chain.interrupted == "unanchored"
    sj.resume(run)
    assert [x["state"] for x in run.ledger.records()] == ["pending", "done"]
    for k in range(run.num_shards):
        assert_trees_equal(run.restore_block(k), ref.restore_block(k))
        assert run.manifest.shards[k].fingerprints == ref.manifest.shards[k].fingerprints
    names = sorted(p.name for p in (run.run_dir / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (ref.run_dir / "checkpoints").iterdir())
    rep = sj.audit(run)
    assert rep.ok, rep.problems + rep.chain.problems


def test_forget_finishes_a_pending_request_first(base_run, tmp_path):
    run, cfg, ds = _copy(base_run, tmp_path)
    a = pick(run, 1, 1)
    r = cli_run(
        ["forget", f"run_dir={run.run_dir}", f"ids=[{a[0]}]", "progress=false"],
        {"SISAJAX_FAULT": "mid_save"},
    )
    assert r.returncode == -9
    b = pick(run, 2, 3)
    sj.forget(run, b)
    states = [(x["state"], x.get("resumed")) for x in run.ledger.records()]
    assert states == [("pending", None), ("done", True), ("pending", None), ("done", False)]
    scratch, _ = sj.train(cfg, without(ds, a + b), tmp_path / "scratch")
    for k in range(run.num_shards):
        assert_trees_equal(run.restore_block(k), scratch.restore_block(k))


@pytest.mark.slow
def test_a_resume_killed_after_its_done_record_left_no_superseded_file(base_run, tmp_path):
    """A forget killed after its commit leaves the old data copy and checkpoints (they still
    hold the id) for ``resume`` to delete. Resume deletes them before it writes ``done``: killed
    right after that record, nothing with the id is left, and the run audits clean."""
    run, _, _ = _copy(base_run, tmp_path)
    a = pick(run, 1, 2)
    argv = ["forget", f"run_dir={run.run_dir}", f"ids=[{a[0]}]", "progress=false"]
    assert cli_run(argv, {"SISAJAX_FAULT": "after_commit"}).returncode == -9
    code = f"import sisajax as sj; sj.resume(sj.open_run({str(run.run_dir)!r}))"
    r = subprocess.run(
        [sys.executable, "-c", code],
        env=cli_env({"SISAJAX_FAULT": "ledger_after_head:1"}),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == -9, r.stderr[-2000:]
    run = sj.open_run(run.run_dir)
    assert [x["state"] for x in run.ledger.records()] == ["pending", "done"]
    superseded, _ = run.files.scan(run.manifest.files())
    assert superseded == []
    for f in (run.run_dir / "data").glob("*.npz"):
        assert a[0] not in np.load(f)["ids"]
    rep = sj.audit(run)
    assert rep.ok, rep.problems


@pytest.mark.slow
def test_resume_with_the_wrong_id_salt_refuses_and_closes_nothing(tmp_path, monkeypatch):
    """With ``hash_ids`` a pending request stores salted hashes. Resumed under another salt none
    of them matches: that is refused (nothing written), never recorded as "done" with the id
    still trained on; the right salt then finishes it."""
    monkeypatch.setenv("SISAJAX_LEDGER_SALT", "the-run-salt-0123456789abcdef")
    cfg = tiny_config().replace(ledger={"hash_ids": True})
    run, _ = sj.train(cfg, tiny_digits(), tmp_path / "h")
    a = pick(run, 1, 1)
    argv = ["forget", f"run_dir={run.run_dir}", f"ids=[{a[0]}]", "progress=false"]
    env = {"SISAJAX_LEDGER_SALT": "the-run-salt-0123456789abcdef"}
    assert cli_run(argv, {**env, "SISAJAX_FAULT": "after_pending"}).returncode == -9
    monkeypatch.setenv("SISAJAX_LEDGER_SALT", "another-salt-0123456789abcdef")
    with pytest.raises(sj.LedgerError, match="salt"):
        sj.resume(sj.open_run(run.run_dir))
    b = pick(run, 2, 0)
    with pytest.raises(sj.LedgerError, match="salt"):  # a new forget finishes pending ones first
        sj.forget(sj.open_run(run.run_dir), b)
    run = sj.open_run(run.run_dir)
    assert [x["state"] for x in run.ledger.records()] == ["pending"]
    assert a[0] in run.shard_data(1).ids
    monkeypatch.setenv("SISAJAX_LEDGER_SALT", "the-run-salt-0123456789abcdef")
    run = sj.open_run(run.run_dir)
    (report,) = sj.resume(run)
    assert [x["state"] for x in run.ledger.records()] == ["pending", "done"]
    assert a[0] not in run.shard_data(1).ids
    assert sj.audit(run).ok


def test_a_pending_record_naming_ids_the_run_cannot_place_is_refused(base_run, tmp_path):
    """A pending forget whose ids are neither in the run nor forgotten (a ledger copied from
    another run) is not closed as "done": resume refuses and writes nothing."""
    from sisajax.unlearning import pending_ids

    run, _, _ = _copy(base_run, tmp_path)
    a = pick(run, 1, 1)
    rec = {"request_id": "r-test", "ids": [a[0], 10**9], "locations": {str(a[0]): [1, 1]}}
    with pytest.raises(sj.LedgerError, match="1 id\\(s\\) that are neither in this run"):
        pending_ids(run, rec)
    assert pending_ids(run, {**rec, "ids": [a[0]]}).tolist() == a
    sj.forget(run, a)  # forgotten ids are accounted for, not refused
    assert pending_ids(run, {**rec, "ids": [a[0]]}).tolist() == []


# -- concurrency ------------------------------------------------------------------------------


@pytest.mark.parametrize("other_holds_lock", [True, False])
def test_a_new_run_that_loses_the_race_for_its_folder_touches_nothing(
    tmp_path, monkeypatch, other_holds_lock
):
    """Two ``train`` calls into the same new folder: both see it empty, the other one takes the
    writer lock first. The loser is refused with RunBusyError and deletes nothing of the
    winner's, whether the winner still holds the lock (it is training) or already committed."""
    import contextlib

    from sisajax import training
    from sisajax.store.locks import writer_lock

    root = tmp_path / "new"
    held = contextlib.ExitStack()
    real_plan = training.plan_training

    def plan_then_lose_the_race(*a, **kw):
        plan = real_plan(*a, **kw)  # our emptiness check is behind us: now the other wins
        root.mkdir()
        held.enter_context(writer_lock(root, 1.0))
        (root / "MANIFEST.json").write_text("{}")
        (root / "data").mkdir()
        if not other_holds_lock:
            held.close()
        return plan

    monkeypatch.setattr(training, "plan_training", plan_then_lose_the_race)
    cfg = tiny_config().replace(ledger={"lock_timeout_s": 0.2})
    with pytest.raises(sj.RunBusyError, match="held by|meanwhile; nothing was changed"):
        sj.train(cfg, tiny_digits(), root)
    held.close()
    assert (root / "MANIFEST.json").read_text() == "{}" and (root / "data").is_dir()
    assert (root / ".writer.lock").exists()


@pytest.mark.parametrize("request_", ["ids", "requests.k=2"])
def test_forget_command_checks_one_generation_while_another_writer_commits(
    base_run, tmp_path, monkeypatch, request_
):
    """``sisajax forget`` checks the request (already forgotten? which layout? sampled ids)
    before it waits for the writer lock. Another forget committing in between deletes the
    generation the command opened; the checks re-read the live one under the reader lock
    instead of failing on a missing partition file."""
    from sisajax.cli import forget_commands

    run, _, _ = _copy(base_run, tmp_path)
    a, b = pick(run, 0, 1), pick(run, 2, 1)
    opened = sj.open_run(run.run_dir)  # generation 0, as the command read it
    sj.forget(sj.open_run(run.run_dir), a)  # meanwhile: generation 1, generation 0 deleted
    assert not (run.run_dir / opened.manifest.partition.path).exists()
    monkeypatch.setattr(forget_commands, "_open", lambda cfg: opened)
    arg = f"ids=[{b[0]}]" if request_ == "ids" else request_
    assert cli(["forget", f"run_dir={run.run_dir}", arg, "progress=false"]) == 0
    run = sj.open_run(run.run_dir)
    assert run.generation == 2 and a[0] in run.partition.removed
    assert sj.audit(run).ok


def test_second_writer_waits_or_fails_clearly(base_run, tmp_path):
    run, cfg, ds = _copy(base_run, tmp_path)
    a = pick(run, 0, 0)
    with run.writer_lock():
        r = cli_run(["forget", f"run_dir={run.run_dir}", f"ids=[{a[0]}]", "lock_timeout_s=0.5"])
    assert r.returncode == 1 and "held by pid" in r.stderr and len(r.stderr.splitlines()) == 1
    assert run.ledger.records() == []
    # two writers at once: the second waits, neither request is lost
    b = pick(run, 1, 2)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sisajax.cli",
                "forget",
                f"run_dir={run.run_dir}",
                f"ids=[{i[0]}]",
                "progress=false",
            ],
            cwd=REPO,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in (a, b)
    ]
    assert all(p.wait(timeout=180) == 0 for p in procs)
    run.reload()
    done = [x for x in run.ledger.records() if x["state"] == "done"]
    pending_ids = [i for x in run.ledger.records() if x["state"] == "pending" for i in x["ids"]]
    assert sorted(pending_ids) == sorted(a + b)
    assert len(done) == 2 and run.generation == 2
    scratch, _ = sj.train(cfg, without(ds, a + b), tmp_path / "scratch")
    for k in range(run.num_shards):
        assert_trees_equal(run.restore_block(k), scratch.restore_block(k))


def test_concurrent_readers_do_not_collide(base_run, tmp_path):
    run, _, _ = _copy(base_run, tmp_path)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "sisajax.cli", "evaluate", f"run_dir={run.run_dir}"],
            cwd=REPO,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(6)
    ]
    assert [p.wait(timeout=180) for p in procs] == [0] * 6
    assert len(list((run.run_dir / "results").glob("evaluate-*.json"))) == 6  # none replaced


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


@pytest.mark.parametrize("damage", ["bitflip", "truncate", "delete_row", "data_bitflip"])
def test_corrupt_files_are_detected_and_nothing_changes(base_run, tmp_path, damage):
    run, _, _ = _copy(base_run, tmp_path)
    entry = run.manifest.shards[1]
    row = run.run_dir / row_file(1, 0, entry.rows[0].generation)
    if damage == "bitflip":
        raw = bytearray(row.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        row.write_bytes(bytes(raw))
    elif damage == "truncate":
        row.write_bytes(row.read_bytes()[:-10])
    elif damage == "delete_row":
        row.unlink()
    else:
        data = run.run_dir / entry.data.path
        raw = bytearray(data.read_bytes())
        raw[-100] ^= 0x01
        data.write_bytes(bytes(raw))
    before = tree_bytes(run.run_dir)
    with pytest.raises(sj.RunError, match="corrupt|missing"):
        sj.forget(run, pick(run, 1, 1))
    assert tree_bytes(run.run_dir) == before
    assert run.ledger.records() == []
    assert not sj.audit(run).ok


def test_emptying_a_shard_drops_it_from_the_ensemble(base_run, tmp_path):
    run, cfg, ds = _copy(base_run, tmp_path)
    all0 = run.shard_data(0).ids.tolist()
    sj.forget(run, all0)
    assert run.active_shards().tolist() == [False, True, True]
    ev = run.evaluate()
    assert ev.active_shards == 2 and np.isnan(ev.shard_accuracy[0]) and ev.vote_accuracy > 0.5
    cfg_empty = cfg.replace(sisa={"allow_empty_shards": True})
    scratch, _ = sj.train(cfg_empty, without(ds, all0), tmp_path / "scratch")
    for k in range(3):
        assert_trees_equal(run.restore_block(k), scratch.restore_block(k))
    with pytest.raises(sj.PartitionError, match="no training examples"):
        sj.train(cfg, without(ds, all0), tmp_path / "strict")
    with pytest.raises(sj.ForgetError, match="every remaining"):
        sj.forget(run, run.partition.ids)
    assert sj.audit(run).ok


def test_emptying_slices_stays_exact(base_run, tmp_path):
    """Deletions that empty a whole slice, then leave a shard with fewer ids than slices: the
    forgets still equal training from scratch on the retained data (every row, not only the
    last), which strict training refuses with a line naming the option that allows it."""
    run, cfg, ds = _copy(base_run, tmp_path)
    sd = run.shard_data(0)
    slice1 = sd.ids[sd.slices == 1].tolist()
    sj.forget(run, slice1)
    assert run.partition.sizes()[0, 1] == 0 and run.partition.sizes()[0].sum() > 0
    scratch, _ = sj.train(cfg, without(ds, slice1), tmp_path / "scratch")
    for k in range(3):
        assert_trees_equal(run.restore_block(k), scratch.restore_block(k))
    rest = run.shard_data(0).ids[2:].tolist()  # two ids left in shard 0, four slices
    sj.forget(run, rest)
    gone = slice1 + rest
    assert run.partition.sizes()[0].sum() == 2
    with pytest.raises(sj.ConfigError, match="allow_empty_shards"):
        sj.train(cfg, without(ds, gone), tmp_path / "strict")
    cfg_empty = cfg.replace(sisa={"allow_empty_shards": True})
    scratch2, _ = sj.train(cfg_empty, without(ds, gone), tmp_path / "scratch2")
    for k in range(3):
        assert_trees_equal(run.restore_block(k), scratch2.restore_block(k))
    assert sj.audit(run).ok and sj.verify(run).ok


def test_every_file_is_free_of_forgotten_ids(base_run, tmp_path):
    run, _, _ = _copy(base_run, tmp_path)
    ids = pick(run, 0, 0, 2) + pick(run, 1, 3) + pick(run, 2, 1)
    sj.forget(run, ids)
    sj.forget(run, pick(run, 0, 2))
    for p in run.run_dir.rglob("*"):
        if p.suffix == ".npz" and p.name.startswith("shard_"):
            with np.load(p) as z:
                assert not np.isin(ids, z["ids"]).any(), p
        if p.name.startswith("partition"):
            assert not np.isin(ids, sj.Partition.load(p).ids).any()
    # storage stays bounded: one checkpoint per (shard, slice), nothing pending, nothing stray
    assert len(list((run.run_dir / "checkpoints").iterdir())) == run.num_shards * run.num_slices
    rep = sj.audit(run)
    assert rep.ok and rep.residual_exposure == 0 and rep.checkpoints_checked == 12


def test_audit_detects_residual_exposure(base_run, tmp_path):
    run, _, _ = _copy(base_run, tmp_path)
    target = pick(run, 2, 1)
    old = run.manifest
    keep = {
        j: (run.run_dir / row_file(2, j, r.generation)).read_bytes()
        for j, r in enumerate(old.shards[2].rows)
    }
    sj.forget(run, target)
    # simulate a buggy forget: shard 2's old checkpoints (trained on the id) put back
    for j, r in enumerate(old.shards[2].rows):
        (run.run_dir / row_file(2, j, r.generation)).write_bytes(keep[j])
    m = run.manifest.with_shard(
        2, dataclasses.replace(run.manifest.shards[2], rows=old.shards[2].rows)
    )
    run.files.write_manifest(m)
    rep = sj.audit(sj.open_run(run.run_dir))
    assert not rep.ok and rep.residual_exposure == 3  # slices 1, 2, 3 of shard 2 saw the id
    assert {e["slice"] for e in rep.exposures} == {1, 2, 3}


def test_audit_counts_an_unreadable_row_as_exposed(base_run, tmp_path):
    """A row that fails its checksum has training ids no one can establish: it counts as
    exposed (and is a problem), however clean the shard's data copy is."""
    run, _, _ = _copy(base_run, tmp_path)
    ref = run.manifest.shards[1].rows[2]
    path = run.run_dir / row_file(1, 2, ref.generation)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    rep = sj.audit(sj.open_run(run.run_dir))
    assert not rep.ok and rep.residual_exposure == 1
    assert [(e["shard"], e["slice"]) for e in rep.exposures] == [(1, 2)]
    assert "unknown" in rep.exposures[0]["why"]


def test_a_ledger_record_without_its_hash_is_a_broken_chain_not_a_crash(base_run, tmp_path):
    run, _, _ = _copy(base_run, tmp_path)
    sj.forget(run, pick(run, 0, 1))
    ledger = run.run_dir / "ledger.jsonl"
    lines = ledger.read_text().splitlines()
    lines[-1] = json.dumps({"seq": len(lines) - 1})
    ledger.write_text("\n".join(lines) + "\n")
    chain = sj.open_run(run.run_dir).ledger.verify()
    assert not chain.ok and any("does not match its hash" in p for p in chain.problems)
    assert not sj.audit(sj.open_run(run.run_dir)).ok


@pytest.mark.parametrize("point", ["mid_save", "after_commit"])
def test_audit_names_a_pending_request_as_the_cause(base_run, tmp_path, capsys, point):
    """Interrupted before or after its commit: the audit's first problem is the pending request
    and what to run, not the files it left behind or its ids' missing done record."""
    run, _, _ = _copy(base_run, tmp_path)
    r = cli_run(
        ["forget", f"run_dir={run.run_dir}", f"ids=[{pick(run, 1, 1)[0]}]", "progress=false"],
        {"SISAJAX_FAULT": point},
    )
    assert r.returncode == -9, r.stdout + r.stderr
    rep = sj.audit(sj.open_run(run.run_dir))
    assert not rep.ok and len(rep.pending_requests) == 1
    assert rep.problems == [
        "pending request: 1 request(s) left unfinished by an interrupted command; "
        "run `sisajax resume`"
    ]
    assert cli(["audit", f"run_dir={run.run_dir}"]) == 1
    problems = [x for x in capsys.readouterr().out.splitlines() if "problem:" in x]
    assert problems[0].strip().startswith("problem: pending request:") and len(problems) == 1
    # status says so too, also when a ledger record was edited (the chain is broken)
    led = run.run_dir / "ledger.jsonl"
    good = led.read_bytes()
    rec = json.loads(good.splitlines()[0])
    led.write_bytes((json.dumps({**rec, "note": "edited"}, sort_keys=True) + "\n").encode())
    assert cli(["status", f"run_dir={run.run_dir}"]) == 0
    out = capsys.readouterr().out
    assert "pending requests 1 -> run `sisajax resume`" in out
    assert "ledger chain BROKEN" in out and "sisajax audit" in out
    led.write_bytes(good)
    sj.resume(run)
    assert sj.audit(run).ok


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
    with pytest.raises(sj.UserInputError, match="requests.distribution"):
        sj.sample_requests(ids, 5, "zipf")
    for k in (0, 10_001, 2.5):
        with pytest.raises(sj.UserInputError, match="requests.k"):
            sj.sample_requests(ids, k)


def test_sequential_and_batched_streams_reach_the_same_model(base_run, tmp_path):
    seq, _, _ = _copy(base_run, tmp_path, "seq")
    bat, _, _ = _copy(base_run, tmp_path, "bat")
    ids = sj.sample_requests(seq.partition.ids, 4, "exponential", seed=1)
    s = sj.serve_requests(seq, ids, "sequential", evaluate=True)
    b = sj.serve_requests(bat, ids, "batched")
    assert len(s.costs) == 4 and len(b.costs) == 1 and len(s.accuracy) == 4
    assert s.total.examples >= b.total.examples
    for k in range(seq.num_shards):
        assert_trees_equal(seq.restore_block(k), bat.restore_block(k))


def test_status_cli(base_run, tmp_path, capsys):
    run, _, _ = _copy(base_run, tmp_path)
    sj.forget(run, pick(run, 0, 0))
    assert cli(["status", f"run_dir={run.run_dir}"]) == 0
    out = capsys.readouterr().out
    assert "forgotten 1" in out and "pending requests 0" in out
    assert cli(["audit", f"run_dir={run.run_dir}"]) == 0
    assert "PASS" in capsys.readouterr().out
