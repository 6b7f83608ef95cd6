"""Plug-ins are held to the same standards as the built-in models: unknown ``model.params`` keys
are refused, and a run refuses to replay its training with plug-in code other than the code it
was trained with (its source hash is recorded at training)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import sys
import warnings

import pytest
from conftest import cli_run, copy_run, pick, tiny_digits, tree_bytes

import sisajax as sj
from sisajax.plugins import ALLOW_CHANGE_ENV, PluginChangedError, PluginChangeWarning, source_hash

# -- unknown model.params keys --------------------------------------------------------------------


class _Calls:
    """A factory that records its calls and reads the keys named in ``reads``."""

    def __init__(self, reads: tuple[str, ...] = ()):
        self.reads, self.calls = reads, 0

    def __call__(self, cfg: sj.ModelConfig, num_classes: int):
        import flax.linen as nn

        self.calls += 1
        for key in self.reads:
            cfg.params.get(key, 1)
        return nn.Dense(num_classes)


def _model(name: str, **params) -> sj.ModelConfig:
    return sj.ModelConfig(name=name, params=params)


def test_declared_params_refuse_unknown_keys_before_the_factory_runs():
    factory = _Calls()
    sj.register_model("pi_declared", factory, params=("width", "depth"))
    with pytest.raises(sj.ConfigError) as e:
        sj.build_model(_model("pi_declared", width=4, widht=8), 10)
    assert str(e.value) == "model.params for pi_declared may set width, depth; got ['widht']"
    assert factory.calls == 0
    sj.build_model(_model("pi_declared", width=4), 10)  # a key it declares, or none, is fine
    sj.build_model(_model("pi_declared"), 10)
    assert factory.calls == 2
    with pytest.raises(sj.ConfigError, match="params must be a list of key names"):
        sj.register_model("pi_bad", factory, params="width")


def test_keys_the_factory_never_reads_are_refused():
    sj.register_model("pi_reads", _Calls(reads=("width",)))
    with pytest.raises(sj.ConfigError) as e:
        sj.build_model(_model("pi_reads", width=4, depht=2), 10)
    assert str(e.value) == "model.params for pi_reads may set width; got ['depht']"
    sj.build_model(_model("pi_reads", width=4), 10)
    sj.register_model("pi_reads_nothing", _Calls())
    with pytest.raises(sj.ConfigError) as e:
        sj.build_model(_model("pi_reads_nothing", width=4), 10)
    assert str(e.value) == "model.params for pi_reads_nothing may set nothing; got ['width']"

    # reading every key (`**cfg.params`, dict(...), iterating, `in`) counts as reading them
    def whole(cfg, num_classes):
        import flax.linen as nn

        return nn.Dense(num_classes, **dict(cfg.params))

    sj.register_model("pi_whole", whole)
    sj.build_model(_model("pi_whole", use_bias=False), 10)
    sj.register_model("pi_in", lambda cfg, n: _Calls()(cfg, n) if "w" in cfg.params else None)
    sj.build_model(_model("pi_in", w=1), 10)
    # the config the caller holds is untouched; built-in models keep their own message
    cfg = _model("pi_reads", width=4)
    sj.build_model(cfg, 10)
    assert type(cfg.params) is dict
    with pytest.raises(sj.ConfigError, match=r"^model.params for mlp may set dropout, input"):
        sj.build_model(_model("mlp", widht=1), 10)


def test_a_typo_in_a_plugin_param_stops_training_before_anything_is_written(tmp_path):
    sj.register_model("pi_train", _Calls(reads=("width",)))
    cfg = _config("pi_train").replace(model={"params": {"widht": 8}})
    with pytest.raises(sj.ConfigError, match=r"may set width; got \['widht'\]"):
        sj.train(cfg, tiny_digits(), tmp_path / "run")
    assert not (tmp_path / "run").exists()


# -- the plug-in's source is part of the run ------------------------------------------------------

MODULE = "pi_tiny_plugin"
SOURCE = '''"""A tiny plug-in model, written by the test."""
import flax.linen as nn
import jax.numpy as jnp

import sisajax as sj


class Tiny(nn.Module):
    num_classes: int
    width: int = 8

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1)).astype(jnp.float32)
        return nn.Dense(self.num_classes)(nn.relu(nn.Dense(self.width)(x)))


sj.register_model("pi_tiny", lambda cfg, n: Tiny(n, int(cfg.params.get("width", 8))))
'''
REFUSED = (
    f"plug-in {MODULE} changed since this run was trained (its source hash differs): forget "
    "would not replay the training exactly; restore the plug-in's code, or retrain the run in "
    f"place ({ALLOW_CHANGE_ENV}=1 proceeds anyway, inexactly)"
)


def _config(model: str) -> sj.RunConfig:
    return sj.RunConfig(
        model=sj.ModelConfig(name=model, params={"width": 8}),
        sisa=sj.SisaConfig(shards=2, slices=2, epochs=2, batch_size=16, chunk_steps=16),
    )


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plugin")
    (folder / f"{MODULE}.py").write_text(SOURCE)
    sys.path.insert(0, str(folder))
    importlib.import_module(MODULE)
    yield folder
    sys.path.remove(str(folder))


@pytest.fixture(scope="module")
def trained(plugin_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("trained") / "run"
    sj.train(_config("pi_tiny"), tiny_digits(120, 40), root, plugins=(MODULE,))
    return root


@pytest.fixture
def edited(plugin_dir):
    """The plug-in's source edited on disk (restored afterwards)."""
    path = plugin_dir / f"{MODULE}.py"
    path.write_text(SOURCE.replace("width: int = 8", "width: int = 16"))
    yield path
    path.write_text(SOURCE)


