"""Bad inputs to the Python API: each is refused with one line of sisajax's own error types,
before anything is written or allocated, and valid configurations keep their fingerprints."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import engine_probe, tiny_config, tiny_digits

import sisajax as sj
from sisajax.config import MAX_BATCH_SIZE, MAX_CHUNK_STEPS, MAX_UNROLL, run_config_from
from sisajax.errors import StorageError, UserInputError
from sisajax.layout import LayoutError, configure_cpu_devices, select_devices
from sisajax.planning import MAX_SCHEDULE_BYTES, check_schedule_size


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


# -- the chunk loop's shape options -----------------------------------------------------------


@pytest.mark.parametrize("trip", ["dynamic", "auto"])
def test_unroll_is_refused_with_a_dynamic_chunk_loop(trip, tmp_path):
    """The dynamic loop runs one step per iteration: an unroll there would change the run's
    fingerprint and chunk size but not its program."""
    cfg = tiny_config(unroll=4, chunk_steps="auto", chunk_trip=trip, shard_exec="map")
    with pytest.raises(sj.ConfigError) as e:
        sj.train(cfg, tiny_digits(), tmp_path / "r", metrics=False)
    msg = _one_line(e)
    assert "sisa.unroll=4" in msg and "sisa.chunk_trip" in msg
    assert not (tmp_path / "r").exists()


def test_chunk_steps_and_unroll_have_upper_bounds():
    assert sj.SisaConfig(chunk_steps=MAX_CHUNK_STEPS, unroll=MAX_UNROLL).unroll == MAX_UNROLL
    for kw, key in (
        ({"chunk_steps": MAX_CHUNK_STEPS + 1}, "sisa.chunk_steps"),
        ({"chunk_steps": 100_000_000}, "sisa.chunk_steps"),
        ({"unroll": 100_000}, "sisa.unroll"),
        ({"batch_size": 3_000_000_000}, "sisa.batch_size"),
        ({"batch_size": MAX_BATCH_SIZE + 1}, "sisa.batch_size"),
    ):
        with pytest.raises(sj.ConfigError, match=key):
            sj.SisaConfig(**kw)


# -- sizes that cannot be meant ---------------------------------------------------------------


@pytest.mark.parametrize("epochs", [1e9, 1e300])
def test_a_schedule_too_big_for_memory_is_refused_before_anything_is_written(epochs, tmp_path):
    with pytest.raises(sj.ConfigError) as e:
        sj.train(tiny_config(epochs=epochs), tiny_digits(), tmp_path / "r", metrics=False)
    msg = _one_line(e)
    assert "gradient steps" in msg and "host memory" in msg and "sisa.epochs" in msg
    assert not (tmp_path / "r").exists()


def test_schedule_size_counts_steps_batch_and_chunk_padding():
    """The bound covers the rows, masks and labels of every chunk of every position: a batch
    that fits one step can still be refused when the chunks multiply it."""
    cfg = tiny_config(batch_size=MAX_BATCH_SIZE, epochs=1, slices=1)
    check_schedule_size(cfg, [100, 100, 100], 3, 1)  # 1 step each: well within the bound
    with pytest.raises(sj.ConfigError, match="GiB of host memory, more than the 8 GiB"):
        check_schedule_size(cfg, [100, 100, 100], 3, MAX_CHUNK_STEPS)
    assert MAX_SCHEDULE_BYTES == 8 * 2**30


def test_huge_integers_are_not_finite_numbers():
    for make, key in (
        (lambda: sj.SisaConfig(epochs=10**400), "sisa.epochs"),
        (lambda: sj.OptimConfig(learning_rate=10**400), "optim.learning_rate"),
    ):
        with pytest.raises(sj.ConfigError, match=f"{key} must be a finite number") as e:
            make()
        assert len(_one_line(e)) < 200  # the 400 digits are not echoed


def test_optimiser_floats_must_be_finite_in_float32():
    """The training program casts them to float32: 1e308 would train to NaN silently."""
    assert sj.OptimConfig(learning_rate=3.4e38).learning_rate == 3.4e38
    for kw, key in (
        ({"learning_rate": 1e308}, "optim.learning_rate"),
        ({"learning_rate": 3.41e38}, "optim.learning_rate"),
        ({"weight_decay": 1e39}, "optim.weight_decay"),
    ):
        with pytest.raises(sj.ConfigError, match=f"{key} must be finite as a 32-bit float"):
            sj.OptimConfig(**kw)


def test_a_diverged_training_warns_naming_its_shards(tmp_path):
    """The warning reads the per-slice losses of the metrics records (the default sink); with
    metrics off no record is made for it, so training does no extra work and nothing warns."""
    import warnings

    cfg = tiny_config(slices=2, epochs=1, optim={"learning_rate": 1e38})
    with pytest.warns(RuntimeWarning, match=r"shard\(s\) 0, 1, 2 ended as NaN or infinity"):
        sj.train(cfg, tiny_digits(), tmp_path / "r")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        warnings.filterwarnings("ignore", "overflow", RuntimeWarning)
        warnings.filterwarnings("ignore", "invalid value", RuntimeWarning)
        sj.train(cfg, tiny_digits(), tmp_path / "quiet", metrics=False)


# -- types ------------------------------------------------------------------------------------


def test_run_config_sections_must_have_their_types():
    with pytest.raises(sj.ConfigError, match="sisa must be a SisaConfig, got dict"):
        sj.RunConfig(sisa={"shards": 3})
    cfg = sj.RunConfig()
    with pytest.raises(sj.ConfigError, match=r"unknown keys in sisa: \['shardz'\]"):
        cfg.replace(sisa={"shardz": 3})
    with pytest.raises(sj.ConfigError, match="unknown config sections"):
        cfg.replace(foo={"a": 1})
    with pytest.raises(sj.ConfigError, match="must be a mapping"):
        cfg.replace(sisa=[("shards", 3)])
    assert cfg.replace(sisa={"shards": 3}).sisa.shards == 3


@pytest.mark.parametrize("section", [[], 0, "", (), False])
def test_a_section_that_is_not_a_mapping_is_refused(section):
    with pytest.raises(sj.ConfigError, match="sisa must be a mapping"):
        sj.RunConfig.from_dict({"sisa": section})
    with pytest.raises(sj.ConfigError, match="sisa must be a mapping"):
        run_config_from({"sisa": section})


def test_missing_or_null_sections_take_their_defaults():
    assert sj.RunConfig.from_dict({"sisa": None}) == sj.RunConfig()
    assert sj.RunConfig.from_dict({}) == sj.RunConfig()
    with pytest.raises(sj.ConfigError, match="unknown config sections"):
        sj.RunConfig.from_dict({1: {}, "x": {}})  # keys of mixed types are still named


def test_train_refuses_inputs_of_the_wrong_type_before_writing(tmp_path):
    ds, cfg = tiny_digits(), tiny_config()
    cases = [
        ((cfg.to_dict(), ds), {}, sj.ConfigError, "config must be a RunConfig.*got dict"),
        ((cfg, None), {}, UserInputError, "dataset must be a sisajax Dataset.*got NoneType"),
        ((cfg, "digits"), {}, UserInputError, "dataset must be a sisajax Dataset.*got str"),
        ((cfg, ds), {"overwrite": "no"}, sj.ConfigError, "overwrite must be true or false"),
        ((cfg, ds), {"partition": "p"}, UserInputError, "partition must be a Partition"),
    ]
    for args, kw, err, pattern in cases:
        target = tmp_path / "r"
        with pytest.raises(err, match=pattern) as e:
            sj.train(*args, target, metrics=False, **kw)
        _one_line(e)
        assert not target.exists()


def test_forget_needs_an_open_run(tmp_path):
    with pytest.raises(UserInputError, match="open_run") as e:
        sj.forget(str(tmp_path), [1, 2])
    _one_line(e)


def test_a_new_run_folder_that_cannot_be_made_is_not_called_resumable():
    with pytest.raises(StorageError) as e:
        sj.train(tiny_config(), tiny_digits(), "/proc/sisajax-none/run", metrics=False)
    msg = _one_line(e)
    assert "creating /proc/sisajax-none/run" in msg and "resume" not in msg


# -- devices ----------------------------------------------------------------------------------


def test_devices_accepts_numpy_integers_and_refuses_booleans():
    assert len(select_devices(np.int64(1))) == 1
    assert len(select_devices(np.uint8(1))) == 1
    for bad in (True, False, np.bool_(True)):
        with pytest.raises(LayoutError, match="number of devices"):
            select_devices(bad)


@pytest.mark.parametrize("value", ["abc", "0", "1.5", "100000"])
def test_a_bad_jax_cpu_device_count_is_refused(value, monkeypatch):
    monkeypatch.setenv("JAX_NUM_CPU_DEVICES", value)
    with pytest.raises(sj.ConfigError, match="JAX_NUM_CPU_DEVICES must be") as e:
        configure_cpu_devices()
    _one_line(e)
    for fine in ("2", "-1"):
        monkeypatch.setenv("JAX_NUM_CPU_DEVICES", fine)
        assert configure_cpu_devices() is None  # jax's own setting: nothing added


def test_the_command_line_says_so_in_one_line(tmp_path):
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "abc"}
    env.pop("SISAJAX_CPU_DEVICES", None)
    proc = subprocess.run(
        [sys.executable, "-m", "sisajax.cli", "status", f"run_dir={tmp_path}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "JAX_NUM_CPU_DEVICES" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


def test_the_python_api_refuses_a_zero_jax_cpu_device_count():
    """jax would fail to start its CPU backend with a traceback; sisajax says why first."""
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "0"}
    env.pop("SISAJAX_CPU_DEVICES", None)
    proc = engine_probe(env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "refused: JAX_NUM_CPU_DEVICES must be" in proc.stdout
