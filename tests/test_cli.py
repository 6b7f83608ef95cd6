"""The `sisajax` command line: Hydra's conventions on every command, one seed, clear errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, cli_env, cli_run, copy_run, pick, tree_bytes

import sisajax as sj
from sisajax.cli import main as cli
from sisajax.cli.base import compose, conf_dir, run_config
from sisajax.cli.table import COMMANDS, TABLE

TINY = [
    "sisa.shards=3",
    "sisa.slices=2",
    "sisa.epochs=2",
    "sisa.batch_size=8",
    "sisa.chunk_steps=16",
    "model.hidden=[16]",
    "progress=false",
]


@pytest.mark.parametrize(
    "group,option",
    [
        (p.parent.name, p.stem)
        for p in sorted(conf_dir().glob("*/*.yaml"))
        if p.parent.name in ("data", "model", "optim", "sisa", "ledger")
    ],
)
def test_every_config_group_option_composes_and_validates(group, option):
    rc = run_config(compose("train", [f"{group}={option}"]))
    assert isinstance(rc, sj.RunConfig)
    if group == "sisa":
        # the option's file is what the run gets (composed over the default group for `full`)
        import yaml

        chosen = yaml.safe_load((conf_dir() / "sisa" / f"{option}.yaml").read_text())
        for key, value in chosen.items():
            if key != "defaults":
                assert getattr(rc.sisa, key) == value, key
        if option == "full":
            assert rc.sisa.shards == rc.sisa.slices == 1
    elif group == "data":
        assert rc.data.name in sj.available_datasets()
    elif group == "model":
        assert sj.build_model(rc.model, 10) is not None
    elif group == "optim" and option == "sharded":  # a recipe on top of sgd
        assert rc.optim.name == "sgd" and rc.optim.schedule == "cosine"
        assert rc.optim.lr_shard_exponent == 0.5 and rc.optim.averaging == "ema"
    elif group == "optim":
        assert rc.optim.name == option


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_answers_help_and_cfg_job(name, capsys):
    assert cli([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"sisajax {name}" in out and "options and defaults" in out
    if name in ("train", "paper", "demo", "mia"):
        assert "config groups" in out and "data:" in out and "digits" in out
    assert cli([name, "--cfg", "job"]) == 0
    cfg = capsys.readouterr().out
    assert cfg.strip() and "Traceback" not in cfg


def test_top_level_help_and_unknown_command(capsys):
    assert cli(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: sisajax COMMAND [--help] [--cfg job] [-m] [key=value ...]" in out  # [..] kept
    assert cli(["foo"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'foo';" in err and len(err.strip().splitlines()) == 1
    assert cli(["forgt", "run_dir=x"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'forgt' (did you mean forget?);" in err and err.count("\n") == 1


def test_version_is_printed_without_importing_jax():
    from importlib.metadata import version

    code = (
        "import sys; from sisajax.cli import main; rc = main(['--version']); "
        "assert 'jax' not in sys.modules, 'jax imported'; sys.exit(rc)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"sisajax {version('sisajax')}\n" and r.stderr == ""


def test_help_imports_no_command_module_and_no_jax():
    code = (
        "import sys; from sisajax.cli import main; rc = main(['--help']); "
        "loaded = [m for m in ('jax', 'sisajax.cli.commands', 'sisajax.cli.forget_commands', "
        "'sisajax.cli.experiment_commands', 'sisajax.cli.sweep') if m in sys.modules]; "
        "assert not loaded, loaded; sys.exit(rc)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: sisajax COMMAND") and r.stderr == ""


def test_the_command_table_is_what_help_lists_and_every_entry_resolves(capsys):
    import importlib
    import inspect

    assert len(COMMANDS) == len(TABLE)  # no name listed twice
    assert cli(["--help"]) == 0
    out = capsys.readouterr().out
    listed = out.split("Commands:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert [tuple(line.split(None, 1)) for line in listed] == [(c.name, c.summary) for c in TABLE]
    modules = {c.target.partition(":")[0] for c in TABLE}
    for c in TABLE:
        fn = c.function()
        assert callable(fn) and fn.__doc__ and fn.__module__ in modules, c
        assert list(inspect.signature(fn).parameters) == ["cfg", "overrides"], c
        assert (conf_dir() / f"{c.name}.yaml").is_file(), c
    # every command function of the command modules is in the table (none left out)
    defined = {
        f"{m}:{name}"
        for m in modules
        for name, fn in inspect.getmembers(importlib.import_module(m), inspect.isfunction)
        if name.startswith("cmd_") and fn.__module__ == m
    }
    assert defined == {c.target for c in TABLE}
    assert {c.name for c in TABLE if c.multirun} == {"train", "paper"}


@pytest.mark.parametrize(
    "override, hint",
    [
        ("sisa.shard=3", "(no such key; did you mean sisa.shards?)"),
        ("shards=3", "(no such key; did you mean sisa.shards?)"),
        ("+sisa.shard=3", "for `sisajax train` (did you mean sisa.shards?)"),
        ("model.hiden=[8]", "(no such key; did you mean model.hidden?)"),
        ("sisa.seed=1", "(no such key; did you mean seed?)"),
        ("model.params.dropout=0.1", "model.params takes new keys with a leading +"),
        ("nonsense=1", "(no such key; see --help)"),
    ],
)
def test_mistyped_config_keys_get_a_suggestion(override, hint, capsys):
    assert cli(["train", override, "--cfg", "job"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and hint in err, err


@pytest.mark.parametrize(
    "launcher, plugin",
    [("parallel", "hydra_joblib_launcher"), ("slurm", "hydra_submitit_launcher")],
)
def test_sweep_launcher_without_its_plugin_says_which_extra(
    launcher, plugin, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, f"hydra_plugins.{plugin}", None)  # as if not installed
    sweep = tmp_path / "sweep"
    argv = ["train", "-m", f"hydra/launcher={launcher}", f"hydra.sweep.dir={sweep}", *TINY]
    assert cli([*argv, "seed=0,1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'sisajax[cluster]'" in err, err
    assert f"hydra/launcher={launcher}" in err and not sweep.exists()


def test_seed_drives_the_run(tmp_path):
    a = tmp_path / "a"
    assert cli(["train", f"run_dir={a}", *TINY, "seed=1"]) == 0
    assert cli(["train", f"run_dir={tmp_path / 'b'}", *TINY, "seed=2"]) == 0
    ra, rb = sj.open_run(a), sj.open_run(tmp_path / "b")
    assert ra.config.sisa.seed == 1 and rb.config.sisa.seed == 2
    assert not np.array_equal(ra.partition.shard, rb.partition.shard)
    assert cli(["train", f"run_dir={tmp_path / 'c'}", *TINY, "sisa.seed=3"]) == 2  # one seed knob


def test_results_are_never_overwritten(tmp_path, capsys):
    d = tmp_path / "run"
    assert cli(["train", f"run_dir={d}", *TINY]) == 0
    out = capsys.readouterr().out
    # the data line states the value range a model (or a plug-in) gets
    assert "data: digits:" in out and "float32 in 0..1, 10 classes" in out
    assert cli(["status", f"run_dir={d}"]) == 0
    assert cli(["status", f"run_dir={d}"]) == 0  # same command, same generation
    assert len(list((d / "results").glob("status-*.json"))) == 2


def test_forgetting_already_forgotten_ids(tmp_path, capsys):
    """Only already-forgotten ids: exit 2, one line, nothing written (not even a ledger record).
    Mixed with new ids: the new ones are forgotten, exit 0, the skipped ones named."""
    d = tmp_path / "run"
    assert cli(["train", f"run_dir={d}", *TINY]) == 0
    a, b = pick(sj.open_run(d), 0, 0, 2)
    assert cli(["forget", f"run_dir={d}", f"ids=[{a}]", "progress=false"]) == 0
    capsys.readouterr()
    before = tree_bytes(d)
    assert cli(["forget", f"run_dir={d}", f"ids=[{a}]", "progress=false"]) == 2
    out, err = capsys.readouterr()
    assert err == "error: the id of the request was already forgotten; nothing changed\n", err
    assert tree_bytes(d) == before and out == ""
    assert cli(["forget", f"run_dir={d}", f"ids=[{b},{a}]", "progress=false"]) == 0
    out = capsys.readouterr().out
    assert f"skipped 1 id(s) forgotten before: [{a}]" in out and "generation 2" in out
    assert cli(["forget", f"run_dir={d}", f"ids=[{a},{b}]", "progress=false"]) == 2
    assert "all 2 ids of the request were already forgotten" in capsys.readouterr().err
    reports = [json.loads(p.read_text()) for p in sorted((d / "results").glob("forget-*.json"))]
    assert [(r["ids"], r["already_forgotten"]) for r in reports] == [([a], []), ([b], [a])]


def test_hydra_run_dir_refused_without_multirun_and_honoured_with_it(tmp_path, capsys):
    assert cli(["train", f"hydra.run.dir={tmp_path}/x", *TINY]) == 2
    assert "multirun" in capsys.readouterr().err
    sweep = tmp_path / "sweep"
    code = cli(["train", "-m", f"hydra.sweep.dir={sweep}", "seed=0,1", *TINY])
    out = capsys.readouterr().out
    assert code == 0, out
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    rows = json.loads((sweep / "sweep.json").read_text())
    assert len(rows) == 1 and rows[0]["n"] == 2 and rows[0]["seeds"] == [0, 1]  # mean over seeds
    assert rows[0]["vote_sd"] >= 0 and "±" in out
    seeds = {sj.open_run(sweep / j / "run").config.sisa.seed for j in ("0", "1")}
    assert seeds == {0, 1}


@pytest.fixture(scope="module")
def cli_base(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "run"
    assert cli(["train", f"run_dir={d}", *TINY]) == 0
    sj.forget(sj.open_run(d), pick(sj.open_run(d), 1, 0))
    return d


def _bad_inputs(tmp_path, run_dir):
    binary = tmp_path / "ids.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    garbage_npy = tmp_path / "ids.npy"
    np.save(garbage_npy, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    text_npy = tmp_path / "ids2.npy"
    text_npy.write_bytes(b"not an npy file")
    passwd = tmp_path / "passwd"
    passwd.write_text("root:x:0:0:root:/root:/bin/bash\n")
    floats = tmp_path / "floats.json"
    floats.write_text("[1.5, 2]")
    superscript = tmp_path / "ids.txt"  # str.isdigit() says yes, int() says no
    superscript.write_text("3\n4 \u00b2\n", encoding="utf-8")
    a_file = tmp_path / "afile"
    a_file.write_text("")
    r = f"run_dir={run_dir}"
    gone = int(sj.open_run(run_dir).partition.removed[0])
    return {
        # name: (argv, expected exit code, a word the message must contain)
        "binary ids_file": (["forget", r, f"ids_file={binary}"], 2, "ids_file"),
        "object npy": (["forget", r, f"ids_file={garbage_npy}"], 2, "ids_file"),
        "garbage npy": (["forget", r, f"ids_file={text_npy}"], 2, "ids_file"),
        "passwd ids_file": (["forget", r, f"ids_file={passwd}"], 2, "line 1"),
        "float json ids": (["forget", r, f"ids_file={floats}"], 2, "integers"),
        "unicode digit ids_file": (["forget", r, f"ids_file={superscript}"], 2, "line 2"),
        "float id": (["forget", r, "ids=[45.0]"], 2, "integers"),
        "unknown id": (["forget", r, "ids=[99999]"], 2, "not training ids"),
        "already forgotten id": (["forget", r, f"ids=[{gone}]"], 2, "already forgotten"),
        "no ids": (["forget", r], 2, "ids"),
        "requests.k=0": (["forget", r, "requests.k=0"], 2, "requests.k"),
        "requests.k huge": (["forget", r, "requests.k=100000"], 2, "requests.k"),
        "zipf": (["forget", r, "requests.k=2", "requests.distribution=zipf"], 2, "distribution"),
        "bad mode": (["forget", r, "requests.k=2", "requests.mode=random"], 2, "requests.mode"),
        "negative lock timeout": (["forget", r, "ids=[1]", "lock_timeout_s=-1"], 2, "lock_timeout"),
        "sisa.shards=abc": (
            ["train", f"run_dir={tmp_path}/new1", "sisa.shards=abc"],
            2,
            "sisa.shards",
        ),
        "cnn on digits": (["train", f"run_dir={tmp_path}/new2", "model=cnn"], 2, "cnn"),
        "demo num_forget=-3": (
            ["demo", f"run_dir={tmp_path}/new3", "num_forget=-3"],
            2,
            "num_forget",
        ),
        "+foo=1": (["evaluate", r, "+foo=1"], 2, "foo"),
        "foo=1": (["status", r, "foo=1"], 2, "foo"),
        "bogus aggregation": (["evaluate", r, "aggregation=bogus"], 2, "aggregation"),
        "run-config key on evaluate": (["evaluate", r, "sisa.aggregation=mean_prob"], 2, "sisa"),
        "unknown data set": (["train", f"run_dir={tmp_path}/new4", "data=nope"], 2, "data/nope"),
        "not a run": (["forget", f"run_dir={tmp_path}", "ids=[1]"], 2, "not a sisajax run"),
        "missing run": (["audit", f"run_dir={tmp_path}/nothing"], 2, "not a directory"),
        "bad flag": (["train", "--bogus"], 2, "--bogus"),
        "bad verify shards": (["verify", r, "shards=[9]"], 2, "do not exist"),
        "report without args": (["report"], 2, "run_dir"),
        "export without out": (["export", r], 2, "out="),
        # a word where a flag belongs: Python reads any non-empty string as true
        "overwrite=no": (["train", r, "overwrite=no", *TINY], 2, "overwrite must be true or"),
        "progress=off": (["forget", r, "ids=[1]", "progress=off"], 2, "progress must be true"),
        "all_slices=maybe": (["export", r, f"out={tmp_path}/x", "all_slices=maybe"], 2, "true"),
        "~run_dir": (["status", "~run_dir"], 2, "cannot be removed"),
        "verify sample=abc": (["verify", r, "sample=abc"], 2, "sample must be an integer"),
        "verify shards=abc": (["verify", r, "shards=abc"], 2, "shards must be an integer"),
        "verify seed=abc": (["verify", r, "seed=abc"], 2, "seed must be an integer"),
        "verify atol=abc": (["verify", r, "atol=abc"], 2, "atol must be a finite number"),
        "predict show=abc": (["predict", r, "input=test", "show=abc"], 2, "show must be"),
        "ids shard=abc": (["ids", r, "shard=abc"], 2, "shard must be an integer"),
        "ids slice=[1]": (["ids", r, "slice=[1]"], 2, "slice must be an integer"),
        "ids out in a missing folder": (
            ["ids", r, f"out={tmp_path}/no/x.txt"],
            2,
            "does not exist",
        ),
        "devices=abc": (["train", f"run_dir={tmp_path}/new5", "devices=abc"], 2, "devices must"),
        "split_seed=abc": (
            ["train", f"run_dir={tmp_path}/new6", "data.params.split_seed=abc"],
            2,
            "split_seed must be",
        ),
        "requests.seed=abc": (
            ["forget", r, "requests.k=2", "requests.seed=abc"],
            2,
            "requests.seed",
        ),
        "sweep with --cfg": (["train", "-m", "--cfg", "job", "sisa.shards=2,3"], 2, "--cfg"),
        "sweep with unknown key": (
            ["train", "-m", "sisa.shard=1,2"],
            2,
            "did you mean sisa.shards",
        ),
        "--config-dir without folder": (["train", "--config-dir"], 2, "config folder"),
        # Hydra reads run_dir=123 as a number (a folder name) and run_dir=null as None
        "run_dir=123 (no such folder)": (["status", "run_dir=123"], 2, "123 is not a directory"),
        "run_dir=null": (["status", "run_dir=null"], 2, "run_dir must be a folder path"),
        "train run_dir=null": (["train", "run_dir=null", *TINY], 2, "run_dir must be"),
        "train run_dir empty": (["train", "run_dir=", *TINY], 2, "got an empty value"),
        "run_dir=true": (["evaluate", "run_dir=true"], 2, "run_dir must be a folder path"),
        "run_dir=[1]": (["forget", "run_dir=[1]", "ids=[1]"], 2, "got a list"),
        "run_dir=1.5": (["audit", "run_dir=1.5"], 2, "got the number 1.5"),
        "resume run_dir=null": (["resume", "run_dir=null"], 2, "run_dir must be"),
        "report run_dir=123": (["report", "run_dir=123"], 2, "123 is not a directory"),
        "demo run_dir=null": (["demo", "run_dir=null"], 2, "run_dir must be"),
        "run_dir under a file": (
            ["train", f"run_dir={a_file}/sub", *TINY],
            2,
            f"its parent {a_file} is not a directory",
        ),
        "status run_dir under a file": (
            ["status", f"run_dir={a_file}/sub/deeper"],
            2,
            f"its parent {a_file} is not a directory",
        ),
        # Hydra's own ValueError/TypeError for a config group without an option
        "data=null": (["train", f"run_dir={tmp_path}/new7", "data=null"], 2, "data is a config"),
        "optim=null": (["train", f"run_dir={tmp_path}/new8", "optim=null"], 2, "optim is a"),
        "sisa=[default,null]": (
            ["train", f"run_dir={tmp_path}/new9", "sisa=[default,null]"],
            2,
            "sisa is a config group",
        ),
        "sweep jobs sharing a run_dir": (
            [
                "train",
                "-m",
                "seed=0,1",
                f"run_dir={tmp_path}/new10",
                "overwrite=true",
                f"hydra.sweep.dir={tmp_path}/sweep",
                *TINY,
            ],
            2,
            "would be the run directory of 2 jobs",
        ),
    }


def test_every_bad_input_is_one_line_and_changes_nothing(cli_base, tmp_path, capsys):
    """Table-driven: exit code, one line on stderr, no traceback, run directory unchanged, and no
    new file or folder left behind."""
    run_dir = tmp_path / "run"
    shutil.copytree(cli_base, run_dir)
    cases = _bad_inputs(tmp_path, run_dir)
    rejected = 0
    for name, (argv, code, word) in cases.items():
        before = tree_bytes(run_dir)
        listing = sorted(p.name for p in tmp_path.iterdir())
        got = cli(argv)
        out, err = capsys.readouterr()
        assert got == code, (name, got, err, out[-500:])
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert "Traceback" not in err + out and word in lines[0], (name, lines[0])
        assert "root:x" not in err, name  # never echo a file's content
        assert tree_bytes(run_dir) == before, name
        assert sorted(p.name for p in tmp_path.iterdir()) == listing, name
        rejected += 1
    assert rejected == len(cases) >= 63


def test_errors_in_a_fresh_process_are_one_line(cli_base, tmp_path):
    run_dir = copy_run(cli_base, tmp_path / "run").run_dir
    r = cli_run(["forget", f"run_dir={run_dir}", "ids=[45.0]"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = cli_run(["train", f"run_dir={tmp_path}/x", "sisa.shards=abc"])
    assert r.returncode == 2 and r.stderr.startswith("error: sisa.shards must be an integer")


def test_train_forget_evaluate_roundtrip(tmp_path, capsys):
    run_dir = tmp_path / "a"
    assert cli(["train", f"run_dir={run_dir}", *TINY]) == 0
    (train,) = (run_dir / "results").glob("train-*.json")
    assert json.loads(train.read_text())["evaluation"]["vote_accuracy"] > 0.5
    ids = sj.open_run(run_dir).partition.ids[:3].tolist()
    assert (
        cli(["forget", f"run_dir={run_dir}", f"ids=[{','.join(map(str, ids))}]", "progress=false"])
        == 0
    )
    assert cli(["evaluate", f"run_dir={run_dir}", "aggregation=mean_prob"]) == 0
    out = capsys.readouterr().out
    assert "forget -> generation 1" in out and "aggregate (mean prob)" in out
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {m["event"] for m in metrics} >= {"train_slice", "forget"}
    capsys.readouterr()
    assert cli(["report", f"run_dir={run_dir}"]) == 0
    assert list((run_dir / "results").glob("history-*.png"))
    # the last test evaluation is reported as such, the validation one beside it (train logs
    # a validation evaluation after the test one: it must not pass for the test accuracy)
    out = capsys.readouterr().out
    last_test = [
        m for m in metrics if m["event"] == "evaluate" and m.get("split", "test") == "test"
    ]
    assert f"Last test evaluation (generation {last_test[-1]['generation']})" in out
    assert "Last validation evaluation" in out


def test_validation_split_from_the_command_line(tmp_path, capsys):
    run_dir = tmp_path / "a"
    assert cli(["train", f"run_dir={run_dir}", *TINY]) == 0
    out = capsys.readouterr().out
    assert "validation accuracy (vote)" in out
    (train,) = (run_dir / "results").glob("train-*.json")
    val = json.loads(train.read_text())["validation"]
    run = sj.open_run(run_dir)
    assert val["num_examples"] == len(run.val_data()[0]) > 0
    assert cli(["evaluate", f"run_dir={run_dir}", "split=val"]) == 0
    out = capsys.readouterr().out
    assert f"validation accuracy, {val['num_examples']} examples" in out
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in records if r["event"] == "evaluate" and r["split"] == "val"]
    assert len(vals) == 2 and vals[0]["vote_accuracy"] == val["vote_accuracy"]
    # a validation id is forgotten without retraining; a bad split is refused
    vid = int(run.val_data()[0][0])
    assert cli(["forget", f"run_dir={run_dir}", f"ids=[{vid}]", "progress=false"]) == 0
    assert vid not in sj.open_run(run_dir).val_data()[0]
    assert cli(["evaluate", f"run_dir={run_dir}", "split=train"]) == 2
    assert "split must be test or val" in capsys.readouterr().err
    assert cli(["train", f"run_dir={tmp_path / 'b'}", *TINY, "data.val_fraction=0.7"]) == 2


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    code = cli(
        [
            "demo",
            f"run_dir={tmp_path / 'demo'}",
            "data.params.n_train=3000",
            "data.params.n_test=300",
            "sisa.shards=4",
            "sisa.slices=3",
            "sisa.epochs=4",
            "num_forget=3",
            "progress=false",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "bit-identical" in out and "speedup vs full retrain" in out
    assert (tmp_path / "demo" / "demo.png").is_file()


def test_the_demo_deletes_only_its_own_runs(tmp_path, capsys):
    """The demo starts its runs ``<run_dir>/sisa`` and ``full_retrain`` from scratch: a folder
    there that is not a sisajax run (a user's files) is refused with one line, not deleted."""
    from sisajax.store.run_dir import remove_run_dir

    notes = tmp_path / "demo" / "sisa" / "notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("precious")
    assert cli(["demo", f"run_dir={tmp_path / 'demo'}", *TINY]) == 2
    assert "is not a sisajax run: not deleted" in capsys.readouterr().err
    assert notes.read_text() == "precious"
    # a run (or an empty folder) is removed; links and files are refused
    assert cli(["train", f"run_dir={tmp_path / 'run'}", *TINY]) == 0
    assert remove_run_dir(tmp_path / "run") and not (tmp_path / "run").exists()
    (tmp_path / "link").symlink_to(notes.parent)
    with pytest.raises(sj.UserInputError):
        remove_run_dir(tmp_path / "link")
    assert notes.exists() and not remove_run_dir(tmp_path / "absent")


def test_training_writes_metrics_and_tensorboard_events(tmp_path):
    d = tmp_path / "run"
    assert cli(["train", f"run_dir={d}", *TINY, "tensorboard=true"]) == 0
    from sisajax.metrics import read_metrics

    slices = read_metrics(d, "train_slice")
    assert len(slices) == 3 * 2 and all(r["loss"] > 0 for r in slices)  # every (shard, slice)
    events = list((d / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboardX.event_file_writer import EventFileWriter  # noqa: F401  (the writer used)


def test_api_names_are_functions_even_after_their_modules_load():
    import sisajax.auditing  # noqa: F401
    import sisajax.verification  # noqa: F401

    assert callable(sj.audit) and callable(sj.verify) and callable(sj.forget)


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"]])
def test_a_closed_output_pipe_is_not_reported_as_a_storage_error(args):
    """``sisajax ... | head`` where head has gone: no 'file system' error, no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the command writes anything
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "sisajax.cli", *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            env=cli_env(),
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == ""


@pytest.mark.slow
def test_ctrl_c_during_train_says_what_happened_and_resume_finishes(tmp_path):
    """Ctrl-C while a new run trains, after its first slice steps: exit 130, one true line (the
    completed slice steps are kept); `sisajax resume` finishes the run from them."""
    import signal
    import time

    from sisajax.store.interrupted import INTERRUPTED

    def interrupted_train(run_dir, epochs: int) -> subprocess.Popen:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                # A suite started as a background job of a non-interactive shell inherits SIGINT
                # ignored, and so would the command (Python then installs no Ctrl-C handler):
                # give it the default disposition, as a terminal's foreground job has.
                "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                "os.execv(sys.executable, [sys.executable, '-m', 'sisajax.cli', *sys.argv[1:]])",
                "train",
                "data=digits",
                "sisa.shards=2",
                "sisa.slices=8",
                f"sisa.epochs={epochs}",
                "progress=false",
                f"run_dir={run_dir}",
            ],
            cwd=REPO,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # slice steps 0 and 1 are 3/36 of the work: the interrupt lands with most of it left
        deadline = time.time() + 120
        done = ["checkpoints/s000r001.g000000.row", "checkpoints/s001r001.g000000.row"]
        while time.time() < deadline and not all((run_dir / f).exists() for f in done):
            time.sleep(0.05)
        assert all((run_dir / f).exists() for f in done), "training never finished slice step 1"
        proc.send_signal(signal.SIGINT)
        return proc

    # a machine fast enough to finish before the signal lands gets a longer run, not a skip
    for attempt, epochs in enumerate((400, 2000)):
        run_dir = tmp_path / f"r{attempt}"
        proc = interrupted_train(run_dir, epochs)
        out, err = proc.communicate(timeout=120)
        if proc.returncode != 0:
            break
    assert proc.returncode == 130, out + err  # 0: both runs ended before the signal landed
    assert len(err.strip().splitlines()) == 1 and "keeps its completed slice steps" in err
    record = json.loads((run_dir / INTERRUPTED).read_text())
    assert 2 <= record["completed"] < 8
    code = subprocess.run(
        [sys.executable, "-m", "sisajax.cli", "resume", f"run_dir={run_dir}", "progress=false"],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert code.returncode == 0, code.stdout + code.stderr
    assert f"from slice step {record['completed']}" in code.stdout
    run = sj.open_run(run_dir)
    assert run.manifest.origin["continued_after_slice_steps"] == record["completed"]
    assert not (run_dir / INTERRUPTED).exists()
    assert sj.verify(run, shards=[1], write=False).ok  # bit-identical to training from scratch


@pytest.mark.parametrize(
    ("section", "group_file"),
    [
        ("sisa", "sisa/default.yaml"),
        ("optim", "optim/sgd.yaml"),
        ("model", "model/mlp.yaml"),
        ("ledger", "ledger/default.yaml"),
    ],
)
def test_yaml_defaults_equal_the_dataclass_defaults(section, group_file):
    """What `sisajax train` composes by default is what `sj.RunConfig()` means in Python: every
    key of the default group file has the dataclass's default, and no field is missing (the seed
    lives at the top level, `seed: 0`)."""
    import dataclasses

    import yaml

    from sisajax.config import SECTIONS

    cls = SECTIONS[section]
    yml = yaml.safe_load((conf_dir() / group_file).read_text())
    defaults = {
        f.name: (list(v) if isinstance(v := getattr(cls(), f.name), tuple) else v)
        for f in dataclasses.fields(cls)
    }
    if section == "sisa":
        assert compose("train", [])["seed"] == defaults.pop("seed")
    assert yml == defaults


def test_a_users_config_folder_comes_before_the_packaged_configs(tmp_path, monkeypatch, capsys):
    """``--config-dir`` (and ``SISAJAX_CONFIG_PATH``) files replace packaged ones of the same
    name (a data preset, the command's own config) and add new options; without them the
    packaged defaults are back."""
    conf = tmp_path / "conf"
    (conf / "data").mkdir(parents=True)
    (conf / "data" / "digits.yaml").write_text(
        "name: digits\nparams:\n  test_fraction: 0.3\nval_fraction: 0.25\n"
    )
    (conf / "data" / "mydigits.yaml").write_text("name: digits\nparams: {}\nval_fraction: 0.05\n")
    base = compose("train", [])
    mine = compose("train", [], [str(conf)])
    assert mine["data"]["params"] == {"test_fraction": 0.3} and mine["data"]["val_fraction"] == 0.25
    assert compose("train", ["data=mydigits"], [str(conf)])["data"]["val_fraction"] == 0.05
    assert compose("train", []) == base  # nothing left behind for the next command
    (conf / "train.yaml").write_text(
        (conf_dir() / "train.yaml").read_text().replace("runs/default", "runs/mine")
    )
    monkeypatch.setenv("SISAJAX_CONFIG_PATH", str(conf))
    assert cli(["train", "--cfg", "job"]) == 0
    assert "run_dir: runs/mine" in capsys.readouterr().out
