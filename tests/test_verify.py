"""Exactness verification: passes on honest runs, names exactly the shard that was tampered with,
and on checkpoints of another host says a bitwise comparison is not meaningful."""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest
from conftest import tiny_config, tiny_digits

import sisajax as sj
from sisajax import host
from sisajax.cli import main as cli
from sisajax.store.files import write_file
from sisajax.store.manifest import RowRef, row_file
from sisajax.store.rows import encode_row, read_row
from sisajax.verification import CROSS_HOST_TOLERANCE, VerifyError, choose_shards, verify


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    run, _ = sj.train(tiny_config(), tiny_digits(), tmp_path_factory.mktemp("base") / "run")
    return run.run_dir


@pytest.fixture
def run(base_run, tmp_path):
    """A private copy of the trained run (run directories are relocatable)."""
    shutil.copytree(base_run, tmp_path / "run")
    return sj.open_run(tmp_path / "run")


def _ids_in(run, shard, slice_):
    d = run.shard_data(shard)
    return d.ids[d.slices == slice_]


def _commit(run, manifest):
    run.files.commit(manifest, 10)
    run.reload()


def _tamper(run, k, slice_, eps):
    """Replace the checkpoint of (shard k, slice) by one whose first weight differs by ``eps``,
    with a consistent header, checksum and manifest: only a retrain can tell."""
    state = run.read_row(k, slice_)
    state.params["Dense_0"]["kernel"][0, 0] += np.float32(eps)
    ref = run.manifest.shards[k].rows[slice_]
    old = row_file(k, slice_, ref.generation)
    header, _ = read_row(run.run_dir / old, ref.sha256, run.row_spec())
    gen = run.generation + 1
    header["generation"] = gen
    rel = row_file(k, slice_, gen)
    leaves = jax.tree.leaves(state)
    sha, size = write_file(run.run_dir / rel, encode_row(header, run.engine.leaf_paths(), leaves))
    entry = run.manifest.shards[k]
    rows = list(entry.rows)
    rows[slice_] = RowRef(gen, sha, size, ref.host)
    m = run.manifest.with_shard(k, dataclasses.replace(entry, rows=tuple(rows)))
    _commit(run, m.replace(generation=gen))
    assert (
        run.read_row(k, slice_).params["Dense_0"]["kernel"][0, 0]
        == state.params["Dense_0"]["kernel"][0, 0]
    )  # the tampered checkpoint reads without any checksum error


def test_untouched_run_is_bit_identical(run):
    rep = verify(run)
    assert rep.ok and rep.mismatched_shards == [] and rep.fingerprint_mismatches == []
    assert [s.shard for s in rep.shards] == [0, 1, 2]
    for s in rep.shards:
        assert s.slice_identical == [True] * run.num_slices
        assert s.max_abs_diff == 0.0 and s.fingerprints_ok and s.error is None
    assert rep.partition_consistent and rep.partition_kind == "hash"
    assert rep.backend == "cpu" and rep.shard_exec == "map"
    assert rep.bitwise_meaningful and rep.tolerance is None
    (saved,) = (run.run_dir / "results").glob("verify-*.json")
    data = json.loads(saved.read_text())
    assert data["ok"] is True and data["verified_shards"] == [0, 1, 2]


def test_passes_after_forgets(run):
    sj.forget(run, [int(_ids_in(run, 0, 2)[0]), int(_ids_in(run, 1, 0)[0])])
    sj.forget(run, _ids_in(run, 2, 1))  # empties slice 1 of shard 2
    rep = verify(run)
    assert rep.ok and rep.generation == 2
    assert all(s.identical for s in rep.shards)


@pytest.mark.parametrize("slice_", [0, 3])
def test_tampered_consistent_checkpoint_fails_for_exactly_that_shard(run, slice_):
    _tamper(run, 1, slice_, eps=1e-3)
    rep = verify(run)
    assert not rep.ok
    assert rep.mismatched_shards == [1]
    bad = rep.shards[1]
    assert bad.slice_identical == [j != slice_ for j in range(run.num_slices)]
    assert bad.max_abs_diff == pytest.approx(1e-3, rel=1e-3)
    assert bad.fingerprints_ok  # the ids are right; the state is not
    assert rep.to_dict()["shards"][1]["status"] == "differs"
    loose = verify(run, atol=1e-2)  # a tolerance accepts it as close, and says so
    assert loose.ok and loose.shards[1].status(loose.tolerance) == "close"


