"""Plug-in models and data sets: BatchNorm state and Dropout keys stay exact under forget, and a
plug-in works in every command of a run's life, imported only when the user names it."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from conftest import REPO, assert_trees_equal, cli_run, pick, without

import sisajax as sj
from sisajax.cli import main as cli

EXAMPLES = REPO / "docs" / "examples"


@pytest.fixture(scope="module")
def plugin():
    sys.path.insert(0, str(EXAMPLES))
    import tinyres_plugin

    yield tinyres_plugin
    sys.path.remove(str(EXAMPLES))


def _cfg(**sisa):
    return sj.RunConfig(
        data=sj.DataConfig("moons", {"n": 800}),
        model=sj.ModelConfig(name="tinyres", params={"width": 16, "blocks": 2, "dropout": 0.2}),
        optim=sj.OptimConfig(name="adam", learning_rate=3e-3),
        sisa=sj.SisaConfig(
            **{"shards": 3, "slices": 4, "epochs": 6, "batch_size": 16, "chunk_steps": 32, **sisa}
        ),
    )


def test_batchnorm_and_dropout_are_exact_under_forget(plugin, tmp_path):
    ds = sj.load_dataset("moons", n=800)
    cfg = _cfg()
    run, _ = sj.train(cfg, ds, tmp_path / "run", plugins=("tinyres_plugin",))
    state = run.read_row(0, 3)
    assert "batch_stats" in state.model_state  # mutable collections ride in the checkpoints
    assert run.evaluate().accuracy > 0.8
    ids = pick(run, 1, 2) + pick(run, 2, 0)  # a middle slice and the first slice
    rep = sj.forget(run, ids)
    assert rep.restart == {1: 2, 2: 0}
    scratch, _ = sj.train(cfg, without(ds, ids), tmp_path / "scratch")
    for k in range(3):
        assert_trees_equal(run.restore_block(k), scratch.restore_block(k))
    # dropout really draws per step: another seed gives other weights
    other, _ = sj.train(cfg.replace(sisa={"seed": 1}), ds, tmp_path / "other")
    a, b = run.read_row(0, 0).params, other.read_row(0, 0).params
    assert not np.array_equal(a["Dense_0"]["kernel"], b["Dense_0"]["kernel"])


def test_plugin_works_in_every_command_and_is_never_imported_silently(plugin, tmp_path):
    env = {"PYTHONPATH": str(EXAMPLES)}
    d = tmp_path / "run"
    common = [
        "model.name=tinyres",
        "+model.params.width=16",
        "+model.params.blocks=1",
        "data.name=moons",
        "~data.params",
        "+data.params.n=600",
        "optim=adam",
        "sisa.shards=2",
        "sisa.slices=3",
        "sisa.epochs=4",
        "sisa.chunk_steps=32",
    ]
    r = cli_run(
        ["train", f"run_dir={d}", "plugins=[tinyres_plugin]", *common, "progress=false"], env
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert sj.open_run(d).manifest.plugins == ("tinyres_plugin",)
    # opening the run without naming the plug-in: a clear error, no import behind the user's back
    r = cli_run(["forget", f"run_dir={d}", "ids=[3]", "progress=false"], env)
    assert r.returncode == 2 and "plugins=[" in r.stderr and "tinyres_plugin" in r.stderr
    ids = pick(sj.open_run(d), 1, 1)
    for args in (
        ["forget", f"run_dir={d}", f"ids=[{ids[0]}]", "progress=false"],
        ["evaluate", f"run_dir={d}"],
        ["verify", f"run_dir={d}"],
        ["audit", f"run_dir={d}"],
    ):
        r = cli_run([*args, "plugins=[tinyres_plugin]"], env)
        assert r.returncode == 0, (args, r.stdout[-1500:], r.stderr[-1500:])
    assert cli(["train", "plugins=[no_such_module]"]) == 2
    assert cli(["train", "plugins=[os;rm]"]) == 2


def test_the_documented_example_is_the_tested_one():
    doc = (REPO / "docs" / "plugins.md").read_text()
    assert "docs/examples/tinyres_plugin.py" in doc and "__call__(x, train=False, mask=None)" in doc
