"""Shards spread over several devices: same bits as one device, exact unlearning, no collectives.

Four CPU devices need XLA_FLAGS set before jax is imported, so the 4-device work runs in a
subprocess (tests/helpers/devices_check.py); this process (one device) trains the references.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import assert_trees_equal, engine_probe, tiny_config, tiny_digits, without

import sisajax as sj
from sisajax.engine import Engine
from sisajax.layout import LayoutError, layout_options, select_devices

HELPER = Path(__file__).parent / "helpers" / "devices_check.py"
sys.path.insert(0, str(HELPER.parent))
from devices_check import CASES  # noqa: E402


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
    """Run the 4-device checks once; returns (output dir, report)."""
    out = tmp_path_factory.mktemp("four_devices")
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    env = {**os.environ, "XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(HELPER), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert report["device_count"] == 4
    return out, report


def test_no_collectives_in_compiled_training_programs(four_devices):
    _, report = four_devices
    assert report["control_psum"] == ["all-reduce"]  # the checker sees a collective if present
    for case in report["cases"].values():
        assert case["collectives"] == []  # per-device programs the forget ran
    assert report["shard_map"]["collectives"] == []  # the one SPMD program


@pytest.mark.parametrize("case", list(CASES))
def test_forget_on_four_devices_equals_scratch_on_four_devices(four_devices, case):
    _, report = four_devices
    got = report["cases"][case]
    a, b = CASES[case][1]
    assert set(got["restart"]) == {str(a), str(b)}  # two shards, trained on different devices
    assert got["layout"]["num_devices"] == 4 and got["layout"]["partitioning"] == "per_device"
    assert got["restart_one"] == {str(b): 0}
    if CASES[case][0].get("shard_exec") != "vmap":  # map forgets run on the devices they need
        assert got["narrowed_programs"] == [1, 1]
    else:  # vmap keeps the run's width and device count (its bits depend on the width)
        assert got["narrowed_programs"] == [0, 0]
    assert got["forget_equals_scratch"]


@pytest.mark.parametrize("case", list(CASES))
def test_four_devices_equal_one_device(four_devices, case, tmp_path):
    """Checkpoints after a forget on 4 devices vs from scratch on one device.

    ``map``: bit-identical (a shard's lax.map program does not depend on the width or the device;
    forget relies on it, and every exactness test checks it). ``vmap``: another width is another
    program, so bits are not promised across layouts (that is why a vmap run keeps its device
    count): equal to float32 rounding. Inference of identical weights under another layout or
    batch shape is not promised bit for bit either (it differed in the last bit on an AVX-512
    machine): logits within a few ulps, identical predictions.
    """
    out, _ = four_devices
    kwargs, _ = CASES[case]
    cfg = tiny_config(**kwargs)
    ds = tiny_digits()
    with np.load(out / f"{case}.npz") as z:
        ids, logits4, pred4 = z["ids"], z["logits"], z["predict"]
    one, _ = sj.train(cfg, without(ds, ids), tmp_path / "one")
    assert one.engine.num_devices == 1
    forgotten = sj.open_run(out / f"{case}_run")
    scratch4 = sj.open_run(out / f"{case}_scratch")
    for k in range(cfg.sisa.shards):
        ref = one.restore_block(k)
        if cfg.sisa.shard_exec == "vmap":
            for a, b in zip(
                jax.tree.leaves(forgotten.restore_block(k)), jax.tree.leaves(ref), strict=True
            ):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert_trees_equal(forgotten.restore_block(k), ref)
            assert_trees_equal(scratch4.restore_block(k), ref)
    _, x_test, _ = one.test_data()
    logits1 = one.logits(x_test)
    scale = np.maximum(np.abs(logits1), 1.0)
    assert np.max(np.abs(logits4 - logits1) / scale) < 64 * np.finfo(np.float32).eps
    assert np.array_equal(pred4, one.predict(x_test))


def test_shard_map_partitioning_same_bits_and_refused_with_vmap(four_devices):
    _, report = four_devices
    assert report["shard_map"]["equal_to_per_device"]
    assert report["shard_map"]["vmap_refused"]


def test_layout_of_one_device_engine():
    ds = tiny_digits(40, 10)
    eng = Engine(tiny_config(), ds.feature_shape, ds.x_train.dtype, ds.num_classes)
    assert eng.layout() == {
        "num_devices": 1,
        "platform": "cpu",
        "device_kind": jax.devices()[0].device_kind,
        "partitioning": "single",
        "shard_exec": "map",
        "chunk_trip": "dynamic",
        "num_processes": 1,
        "training_program": sj.config.TRAINING_PROGRAM,
        "deterministic": True,
    }
    assert eng.padded_width(5) == 5
    with pytest.raises(LayoutError, match="xla_force_host_platform_device_count=4"):
        select_devices(4)


def test_layout_options_reproduce_or_refuse_clearly():
    cpu = jax.devices()[0]
    four = {
        "num_devices": 4,
        "platform": "cpu",
        "device_kind": cpu.device_kind,
        "partitioning": "per_device",
        "training_program": sj.config.TRAINING_PROGRAM,
    }
    assert layout_options(None) == {"devices": (cpu,), "partitioning": "single"}
    # fewer (or more) devices here than the run used: map bits are the same (tested above), so a
    # map run continues on the devices at hand unless strict
    assert layout_options(four) == {"devices": (cpu,), "partitioning": "single"}
    with pytest.raises(LayoutError, match="trained on 4 cpu devices.*device_count=4"):
        layout_options(four, strict=True)
    with pytest.raises(LayoutError, match="trained on gpu devices"):
        layout_options({**four, "platform": "gpu"})
    with pytest.raises(LayoutError, match="same kind of device"):
        layout_options({**four, "device_kind": "TPU v5"})
    with pytest.raises(LayoutError, match="vmap: its bits depend on the shards per device"):
        layout_options({**four, "shard_exec": "vmap"})  # even without strict


SERIAL_CHILD = """
import json, os, sys
sys.path.insert(0, sys.argv[2])
start = sorted(os.sched_getaffinity(0))
import sisajax as sj  # the serial layout narrows this process to one core until jax starts
narrowed = sorted(os.sched_getaffinity(0))
import jax
from conftest import tiny_config, tiny_digits
run, _ = sj.train(tiny_config(), tiny_digits(), sys.argv[1])  # its engine starts jax
after = sorted({tuple(sorted(os.sched_getaffinity(int(t)))) for t in os.listdir("/proc/self/task")})
ids = [int(run.shard_data(1).ids[run.shard_data(1).slices == 2][0])]
rep = sj.forget(run, ids)
print(json.dumps({"start": start, "narrowed": narrowed, "after": after, "ids": ids,
                  "devices": jax.device_count(), "restart": rep.restart}))
