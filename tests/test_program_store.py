"""The program store (compiled programs kept between processes) and the command line's choice of
the serial layout for one-shard forgets: the bits never change, only the time to get them."""

from __future__ import annotations

import json
import os
import pickle

import jax
import numpy as np
import pytest
from conftest import assert_trees_equal, cli_run, copy_run, pick, tiny_config, tiny_digits, without

import sisajax as sj
from sisajax import program_store
from sisajax.planning import build_engine


@pytest.fixture(scope="module")
def trained_digits(tmp_path_factory):
    ds = tiny_digits()
    cfg = tiny_config()
    run, _ = sj.train(cfg, ds, tmp_path_factory.mktemp("trained") / "run")
    return run.run_dir, cfg, ds


@pytest.fixture
def store(tmp_path):
    folder = program_store.enable(tmp_path / "programs")
    yield folder
    program_store.disable()


def _engine(cfg: sj.RunConfig, ds: sj.Dataset) -> sj.Engine:
    return build_engine(cfg, ds, devices=1)


def test_key_follows_what_the_program_is(store):
    """Same configuration and devices -> same key (a new engine finds the program); a different
    learning rate, width, chunk length or device count -> another key; store off -> no key."""
    ds = tiny_digits()
    cfg = tiny_config(chunk_steps=8)
    a, b = _engine(cfg, ds), _engine(cfg, ds)
    dev = a.devices

    def key(e, **shape):
        return program_store.program_key(e.program_identity("train_chunk", **shape), dev)

    assert key(a, width=1, capacity=64) == key(b, width=1, capacity=64)
    assert key(a, width=1, capacity=64) != key(a, width=2, capacity=64)
    assert key(a, width=1, capacity=64) != key(a, width=1, capacity=65)
    lr = tiny_config(chunk_steps=8, optim={"learning_rate": 0.02})
    assert key(a, width=1, capacity=64) != key(_engine(lr, ds), width=1, capacity=64)
    other = tiny_config(chunk_steps=16)
    assert key(a, width=1, capacity=64) != key(_engine(other, ds), width=1, capacity=64)
    if len(jax.local_devices()) > 1:
        ident = a.program_identity("train_chunk", width=1, capacity=64)
        assert program_store.program_key(ident, jax.local_devices()[1:2]) != key(
            a, width=1, capacity=64
        )
    program_store.disable()
    assert a.program_identity("train_chunk", width=1, capacity=64) is None


def test_a_stored_program_trains_the_same_bits(store, tmp_path):
    """A training compiled fresh stores its programs; a new engine (as in a new process) loads
    them instead of tracing, and its training and forget give exactly the rows of the first."""
    ds = tiny_digits()
    # a configuration no other test compiles, so jax's own cache cannot serve it
    cfg = tiny_config(chunk_steps=11, batch_size=7)
    first, _ = sj.train(cfg, ds, tmp_path / "first")
    stored = program_store.stats()["stored"]
    assert stored >= 2  # the training chunk and the initial-state program at least
    assert any(store.rglob("*.pkl"))
    before = program_store.stats()["loaded"]
    second, _ = sj.train(cfg, ds, tmp_path / "second")
    assert program_store.stats()["loaded"] > before
    for k in range(first.num_shards):
        assert_trees_equal(first.restore_block(k), second.restore_block(k))
    ids = pick(second, 1, 2)
    sj.forget(sj.open_run(tmp_path / "second"), ids)
    program_store.disable()
    scratch, _ = sj.train(cfg, without(ds, ids), tmp_path / "scratch")
    forgot = sj.open_run(tmp_path / "second")
    for k in range(scratch.num_shards):
        assert_trees_equal(forgot.restore_block(k), scratch.restore_block(k))


def test_damaged_or_failing_entries_are_compiled_instead(store, tmp_path):
    """A damaged entry is ignored (the program is compiled and training goes on, bit for bit);
    a loaded program whose first run fails is deleted and compiled instead, and the call rerun."""
    ds = tiny_digits()
    cfg = tiny_config(chunk_steps=13, batch_size=7)
    ref, _ = sj.train(cfg, ds, tmp_path / "ref")
    entries = sorted(store.rglob("*.pkl"))
    assert entries
    for p in entries:
        p.write_bytes(p.read_bytes()[:100])  # torn
    failed = program_store.stats()["failed"]
    again, _ = sj.train(cfg, ds, tmp_path / "again")
    assert program_store.stats()["failed"] >= failed + len(entries)
    for k in range(ref.num_shards):
        assert_trees_equal(ref.restore_block(k), again.restore_block(k))

    calls = []

    class Broken:
        def __call__(self, *args):
            raise jax.errors.JaxRuntimeError("NOT_FOUND: Function fusion not found")

    entry = store / "ab" / ("ab" + "0" * 62 + ".pkl")
    entry.parent.mkdir(parents=True, exist_ok=True)
    entry.write_bytes(b"x")

    def compile_fn():
        calls.append(1)
        return lambda x: x + 1

    prog = program_store.CheckedProgram(Broken(), "ab" + "0" * 62, compile_fn)
    assert int(prog(np.int32(1))) == 2 and calls == [1]
    assert not entry.exists()
    assert int(prog(np.int32(5))) == 6 and calls == [1]  # checked once, then called directly


