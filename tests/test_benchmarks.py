"""The benchmarks run end to end at ``--quick`` size and write their result files.

These are not timed tests: they check that every benchmark command works (and a few facts that
hold at any size), so `make bench` does not break silently. Each benchmark's ``main`` runs
in-process (the CLI and scaling benchmarks start their own subprocesses, as at full size).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """``run(module, *args)``: run ``benchmarks.<module>.main`` at quick size into a temp dir."""
    base = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(ROOT))
        import importlib

        def run(module: str, *args: str) -> dict:
            mod = importlib.import_module(f"benchmarks.{module}")
            argv = ["--quick", "--out", str(base / "out"), "--work", str(base / "work")]
            argv += ["--cache", str(base / "cache"), *args]
            assert mod.main(argv) == 0
            payload = json.loads((base / "out" / f"{module}.json").read_text())
            assert (base / "out" / f"{module}.md").read_text().startswith(f"## {module}")
            assert payload["machine"]["cpu"] and payload["machine"]["cores"] >= 1
            assert payload["versions"]["jax"] and payload["workload"]["quick"] is True
            assert payload["tables"] and all(t["rows"] for t in payload["tables"])
            return payload

        run.out = base / "out"
        yield run


def test_bench_train(bench):
    res = bench("bench_train", "--configs", "4x3", "--execs", "map,vmap")["results"]
    assert res["single"]["shards"] == 1 and res["single"]["cost"]["examples"] > 0
    by_exec = {e["sisa"]["shard_exec"]: e for e in res["configs"]}
    assert set(by_exec) == {"map", "vmap"}
    for e in by_exec.values():
        c = e["sisa"]["cost"]
        assert c["shard_slices"] == 4 * 3 and c["save_s"] > 0 and e["sisa"]["checkpoint_bytes"] > 0
        assert e["loop"]["examples"] == c["examples"]  # same work, one shard at a time
    # lax.map gives every shard the same bits whatever the width (exact unlearning relies on it)
    assert by_exec["map"]["loop"]["bit_identical_to_sisa"]


def test_bench_forget(bench):
    from sisajax.costs import expected_speedup_single

    res = bench("bench_forget", "--ids", "2", "--ks", "1,3")["results"]
    assert len(res["singles"]) == 2
    assert all(len(s["ids"]) == 1 and len(s["restart"]) == 1 for s in res["singles"])
    assert res["summary"]["analytic_speedup"] == pytest.approx(expected_speedup_single(4, 3))
    assert res["summary"]["forget_steady_mean_s"] > 0 and res["full_retrain"][0]["steady_s"] > 0
    # the process restarted itself in the serial layout; the baseline ran in every layout at
    # each point, and the speedup divides the fastest layout's mean
    assert res["layout"] == "serial" and set(res["baseline_layouts"]) == {
        "serial",
        "per-core",
        "one-device",
    }
    assert sorted(f["layout"] for f in res["full_retrain"]) == sorted(res["baseline_layouts"])
    by_layout = res["summary"]["full_retrain_steady_by_layout_s"]
    assert res["summary"]["full_retrain_steady_s"] == min(by_layout.values())
    assert res["summary"]["full_retrain_layout"] == min(by_layout, key=by_layout.get)
    # each batch forgotten in both layouts from identical copies: the same ids, the same work
    by = {(b["k"], b["layout"]): b for b in res["batched"]}
    assert set(by) == {(k, lay) for k in (1, 3) for lay in ("serial", "per-core")}
    for k in (1, 3):
        a, b = by[k, "serial"], by[k, "per-core"]
        assert a["ids"] == b["ids"] and a["restart"] == b["restart"]
        assert a["cost"]["examples"] == b["cost"]["examples"]


def test_bench_cli(bench):
    from benchmarks.bench_cli import VARIANTS

    res = bench("bench_cli", "--warm-repeats", "1")["results"]
    calls = res["calls"]
    assert [c["cache"] for c in calls] == ["cold"] + ["warm"] * (1 + len(VARIANTS))
    assert [c["profiled"] for c in calls] == [True, True] + [False] * len(VARIANTS)
    for c in calls:
        assert c["total_s"] > c["cost"]["wall_s"] > 0
        assert (c["imports_s"] or 0) > 0 if c["profiled"] else c["imports_s"] is None
    plain = {c["variant"]: c for c in calls[2:]}
    assert set(plain) == set(VARIANTS)  # one id, forgotten by every variant from equal copies
    assert (
        len({(c["examples"], json.dumps(c["cost"]["shard_slices"])) for c in plain.values()}) == 1
    )
    if hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) > 1:
        assert plain["shipped"]["process"] == {"platform": "cpu", "devices": 1, "serial": True}
        before = plain["before (device per core, no store)"]["process"]
        assert before["devices"] > 1 and not before["serial"]
    # the layouts' serve processes are paired: both served each round's ids, in one order
    rounds = {}
    for x in res["serve_layouts"]:
        rounds.setdefault(x["round"], {})[x["layout"]] = x["requests"]
    assert len(rounds) == 2 and all(set(r) == {"default", "serial"} for r in rounds.values())
    from benchmarks.bench_cli import paired_layout_ratios

    assert len(paired_layout_ratios(res["serve_layouts"])) == 2  # a pair per round after warm-up
    sv = res["serve"]  # one long-lived process served every request exactly once
    assert sv["requests"] == 3 and [r["request"] for r in sv["responses"]] == [1, 2, 3]
    assert all(r["ok"] and r["forgotten"] == 1 and r["overhead_s"] >= 0 for r in sv["responses"])


def test_bench_layouts(bench):
    res = bench("bench_layouts")["results"]
    (rnd,) = res["rounds"]
    assert rnd["SISA, 1 device per core (default)"]["cost"]["shard_slices"] == 4 * 3
    assert rnd["single model, 1 device on all cores"]["devices"] == 1
    single = [v for k, v in rnd.items() if k.startswith("single") and "cost" in v]
    assert single and all(v["cost"]["shard_slices"] == 1 for v in single)
    assert res["per_round"][0]["sisa_over_best_single"] > 0


def test_bench_scaling(bench):
    res = bench("bench_scaling")["results"]
    points = res["points"]
    assert {(p["S"], p["R"]) for p in points} == {(1, 1), (2, 2)}
    assert all("error" not in p and p["peak_rss_mb"] > 0 for p in points)
    assert all(p["measured_speedup"] > 0 for p in points)
    # the full model trained in each baseline layout; the fastest is every speedup's baseline
    full = [p for p in points if (p["S"], p["R"]) == (1, 1)]
    assert sorted(p["layout"] for p in full) == ["per-core", "serial"]
    fastest = min(full, key=lambda p: p["train_steady_s"])
    assert [p for p in full if p.get("fastest_baseline")] == [fastest]
    (sisa,) = [p for p in points if (p["S"], p["R"]) == (2, 2)]
    assert sisa["full_layout"] == fastest["layout"] and sisa["forget_layout"] == "serial"
    assert sisa["full_steady_s"] == fastest["train_steady_s"]
    assert sisa["forget_process_peak_rss_mb"] > 0 and len(sisa["forgets"]) == 2
    assert (bench.out / "bench_scaling.png").stat().st_size > 0


# Phases of benchmarks/profile_phases.py that legitimately may not run in the quick run (each
# forget there is one random id). Any other phase that is not seen means the phase list went stale.
PROFILE_MAY_NOT_RUN = {
    "train": {
        "cache misses: real compiles (backend_compile_and_load)": "an earlier test compiled them",
    },
    "forget": {
        "initial states (init_state, incl. its jit compile)": "only a restart at slice 0 needs it",
        "check of the kept rows and restore of the restart row (SisaRun.check_shard)": (
            "only a restart after slice 0 reads one"
        ),
        "read + sha256 + decode (rows.read_row)": "only a restart after slice 0 reads a row",
        "all: XLA compile or cache load (compile_or_get_cached)": "the warm-up forget compiled",
        "cache misses: real compiles (backend_compile_and_load)": "the warm-up forget compiled",
    },
}


def test_profile_phases(bench):
    res = bench("profile_phases", "--forgets", "2")["results"]
    assert dict(res["train"]["rows"])["sj.train total"] > 0
    assert dict(res["forget"]["rows"])["sj.forget total"] > 0
    for what in ("train", "forget"):
        r = res[what]
        assert r["undefined"] == [], f"{what}: phases name functions that no longer exist"
        allowed = PROFILE_MAY_NOT_RUN.get(what, {})
        stale = [p for p in r["not_seen"] if p not in allowed]
        assert stale == [], f"{what}: phases never seen in the profile: {stale}"
        assert r["writer_threads_profiled"] >= 1  # the writer-thread rows come from these
        writer = [p for p in r["phases"] if p["thread"] == "writer"]
        assert writer and writer[0]["s"] > 0


def test_gpu_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu.sh")], check=True)


@pytest.mark.slow
def test_gpu_script_dry_run_on_this_backend(tmp_path):
    """The GPU check's CPU dry run: the same script and code path, tiny sizes, so it is known to
    work the day a GPU is lent."""
    import os
    import sys

    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (md,) = tmp_path.glob("gpu_dry_run_*.md")
    text = md.read_text()
    assert "bit for bit" in text and "identical" in text and "batched K=" in text
    # the second vmap training loaded every program the first one stored (no compile)
    (js,) = tmp_path.glob("gpu_dry_run_*.json")
    res = json.loads(js.read_text())
    assert not res["errors"], res["errors"]
    assert res["train_vmap_stored"]["programs_loaded"] >= 2
    assert res["train_vmap_stored"]["compile_s"] < res["train_vmap"]["compile_s"]
    assert "per live step" in text
    # every ResNet variant ran, the batched-matmul convolutions among them
    assert {"single", "sisa_vmap_patches", "sisa_map", "sisa_vmap"} <= set(res["resnet18"])
    assert "vmap, conv as patches / one model" in text
    # the result says where it came from, and the loop's compile is kept out of its ratio
    assert res["run"]["sisajax_source_sha"] and res["run"]["loadavg_end"] is not None
    loop = res["train_loop"]
    assert loop["train_s"] == pytest.approx(loop["wall_s"] - loop["compile_s"])