def test_training_records_the_plugin_source_hash(trained, plugin_dir):
    sources = sj.open_run(trained).manifest.plugin_sources
    want = hashlib.sha256((plugin_dir / f"{MODULE}.py").read_bytes()).hexdigest()
    assert sources == {MODULE: want}
    assert json.loads((trained / "MANIFEST.json").read_text())["plugin_sources"] == sources


def test_an_unchanged_plugin_forgets(trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginChangeWarning)
        rep = sj.forget(run, pick(run, 0, 1))
    assert rep.generation == 1
    assert run.manifest.plugin_sources == sj.open_run(trained).manifest.plugin_sources


def test_a_changed_plugin_is_refused_before_anything_changes(trained, edited, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    before = tree_bytes(run.run_dir)
    with pytest.raises(PluginChangedError) as e:
        sj.forget(run, pick(run, 0, 1))
    assert str(e.value) == REFUSED and e.value.exit_code == 2
    with pytest.raises(PluginChangedError):
        sj.resume(run)
    assert tree_bytes(run.run_dir) == before
    # reading commands only warn (once per handle)
    run = sj.open_run(run.run_dir)
    with pytest.warns(PluginChangeWarning, match="this command runs the new code"):
        run.evaluate()
    assert tree_bytes(run.run_dir) == before


def test_the_override_proceeds_with_a_warning(trained, edited, tmp_path, monkeypatch):
    monkeypatch.setenv(ALLOW_CHANGE_ENV, "1")
    run = copy_run(trained, tmp_path / "run")
    with pytest.warns(PluginChangeWarning, match=f"proceeding because {ALLOW_CHANGE_ENV}=1"):
        rep = sj.forget(run, pick(run, 1, 0))
    assert rep.generation == 1
    # the recorded hashes stay those of training (the untouched slices were trained with them)
    assert run.manifest.plugin_sources == sj.open_run(trained).manifest.plugin_sources


def test_retraining_in_place_records_the_new_source(trained, edited, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    run, _ = sj.train(
        _config("pi_tiny"), tiny_digits(120, 40), run.run_dir, overwrite=True, plugins=(MODULE,)
    )
    assert run.manifest.plugin_sources == {MODULE: source_hash(MODULE)}
    assert sj.forget(run, pick(run, 0, 0)).generation == 2


def test_a_run_without_recorded_hashes_opens_and_forgets(trained, edited, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    doc = json.loads((run.run_dir / "MANIFEST.json").read_text())
    del doc["plugin_sources"]  # as written before the hashes were recorded
    (run.run_dir / "MANIFEST.json").write_text(json.dumps(doc))
    run = sj.open_run(run.run_dir)
    assert run.manifest.plugin_sources == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginChangeWarning)
        assert sj.forget(run, pick(run, 1, 1)).generation == 1
    assert "plugin_sources" in json.loads((run.run_dir / "MANIFEST.json").read_text())


def test_the_command_line_refuses_a_changed_plugin(trained, edited, plugin_dir, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    before = tree_bytes(run.run_dir)
    args = [
        "forget",
        f"run_dir={run.run_dir}",
        f"ids=[{pick(run, 0, 1)[0]}]",
        f"plugins=[{MODULE}]",
    ]
    r = cli_run([*args, "progress=false"], {"PYTHONPATH": str(plugin_dir)})
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [f"error: {REFUSED}"]
    assert tree_bytes(run.run_dir) == before


def test_a_package_plugin_hashes_every_source_file(tmp_path, monkeypatch):
    pkg = tmp_path / "pi_pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pi_pkg.sub import model\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "model.py").write_text("WIDTH = 8\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("pi_pkg")
    first = source_hash("pi_pkg")
    (pkg / "sub" / "__pycache__").mkdir(exist_ok=True)
    (pkg / "sub" / "__pycache__" / "stale.py").write_text("x = 1\n")
    (pkg / "notes.txt").write_text("not code")
    assert source_hash("pi_pkg") == first
    (pkg / "sub" / "model.py").write_text("WIDTH = 16\n")
    assert source_hash("pi_pkg") != first
    assert source_hash("pi_not_imported") is None


def test_the_code_this_process_imported_is_checked_not_only_the_file(trained, tmp_path):
    """A long-lived process imported the plug-in; the run was then retrained in place by a
    process with an edited file. The file on disk now matches the run, but this process still
    runs the old code: forget is refused (it would replay the new run with the old model)."""
    from sisajax import plugins

    run = copy_run(trained, tmp_path / "run")
    doc = json.loads((run.run_dir / "MANIFEST.json").read_text())
    doc["plugin_sources"] = {MODULE: "0" * 64}  # what another process's code hashed to
    (run.run_dir / "MANIFEST.json").write_text(json.dumps(doc))
    real = plugins.source_hash
    try:  # the file on disk is that code; this process imported something else
        plugins.source_hash = lambda n: "0" * 64 if n == MODULE else real(n)
        plugins._IMPORTED[MODULE] = real(MODULE)
        with pytest.raises(PluginChangedError, match=f"plug-in {MODULE} changed"):
            sj.forget(sj.open_run(run.run_dir), pick(run, 0, 1))
    finally:
        plugins.source_hash = real


def test_a_model_plugin_must_be_imported_to_forget(trained, tmp_path, monkeypatch):
    """Another module registering the same model name is not the recorded plug-in: a forget of
    a run whose model comes from a plug-in needs that plug-in imported."""
    run = copy_run(trained, tmp_path / "run")
    monkeypatch.delitem(sys.modules, MODULE)  # the model stays registered, by "someone else"
    with pytest.raises(PluginChangedError, match=f"trained with plug-in.s. {MODULE}, not imported"):
        sj.forget(sj.open_run(run.run_dir), pick(run, 0, 1))
    assert sj.open_run(run.run_dir).generation == 0


def test_an_interrupted_plugin_training_imports_nothing_and_checks_its_code(
    plugin_dir, tmp_path, monkeypatch
):
    """Continuing a Ctrl-C'd training never imports the modules its record names (a run
    directory from elsewhere runs no code), and refuses when the plug-in's code changed since
    the stored slice steps were trained."""
    from sisajax.generation_writer import GenerationWriter
    from sisajax.store.interrupted import INTERRUPTED, read_record, write_record

    root = tmp_path / "run"
    calls = {"n": 0}
    real = GenerationWriter.on_slice

    def interrupt_after_two(self, shards):
        handle = real(self, shards)

        def on_slice(out):
            calls["n"] += 1
            if calls["n"] == 3:  # slice steps 0 and 1 handed over; 0 at least is stored
                raise KeyboardInterrupt
            return handle(out)

        return on_slice

    cfg = _config("pi_tiny").replace(sisa={"slices": 4})
    with monkeypatch.context() as m:
        m.setattr(GenerationWriter, "on_slice", interrupt_after_two)
        with pytest.raises(KeyboardInterrupt):
            sj.train(cfg, tiny_digits(120, 40), root, plugins=(MODULE,))
    rec = read_record(root)
    assert rec.plugin_sources == {MODULE: source_hash(MODULE)}
    # a record naming a module that is not imported: refused, nothing imported
    (tmp_path / "pi_payload.py").write_text("import pathlib; pathlib.Path('RAN').touch()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    write_record(root, dataclasses.replace(rec, plugins=(*rec.plugins, "pi_payload")))
    with pytest.raises(sj.UserInputError, match="used plug-in.s. pi_payload; import them"):
        sj.continue_training(root, tiny_digits(120, 40))
    assert "pi_payload" not in sys.modules and not (tmp_path / "RAN").exists()
    # the plug-in's code changed since the stored slice steps: refused
    write_record(root, dataclasses.replace(rec, plugin_sources={MODULE: "0" * 64}))
    with pytest.raises(sj.UserInputError, match=f"plug-in.s. {MODULE} are not imported or changed"):
        sj.continue_training(root, tiny_digits(120, 40))
    write_record(root, rec)
    run, _ = sj.continue_training(root, tiny_digits(120, 40))
    assert not (root / INTERRUPTED).exists() and run.manifest.plugin_sources == rec.plugin_sources
