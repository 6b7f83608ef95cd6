"""The experiment commands: ``demo``, ``paper``, ``mia`` and ``report`` (glue over
``sisajax.experiments``, which holds one module per experiment kind; listed in
:mod:`sisajax.cli.table`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sisajax.cli.base import UsageError, import_plugins, run_dir_arg
from sisajax.cli.base import open_run as _open
from sisajax.console import say


def cmd_demo(cfg: dict[str, Any], overrides: list[str]) -> int:
    """Train SISA on the Purchase-shaped generator, forget one random id and then a batch,
    verify bit-identity against training from scratch, train the full-retrain baseline, and
    print one table (plot: <run_dir>/demo.png)."""
    from sisajax.experiments.demo import run_demo

    run_dir = run_dir_arg(cfg["run_dir"])
    import_plugins(cfg)
    return run_demo({**cfg, "run_dir": run_dir})


def cmd_paper(cfg: dict[str, Any], overrides: list[str]) -> int:
    """`experiment=shards|slices|requests|dist_aware|transfer|accuracy` with any data set,
    e.g. `sisajax paper experiment=shards data=digits`; sweep with -m."""
    from sisajax.experiments.paper import run_experiment

    import_plugins(cfg)
    results = run_experiment(cfg)
    if "report" in results["files"]:
        print(Path(results["files"]["report"]).read_text())
    return 0


def cmd_mia(cfg: dict[str, Any], overrides: list[str]) -> int:
    """Attack the forget set of a run before `forget`, after it, and on a full retrain (loss,
    confidence and LiRA with shadow SISA ensembles); writes results into mia.out_dir."""
    from sisajax.experiments.mia import run_mia_experiment

    import_plugins(cfg)
    summary = run_mia_experiment(cfg)
    print(summary["markdown"])
    say(f"results: {summary['files']['json']}")
    return 0


def cmd_report(cfg: dict[str, Any], overrides: list[str]) -> int:
    """`run_dir=R`: loss curves, cost per request, accuracy vs requests of one run (read-only);
    `dir=D`: merge every results.json under D into D/report.md and plots."""
    if (cfg["run_dir"] is None) == (cfg["dir"] is None):
        raise UsageError("give exactly one of run_dir=RUN (a run's history) or dir=DIR (results)")
    if cfg["run_dir"] is not None:
        from sisajax.experiments.history import history_report

        run = _open(cfg)
        md, files = history_report(run)
        print(md)
        for f in files:
            say(f"wrote {f}")
        return 0
    from sisajax.experiments.report import make_report

    d = Path(cfg["dir"])
    if not d.is_dir():
        raise UsageError(f"{d} is not a directory")
    try:
        path = make_report(d)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    print(path.read_text())
    say(f"report: {path}")
    return 0
