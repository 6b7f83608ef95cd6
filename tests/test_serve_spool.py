"""The spool folder of the forget server: the handoff rule, and entries that are not requests."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
from conftest import copy_run, pick, tiny_config, tiny_digits

import sisajax as sj
from sisajax.serve import ForgetServer


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    run, _ = sj.train(tiny_config(), tiny_digits(), tmp_path_factory.mktemp("base") / "run")
    return run.run_dir


def _spool(tmp_path):
    spool = tmp_path / "spool"
    (spool / "incoming").mkdir(parents=True)
    return spool


def _forgotten(base_run, run_dir) -> set[int]:
    before = sj.open_run(base_run).partition.ids.tolist()
    return set(before) - set(sj.open_run(run_dir).partition.ids.tolist())


def _done_records(run_dir) -> list[dict]:
    return [r for r in sj.open_run(run_dir).ledger.records() if r["state"] == "done"]


def _age(path, seconds: float = 5.0) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t), follow_symlinks=False)


def test_a_request_written_in_place_is_not_read_half_written(base_run, tmp_path):
    """A client that writes the final name in pieces: the server waits for the file to settle;
    one that writes a dot-name and renames: the dot-name is never read."""
    run = copy_run(base_run, tmp_path / "run")
    retained = set(run.partition.ids.tolist())
    whole = next(i for i in sorted(retained) if i >= 10 and i // 10 in retained)
    other = next(i for i in sorted(retained) if i >= 10 and i // 10 in retained and i != whole)
    spool = _spool(tmp_path)
    incoming = spool / "incoming"

    def client():
        slow = incoming / "slow.req"
        with open(slow, "w") as f:  # "12" written as "1", a pause, then "2"
            f.write(str(whole)[:-1])
            f.flush()
            time.sleep(0.3)
            f.write(str(whole)[-1] + "\n")
        tmp = incoming / ".renamed.tmp"
        with open(tmp, "w") as f:
            f.write(str(other)[:-1])
            f.flush()
            time.sleep(0.3)
            f.write(str(other)[-1] + "\n")
        os.rename(tmp, incoming / "renamed.req")
        (incoming / "kept.req.tmp").write_text(str(pick(run, 0, 0)[0]))
        (spool / "STOP").write_text("")

    with ForgetServer(run) as srv:
        writer = threading.Thread(target=client)
        writer.start()
        try:
            out = list(srv.serve_spool(spool, poll_s=0.05))
        finally:
            writer.join()
    assert _forgotten(base_run, run.run_dir) == {whole, other}  # not whole // 10 nor other // 10
    assert sorted(r["file"] for r in out) == ["renamed.req", "slow.req"]
    assert all(r["ok"] and r["forgotten"] == 1 for r in out)
    assert sorted(p.name for p in incoming.iterdir()) == ["kept.req.tmp"]


def test_entries_that_are_not_requests_never_stop_the_server(base_run, tmp_path):
    """Folders, FIFOs and links named *.req are left alone (a FIFO is never waited on, a link
    never followed); malformed or too deeply nested requests are moved to rejected/ with an
    error response; a name too long to add a suffix to still gets its response; serving the
    same spool again redoes nothing."""
    run = copy_run(base_run, tmp_path / "run")
    spool = _spool(tmp_path)
    incoming = spool / "incoming"
    good, long_one, linked = pick(run, 0, 1), pick(run, 1, 2), pick(run, 2, 3)
    (incoming / "dir.req").mkdir()
    os.mkfifo(incoming / "fifo.req")
    (incoming / "dangling.req").symlink_to(tmp_path / "nowhere")
    outside = tmp_path / "outside.txt"
    outside.write_text(str(linked[0]))
    (incoming / "link.req").symlink_to(outside)
    (incoming / "deep.req").write_text("[" * 100_000)
    (incoming / "words.req").write_text("forget me please")
    (incoming / "good.req").write_text(f"{good[0]}  # a comment\n")
    long_name = "x" * 251 + ".req"  # the longest name a file system takes
    (incoming / long_name).write_text(json.dumps({"ids": long_one, "tag": "t#1"}))
    for p in incoming.iterdir():
        _age(p)
    (spool / "STOP").write_text("")
    notes: list[str] = []
    result: dict = {}

    def serve():
        with ForgetServer(run) as srv:
            result["first"] = list(srv.serve_spool(spool, poll_s=0.05, log=notes.append))
            result["again"] = list(srv.serve_spool(spool, poll_s=0.05, log=notes.append))

    worker = threading.Thread(target=serve, daemon=True)
    worker.start()
    worker.join(timeout=300)
    if worker.is_alive():  # stuck opening the FIFO: release it, then fail
        os.close(os.open(incoming / "fifo.req", os.O_WRONLY | os.O_NONBLOCK))
        worker.join(timeout=60)
        pytest.fail("the server waited on a FIFO")
    assert "first" in result and result["again"] == []
    by_file = {r["file"]: r for r in result["first"]}
    assert set(by_file) == {"deep.req", "words.req", "good.req", long_name}
    assert by_file["good.req"]["ok"] and by_file[long_name]["ok"]
    assert by_file[long_name]["tag"] == "t#1"
    for name in ("deep.req", "words.req"):
        assert not by_file[name]["ok"] and by_file[name]["exit_code"] == 2
        assert by_file[name]["rejected"] == f"rejected/{name}"
    assert sorted(p.name for p in (spool / "rejected").iterdir()) == ["deep.req", "words.req"]
    left = sorted(p.name for p in incoming.iterdir())
    assert left == ["dangling.req", "dir.req", "fifo.req", "link.req"]
    assert all(any(n in note for note in notes) for n in left)
    done = sorted(p.name for p in (spool / "done").iterdir())
    assert len(done) == 4 and all(len(n.encode()) <= 200 for n in done)
    assert outside.read_text() == str(linked[0])
    assert _forgotten(base_run, run.run_dir) == {good[0], *long_one}  # not the link's target
    assert len(_done_records(run.run_dir)) == 2  # each forget once, nothing redone


def test_response_names_are_unique_and_name_the_ledger_request(base_run, tmp_path):
    run = copy_run(base_run, tmp_path / "run")
    spool = _spool(tmp_path)
    (spool / "STOP").write_text("")
    a, b = pick(run, 0, 2), pick(run, 1, 0)
    out = []
    with ForgetServer(run) as srv:
        for ids in (a, b):
            req = spool / "incoming" / "same.req"
            req.write_text(str(ids[0]))
            _age(req)
            out += list(srv.serve_spool(spool, poll_s=0.05))
    first = json.loads((spool / "done" / "same.json").read_text())
    second = json.loads((spool / "done" / "same.2.json").read_text())
    assert first["generation"] == 1 and second["generation"] == 2
    records = {r["seq"]: r for r in _done_records(run.run_dir)}
    for response in (first, second):
        rec = records[response["ledger_seq"]]
        assert rec["request_id"] == response["ledger_request"]
        assert rec["generation"] == response["generation"]
    assert [r["ledger_request"] for r in out] == [first["ledger_request"], second["ledger_request"]]


def test_a_request_taken_back_or_unanswerable_is_not_served_twice(base_run, tmp_path, monkeypatch):
    """A request file deleted between the listing and the read is skipped; one whose response
    cannot be written is left in incoming/ (a restarted server serves it again, safely) and not
    served again by this server."""
    from sisajax.errors import StorageError
    from sisajax.store import files

    run = copy_run(base_run, tmp_path / "run")
    spool = _spool(tmp_path)
    gone, stuck = spool / "incoming" / "gone.req", spool / "incoming" / "stuck.req"
    gone.write_text(str(pick(run, 0, 3)[0]))
    stuck.write_text(str(pick(run, 2, 2)[0]))
    for p in (gone, stuck):
        _age(p)
    (spool / "STOP").write_text("")
    real_open, real_write = files.open_read, files.write_json

    def open_read(path):
        if path.name == "gone.req":
            path.unlink()  # its client takes it back just now
        return real_open(path)

    def write_json(path, obj, **kw):
        if path.parent.name == "done":
            raise StorageError("writing a response: no space left on the device")
        return real_write(path, obj, **kw)

    monkeypatch.setattr(files, "open_read", open_read)
    monkeypatch.setattr(files, "write_json", write_json)
    notes: list[str] = []
    with ForgetServer(run) as srv:
        out = list(srv.serve_spool(spool, poll_s=0.05, log=notes.append))
    assert [r["file"] for r in out] == ["stuck.req"]
    assert out[0]["ok"] and "no space" in out[0]["response_error"]
    assert stuck.is_file() and not gone.exists()
    assert any("gone.req" in n for n in notes) and any("stuck.req" in n for n in notes)
    assert len(_done_records(run.run_dir)) == 1
