"""Image workloads: the CIFAR ResNet-18 and wide ResNet (BatchNorm that skips padding rows,
bfloat16 compute), crop + flip augmentation, the CIFAR-shaped generator and their configs.

Models run at tiny widths; most variables are filled from numpy (``jax.eval_shape`` gives the
structure) so no random-initialisation program has to be compiled.
"""

from __future__ import annotations

import dataclasses
import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from conftest import REPO

import sisajax as sj
from sisajax.augment import augment_batch, augment_kinds, crop_flip, crop_flip_params
from sisajax.config import ConfigError, DataConfig, ModelConfig, OptimConfig, run_config_from
from sisajax.data.datasets import DataError
from sisajax.data.synthetic import make_cifar_synthetic
from sisajax.models import build_model
from sisajax.resnets import PatchConv, conv2d

CONF = REPO / "conf"
TINY = {"resnet18": {"width": 4}, "wrn": {"depth": 10, "widen": 1}}


def _model(name: str, dtype: str = "float32", **params):
    return build_model(
        ModelConfig(name=name, params={**TINY[name], **params}, compute_dtype=dtype), 10
    )


def _images(b: int = 6, seed: int = 0, shape=(32, 32, 3)) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).random((b, *shape), dtype=np.float32))


def _variables(model, x: jnp.ndarray, seed: int = 0) -> dict:
    """The model's variables, He-scaled normal kernels from numpy; BatchNorm at identity."""
    keys = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
    shapes = jax.eval_shape(lambda: model.init(keys, x[:1]))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = path[-1].key
        if name in ("scale", "var"):
            return jnp.ones(s.shape, s.dtype)
        if name != "kernel":
            return jnp.zeros(s.shape, s.dtype)
        std = np.sqrt(2.0 / np.prod(s.shape[:-1]))
        return jnp.asarray(rng.normal(0.0, std, s.shape).astype(s.dtype))

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _train_apply(model):
    @jax.jit
    def f(variables, x, mask):
        return model.apply(variables, x, train=True, mask=mask, mutable=["batch_stats"])

    return f


def _has_op(hlo: str, *ops: str) -> bool:
    """Whether compiled HLO text has an instruction with one of these opcodes (not counting
    names and metadata, which quote function names)."""
    body = re.sub(r'metadata=\{[^}]*\}|"[^"]*"', "", hlo)
    return re.search(rf"\s({'|'.join(ops)})\(", body) is not None


def _bits(tree) -> list[bytes]:
    return [np.asarray(a).tobytes() for a in jax.tree.leaves(tree)]


# -- models ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "wrn"])
def test_model_returns_float32_logits_and_carries_batch_stats(name):
    model, x = _model(name), _images(4)
    v = _variables(model, x)
    assert {"params", "batch_stats"} == set(v)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(v))
    logits = jax.jit(model.apply)(v, x)
    assert logits.shape == (4, 10) and logits.dtype == jnp.float32
    out, new = _train_apply(model)(v, x, jnp.ones(4, bool))
    assert out.shape == (4, 10) and out.dtype == jnp.float32 and np.isfinite(out).all()
    assert jax.tree.structure(new["batch_stats"]) == jax.tree.structure(v["batch_stats"])


def test_grey_images_and_a_real_init():
    model = _model("resnet18", stages=[1])
    x = _images(2, shape=(32, 32))  # [B, H, W]: one channel
    v = jax.jit(lambda k: model.init(k, x))(jax.random.PRNGKey(0))
    assert v["params"]["Conv_0"]["kernel"].shape == (3, 3, 1, 4)
    assert all(a.dtype == jnp.float32 and np.isfinite(a).all() for a in jax.tree.leaves(v))
    assert model.apply(v, x).shape == (2, 10)


def test_full_size_architectures_have_the_standard_parameter_counts():
    x = jnp.zeros((1, 32, 32, 3))
    for cfg, count in (
        (ModelConfig(name="resnet18"), 11_173_962),  # the CIFAR ResNet-18
        (ModelConfig(name="wrn", params={"depth": 16, "widen": 4}), 2_748_890),  # WRN-16-4
    ):
        model = build_model(cfg, 10)
        shapes = jax.eval_shape(lambda m=model: m.init(jax.random.PRNGKey(0), x))
        assert sum(a.size for a in jax.tree.leaves(shapes["params"])) == count
        assert shapes["params"]["Dense_0"]["kernel"].shape[-1] == 10


