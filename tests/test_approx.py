"""Approximate-unlearning baselines: each method runs, changes the model, counts its cost
exactly, is a function of its key, and moves the model the expected way; Newton removal matches
retraining an L2-regularised linear model; the SISA helper changes only the shards that held
forget ids; the forget-set builders return the right ids."""

from __future__ import annotations

import dataclasses
import hashlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config, tiny_digits

import sisajax as sj
from sisajax import approx
from sisajax.approx import forget_sets as fs
from sisajax.approx import sisa as approx_sisa
from sisajax.approx.common import Budget, ce, rows, sgd_loop
from sisajax.approx.newton import NewtonParams, fit_l2, l2_objective, linear_apply

FORGET_CLASS = 3
BUDGET = Budget(steps=20, batch_size=16, forget_batch_size=8)


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(jnp.tanh(nn.Dense(32)(x)))


_MODEL = _MLP()


def apply_mlp(params, ctx, x):
    return _MODEL.apply({"params": params}, x)


@pytest.fixture(scope="module")
def trained():
    """A small MLP trained on 400 digits rows; the forget set is every row of one class."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data[:400] / 16.0).astype(np.float32)
    y = d.target[:400].astype(np.int32)
    params = _MODEL.init(jax.random.PRNGKey(0), x[:1])["params"]
    data = rows(x, y)

    def loss(p, t, k):
        idx = jax.random.randint(k, (32,), 0, len(y))
        return ce(apply_mlp(p, None, data.x[idx]), data.y[idx])

    params = jax.jit(lambda p: sgd_loop(loss, p, 600, jax.random.PRNGKey(1), 0.1, 0.9))(params)
    hit = y == FORGET_CLASS
    return params, rows(x[hit], y[hit]), rows(x[~hit], y[~hit])


def _differ(a, b) -> bool:
    return any(not np.array_equal(u, v) for u, v in zip(*map(jax.tree.leaves, (a, b)), strict=True))


def _loss(params, r) -> float:
    return float(ce(apply_mlp(params, None, r.x), r.y))


def _acc(params, r) -> float:
    return float(np.mean(np.asarray(apply_mlp(params, None, r.x)).argmax(-1) == np.asarray(r.y)))


def expected_cost(name: str, n_forget: int, n_retain: int) -> approx.ApproxCost:
    s, b, fb = BUDGET.steps, BUDGET.batch_size, BUDGET.forget_batch_size
    if name in ("ft", "l1_sparse"):
        return approx.ApproxCost(s * b, s)
    if name == "neggrad_plus":
        return approx.ApproxCost(s * (b + fb), s)
    if name == "salun":
        return approx.ApproxCost(n_forget + s * (b + fb), s)
    if name == "ssd":
        return approx.ApproxCost(2 * n_forget + n_retain, 0)
    assert name == "scrub"  # max steps 0, 1 and 10, 11 (period 10, 2 per period, 2 rounds)
    rows_ = 4 * fb + (s - 4) * b
    return approx.ApproxCost(rows_, s, rows_)


TRAINED_METHODS = ["ft", "neggrad_plus", "scrub", "salun", "ssd", "l1_sparse"]


@pytest.mark.parametrize("name", TRAINED_METHODS)
def test_method_runs_counts_and_is_deterministic(trained, name):
    params, forget, retain = trained
    method, _, hp = approx.load_config(name)
    key = jax.random.PRNGKey(7)
    new, cost = method.run(apply_mlp, params, forget, retain, BUDGET, hp, key)
    assert _differ(params, new)
    n_f, n_r = int(forget.n), int(retain.n)
    assert cost == expected_cost(name, n_f, n_r)
    again, cost2 = method.run(apply_mlp, params, forget, retain, BUDGET, hp, key)
    assert not _differ(new, again) and cost2 == cost
    other, _ = method.run(apply_mlp, params, forget, retain, BUDGET, hp, jax.random.PRNGKey(8))
    assert _differ(new, other)


def test_registry_and_configs_agree():
    from pathlib import Path

    folder = Path(approx.config_file("ft")).parent
    assert {p.stem for p in folder.glob("*.yaml")} == set(approx.METHODS)
    for name in approx.METHODS:
        method, budget, hp = approx.load_config(name)
        assert method.name == name and hp == method.hparams()  # the file's = the code's
        assert isinstance(budget, Budget)
    _, budget, hp = approx.load_config("ft", budget={"steps": 3}, hparams={"lr": 0.5})
    assert budget.steps == 3 and budget.batch_size == 32 and hp.lr == 0.5
    with pytest.raises(ValueError, match="unknown unlearning method"):
        approx.get_method("nope")
    with pytest.raises(ValueError, match="lr_typo"):
        approx.load_config("ft", hparams={"lr_typo": 1})
    with pytest.raises(ValueError, match="steps"):
        approx.common.check_budget(Budget(steps=-1))
    with pytest.raises(TypeError, match="FTParams"):
        approx.get_method("ft").run(apply_mlp, {}, None, None, BUDGET, approx.ssd.SSDParams(), None)


def test_neggrad_plus_raises_the_forget_loss(trained):
    params, forget, retain = trained
    method, _, hp = approx.load_config("neggrad_plus")
    key = jax.random.PRNGKey(0)
    new, _ = method.run(apply_mlp, params, forget, retain, Budget(50, 32, 32), hp, key)
    ft, _ = approx.get_method("ft").run(
        apply_mlp, params, forget, retain, Budget(50, 32, 32), approx.ft.FTParams(), key
    )
    assert _loss(new, forget) > _loss(params, forget)
    assert _loss(new, forget) > _loss(ft, forget)
    assert _acc(new, retain) > 0.8


def test_scrub_moves_away_from_the_teacher_on_the_forget_set(trained):
    params, forget, retain = trained
    method, _, hp = approx.load_config("scrub")
    hp = dataclasses.replace(hp, max_per_period=5, max_rounds=4)
    new, _ = method.run(
        apply_mlp, params, forget, retain, Budget(40, 32, 32), hp, jax.random.PRNGKey(0)
    )
    assert _loss(new, forget) > _loss(params, forget)
    assert _acc(new, retain) > 0.8


def test_salun_updates_only_salient_weights_and_forgets(trained):
    params, forget, retain = trained
    method, _, hp = approx.load_config("salun")
    new, _ = method.run(
        apply_mlp, params, forget, retain, Budget(50, 32, 32), hp, jax.random.PRNGKey(0)
    )
    changed = sum(
        int(np.sum(np.asarray(a) != np.asarray(b)))
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new), strict=True)
    )
    total = sum(a.size for a in jax.tree.leaves(params))
    assert 0 < changed <= int(round(hp.fraction * total)) + 1
    assert _acc(new, forget) < 0.5 < _acc(params, forget)


def test_ssd_dampens_toward_zero(trained):
    params, forget, retain = trained
    method, budget, hp = approx.load_config("ssd")
    new, _ = method.run(apply_mlp, params, forget, retain, budget, hp, jax.random.PRNGKey(0))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert np.all(np.abs(b) <= np.abs(a)) and np.all(np.sign(b) * np.sign(a) >= 0)
    assert _loss(new, forget) >= _loss(params, forget)


def test_l1_sparse_shrinks_the_l1_norm_against_plain_fine_tuning(trained):
    params, forget, retain = trained
    key = jax.random.PRNGKey(3)
    _, budget, hp = approx.load_config("l1_sparse")
    l1 = approx.get_method("l1_sparse")
    sparse, _ = l1.run(
        apply_mlp, params, forget, retain, budget, dataclasses.replace(hp, gamma=1e-2), key
    )
    plain, _ = l1.run(
        apply_mlp, params, forget, retain, budget, dataclasses.replace(hp, gamma=0.0), key
    )
    ft, _ = approx.get_method("ft").run(
        apply_mlp, params, forget, retain, budget, approx.ft.FTParams(hp.lr, hp.momentum), key
    )
    assert not _differ(plain, ft)  # gamma 0 is FT, batch for batch

    def norm(p):
        return sum(float(jnp.sum(jnp.abs(a))) for a in jax.tree.leaves(p))

    assert norm(sparse) < norm(plain)


def _linear_problem(n: int = 300, n_forget: int = 10):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data[:n] / 16.0).astype(np.float32)
    y = d.target[:n].astype(np.int32)
    drop = np.zeros(n, bool)
    drop[np.asarray(jax.random.permutation(jax.random.PRNGKey(5), n))[:n_forget]] = True
    return x, y, drop


def test_newton_removal_matches_retraining_the_l2_linear_model():
    l2 = 1e-3
    x, y, drop = _linear_problem()
    zero = {"kernel": jnp.zeros((64, 10)), "bias": jnp.zeros(10)}
    full, forget, retain = rows(x, y), rows(x[drop], y[drop]), rows(x[~drop], y[~drop])
    w_star = fit_l2(linear_apply, zero, full, l2)
    grad = jax.grad(lambda p: l2_objective(linear_apply, p, None, full, l2))(w_star)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grad)) < 1e-5  # converged
    w_retrain = fit_l2(linear_apply, zero, retain, l2)
    removal = approx.get_method("newton")
    w_new, cost = removal.run(
        linear_apply, w_star, forget, retain, Budget(), NewtonParams(l2), jax.random.PRNGKey(0)
    )
    assert cost == approx.ApproxCost(int((~drop).sum()), 1)

    def dist(a, b):
        return float(
            jnp.sqrt(
                sum(
                    jnp.sum(jnp.square(u - v))
                    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
                )
            )
        )

    scale = dist(w_retrain, zero)
    before, after = dist(w_star, w_retrain), dist(w_new, w_retrain)
    assert after < 1e-2 * scale
    assert after < 0.05 * before


def test_forget_set_builders():
    ids = np.arange(100, 160)
    y = np.arange(60) % 4
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)

    r = fs.random_ids(ids, 7, k1)
    assert len(r) == 7 == len(set(r)) and set(r) <= set(ids)
    assert np.array_equal(r, fs.random_ids(ids, 7, k1))
    assert not np.array_equal(r, fs.random_ids(ids, 7, k2))

    assert np.array_equal(fs.class_ids(ids, y, 2), ids[y == 2])
    cls, got = fs.random_class_ids(ids, y, k1)
    assert np.array_equal(got, ids[y == cls])
    classes = {fs.random_class_ids(ids, y, jax.random.PRNGKey(s))[0] for s in range(12)}
    assert len(classes) > 1

    feats = np.random.default_rng(0).normal(size=(60, 2, 3))
    centre, near = fs.subpopulation_ids(ids, feats, 5, k1)
    assert len(near) == 5 and centre in near
    flat = feats.reshape(60, -1)
    d = np.sum((flat - flat[ids == centre]) ** 2, axis=1)
    inside = np.isin(ids, near)
    assert d[inside].max() <= d[~inside].min()
    assert not np.array_equal(near, fs.subpopulation_ids(ids, feats, 5, k2)[1])

    canaries, labels = fs.mislabelled_canaries(ids, y, 6, 4, k1)
    assert len(set(canaries)) == 6 and set(canaries) <= set(ids)
    old = y[np.searchsorted(ids, canaries)]
    assert np.all(labels != old) and np.all((labels >= 0) & (labels < 4))
    assert not np.array_equal(canaries, fs.mislabelled_canaries(ids, y, 6, 4, k2)[0])
    y2 = fs.relabel(ids, y, canaries, labels)
    changed = ids[y2 != y]
    assert np.array_equal(np.sort(changed), np.sort(canaries))
    assert np.array_equal(y2[np.searchsorted(ids, canaries)], labels)
    with pytest.raises(ValueError):
        fs.random_ids(ids, 61, k1)


def _tree_digest(tree) -> str:
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()


def _dir_digest(path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.suffix != ".lock"  # readers take a lock file
    }


@pytest.fixture(scope="module")
def sisa_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("approx-run") / "run"
    run, _ = sj.train(tiny_config(), tiny_digits(), path)
    return run


@pytest.mark.parametrize("name", ["neggrad_plus", "ssd"])
def test_sisa_constituents_only_affected_shards_change(sisa_run, name):
    run = sisa_run
    before = _dir_digest(run.run_dir)
    states = run.final_states()
    ids0 = run.shard_data(0).ids
    ids2 = run.shard_data(2).ids
    forget = np.concatenate([ids0[:3], ids2[:2]])
    method, _, hp = approx.load_config(name)
    key = jax.random.PRNGKey(4)
    res = approx_sisa.unlearn_constituents(run, forget, method, BUDGET, hp, key)
    assert res.shards == [0, 2] and res.active.all()
    for k in range(run.num_shards):
        old = jax.tree.map(lambda a, k=k: a[k], states.params)
        new = jax.tree.map(lambda a, k=k: a[k], res.states.params)
        assert _differ(old, new) == (k in (0, 2))
    n0, n2 = len(ids0), len(ids2)
    expected = method.cost(BUDGET, hp, 3, n0 - 3) + method.cost(BUDGET, hp, 2, n2 - 2)
    assert res.cost == expected and res.cost.models == 2
    # shard 0 alone, as one model, gives the same weights (its own key: fold_in(key, 0))
    d = run.shard_data(0)
    alone, _ = method.run(
        approx_sisa.model_apply(run.engine.spec),
        jax.tree.map(lambda a: a[0], states.params),
        rows(d.x[:3], d.y[:3]),
        rows(d.x[3:], d.y[3:]),
        BUDGET,
        hp,
        jax.random.fold_in(key, 0),
        ctx=jax.tree.map(lambda a: a[0], dict(states.model_state)),
    )
    got = jax.tree.map(lambda a: a[0], res.states.params)
    for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    mapped = approx_sisa.unlearn_constituents(run, forget, method, BUDGET, hp, key, "map")
    for a, b in zip(*map(jax.tree.leaves, (mapped.states, res.states)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    # deterministic, evaluable, and nothing written to the run directory
    again = approx_sisa.unlearn_constituents(run, forget, method, BUDGET, hp, key)
    assert _tree_digest(again.states) == _tree_digest(res.states)
    _, x_test, y_test = run.test_data()
    acc = approx_sisa.evaluate(run, res, x_test, y_test)
    assert 0.0 <= acc <= 1.0
    assert approx_sisa.constituent_logits(run, res, x_test).shape == (3, len(y_test), 10)
    assert _dir_digest(run.run_dir) == before
    none = approx_sisa.unlearn_constituents(run, [10**9], method, BUDGET, hp, key)
    assert none.shards == [] and none.cost.examples == 0


def test_the_unlearn_config_group_composes_with_hydra():
    from sisajax.cli.base import compose

    cfg = compose("train", ["+unlearn=scrub", "unlearn.hparams.lr=0.5", "unlearn.budget.steps=7"])
    method, budget, hp = approx.from_config(cfg["unlearn"])
    assert method.name == "scrub" and budget.steps == 7 and hp.lr == 0.5
    assert hp.temperature == approx.scrub.ScrubParams().temperature
