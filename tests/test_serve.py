"""The long-lived forget server: many requests, one program, same ledger and crash guarantees."""

from __future__ import annotations

import json
import subprocess
import sys
import time

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
    without,
)

import sisajax as sj
from sisajax.cli import main as cli
from sisajax.serve import ForgetServer, RequestError, parse_request


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    run, _ = sj.train(tiny_config(), tiny_digits(), tmp_path_factory.mktemp("base") / "run")
    return run.run_dir


def test_parse_request():
    assert parse_request("3 17,256") == ([3, 17, 256], None)
    assert parse_request('{"ids": [4], "tag": "user-4"}') == ([4], "user-4")
    # other scripts' digits pass str.isdigit() but are not ids (nor does int() read them all)
    for bad in ("", "a b", '{"id": 3}', "{bad json", "3 \u00b2", "\u0663", "--3", "9" * 20):
        with pytest.raises(sj.UserInputError):
            parse_request(bad)


def test_parse_request_comments_and_deep_json():
    """``#`` is a comment outside JSON values only; JSON nested too deeply is a refused request
    (not a crash); a refused JSON request still names its tag."""
    assert parse_request('{"ids": [5], "tag": "x#1"}') == ([5], "x#1")
    assert parse_request('{"ids": [5], "tag": "x"}  # note') == ([5], "x")
    assert parse_request("3 17  # user 9") == ([3, 17], None)
    for deep in ("[" * 100_000, '{"ids": ' + "[" * 100_000, "[" + "9" * 5000 + "]"):
        with pytest.raises(sj.UserInputError, match="not valid JSON"):
            parse_request(deep)
    with pytest.raises(RequestError) as e:
        parse_request('{"ids": "3", "tag": "t9"}')
    assert e.value.tag == "t9"


def test_parse_request_accepts_a_bare_json_list():
    assert parse_request("[5]") == ([5], None)
    assert parse_request(" [3, 17, -2] ") == ([3, 17, -2], None)
    for bad in ("[]", "[1.5]", '["7"]', "[true]", "[[1]]", "[1, 2", "[1] 2"):
        with pytest.raises(sj.UserInputError) as e:
            parse_request(bad)
        assert "\n" not in str(e.value)


def test_server_serves_a_stream_exactly(base_run, tmp_path):
    run = copy_run(base_run, tmp_path / "run")
    a, b, c = pick(run, 0, 1), pick(run, 1, 3), pick(run, 2, 0)
    with ForgetServer(run) as srv:
        lines = [
            f"{a[0]}",
            "not ids",
            "  # a comment line",
            "[" * 100_000,  # nested too deeply: refused, the server goes on
            '{"ids": "x", "tag": "t0"}',
            f'{{"ids": [{b[0]}, {c[0]}], "tag": "t#2"}}',
            f"{a[0]}",
        ]
        out = list(srv.serve_lines(lines))
        with pytest.raises(sj.RunBusyError):  # the server holds the writer lock
            sj.forget(sj.open_run(run.run_dir), pick(run, 0, 0), lock_timeout_s=0.1)
    assert [r["ok"] for r in out] == [True, False, False, False, True, True]
    assert [r["request"] for r in out] == [1, 2, 3, 4, 5, 6]
    assert out[3]["tag"] == "t0" and out[3]["exit_code"] == 2
    assert out[4]["tag"] == "t#2" and out[4]["forgotten"] == 2 and out[5]["already_forgotten"] == 1
    assert all(r["overhead_s"] < 1.0 for r in out if r["ok"])
    done = {r["seq"]: r for r in sj.open_run(run.run_dir).ledger.records() if r["state"] == "done"}
    for r in (x for x in out if x["ok"]):  # each response names its ledger request
        assert done[r["ledger_seq"]]["request_id"] == r["ledger_request"]
    scratch, _ = sj.train(tiny_config(), without(tiny_digits(), a + b + c), tmp_path / "s")
    run = sj.open_run(run.run_dir)
    for k in range(run.num_shards):
        assert_trees_equal(run.restore_block(k), scratch.restore_block(k))
    assert sj.audit(run).ok


