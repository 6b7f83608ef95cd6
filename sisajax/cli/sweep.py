"""Sweeps: ``sisajax train -m ...`` and ``sisajax paper -m ...`` through Hydra's own multirun.

One implementation for every sweeping command (and the ``sisajax-sweep`` alias of
``sisajax train -m``): Hydra's sweeper expands the override lists, its launcher runs the jobs
(``hydra/launcher=parallel`` for local processes via joblib, ``hydra/launcher=slurm`` via
submitit), each job composes and validates its config exactly as a single run would and runs the
command in its own job folder (``hydra.sweep.dir``/``hydra.sweep.subdir``; a ``train`` job's
run goes to ``<job folder>/run`` unless ``run_dir=`` is given with an interpolation such as
``'run_dir=runs/s${sisa.shards}'``; two jobs of one sweep never share a run directory). Each job
records the result files its command wrote in ``job_result.json``; when the sweep ends,
:class:`SweepReport` (a Hydra callback) merges those results: one row per configuration, mean and
spread over seeds.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
import uuid
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from sisajax.cli.base import (
    UsageError,
    check_sweep_keys,
    compose,
    conf_dir,
    recording_results,
    report_error,
    run_command,
    run_dir_arg,
    search_path,
    use_config_dirs,
)
from sisajax.cli.table import COMMANDS

RESULT = "job_result.json"
CLAIMS = ".run-dirs-"  # + a token per sweep: a folder of the run directories its jobs train in

# Launcher configs (ours and the plugins' own) -> the plugin module that provides them.
LAUNCHER_PLUGINS = {
    "parallel": "hydra_joblib_launcher",
    "joblib": "hydra_joblib_launcher",
    "slurm": "hydra_submitit_launcher",
    "submitit_slurm": "hydra_submitit_launcher",
    "submitit_local": "hydra_submitit_launcher",
}


def check_launcher(overrides: list[str]) -> None:
    """Refuse a ``hydra/launcher=...`` whose Hydra plugin is not installed, with the pip extra
    that installs it (Hydra itself would only fail with an error that points elsewhere).

    Raises:
      UsageError: the launcher's plugin module cannot be imported.
    """
    import importlib.util

    for o in overrides:
        key, _, value = o.lstrip("+").partition("=")
        plugin = LAUNCHER_PLUGINS.get(value.strip()) if key == "hydra/launcher" else None
        if plugin is None:
            continue
        try:
            found = importlib.util.find_spec(f"hydra_plugins.{plugin}") is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise UsageError(
                f"hydra/launcher={value} needs Hydra's {plugin.replace('_', '-')} plugin, which is "
                "not installed: pip install 'sisajax[cluster]'"
            )


def check_shared_run_dir(overrides: list[str]) -> None:
    """Refuse, before any job starts, a ``train`` sweep whose ``run_dir=`` gives two or more jobs
    the same run directory (``run_dir=X seed=0,1``, or ``run_dir=a,a``): a later job would
    train over an earlier one's run (or fail on it). A ``run_dir`` with an interpolation
    (``runs/s${seed}``) is known only once each job composes its config: :func:`claim_run_dir`
    checks those.

    Raises:
      UsageError: naming the run directory and how many jobs it would serve.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:  # a malformed override: Hydra reports it when the sweep starts
        return
    given = [o for o in parsed if o.key_or_group == "run_dir" and not o.is_hydra_override()]
    if not given or given[-1].is_delete():
        return
    override = given[-1]
    try:
        values = (
            list(override.sweep_string_iterator())
            if override.is_sweep_override()
            else [run_dir_arg(override.value())]
        )
        per_value = math.prod(
            len(list(o.sweep_string_iterator()))
            for o in parsed
            if o is not override and o.is_sweep_override() and not o.is_hydra_override()
        )
    except HydraException:  # a sweep only the sweeper enumerates (glob): each job checks
        return
    chdir = any(
        o.key_or_group == "hydra.job.chdir" and not o.is_sweep_override() and o.value() is True
        for o in parsed
    )
    if any("${" in v or (chdir and not Path(v).expanduser().is_absolute()) for v in values):
        return  # each job's own folder or config decides: each job checks
    jobs: dict[Path, int] = defaultdict(int)
    for v in values:
        jobs[Path(v).expanduser().resolve()] += per_value
    for v in values:
        n = jobs[Path(v).expanduser().resolve()]
        if n > 1:
            raise UsageError(
                f"run_dir={v} would be the run directory of {n} jobs of the sweep, and a run "
                "directory holds one run: give each job its own (e.g. "
                "'run_dir=runs/seed${seed}') or leave run_dir out (each job then trains in its "
                "job folder)"
            )


