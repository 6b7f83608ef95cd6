"""Deletion receipts: issued only for done forgets, verified against the run's ledger chain and
live rows, and with replay retrained bit for bit; edited or foreign receipts fail."""

from __future__ import annotations

import json

import pytest
from conftest import cli_run, copy_run, pick, tiny_config, tiny_digits

import sisajax as sj
from sisajax.cli import main as cli
from sisajax.receipts import (
    ReceiptError,
    check_receipt,
    issue_receipt,
    read_receipt,
    run_id,
    shard_rows_fingerprint,
    write_receipt,
)
from sisajax.store.ledger import LedgerError


@pytest.fixture(scope="module")
def forgotten(tmp_path_factory):
    """A run with two done forgets: ids of shard 0 and 1, then one more id of shard 1."""
    root = tmp_path_factory.mktemp("receipts")
    ds = tiny_digits()
    run, _ = sj.train(tiny_config(), ds, root / "run", metrics=False)
    first = pick(run, 0, 2) + pick(run, 1, 1)
    sj.forget(run, first, progress=None)
    sj.forget(run, pick(run, 1, 0), progress=None)
    return root / "run", first, ds


def _fresh(forgotten, tmp_path):
    return copy_run(forgotten[0], tmp_path / "copy")


def test_a_receipt_names_the_request_and_verifies_with_replay(forgotten, tmp_path):
    run = _fresh(forgotten, tmp_path)
    rec = issue_receipt(run, 1)  # the done record of the first forget
    assert issue_receipt(run, 0)["request"] == rec["request"]  # its pending record: the same
    assert rec["request"]["ids"] == 2 and not rec["request"]["ids_hashed"]
    assert rec["run_id"] == run_id(run) and rec["ledger"]["done_seq"] == 1
    assert {int(k) for k in rec["rows_after"]} == {0, 1} and sorted(rec["restart"]) == ["0", "1"]
    assert rec["config_fingerprint"] == run.manifest.config_fingerprint
    assert set(rec["rows_before"]) == set(rec["rows_after"])  # every retrained shard changed
    assert all(rec["rows_before"][k] != rec["rows_after"][k] for k in rec["rows_after"])
    assert all(len(r["sha256"]) == 64 for r in rec["rows_restored"])
    report = check_receipt(rec, run, replay=True)
    assert report.ok, report.checks
    names = [n for n, _, _ in report.checks]
    assert names[-1] == "replay" and "ledger chain" in names
    # shard 1 was retrained again by the second forget: named, not a failure
    live = dict((n, d) for n, _, d in report.checks)["live rows"]
    assert "shard 1 by record 3" in live and "1 shards as written" in live


def test_edited_and_foreign_receipts_fail(forgotten, tmp_path, capsys):
    d = forgotten[0]
    run = sj.open_run(d)
    path = write_receipt(issue_receipt(run, 1), tmp_path / "r.json")
    edited = json.loads(path.read_text())
    edited["request"]["ids"] = 1
    bad = tmp_path / "edited.json"
    bad.write_text(json.dumps(edited))
    assert cli(["check-receipt", f"run_dir={d}", f"receipt={bad}"]) == 2
    assert "receipt intact" in capsys.readouterr().out
    # another run (same data, same config, its own forget): the receipt is not its
    other, _ = sj.train(tiny_config(), forgotten[2], tmp_path / "other", metrics=False)
    sj.forget(other, forgotten[1], progress=None)
    rep = check_receipt(read_receipt(path), other)
    assert not rep.ok and rep.first_failure.startswith("same run")
    assert cli(["check-receipt", f"run_dir={d}", f"receipt={path}"]) == 0


def test_a_forged_receipt_with_a_valid_hash_fails_on_what_the_run_holds(forgotten, tmp_path):
    from sisajax.receipts import _sha

    run = sj.open_run(forgotten[0])
    rec = issue_receipt(run, 3)  # the second forget: shard 1 as it is now
    assert rec["rows_after"]["1"] == shard_rows_fingerprint(run, 1)
    forged = {k: v for k, v in rec.items() if k != "receipt_hash"}
    forged["rows_after"] = {"1": "0" * 64}
    forged["receipt_hash"] = _sha(forged)
    rep = check_receipt(forged, run)
    assert not rep.ok and rep.first_failure.startswith("live rows")
    moved = {k: v for k, v in rec.items() if k != "receipt_hash"}
    moved["ledger"] = {**moved["ledger"], "done_seq": 1}
    moved["receipt_hash"] = _sha(moved)
    assert check_receipt(moved, run).first_failure.startswith("in the ledger")


def test_receipts_only_for_done_forgets(forgotten, tmp_path):
    run = _fresh(forgotten, tmp_path)
    with pytest.raises(ReceiptError, match="records 0..3"):
        issue_receipt(run, 9)
    d = tmp_path / "crashed"
    copy_run(forgotten[0], d)
    ids = pick(sj.open_run(d), 2, 0)
    r = cli_run(["forget", f"run_dir={d}", f"ids=[{ids[0]}]", "progress=false"],
                env_extra={"SISAJAX_FAULT": "before_done"})  # fmt: skip
    assert r.returncode != 0
    with pytest.raises(ReceiptError, match="pending, not done"):
        issue_receipt(sj.open_run(d), 4)
    assert cli(["receipt", f"run_dir={d}", "request=4"]) == 2
    assert cli(["receipt", f"run_dir={d}", "request=x"]) == 2
    assert cli(["resume", f"run_dir={d}", "progress=false"]) == 0
    assert issue_receipt(sj.open_run(d), 4)["ledger"]["done_seq"] >= 5


