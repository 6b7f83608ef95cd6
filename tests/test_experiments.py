"""The paper-reproduction suite: every preset end to end at tiny size on digits (with the data
set's own preprocessing: no preset can carry another data set's scaling), the transfer-learning
feature path, distribution-aware sharding, and the sweep/report commands."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import sisajax as sj
from sisajax import features as F
from sisajax.cli import main as cli
from sisajax.cli.app import compose, conf_dir
from sisajax.config import run_config_from
from sisajax.data.partition import distribution_aware_partition
from sisajax.experiments import common, dist_aware, paper
from sisajax.requests import sample_requests

PRESETS = ("shards", "slices", "requests", "dist_aware", "transfer", "accuracy")
TINY = {
    "shards": ["experiment.shards=[1,2]"],
    "slices": ["sisa.shards=2", "experiment.slices=[1,3]", "experiment.probe_requests=1"],
    "requests": ["sisa.shards=3", "sisa.slices=4", "experiment.k=[1,3]"],
    "dist_aware": ["experiment.target_shards=4", "experiment.k=[1,2]"],
    "transfer": [
        "experiment.shards=[1,2]",
        "features.epochs=2",
        "features.conv_features=[4]",
        "features.embed_dim=16",
    ],
    "accuracy": [
        "experiment.shards=[1,2]",
        "experiment.seeds=[0,1]",
        "experiment.deletions=3",
        "experiment.deletion_shards=2",
        "experiment.eval_every=2",
    ],
}
COMMON = ["data=digits", "sisa.epochs=10", "sisa.batch_size=16", "sisa.chunk_steps=64"]


def _compose(preset: str, *extra: str) -> dict:
    cfg = compose("paper", [f"experiment={preset}", *extra])
    if preset != "transfer":  # a linear head has no hidden layer to shrink
        cfg["model"]["hidden"] = [32]
    return cfg


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_validates(preset):
    cfg = compose("paper", [f"experiment={preset}"])
    opts = common.options(cfg, paper.KINDS)
    assert opts["kind"] in paper.KINDS and opts["name"] == preset
    fopts = common.feature_options(cfg)
    rc = run_config_from(cfg)
    assert rc.sisa.epochs == 20 and rc.sisa.batch_size == 16  # the paper's recipe
    assert (fopts["extractor"] == "cnn") == (preset == "transfer")
    text = (conf_dir() / "experiment" / f"{preset}.yaml").read_text()
    assert text.startswith("# @package _global_") and "sisajax paper experiment=" in text
    assert "input_scale" not in text and "data:\n  params" not in text  # no data-specific settings


def test_unknown_options_fail_clearly():
    with pytest.raises(common.ExperimentError, match="unknown options"):
        common.options({"experiment": {"kind": "shards", "shardz": [1]}}, paper.KINDS)
    with pytest.raises(common.ExperimentError, match="experiment.kind must be one of"):
        common.options({"experiment": {"kind": "nope"}}, paper.KINDS)
    with pytest.raises(common.ExperimentError, match="unknown request modes"):
        common.options({"experiment": {"kind": "requests", "modes": ["parallel"]}}, paper.KINDS)
    with pytest.raises(common.ExperimentError, match="unknown features options"):
        common.feature_options({"features": {"extractr": "cnn"}})


def _csv_rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_runs_end_to_end_at_tiny_size_on_digits(preset, tmp_path):
    cfg = _compose(preset, *TINY[preset], *COMMON)
    res = paper.run_experiment(cfg, out_dir=tmp_path)
    # well above chance (10 classes): the data set's own preprocessing, whatever the preset
    accs = [r["vote"] for r in res["rows"] if "vote" in r]
    accs += [p["vote"] for p in res.get("partitions", {}).values()]
    accs += [res["trained"]["vote"]] if "trained" in res else []
    assert accs and min(accs) > 0.5, accs
    for name in ("results.json", "results.csv", "report.md", f"{preset}.png"):
        assert (tmp_path / name).is_file(), name
    assert not (tmp_path / "runs").exists()  # run directories are cleaned up
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["kind"] == res["kind"] and len(stored["rows"]) == len(res["rows"])
    csv_rows = _csv_rows(tmp_path / "results.csv")
    assert [r["row"] for r in csv_rows].count("full") == 1  # the full-retrain baseline row
    full = res["full"]
    assert full["shards"] == 1 and full["slices"] == 1 and 0 <= full["vote"] <= 1
    report = (tmp_path / "report.md").read_text()
    assert f"![{preset}]({preset}.png)" in report and "Full-retrain baseline" in report
    rows = res["rows"]

    if preset == "accuracy":
        _check_accuracy_study(res, report)
        return
    if preset in ("shards", "transfer"):
        assert [r["shards"] for r in rows] == [1, 2]
        for r in rows:
            assert len(r["shard_accuracy"]) == r["shards"]
            assert r["shard_min"] <= r["shard_mean"] <= r["shard_max"]
        assert rows[0]["vote"] == rows[0]["mean_prob"] == rows[0]["shard_mean"]  # S = 1
        assert full is rows[0]  # S = 1, R = 1 is reused as the baseline
    if preset == "transfer":
        assert res["data"]["name"].endswith("+cnn") and res["data"]["feature_shape"] == [16]
        ex = res["data"]["extractor"]
        # the private pool: the preset selects nothing on validation, so all of it trains
        assert ex["public_examples"] > 0
        assert rows[0]["n_train"] == ex["sisa_train_examples"]
        assert len(ex["fingerprint"]) == 64
    if preset == "slices":
        assert [r["slices"] for r in rows] == [1, 3]
        for r in rows:
            assert r["predicted_speedup"] == pytest.approx(
                2 * 3 * r["slices"] / (2 * r["slices"] + 1)
            )
            assert r["forget_examples_mean"] < r["full_examples"]
    if preset == "requests":
        assert {(r["mode"], r["k"]) for r in rows} == {
            (m, k) for m in ("batched", "sequential") for k in (1, 3)
        }
        seq = {r["k"]: r for r in rows if r["mode"] == "sequential"}
        bat = {r["k"]: r for r in rows if r["mode"] == "batched"}
        assert seq[1]["examples"] == bat[1]["examples"]  # the same first request, same state
        assert seq[3]["examples"] > seq[1]["examples"] and seq[3]["shards_hit"] == 3
        assert bat[3]["shards_hit"] <= 3 and bat[3]["full_examples"] < seq[3]["full_examples"]
        assert seq[1]["speedup_examples"] > 1 and bat[1]["speedup_examples"] > 1
        assert all(r["predicted_examples"] > 0 for r in rows)
    if preset == "dist_aware":
        parts = res["partitions"]
        assert parts["uniform"]["shards"] == parts["dist_aware"]["shards"]
        aware = parts["dist_aware"]
        assert sum(aware["sizes"]) == sum(parts["uniform"]["sizes"])
        # Algorithm 1 equalises the request mass, so shard sizes spread far more than uniform's
        assert np.std(aware["request_share"]) < 0.1
        assert max(aware["sizes"]) > 2 * min(aware["sizes"])
        assert {r["partition"] for r in rows} == {"uniform", "dist_aware"}
        # requests are drawn from the trained ids only (a validation id would cost nothing)
        assert all(r["shards_hit"] >= 1 for r in rows)


def test_distribution_aware_partition_from_the_preset_scenario():
    cfg = _compose("dist_aware")
    opts = common.options(cfg, paper.KINDS)
    ids = np.arange(20_000, dtype=np.int64)
    probs, groups = dist_aware.deletion_probabilities(ids, opts)
    frac = np.bincount(groups, minlength=3) / len(ids)
    np.testing.assert_allclose(frac, [0.7717, 0.1001, 0.1282], atol=0.01)
    bound = probs.sum() / opts["target_shards"]
    part = distribution_aware_partition(ids, probs, bound, 1, seed=0)
    assert abs(part.num_shards - opts["target_shards"]) <= 1
    mass = np.bincount(part.shard, weights=probs)
    assert (mass <= bound + probs.max() + 1e-12).all()  # every shard stops at the bound
    # high-risk ids fill the first shards, which are therefore the smallest
    sizes = part.sizes().sum(1)
    risky = np.bincount(part.shard[groups == 1], minlength=part.num_shards)
    only_risky = risky == sizes
    assert only_risky[0] and only_risky.sum() >= 5
    assert sizes[only_risky].max() < sizes[risky == 0].min()
    # requests drawn from the scenario hit the risky group far more often than its share
    stream = sample_requests(ids, 200, seed=0, weights=probs)
    assert np.isin(stream, ids[groups == 1]).mean() > 0.3


def test_feature_extractor_is_deterministic_and_heads_train(tmp_path):
    ds = sj.load_dataset("digits")
    sisa_ds, public = F.split_public(ds, 0.3, seed=0)
    assert np.intersect1d(sisa_ds.train_ids, public.train_ids).size == 0
    assert len(sisa_ds.train_ids) + len(public.train_ids) == len(ds.train_ids)
    cfg = F.ExtractorConfig(
        name="cnn", conv_features=(8,), embed_dim=32, epochs=10, batch_size=32, learning_rate=1e-2
    )
    ex1 = F.pretrain_extractor(public, cfg)
    ex2 = F.pretrain_extractor(public, cfg)
    assert ex1.fingerprint() == ex2.fingerprint()
    feats = F.extract_features(ex1, sisa_ds)
    again = F.extract_features(ex2, sisa_ds)
    assert feats.x_train.tobytes() == again.x_train.tobytes()  # bit-identical features
    np.testing.assert_array_equal(feats.train_ids, sisa_ds.train_ids)
    np.testing.assert_array_equal(feats.test_ids, ds.test_ids)
    np.testing.assert_array_equal(feats.y_train, sisa_ds.y_train)
    assert feats.x_train.shape == (len(sisa_ds.train_ids), 32)
    assert feats.x_train.dtype == np.float32
    with pytest.raises(sj.DataError, match="pretrain the extractor"):
        F.extract_features(ex1, ds)  # public ids must never reach SISA training

    rc = sj.RunConfig(
        model=sj.ModelConfig(hidden=()),
        sisa=sj.SisaConfig(shards=2, slices=2, epochs=10, batch_size=16, chunk_steps=64),
    )
    run, _ = sj.train(rc, feats, tmp_path / "heads")
    ev = run.evaluate()
    assert ev.vote_accuracy > 0.8 and ev.mean_prob_accuracy > 0.8  # heads learn from features
    with pytest.raises(sj.ForgetError, match="not training ids"):
        sj.forget(run, [int(public.train_ids[0])])  # the extractor's data is not deletable
    rep = sj.forget(run, [int(feats.train_ids[0])])
    assert rep.ids == [int(feats.train_ids[0])] and len(rep.restart) == 1


def test_sweep_and_report_commands(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    code = cli(
        [
            "paper",
            "-m",
            "sisa.shards=1,2",
            "experiment=single",
            "sisa.slices=1",
            *COMMON,
            "model.hidden=[16]",
            "experiment.k=2",
            f"hydra.sweep.dir={sweep}",
        ]
    )
    assert code == 0, capsys.readouterr()
    for job in ("0", "1"):
        res = json.loads((sweep / job / "results.json").read_text())
        assert res["kind"] == "single" and res["rows"][0]["shards"] == int(job) + 1
        assert res["rows"][0]["k"] == 2 and (sweep / job / ".hydra" / "overrides.yaml").is_file()
    report = (sweep / "report.md").read_text()
    assert "Sweep (2 jobs)" in report and "sisa.shards=2" in report
    assert (sweep / "sweep.png").is_file()
    (sweep / "report.md").unlink()
    assert cli(["report", f"dir={sweep}"]) == 0
    assert (sweep / "report.md").read_text() == report
    assert cli(["report", f"dir={sweep / '0' / '.hydra'}"]) == 2
    assert "no experiment results" in capsys.readouterr().err


def _check_accuracy_study(res: dict, report: str) -> None:
    from sisajax.experiments import accuracy

    rows = res["rows"]
    # recipes x seeds x shards, each recipe with its own full model per seed
    assert len(rows) == 2 * 2 * 2 and {r["recipe"] for r in rows} == {"baseline", "best"}
    assert len(res["full_rows"]) == 4 and all(f["shards"] == 1 for f in res["full_rows"])
    best = res["recipes"]["best"]
    assert "relu" in best and "adam" in best and "ema" in best  # the preset's best recipe
    assert "momentum" not in res["recipes"]["baseline"]
    assert all(r["train_examples"] > 0 and r["train_wall_s"] > 0 for r in rows)  # cost shown
    st = res["stream"]
    assert [p["deleted"] for p in st["points"]] == [0, 2, 3] and st["shards"] == 2
    assert st["remaining_ids"] == res["rows"][0]["n_train"] - 3
    assert st["points"][-1]["examples"] > 0 and all(p["vote"] > 0.5 for p in st["points"])
    heads = accuracy.headline(res, shards=2)
    assert [h["recipe"] for h in heads] == ["baseline", "best"]
    assert "loss vs own full" in report and "Deletion stream: 3 single-id requests" in report
    for h in heads:  # the gap's paired interval is computed from the stored per-example results
        ci = h["loss_vs_own_full_ci"]
        assert ci["seeds"] == 2 and ci["lo"] <= ci["gap"] <= ci["hi"]
        assert ci["gap"] == pytest.approx(h["loss_vs_own_full"], abs=1e-6)
    assert f"{heads[0]['loss_vs_own_full_ci']['gap']:.2f} [" in report


def test_accuracy_recipes_override_only_run_groups():
    from sisajax.experiments import accuracy

    rc = sj.RunConfig()
    best = accuracy.recipe_config(rc, {"optim": {"schedule": "cosine", "momentum": 0.9}})
    assert best.optim.schedule == "cosine" and best.optim.momentum == 0.9
    assert best.sisa == rc.sisa and best.model == rc.model
    with pytest.raises(common.ExperimentError, match="may change"):
        accuracy.recipe_config(rc, {"data": {"name": "digits"}})
    with pytest.raises(sj.ConfigError, match="optim.schedule"):
        accuracy.recipe_config(rc, {"optim": {"schedule": "sometimes"}})
