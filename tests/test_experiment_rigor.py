"""The paper experiments' claims rest on what they measured: a verdict needs the seed
variance it claims to measure, a test that cannot fail is refused, separately run seeds of one
tuned study merge, tuning budgets are equal, presets train on the data their stored results
did, and no kind accepts an option it ignores."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from sisajax.cli.app import compose, conf_dir
from sisajax.config import ConfigError, run_config_from
from sisajax.experiments import paper, seeds, tune, unlearning
from sisajax.experiments.common import ExperimentError, options
from sisajax.experiments.report import make_report
from sisajax.forget_quality import floor_test, floor_test_can_reject, min_permutations
from sisajax.stats import interval_text, paired_bootstrap_gap

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "docs/accuracy/tune_purchase/results.json"  # 3 test seeds, stored


def _one_seed(res: dict, seed: int, timing_shift: float = 0.0) -> dict:
    """A stored tune study as the job of one test seed would have written it."""
    r = copy.deepcopy(res)
    r["rows"] = [x for x in r["rows"] if x["seed"] == seed]
    r["correct"] = {k: v for k, v in r["correct"].items() if k.endswith(f"|seed{seed}")}
    r["test_seeds"] = [seed]
    r["seeding"] = {"seeds": [seed], "from": "seed", "top_level_seed": seed, "note": f"seed {seed}"}
    r["config"]["sisa"]["seed"] = seed
    r["experiment"]["seeds"] = None
    for t in r["trials"]:  # another process: the same trials, other timings
        t["train_wall_s"] += timing_shift
        t["train_compile_s"] += timing_shift
    return r


# -- 1. one test seed: no verdict ---------------------------------------------------------------


def test_one_seed_intervals_say_they_leave_seed_variance_out():
    rng = np.random.default_rng(0)
    a, b = rng.random((1, 300)) < 0.9, rng.random((1, 300)) < 0.8
    one = paired_bootstrap_gap(a, b)
    assert one["n_seeds"] == 1 and not one["seed_variance"]
    assert np.isnan(one["seed_t_lo"]) and (one["lo"], one["hi"]) == (one["boot_lo"], one["boot_hi"])
    two = paired_bootstrap_gap(np.vstack([a, a]), np.vstack([b, b]))
    assert two["seed_variance"]
    assert "t-interval" in interval_text(2) and "t-interval" not in interval_text(1)
    assert "not measured" in interval_text(1)


def test_a_single_test_seed_gives_no_verdict_whatever_the_interval():
    inside = {"gap": 0.1, "lo": -0.2, "hi": 0.4}
    assert tune.verdict({**inside, "seeds": 2}, 2.0) == "met"
    assert tune.verdict({**inside, "seeds": 1}, 2.0) == "undecided"
    assert tune.verdict(inside, 2.0) == "undecided"  # seeds unknown: not measured
    beyond = {"gap": 9.0, "lo": 8.0, "hi": 10.0, "seeds": 1}
    assert tune.verdict(beyond, 2.0) == "undecided"
    assert tune.verdict_note(beyond) == tune.UNMEASURED and tune.verdict_note(None) == ""
    assert ">= 2 test seeds" in tune.UNMEASURED


def test_a_stored_study_cut_to_one_seed_reports_undecided_and_no_spread(tmp_path):
    res = _one_seed(json.loads(STUDY.read_text()), 0)
    rows = {r["shards"]: r for r in tune.summary(res)}
    # with all 3 seeds S=20 is "met" (docs/accuracy.md); from seed 0 alone it cannot be
    assert rows[20]["gap"]["seeds"] == 1 and rows[20]["gap"]["hi"] < 2.0
    assert rows[20]["verdict"] == "undecided" and rows[20]["verdict_note"] == tune.UNMEASURED
    block = tune.headline([res])
    assert "± 0.0000" not in block and "(1 seed)" in block
    assert "| met |" not in block and f"undecided ({tune.UNMEASURED})" in block
    md = tune.report(res, tmp_path / "one.png")
    assert "the wider of a paired bootstrap" not in md and "not measured" in md
    assert f"undecided ({tune.UNMEASURED})" in md
    full = tune.report(json.loads(STUDY.read_text()), tmp_path / "all.png")
    assert "the wider of a paired bootstrap" in full and tune.UNMEASURED not in full


# -- 2. a floor test that can fail ----------------------------------------------------------------


def test_a_floor_test_that_could_never_reject_is_refused():
    assert floor_test_can_reject(100, 5) and not floor_test_can_reject(100, 6)
    assert min_permutations(1) == 20 and min_permutations(6) == 120
    assert floor_test_can_reject(min_permutations(7), 7)
    assert not floor_test_can_reject(min_permutations(7) - 1, 7)
    rng = np.random.default_rng(0)
    o, fl = rng.normal(size=(8, 5)), rng.normal(size=(8, 5))
    u = rng.normal(5.0, 1.0, size=(8, 5))
    with pytest.raises(ValueError, match="n_perm >= 120"):
        floor_test(u, fl, o, n_perm=100, tests=6)
    # enough permutations: a clearly different population fails even after Bonferroni over 6
    assert floor_test(u, fl, o, n_perm=120, tests=6) * 6 < 0.05


def test_the_study_refuses_more_seeds_than_its_permutations_allow(tmp_path):
    opts = {"floor_permutations": 100}
    unlearning.check_floor_test(opts, 5)
    with pytest.raises(ExperimentError, match="at least 120"):
        unlearning.check_floor_test(opts, 6)
    cfg = compose("paper", ["experiment=unlearning", "experiment.seeds=[0,1,2,3,4,5]"])
    with pytest.raises(ExperimentError, match="floor_permutations=100 is too few for 6 seeds"):
        paper.run_experiment(cfg, out_dir=tmp_path / "out")  # before anything trains
    assert not (tmp_path / "out" / "results.json").exists()


def test_merged_seeds_past_the_limit_read_untestable_not_at_floor():
    rows = [
        {"forget_set": "random", "method": "ft", "seed": s, "floor_p": 1 / 101, "F": 0.1}
        for s in range(6)
    ]
    (r,) = unlearning.summary({"rows": rows})
    assert r["at_floor"] is None and r["floor_permutations_needed"] == 120
    smallest = [{**r, "floor_p": 1 / 121} for r in rows]  # what 120 permutations can give
    (ok,) = unlearning.summary({"rows": smallest, "experiment": {"floor_permutations": 120}})
    assert ok["at_floor"] is False  # 6 x 1/121 < 0.05: the test tells them apart
    stored = json.loads((REPO / "docs/unlearning/digits/results.json").read_text())
    assert all(x["at_floor"] is not None for x in unlearning.summary(stored))


# -- 3. separately run seeds of a tune study merge ----------------------------------------------


def test_per_seed_tune_jobs_merge_despite_their_timings(tmp_path):
    full = json.loads(STUDY.read_text())
    jobs = [_one_seed(full, s, 0.01 * s) for s in (0, 1, 2)]
    merged = seeds.merge_runs(jobs)
    assert merged["test_seeds"] == [0, 1, 2]
    assert merged["trials"] == jobs[0]["trials"]  # the first job's timings
    for s in (5, 20):  # the merged study recomputes what the one job of 3 seeds stored
        assert tune.gap(merged, s) == tune.gap(full, s)
    assert [r["verdict"] for r in tune.summary(merged)] == [
        r["verdict"] for r in tune.summary(full)
    ]
    # `sisajax report` over the job folders of a seed sweep
    for i, job in enumerate(jobs):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "results.json").write_text(json.dumps(job))
    md = make_report(tmp_path).read_text()
    assert md.count("(tune)") == 1 and "seeds [0, 1, 2]" in md
    # a trial that scored otherwise is another selection, not another seed
    other = copy.deepcopy(jobs[1])
    other["trials"][0]["val_vote"] += 0.01
    with pytest.raises(ConfigError, match="differ in 'trials'"):
        seeds.merge_runs([jobs[0], other])


def test_per_seed_unlearning_jobs_keep_every_seeds_trials():
    res = json.loads((REPO / "docs/unlearning/digits/results.json").read_text())
    jobs = []
    for s in (0, 1):
        job = copy.deepcopy(res)
        job["rows"] = [r for r in res["rows"] if r["seed"] == s]
        job["trials"] = [t for t in res["trials"] if t["seed"] == s]
        job["seeding"] = {"seeds": [s], "from": "seed"}
        jobs.append(job)
    merged = seeds.merge_runs(jobs)
    assert merged["trials"] == res["trials"] and merged["rows"] == res["rows"]
    assert unlearning.summary(merged) == unlearning.summary(res)
    # a repeated seed is counted once, its trials too
    again = seeds.merge_runs([*jobs, jobs[1]])
    assert again["trials"] == res["trials"]


# -- 4. equal tuning budgets in the unlearning study -------------------------------------------


@pytest.mark.parametrize("preset", ["unlearning", "unlearning_fashion"])
def test_the_shipped_unlearning_presets_tune_every_method_equally(preset):
    opts = options(compose("paper", [f"experiment={preset}"]), paper.KINDS)
    unlearning.check_tuning(opts)
    sizes = {len(unlearning._grid(opts, m)) for m in opts["methods"]}
    assert sizes == {3}


def test_misspelt_or_unequal_tuning_grids_are_refused(tmp_path):
    base = {"methods": ["ft", "ssd"], "tune": {"ft": {"lr": [0.1, 1.0]}, "ssd": {"alpha": [1, 2]}}}
    unlearning.check_tuning(base)
    unlearning.check_tuning({**base, "tune": {**base["tune"], "scrub": {"lr": [1]}}})  # not run
    typo = {**base, "tune": {"ft": {"lr": [0.1, 1.0]}, "sdd": {"alpha": [1, 2]}}}
    with pytest.raises(ExperimentError, match=r"unknown methods \['sdd'\] \(known: ft, ") as e:
        unlearning.check_tuning(typo)
    assert "\n" not in str(e.value)
    with pytest.raises(ExperimentError, match="unequal tuning budgets"):
        unlearning.check_tuning({**base, "tune": {"ft": {"lr": [0.1, 1.0]}}})
    with pytest.raises(ExperimentError, match=r"experiment.methods: unknown \['fft'\]"):
        unlearning.check_tuning({**base, "methods": ["fft"]})
    cfg = compose("paper", ["experiment=unlearning", "experiment.methods=[ft,ssd]"])
    cfg["experiment"]["tune"] = typo["tune"]
    with pytest.raises(ExperimentError, match="sdd"):
        paper.run_experiment(cfg, out_dir=tmp_path / "out")  # before anything trains


# -- 5. presets train on the data their stored results did --------------------------------------

# the presets whose kind selects on the validation split (the others select nothing on it)
SELECT_ON_VALIDATION = (
    "tune",
    "tune_digits",
    "tune_fashion",
    "tune_purchase",
    "unlearning",
    "unlearning_fashion",
)


def test_only_presets_that_select_on_validation_hold_it_out():
    presets = sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml"))
    assert set(SELECT_ON_VALIDATION) < set(presets)
    for preset in presets:
        for extra in ([], ["data=digits"]):  # whatever data set the preset runs on
            rc = run_config_from(compose("paper", [f"experiment={preset}", *extra]))
            want = 0.1 if preset in SELECT_ON_VALIDATION else 0.0
            assert rc.data.val_fraction == want, (preset, extra)
        own = (conf_dir() / "experiment" / f"{preset}.yaml").read_text()
        inherited = "- accuracy\n" in own  # accuracy_digits, accuracy_purchase
        if preset not in SELECT_ON_VALIDATION and not inherited:
            assert "selects nothing on validation" in own, preset  # says why


STORED = {  # stored results -> the preset that produced them
    "docs/results/shards.json": "shards",
    "docs/results/shards_lr0.01.json": "shards",
    "docs/results/slices.json": "slices",
    "docs/results/requests.json": "requests",
    "docs/results/dist_aware.json": "dist_aware",
    "docs/results/transfer.json": "transfer",
    "docs/results/transfer_requests.json": "transfer",
    "docs/accuracy/digits/results.json": "accuracy_digits",
    "docs/accuracy/fashion_mnist/results.json": "accuracy",
    "docs/accuracy/purchase_hard/results.json": "accuracy_purchase",
    "docs/accuracy/tune_digits/results.json": "tune_digits",
    "docs/accuracy/tune_fashion/results.json": "tune_fashion",
    "docs/accuracy/tune_purchase/results.json": "tune_purchase",
    "docs/unlearning/digits/results.json": "unlearning",
    "docs/unlearning/fashion_mnist/results.json": "unlearning_fashion",
}


def test_the_presets_hold_out_what_their_stored_results_held_out():
    assert set(STORED.values()) >= {"shards", "slices", "requests", "dist_aware", "transfer"}
    for path, preset in STORED.items():
        stored = json.loads((REPO / path).read_text())["config"]["data"]
        # results from before validation splits did not record one: nothing was held out
        held_out = stored.get("val_fraction", 0.0)
        rc = run_config_from(compose("paper", [f"experiment={preset}"]))
        assert rc.data.val_fraction == held_out, path


# -- 6. no kind accepts an option it ignores -----------------------------------------------------


def test_full_baseline_is_an_option_only_of_the_kinds_that_read_it():
    for kind in ("requests", "accuracy", "tune", "unlearning"):  # always train their reference
        with pytest.raises(ExperimentError, match=f"not read by experiment.kind={kind}") as e:
            options({"experiment": {"kind": kind, "full_baseline": False}}, paper.KINDS)
        assert "\n" not in str(e.value) and "shards, slices" in str(e.value)
    for kind in ("shards", "slices", "dist_aware", "single"):
        assert options({"experiment": {"kind": kind}}, paper.KINDS)["full_baseline"] is True
        off = {"kind": kind, "full_baseline": False}
        assert options({"experiment": off}, paper.KINDS)["full_baseline"] is False
    for p in sorted((conf_dir() / "experiment").glob("*.yaml")):  # no preset sets it in vain
        options(compose("paper", [f"experiment={p.stem}"]), paper.KINDS)
