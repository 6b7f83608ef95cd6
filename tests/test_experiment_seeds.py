"""Seeds in the paper experiments: the top-level ``seed`` drives every preset and kind, every row
records the seed it used, ``experiment.seeds`` is visible in every preset, and results of one
configuration with different seeds merge into mean ± sd rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sisajax.cli import main as cli
from sisajax.cli.app import compose, conf_dir
from sisajax.config import ConfigError
from sisajax.experiments import common, paper, seeds
from sisajax.experiments.report import make_report

# One preset per kind (transfer: kind shards on extracted features), at tiny size on digits.
# experiment.full_baseline=false where a kind reads it (the others always train their reference)
NO_FULL = "experiment.full_baseline=false"
TINY = {
    "shards": ["experiment.shards=[2]", NO_FULL],
    "slices": ["sisa.shards=2", "experiment.slices=[2]", "experiment.probe_requests=1", NO_FULL],
    "requests": [
        "sisa.shards=3",
        "sisa.slices=2",
        "experiment.k=[2]",
        "experiment.modes=[batched]",
    ],
    "dist_aware": [
        "experiment.target_shards=3",
        "experiment.k=[2]",
        "experiment.modes=[batched]",
        NO_FULL,
    ],
    "transfer": [
        "experiment.shards=[2]",
        NO_FULL,
        "features.epochs=1",
        "features.conv_features=[4]",
        "features.embed_dim=8",
    ],
    "accuracy": [
        "experiment.shards=[2]",
        "experiment.deletions=2",
        "experiment.deletion_shards=2",
        "experiment.eval_every=2",
    ],
    "single": ["sisa.shards=2", "sisa.slices=1", "experiment.k=1", NO_FULL],
    "tune": ["experiment.shards=[1,2]"],
    "unlearning": [
        "experiment.num_models=4",
        "experiment.forget_sets=[random]",
        "experiment.forget_size=3",
        "experiment.methods=[ft]",
        "experiment.sisa=[[2,1]]",
        "experiment.retain_eval=100",
    ],
}
COMMON = [
    "data=digits",
    "sisa.epochs=1",
    "sisa.batch_size=32",
    "sisa.chunk_steps=32",
    "experiment.report=false",
]


def _run(preset: str, out: Path, *extra: str) -> dict:
    cfg = compose("paper", [f"experiment={preset}", *TINY[preset], *COMMON, *extra])
    if preset != "transfer":  # a linear head has no hidden layer to shrink
        cfg["model"]["hidden"] = [8]
    if preset == "accuracy":
        cfg["experiment"].update(recipes={"baseline": {}}, deletion_recipe="baseline")
    if preset == "tune":
        cfg["experiment"].update(space={"optim.learning_rate": [0.05, 0.1]})
    if preset == "unlearning":
        cfg["experiment"].update(tune={"ft": {"lr": [0.01]}})
    return paper.run_experiment(cfg, out_dir=out)


def _partitions(res: dict) -> set[str]:
    """Digests of the multi-shard partitions a result trained on."""
    rows = [*res["rows"], res.get("trained") or {}, *(res.get("partitions") or {}).values()]
    return {r["partition_digest"] for r in rows if "partition_digest" in r and r["shards"] > 1}


def _measured(res: dict) -> list:
    """What a result measured (accuracies, examples retrained), without timings."""
    fields = ("vote", "mean_prob", "shard_mean", "examples", "forget_examples_mean")
    rows = [*res["rows"], res.get("trained") or {}, *(res.get("partitions") or {}).values()]
    return [[r.get(f) for f in fields] for r in rows]


def _row_seeds(res: dict) -> set:
    rows = [*res["rows"], res.get("trained") or {}, *(res.get("partitions") or {}).values()]
    return {r.get("seed") for r in rows if r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict[int, dict]]:
    """Every kind with seed=0 and seed=1, results as written to results.json."""
    root = tmp_path_factory.mktemp("seeds")
    out: dict[str, dict[int, dict]] = {}
    for preset in TINY:
        out[preset] = {}
        for seed in (0, 1):
            d = root / preset / f"seed{seed}"
            _run(preset, d, f"seed={seed}")
            out[preset][seed] = json.loads((d / "results.json").read_text())
    return out


@pytest.mark.parametrize("preset", sorted(TINY))
def test_top_level_seed_drives_every_kind(runs, preset):
    r0, r1 = runs[preset][0], runs[preset][1]
    for seed, res in ((0, r0), (1, r1)):
        assert res["config"]["sisa"]["seed"] == seed
        assert res["seeding"] == {
            "seeds": [seed],
            "from": "seed",
            "top_level_seed": seed,
            "note": f"seed {seed} (the top-level seed; experiment.seeds is null)",
        }
        assert _row_seeds(res) == {seed}, preset  # every row records the seed it used
        for r in res["rows"]:
            if "request_seed" in r:
                assert r["request_seed"] == seed  # experiment.seed is null: the run's seed
    assert _partitions(r0) and _partitions(r0).isdisjoint(_partitions(r1)), preset
    assert _measured(r0) != _measured(r1), preset
    if "requests" in r0:
        assert r0["requests"] != r1["requests"]  # the request stream follows the seed
    if "stream" in r0:
        assert r0["stream"]["seed"] == 0 and r1["stream"]["seed"] == 1


def test_every_preset_declares_seeds_and_they_override_without_plus():
    presets = sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml"))
    assert {"shards", "slices", "requests", "dist_aware", "transfer", "accuracy", "single"} <= set(
        presets
    )
    for preset in presets:
        cfg = compose("paper", [f"experiment={preset}", "experiment.seeds=[3,4]", "seed=1"])
        opts = common.options(cfg, paper.KINDS)
        got, seeding = seeds.resolve_seeds(cfg, opts)
        assert got == [3, 4] and seeding["from"] == "experiment.seeds", preset
        assert "wins over the top-level seed=1" in seeding["note"]
        default = compose("paper", [f"experiment={preset}", "seed=5"])
        got, _ = seeds.resolve_seeds(default, common.options(default, paper.KINDS))
        assert got == [5], preset
        if "seed" in opts:  # a kind drawing requests: null follows the run's seed
            assert opts["seed"] is None and seeds.request_seed(opts, 7) == 7


def test_bad_seed_lists_are_refused_in_one_line():
    for bad, match in (([], "non-empty list"), ([1, 1], "twice"), ([-1], "non-negative")):
        with pytest.raises(seeds.SeedError, match=match):
            seeds.resolve_seeds({"seed": 0}, {"seeds": bad})
    with pytest.raises(seeds.SeedError, match="seed must be a non-negative integer"):
        seeds.resolve_seeds({"seed": "x"}, {"seeds": None})


def test_a_seed_list_matches_one_job_per_seed(runs, tmp_path):
    """``experiment.seeds=[0,1]`` in one job gives, per seed, the rows of the ``seed=`` jobs."""
    for preset in ("shards", "requests"):  # a kind looping itself, a kind looped by the driver
        res = _run(preset, tmp_path / preset, "experiment.seeds=[1,0]", "seed=4")
        assert res["seeding"]["seeds"] == [1, 0] and "seed=4" in res["seeding"]["note"]
        for seed in (0, 1):
            mine = [r for r in res["rows"] if r["seed"] == seed]
            alone = runs[preset][seed]["rows"]
            assert _measured({"rows": mine}) == _measured({"rows": alone}), preset
            digests = [r.get("partition_digest") for r in mine]
            assert digests == [r.get("partition_digest") for r in alone]


def test_sweep_over_seeds_merges_into_mean_and_sd(runs, tmp_path):
    # the jobs of one configuration with different seeds, as a sweep folder holds them
    for preset in ("shards", "requests", "dist_aware", "single"):
        for seed in (0, 1):
            job = tmp_path / preset / str(seed)
            job.mkdir(parents=True)
            (job / "results.json").write_text(json.dumps(runs[preset][seed]))
        md = make_report(tmp_path / preset).read_text()
        merged = json.loads((tmp_path / preset / "merged.json").read_text())
        assert len(merged) == 1 and merged[0]["seeds"] == [0, 1], preset
        assert "mean ± sd over 2 seeds" in md and " ± " in md, preset
        assert md.count(f"({runs[preset][0]['kind']})") <= 1  # one section, not one per job
        keys = paper.KINDS[runs[preset][0]["kind"]].ROW_KEYS
        for row in merged[0]["rows"]:
            assert row["n"] == 2 and sorted(row["seeds"]) == [0, 1]
            per_seed = [
                r
                for s in (0, 1)
                for r in runs[preset][s]["rows"]
                if all(r.get(k) == row[k] for k in keys)
            ]
            field = "vote" if "vote" in row else "examples"
            vals = np.array([r[field] for r in per_seed], np.float64)
            assert row[field] == pytest.approx(vals.mean())
            assert row[field + "_sd"] == pytest.approx(vals.std(ddof=1))
    # a job repeating a seed already merged is counted once, and the report says so
    dup = tmp_path / "shards" / "2"
    dup.mkdir()
    (dup / "results.json").write_text(json.dumps(runs["shards"][1]))
    md = make_report(tmp_path / "shards").read_text()
    merged = json.loads((tmp_path / "shards" / "merged.json").read_text())
    assert [r["n"] for r in merged[0]["rows"]] == [2] and "repeats seed(s) [1]" in md


def test_aggregate_rows_mean_sd_and_settings():
    rows = [
        {"shards": 2, "slices": 1, "n_train": 10, "seed": s, "vote": v, "mode": "x"}
        for s, v in ((0, 0.5), (1, 0.7), (2, 0.9))
    ] + [{"shards": 5, "slices": 1, "n_train": 10, "seed": 0, "vote": 0.4, "mode": "x"}]
    agg = seeds.aggregate_rows(rows, "shards")
    assert [a["shards"] for a in agg] == [2, 5] and [a["n"] for a in agg] == [3, 1]
    assert agg[0]["vote"] == pytest.approx(0.7) and agg[0]["vote_sd"] == pytest.approx(0.2)
    assert agg[1]["vote_sd"] == 0.0 and agg[0]["seeds"] == [0, 1, 2]
    assert agg[0]["n_train"] == 10 and "n_train_sd" not in agg[0] and agg[0]["mode"] == "x"


def test_cli_sweep_over_seeds_reports_mean_and_sd(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    code = cli(
        [
            "paper",
            "-m",
            "experiment=shards",
            "experiment.shards=[2]",
            "seed=0,1",
            NO_FULL,
            *COMMON,
            "model.hidden=[8]",
            f"hydra.sweep.dir={sweep}",
        ]
    )
    assert code == 0, capsys.readouterr()
    jobs = [json.loads((sweep / j / "results.json").read_text()) for j in ("0", "1")]
    assert [[r["seed"] for r in j["rows"]] for j in jobs] == [[0], [1]]
    votes = [j["rows"][0]["vote"] for j in jobs]
    assert votes[0] != votes[1]
    report = (sweep / "report.md").read_text()
    assert report.count("## shards (shards)") == 1 and "jobs 0, 1" in report
    mean, sd = np.mean(votes), np.std(votes, ddof=1)
    assert "| 2 | 1 | 2 |" in report and f"{mean:.4f} ± {sd:.4f}" in report


def _tune_job(seed: int, full_acc: float, sisa_acc: float, chosen_lr: float = 0.1) -> dict:
    """One separately run tune job (one test seed) with its stored per-example correctness."""
    from sisajax.stats import pack_correct

    rng = np.random.default_rng(seed)
    n = 400
    c_full, c_sisa = rng.random(n) < full_acc, rng.random(n) < sisa_acc
    row = {"train_examples": 1, "train_steps": 1, "train_wall_s": 1.0, "seed": seed}
    chosen = {s: {"params": {"lr": chosen_lr}, "val_vote": 0.9} for s in ("1", "5")}
    return {
        "kind": "tune",
        "name": "tune",
        "experiment": {"shards": [1, 5], "goal_points": 2.0, "space": {}},
        "rows": [
            {**row, "shards": 1, "vote": c_full.mean()},
            {**row, "shards": 5, "vote": c_sisa.mean()},
        ],
        "trials": [{"lr": chosen_lr}],
        "chosen": chosen,
        "correct": {f"S1|seed{seed}": pack_correct(c_full), f"S5|seed{seed}": pack_correct(c_sisa)},
        "n_test": n,
        "test_seeds": [seed],
        "select_seeds": [1000],
        "seeding": {"seeds": [seed]},
    }


def test_merging_separate_seed_jobs_keeps_every_seeds_per_example_results():
    """Jobs of one tuned experiment run separately (``seed=0,1`` sweep) merge into one result
    whose interval and verdict use both seeds' test examples, not the first job's only."""
    from sisajax.experiments import tune

    a, b = _tune_job(0, 0.95, 0.94), _tune_job(1, 0.95, 0.80)
    merged = seeds.merge_runs([a, b])
    assert merged["test_seeds"] == [0, 1]
    assert set(merged["correct"]) == {"S1|seed0", "S5|seed0", "S1|seed1", "S5|seed1"}
    gap = tune.gap(merged, 5)
    assert gap["seeds"] == 2
    one = tune.gap(a, 5)
    assert gap["gap"] > one["gap"] + 3  # the second seed's 15-point loss is counted
    # jobs that selected different recipes are not seeds of one experiment
    with pytest.raises(ConfigError, match="differ in 'chosen'"):
        seeds.merge_runs([a, _tune_job(1, 0.95, 0.8, chosen_lr=0.5)])
