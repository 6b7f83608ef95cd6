"""The pure step module on its own, the compiled program's shape, and the GPU determinism rules."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO, assert_trees_equal, tiny_config, tiny_digits, without

import sisajax as sj
from sisajax.engine import Engine
from sisajax.hlo import census
from sisajax.layout import (
    GPU_DETERMINISM_FLAGS,
    LayoutError,
    check_deterministic,
    deterministic_backend,
    layout_options,
)
from sisajax.step import (
    StepMeta,
    StepSpec,
    cross_entropy,
    init_state,
    resolve_trip,
    shard_step,
    train_chunk,
)


def _spec(**sisa):
    return StepSpec.build(tiny_config(**sisa), num_classes=10)


def _batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 64)).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    return x, y


def test_cross_entropy_is_the_integer_label_loss_without_a_scatter():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(16, 10)).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, 10, 16).astype(np.int32))
    ours = cross_entropy(logits, labels)
    ref = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
    g_ours = jax.grad(lambda z: cross_entropy(z, labels).sum())(logits)
    g_ref = jax.grad(lambda z: optax.softmax_cross_entropy_with_integer_labels(z, labels).sum())(
        logits
    )
    np.testing.assert_allclose(g_ours, g_ref, rtol=1e-5, atol=1e-6)
    text = jax.jit(jax.grad(lambda z: cross_entropy(z, labels).sum())).lower(logits)
    assert census(text.compile().as_text())["scatter"] == 0


def test_shard_step_is_a_pure_function_of_its_arguments():
    spec = _spec()
    state = init_state(spec, jax.random.PRNGKey(3), (64,))
    x, y = _batch()
    mask = np.ones(8, bool)
    mask[-2:] = False
    x[~mask] = 0.0
    step = jax.jit(functools.partial(shard_step, spec))
    key = jax.random.PRNGKey(1)
    a, loss_a = step(state, x, y, mask, key)
    b, loss_b = step(state, x, y, mask, key)
    assert_trees_equal(a, b)
    assert int(a.step) == int(state.step) + 1
    # the returned loss is the summed cross-entropy of the real examples before the step
    logits = spec.model.apply({"params": state.params}, x)
    expected = float(jnp.sum(cross_entropy(logits, y)[mask]))
    assert float(loss_a) == pytest.approx(expected, rel=1e-5)
    moved = [
        float(jnp.max(jnp.abs(p - q)))
        for p, q in zip(jax.tree.leaves(a.params), jax.tree.leaves(state.params), strict=True)
    ]
    assert max(moved) > 0.0
    # masked rows do not reach the parameters: changing their content changes nothing
    x2 = x.copy()
    x2[~mask] = 1e3
    y2 = y.copy()
    y2[~mask] = (y2[~mask] + 1) % 10
    c, _ = step(state, np.where(mask[:, None], x2, 0.0).astype(np.float32), y2, mask, key)
    assert_trees_equal(a, c)


@pytest.mark.parametrize("trip", ["static", "dynamic"])
def test_train_chunk_runs_the_live_steps_and_skips_the_rest(trip):
    """A chunk of C steps with only the first t live equals t single steps (same keys and
    schedule inputs), to float32 rounding: the static and the dynamic loop do the same work."""
    spec = _spec(optim={"name": "adam", "learning_rate": 1e-2})
    state = init_state(spec, jax.random.PRNGKey(0), (64,))
    c, b, t = 6, 8, 4
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 64)).astype(np.float32)
    y = rng.integers(0, 10, 40).astype(np.int32)
    rows = rng.integers(0, 40, (c, b)).astype(np.int32)
    mask = np.zeros((c, b), bool)
    mask[:t] = True
    labels = np.where(mask, y[rows], 0).astype(np.int32)
    meta = StepMeta.stack(2, 1, 0, t)
    chunk = jax.jit(functools.partial(train_chunk, spec, trip=trip))
    out, loss = chunk(state, x, rows, mask, labels, meta)
    assert int(out.step) == t
    assert int(out.opt_state[0].count) == t  # Adam's counter moved only on live steps
    ref = state
    total = 0.0
    for i in range(t):
        key = jax.random.fold_in(
            jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(spec.seed), 2), 1), i
        )
        ref, part = shard_step(spec, ref, x[rows[i]], labels[i], mask[i], key)
        total += float(part)
    for p, q in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(np.asarray(p), np.asarray(q), rtol=2e-5, atol=1e-6)
    assert float(loss) == pytest.approx(total, rel=1e-5)


@pytest.mark.parametrize(
    ("shard_exec", "trip"), [("vmap", "auto"), ("map", "static"), ("vmap", "static")]
)
def test_accelerator_program_has_no_scatter_no_conditional_and_known_trip_counts(shard_exec, trip):
    """What a GPU needs to run a chunk without waiting for the host: every loop's trip count is
    known at compile time, no conditional, no scatter (the compiled HLO, read on a CPU)."""
    ds = tiny_digits()
    cfg = tiny_config(shards=4, shard_exec=shard_exec, chunk_trip=trip)
    eng = Engine(cfg, ds.feature_shape, ds.x_train.dtype, ds.num_classes, devices=1)
    c = census(eng.compiled(4, 128).as_text())
    assert c["scatter"] == 0 and c["conditional"] == 0
    assert c["while"] >= 1
    assert all(lp["trip_count"] is not None for lp in c["loops"]), c["loops"]
    assert cfg.sisa.chunk_steps in [lp["trip_count"] for lp in c["loops"]]


def test_auto_loop_is_data_dependent_only_under_map_on_a_cpu():
    # a data-dependent loop makes an accelerator copy its predicate to the host every iteration
    assert resolve_trip("auto", "map", "cpu") == "dynamic"
    assert resolve_trip("auto", "map", "gpu") == "static"
    assert resolve_trip("auto", "map", "tpu") == "static"
    assert resolve_trip("auto", "vmap", "cpu") == "static"
    assert resolve_trip("dynamic", "vmap", "gpu") == "dynamic"
    assert resolve_trip("auto", "map") == (
        "dynamic" if jax.default_backend() == "cpu" else "static"
    )


def test_cpu_program_has_no_scatter_and_no_conditional():
    ds = tiny_digits()
    cfg = tiny_config(shards=4)  # auto: map with a loop over the live steps only
    eng = Engine(cfg, ds.feature_shape, ds.x_train.dtype, ds.num_classes, devices=1)
    assert eng.trip == "dynamic"
    c = census(eng.compiled(4, 128).as_text())
    assert c["scatter"] == 0 and c["conditional"] == 0


@pytest.mark.parametrize("trip", ["static", "dynamic"])
def test_forget_is_exact_with_either_loop(tmp_path, trip):
    ds = tiny_digits()
    cfg = tiny_config(chunk_trip=trip, optim={"name": "sgd", "momentum": 0.9})
    run, _ = sj.train(cfg, ds, tmp_path / "a")
    assert run.manifest.layout["chunk_trip"] == trip
    gone = run.partition.shard_ids(1)[5:7]
    sj.forget(run, gone)
    scratch, _ = sj.train(cfg, without(ds, gone), tmp_path / "b")
    assert_trees_equal(run.final_states(), scratch.final_states())


def test_runs_of_another_training_program_are_refused_with_one_line(tmp_path):
    ds = tiny_digits()
    run, _ = sj.train(tiny_config(), ds, tmp_path / "r")
    layout = dict(run.manifest.layout)
    assert layout["training_program"] == sj.config.TRAINING_PROGRAM
    layout_options(layout)  # this program: accepted
    old = {k: v for k, v in layout.items() if k != "training_program"}  # runs before it
    with pytest.raises(LayoutError, match="training program version 1") as e:
        layout_options(old)
    assert "\n" not in str(e.value) and "overwrite=true" in str(e.value)


def test_gpu_determinism_is_required_unless_allowed(monkeypatch):
    monkeypatch.delenv("SISAJAX_ALLOW_NONDETERMINISTIC", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops=false")
    assert not deterministic_backend("gpu")
    assert deterministic_backend("cpu") and deterministic_backend("tpu")
    with pytest.raises(LayoutError, match="not deterministic"):
        check_deterministic("gpu")
    check_deterministic("cpu")
    monkeypatch.setenv("SISAJAX_ALLOW_NONDETERMINISTIC", "1")
    check_deterministic("gpu")  # opted out (recorded as deterministic: false in the layout)
    monkeypatch.delenv("SISAJAX_ALLOW_NONDETERMINISTIC")
    monkeypatch.setenv("XLA_FLAGS", " ".join(GPU_DETERMINISM_FLAGS))
    assert deterministic_backend("gpu")
    check_deterministic("gpu")


def test_importing_sisajax_first_turns_on_the_gpu_determinism_flags():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    env.pop("SISAJAX_ALLOW_NONDETERMINISTIC", None)
    code = "import os, sisajax; print(os.environ.get('XLA_FLAGS', ''))"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert all(f in out for f in GPU_DETERMINISM_FLAGS)
    env["SISAJAX_ALLOW_NONDETERMINISTIC"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert "xla_gpu_deterministic_ops" not in out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "params", "dtype", "shard_exec"),
    [
        ("resnet18", {"width": 4, "stages": [1, 1, 1, 1]}, "bfloat16", "auto"),
        ("wrn", {"depth": 10, "widen": 1, "dropout": 0.1}, "float32", "auto"),
        ("resnet18", {"width": 4, "stages": [1, 1], "conv": "patches"}, "bfloat16", "vmap"),
    ],
)
def test_image_workloads_forget_exactly(tmp_path, model, params, dtype, shard_exec):
    """The field's image recipes (BatchNorm, augmentation keyed by seed/shard/slice/step, bf16
    compute, dropout) forget bit for bit: every retrained row equals training from scratch."""
    ds = sj.load_dataset("cifar_synthetic", n_train=96, n_test=16)
    cfg = sj.RunConfig(
        model=sj.ModelConfig(name=model, hidden=(), params=params, compute_dtype=dtype),
        optim=sj.OptimConfig(
            name="sgd", learning_rate=0.05, momentum=0.9, augment="crop_flip", augment_pad=2
        ),
        sisa=sj.SisaConfig(
            shards=2, slices=2, epochs=1, batch_size=8, chunk_steps=4, shard_exec=shard_exec
        ),
    )
    run, _ = sj.train(cfg, ds, tmp_path / "a")
    assert run.final_states().model_state  # BatchNorm statistics are part of the state
    gone = run.partition.shard_ids(0)[-2:]
    report = sj.forget(run, gone)
    assert report.restart
    scratch, _ = sj.train(cfg, without(ds, gone), tmp_path / "b")
    for j in range(cfg.sisa.slices):
        for k in range(cfg.sisa.shards):
            assert_trees_equal(run.read_row(k, j), scratch.read_row(k, j))


def test_gpu_flags_do_not_make_a_cpu_process_another_host():
    """``import sisajax`` adds XLA's GPU determinism flags everywhere; on a CPU they change no
    code, so a process that imported jax first (no flags) is the same host for bit-identity."""
    from sisajax.host import code_flags

    flags = " ".join([*GPU_DETERMINISM_FLAGS, "--xla_cpu_max_isa=SSE4_2"])
    assert code_flags(flags, backend="cpu") == ["--xla_cpu_max_isa=SSE4_2"]
    assert code_flags(flags, backend="gpu") == sorted(flags.split())
