"""Crash campaign: SIGKILL ``sisajax forget`` at random moments, resume, and check the result.

    python -m benchmarks.chaos [--trials 40] [--quick]

Trains one run (digits, 5 shards x 4 slices), computes the uninterrupted result of forgetting a
fixed set of ids, then for every trial: copies the run, starts ``sisajax forget`` as a new
process, kills it with SIGKILL after a random delay (uniform between the end of the process's start-up,
measured by a ``sisajax status`` process, and the end of an uninterrupted forget, so the kills
land in the forget itself), runs ``sisajax resume``, and checks that every checkpoint is bit-identical to the
uninterrupted result, that ``audit`` passes, and that the ledger never said ``done`` for work not
done. Writes ``benchmarks/results/chaos.json`` and ``.md``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common as C


def _forget_cmd(run_dir: Path, ids: list[int]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sisajax.cli",
        "forget",
        f"run_dir={run_dir}",
        f"ids=[{','.join(map(str, ids))}]",
        "progress=false",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = C.parser(__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    trials = 3 if args.quick else args.trials
    head = C.header(args, "chaos", C.workload(args))

    import jax
    import numpy as np

    import sisajax as sj

    rng = np.random.default_rng(args.seed)
    env = dict(os.environ, SISAJAX_CPU_DEVICES="1")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = sj.RunConfig(sisa=sj.SisaConfig(shards=5, slices=4, epochs=10))
        base, _ = sj.train(cfg, sj.load_dataset("digits"), tmp / "base", metrics=False)
        ids = [int(base.shard_data(k).ids[j]) for k, j in ((0, 5), (2, 50), (4, 120))]
        ref_dir = tmp / "ref"
        shutil.copytree(base.run_dir, ref_dir)
        warm = tmp / "warm"  # fills the compilation cache: the trials run warm, so must the span
        shutil.copytree(base.run_dir, warm)
        subprocess.run(_forget_cmd(warm, ids), env=env, check=True, capture_output=True)
        shutil.rmtree(warm)
        t0 = time.perf_counter()
        subprocess.run(_forget_cmd(ref_dir, ids), env=env, check=True, capture_output=True)
        span = time.perf_counter() - t0
        t0 = time.perf_counter()
        status = [sys.executable, "-m", "sisajax.cli", "status", f"run_dir={base.run_dir}"]
        subprocess.run(status, env=env, check=True, capture_output=True)
        startup = 0.9 * (time.perf_counter() - t0)
        ref = sj.open_run(ref_dir)
        ref_leaves = [jax.tree.leaves(ref.restore_block(k)) for k in range(ref.num_shards)]
        results = []
        for t in range(trials):
            d = tmp / f"t{t}"
            shutil.copytree(base.run_dir, d)
            delay = float(rng.uniform(min(startup, span), span))
            p = subprocess.Popen(
                _forget_cmd(d, ids), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            time.sleep(delay)
            killed = p.poll() is None
            if killed:
                p.send_signal(signal.SIGKILL)
            p.wait()
            run = sj.open_run(d)
            states = [r["state"] for r in run.ledger.records()]
            never_false_done = ("done" not in states) or run.generation == 1
            # where the kill landed: before the request's pending record, inside the request
            # (pending, not done), or after it was done
            phase = "after done" if "done" in states else "in request" if states else "start-up"
            r = subprocess.run(
                [sys.executable, "-m", "sisajax.cli", "resume", f"run_dir={d}", "progress=false"],
                env=env,
                capture_output=True,
                text=True,
            )
            run = sj.open_run(d)
            if run.generation == 0 and not run.ledger.records():  # killed before the request
                subprocess.run(_forget_cmd(d, ids), env=env, check=True, capture_output=True)
                run = sj.open_run(d)
            same = all(
                np.asarray(a).tobytes() == np.asarray(b).tobytes()
                for k in range(run.num_shards)
                for a, b in zip(jax.tree.leaves(run.restore_block(k)), ref_leaves[k], strict=True)
            )
            ok = sj.audit(run).ok
            results.append(
                {
                    "trial": t,
                    "delay_s": delay,
                    "killed": killed,
                    "phase": phase if killed else "finished",
                    "resume_rc": r.returncode,
                    "bit_identical": same,
                    "audit_ok": ok,
                    "ledger_honest": never_false_done,
                }
            )
            C.log(
                f"trial {t}: kill at {delay:.2f}s ({results[-1]['phase']}) identical={same} audit={ok}"
            )
            shutil.rmtree(d)
    survived = sum(r["bit_identical"] and r["audit_ok"] and r["ledger_honest"] for r in results)
    killed = sum(r["killed"] for r in results)
    summary = {
        "trials": trials,
        "killed_mid_forget": killed,
        "killed_in_request": sum(r["phase"] == "in request" for r in results),
        "killed_in_start_up": sum(r["phase"] == "start-up" for r in results),
        "killed_after_done": sum(r["phase"] == "after done" for r in results),
        "survived": survived,
        "forget_span_s": span,
        "ids": len(ids),
    }
    table = C.Table(
        "SIGKILL at a random moment of `sisajax forget`, then `sisajax resume`",
        ["quantity", "value"],
        note="survived = every checkpoint bit-identical to the uninterrupted forget, "
        "audit PASS, and the ledger never said done before the commit.",
    )
    for k, v in summary.items():
        table.add(k, v)
    C.write_results(args, "chaos", head, [table], {"summary": summary, "trials": results})
    C.show([table], head)
    return 0 if survived == trials else 1


if __name__ == "__main__":
    sys.exit(main())