def test_program_from_jax_cache_is_not_stored(store):
    """A program jax's persistent cache served is not stored (XLA:CPU serialises such an
    executable incompletely); a freshly compiled one is."""

    def fn(x):
        return jax.numpy.sin(x) * 3.0 + 0.25

    x = jax.ShapeDtypeStruct((17,), np.float32)
    compiled, fresh = program_store.compile_counting_hits(lambda: jax.jit(fn).lower(x).compile())
    assert fresh
    jax.clear_caches()  # forget the in-memory executable; the persistent cache keeps it
    compiled, fresh = program_store.compile_counting_hits(lambda: jax.jit(fn).lower(x).compile())
    assert not fresh
    assert float(compiled(np.zeros(17, np.float32))[0]) == 0.25


def test_model_defined_in_main_is_never_stored(store, monkeypatch):
    """A registered model whose code cannot be read (defined in ``__main__`` or a notebook) has
    no key: its programs are always compiled."""
    from sisajax import models

    def factory(cfg, num_classes):
        return models.build_model(sj.ModelConfig(hidden=(8,)), num_classes)

    factory.__module__ = "__main__"
    monkeypatch.setitem(models._REGISTRY, "main_mlp", factory)
    monkeypatch.setitem(models._REGISTERED_PARAMS, "main_mlp", ())
    cfg = sj.RunConfig(model=sj.ModelConfig(name="main_mlp"), sisa=tiny_config().sisa)
    eng = _engine(cfg, tiny_digits())
    assert eng.program_identity("train_chunk", width=1, capacity=8) is None
    assert models.code_fingerprint("mlp", eng.model) == "builtin"


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs CPU affinity and two cores",
)
def test_cli_forget_of_one_shard_runs_serial_and_stays_exact(tmp_path, trained_digits):
    """``sisajax forget`` with the default layout: a request that retrains one shard of a map
    run starts jax in the serial layout (one device), one that retrains two keeps one device per
    core; both give the rows of training from scratch on the retained data. A layout chosen by
    the user is kept."""
    src, cfg, ds = trained_digits
    run = copy_run(src, tmp_path / "run")
    default = {"SISAJAX_CPU_DEVICES": "", "XLA_FLAGS": ""}
    one, two, three = pick(run, 0, 1), pick(run, 1, 0) + pick(run, 2, 3), pick(run, 2, 2)
    proc = cli_run(["forget", f"run_dir={run.run_dir}", f"ids={one}", "progress=false"], default)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(sorted((run.run_dir / "results").glob("forget-g*.json"))[-1].read_text())
    assert res["restart"] == {"0": 1}
    assert res["process"] == {"platform": "cpu", "devices": 1, "serial": True}
    proc = cli_run(["forget", f"run_dir={run.run_dir}", f"ids={two}", "progress=false"], default)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(sorted((run.run_dir / "results").glob("forget-g*.json"))[-1].read_text())
    assert sorted(res["restart"]) == ["1", "2"]
    assert res["process"]["devices"] == min(len(os.sched_getaffinity(0)), 8)
    assert res["process"]["serial"] is False
    proc = cli_run(["forget", f"run_dir={run.run_dir}", f"ids={three}", "progress=false"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(sorted((run.run_dir / "results").glob("forget-g*.json"))[-1].read_text())
    assert res["process"] == {"platform": "cpu", "devices": 1, "serial": False}  # user's choice
    scratch, _ = sj.train(cfg, without(ds, one + two + three), tmp_path / "scratch")
    done = sj.open_run(run.run_dir)
    for k in range(scratch.num_shards):
        assert_trees_equal(done.restore_block(k), scratch.restore_block(k))


def test_entry_format_is_checked(store):
    """An entry written for another key (a renamed or copied file) is not loaded."""
    key = "cd" + "1" * 62
    path = store / "cd" / f"{key}.pkl"
    path.parent.mkdir(parents=True)
    path.write_bytes(program_store.encode_entry("other", {"value": 1}))
    assert program_store.load_or_compute(None, [], lambda: 2) == 2  # off for a None identity
    failed = program_store.stats()["failed"]
    assert program_store._read(key) is None
    assert program_store.stats()["failed"] == failed + 1


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX file ownership")
def test_only_private_regular_files_are_loaded(store):
    """Loading an entry runs its code: a link, or a file others may write, is not loaded."""
    key = "ef" + "2" * 62
    path = store / "ef" / f"{key}.pkl"
    path.parent.mkdir(parents=True)
    path.write_bytes(program_store.encode_entry(key, {"value": 7}))
    path.chmod(0o600)
    assert program_store._read(key)["value"] == 7
    path.chmod(0o666)
    assert program_store._read(key) is None
    path.chmod(0o600)
    real = store / "elsewhere.pkl"
    path.rename(real)
    path.symlink_to(real)
    assert program_store._read(key) is None


def test_a_store_that_cannot_be_written_only_stores_nothing(tmp_path):
    """A store folder that cannot be created (here a file is in the way; a read-only or full disk
    fails the same way) costs nothing but the storing: training runs and is exact."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    program_store.enable(blocker / "programs")
    try:
        stored = program_store.stats()["stored"]
        ds = tiny_digits()
        cfg = tiny_config(chunk_steps=9, batch_size=7)
        run, _ = sj.train(cfg, ds, tmp_path / "run")
        assert program_store.stats()["stored"] == stored
    finally:
        program_store.disable()
    ref, _ = sj.train(cfg, ds, tmp_path / "ref")
    for k in range(ref.num_shards):
        assert_trees_equal(run.restore_block(k), ref.restore_block(k))


def test_an_entry_whose_content_changed_is_not_loaded(store, tmp_path):
    """One flipped byte inside an entry's content (a pickle that still parses: a disk or copy
    fault in the executable) fails its checksum, so the program is compiled instead of loading
    bytes that could compute other bits or crash; training stays bit for bit."""
    key = "ab" + "3" * 62
    blob = program_store.encode_entry(key, {"value": list(range(50))})
    assert program_store.decode_entry(blob, key) == {"value": list(range(50))}
    body = pickle.dumps({"value": list(range(50))}, pickle.HIGHEST_PROTOCOL)
    i = blob.index(body) + len(body) // 2
    flipped = blob[:i] + bytes([blob[i] ^ 1]) + blob[i + 1 :]
    with pytest.raises(ValueError, match="checksum"):
        program_store.decode_entry(flipped, key)
    path = store / "ab" / f"{key}.pkl"
    path.parent.mkdir(parents=True)
    path.write_bytes(flipped)
    path.chmod(0o600)
    failed = program_store.stats()["failed"]
    assert program_store._read(key) is None
    assert program_store.stats()["failed"] == failed + 1

    ds = tiny_digits()
    cfg = tiny_config(chunk_steps=14, batch_size=7)
    ref, _ = sj.train(cfg, ds, tmp_path / "ref")
    entries = sorted(store.rglob("*.pkl"))
    assert len(entries) >= 3
    for p in entries:
        b = bytearray(p.read_bytes())
        b[len(b) // 2] ^= 0x10  # inside the pickled executable, the outer pickle still parses
        p.write_bytes(bytes(b))
    loaded, failed = program_store.stats()["loaded"], program_store.stats()["failed"]
    again, _ = sj.train(cfg, ds, tmp_path / "again")
    assert program_store.stats()["loaded"] == loaded
    assert program_store.stats()["failed"] >= failed + 2
    for k in range(ref.num_shards):
        assert_trees_equal(ref.restore_block(k), again.restore_block(k))


def test_key_refuses_values_that_are_not_plain_json(store):
    """A long array's text form elides values, so two different arrays would share a key: a
    program whose identity holds one is never keyed. Numpy scalars key as their number."""
    dev = jax.local_devices()[:1]
    a = {"program": "p", "params": np.arange(2000)}
    assert program_store.program_key(a, dev) is None
    key = program_store.program_key({"program": "p", "lr": np.float64(0.5)}, dev)
    assert key is not None
    assert key == program_store.program_key({"program": "p", "lr": 0.5}, dev)
    assert program_store.program_key({"program": "p", "lr": float("nan")}, dev) is None


def test_key_names_the_code_as_imported_and_the_cpu(store, monkeypatch):
    """sisajax's source as this process imported it is part of the key; once the files differ
    from it (edited since the import), nothing is keyed. The CPU's full feature set is part of
    the key too."""
    from sisajax import host, plugins

    dev = jax.local_devices()[:1]
    ident = {"program": "p"}
    key = program_store.program_key(ident, dev)
    assert key is not None
    monkeypatch.setattr(host, "cpu_signature", lambda: "another cpu")
    assert program_store.program_key(ident, dev) not in (None, key)
    monkeypatch.undo()
    monkeypatch.setitem(plugins._FIRST_SEEN, "sisajax", "0" * 64)  # as if edited since
    assert program_store.code_digest() is None
    assert program_store.program_key(ident, dev) is None


def test_plugin_model_key_is_its_code_at_import(store, tmp_path, monkeypatch):
    """A plug-in model's programs are keyed by the source it had when it was registered: a file
    edited after the import (the process still runs the old code) leaves the model unkeyed, so a
    program of the old code is never stored under the new code's key."""
    from sisajax import models, plugins

    pkg = tmp_path / "edited_plugin_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "import sisajax as sj\n"
        "from sisajax import models\n\n\n"
        "def factory(cfg, num_classes):\n"
        "    return models.build_model(sj.ModelConfig(hidden=(8,)), num_classes)\n\n\n"
        "sj.register_model('edited_plugin_mlp', factory, params=())\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))
    monkeypatch.setattr(models, "_REGISTERED_PARAMS", dict(models._REGISTERED_PARAMS))
    plugins.load_plugins(["edited_plugin_pkg"])
    try:
        module = models._REGISTRY["edited_plugin_mlp"](sj.ModelConfig(), 10)
        first = models.code_fingerprint("edited_plugin_mlp", module)
        assert first not in (None, "builtin")
        assert models.code_fingerprint("edited_plugin_mlp", module) == first
        (pkg / "__init__.py").write_text((pkg / "__init__.py").read_text() + "# edited\n")
        assert models.code_fingerprint("edited_plugin_mlp", module) is None
    finally:
        import sys

        sys.modules.pop("edited_plugin_pkg", None)


def test_store_keeps_to_its_size_limit(tmp_path):
    """Past its size limit the store drops the least recently used entries (loading renews an
    entry) down to 80% of the limit; temp files a dead writer left go after an hour, a live
    writer's stay."""
    folder = program_store.enable(tmp_path / "programs", max_bytes=60_000)
    try:
        keys = [f"{i:02x}" + "4" * 62 for i in range(6)]
        for i, key in enumerate(keys[:5]):
            assert program_store._write(key, {"value": bytes(10_000)})
            os.utime(program_store._path(key), (1000 + i, 1000 + i))
        assert program_store._read(keys[0]) is not None  # used now: the newest
        stale = folder / "00" / ".x.pkl.1.ab.tmp"
        stale.write_bytes(b"x")
        os.utime(stale, (1, 1))
        fresh = folder / "00" / ".y.pkl.2.cd.tmp"
        fresh.write_bytes(b"y")
        evicted = program_store.stats()["evicted"]
        assert program_store._write(keys[5], {"value": bytes(10_000)})  # 6 x ~10 kB > 60 kB
        left = {p.stem for p in folder.rglob("*.pkl")}
        assert keys[0] in left and keys[5] in left
        assert keys[1] not in left and keys[2] not in left
        assert sum(p.stat().st_size for p in folder.rglob("*.pkl")) <= 48_000
        assert program_store.stats()["evicted"] == evicted + 6 - len(left)
        assert not stale.exists() and fresh.exists()
        with pytest.raises(ValueError, match="positive"):
            program_store.enable(folder, max_bytes=0)
    finally:
        program_store.disable()


def test_command_line_store_limit_from_the_environment(monkeypatch):
    """``SISAJAX_PROGRAM_STORE_MAX_MB`` sets the command line's limit; a value that is not a
    positive number is refused in one line."""
    from sisajax.config import ConfigError
    from sisajax.console import program_store_limit

    monkeypatch.delenv(program_store.MAX_MB_ENV, raising=False)
    assert program_store_limit() == program_store.DEFAULT_MAX_BYTES
    monkeypatch.setenv(program_store.MAX_MB_ENV, "2.5")
    assert program_store_limit() == int(2.5 * 2**20)
    for bad in ("0", "-1", "lots", "nan", "inf"):
        monkeypatch.setenv(program_store.MAX_MB_ENV, bad)
        with pytest.raises(ConfigError, match="positive number"):
            program_store_limit()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
def test_a_fifo_in_an_entry_place_is_refused_not_waited_on(store):
    """Opening a FIFO for reading waits for a writer: an entry path holding one is refused at
    once (counted as failed), as a run file would be."""
    from sisajax.store.files import UnsafeRunError, open_read

    key = "fe" + "5" * 62
    path = store / "fe" / f"{key}.pkl"
    path.parent.mkdir(parents=True)
    os.mkfifo(path, 0o600)
    with pytest.raises(UnsafeRunError, match="not a regular file"):
        open_read(path)
    failed = program_store.stats()["failed"]
    assert program_store._read(key) is None
    assert program_store.stats()["failed"] == failed + 1
