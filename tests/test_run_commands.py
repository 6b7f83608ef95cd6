"""`sisajax predict` and `sisajax ids`: read-only answers about a run."""

from __future__ import annotations

import numpy as np
import pytest

import sisajax as sj
from sisajax.cli import main as cli
from sisajax.data.inputs import read_features
from sisajax.errors import UserInputError
from sisajax.status import list_ids, locate_ids

TINY = [
    "sisa.shards=3",
    "sisa.slices=2",
    "sisa.epochs=2",
    "sisa.batch_size=8",
    "sisa.chunk_steps=16",
    "model.hidden=[16]",
    "progress=false",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ids") / "run"
    assert cli(["train", f"run_dir={d}", *TINY]) == 0
    run = sj.open_run(d)
    sj.forget(run, [int(run.partition.ids[0]), int(run.val_data()[0][0])], progress=None)
    return d


def test_ids_lists_and_finds_every_kind(run_dir, capsys, tmp_path):
    run = sj.open_run(run_dir)
    part, val = run.partition, run.val_data()[0]
    forgotten = list_ids(run, "forgotten")
    assert len(forgotten) == 2 and not np.isin(forgotten, part.ids).any()
    assert np.array_equal(list_ids(run, "retained"), part.ids)
    assert np.array_equal(list_ids(run, "validation"), np.sort(val))
    one = list_ids(run, "retained", shard=1, slice=0)
    assert len(one) and np.array_equal(one, part.ids[(part.shard == 1) & (part.slice == 0)])
    kept = int(part.ids[5])
    unknown = 10**9
    found = {r["id"]: r for r in locate_ids(run, [kept, int(val[0]), int(forgotten[0]), unknown])}
    k, j = part.locate([kept])
    assert found[kept] == {"id": kept, "status": "retained", "shard": int(k[0]), "slice": int(j[0])}
    assert found[int(val[0])]["status"] == "validation"
    assert found[int(forgotten[0])]["status"] == "forgotten"
    assert found[unknown]["status"] == "unknown"

    out = tmp_path / "ids.txt"
    assert cli(["ids", f"run_dir={run_dir}", "shard=1", f"out={out}"]) == 0
    listed = np.array([int(v) for v in out.read_text().split()])
    assert np.array_equal(listed, part.ids[part.shard == 1])
    assert f"{len(listed):,} retained ids shard=1" in capsys.readouterr().out
    assert cli(["ids", f"run_dir={run_dir}", f"find=[{kept},{unknown}]"]) == 0
    text = capsys.readouterr().out
    assert "retained" in text and "unknown" in text


def test_ids_refuses_what_it_cannot_answer(run_dir, tmp_path, capsys):
    run = sj.open_run(run_dir)
    with pytest.raises(UserInputError, match="shard must be in 0..2"):
        list_ids(run, "retained", shard=3)
    with pytest.raises(UserInputError, match="retained ids only"):
        list_ids(run, "validation", shard=0)
    assert cli(["ids", f"run_dir={run_dir}", "which=everything"]) == 2
    assert cli(["ids", f"run_dir={run_dir}", "find=[x]"]) == 2
    hashed = tmp_path / "hashed"
    assert cli(["train", f"run_dir={hashed}", *TINY, "ledger.hash_ids=true"]) == 0
    capsys.readouterr()
    assert cli(["ids", f"run_dir={hashed}", "which=forgotten"]) == 2
    assert "salted hashes" in capsys.readouterr().err


def test_predict_matches_the_library_and_writes_files(run_dir, tmp_path, capsys):
    run = sj.open_run(run_dir)
    _, x, _ = run.test_data()
    src = tmp_path / "x.npy"
    np.save(src, x[:25])
    out = tmp_path / "pred.npz"
    assert cli(["predict", f"run_dir={run_dir}", f"input={src}", f"out={out}"]) == 0
    z = np.load(out)
    assert np.array_equal(z["labels"], run.predict(x[:25]))
    assert z["proba"].shape == (25, 10) and z["shard_labels"].shape == (3, 25)
    np.testing.assert_allclose(z["proba"].sum(1), 1.0, rtol=1e-5)
    csv_in = tmp_path / "x.csv"
    flat = x[:7].reshape(7, -1)
    csv_in.write_text(
        ",".join(f"f{i}" for i in range(flat.shape[1]))
        + "\n"
        + "\n".join(",".join(repr(float(v)) for v in row) for row in flat)
    )
    csv_out = tmp_path / "pred.csv"
    assert cli(
        ["predict", f"run_dir={run_dir}", f"input={csv_in}", f"out={csv_out}", "aggregation=mean_prob"]
    ) == 0  # fmt: skip
    lines = csv_out.read_text().splitlines()
    assert lines[0] == "index,label,mean_prob" and len(lines) == 8
    got = [int(ln.split(",")[1]) for ln in lines[1:]]
    assert got == run.predict(x[:7], "mean_prob").tolist()
    assert cli(["predict", f"run_dir={run_dir}", "input=test", "show=3"]) == 0
    assert f"{len(x):,} predictions" in capsys.readouterr().out


def test_predict_refuses_bad_input_with_one_line(run_dir, tmp_path, capsys):
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((4, 5), np.float32))
    for args, needle in [
        ([], "needs input="),
        ([f"input={tmp_path / 'missing.npy'}"], "no such file"),
        ([f"input={wrong}"], "the run's are (64,)"),
        ([f"input={wrong.with_suffix('.txt')}"], "no such file"),
    ]:
        assert cli(["predict", f"run_dir={run_dir}", *args]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err
    txt = tmp_path / "x.txt"
    txt.write_text("1,2")
    with pytest.raises(UserInputError, match=r"\.npy, \.npz or \.csv"):
        read_features(txt, (64,), np.float32)
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3\n4,x,6\n")
    with pytest.raises(UserInputError, match="row 2 is not all numbers"):
        read_features(bad, (3,), np.float32)