@pytest.mark.parametrize(
    "name,allowed",
    [
        ("mlp", "dropout, input_dropout"),
        ("cnn", "features"),
        ("resnet18", "width, stages, conv"),
        ("wrn", "depth, widen, dropout, conv"),
    ],
)
def test_unknown_model_params_are_refused_naming_the_allowed_keys(name, allowed):
    with pytest.raises(ConfigError, match=f"model.params for {name} may set {allowed}; got"):
        build_model(ModelConfig(name=name, params={"widht": 8}), 10)


@pytest.mark.parametrize(
    "name,params,match",
    [
        ("wrn", {"depth": 15}, "6n \\+ 4"),
        ("wrn", {"widen": 0}, "widen must be an integer >= 1"),
        ("wrn", {"dropout": 1.0}, "dropout must be in"),
        ("resnet18", {"width": 2.5}, "width must be an integer"),
        ("resnet18", {"stages": []}, "stages must be a non-empty list"),
        ("resnet18", {"stages": [2, 0]}, "stages must be an integer >= 1"),
        ("cnn", {"features": "16"}, "features must be a non-empty list"),
        ("resnet18", {"conv": "im2col"}, "conv must be one of xla, patches"),
        ("wrn", {"conv": None}, "conv must be one of xla, patches"),
    ],
)
def test_bad_model_param_values_are_refused(name, params, match):
    with pytest.raises(ConfigError, match=match):
        build_model(ModelConfig(name=name, params=params), 10)


@pytest.mark.parametrize("name", ["resnet18", "wrn"])
def test_batchnorm_statistics_skip_masked_rows(name):
    model = _model(name)
    x = _images(6)
    other = x.at[4:].set(_images(2, seed=1) * 50.0)  # only the masked-out rows change
    mask = jnp.array([True, True, True, True, False, False])
    v = _variables(model, x)
    f = _train_apply(model)
    out_a, st_a = f(v, x, mask)
    out_b, st_b = f(v, other, mask)
    assert _bits(st_a) == _bits(st_b)  # running statistics: bit for bit
    np.testing.assert_array_equal(out_a[:4], out_b[:4])  # the real rows' logits too
    # the statistics are those of the real rows alone (up to summation order) ...
    out_r, st_r = f(v, x[:4], jnp.ones(4, bool))
    for a, b in zip(jax.tree.leaves(st_a), jax.tree.leaves(st_r), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out_a[:4], out_r, rtol=1e-3, atol=1e-4)
    # ... and without the mask the padding rows would leak into them
    _, st_c = f(v, other, jnp.ones(6, bool))
    assert _bits(st_a) != _bits(st_c)


@pytest.mark.parametrize("name", ["resnet18", "wrn", "mlp", "cnn"])
def test_bfloat16_computes_in_bf16_with_float32_params_and_logits(name):
    x = _images(4)
    if name in TINY:
        f32, b16 = _model(name), _model(name, "bfloat16")
    else:
        cfgs = [
            ModelConfig(name=name, hidden=(16,), compute_dtype=d) for d in ("float32", "bfloat16")
        ]
        f32, b16 = (build_model(c, 10) for c in cfgs)
    v = _variables(f32, x)
    shapes = jax.eval_shape(lambda: b16.init(jax.random.PRNGKey(0), x[:1]))
    assert jax.tree.structure(shapes) == jax.tree.structure(v)
    assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(shapes))  # parameters stay f32
    jaxpr = str(jax.make_jaxpr(lambda v: b16.apply(v, x))(v))
    assert "bf16" in jaxpr and "bf16" not in str(jax.make_jaxpr(lambda v: f32.apply(v, x))(v))
    lo, hi = jax.jit(f32.apply)(v, x), jax.jit(b16.apply)(v, x)
    assert hi.dtype == jnp.float32 and hi.shape == (4, 10)
    scale = float(jnp.max(jnp.abs(lo))) + 1e-3
    assert float(jnp.max(jnp.abs(hi - lo))) < 0.1 * scale  # bf16 rounding, not another model


@pytest.mark.parametrize("name", ["resnet18", "wrn"])
def test_model_gradients_have_no_scatter_or_gather(name):
    model = _model(name, stages=[1, 1]) if name == "resnet18" else _model(name)
    x, y = _images(4), jnp.arange(4) % 10
    v = _variables(model, x)

    def loss(params):
        logits, _ = model.apply(
            {**v, "params": params}, x, train=True, mask=jnp.ones(4, bool), mutable=["batch_stats"]
        )
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.sum(jax.nn.one_hot(y, 10) * logits, -1))

    text = jax.jit(jax.grad(loss)).lower(v["params"]).as_text()  # StableHLO
    assert not re.search(r"stablehlo\.\w*(scatter|gather)", text)


