"""The ``unlearning`` study at tiny size: exact and approximate unlearning scored against the
oracle of the same configuration, methods tuned on a separate forget set, every trial stored."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sisajax.cli.app import compose
from sisajax.experiments import paper, unlearning

pytestmark = pytest.mark.slow

TINY = [
    "experiment=unlearning",
    "experiment.num_models=4",
    "experiment.forget_sets=[random,canaries]",
    "experiment.forget_size=4",
    "experiment.methods=[ft,ssd]",
    "experiment.sisa=[[3,2]]",
    "experiment.retain_eval=200",
    "sisa.epochs=2",
    "sisa.batch_size=32",
    "sisa.chunk_steps=32",
]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("unlearning")
    cfg = compose("paper", TINY)
    cfg["model"]["hidden"] = [8]
    cfg["experiment"]["tune"] = {"ft": {"lr": [0.001, 0.05]}, "ssd": {"alpha": [1.0, 10.0]}}
    paper.run_experiment(cfg, out_dir=out)
    return json.loads((out / "results.json").read_text()), out


def test_every_method_and_sisa_is_scored_beside_the_floor(study):
    res, out = study
    methods = {"none", "retrain", "ft", "ssd", "SISA S=3 R=2"}
    for kind in ("random", "canaries"):
        rows = {r["method"]: r for r in res["rows"] if r["forget_set"] == kind}
        assert set(rows) == methods
        for r in rows.values():
            assert r["forget_ids"] == 4 and 0 < r["F"] <= 1 and r["F_lo"] <= r["F"] <= r["F_hi"]
            assert 0 <= r["ulira"] <= 1 and r["klom"] >= 0
        # the exact single-model baseline is a third oracle draw, scored like any method
        # against the oracle, beside the floor (a second draw): not the floor itself
        assert rows["retrain"]["floor_klom"] == rows["none"]["floor_klom"]  # the same floor
        assert rows["retrain"]["klom"] != rows["retrain"]["floor_klom"]  # another population
        assert rows["none"]["examples"] == 0
        assert rows["ft"]["examples"] == rows["ft"]["grad_steps"] * 32  # budget: 32 rows a step
        sisa = rows["SISA S=3 R=2"]
        assert (
            sisa["verified_shards"] >= 1 and 0 < sisa["examples"] <= sisa["full_retrain_examples"]
        )
    report = (out / "report.md").read_text()
    assert "floor F [95% CI over forget examples, models fixed]" in report and "Tuning" in report
    assert "permutation test over models" in report


def test_methods_are_tuned_on_a_separate_forget_set_by_stored_trials(study):
    res, _ = study
    trials = res["trials"]
    assert len(trials) == 2 * 2 * 2  # forget sets x methods x grid points
    for kind in ("random", "canaries"):
        for name, key in (("ft", "lr"), ("ssd", "alpha")):
            mine = [t for t in trials if t["forget_set"] == kind and t["method"] == name]
            best = mine[int(np.argmax([t["objective"] for t in mine]))]["params"]
            row = next(r for r in res["rows"] if r["forget_set"] == kind and r["method"] == name)
            assert row["params"] == best and set(best) == {key}
            for t in mine:  # the objective is stored with its parts
                assert t["objective"] == pytest.approx(
                    t["F"]
                    * unlearning.closeness(t["retain_rel"])
                    * unlearning.closeness(t["val_rel"])
                )


def test_summary_verdicts_come_from_the_rows(study):
    res, _ = study
    rows = unlearning.summary(res)
    for r in rows:
        ps = [x["floor_p"] for x in res["rows"]
              if (x["forget_set"], x["method"]) == (r["forget_set"], r["method"])]  # fmt: skip
        assert r["at_floor"] == (min(ps) * len(ps) >= 0.05) and 0 < min(ps) <= 1
    assert {r["method"] for r in rows if r["method"] == "retrain" and r["at_floor"]} == {"retrain"}


def test_bad_options_are_refused(tmp_path):
    from sisajax.experiments.common import ExperimentError

    cfg = compose("paper", [*TINY, "data.val_fraction=0"])
    with pytest.raises(ExperimentError, match="val_fraction must be > 0"):
        paper.run_experiment(cfg, out_dir=tmp_path / "out")

    with pytest.raises(ExperimentError, match="unknown kind"):
        unlearning._forget_set("everything", np.arange(5), None, None, 2, 1, None)
    with pytest.raises(ExperimentError, match="no conf/unlearn/nope.yaml"):
        unlearning._method_conf("nope")


@pytest.mark.parametrize("doc", ["docs/unlearning.md", "README.md"])
def test_the_published_unlearning_table_is_what_the_stored_study_computes(doc):
    from pathlib import Path

    from sisajax.experiments.report import replace_between

    repo = Path(__file__).resolve().parents[1]
    res = json.loads((repo / "docs/unlearning/digits/results.json").read_text())
    text = (repo / doc).read_text()
    block = unlearning.headline(res)
    begin, end = unlearning.markers("unlearning")  # the default study's markers
    assert replace_between(text, begin, end, block) == text
    sisa = [r for r in unlearning.summary(res) if r["method"].startswith("SISA")]
    assert sisa and sum(r["at_floor"] for r in sisa) >= len(sisa) - 1


def test_a_diverged_trial_is_never_chosen():
    ok = (np.zeros((2, 3)), {"val": np.full((4, 2), 0.5)})
    nan = (np.zeros((2, 3)), {"val": np.full((4, 2), np.nan)})
    assert unlearning._finite(ok) and not unlearning._finite(nan)
    assert unlearning.DIVERGED["objective"] < 0 <= 0.0  # every real objective is >= 0


def test_the_fashion_table_is_what_its_stored_study_computes():
    from pathlib import Path

    from sisajax.experiments.report import replace_between

    repo = Path(__file__).resolve().parents[1]
    res = json.loads((repo / "docs/unlearning/fashion_mnist/results.json").read_text())
    text = (repo / "docs/unlearning.md").read_text()
    begin, end = unlearning.markers(res["name"])
    assert replace_between(text, begin, end, unlearning.headline(res)) == text


def test_exceeding_the_oracle_accuracy_is_not_rewarded_by_the_tuning():
    # a method that keeps predicting the forgotten class beats the oracle on validation
    # (ratio > 1): that must score below matching the oracle, not above it
    assert unlearning.closeness(1.0) == 1.0
    assert unlearning.closeness(1.1) == pytest.approx(unlearning.closeness(0.9))
    assert unlearning.closeness(1.1) < 1.0
    assert unlearning.closeness(2.5) == 0.0 == unlearning.closeness(0.0)
    ys = {"retain": np.array([0, 1, 0, 1]), "val": np.array([0, 1, 2, 2])}
    phi = np.zeros((3, 4))

    def outputs(val_pred):
        probs = {"retain": np.eye(3)[[0, 1, 0, 1]], "val": np.eye(3)[val_pred]}
        return phi, probs

    oracle = outputs([0, 1, 0, 0])  # never predicts the forgotten class 2: val acc 0.5
    kept = unlearning._selection_score(outputs([0, 1, 2, 2]), oracle, ys)  # val acc 1.0
    matched = unlearning._selection_score(outputs([0, 1, 0, 1]), oracle, ys)  # val acc 0.5
    assert kept["val_rel"] == 2.0 and matched["val_rel"] == 1.0
    assert kept["F"] == matched["F"] and kept["objective"] < matched["objective"]


def _row(**kw):
    base = {"seed": 0, "forget_set": "class", "method": "retrain", "F": 0.2, "F_lo": 0.1,
            "F_hi": 0.3, "klom": 0.4, "ulira": 0.5, "floor_F": 0.25, "floor_F_lo": 0.15,
            "floor_F_hi": 0.35, "floor_klom": 0.45, "floor_ulira": 0.52, "floor_p": 0.6,
            "test_acc": 0.9, "oracle_test_acc": 0.9, "examples": 10}  # fmt: skip
    return {**base, **kw}


def test_a_row_scored_against_its_own_floor_gets_no_verdict():
    from sisajax.experiments.unlearning_report import SELF_SCORED_CELL, floor_cell

    self_scored = _row(F=0.25, F_lo=0.15, F_hi=0.35, klom=0.45, ulira=0.52)
    res = {"rows": [_row(method="ft"), self_scored, _row(seed=1, method="retrain")]}
    rows = {r["method"]: r for r in unlearning.summary(res)}
    assert rows["ft"]["at_floor"] is True and not rows["ft"]["self_scored"]
    # one seed scored against itself is enough: the Bonferroni verdict would rest on it
    assert rows["retrain"]["at_floor"] is None and rows["retrain"]["self_scored"]
    assert floor_cell(rows["retrain"]) == SELF_SCORED_CELL
    assert "yes" not in floor_cell(rows["retrain"])
    block = unlearning.headline(res)
    line = next(x for x in block.splitlines() if "| retrain |" in x)
    assert SELF_SCORED_CELL in line and "yes (" not in line and "no (" not in line


def test_no_stored_table_gives_a_verdict_to_a_row_scored_against_itself():
    from pathlib import Path

    from sisajax.experiments.unlearning_report import SELF_SCORED_CELL, scored_against_itself

    repo = Path(__file__).resolve().parents[1]
    text = (repo / "docs/unlearning.md").read_text()
    for study in ("digits", "fashion_mnist"):
        res = json.loads((repo / f"docs/unlearning/{study}/results.json").read_text())
        bad = {(r["forget_set"], r["method"]) for r in res["rows"] if scored_against_itself(r)}
        begin, end = unlearning.markers(res["name"])
        block = text[text.index(begin) : text.index(end)]
        for fset, method in bad:
            line = next(x for x in block.splitlines() if f"| {fset} | {method} |" in x)
            assert SELF_SCORED_CELL in line, line


def test_intervals_are_labelled_as_over_forget_examples_and_the_verdict_as_the_test():
    from sisajax.experiments.unlearning_report import ci_label

    res = {"rows": [_row(method="ft"), _row(seed=1, method="ft")]}
    rows = unlearning.summary(res)
    assert "over forget examples, models fixed" in ci_label(rows)
    assert "over forget examples, models fixed" in unlearning.headline(res).splitlines()[0]
