"""``sisajax paper | sweep | report``: run the paper's experiments, sweep configs, build reports.

    sisajax paper  experiment=shards [overrides]          one preset (experiments/paper.py)
    sisajax sweep  -m sisa.shards=1,2,5,10,20 [overrides]  a Hydra multirun, one job per config
    sisajax sweep  -m experiment=shards,slices,requests    every listed preset, one job each
    sisajax report outputs/sweeps/2025-01-01_12-00-00     report.md + PNGs from results.json files

Output layout:

* ``sisajax paper``: ``experiment.out_dir`` (default ``outputs/paper/<name>``) holds
  ``results.json``, ``results.csv``, ``report.md`` and ``<name>.png``.
* ``sisajax sweep -m ...``: ``outputs/sweeps/<date>_<time>/`` (override with
  ``hydra.sweep.dir=...``) holds one numbered job directory per config (``0/``, ``1/``, ...),
  each with Hydra's ``.hydra/{config,hydra,overrides}.yaml`` and the files above; the
  sweep directory gets a ``report.md`` merging all jobs (jobs without a preset run
  ``experiment.kind=single``: train, evaluate, optional ``+experiment.k=K`` requests, full
  retrain) and ``sweep.png`` when S varies. Without ``-m``: one job in
  ``outputs/runs/<date>_<time>/`` (``hydra.run.dir=...``).
* ``sisajax report DIR [DIR...]``: (re)writes ``DIR/report.md`` from every ``results.json``
  under ``DIR`` and each experiment's plot next to its ``results.json``.

Usable before these commands are wired into ``experiments/cli.py`` as
``python -m experiments.cmd_paper {paper,sweep,report} [args]``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def cmd_paper(overrides: list[str]) -> int:
    """Compose the config (``experiment=<preset>`` selects one) and run it; print the report."""
    from experiments.cli import compose
    from experiments.paper import run_experiment

    results = run_experiment(compose(overrides))
    if "report" in results["files"]:
        print(Path(results["files"]["report"]).read_text())
    return 0


def _has(args: list[str], key: str) -> bool:
    return _value(args, key) is not None


def _value(args: list[str], key: str) -> str | None:
    """The value of ``key=value`` among Hydra arguments (last one wins), or None."""
    found = None
    for a in args:
        k, _, v = a.lstrip("+~").partition("=")
        if k == key:
            found = v
    return found


def cmd_sweep(overrides: list[str]) -> int:
    """Run ``conf/config.yaml`` through ``hydra.main`` (so ``-m`` sweeps and Hydra's job directories
    work), one :func:`~experiments.paper.run_experiment` per job, then report on the sweep.

    Args:
      overrides: Hydra command-line arguments, e.g. ``["-m", "sisa.shards=1,2,5"]``.

    Returns:
      0 when every job succeeded, else Hydra's exit status.
    """
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from experiments.cli import CONF_DIR, UsageError, console
    from experiments.paper import make_report, run_experiment

    args = list(overrides)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    if not _has(args, "hydra.sweep.dir"):
        args.append(f"hydra.sweep.dir=outputs/sweeps/{stamp}")
    if not _has(args, "hydra.run.dir"):
        args.append(f"hydra.run.dir=outputs/runs/{stamp}")
    # Hydra's own logging set-up would reconfigure (and close) this process's log handlers and
    # route Orbax's INFO chatter to the console; the experiments print their progress instead
    for group in ("hydra/job_logging", "hydra/hydra_logging"):
        if not _has(args, group):
            args.append(f"{group}=none")
    job_dirs: list[Path] = []
    multirun = "-m" in args or "--multirun" in args

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def task(cfg) -> None:
        out = Path(HydraConfig.get().runtime.output_dir)
        job_dirs.append(out)
        run_experiment(OmegaConf.to_container(cfg, resolve=True), out_dir=out)

    saved = sys.argv
    sys.argv = ["sisajax-sweep", *args]
    code: int | str | None = 0
    try:
        task()
    except SystemExit as e:  # Hydra exits on errors (after printing them) and after --help
        code = e.code
    finally:
        sys.argv = saved
    if job_dirs:
        root = job_dirs[0].parent if multirun else job_dirs[0]
    else:  # jobs ran in other processes (e.g. hydra/launcher=parallel), or none ran
        root = Path(str(_value(args, "hydra.sweep.dir" if multirun else "hydra.run.dir")))
    results = sorted(root.rglob("results.json")) if root.is_dir() else []
    if not results:
        if code:
            raise UsageError("the sweep produced no results (see Hydra's message above)")
        return 0
    report = make_report(root)
    print(report.read_text())
    console.print(f"{len(results)} job result(s) under {root}; report: {report}")
    return 0 if not code else int(code) if isinstance(code, int) else 1


def cmd_report(overrides: list[str]) -> int:
    """``sisajax report DIR [DIR...]`` (or ``dir=DIR``; default ``outputs``): write
    ``DIR/report.md`` and the plots from every ``results.json`` under each directory."""
    from experiments.cli import UsageError, console
    from experiments.paper import make_report

    dirs = [a.split("=", 1)[1] if a.startswith("dir=") else a for a in overrides] or ["outputs"]
    for d in dirs:
        if "=" in d or d.startswith("-"):
            raise UsageError(f"sisajax report takes result directories, got {d!r}")
        if not Path(d).is_dir():
            raise UsageError(f"{d} is not a directory")
        try:
            path = make_report(d)
        except FileNotFoundError as e:
            raise UsageError(str(e)) from e
        print(path.read_text())
        console.print(f"report: {path}")
    return 0


COMMANDS = {"paper": cmd_paper, "sweep": cmd_sweep, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    """``python -m experiments.cmd_paper {paper,sweep,report} [args]`` (same as ``sisajax ...``)."""
    from rich.markup import escape

    from experiments.cli import UsageError, console, setup_jax
    from sisajax import CheckpointError, ConfigError, DataError, PartitionError, RunError

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        console.print(__doc__, markup=False)
        return 2
    setup_jax()
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (UsageError, ConfigError, DataError, PartitionError, RunError, CheckpointError) as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}")
        return 2
    except Exception as e:  # Hydra's override errors: one line, no traceback (as in cli.main)
        if type(e).__module__.startswith(("hydra", "omegaconf")):
            console.print(f"[bold red]error:[/] {escape(str(e))}")
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
