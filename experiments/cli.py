"""The ``sisajax`` console script: ``sisajax <command> [hydra overrides...]``.

Thin glue: compose the Hydra config from ``conf/``, turn it into typed library objects, call one
library function, print a table, write a JSON result into the run directory.

    sisajax train    run_dir=runs/a data=digits sisa.shards=8 sisa.slices=4
    sisajax forget   run_dir=runs/a ids=[3,17,256]        (or ids_file=ids.txt)
    sisajax evaluate run_dir=runs/a [sisa.aggregation=mean_prob]
    sisajax status / audit / resume / verify run_dir=runs/a
    sisajax paper experiment=shards                       (presets in conf/experiment/)
    sisajax sweep -m sisa.shards=1,2,5                    (Hydra multirun)
    sisajax report outputs/paper
    sisajax demo                                          (what `make demo` runs)
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
RUN_GROUPS = ("data", "model", "optim", "sisa", "ledger")
console = Console()


class UsageError(ValueError):
    """Bad command-line usage."""


def compose(overrides: list[str], config_name: str = "config") -> dict[str, Any]:
    """Compose ``conf/<config_name>.yaml`` with Hydra overrides into a plain dict."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def run_config_of(cfg: dict[str, Any]):
    from sisajax import RunConfig

    return RunConfig.from_dict({k: cfg[k] for k in RUN_GROUPS})


def overridden_run_keys(overrides: list[str]) -> list[str]:
    """The run-defining keys a user set on the command line (``sisa.shards=3`` -> ``sisa.shards``)."""
    keys = []
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key.split(".")[0] in RUN_GROUPS:
            keys.append(key)
    return keys


def check_against_run(
    overrides: list[str], cfg: dict[str, Any], stored: dict[str, Any], allowed=()
) -> None:
    """Refuse overrides of run-defining keys that differ from the run's stored config."""
    conflicts = []
    for key in overridden_run_keys(overrides):
        if key in allowed:
            continue
        parts = key.split(".")
        mine, theirs = cfg, stored
        for p in parts:
            mine = mine.get(p) if isinstance(mine, dict) else None
            theirs = theirs.get(p) if isinstance(theirs, dict) else None
        if key == "sisa.shard_exec" and mine == "auto":
            continue
        if mine != theirs:
            conflicts.append(f"{key}={mine!r} (the run has {theirs!r})")
    if conflicts:
        raise UsageError(
            "these overrides conflict with the run directory's stored config: "
            + "; ".join(conflicts)
            + ". Drop them, or train a new run."
        )