"""


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs CPU affinity and two cores",
)
def test_serial_layout_same_bits_and_gives_the_cores_back(tmp_path):
    """``SISAJAX_CPU_DEVICES=serial``: one device, XLA's pools sized while the process ran on one
    core, every thread given all its cores back once jax has started; training and a forget
    produce the same bits as this process's layout."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["SISAJAX_CPU_DEVICES"] = "serial"
    tests_dir = str(Path(__file__).parent)
    proc = subprocess.run(
        [sys.executable, "-c", SERIAL_CHILD, str(tmp_path / "serial"), tests_dir],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["devices"] == 1
    assert got["narrowed"] == [min(got["start"])]  # one core while jax started
    assert got["after"] == [got["start"]]  # every thread has all its cores again
    assert got["restart"] == {"1": 2}
    ds = tiny_digits()
    scratch, _ = sj.train(tiny_config(), without(ds, got["ids"]), tmp_path / "scratch")
    served = sj.open_run(tmp_path / "serial")
    for k in range(scratch.num_shards):
        assert_trees_equal(served.restore_block(k), scratch.restore_block(k))


def test_bad_cpu_layout_value_is_refused_clearly(tmp_path):
    """A bad ``SISAJAX_CPU_DEVICES``: the command line says so in one line (exit 2) before doing
    anything; ``import sisajax`` still works and the API raises when it first picks devices."""
    from sisajax.layout import configure_cpu_devices

    env = {**os.environ, "SISAJAX_CPU_DEVICES": "lots"}
    env.pop("XLA_FLAGS", None)
    cli = [sys.executable, "-m", "sisajax.cli", "status", f"run_dir={tmp_path}"]
    proc = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "'serial'" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = engine_probe(env)
    assert proc.returncode == 0 and "refused:" in proc.stdout and "'lots'" in proc.stdout
    assert configure_cpu_devices() is None  # jax is imported here: nothing changes
    for bad in ("0", "-1", "100000"):  # not a device count this host can mean
        env["SISAJAX_CPU_DEVICES"] = bad
        proc = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "must be in 1..256" in proc.stderr, (bad, proc.stderr)
