"""Membership inference: exact ROC metrics, attacks with signal, the tiny experiment end to end."""

import csv
import json

import numpy as np
import pytest
from conftest import tiny_digits
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

import sisajax as sj
from sisajax.cli.app import compose
from sisajax.experiments.mia import DEFAULTS, run_mia_experiment
from sisajax.mia import (
    Population,
    auc_score,
    balanced_halves,
    evaluate_attack,
    lira_scores,
    loss_score,
    prob_scaled_logit,
    roc_curve,
    scaled_logit,
    tpr_at_fpr,
    train_shadows,
)


@pytest.mark.parametrize("seed", range(6))
def test_auc_and_roc_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    # half the cases with heavy ties
    scores = rng.integers(0, 6, n).astype(float) if seed % 2 else rng.normal(size=n)
    truth = rng.random(n) < rng.uniform(0.1, 0.9)
    truth[:2] = [True, False]
    assert auc_score(scores, truth) == pytest.approx(roc_auc_score(truth, scores), abs=1e-12)
    fpr, tpr, _ = roc_curve(scores, truth)
    sk_fpr, sk_tpr, _ = sk_roc_curve(truth, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auc_score(scores, truth), abs=1e-12)


def test_tpr_at_low_fpr_is_read_exactly_from_the_roc():
    members = np.array([10.0, 9.0, 8.0, 3.0])
    nonmembers = np.array([8.5, 5.0, 1.0, 0.0] + [-1.0] * 96)  # 100 non-members
    r = evaluate_attack(members, nonmembers, fprs=(0.01, 0.001, 0.02))
    # FPR 0 admits 10 and 9 (TPR 1/2); one false positive (8.5) admits 8 (TPR 3/4); two (5.0)
    # admit 3 (TPR 1)
    assert r.tpr_at == {0.01: 0.75, 0.001: 0.5, 0.02: 1.0}
    assert tpr_at_fpr(r.fpr, r.tpr, 0.0) == 0.5
    assert r.auc == pytest.approx((100 + 100 + 99 + 98) / 400)
    assert r.n_members == 4 and r.n_nonmembers == 100
    with pytest.raises(ValueError):
        evaluate_attack(members, [])


def test_scaled_logit_is_stable_and_correct():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7, 5))
    y = rng.integers(0, 5, 7)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    py = np.take_along_axis(p, np.broadcast_to(y, (3, 7))[..., None], -1)[..., 0]
    np.testing.assert_allclose(scaled_logit(logits, y), np.log(py / (1 - py)), rtol=1e-10)
    np.testing.assert_allclose(prob_scaled_logit(p, y), np.log(py / (1 - py)), rtol=1e-8)
    np.testing.assert_allclose(loss_score(logits, y), np.log(py), rtol=1e-10)
    extreme = np.array([[80.0, 0.0, -5.0], [0.0, 90.0, 0.0]])
    phi = scaled_logit(extreme, np.array([0, 0]))
    assert (
        np.all(np.isfinite(phi))
        and phi[0] == pytest.approx(80.0 - np.log1p(np.exp(-5.0)))
        and phi[1] == pytest.approx(-90.0)
    )


def test_lira_uses_per_example_calibration():
    """Examples differ in difficulty (their OUT mean); membership shifts phi by +1.5. LiRA
    calibrates per example and beats a global threshold on phi."""
    rng = np.random.default_rng(1)
    m, n_shadow = 400, 16
    difficulty = rng.normal(0, 4, m)
    inn = balanced_halves(n_shadow, m, seed=0)
    shadow_phi = difficulty + 1.5 * inn + rng.normal(0, 0.5, (n_shadow, m))
    truth = rng.random(m) < 0.5
    target = difficulty + 1.5 * truth + rng.normal(0, 0.5, m)
    base = auc_score(target, truth)
    online = auc_score(lira_scores(target, shadow_phi, inn), truth)
    offline = auc_score(lira_scores(target, shadow_phi, inn, online=False), truth)
    per_ex = auc_score(lira_scores(target, shadow_phi, inn, fix_variance=False), truth)
    assert base < 0.7 and online > 0.9 and offline > 0.9 and per_ex > 0.85
    # no IN shadow for an example: still a finite score (shifted OUT mean)
    inn[:, 0] = False
    assert np.isfinite(lira_scores(target, shadow_phi, inn)).all()


def test_balanced_halves():
    inn = balanced_halves(8, 50, seed=3)
    assert inn.shape == (8, 50) and (inn.sum(0) == 4).all()
    assert not np.array_equal(inn, balanced_halves(8, 50, seed=4))


def test_loss_attack_finds_members_of_an_overfit_model(tmp_path):
    ds = tiny_digits(60, 200)
    cfg = sj.RunConfig(
        model=sj.ModelConfig(hidden=(32,)),
        optim=sj.OptimConfig(learning_rate=0.3),
        sisa=sj.SisaConfig(shards=1, slices=1, epochs=40, batch_size=8, chunk_steps=64),
    )
    run, _ = sj.train(cfg, ds, tmp_path / "run")
    members = loss_score(run.logits(ds.x_train)[0], ds.y_train)
    nonmembers = loss_score(run.logits(ds.x_test)[0], ds.y_test)
    r = evaluate_attack(members, nonmembers)
    assert r.auc > 0.7 and r.auc > 0.5 + 4 * r.auc_null_sd


