"""XLA_FLAGS read as XLA reads them (the last value counts) decide determinism; a run says for
good when any of its rows came from a program that is not deterministic."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import pick, tiny_config, tiny_digits

import sisajax as sj
from sisajax.engine import Engine
from sisajax.layout import GPU_DETERMINISM_FLAGS, deterministic_backend, xla_flag_value
from sisajax.unlearning import layout_after_retraining

REPO = Path(__file__).resolve().parent.parent


def test_the_last_determinism_value_in_xla_flags_counts(monkeypatch):
    on, off = "--xla_gpu_deterministic_ops=true", "--xla_gpu_deterministic_ops=false"
    assert xla_flag_value("xla_gpu_deterministic_ops", f"{on} --x=1 {off}") == "false"
    assert xla_flag_value("xla_gpu_deterministic_ops", "--x=1") is None
    monkeypatch.setenv("XLA_FLAGS", f"{on} {off}")
    assert not deterministic_backend("gpu")  # a substring test would have said yes
    monkeypatch.setenv("XLA_FLAGS", f"{off} {' '.join(GPU_DETERMINISM_FLAGS)}")
    assert deterministic_backend("gpu")
    assert deterministic_backend("cpu")


def test_a_users_own_determinism_value_is_left_alone_at_import():
    env = {k: v for k, v in os.environ.items() if k != "SISAJAX_ALLOW_NONDETERMINISTIC"}
    env["XLA_FLAGS"] = "--xla_gpu_deterministic_ops=false"
    code = "import os, sisajax; print(os.environ.get('XLA_FLAGS', ''))"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    flags = [f for f in out.split() if "deterministic" in f]
    assert flags == ["--xla_gpu_deterministic_ops=false"]  # nothing appended over it


def test_layout_after_retraining():
    run_layout = {"platform": "gpu", "deterministic": True}
    assert layout_after_retraining(run_layout, None) == run_layout
    assert layout_after_retraining(run_layout, {"deterministic": True}) == run_layout
    got = layout_after_retraining(run_layout, {"deterministic": False})
    assert got == {"platform": "gpu", "deterministic": False} and run_layout["deterministic"]


def test_a_forget_on_a_nondeterministic_program_is_recorded_for_good(tmp_path, monkeypatch):
    run, _ = sj.train(tiny_config(), tiny_digits(), tmp_path / "run")
    assert run.manifest.layout["deterministic"] is True
    real = Engine.layout

    def nondeterministic(self):
        return {**real(self), "deterministic": False}

    with monkeypatch.context() as m:
        m.setattr(Engine, "layout", nondeterministic)
        sj.forget(run, pick(run, 0, 1))
    assert sj.open_run(run.run_dir).manifest.layout["deterministic"] is False
    sj.forget(run, pick(run, 1, 1))  # deterministic again: the older rows still are not
    assert sj.open_run(run.run_dir).manifest.layout["deterministic"] is False