def claim_run_dir(claims: Path, run_dir: Any, job: int) -> None:
    """Record that job number ``job`` of the sweep trains in ``run_dir`` (one file per run
    directory in the sweep's ``claims`` folder, created exclusively, so jobs running at the same
    time on a shared file system cannot both claim one).

    Raises:
      UsageError: another job of the sweep claimed ``run_dir`` first.
    """
    path = run_dir_arg(run_dir)
    real = Path(path).expanduser().resolve()
    claims.mkdir(parents=True, exist_ok=True)
    claim = claims / hashlib.sha256(str(real).encode()).hexdigest()[:32]
    try:
        fd = os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        other = claim.read_text().strip() or "?"
        raise UsageError(
            f"run_dir={path} is already the run directory of job {other} of this sweep, and a "
            "run directory holds one run: give each job its own (e.g. "
            "'run_dir=runs/seed${seed}') or leave run_dir out"
        ) from None
    with os.fdopen(fd, "w") as f:
        f.write(str(job))


@contextmanager
def _argv(args: list[str]):
    saved = sys.argv
    sys.argv = args
    try:
        yield
    finally:
        sys.argv = saved


def multirun(name: str, overrides: list[str], config_dirs: list[str]) -> int:
    """Run ``sisajax NAME -m overrides`` with Hydra's sweeper and launcher; 0 if every job
    succeeded, 1 otherwise."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    check_launcher(overrides)
    check_sweep_keys(name, overrides, config_dirs)
    if name == "train":
        check_shared_run_dir(overrides)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    claims = f"{CLAIMS}{stamp}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    args = list(overrides)
    keys = {a.lstrip("+~").split("=", 1)[0] for a in args}
    if "hydra.sweep.dir" not in keys:
        args.append(f"hydra.sweep.dir=multirun/{name}/{stamp}")
    for group in ("hydra/job_logging", "hydra/hydra_logging"):
        if group not in keys:
            args.append(f"{group}=none")
    args.append("+hydra.callbacks.sisajax_report._target_=sisajax.cli.sweep.SweepReport")
    args.append(f"+hydra.callbacks.sisajax_report.command={name}")
    args.append(f"+hydra.callbacks.sisajax_report.claims={claims}")
    use_config_dirs(search_path(list(config_dirs)))  # searched before the packaged configs

    def task(cfg) -> dict[str, Any]:
        hc = HydraConfig.get()
        out = Path(hc.runtime.output_dir)
        job_overrides = list(hc.overrides.task)
        code, error, written = 0, None, []
        try:
            job_cfg = compose(
                name, [o for o in job_overrides if not o.startswith("hydra")], config_dirs
            )
            user_keys = {o.lstrip("+~").split("=", 1)[0] for o in job_overrides}
            if name == "train" and "run_dir" not in user_keys:
                job_cfg["run_dir"] = str(out / "run")
            if name == "train":
                sweep_dir = Path(hc.runtime.cwd) / hc.sweep.dir  # the same with hydra.job.chdir
                claim_run_dir(sweep_dir / claims, job_cfg["run_dir"], hc.job.num)
            if name == "paper":
                job_cfg.setdefault("experiment", {})["out_dir"] = str(out)
            with recording_results(written):
                code = run_command(COMMANDS[name], job_cfg, job_overrides)
        except Exception as e:  # noqa: BLE001 - a job's failure is reported, the sweep goes on
            code, error = report_error(e), str(e)
            job_cfg = None
        result = {
            "command": name,
            "overrides": job_overrides,
            "exit_code": code,
            "error": error,
            "run_dir": job_cfg.get("run_dir") if job_cfg else None,
            "result_files": [str(p) for p in written],  # what aggregation reads
        }
        (out / RESULT).write_text(json.dumps(result, indent=1))
        return result

    app = hydra.main(config_path=str(conf_dir()), config_name=name, version_base="1.3")(task)
    with _argv([f"sisajax-{name}", "-m", *args]):
        try:
            app()
        except SystemExit as e:
            if e.code not in (0, None):
                raise UsageError(
                    f"the sweep could not start (Hydra exit code {e.code}; see above)"
                ) from None
    return SweepReport.last_exit_code


def _stats(values: list[float]) -> tuple[float, float, int]:
    vals = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan"), 0
    mean = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, sd, len(vals)


def aggregate_jobs(sweep_dir: Path) -> tuple[list[dict[str, Any]], int]:
    """Merge the train results of a sweep's jobs: one row per configuration (the overrides minus
    ``seed``), with mean, standard deviation and count over seeds. Returns (rows, failed jobs)."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    failed = 0
    for path in sorted(sweep_dir.rglob(RESULT)):
        job = json.loads(path.read_text())
        if job["exit_code"]:
            failed += 1
            continue
        key = " ".join(o for o in job["overrides"] if not o.lstrip("+").startswith("seed="))
        train = _own_result(job, "train-")
        if train is not None and "evaluation" in train:
            groups[key or "(defaults)"].append(train)
    rows = []
    for key, results in groups.items():
        row: dict[str, Any] = {"config": key, "seeds": [r.get("seed") for r in results]}
        for name, get in (
            ("vote", lambda r: r["evaluation"]["vote_accuracy"]),
            ("mean_prob", lambda r: r["evaluation"]["mean_prob_accuracy"]),
            ("train_wall_s", lambda r: r["cost"]["wall_s"]),
            ("train_examples", lambda r: r["cost"]["examples"]),
        ):
            mean, sd, n = _stats([get(r) for r in results])
            row[name], row[f"{name}_sd"], row["n"] = mean, sd, n
        rows.append(row)
    return rows, failed