@pytest.mark.slow
def test_spool_server_killed_mid_request_then_restarted(base_run, tmp_path):
    run = copy_run(base_run, tmp_path / "run")
    spool = tmp_path / "spool"
    (spool / "incoming").mkdir(parents=True)
    reqs = {"r1": pick(run, 0, 2), "r2": pick(run, 1, 1), "r3": pick(run, 2, 3)}
    for i, (name, ids) in enumerate(reqs.items()):
        p = spool / "incoming" / f"{name}.req"
        p.write_text(" ".join(map(str, ids)))
        t = time.time() - 10 + i  # oldest first, all settled
        import os

        os.utime(p, (t, t))
    cmd = [sys.executable, "-m", "sisajax.cli", "serve", f"run_dir={run.run_dir}", f"spool={spool}"]
    # killed in the second slice step of the second request (r1 retrains slices 2-3): a pending
    # request is left behind
    r = subprocess.run(
        cmd,
        cwd=REPO,
        env=cli_env({"SISAJAX_FAULT": "mid_retrain:4"}),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == -9
    assert (spool / "done" / "r1.json").is_file() and (spool / "incoming" / "r2.req").is_file()
    assert [x["state"] for x in sj.open_run(run.run_dir).ledger.records()][-1] == "pending"
    (spool / "STOP").write_text("")
    r = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    responses = [json.loads((spool / "done" / f"{n}.json").read_text()) for n in reqs]
    assert all(x["ok"] for x in responses) and not list((spool / "incoming").iterdir())
    forgotten = [i for ids in reqs.values() for i in ids]
    scratch, _ = sj.train(tiny_config(), without(tiny_digits(), forgotten), tmp_path / "s")
    run = sj.open_run(run.run_dir)
    for k in range(run.num_shards):
        assert_trees_equal(run.restore_block(k), scratch.restore_block(k))
    rep = sj.audit(run)
    assert rep.ok and rep.forgotten_ids == 3


def test_a_server_compiles_what_single_id_requests_run_before_the_first(base_run, tmp_path,
                                                                       monkeypatch):  # fmt: skip
    """The one-shard training program and the init program (a request restarting at slice 0)
    are compiled (or loaded) when the server starts, so no request pays for compiling."""
    from sisajax import program_store

    run = copy_run(base_run, tmp_path / "run")
    with ForgetServer(run) as srv:
        compiles = []
        real = program_store.load_or_compile

        def counting(*a, **kw):
            compiles.append(a[0])
            return real(*a, **kw)

        monkeypatch.setattr(program_store, "load_or_compile", counting)
        for shard in (1, 2):
            r = srv.forget(pick(run, shard, 0))  # slice 0: the shard restarts from its init
            assert r["ok"] and r["shards"] == 1
        assert compiles == []


# -- request streams (`sisajax forget requests.mode=sequential`) ----------------------------------


def _ledger_len(run_dir) -> int:
    return len(sj.open_run(run_dir).ledger.records())


def test_a_sequential_stream_is_checked_whole_before_its_first_request(base_run, tmp_path):
    """An unknown id or a duplicate anywhere in the stream refuses it (exit 2) before anything
    changes, as one batched request of the same ids would be refused."""
    run = copy_run(base_run, tmp_path / "run")
    a, b = pick(run, 0, 1)[0], pick(run, 1, 1)[0]
    for ids in ([a, b, 999_999], [a, b, a], [a, 1.5]):
        with pytest.raises(sj.UserInputError):
            sj.serve_requests(run, ids, "sequential")
        assert sj.open_run(run.run_dir).generation == 0 and _ledger_len(run.run_dir) == 0
    d = str(run.run_dir)
    for ids in (f"[{a},999999]", f"[{a},{a}]"):
        assert cli(["forget", f"run_dir={d}", f"ids={ids}", "requests.mode=sequential"]) == 2
    assert sj.open_run(d).generation == 0 and _ledger_len(d) == 0
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    r = cli_run(["forget", f"run_dir={d}", f"ids_file={deep}"])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1 and "not valid JSON" in r.stderr
    assert sj.open_run(d).generation == 0


def test_a_stream_that_fails_midway_exits_1_and_records_what_it_did(base_run, tmp_path,
                                                                     monkeypatch):  # fmt: skip
    from sisajax import unlearning
    from sisajax.errors import StorageError
    from sisajax.requests import StreamInterrupted

    run = copy_run(base_run, tmp_path / "run")
    ids = [pick(run, 0, 2)[0], pick(run, 1, 2)[0], pick(run, 2, 2)[0]]
    real = unlearning.forget_in
    calls = []

    def failing_second(run_, batch, **kw):
        calls.append(batch)
        if len(calls) == 2:
            raise StorageError("writing data: no space left on the device")
        return real(run_, batch, **kw)

    monkeypatch.setattr(unlearning, "forget_in", failing_second)
    with pytest.raises(StreamInterrupted) as e:
        sj.serve_requests(run, ids, "sequential")
    assert e.value.exit_code == 1 and "no space" in str(e.value)
    assert e.value.report.requests == [ids[:1]] and len(e.value.report.costs) == 1
    assert sj.open_run(run.run_dir).generation == 1

    calls.clear()
    run = copy_run(base_run, tmp_path / "run2")
    d = str(run.run_dir)
    listed = ",".join(map(str, ids))
    code = cli(["forget", f"run_dir={d}", f"ids=[{listed}]", "requests.mode=sequential"])
    assert code == 1 and sj.open_run(d).generation == 1
    (result,) = (run.run_dir / "results").glob("forget-stream-*.json")
    rec = json.loads(result.read_text())
    assert rec["completed"] == 1 and rec["requested"] == 3 and rec["requests"] == [ids[:1]]
    assert "no space" in rec["error"]