def test_train_shadows_records_membership():
    ds = tiny_digits(120, 40)
    pop = Population(
        np.r_[ds.train_ids, ds.test_ids],
        np.r_[ds.x_train, ds.x_test],
        np.r_[ds.y_train, ds.y_test].astype(np.int32),
    )
    cfg = sj.RunConfig(
        model=sj.ModelConfig(hidden=(16,)),
        sisa=sj.SisaConfig(shards=2, slices=2, epochs=30, batch_size=8, chunk_steps=64),
    )
    sh = train_shadows(cfg, pop, 10, num_ensembles=4, seed=0)
    p = len(pop.ids)
    assert sh.logits.shape == (8, p, 10) and np.isfinite(sh.logits).all()
    assert (sh.ensemble_member.sum(0) == 2).all()
    per_ens = sh.member.reshape(4, 2, p)
    # an example in ensemble e's half is in exactly one of its constituents, else in none
    np.testing.assert_array_equal(per_ens.sum(1), sh.ensemble_member)
    phi = sh.constituent_phi(pop.y)
    assert phi[sh.member].mean() > phi[~sh.member].mean() + 0.5  # training raised confidence
    assert sh.ensemble_phi(pop.y).shape == (4, p)


def test_preset_matches_defaults():
    cfg = compose("mia", [])
    assert cfg["mia"] == DEFAULTS


TINY = [
    "mia.max_train=240",
    "mia.max_test=100",
    "mia.num_random=12",
    "mia.num_mislabelled=10",
    "mia.shadow_ensembles=2",
    "mia.shadow_single=2",
    "sisa.shards=2",
    "sisa.slices=2",
    "sisa.epochs=2",
    "model.hidden=[16]",
]


@pytest.mark.slow
def test_tiny_experiment_end_to_end(tmp_path):
    out = tmp_path / "mia"
    summary = run_mia_experiment(compose("mia", [f"mia.out_dir={out}", *TINY]))
    for name in ("results.json", "results.csv", "results.md", "roc.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())
    assert saved["verify"]["ok"] is True
    assert saved["forget_sets"] == {
        "random": {"members": 12, "nonmembers": (240 + 100) // 2 - 10},
        "mislabelled": {"members": 10, "nonmembers": 10},
    }
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    # 2 SISA scenarios x 2 levels + the full retrain's single model, x 2 sets x 3 attacks
    assert len(rows) == (2 * 2 + 1) * 2 * 3 == len(saved["results"])
    for r in rows:
        assert 0.0 <= float(r["auc"]) <= 1.0
    assert len(saved["forget"]["ids"]) == 22
    # the forgotten ids are gone from the SISA run and from the full retrain
    run = sj.open_run(out / "sisa")
    assert not np.isin(saved["forget"]["ids"], run.partition.ids).any()
    # every other member was trained on (the data preset's validation split is not held out)
    assert run.config.data.val_fraction == 0.0 and not run.has_validation
    assert len(run.partition.ids) + len(saved["forget"]["ids"]) == (240 + 100) // 2
    assert "(b) after forget" in summary["markdown"]


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
DOC = REPO / "docs/forgetting-evidence.md"
STORED = [REPO / f"docs/mia/seed{s}" for s in range(5)]


def test_the_documented_mia_tables_are_what_the_stored_runs_give():
    # docs/forgetting-evidence.md's seed-0 and 5-seed tables (and the numbers under them) are
    # rendered from docs/mia/seed*/results.json, never typed: editing a number by hand, or
    # rerunning a seed without regenerating the document, fails here. Regenerate with
    # python -m sisajax.experiments.mia docs/forgetting-evidence.md docs/mia/seed{0,1,2,3,4}
    from sisajax.experiments import mia

    runs = mia.load_results(STORED)
    assert [r["mia"]["seed"] for r in runs] == list(range(5))
    assert [r["config"]["sisa"]["seed"] for r in runs] == list(range(5))  # `seed=s`
    assert all(r["verify"]["ok"] for r in runs)
    text = DOC.read_text()
    assert mia.render_doc(text, runs) == text
    assert mia.main(["--check", str(DOC), *map(str, STORED)]) == 0


def test_a_stale_mia_block_is_caught_and_rewritten(tmp_path):
    from sisajax.experiments import mia

    doc = tmp_path / "doc.md"
    doc.write_text(
        f"intro\n{mia.SEED0_BEGIN}\n| 0.999 | typed |\n{mia.SEED0_END}\n"
        f"mid\n{mia.SEEDS_BEGIN}\n{mia.SEEDS_END}\nafter\n"
    )
    args = [str(doc), *map(str, STORED)]
    assert mia.main(["--check", *args]) == 1
    assert mia.main(args) == 0
    text = doc.read_text()
    assert "typed" not in text and text.startswith("intro\n") and text.endswith("after\n")
    assert mia.seed_block(mia.load_results(STORED[:1])[0]) in text
    assert mia.main(["--check", *args]) == 0
    with pytest.raises(ValueError, match="markers"):
        mia.render_doc("no markers", mia.load_results(STORED[:1]))