def test_a_tampered_ledger_gets_no_receipt_and_fails_the_check(forgotten, tmp_path):
    run = _fresh(forgotten, tmp_path)
    rec = issue_receipt(run, 1)
    ledger = run.run_dir / "ledger.jsonl"
    lines = ledger.read_text().splitlines()
    first = json.loads(lines[0])
    first["ids"] = first["ids"][:1]  # claim fewer ids were asked for
    lines[0] = json.dumps(first, sort_keys=True)
    ledger.write_text("\n".join(lines) + "\n")
    with pytest.raises(LedgerError):
        issue_receipt(sj.open_run(run.run_dir), 1)
    rep = check_receipt(rec, sj.open_run(run.run_dir))
    assert not rep.ok and rep.first_failure.startswith(("same run", "ledger chain"))


def test_hashed_ids_receipts_hold_no_raw_id(tmp_path):
    ds = tiny_digits()
    run, _ = sj.train(tiny_config().replace(ledger={"hash_ids": True}), ds, tmp_path / "h",
                      metrics=False)  # fmt: skip
    ids = pick(run, 0, 1, 3)
    sj.forget(run, ids, progress=None)
    rec = issue_receipt(run, 1)
    text = json.dumps(rec)
    assert rec["request"]["ids_hashed"] and rec["request"]["ids"] == 3
    assert all(f" {i}," not in text and f"[{i}," not in text for i in ids)
    assert check_receipt(rec, run, replay=True).ok


def test_a_receipt_with_missing_or_mistyped_fields_is_refused_in_one_line(forgotten, tmp_path):
    """Its hash is plain sha256, so anyone can make a body that passes it: fields of the wrong
    type or out of range are refused as a bad input (exit 2, one line), never a traceback."""
    from sisajax.receipts import _sha

    d = forgotten[0]
    rec = issue_receipt(sj.open_run(d), 1)

    def forged(**changes):
        body = {k: v for k, v in rec.items() if k != "receipt_hash"}
        for key, value in changes.items():
            if value is None:
                body.pop(key)
            else:
                body[key] = value
        return {**body, "receipt_hash": _sha(body)}

    bad = [
        forged(run_id=None),
        forged(ledger={**rec["ledger"], "pending_seq": "7"}),
        forged(ledger={**rec["ledger"], "done_seq": -1}),
        forged(ledger={k: v for k, v in rec["ledger"].items() if k != "head_hash"}),
        forged(rows_after={"x": "0" * 64}),
        forged(request={}),
    ]
    for i, receipt in enumerate(bad):
        with pytest.raises(ReceiptError):
            check_receipt(receipt, sj.open_run(d))
        path = tmp_path / f"bad{i}.json"
        path.write_text(json.dumps(receipt))
        r = cli_run(["check-receipt", f"run_dir={d}", f"receipt={path}"])
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    # in range of the fields, out of range of the run: failed checks, not crashes
    far = forged(ledger={**rec["ledger"], "pending_seq": 70, "done_seq": 71, "head_count": 72})
    assert check_receipt(far, sj.open_run(d)).first_failure.startswith("in the ledger")
    shard = forged(rows_after={"99": "0" * 64})
    assert check_receipt(shard, sj.open_run(d)).first_failure.startswith("live rows")
    # the records at the stated places must be the pending and done of one forget request
    first, second = issue_receipt(sj.open_run(d), 1), issue_receipt(sj.open_run(d), 3)
    mixed = forged(
        ledger={**first["ledger"], "done_seq": 3, "done_hash": second["ledger"]["done_hash"]}
    )
    assert check_receipt(mixed, sj.open_run(d)).first_failure.startswith("in the ledger")


def test_a_replaced_row_file_or_a_file_left_behind_fails_the_check(forgotten, tmp_path):
    """The manifest naming the forget's rows is not enough: the row files must hold them (an
    old checkpoint copied over a new one fails), and no superseded checkpoint may be left in the
    run (an old row put back fails), with or without replay."""
    d = tmp_path / "run"
    copy_run(forgotten[0], d)
    run = sj.open_run(d)
    rec = issue_receipt(run, 3)  # the second forget, which retrained shard 1
    assert check_receipt(rec, run).ok
    live = sorted((d / "checkpoints").glob("s001r*.row"))
    keep = live[-1].read_bytes()
    live[-1].write_bytes(live[0].read_bytes())  # another row's content under the live name
    rep = check_receipt(rec, sj.open_run(d), replay=True)
    assert not rep.ok and rep.first_failure.startswith("live rows")
    assert "replay" not in [n for n, _, _ in rep.checks]
    live[-1].write_bytes(keep)
    assert check_receipt(rec, sj.open_run(d)).ok
    old = live[-1].with_name(live[-1].name.split(".g")[0] + ".g000000.row")
    assert not old.exists()
    old.write_bytes(keep)  # a superseded generation's file back in the run
    rep = check_receipt(rec, sj.open_run(d), replay=True)
    assert not rep.ok and rep.first_failure.startswith("nothing left behind")
    assert old.name in rep.first_failure
