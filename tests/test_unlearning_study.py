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
    assert "floor F [95% CI]" in report and "Tuning" in report


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
                assert t["objective"] == pytest.approx(t["F"] * t["retain_rel"] * t["val_rel"])


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
