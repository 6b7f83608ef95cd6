"""The Hydra layer and the `sisajax` console script (thin glue over the library)."""

import json
from pathlib import Path

import pytest

import sisajax as sj
from experiments import cli

CONF = Path(cli.CONF_DIR)


@pytest.mark.parametrize(
    "group,option",
    [
        (p.parent.name, p.stem)
        for p in sorted(CONF.glob("*/*.yaml"))
        if p.parent.name in cli.RUN_GROUPS
    ],
)
def test_every_config_group_option_composes_and_validates(group, option):
    cfg = cli.compose([f"{group}={option}"])
    rc = cli.run_config_of(cfg)
    assert isinstance(rc, sj.RunConfig)
    if group == "sisa":
        assert rc.sisa.shards >= 1 and (option != "full" or rc.sisa.shards == rc.sisa.slices == 1)
    elif group == "ledger":
        assert rc.ledger.lock_timeout_s >= 0
    elif group == "data":
        assert rc.data.name in sj.available_datasets()
    elif group == "model":
        assert sj.build_model(rc.model, 10) is not None
    else:
        assert rc.optim.name == option


def test_invalid_values_give_clear_errors():
    with pytest.raises(sj.ConfigError, match="sisa.shards"):
        cli.run_config_of(cli.compose(["sisa.shards=0"]))
    with pytest.raises(sj.ConfigError, match="unknown keys in sisa"):
        cli.run_config_of(cli.compose(["+sisa.shardz=3"]))
    with pytest.raises(sj.DataError, match="unknown data set"):
        sj.load_dataset("nope")


def _main(*args) -> int:
    return cli.main(list(args))


TINY = ["sisa.shards=3", "sisa.slices=2", "sisa.epochs=2", "model.hidden=[16]", "progress=false"]


def test_train_forget_evaluate_roundtrip(tmp_path, capsys):
    run_dir = tmp_path / "a"
    assert _main("train", f"run_dir={run_dir}", *TINY) == 0
    train = json.loads((run_dir / "results/train.json").read_text())
    assert train["evaluation"]["vote_accuracy"] > 0.5
    run = sj.open_run(run_dir)
    ids = run.partition.ids[:3].tolist()
    assert (
        _main("forget", f"run_dir={run_dir}", f"ids=[{','.join(map(str, ids))}]", "progress=false")
        == 0
    )
    out = json.loads((run_dir / "results/forget_g000001.json").read_text())
    assert out["ids"] == ids and out["cost"]["examples"] > 0
    # ids_file input; an already forgotten id is reported, not retrained
    f = tmp_path / "ids.txt"
    f.write_text(f"{ids[0]}\n{run.partition.ids[10]}\n")
    assert _main("forget", f"run_dir={run_dir}", f"ids_file={f}", "progress=false") == 0
    out = json.loads((run_dir / "results/forget_g000002.json").read_text())
    assert out["already_forgotten"] == [ids[0]]
    assert _main("evaluate", f"run_dir={run_dir}", "sisa.aggregation=mean_prob") == 0
    ev = json.loads((run_dir / "results/evaluate.json").read_text())
    assert ev["aggregation"] == "mean_prob" and len(ev["shard_accuracy"]) == 3
    assert "accuracy" in capsys.readouterr().out


def test_cli_errors_exit_2_and_change_nothing(tmp_path, capsys):
    run_dir = tmp_path / "a"
    assert _main("train", f"run_dir={run_dir}", *TINY) == 0
    before = (run_dir / "MANIFEST.json").read_text()
    assert _main("forget", f"run_dir={run_dir}", "ids=[999999]") == 2
    assert "unknown ids" in capsys.readouterr().out
    assert _main("forget", f"run_dir={run_dir}", "ids=[1]", "sisa.shards=8") == 2
    assert "conflict" in capsys.readouterr().out
    assert _main("forget", f"run_dir={run_dir}") == 2
    assert _main("forget", f"run_dir={tmp_path / 'missing'}", "ids=[1]") == 2
    assert "not a sisajax run directory" in capsys.readouterr().out
    assert _main("train", f"run_dir={run_dir}", *TINY) == 2  # exists, no overwrite
    assert _main("train", f"run_dir={tmp_path / 'b'}", "sisa.shards=100000", "progress=false") == 2
    assert "shards but only" in capsys.readouterr().out
    assert _main("bogus") == 2
    assert (run_dir / "MANIFEST.json").read_text() == before


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    from experiments.demo import run_demo

    cfg = cli.compose(
        [f"run_dir={tmp_path}/demo", "sisa.epochs=3", "num_forget=4", "progress=false"]
    )
    assert run_demo(cfg) == 0
    res = json.loads((tmp_path / "demo/sisa/results/demo.json").read_text())
    assert len(res["ids"]) == 4 and res["forget"]["cost"]["examples"] > 0
    assert res["full_retrain_cost"]["examples"] > res["forget"]["cost"]["examples"]
    assert "SISA demo" in capsys.readouterr().out
