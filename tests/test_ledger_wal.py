"""The ledger is a write-ahead log: an interrupted append (torn line, missing anchor, full disk) is
recognised as such and completed or dropped by the next writer; tampering is still detected."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import (
    assert_trees_equal,
    cli_run,
    copy_run,
    pick,
    tiny_config,
    tiny_digits,
    tree_bytes,
)

import sisajax as sj
from sisajax.cli import main as cli
from sisajax.store import faults


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("wal")
    run, _ = sj.train(tiny_config(), tiny_digits(), root / "base")
    ids = pick(run, 0, 2) + pick(run, 1, 3)
    ref = copy_run(run.run_dir, root / "ref")
    sj.forget(ref, ids)
    return run.run_dir, ref, ids


def _same_as(run, ref):
    for k in range(run.num_shards):
        assert_trees_equal(run.restore_block(k), ref.restore_block(k))


def test_torn_last_line_at_every_byte_offset_is_an_interrupted_append(trained, tmp_path):
    base, ref, ids = trained
    run = copy_run(ref.run_dir, tmp_path / "run")
    path = run.run_dir / "ledger.jsonl"
    full = path.read_bytes()
    head = (run.run_dir / "ledger.head").read_bytes()
    last_start = full.rstrip(b"\n").rfind(b"\n") + 1
    (run.run_dir / "ledger.head").write_bytes(b"")  # (restored below for every offset)
    checked = 0
    for cut in range(last_start + 1, len(full)):  # every proper prefix of the last line
        path.write_bytes(full[:cut])
        # the head still names the records before the torn one: the append never happened
        prev = json.loads(full[:last_start].splitlines()[-1])
        (run.run_dir / "ledger.head").write_text(
            json.dumps({"count": prev["seq"] + 1, "hash": prev["hash"]})
        )
        rep = run.ledger.verify()
        assert rep.interrupted == "torn" and not rep.problems, (cut, rep)
        audit = sj.audit(run)
        assert not audit.ok and any("interrupted" in p for p in audit.problems)
        checked += 1
    assert checked == len(full) - last_start - 1 > 100
    sj.resume(run)  # drops the torn line; the request it belonged to is finished again
    assert run.ledger.verify().ok
    states = [r["state"] for r in run.ledger.records()]
    assert states == ["pending", "done"]
    assert sj.audit(run).ok
    _same_as(run, ref)
    del head


def test_unanchored_complete_record_is_completed(trained, tmp_path):
    _, ref, _ = trained
    run = copy_run(ref.run_dir, tmp_path / "run")
    recs = run.ledger.records()
    (run.run_dir / "ledger.head").write_text(
        json.dumps({"count": len(recs) - 1, "hash": recs[-2]["hash"]})
    )
    assert run.ledger.verify().interrupted == "unanchored"
    assert not sj.audit(run).ok
    assert cli_run(["resume", f"run_dir={run.run_dir}", "progress=false"]).returncode == 0
    assert run.ledger.verify().ok and sj.audit(sj.open_run(run.run_dir)).ok


@pytest.mark.slow
@pytest.mark.parametrize(
    "point", ["ledger_after_line:1", "ledger_after_head:1", "ledger_after_line:2"]
)
def test_kill_at_every_point_of_an_append(trained, tmp_path, point):
    base, ref, ids = trained
    run = copy_run(base, tmp_path / "run")
    r = cli_run(
        ["forget", f"run_dir={run.run_dir}", f"ids=[{ids[0]},{ids[1]}]", "progress=false"],
        {"SISAJAX_FAULT": point},
    )
    assert r.returncode == -9
    # the next forget repairs the ledger and finishes the interrupted request first
    other = pick(run, 2, 0)
    r = cli_run(["forget", f"run_dir={run.run_dir}", f"ids=[{other[0]}]", "progress=false"])
    assert r.returncode == 0, r.stderr
    run = sj.open_run(run.run_dir)
    assert [r["state"] for r in run.ledger.records()] == ["pending", "done", "pending", "done"]
    assert sj.audit(run).ok
    scratch, _ = sj.train(tiny_config(), _without(tiny_digits(), ids + other), tmp_path / "s")
    _same_as(run, scratch)


def _without(ds, ids):
    from conftest import without

    return without(ds, ids)


def test_full_disk_at_every_write_of_a_forget(trained, tmp_path, monkeypatch):
    """ENOSPC injected at each write-like operation of a forget in turn: a clear StorageError,
    the run unchanged or resumable, and after resume the exact uninterrupted result."""
    base, ref, ids = trained
    run = copy_run(base, tmp_path / "probe")
    faults._counts.clear()
    monkeypatch.setenv("SISAJAX_FAULT", "enospc:999999")
    sj.forget(run, ids)
    total = faults.io_operations()
    assert total > 20  # rows, data copies, partition, manifest, ledger lines and heads
    outcomes = {"failed": 0, "succeeded": 0}
    for n in range(1, total + 1):
        faults._counts.clear()
        d = tmp_path / f"n{n}"
        shutil.copytree(base, d)
        run = sj.open_run(d)
        monkeypatch.setenv("SISAJAX_FAULT", f"enospc:{n}")
        try:
            sj.forget(run, ids)
            outcomes["succeeded"] += 1
        except sj.StorageError as e:
            assert "no space left" in str(e) and "\n" not in str(e)
            outcomes["failed"] += 1
            # nothing of an uncommitted generation stays behind (a committed one is live)
            live = sj.open_run(d)
            assert live.files.scan(live.manifest.files())[0] == [], n
        monkeypatch.delenv("SISAJAX_FAULT")
        run = sj.open_run(d)
        sj.resume(run)
        if not run.ledger.records():  # failed before its pending record: nothing happened
            assert run.generation == 0 and sj.audit(run).ok
            sj.forget(run, ids)  # the caller got an error and retries
        assert sj.audit(run).ok, (n, sj.audit(run).problems)
        _same_as(run, ref)
        shutil.rmtree(d)
    assert outcomes["failed"] >= total - 3  # a fault after the done record's line is harmless


def test_full_disk_on_the_command_line_is_one_line_and_exit_1(trained, tmp_path):
    base, _, ids = trained
    run = copy_run(base, tmp_path / "run")
    r = cli_run(
        ["forget", f"run_dir={run.run_dir}", f"ids=[{ids[0]}]", "progress=false"],
        {"SISAJAX_FAULT": "enospc:5", "SISAJAX_PROGRAM_STORE": "0"},  # count the run's writes only
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "no space left" in r.stderr
    assert cli_run(["resume", f"run_dir={run.run_dir}", "progress=false"]).returncode == 0
    assert cli_run(["audit", f"run_dir={run.run_dir}"]).returncode == 0


TAMPERING = [
    "edit_field",
    "delete_middle",
    "reorder",
    "drop_last_complete",
    "duplicate",
    "garbage_head",
    "delete_head",
    "delete_ledger",
    "delete_both",
    "relink",
]


@pytest.mark.parametrize("how", TAMPERING)
def test_tampering_inside_the_chain_is_detected(trained, tmp_path, how, capsys):
    _, ref, _ = trained
    run = copy_run(ref.run_dir, tmp_path / "run")
    sj.forget(run, pick(run, 2, 1))  # 4 records
    led, head = run.run_dir / "ledger.jsonl", run.run_dir / "ledger.head"
    lines = led.read_bytes().splitlines(keepends=True)
    if how == "edit_field":
        rec = json.loads(lines[1])
        rec["generation"] = 7
        lines[1] = (json.dumps(rec, sort_keys=True) + "\n").encode()
        led.write_bytes(b"".join(lines))
    elif how == "delete_middle":
        led.write_bytes(b"".join(lines[:1] + lines[2:]))
    elif how == "reorder":
        led.write_bytes(b"".join([lines[0], lines[2], lines[1], lines[3]]))
    elif how == "drop_last_complete":
        led.write_bytes(b"".join(lines[:-1]))
    elif how == "duplicate":
        led.write_bytes(b"".join(lines + lines[-1:]))
    elif how == "garbage_head":
        head.write_bytes(b"\x00garbage")
    elif how == "delete_head":
        head.unlink()
    elif how == "delete_ledger":
        led.unlink()
    elif how == "delete_both":
        led.unlink()
        head.unlink()
    else:  # a record whose hash is recomputed but whose prev no longer links
        rec = json.loads(lines[2])
        rec["prev"] = "0" * 64
        from sisajax.store.ledger import record_hash

        rec["hash"] = record_hash(rec)
        lines[2] = (json.dumps(rec, sort_keys=True) + "\n").encode()
        led.write_bytes(b"".join(lines))
    rep = sj.audit(sj.open_run(run.run_dir))
    assert not rep.ok and (rep.chain.problems or rep.problems)
    assert rep.chain.interrupted is None  # never mistaken for an interrupted append
    capsys.readouterr()
    assert cli(["audit", f"run_dir={run.run_dir}"]) == 1
    # a writer refuses to build on a damaged ledger (clearly, exit 1), changing nothing
    before = tree_bytes(run.run_dir)
    code = cli(["forget", f"run_dir={run.run_dir}", f"ids=[{pick(run, 0, 0)[0]}]"])
    err = capsys.readouterr().err
    assert code == 1 and "ledger" in err and len(err.strip().splitlines()) == 1
    assert tree_bytes(run.run_dir) == before
