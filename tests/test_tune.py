"""The tuning protocol: search on the validation split only, equal budgets for every S (the full
model included), every trial stored, the chosen recipe tested once on other seeds, gaps with
intervals and verdicts computed from the stored results."""

import json

import numpy as np
import pytest

from sisajax.cli.app import compose
from sisajax.config import run_config_from
from sisajax.data.datasets import load_dataset
from sisajax.experiments import paper, tune
from sisajax.experiments.common import ExperimentError, Workspace, options
from sisajax.experiments.report import make_report
from sisajax.run import SisaRun

TINY = [
    "experiment=tune",
    "data=digits",
    "experiment.shards=[1,3]",
    "sisa.epochs=2",
    "sisa.batch_size=32",
    "sisa.chunk_steps=32",
]
SPACE = {"optim.learning_rate": [0.05, 0.2], "model.activation": ["tanh", "relu"]}


def _cfg(*extra):
    cfg = compose("paper", [*TINY, *extra])
    cfg["model"]["hidden"] = [8]
    cfg["experiment"]["space"] = dict(SPACE)
    return cfg


def test_the_search_never_reads_the_test_split(tmp_path, monkeypatch):
    def refuse(self):
        raise AssertionError("the search read the test split")

    monkeypatch.setattr(SisaRun, "test_data", refuse)
    cfg = _cfg()
    opts = options(cfg, paper.KINDS)
    rc = run_config_from(cfg)
    ws = Workspace(tmp_path, keep=False)
    trials, chosen = tune.select(rc, load_dataset("digits"), opts, ws)
    # equal budgets: the same 4 points for the full model and for S=3
    by_s = {s: [t["params"] for t in trials if t["shards"] == s] for s in (1, 3)}
    assert by_s[1] == by_s[3] and len(by_s[1]) == 4
    assert all(t["n_val"] > 0 and 0 <= t["val_vote"] <= 1 for t in trials)
    for s in (1, 3):  # the choice is the best stored validation score
        scores = [t["val_vote"] for t in trials if t["shards"] == s]
        assert chosen[str(s)]["trial"] == int(np.argmax(scores))


def test_the_protocol_end_to_end(tmp_path):
    cfg = _cfg("experiment.seeds=[0,1]")
    res = paper.run_experiment(cfg, out_dir=tmp_path)
    stored = json.loads((tmp_path / "results.json").read_text())
    assert len(stored["trials"]) == 2 * 4  # every trial of every S, stored
    assert {r["seed"] for r in stored["rows"]} == {0, 1}
    assert not {r["seed"] for r in stored["rows"]} & {t["seed"] for t in stored["trials"]}
    for r in stored["rows"]:  # each S tested with its own chosen recipe
        assert r["params"] == stored["chosen"][str(r["shards"])]["params"]
        assert r["train_examples"] > 0 and r["train_steps"] > 0
    # the gap and its verdict come from the stored per-example results
    ci = tune.gap(stored, 3)
    full = np.mean([r["vote"] for r in stored["rows"] if r["shards"] == 1])
    sisa = np.mean([r["vote"] for r in stored["rows"] if r["shards"] == 3])
    assert ci["gap"] == pytest.approx(100 * (full - sisa))
    assert ci["lo"] <= ci["gap"] <= ci["hi"] and ci["seeds"] == 2
    row = [r for r in tune.summary(stored) if r["shards"] == 3][0]
    assert row["verdict"] == tune.verdict(ci, 2.0)
    md = (make_report(tmp_path)).read_text()
    assert "gap vs tuned full [95% CI]" in md and f"{ci['gap']:.2f}" in md
    assert res["test_seeds"] == [0, 1]


def test_verdicts_follow_the_interval():
    assert tune.verdict({"gap": 1.0, "lo": 0.2, "hi": 1.9, "seeds": 3}, 2.0) == "met"
    assert tune.verdict({"gap": 3.0, "lo": 2.1, "hi": 3.9, "seeds": 3}, 2.0) == "not met"
    assert tune.verdict({"gap": 1.8, "lo": 0.5, "hi": 3.1, "seeds": 3}, 2.0) == "undecided"


def test_bad_protocols_are_refused(tmp_path):
    ds = load_dataset("digits")
    ws = Workspace(tmp_path, keep=False)
    cfg = _cfg("experiment.seeds=[1000]")
    opts = options(cfg, paper.KINDS)
    rc = run_config_from(cfg)
    with pytest.raises(ExperimentError, match="overlap"):
        tune.run(rc, ds, {**opts, "seeds": [1000]}, ws)
    with pytest.raises(ExperimentError, match="must include 1"):
        tune.run(rc, ds, {**opts, "seeds": [0], "shards": [3]}, ws)
    with pytest.raises(ExperimentError, match="validation split"):
        tune.select(rc.replace(data={"val_fraction": 0.0}), ds, opts, ws)
    for space in ({"sisa.shards": [1, 2]}, {"loss": [1]}, {"optim.learning_rate": []}):
        with pytest.raises(ExperimentError, match="space"):
            tune.search_points({**opts, "space": space})


def test_a_drawn_search_is_a_fixed_subset_of_the_grid():
    opts = {"space": SPACE, "trials": 3, "search_seed": 7}
    a, b = tune.search_points(opts), tune.search_points(opts)
    grid = tune.search_points({**opts, "trials": None})
    assert a == b and len(a) == 3 and all(p in grid for p in a) and len(grid) == 4


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
STUDIES = [REPO / f"docs/accuracy/tune_{n}" for n in ("digits", "purchase", "fashion")]


@pytest.mark.parametrize("doc", ["docs/accuracy.md", "README.md"])
def test_the_published_headline_is_what_the_stored_studies_compute(doc):
    # The table of verdicts in the docs is rendered from results.json (gaps recomputed by the
    # bootstrap from the stored per-example correctness), never typed: editing a number or a
    # verdict by hand, or rerunning a study without regenerating the table, fails here.
    text = (REPO / doc).read_text()
    block = tune.headline(tune.load_results(STUDIES))
    assert tune.replace_headline(text, block) == text
    assert block.count("\n") == 1 + 6 and ("met" in block or "undecided" in block)


def test_the_headline_recomputes_verdicts_and_flags_grid_edges():
    res = json.loads((STUDIES[1] / "results.json").read_text())
    edited = json.loads(json.dumps(res))
    edited["experiment"]["goal_points"] = -5.0  # an impossible goal turns every verdict
    assert "| met |" in tune.headline([res])
    assert "| met |" not in tune.headline([edited]) and "not met" in tune.headline([edited])
    chosen = res["chosen"]["20"]["params"]["optim.learning_rate"]
    grid = res["experiment"]["space"]["optim.learning_rate"]
    assert ("optim.learning_rate" in tune.grid_edges(res, 20)) == (chosen in (min(grid), max(grid)))
    inner = json.loads(json.dumps(res))
    inner["experiment"]["space"]["optim.learning_rate"] = [*grid, 10 * max(grid), min(grid) / 10]
    assert "optim.learning_rate" not in tune.grid_edges(inner, 20)
    with pytest.raises(ExperimentError, match="markers"):
        tune.replace_headline("no markers here", "x")
