"""Multi-process training: two processes on localhost train one run, bit-identical to one process.

Each worker (tests/helpers/distributed_worker.py) joins a 2-process JAX job over gloo with one
CPU device. (Two processes with two devices each also gave the one-process bits when tried by
hand; spreading over devices inside a process is covered by test_devices.py.)
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_trees_equal, tiny_config, tiny_digits

import sisajax as sj
from sisajax import distributed
from sisajax.errors import RunError
from sisajax.metrics import read_metrics

WORKER = Path(__file__).parent / "helpers" / "distributed_worker.py"
SISA = {"shards": 5, "slices": 3}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("multiprocess") / "run"
    coordinator = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "SISAJAX_CPU_DEVICES": "1"}
    env.pop("XLA_FLAGS", None)  # one CPU device per process (several: see test_devices)
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), coordinator, "2", str(p), str(run_dir), json.dumps(SISA)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in range(2)
    ]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-4000:]
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return run_dir, outs


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run, cost = sj.train(tiny_config(**SISA), tiny_digits(), tmp_path_factory.mktemp("ref") / "r")
    return run, cost


def test_round_robin_assignment():
    assert distributed.process_shards(5, 0, 2) == [0, 2, 4]
    assert distributed.process_shards(5, 1, 2) == [1, 3]
    assert distributed.process_shards(2, 2, 3) == []


def test_two_processes_equal_one_process(two_process_run, reference):
    from sisajax.plugins import source_hash

    run_dir, outs = two_process_run
    ref, ref_cost = reference
    assert [o["shards"] for o in outs] == [[0, 2, 4], [1, 3]]
    run = sj.open_run(run_dir)
    assert run.manifest.plugins == ("conftest",)  # recorded like a one-process training's
    assert run.manifest.plugin_sources == {"conftest": source_hash("conftest")}
    layout = run.manifest.layout
    assert (layout["num_processes"], layout["num_devices"]) == (2, 1)
    for k in range(ref.num_shards):
        assert_trees_equal(run.restore_block(k), ref.restore_block(k))
        mine, theirs = run.manifest.shards[k], ref.manifest.shards[k]
        assert (mine.n_ids, mine.fingerprints, mine.data.sha256) == (
            theirs.n_ids,
            theirs.fingerprints,
            theirs.data.sha256,
        )
        assert [r.sha256 for r in mine.rows] == [r.sha256 for r in theirs.rows]
    assert np.array_equal(run.partition.ids, ref.partition.ids)
    assert run.manifest.config_fingerprint == ref.manifest.config_fingerprint
    assert not (run_dir / distributed.PARTS_DIR).exists()  # hand-off files removed
    (result,) = read_metrics(run_dir, "train")
    assert len(result["per_process"]) == 2
    assert result["grad_steps"] == ref_cost.grad_steps == sum(o["grad_steps"] for o in outs)
    assert run.evaluate().to_dict() == ref.evaluate().to_dict()


def test_multiprocess_run_unlearns_in_one_process(two_process_run, reference, tmp_path):
    run_dir, _ = two_process_run
    run = sj.open_run(shutil.copytree(run_dir, tmp_path / "multi"))  # copies: fixtures are shared
    ref = sj.open_run(shutil.copytree(reference[0].run_dir, tmp_path / "single"))
    ids = [int(ref.shard_data(0).ids[2]), int(ref.shard_data(3).ids[0])]
    assert sj.forget(run, ids).restart == sj.forget(ref, ids).restart
    for k in range(ref.num_shards):
        assert_trees_equal(run.restore_block(k), ref.restore_block(k))


def test_single_process_path_equals_train(tmp_path, reference):
    ref, _ = reference
    run, cost = distributed.train_multiprocess(
        tiny_config(**SISA), tiny_digits(), tmp_path / "r", process_id=0, num_processes=1
    )
    assert run.manifest.layout["num_processes"] == 1
    for k in range(ref.num_shards):
        assert_trees_equal(run.restore_block(k), ref.restore_block(k))
    with pytest.raises(sj.UserInputError, match="not empty"):
        distributed.train_multiprocess(tiny_config(**SISA), tiny_digits(), tmp_path / "r")
    with pytest.raises(RunError, match="process 0 of 1"):
        distributed.train_multiprocess(
            tiny_config(**SISA), tiny_digits(), tmp_path / "x", process_id=1, num_processes=2
        )


def test_several_processes_refuse_vmap(tmp_path, monkeypatch):
    """Under vmap the bits depend on the shards per device: refused before anything is written."""
    import jax

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(sj.ConfigError, match="needs sisa.shard_exec=map"):
        distributed.train_multiprocess(
            tiny_config(**SISA, shard_exec="vmap"), tiny_digits(), tmp_path / "r"
        )
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "name,plugin,target",
    [
        ("parallel", "hydra_joblib_launcher", "joblib_launcher.JoblibLauncher"),
        ("slurm", "hydra_submitit_launcher", "submitit_launcher.SlurmLauncher"),
    ],
)
def test_sweep_launcher_configs(name, plugin, target):
    """The launcher configs extend the plugins' own; composed when the plugin is installed."""
    from omegaconf import OmegaConf

    from sisajax.cli.app import conf_dir

    path = conf_dir() / "hydra" / "launcher" / f"{name}.yaml"
    assert "# @package hydra.launcher" in path.read_text()
    assert OmegaConf.load(path).defaults[0] in ("joblib", "submitit_slurm")
    pytest.importorskip(f"hydra_plugins.{plugin}", reason="extra 'cluster' not installed")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("train", [f"hydra/launcher={name}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == f"hydra_plugins.{plugin}.{target}"