# -- convolutions as patches x kernel ---------------------------------------------------------


@pytest.mark.parametrize(
    ("kernel", "strides", "hw"), [(3, 1, (8, 8)), (3, 2, (8, 8)), (3, 2, (7, 9)), (1, 2, (7, 7))]
)
def test_patch_convolution_computes_the_same_function_as_lax_conv(kernel, strides, hw):
    """Same kernel parameter, same output up to float32 summation order (odd sizes and strides
    included, where the padding arithmetic could slip by a row)."""
    x = _images(3, shape=(*hw, 5))
    ref = conv2d(6, kernel, strides, jnp.float32)
    v = ref.init(jax.random.PRNGKey(0), x)
    want = ref.apply(v, x)
    got = PatchConv(6, kernel, strides).apply(v, x)  # the same {"params": {"kernel": ...}}
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet18", "wrn"])
def test_patch_conv_networks_have_the_same_parameters_and_outputs(name):
    """``conv: patches`` changes how convolutions are computed, not the network: the parameter
    shapes are the same, and given the same values the logits agree up to rounding."""
    x = _images(4)
    xla, patches = _model(name), _model(name, conv="patches")
    v = _variables(xla, x)
    shapes = [a.shape for a in jax.tree.leaves(v)]
    vp = jax.eval_shape(lambda: patches.init(jax.random.PRNGKey(0), x[:1]))
    assert sorted(a.shape for a in jax.tree.leaves(vp)) == sorted(shapes)
    # the same values, matched by (module kind order, shape): rename Conv_i -> PatchConv_i
    renamed = _rename(v, "Conv_", "PatchConv_")
    assert jax.tree.structure(renamed) == jax.tree.structure(vp)
    want = jax.jit(xla.apply)(v, x)
    got = jax.jit(patches.apply)(renamed, x)
    scale = float(jnp.max(jnp.abs(want))) + 1e-3
    assert float(jnp.max(jnp.abs(got - want))) < 1e-4 * scale


def _rename(tree, old: str, new: str):
    if not isinstance(tree, dict):
        return tree
    return {
        (new + k[len(old) :] if k.startswith(old) else k): _rename(t, old, new)
        for k, t in tree.items()
    }


def test_vmapped_patch_conv_network_has_no_grouped_convolution():
    """Vmapped across shards (one kernel per shard), lax.conv becomes a grouped convolution
    (``feature_group_count`` = shards), a slow path on GPUs; with ``conv: patches`` the compiled
    forward and backward pass has no convolution at all, only (batched) matrix products. Read
    from the lowered program (before any backend's rewrites), so it holds on every machine."""
    x = _images(4)
    shards = 3

    def grad_program(model):
        v = _variables(model, x)
        vs = jax.tree.map(lambda a: jnp.stack([a] * shards), v)
        xs = jnp.stack([x] * shards)

        def loss(params, variables, xb):
            logits, _ = model.apply(
                {**variables, "params": params}, xb, train=True, mutable=["batch_stats"]
            )
            return jnp.sum(logits)

        g = jax.vmap(jax.grad(loss))
        return jax.jit(g).lower(vs["params"], vs, xs).as_text()  # StableHLO

    xla = grad_program(_model("resnet18", stages=[1, 1]))
    patches = grad_program(_model("resnet18", stages=[1, 1], conv="patches"))
    assert re.search(r"stablehlo\.convolution.*feature_group_count = 3", xla)  # what is avoided
    assert "stablehlo.convolution" not in patches
    assert re.search(r"stablehlo\.dot_general.*batching_dims = \[0\] x \[0\]", patches)


# -- augmentation ----------------------------------------------------------------------------


def _augment(x, key, pad=4):
    return augment_batch(x, key, kind="crop_flip", pad=pad)


def test_augment_kinds_match_the_config():
    assert augment_kinds() == ("none", "crop_flip")
    for kind in augment_kinds():
        assert OptimConfig(augment=kind).augment == kind
    with pytest.raises(ConfigError, match="one of none, crop_flip"):
        augment_batch(_images(2), jax.random.PRNGKey(0), kind="mixup", pad=4)
    with pytest.raises(ConfigError, match="pad must be an integer >= 0"):
        augment_batch(_images(2), jax.random.PRNGKey(0), kind="crop_flip", pad=-1)