def test_one_ulp_is_detected(run):
    w = run.read_row(0, 2).params["Dense_0"]["kernel"][0, 0]
    _tamper(run, 0, 2, eps=float(np.nextafter(w, np.float32(np.inf)) - w))
    rep = verify(run, shards=[0])
    assert rep.mismatched_shards == [0] and 0 < rep.shards[0].max_abs_diff < 1e-6


def test_wrong_fingerprints_are_reported(run):
    entry = run.manifest.shards[2]
    fps = list(entry.fingerprints)
    fps[1] = sj.data.fingerprint_ids(_ids_in(run, 2, 0))  # claims slice 1 added nothing
    _commit(run, run.manifest.with_shard(2, dataclasses.replace(entry, fingerprints=tuple(fps))))
    rep = verify(run)
    assert not rep.ok and rep.fingerprint_mismatches == [2] and rep.mismatched_shards == []
    assert rep.shards[2].fingerprints_match == [True, False, True, True]
    assert rep.shards[2].meta_fingerprints_match == [True] * 4  # the rows' own headers are right


def test_corrupt_checkpoint_is_an_error_not_a_crash(run):
    ref = run.manifest.shards[0].rows[1]
    victim = run.run_dir / row_file(0, 1, ref.generation)
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the weights
    victim.write_bytes(bytes(data))
    rep = verify(run, shards=[0, 1])
    assert rep.shards[0].status() == "error" and "corrupt" in rep.shards[0].error
    assert rep.mismatched_shards == [0] and rep.shards[1].identical


def test_subsets_and_samples(run):
    assert choose_shards(5, None, None, 0) == [0, 1, 2, 3, 4]
    assert choose_shards(5, [3, 1, 3], None, 0) == [1, 3]
    a = choose_shards(10, None, 4, seed=7)
    assert a == choose_shards(10, None, 4, seed=7) and len(set(a)) == 4
    assert set(choose_shards(10, [2, 5, 8], 2, seed=1)) <= {2, 5, 8}
    for shards, sample in [([5], None), ([], None), (None, 0), ([1], 2)]:
        with pytest.raises(VerifyError):
            choose_shards(3, shards, sample, 0)
    _tamper(run, 2, 1, eps=1e-3)
    assert verify(run, shards=[0, 1]).ok  # shard 2 not checked
    rep = verify(run, shards=[2])
    assert [s.shard for s in rep.shards] == [2] and rep.mismatched_shards == [2]
    sampled = verify(run, sample=2, seed=3)
    assert len(sampled.shards) == 2
    assert sampled.ok == (2 not in [s.shard for s in sampled.shards])


def test_explicit_partition_is_its_own_reference(base_run, tmp_path):
    hashed = sj.open_run(base_run).partition
    part = sj.Partition(hashed.ids, (hashed.shard + 1) % 3, hashed.slice, 3, 4)
    run, _ = sj.train(tiny_config(), tiny_digits(), tmp_path / "run", partition=part)
    sj.forget(run, _ids_in(run, 1, 2)[:2])
    rep = verify(sj.open_run(tmp_path / "run"))
    assert rep.ok and rep.partition_kind == "explicit" and rep.partition_consistent


def _fake_other_host(run):
    """Rewrite the run as if every checkpoint had been written by a host without AVX-512."""
    here, info = host.current()
    other = {**info, "isa": [f for f in info["isa"] if not f.startswith("avx512")] + ["fake_isa"]}
    other_id = host.host_id(other)
    m = run.manifest
    for k, e in enumerate(m.shards):
        rows = tuple(dataclasses.replace(r, host=other_id) for r in e.rows)
        m = m.with_shard(k, dataclasses.replace(e, rows=rows))
    _commit(run, m.replace(hosts={other_id: other}))
    return other_id


