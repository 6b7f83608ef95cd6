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
from conftest import assert_trees_equal, tiny_config, tiny_digits, without

import sisajax as sj
from sisajax.engine import Engine, LayoutError, layout_options, select_devices

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
    assert got["forget_equals_scratch"]


@pytest.mark.parametrize("case", list(CASES))
def test_four_devices_equal_one_device(four_devices, case, tmp_path):
    """Blocks after forget (4 devices) == from scratch on one device; logits bit-identical.

    (For vmap this holds at this size only: with larger matrices vmap's bits depend on the shards
    per device, which is why layout_options keeps vmap runs on their device count.)
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
        assert_trees_equal(forgotten.restore_block(k), ref)
        assert_trees_equal(scratch4.restore_block(k), ref)
    _, x_test, _ = one.test_data()
    assert np.asarray(logits4).tobytes() == one.logits(x_test).tobytes()
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
        "num_processes": 1,
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
    }
    assert layout_options(None) == {"devices": (cpu,), "partitioning": "single"}
    # fewer devices here than the run used: same bits (tested above), so allowed unless strict
    assert layout_options(four) == {"devices": (cpu,), "partitioning": "single"}
    with pytest.raises(LayoutError, match="trained on 4 cpu devices.*device_count=4"):
        layout_options(four, strict=True)
    with pytest.raises(LayoutError, match="trained on gpu devices"):
        layout_options({**four, "platform": "gpu"})
    with pytest.raises(LayoutError, match="same kind of device"):
        layout_options({**four, "device_kind": "TPU v5"})
    with pytest.raises(LayoutError, match="vmap: its bits depend on the shards per device"):
        layout_options({**four, "shard_exec": "vmap"})  # even without strict
