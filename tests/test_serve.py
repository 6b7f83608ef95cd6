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
    copy_run,
    pick,
    tiny_config,
    tiny_digits,
    without,
)

import sisajax as sj
from sisajax.serve import ForgetServer, parse_request


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
        lines = [f"{a[0]}", "not ids", f'{{"ids": [{b[0]}, {c[0]}], "tag": "t"}}', f"{a[0]}"]
        out = list(srv.serve_lines(lines))
        with pytest.raises(sj.RunBusyError):  # the server holds the writer lock
            sj.forget(sj.open_run(run.run_dir), pick(run, 0, 0), lock_timeout_s=0.1)
    assert [r["ok"] for r in out] == [True, False, True, True]
    assert out[2]["tag"] == "t" and out[2]["forgotten"] == 2 and out[3]["already_forgotten"] == 1
    assert all(r["overhead_s"] < 1.0 for r in out if r["ok"])
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
        t = time.time() + i
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