def test_augment_none_is_the_identity():
    x = _images(3)
    assert augment_batch(x, jax.random.PRNGKey(0), kind="none", pad=4) is x


@pytest.mark.parametrize("shape", [(8, 32, 32, 3), (8, 28, 28)])
def test_crop_flip_keeps_shape_and_is_deterministic_per_key(shape):
    x = _images(shape[0], shape=shape[1:])
    f = jax.jit(_augment)
    a, b = f(x, jax.random.PRNGKey(3)), f(x, jax.random.PRNGKey(3))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    assert not np.array_equal(a, f(x, jax.random.PRNGKey(4)))
    # an example's augmentation depends only on its own image, key and position
    np.testing.assert_array_equal(f(x[:3], jax.random.PRNGKey(3)), a[:3])


def test_crop_flip_output_is_a_shifted_and_flipped_copy_of_the_input():
    pad, x = 4, _images(16)
    key = jax.random.PRNGKey(7)
    out = np.asarray(jax.jit(_augment)(x, key))
    xp = np.pad(np.asarray(x), [(0, 0), (pad, pad), (pad, pad), (0, 0)])
    dy, dx, flip = (np.asarray(a) for a in crop_flip_params(key, 16, pad))
    found = []
    for b in range(16):  # search every crop and flip: exactly the drawn one reproduces it
        hits = [
            (oy, ox, fl)
            for oy in range(2 * pad + 1)
            for ox in range(2 * pad + 1)
            for fl in (False, True)
            if np.array_equal(
                out[b], (lambda c: c[:, ::-1] if fl else c)(xp[b, oy : oy + 32, ox : ox + 32])
            )
        ]
        assert hits == [(dy[b], dx[b], flip[b])], (b, hits)
        found.append(hits[0])
    assert len({h[:2] for h in found}) > 1 and {h[2] for h in found} == {False, True}


def test_crop_flip_draws_cover_the_offsets_and_flip_half_the_time():
    dy, dx, flip = crop_flip_params(jax.random.PRNGKey(0), 4000, 3)
    for d in (dy, dx):
        counts = np.bincount(np.asarray(d), minlength=7)
        assert len(counts) == 7 and counts.min() > 400  # uniform over 0..6: ~571 each
    assert 0.45 < float(jnp.mean(flip)) < 0.55


def test_crop_flip_with_zero_padding_only_flips():
    x = _images(8)
    out = np.asarray(_augment(x, jax.random.PRNGKey(1), pad=0))
    xs = np.asarray(x)
    for b in range(8):
        assert np.array_equal(out[b], xs[b]) or np.array_equal(out[b], xs[b, :, ::-1])
    dy, dx, flip = crop_flip_params(jax.random.PRNGKey(1), 8, 0)
    assert not np.asarray(dy).any() and not np.asarray(dx).any()
    np.testing.assert_array_equal(out, crop_flip(x, dy, dx, flip, pad=0))


def test_crop_flip_compiles_without_scatter_or_conditional_and_vmaps_over_shards():
    x = _images(8)
    text = jax.jit(_augment).lower(x, jax.random.PRNGKey(0)).compile().as_text()
    assert _has_op(text, "pad", "gather") and not _has_op(text, "scatter", "conditional")
    xs = jnp.stack([x, x[::-1], x * 2])
    keys = jax.random.split(jax.random.PRNGKey(5), 3)
    per_shard = jax.jit(jax.vmap(_augment))
    vtext = per_shard.lower(xs, keys).compile().as_text()
    assert not _has_op(vtext, "scatter", "conditional")
    out = per_shard(xs, keys)
    for i in range(3):
        np.testing.assert_array_equal(out[i], _augment(xs[i], keys[i]))


# -- the CIFAR-shaped generator --------------------------------------------------------------


def test_cifar_synthetic_shapes_dtypes_and_preprocessing():
    ds = sj.load_dataset("cifar_synthetic", n_train=600, n_test=200)
    assert ds.x_train.shape == (600, 32, 32, 3) and ds.x_test.shape == (200, 32, 32, 3)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int32
    assert ds.train_ids.dtype == np.int64 and ds.num_classes == 10
    np.testing.assert_array_equal(ds.train_ids, np.arange(600))
    np.testing.assert_array_equal(ds.test_ids, np.arange(600, 800))
    assert ds.preprocessing == {"scale": 1.0 / 255.0}
    assert 60 < ds.x_train.mean() < 200 and ds.x_train.std() > 20  # uses the pixel range


