"""The Bayes-optimal accuracy of the Purchase-shaped generator: its class-conditional model is
regenerated from the seed, the exact posterior is computed per test example, and the ceiling is
stored and printed by the ``accuracy`` experiment."""

from __future__ import annotations

import numpy as np
import pytest

from sisajax.cli.app import compose
from sisajax.data import synthetic as D
from sisajax.experiments import paper

# a small, hard variant: 10 classes, 2 baskets each, classes of a group share 5 items
HARD = {
    "n_train": 3000,
    "n_test": 2000,
    "num_features": 100,
    "num_classes": 10,
    "items_per_prototype": 20,
    "keep_prob": 0.5,
    "noise_prob": 0.15,
    "modes": 2,
    "groups": 2,
    "shared_items": 5,
    "seed": 3,
}


def _naive_bayes_accuracy(x: np.ndarray, y: np.ndarray, probs: np.ndarray) -> float:
    """The same ceiling, one example at a time (log-likelihood per class and mode, log-sum-exp
    over modes, ties split evenly), for probabilities strictly inside (0, 1)."""
    credit = 0.0
    for xi, yi in zip(x.astype(np.float64), y, strict=True):
        ll = (xi * np.log(probs) + (1 - xi) * np.log(1 - probs)).sum(-1)  # [C, M]
        top = ll.max(1, keepdims=True)
        post = top[:, 0] + np.log(np.exp(ll - top).sum(1))
        winners = np.flatnonzero(post >= post.max() - 1e-9 * max(1.0, abs(post.max())))
        credit += (yi in winners) / len(winners)
    return credit / len(x)


def test_class_conditionals_are_the_generators():
    for params in (dict(HARD, n_train=20_000), dict(HARD, n_train=20_000, modes=1, shared_items=0)):
        ds = D.make_purchase_synthetic(**params)
        probs = D.purchase_class_conditionals(**params)
        assert probs.shape == (10, params["modes"], 100)
        assert set(np.unique(probs)) == {params["keep_prob"], params["noise_prob"]}
        for c in range(10):  # class means match the mixture's (modes are uniform)
            emp = ds.x_train[ds.y_train == c].mean(0)
            np.testing.assert_allclose(emp, probs[c].mean(0), atol=0.06)


def test_exact_posterior_matches_a_naive_computation():
    params = dict(HARD, n_test=300)
    ds = D.make_purchase_synthetic(**params)
    probs = D.purchase_class_conditionals(**params)
    want = _naive_bayes_accuracy(ds.x_test, ds.y_test, probs)
    assert D.bayes_accuracy("purchase_synthetic", **params) == pytest.approx(want, abs=1e-12)
    assert D.bernoulli_mixture_bayes_accuracy(ds.x_test, ds.y_test, probs, chunk=7) == (
        pytest.approx(want, abs=1e-12)
    )


def test_noise_free_prototypes_give_one_and_noise_lowers_the_ceiling():
    for modes, shared in ((1, 0), (3, 5)):
        clean = dict(HARD, keep_prob=1.0, noise_prob=0.0, modes=modes, shared_items=shared)
        assert D.bayes_accuracy("purchase_synthetic", **clean) == 1.0
    ceilings = [
        D.bayes_accuracy("purchase_synthetic", **dict(HARD, noise_prob=p))
        for p in (0.0, 0.1, 0.2, 0.3)
    ]
    assert ceilings == sorted(ceilings, reverse=True) and ceilings[-1] < 0.6 < ceilings[0]
    assert D.bayes_accuracy("purchase_synthetic", n_train=10, n_test=500) == 1.0  # the defaults


def test_bayes_beats_a_trained_model_on_the_same_split():
    from sklearn.linear_model import LogisticRegression
    from sklearn.naive_bayes import BernoulliNB

    ds = D.make_purchase_synthetic(**HARD)
    ceiling = D.bayes_accuracy("purchase_synthetic", **HARD)
    assert 0.7 < ceiling < 0.95
    for model in (BernoulliNB(), LogisticRegression(C=0.1, max_iter=300)):
        trained = model.fit(ds.x_train, ds.y_train).score(ds.x_test, ds.y_test)
        assert ceiling >= trained, (model, trained, ceiling)


def test_unknown_generators_and_bad_parameters_are_refused():
    assert D.has_bayes_accuracy("purchase_synthetic") and not D.has_bayes_accuracy("digits")
    for name in ("digits", "cifar_synthetic"):
        with pytest.raises(D.DataError, match="no Bayes-optimal accuracy"):
            D.bayes_accuracy(name)
    with pytest.raises(D.DataError, match="bad parameters"):
        D.bayes_accuracy("purchase_synthetic", colour=3)
    with pytest.raises(D.DataError, match="shared_items"):
        D.bayes_accuracy("purchase_synthetic", shared_items=100)


def test_accuracy_experiment_stores_and_reports_the_ceiling(tmp_path, capsys):
    cfg = compose(
        "paper",
        [
            "experiment=accuracy_purchase",
            "data=purchase_synthetic",
            "experiment.shards=[1]",
            "experiment.deletions=0",
            "sisa.slices=1",
            "sisa.epochs=1",
            "sisa.batch_size=64",
            "sisa.chunk_steps=32",
        ],
    )
    cfg["data"]["params"] = dict(HARD)
    cfg["model"]["hidden"] = [16]
    cfg["experiment"].update(recipes={"baseline": {}}, deletion_recipe="baseline")
    res = paper.run_experiment(cfg, out_dir=tmp_path)
    want = D.bayes_accuracy("purchase_synthetic", **HARD)
    assert res["bayes_accuracy"] == pytest.approx(want)
    assert f"is {want:.4f}" in capsys.readouterr().out  # printed next to the run's accuracy
    report = (tmp_path / "report.md").read_text()
    assert "Bayes-optimal (the generator's own model) | " + f"{want:.4f}" in report
    assert "below Bayes" in report
    assert all(r["vote"] <= want + 0.02 for r in res["rows"])