def _own_result(job: dict[str, Any], prefix: str) -> dict[str, Any] | None:
    """The last result file named ``prefix...`` that the job itself wrote (its record names
    them; another command may have written newer ones in the same run directory), or None."""
    files = [Path(f) for f in job.get("result_files") or [] if Path(f).name.startswith(prefix)]
    if not files:
        return None
    try:
        return json.loads(files[-1].read_text())
    except (OSError, ValueError):  # removed or damaged since: the job is left out of the table
        return None


class SweepReport(Callback):
    """Hydra callback: after a multirun, merge the jobs' results and print a table."""

    last_exit_code = 0

    def __init__(self, command: str = "train", claims: str | None = None):
        self.command = command
        self.claims = claims

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if self.claims:  # the jobs are done: their run directories' claims are not needed
            shutil.rmtree(sweep_dir / self.claims, ignore_errors=True)
        jobs = [json.loads(p.read_text()) for p in sorted(sweep_dir.rglob(RESULT))]
        failed = sum(1 for j in jobs if j["exit_code"])
        SweepReport.last_exit_code = 1 if failed or not jobs else 0
        if self.command == "paper":
            from sisajax.experiments.report import make_report

            if any(sweep_dir.rglob("results.json")):
                report = make_report(sweep_dir)
                print(report.read_text())
        else:
            rows, _ = aggregate_jobs(sweep_dir)
            (sweep_dir / "sweep.json").write_text(json.dumps(rows, indent=1))
            if rows:
                from sisajax.console import print_table

                print_table(
                    f"sweep of {len(jobs)} job(s) in {sweep_dir} (mean ± sd over seeds)",
                    [
                        (
                            r["config"],
                            str(r["n"]),
                            f"{r['vote']:.4f} ± {r['vote_sd']:.4f}",
                            f"{r['mean_prob']:.4f} ± {r['mean_prob_sd']:.4f}",
                            f"{r['train_wall_s']:.1f}s",
                        )
                        for r in rows
                    ],
                    ("config", "seeds", "vote accuracy", "mean-prob accuracy", "train wall"),
                )
        print(f"{len(jobs)} job(s), {failed} failed; results under {sweep_dir}", flush=True)
