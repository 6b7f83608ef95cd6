"""The run commands: thin glue composing library calls, printing a table, writing a result file.

Each command's config is ``conf/<command>.yaml``; results go to ``<run_dir>/results/`` under a
new name per invocation (never replacing another), or nowhere on a read-only run (said so).
The commands are listed (name, summary, sweeping) in :mod:`sisajax.cli.table`; a command's
docstring is its ``sisajax NAME --help`` text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sisajax.cli.base import (
    UsageError,
    import_plugins,
    log_metrics,
    run_config,
    run_dir_arg,
    write_result,
)
from sisajax.cli.base import open_run as _open
from sisajax.console import fmt_cost, print_table, progress_factory, say


def cmd_train(cfg: dict[str, Any], overrides: list[str]) -> int:
    """Train S shards x R slices; `overwrite=true` retrains an existing run in place without the
    ids it has forgotten (`discard_deletion_history=true` trains on them again, recorded)."""
    import sisajax as sj

    root = Path(run_dir_arg(cfg["run_dir"])).expanduser()
    plugins = import_plugins(cfg)
    rc = run_config(cfg)
    ds = sj.load_dataset(rc.data.name, **rc.data.params)
    say(f"data: {ds.summary()}")
    factory, bar = progress_factory(cfg["progress"])
    with bar:
        run, cost = sj.train(
            rc,
            ds,
            root,
            overwrite=cfg["overwrite"],
            discard_deletion_history=cfg["discard_deletion_history"],
            progress=factory,
            devices=cfg["devices"],
            plugins=plugins,
            tensorboard=cfg["tensorboard"],
            val_metrics=bool(cfg["val_metrics"]),
        )
    val = run.evaluate(split="val") if run.has_validation else None
    ev = run.evaluate()
    sizes = run.partition.sizes()
    layout = run.manifest.layout
    rows = [
        ("examples per shard", f"{sizes.sum(1).min()}..{sizes.sum(1).max()}"),
        ("devices", f"{layout['num_devices']} {layout['platform']} ({layout['partitioning']})"),
        ("examples trained", f"{cost.examples:,}"),
        ("gradient steps", f"{cost.grad_steps:,}"),
        ("wall clock", fmt_cost(cost)),
        *(
            [
                ("validation examples (held out)", f"{val.num_examples:,}"),
                ("validation accuracy (vote)", f"{val.vote_accuracy:.4f}"),
                ("validation accuracy (mean prob)", f"{val.mean_prob_accuracy:.4f}"),
            ]
            if val is not None
            else []
        ),
        ("test accuracy (vote)", f"{ev.vote_accuracy:.4f}"),
        ("test accuracy (mean prob)", f"{ev.mean_prob_accuracy:.4f}"),
    ]
    print_table(
        f"trained {rc.sisa.shards} shards x {rc.sisa.slices} slices -> {run.run_dir}",
        rows,
        ("", "value"),
    )
    if val is not None:
        from sisajax.metrics import evaluate_record

        log_metrics(run, evaluate_record(val, run.generation, 0.0, "val"))
    write_result(
        run,
        "train",
        {
            "cost": cost.to_dict(),
            "evaluation": ev.to_dict(),
            "validation": None if val is None else val.to_dict(),
            "sizes": sizes.tolist(),
            "seed": cfg["seed"],
        },
    )
    return 0


def cmd_evaluate(cfg: dict[str, Any], overrides: list[str]) -> int:
    """Evaluate on the run's held-out split, or its validation split with `split=val`
    (`aggregation=vote|mean_prob` picks the headline)."""
    import time

    from sisajax.aggregation import check_method
    from sisajax.metrics import evaluate_record

    run = _open(cfg)
    aggregation = cfg["aggregation"]
    if aggregation is not None:
        check_method(aggregation)
    split = cfg["split"]
    if split not in ("test", "val"):
        raise UsageError(f"split must be test or val, got {split!r}")
    t0 = time.perf_counter()
    ev = run.evaluate(aggregation=aggregation, split=split)
    wall_s = time.perf_counter() - t0
    rows = [
        (f"shard {k}", "dropped (empty)" if a != a else f"{a:.4f}")
        for k, a in enumerate(ev.shard_accuracy)
    ]
    rows += [
        ("aggregate (vote)", f"{ev.vote_accuracy:.4f}"),
        ("aggregate (mean prob)", f"{ev.mean_prob_accuracy:.4f}"),
    ]
    print_table(
        f"{'validation' if split == 'val' else 'test'} accuracy, {ev.num_examples} examples, "
        f"generation {run.generation}",
        rows,
        ("model", "accuracy"),
    )
    log_metrics(run, evaluate_record(ev, run.generation, wall_s, split))
    write_result(run, "evaluate", {**ev.to_dict(), "split": split})
    return 0


def cmd_status(cfg: dict[str, Any], overrides: list[str]) -> int:
    """Read-only overview of a run (works on read-only run directories)."""
    from sisajax.status import run_status

    run = _open(cfg)
    st = run_status(run)
    rows = [
        (
            str(s["shard"]),
            f"{s['ids']:,}",
            " ".join(str(v) for v in s["ids_per_slice"]) if run.num_slices <= 12 else s["range"],
            str(s["newest_row_generation"]),
            "yes" if s["active"] else "no (empty)",
        )
        for s in st["shards"]
    ]
    print_table(
        f"{run.run_dir}: {run.num_shards} shards x {run.num_slices} slices, generation {run.generation}",
        rows,
        ("shard", "ids", "ids per slice", "newest checkpoint gen", "in ensemble"),
    )
    pending = st["pending_requests"]
    say(
        f"retained {st['retained']:,} ids (+{st['validation']:,} held out as the validation split), "
        f"forgotten {st['forgotten']:,}, ledger records "
        f"{st['ledger_records']}, pending requests "
        f"{'unknown (ledger unreadable)' if pending is None else len(pending)}"
        + (" -> run `sisajax resume`" if pending or st["interrupted_append"] else "")
    )
    if not st["ledger_ok"] and not st["interrupted_append"]:
        say("ledger chain BROKEN (records changed or removed) -> run `sisajax audit`")
    write_result(run, "status", st)
    return 0


def cmd_audit(cfg: dict[str, Any], overrides: list[str]) -> int:
    """Ledger chain, pending requests, checksums, residual exposure, stray files (read-only)."""
    import sisajax as sj

    run = _open(cfg)
    rep = sj.audit(run)
    chain = "ok" if rep.chain.ok else ("INTERRUPTED" if rep.chain.interrupted else "BROKEN")
    rows = [
        ("ledger chain", f"{chain} ({rep.chain.records} records)"),
        ("pending requests", str(len(rep.pending_requests))),
        ("checkpoints checked (shard x slice)", str(rep.checkpoints_checked)),
        ("forgotten ids", str(rep.forgotten_ids)),
        ("residual exposure", str(rep.residual_exposure)),
        ("problems", str(len(rep.problems))),
        ("warnings", str(len(rep.warnings))),
        ("verdict", "PASS" if rep.ok else "FAIL"),
    ]
    print_table(f"audit of {run.run_dir}", rows, ("check", "result"))
    for p in rep.chain.problems + rep.problems:
        say(f"  problem: {p}")
    for w in rep.warnings:
        say(f"  warning: {w}")
    write_result(run, "audit", rep.to_dict())
    return 0 if rep.ok else 1


def cmd_verify(cfg: dict[str, Any], overrides: list[str]) -> int:
    """`shards=[0,2]`, `sample=K` (seeded by `seed`), `atol=` for a tolerance, `workdir=` to train
    a whole reference run on disk."""
    from sisajax.metrics import verify_record
    from sisajax.verification import verify

    run = _open(cfg)
    shards = cfg["shards"]
    if shards is not None and not isinstance(shards, list):
        shards = [shards]
    rep = verify(
        run,
        shards=shards,
        sample=cfg["sample"],
        seed=cfg["seed"],
        workdir=cfg["workdir"],
        atol=cfg["atol"],
        write=False,
    )
    r = run.num_slices
    rows = []
    for s in rep.shards:
        rows.append(
            (
                f"shard {s.shard}",
                s.status(rep.tolerance) + (f" ({s.error})" if s.error else ""),
                f"{sum(s.slice_identical)}/{r}",
                "-" if s.error else f"{s.max_abs_diff:.3g}",
                "ok" if s.fingerprints_ok else "MISMATCH",
                str(s.n_ids),
            )
        )
    print_table(
        f"verify generation {rep.generation}: {rep.mode} retrain on {rep.backend}, shard_exec={rep.shard_exec}",
        rows,
        ("shard", "checkpoints", "slices identical", "max |diff|", "fingerprints", "ids"),
    )
    if not rep.bitwise_meaningful:
        for h, diff in rep.foreign_hosts.items():
            say(
                f"note: checkpoints were written on another host {h} ({'; '.join(diff)}); a "
                f"bitwise comparison is not meaningful there, so shards are compared within "
                f"max |diff| <= {rep.tolerance:g}"
            )
    if not rep.partition_consistent:
        say("the stored partition does not match the retained ids")
    if rep.ok:
        verdict = (
            "OK: every verified checkpoint is bit-identical to a from-scratch retrain"
            if rep.bitwise_meaningful and rep.atol is None
            else f"OK: every verified checkpoint is within {rep.tolerance:g} of a from-scratch retrain"
        )
    else:
        bad = sorted(set(rep.mismatched_shards) | set(rep.fingerprint_mismatches))
        verdict = (
            f"FAILED: shards {bad} differ from a from-scratch retrain"
            if bad
            else "FAILED: the stored partition or data copies do not match the retained ids "
            "(every verified checkpoint agrees with them)"
        )
        if bad and not rep.bitwise_meaningful:
            verdict += f" by more than {rep.tolerance:g} (checkpoints of another host: verify on it for a bitwise check)"
    say(f"{verdict} ({rep.wall_s:.2f}s)")
    log_metrics(run, verify_record(rep))
    write_result(run, "verify", rep.to_dict())
    return 0 if rep.ok else 1


def cmd_export(cfg: dict[str, Any], overrides: list[str]) -> int:
    """`out=DIR` (new); `all_slices=true` exports every (shard, slice) state ``[S, R, ...]``."""
    if not cfg["out"]:
        raise UsageError("give out=DIR (a new directory for the Orbax checkpoint)")
    run = _open(cfg)
    path = run.export(cfg["out"], all_slices=cfg["all_slices"])
    say(f"exported generation {run.generation} to {path}")
    return 0