def test_cifar_synthetic_is_seeded_and_ids_do_not_move():
    a = make_cifar_synthetic(n_train=500, n_test=100, seed=3)
    b = make_cifar_synthetic(n_train=500, n_test=100, seed=3)
    for f in ("x_train", "y_train", "x_test", "y_test"):
        assert getattr(a, f).tobytes() == getattr(b, f).tobytes()
    other = make_cifar_synthetic(n_train=500, n_test=100, seed=4)
    assert not np.array_equal(a.x_train, other.x_train)
    # an id's image does not depend on how many rows are generated
    small = make_cifar_synthetic(n_train=200, n_test=0, seed=3)
    np.testing.assert_array_equal(small.x_train, a.x_train[:200])
    np.testing.assert_array_equal(small.y_train, a.y_train[:200])
    with pytest.raises(DataError, match="n_train must be >= 1"):
        make_cifar_synthetic(n_train=0)


def test_cifar_synthetic_classes_are_balanced_and_learnable_but_not_trivial():
    ds = make_cifar_synthetic(n_train=5000, n_test=1000)
    counts = np.bincount(ds.y_train, minlength=10)
    assert counts.min() > 0.8 * counts.mean() and counts.max() < 1.2 * counts.mean()
    # nearest class mean on raw pixels: far above chance (0.1), far from solved
    x = ds.x_train.reshape(5000, -1).astype(np.float32)
    means = np.stack([x[ds.y_train == c].mean(0) for c in range(10)])
    xt = ds.x_test.reshape(1000, -1).astype(np.float32)
    d = (xt**2).sum(1)[:, None] - 2 * xt @ means.T + (means**2).sum(1)[None]
    acc = float(np.mean(d.argmin(1) == ds.y_test))
    assert 0.25 < acc < 0.8, acc


# -- configs ---------------------------------------------------------------------------------


def _yaml(rel: str) -> dict:
    return yaml.safe_load((CONF / rel).read_text())


@pytest.mark.parametrize(
    "rel,name,params",
    [
        ("model/resnet18.yaml", "resnet18", {"width": 64, "stages": [2, 2, 2, 2], "conv": "xla"}),
        ("model/wrn16_4.yaml", "wrn", {"depth": 16, "widen": 4, "dropout": 0.0, "conv": "xla"}),
    ],
)
def test_model_yaml_lists_every_model_key_and_builds(rel, name, params):
    d = _yaml(rel)
    assert set(d) == {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = ModelConfig(**d)
    assert cfg.name == name and cfg.params == params and cfg.compute_dtype == "float32"
    assert build_model(cfg, 10) is not None
    assert build_model(dataclasses.replace(cfg, compute_dtype="bfloat16"), 10) is not None


def test_cifar_synthetic_yaml_matches_the_generator_defaults_and_loads():
    cfg = DataConfig(**_yaml("data/cifar_synthetic.yaml"))
    assert cfg.name == "cifar_synthetic"
    defaults = {k: p.default for k, p in inspect.signature(make_cifar_synthetic).parameters.items()}
    assert cfg.params == defaults
    ds = sj.load_dataset(cfg.name, **{**cfg.params, "n_train": 64, "n_test": 16})
    assert ds.x_train.shape == (64, 32, 32, 3)


@pytest.mark.parametrize(
    "preset,data,model,augment",
    [
        ("shards_cifar10", "cifar10", "resnet18", "crop_flip"),
        ("shards_svhn", "svhn", "wrn", "none"),
    ],
)
def test_image_presets_compose_into_valid_configs(preset, data, model, augment):
    from sisajax.cli.app import compose
    from sisajax.experiments import common, paper

    text = (CONF / "experiment" / f"{preset}.yaml").read_text()
    assert text.startswith("# @package _global_")
    assert f"sisajax paper experiment={preset} data.params.path=" in text
    cfg = compose("paper", [f"experiment={preset}"])
    opts = common.options(cfg, paper.KINDS)
    assert opts["kind"] == "shards" and opts["name"] == preset
    rc = run_config_from(cfg)
    assert (rc.data.name, rc.model.name, rc.optim.augment) == (data, model, augment)
    assert rc.optim.name == "sgd" and rc.optim.momentum == 0.9 and rc.sisa.slices == 1
    assert build_model(rc.model, 10) is not None
    # the synthetic stand-in runs the same preset without data files
    alt = run_config_from(compose("paper", [f"experiment={preset}", "data=cifar_synthetic"]))
    assert alt.data.name == "cifar_synthetic" and alt.model == rc.model
