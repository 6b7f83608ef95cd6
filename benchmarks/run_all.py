"""Run every benchmark, each in its own process, then collect their markdown into SUMMARY.md.

    python -m benchmarks.run_all [--quick] [--only train,layouts,forget,cli,scaling,profile]

What ``make bench`` runs. Full size takes about 50 minutes on 2 CPU cores (the scaling sweep ~20
of them); ``--quick`` (``make bench QUICK=1``) about 2 minutes. Options after ``--`` go to every benchmark.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from benchmarks import common as C

BENCHMARKS = {
    "train": "bench_train",
    "layouts": "bench_layouts",
    "forget": "bench_forget",
    "cli": "bench_cli",
    "scaling": "bench_scaling",
    "profile": "profile_phases",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    passthrough: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, passthrough = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", default=",".join(BENCHMARKS))
    p.add_argument("--out", default=None)
    p.add_argument(
        "--summary-only",
        action="store_true",
        help="only rebuild SUMMARY.md from the .md files (and the verdicts, from the .json files)",
    )
    args = p.parse_args(argv)
    common = (["--quick"] if args.quick else []) + (["--out", args.out] if args.out else [])
    out = C.RESULTS / "quick" if args.quick and not args.out else (args.out or C.RESULTS)
    failed, done = [], []
    t0 = time.perf_counter()
    for key in [] if args.summary_only else args.only.split(","):
        mod = BENCHMARKS[key]
        cmd = [sys.executable, "-m", f"benchmarks.{mod}", *common, *passthrough]
        C.log(" ".join(cmd))
        t = time.perf_counter()
        rc = subprocess.run(cmd, cwd=C.REPO, check=False).returncode
        (failed if rc else done).append(f"{mod} ({time.perf_counter() - t:.0f} s)")
    if args.summary_only:
        line = "Collected from the `<name>.md` files next to this one (each names its command, "
        line += "machine and load)."
    else:
        line = (
            f"`python -m benchmarks.run_all {' '.join(argv)}`: {len(done)} ran, {len(failed)} "
            f"failed, {time.perf_counter() - t0:.0f} s. Each section comes from `<name>.md` next "
            "to this file."
        )
    summary = ["# sisajax benchmarks", "", line, "", "Findings: `docs/performance.md`.", ""]
    from pathlib import Path

    for key in args.only.split(","):
        md = Path(out) / f"{BENCHMARKS[key]}.md"
        if md.is_file():
            summary += [md.read_text(), ""]
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "SUMMARY.md").write_text("\n".join(summary))
    if not args.quick and not args.out:
        # the targets' verdicts, computed from the stored results, into VERDICTS.md and the docs
        from benchmarks import verdicts

        verdicts.main([])
    print(f"ran: {', '.join(done)}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
