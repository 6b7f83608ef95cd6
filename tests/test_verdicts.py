"""Every performance verdict the documents show is computed from the stored benchmark results."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def verdicts():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(ROOT))
        from benchmarks import verdicts

        yield verdicts


def test_the_documents_tables_are_those_of_the_stored_results(verdicts):
    """README and docs/performance.md hold exactly the table the stored results give."""
    assert verdicts.main(["--check"]) == 0


def test_a_stale_document_is_caught_and_rewritten(verdicts, tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n{verdicts.BEGIN}\n| met | typed by hand |\n{verdicts.END}\nafter\n")
    assert verdicts.main(["--check", "--docs", str(doc)]) == 1
    assert verdicts.main(["--docs", str(doc), "--results", str(verdicts.C.RESULTS)]) == 0
    text = doc.read_text()
    assert "typed by hand" not in text and text.startswith("intro\n") and text.endswith("after\n")
    assert verdicts.render(verdicts.evaluate()) in text
    assert verdicts.main(["--check", "--docs", str(doc)]) == 0


def _results_copy(tmp_path: Path, verdicts) -> Path:
    out = tmp_path / "results"
    out.mkdir()
    for p in verdicts.C.RESULTS.glob("*.json"):
        shutil.copy(p, out / p.name)
    return out


def _row(rows, measure):
    (r,) = [r for r in rows if r["measure"] == measure]
    return r


def test_verdicts_follow_the_stored_numbers(verdicts, tmp_path):
    """Slower stored forgets give a lower value and flip the verdict: nothing is typed."""
    res_dir = _results_copy(tmp_path, verdicts)
    single = "one-id forget in process: measured / analytic speedup"
    before = _row(verdicts.evaluate(res_dir), single)
    path = res_dir / "bench_forget.json"
    stored = json.loads(path.read_text())
    for scale, want in ((0.5, "met"), (4.0, "missed")):
        changed = json.loads(json.dumps(stored))
        for s in changed["results"]["singles"]:
            s["steady_s"] *= scale
        path.write_text(json.dumps(changed))
        after = _row(verdicts.evaluate(res_dir), single)
        assert after["value"] == pytest.approx(before["value"] / scale)
        assert after["verdict"] == want


def test_the_baseline_is_the_fastest_layout_of_the_full_retrain(verdicts):
    res = {
        "layout": "serial",
        "full_retrain": [
            {"layout": "serial", "steady_s": 10.0},
            {"layout": "per-core", "steady_s": 8.0},
            {"layout": "serial", "steady_s": 12.0},
            {"layout": "per-core", "steady_s": 9.0},
        ],
    }
    assert verdicts.full_retrain_baseline(res) == (8.5, "per-core")


def test_a_missing_result_is_not_measured_rather_than_met(verdicts, tmp_path):
    rows = verdicts.evaluate(tmp_path)  # an empty results folder
    assert rows and all(r["verdict"] == "not measured" for r in rows)


def test_target_limits(verdicts):
    t = verdicts.Target("m", "x", 1.0, True, lambda s: (None, ""))
    assert [t.verdict(v) for v in (0.5, 1.0, 1.5, None)] == ["met", "met", "missed", "not measured"]
    t = verdicts.Target("m", "x", 0.95, False, lambda s: (None, ""))
    assert [t.verdict(v) for v in (0.94, 0.95)] == ["missed", "met"]


def test_gpu_rows_read_only_runs_of_the_shipped_flags(verdicts, tmp_path):
    res_dir = _results_copy(tmp_path, verdicts)
    names = {n for n, _ in verdicts.gpu_runs(res_dir)}
    for n in names:
        flags = json.loads((res_dir / n).read_text())["xla_flags"]
        assert "command_buffer" not in flags
    stored = json.loads((res_dir / "gpu.json").read_text())
    other = dict(stored, xla_flags=stored["xla_flags"] + " --xla_gpu_autotune_level=0")
    (res_dir / "gpu_other_flags.json").write_text(json.dumps(other))
    assert "gpu_other_flags.json" not in {n for n, _ in verdicts.gpu_runs(res_dir)}


def test_gpu_rows_show_the_latest_run_that_measured_it(verdicts, tmp_path):
    res_dir = _results_copy(tmp_path, verdicts)
    measure = "one-id forget, mean (compile excluded)"
    stored = json.loads((res_dir / "gpu.json").read_text())
    newer = dict(stored, run={"started": "2099-01-01T00:00:00+0000"})
    for f in newer["forget_single"]:
        f["wall_s"] = f["compile_s"] + 0.1  # a faster program, measured later
    (res_dir / "gpu_new.json").write_text(json.dumps(newer))
    assert [n for n, _ in verdicts.gpu_runs(res_dir)][-1] == "gpu_new.json"
    row = _row(verdicts.evaluate(res_dir), measure)
    assert row["source"] == "gpu_new.json" and row["value"] == pytest.approx(0.1)
    assert row["verdict"] == "met" and "earlier runs" in row["how"]


def test_the_per_shard_loop_ratio_leaves_compile_out(verdicts):
    from benchmarks.gpu_report import loop_train_s

    assert loop_train_s({"wall_s": 9.0, "compile_s": 2.0, "train_s": 7.0}) == 7.0
    g = {"train_loop": {"wall_s": 9.0, "compile_s": 2.0, "train_s": 7.0}}
    g["train_vmap"] = {"retrain_s": 0.5}
    assert verdicts.gpu_loop(g) == pytest.approx(14.0)
