"""A forget checks what it reads and keeps before it writes anything; a failed forget leaves no
new-generation files; a read-only check whose result file cannot be written still says its
verdict."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
from conftest import cli_run, copy_run, pick, tiny_config, tiny_digits, tree_bytes

import sisajax as sj
from sisajax.store.manifest import row_file


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    run, _ = sj.train(tiny_config(), tiny_digits(), tmp_path_factory.mktemp("b") / "run")
    return run.run_dir


def _swap_row(run: sj.SisaRun, k: int, j: int, donor: tuple[int, int]) -> None:
    """Put the bytes of row ``donor`` under row (k, j)'s name and re-hash the manifest (what an
    attacker or a bad restore that also rewrote the manifest would leave)."""
    m = run.manifest
    ref = m.shards[k].rows[j]
    dk, dj = donor
    src = run.files.path(row_file(dk, dj, m.shards[dk].rows[dj].generation))
    dst = run.files.path(row_file(k, j, ref.generation))
    blob = src.read_bytes()
    dst.write_bytes(blob)
    rows = list(m.shards[k].rows)
    rows[j] = dataclasses.replace(ref, sha256=hashlib.sha256(blob).hexdigest(), size=len(blob))
    entry = dataclasses.replace(m.shards[k], rows=tuple(rows))
    run.files.write_manifest(m.with_shard(k, entry))
    run.reload()


@pytest.mark.parametrize("donor", [(0, 1), (1, 0)])  # a later slice of the shard, another shard
def test_forget_refuses_a_kept_row_swapped_with_the_manifest_rehashed(base, tmp_path, donor):
    run = copy_run(base, tmp_path / "run")
    _swap_row(run, 0, 0, donor)
    before = tree_bytes(run.run_dir)
    with pytest.raises(sj.RunError, match="not the row the manifest names") as e:
        sj.forget(run, pick(run, 0, 2))  # restarts at slice 2: keeps rows 0 and 1
    assert "\n" not in str(e.value)
    assert tree_bytes(run.run_dir) == before  # nothing written, no ledger record
    assert sj.audit(run).ok is False  # the audit names it too


def test_forget_refuses_a_corrupt_kept_row_before_writing(base, tmp_path):
    run = copy_run(base, tmp_path / "run")
    ref = run.manifest.shards[1].rows[0]
    path = run.files.path(row_file(1, 0, ref.generation))
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0xFF
    path.write_bytes(bytes(blob))
    before = tree_bytes(run.run_dir)
    r = cli_run(["forget", f"run_dir={run.run_dir}", f"ids=[{pick(run, 1, 3)[0]}]"])
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "checksum" in r.stderr
    assert tree_bytes(run.run_dir) == before


def test_untouched_shards_and_rows_after_the_restart_are_not_read(base, tmp_path):
    """Only what the request reads or keeps is checked: damage elsewhere is audit's to report,
    and the forget (which does not use it) proceeds."""
    run = copy_run(base, tmp_path / "run")
    _swap_row(run, 2, 0, (2, 1))  # shard 2 is not touched by a forget in shard 0
    rep = sj.forget(run, pick(run, 0, 2))
    assert rep.restart == {0: 2}


def test_a_forget_failing_on_a_full_disk_leaves_no_new_files(base, tmp_path, monkeypatch):
    from sisajax.store import faults

    run = copy_run(base, tmp_path / "run")
    ids = pick(run, 0, 1)
    faults._counts.clear()
    monkeypatch.setenv("SISAJAX_FAULT", "enospc:6")  # after some rows of the new generation
    with pytest.raises(sj.StorageError):
        sj.forget(run, ids)
    monkeypatch.delenv("SISAJAX_FAULT")
    run = sj.open_run(run.run_dir)
    superseded, _ = run.files.scan(run.manifest.files())
    assert superseded == []  # the uncommitted generation's files were removed on the way out
    assert run.ledger.pending()  # the request stays pending: resume finishes it
    sj.resume(run)
    assert sj.audit(run).ok and run.generation == 1


def test_audit_on_a_full_disk_still_prints_its_verdict(base, tmp_path):
    run = copy_run(base, tmp_path / "run")
    # the program store off: its writes would count among the process's writes, and whether it
    # writes depends on what it already holds
    r = cli_run(
        ["audit", f"run_dir={run.run_dir}"],
        {"SISAJAX_FAULT": "enospc:1", "SISAJAX_PROGRAM_STORE": "0"},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS" in r.stdout and "result not written" in r.stdout + r.stderr