def progress_factory(enabled: bool):
    """A ``progress(description, total) -> advance(n)`` factory backed by one rich Progress."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    if not enabled:
        return None, _NullCtx()
    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        "steps",
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )

    def factory(desc: str, total: int) -> Callable[[int], None]:
        task = bar.add_task(desc, total=total)
        return lambda n: bar.advance(task, n)

    return factory, bar


class _NullCtx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def read_ids(cfg: dict[str, Any]) -> list[int]:
    """The ids of a forget request from ``ids=[...]`` or ``ids_file=...``."""
    ids, ids_file = cfg.get("ids"), cfg.get("ids_file")
    if (ids is None) == (ids_file is None):
        raise UsageError("give exactly one of ids=[...] or ids_file=PATH")
    if ids is not None:
        return ids if isinstance(ids, list) else [ids]
    path = Path(ids_file)
    if not path.is_file():
        raise UsageError(f"ids_file {path} does not exist")
    if path.suffix == ".npy":
        import numpy as np

        return np.load(path).tolist()
    if path.suffix == ".json":
        return json.loads(path.read_text())
    text = path.read_text().replace(",", " ").split()
    try:
        return [int(t) for t in text]
    except ValueError as e:
        raise UsageError(f"ids_file {path}: not a list of integers ({e})") from e


def table(title: str, rows: list[tuple[str, ...]], header: tuple[str, ...]) -> Table:
    t = Table(title=title)
    for h in header:
        t.add_column(h, justify="right" if h != header[0] else "left")
    for r in rows:
        t.add_row(*r)
    return t


def fmt_cost(cost) -> str:
    return (
        f"{cost.wall_s:.2f}s (compile {cost.compile_s:.2f}s, restore {cost.restore_s:.2f}s, "
        f"retrain {cost.retrain_s:.2f}s, save {cost.save_s:.2f}s)"
    )


# -- commands -----------------------------------------------------------------------------------


def cmd_train(overrides: list[str]) -> int:
    import sisajax as sj

    cfg = compose(overrides)
    rc = run_config_of(cfg)
    ds = sj.load_dataset(rc.data.name, **rc.data.params)
    console.print(f"[bold]data[/]: {ds.summary()}")
    factory, bar = progress_factory(cfg["progress"])
    with bar:
        run, cost = sj.train(
            rc,
            ds,
            cfg["run_dir"],
            overwrite=cfg["overwrite"],
            progress=factory,
            devices=cfg.get("devices"),
        )
    ev = run.evaluate()
    sizes = run.partition.sizes()
    result = {"cost": cost.to_dict(), "evaluation": ev.to_dict(), "sizes": sizes.tolist()}
    path = run.write_result("train", result)
    console.print(
        table(
            f"trained {rc.sisa.shards} shards x {rc.sisa.slices} slices -> {run.run_dir}",
            [
                ("examples per shard", f"{sizes.sum(1).min()}..{sizes.sum(1).max()}"),
                (
                    "devices",
                    "{num_devices} {platform} ({partitioning})".format(**run.manifest["layout"]),
                ),
                ("examples trained", f"{cost.examples:,}"),
                ("gradient steps", f"{cost.grad_steps:,}"),
                ("wall clock", fmt_cost(cost)),
                ("test accuracy (vote)", f"{ev.vote_accuracy:.4f}"),
                ("test accuracy (mean prob)", f"{ev.mean_prob_accuracy:.4f}"),
            ],
            ("", "value"),
        )
    )
    console.print(f"result: {path}")
    return 0


def cmd_evaluate(overrides: list[str]) -> int:
    import sisajax as sj

    cfg = compose(overrides)
    run = sj.open_run(cfg["run_dir"])
    check_against_run(overrides, cfg, run.manifest["config"], allowed=("sisa.aggregation",))
    aggregation = None
    if "sisa.aggregation" in overridden_run_keys(overrides):
        aggregation = cfg["sisa"]["aggregation"]
    ev = run.evaluate(aggregation=aggregation)
    path = run.write_result("evaluate", ev.to_dict())
    rows = [
        (f"shard {k}", "dropped (empty)" if a != a else f"{a:.4f}")
        for k, a in enumerate(ev.shard_accuracy)
    ]
    rows += [
        ("aggregate (vote)", f"{ev.vote_accuracy:.4f}"),
        ("aggregate (mean prob)", f"{ev.mean_prob_accuracy:.4f}"),
    ]
    console.print(
        table(
            f"test accuracy, {ev.num_examples} examples, generation {run.generation}",
            rows,
            ("model", "accuracy"),
        )
    )
    console.print(f"result: {path}")
    return 0


def cmd_forget(overrides: list[str]) -> int:
    import sisajax as sj
    from sisajax.requests import sample_requests, serve_requests

    cfg = compose(overrides)
    run = sj.open_run(cfg["run_dir"])
    check_against_run(overrides, cfg, run.manifest["config"], allowed=("ledger.lock_timeout_s",))
    req = cfg["requests"]
    if req["k"] is not None:
        if cfg.get("ids") is not None or cfg.get("ids_file") is not None:
            raise UsageError("give either requests.k=... or ids/ids_file, not both")
        ids = sample_requests(run.partition.ids, req["k"], req["distribution"], req["seed"])
        ids = ids.tolist()
    else:
        ids = read_ids(cfg)
    factory, bar = progress_factory(cfg["progress"])
    if req["mode"] == "sequential":
        with bar:
            stream = serve_requests(run, ids, "sequential", progress=factory)
        path = run.write_result(f"forget_stream_g{run.generation:06d}", stream.to_dict())
        t = stream.total
        rows = [
            ("requests (one retrain each)", str(len(stream.requests))),
            ("examples retrained", f"{t.examples:,}"),
            ("full retrains would take", f"{stream.full_retrain_examples:,} examples"),
            ("examples ratio", f"{stream.full_retrain_examples / max(t.examples, 1):.1f}x"),
            ("wall clock", fmt_cost(t)),
        ]
        console.print(
            table(f"sequential forget -> generation {run.generation}", rows, ("", "value"))
        )
        console.print(f"result: {path}")
        return 0
    if req["mode"] != "batched":
        raise UsageError(f"requests.mode must be batched or sequential, got {req['mode']!r}")
    with bar:
        rep = sj.forget(run, ids, progress=factory, lock_timeout_s=cfg["ledger"]["lock_timeout_s"])
    out = rep.to_dict()
    if run.config.ledger.hash_ids:
        out["ids"] = run.ledger.redact(rep.ids)
        out["already_forgotten"] = run.ledger.redact(rep.already_forgotten)
    path = run.write_result(f"forget_g{rep.generation:06d}", out)
    c = rep.cost
    rows = [
        ("ids forgotten", str(len(rep.ids))),
        ("already forgotten (skipped)", str(len(rep.already_forgotten))),
        (
            "shards retrained",
            ", ".join(f"{k} from slice {j}" for k, j in rep.restart.items()) or "-",
        ),
        ("shard-slices retrained", str(c.shard_slices)),
        ("examples retrained", f"{c.examples:,}"),
        ("gradient steps", f"{c.grad_steps:,}"),
        (
            "full retrain would take",
            f"{rep.full_retrain_examples:,} examples, {rep.full_retrain_steps:,} steps",
        ),
        ("examples saved (ratio)", f"{rep.examples_ratio:.1f}x"),
        ("wall clock", fmt_cost(c)),
        ("files removed", str(len(rep.removed_files))),
    ]
    console.print(table(f"forget -> generation {rep.generation}", rows, ("", "value")))
    console.print(f"result: {path}")
    return 0


def cmd_resume(overrides: list[str]) -> int:
    import sisajax as sj

    cfg = compose(overrides)
    run = sj.open_run(cfg["run_dir"])
    pending = [r["request_id"] for r in run.ledger.pending()]
    factory, bar = progress_factory(cfg["progress"])
    with bar:
        reports = sj.resume(run, progress=factory)
    console.print(
        f"finished {len(pending)} pending request(s) {pending}; retrained {len(reports)}; "
        f"run is at generation {run.generation}"
    )
    return 0


def cmd_status(overrides: list[str]) -> int:
    import sisajax as sj

    cfg = compose(overrides)
    run = sj.open_run(cfg["run_dir"])
    sizes = run.partition.sizes()
    active = run.active_shards()
    rows = [
        (
            str(k),
            f"{sizes[k].sum():,}",
            " ".join(str(int(v)) for v in sizes[k])
            if run.num_slices <= 12
            else f"{sizes[k].min()}..{sizes[k].max()}",
            str(run.shard_entry(k)["generation"]),
            "yes" if active[k] else "no (empty)",
        )
        for k in range(run.num_shards)
    ]
    console.print(
        table(
            f"{run.run_dir}: {run.num_shards} shards x {run.num_slices} slices, generation {run.generation}",
            rows,
            ("shard", "ids", "ids per slice", "checkpoint gen", "in ensemble"),
        )
    )
    ledger = run.ledger
    pending = ledger.pending()
    status = {
        "generation": run.generation,
        "retained": int(sizes.sum()),
        "forgotten": len(run.partition.removed),
        "ledger_records": len(ledger.records()),
        "pending_requests": [r["request_id"] for r in pending],
        "sizes": sizes.tolist(),
    }
    console.print(
        f"retained {status['retained']:,} ids, forgotten {status['forgotten']:,}, "
        f"ledger records {status['ledger_records']}, pending requests {len(pending)}"
        + (" -> run `sisajax resume`" if pending else "")
    )
    run.write_result("status", status)
    return 0


def cmd_audit(overrides: list[str]) -> int:
    import sisajax as sj

    cfg = compose(overrides)
    run = sj.open_run(cfg["run_dir"])
    rep = sj.audit(run)
    rows = [
        ("ledger chain", f"{'ok' if rep.chain.ok else 'BROKEN'} ({rep.chain.records} records)"),
        ("pending requests", str(len(rep.pending_requests))),
        ("checkpoints checked (shard x slice)", str(rep.checkpoints_checked)),
        ("forgotten ids", str(rep.forgotten_ids)),
        ("residual exposure", str(rep.residual_exposure)),
        ("other problems", str(len(rep.problems))),
        ("verdict", "[green]PASS[/]" if rep.ok else "[red]FAIL[/]"),
    ]
    console.print(table(f"audit of {run.run_dir}", rows, ("check", "result")))
    for p in rep.chain.problems + rep.problems:
        console.print(f"  [red]-[/] {p}")
    run.write_result("audit", rep.to_dict())
    return 0 if rep.ok else 1


def cmd_demo(overrides: list[str]) -> int:
    from experiments.demo import run_demo

    cfg = compose(overrides)
    return run_demo(cfg)


def cmd_verify(overrides: list[str]) -> int:
    from experiments.cmd_verify import cmd_verify as _cmd

    return _cmd(overrides)


def cmd_mia(overrides: list[str]) -> int:
    from experiments.mia_experiment import cmd_mia as _cmd

    return _cmd(overrides)


def cmd_paper(overrides: list[str]) -> int:
    from experiments.cmd_paper import cmd_paper as _cmd

    return _cmd(overrides)


def cmd_sweep(overrides: list[str]) -> int:
    from experiments.cmd_paper import cmd_sweep as _cmd

    return _cmd(overrides)


def cmd_report(overrides: list[str]) -> int:
    from experiments.cmd_paper import cmd_report as _cmd

    return _cmd(overrides)


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "train": cmd_train,
    "forget": cmd_forget,
    "evaluate": cmd_evaluate,
    "resume": cmd_resume,
    "status": cmd_status,
    "audit": cmd_audit,
    "verify": cmd_verify,
    "mia": cmd_mia,
    "paper": cmd_paper,
    "sweep": cmd_sweep,
    "report": cmd_report,
    "demo": cmd_demo,
}


def setup_jax() -> None:
    """Persistent compilation cache so only the first process compiles (override the location
    with SISAJAX_CACHE_DIR; set it to an empty string to disable)."""
    import jax

    cache = os.environ.get(
        "SISAJAX_CACHE_DIR",
        str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sisajax/jax"),
    )
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help") or argv[0] not in COMMANDS:
        console.print(__doc__)
        console.print("commands: " + ", ".join(COMMANDS))
        return 0 if not argv or argv[0] in ("-h", "--help", "help") else 2
    from sisajax import (
        CheckpointError,
        ConfigError,
        DataError,
        PartitionError,
        RunError,
    )

    setup_jax()
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (UsageError, ConfigError, DataError, PartitionError, RunError, CheckpointError) as e:
        console.print(f"[bold red]error:[/] {e}")
        return 2
    except Exception as e:  # Hydra's override errors and friends: one line, no traceback
        if type(e).__module__.startswith(("hydra", "omegaconf")):
            console.print(f"[bold red]error:[/] {e}")
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
