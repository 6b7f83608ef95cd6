"""Exactness verification: passes on honest runs, names exactly the shard that was tampered with."""

import json
import shutil

import jax
import numpy as np
import pytest
from conftest import tiny_config, tiny_digits

import sisajax as sj
from experiments.cmd_verify import cmd_verify
from sisajax.verify import VerifyError, choose_shards, verify


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


def _tamper(run, k, slice_, eps):
    """Replace shard k's block by one whose slice row differs by ``eps`` in one weight, with a
    consistent manifest (checksums and fingerprints pass): only a retrain can tell."""
    block = run.restore_block(k)
    kernel = block.params["params"]["Dense_0"]["kernel"]
    kernel[slice_, 0, 0] = np.float32(kernel[slice_, 0, 0] + eps)
    meta = run.store.read_meta(run.shard_entry(k)["checkpoint"])
    meta.pop("shard")
    manifest = json.loads(json.dumps(run.manifest))
    manifest["shards"][str(k)]["checkpoint"] = run.store.write_block(
        k, run.generation + 1, block, meta
    )
    run.commit(manifest)
    assert (
        kernel[slice_, 0, 0]
        == run.restore_block(k).params["params"]["Dense_0"]["kernel"][slice_, 0, 0]
    )  # the tampered block restores without any checksum error


def test_untouched_run_is_bit_identical(run):
    rep = verify(run)
    assert rep.ok and rep.mismatched_shards == [] and rep.fingerprint_mismatches == []
    assert [s.shard for s in rep.shards] == [0, 1, 2]
    for s in rep.shards:
        assert s.slice_identical == [True] * run.num_slices
        assert s.max_abs_diff == 0.0 and s.fingerprints_ok and s.error is None
    assert rep.partition_consistent and rep.partition_kind == "hash"
    assert rep.backend == "cpu" and rep.shard_exec == "map"
    saved = json.loads((run.run_dir / "results/verify.json").read_text())
    assert saved["ok"] is True and saved["verified_shards"] == [0, 1, 2]


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
    # a tolerance accepts it as close, and says so
    loose = verify(run, atol=1e-2)
    assert loose.ok and loose.shards[1].status(loose.atol) == "close"


def test_one_ulp_is_detected(run):
    block = run.restore_block(0)
    w = block.params["params"]["Dense_0"]["kernel"][2, 0, 0]
    _tamper(run, 0, 2, eps=float(np.nextafter(w, np.float32(np.inf)) - w))
    rep = verify(run, shards=[0])
    assert rep.mismatched_shards == [0] and 0 < rep.shards[0].max_abs_diff < 1e-6


def test_wrong_fingerprints_are_reported(run):
    manifest = json.loads(json.dumps(run.manifest))
    fps = manifest["shards"]["2"]["fingerprints"]
    fps[1] = sj.data.fingerprint_ids(_ids_in(run, 2, 0))  # claims slice 1 added nothing
    run.commit(manifest)
    rep = verify(run)
    assert not rep.ok and rep.fingerprint_mismatches == [2] and rep.mismatched_shards == []
    assert rep.shards[2].fingerprints_match == [True, False, True, True]
    assert rep.shards[2].meta_fingerprints_match == [True] * 4  # the block's own record is right


def test_corrupt_checkpoint_is_an_error_not_a_crash(run):
    block_dir = run.store.root / run.shard_entry(0)["checkpoint"]["block"]
    victim = next(p for p in sorted(block_dir.rglob("*")) if p.is_file() and p.stat().st_size)
    victim.write_bytes(b"\0" + victim.read_bytes()[1:])
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
    """A run trained with an explicit partition (here: the hash partition with shards relabelled,
    so shapes and compiled programs are shared with the other tests) is checked against it."""
    hashed = sj.open_run(base_run).partition
    part = sj.Partition(hashed.ids, (hashed.shard + 1) % 3, hashed.slice, 3, 4)
    run, _ = sj.train(tiny_config(), tiny_digits(), tmp_path / "run", partition=part)
    sj.forget(run, _ids_in(run, 1, 2)[:2])
    rep = verify(sj.open_run(tmp_path / "run"))
    assert rep.ok and rep.partition_kind == "explicit" and rep.partition_consistent


@pytest.mark.slow
def test_full_train_mode_agrees(run, tmp_path):
    sj.forget(run, [int(_ids_in(run, 1, 1)[0])])
    rep = verify(run, workdir=tmp_path / "ref")
    assert rep.ok and rep.mode == "full_train"
    ref = sj.open_run(tmp_path / "ref")
    assert jax.tree.all(jax.tree.map(np.array_equal, ref.restore_block(1), run.restore_block(1)))


def test_cli_exit_codes(run, capsys):
    d = run.run_dir
    assert cmd_verify([f"run_dir={d}", "verify.shards=[0,2]"]) == 0
    assert "OK" in capsys.readouterr().out
    _tamper(run, 0, 1, eps=1e-3)
    assert cmd_verify([f"run_dir={d}", "+verify.shards=[0]"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "differs" in out
    assert cmd_verify([f"run_dir={d}", "verify.shards=[1]", "verify.sample=1"]) == 0
    with pytest.raises(Exception, match="do not exist"):
        cmd_verify([f"run_dir={d}", "verify.shards=[9]"])
    with pytest.raises(Exception, match="conflict"):
        cmd_verify([f"run_dir={d}", "sisa.shards=4"])
