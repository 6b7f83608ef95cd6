"""What the command line makes of odd inputs: a run_dir Hydra reads as a number, a config group
set to null, sweeps whose jobs would share a run directory."""

from __future__ import annotations

import json
import os

import hydra
import pytest
from conftest import tiny_config, tiny_digits

import sisajax as sj
from sisajax.cli import main as cli
from sisajax.cli.base import UsageError, compose
from sisajax.cli.sweep import RESULT, aggregate_jobs

TINY = [
    "sisa.shards=3",
    "sisa.slices=2",
    "sisa.epochs=0.2",
    "sisa.batch_size=8",
    "sisa.chunk_steps=16",
    "model.hidden=[16]",
    "progress=false",
]


def test_a_numeric_run_dir_names_a_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli(["train", "run_dir=123", *TINY]) == 0
    assert (tmp_path / "123" / "MANIFEST.json").is_file()
    assert cli(["status", "run_dir=123"]) == 0
    assert len(list((tmp_path / "123" / "results").glob("status-*.json"))) == 1


def test_the_python_api_refuses_a_run_dir_that_is_not_a_path(tmp_path):
    for bad in (123, None, 1.5, ["runs/a"]):
        with pytest.raises(sj.UserInputError, match=r"a run directory is a path \(str or os"):
            sj.open_run(bad)
    with pytest.raises(sj.UserInputError, match="path"):
        sj.train(tiny_config(), tiny_digits(), 123, metrics=False)

    class Where(os.PathLike):
        def __fspath__(self) -> str:
            return str(tmp_path / "missing")

    with pytest.raises(sj.NotARunError, match="is not a directory"):  # a path: accepted
        sj.open_run(Where())
    (tmp_path / "afile").write_text("")
    with pytest.raises(sj.UserInputError, match=r"its parent .*afile is not a directory"):
        sj.train(tiny_config(), tiny_digits(), tmp_path / "afile" / "run", metrics=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_only_hydras_own_value_errors_become_usage_errors(monkeypatch):
    with pytest.raises(UsageError, match=r"^data=null: data is a config group, choose one"):
        compose("train", ["data=null"])

    def ours(*args, **kwargs):
        raise ValueError("a bug of ours")

    monkeypatch.setattr(hydra, "compose", ours)
    with pytest.raises(ValueError, match="a bug of ours") as raised:
        compose("train", ["seed=1"])
    assert not isinstance(raised.value, UsageError)


def test_a_sweep_refuses_jobs_that_share_a_run_dir(tmp_path, capsys):
    shared, sweep = tmp_path / "shared", tmp_path / "sweep"
    argv = ["train", "-m", "seed=0,1", f"hydra.sweep.dir={sweep}", "overwrite=true", *TINY]
    for run_dir in (f"run_dir={shared}", f"run_dir={shared},{tmp_path}/other,{shared}"):
        assert cli([*argv, run_dir]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"run_dir={shared} would be the run directory of" in err
        assert sorted(p.name for p in tmp_path.iterdir()) == []  # no job ran
    # known only once each job composes its config: the second job is refused
    assert cli([*argv, f"run_dir={tmp_path}/d${{data.name}}"]) == 1
    out, err = capsys.readouterr()
    assert "already the run directory of job 0 of this sweep" in err
    assert sj.open_run(tmp_path / "ddigits").config.sisa.seed == 0  # not trained over
    jobs = [json.loads((sweep / j / RESULT).read_text()) for j in ("0", "1")]
    assert [j["exit_code"] for j in jobs] == [0, 2] and jobs[1]["result_files"] == []
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "multirun.yaml", "sweep.json"]
    rows = json.loads((sweep / "sweep.json").read_text())
    assert [r["seeds"] for r in rows] == [[0]]


def test_a_sweep_aggregates_the_result_file_each_job_wrote(tmp_path):
    """Each job's record names its own train result: a newer one in its run directory (another
    command's) is not what the sweep reports."""
    results = tmp_path / "run" / "results"
    results.mkdir(parents=True)

    def result(name: str, seed: int, vote: float) -> str:
        (results / name).write_text(
            json.dumps(
                {
                    "seed": seed,
                    "evaluation": {"vote_accuracy": vote, "mean_prob_accuracy": vote},
                    "cost": {"wall_s": 1.0, "examples": 10},
                }
            )
        )
        return str(results / name)

    own = result("train-20250101T000000.000000Z-1.json", 0, 0.5)
    result("train-20250101T000001.000000Z-2.json", 7, 0.9)  # newer, not the job's
    job = tmp_path / "sweep" / "0"
    job.mkdir(parents=True)
    record = {
        "command": "train",
        "overrides": ["seed=0"],
        "exit_code": 0,
        "error": None,
        "run_dir": str(tmp_path / "run"),
        "result_files": [own],
    }
    (job / RESULT).write_text(json.dumps(record))
    rows, failed = aggregate_jobs(tmp_path / "sweep")
    assert failed == 0 and len(rows) == 1
    assert rows[0]["seeds"] == [0] and rows[0]["vote"] == 0.5
