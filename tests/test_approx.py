"""Approximate-unlearning baselines: each method runs, changes the model, counts its cost
exactly, is a function of its key, and moves the model the expected way; Newton removal matches
retraining an L2-regularised linear model; the SISA helper changes only the shards that held
forget ids; the forget-set builders return the right ids."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sisajax import approx
from sisajax.approx.common import Budget, ce, rows, sgd_loop

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
        assert method.name == name and isinstance(hp, method.hparams)
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