def test_other_host_is_compared_within_a_reported_tolerance(run, capsys):
    other = _fake_other_host(run)
    rep = verify(run)
    assert not rep.bitwise_meaningful and other in rep.foreign_hosts
    assert any("isa" in d for d in rep.foreign_hosts[other])
    assert rep.tolerance == CROSS_HOST_TOLERANCE and rep.ok  # identical bits are within it
    _tamper(run, 1, 2, eps=1e-2)  # beyond the tolerance: reported, with the reason
    assert cli(["verify", f"run_dir={run.run_dir}"]) == 1
    out = capsys.readouterr().out
    assert "not meaningful" in out and "another host" in out and "FAILED" in out
    _tamper(run, 0, 2, eps=1e-5)  # within it
    assert verify(run, shards=[0]).ok


def test_forget_warns_when_rows_come_from_another_host(run):
    _fake_other_host(run)
    with pytest.warns(sj.HostWarning, match="another host|made on host"):
        rep = sj.forget(run, [int(_ids_in(run, 1, 2)[0])])
    assert rep.warnings and "mixes hosts" in rep.warnings[0]
    here, _ = host.current()
    assert {r.host for r in run.manifest.shards[1].rows} >= {here}  # retrained rows: this host


@pytest.mark.slow
def test_full_train_mode_agrees(run, tmp_path):
    sj.forget(run, [int(_ids_in(run, 1, 1)[0])])
    rep = verify(run, workdir=tmp_path / "ref")
    assert rep.ok and rep.mode == "full_train"
    ref = sj.open_run(tmp_path / "ref")
    assert jax.tree.all(jax.tree.map(np.array_equal, ref.restore_block(1), run.restore_block(1)))
    # verify never trains over a run: not the verified one, not another (here: the reference)
    before = run.generation
    for target in (run.run_dir, tmp_path / "ref"):
        with pytest.raises(sj.VerifyError, match="new or empty folder"):
            verify(run, workdir=target)
    assert sj.open_run(run.run_dir).generation == before
    assert sj.open_run(tmp_path / "ref").generation == 0


def test_cli_exit_codes(run, capsys):
    d = run.run_dir
    assert cli(["verify", f"run_dir={d}", "shards=[0,2]"]) == 0
    assert "bit-identical" in capsys.readouterr().out
    _tamper(run, 0, 1, eps=1e-3)
    assert cli(["verify", f"run_dir={d}", "shards=[0]"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "differs" in out
    assert cli(["verify", f"run_dir={d}", "shards=[1]", "sample=1"]) == 0
    assert cli(["verify", f"run_dir={d}", "shards=[9]"]) == 2
    assert "do not exist" in capsys.readouterr().err
    assert cli(["verify", f"run_dir={d}", "sisa.shards=4"]) == 2
    assert "sisa" in capsys.readouterr().err


@pytest.mark.slow
def test_a_process_compiling_for_another_isa_is_another_host(run):
    """XLA restricted to SSE4.2 generates other code (another host for bit-identity): verify there
    says a bitwise comparison is not meaningful and compares within its tolerance; a forget there
    warns that the retrained rows come from another host."""
    from conftest import cli_run

    env = {"XLA_FLAGS": "--xla_cpu_max_isa=SSE4_2"}
    r = cli_run(["verify", f"run_dir={run.run_dir}", "shards=[0]"], env)
    assert r.returncode == 0 and "not meaningful" in r.stdout, r.stdout + r.stderr
    assert "xla_flags" in r.stdout and "within" in r.stdout
    r = cli_run(
        ["forget", f"run_dir={run.run_dir}", f"ids=[{_ids_in(run, 1, 3)[0]}]", "progress=false"],
        env,
    )
    assert r.returncode == 0 and "another host" in r.stdout + r.stderr
    hosts = sj.open_run(run.run_dir).manifest.hosts
    assert len(hosts) == 2  # shard 1 now holds rows of both hosts, each described
