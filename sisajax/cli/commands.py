"""The run commands: thin glue composing library calls, printing a table, writing a result file.

Each command's config is ``conf/<command>.yaml``; results go to ``<run_dir>/results/`` under a
new name per invocation (never replacing another), or nowhere on a read-only run (said so).
The commands are listed (name, summary, sweeping) in :mod:`sisajax.cli.table`; a command's
docstring is its ``sisajax NAME --help`` text.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from sisajax.cli.base import UsageError, import_plugins, run_config
from sisajax.cli.base import open_run as _open
from sisajax.console import fmt_cost, print_table, progress_factory, say


def _result(run, name: str, obj: dict[str, Any]) -> None:
    """Write the command's result file. The command's work is done (and its verdict printed)
    by now, so a result that cannot be written (a full disk) is reported, not a failure."""
    from sisajax.errors import StorageError

    try:
        path = run.write_result(name, obj)
    except StorageError as e:
        say(f"result not written: {e}")
        return
    say(f"result: {path}" if path else "result not written: the run directory is read-only")


def _log(run, record: dict[str, Any]) -> None:
    """Append a read-only command's metrics record (skipped on a read-only run directory; a
    record that cannot be written is reported, not a failure: the command's work is done)."""
    from sisajax.metrics import log_record
    from sisajax.store.files import UnsafeRunError

    try:
        log_record(run.run_dir, record)
    except (OSError, UnsafeRunError) as e:
        say(f"metrics not written: {e}")


def cmd_train(cfg: dict[str, Any], overrides: list[str]) -> int:
    """Train S shards x R slices; `overwrite=true` retrains an existing run in place without the
    ids it has forgotten (`discard_deletion_history=true` trains on them again, recorded)."""
    import sisajax as sj

    plugins = import_plugins(cfg)
    rc = run_config(cfg)
    ds = sj.load_dataset(rc.data.name, **rc.data.params)
    say(f"data: {ds.summary()}")
    factory, bar = progress_factory(cfg["progress"])
    root = Path(cfg["run_dir"]).expanduser()
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

        _log(run, evaluate_record(val, run.generation, 0.0, "val"))
    _result(
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
    _log(run, evaluate_record(ev, run.generation, wall_s, split))
    _result(run, "evaluate", {**ev.to_dict(), "split": split})
    return 0


def read_ids(cfg: dict[str, Any]) -> list[Any]:
    """The ids of a forget request from ``ids=[...]`` or ``ids_file=PATH``.

    Files: one id per line (or comma/space separated), ``.npy`` (an integer array, no pickles) or
    ``.json`` (a list). Errors name the line, never its content.
    """
    ids, ids_file = cfg.get("ids"), cfg.get("ids_file")
    if (ids is None) == (ids_file is None):
        raise UsageError("give exactly one of ids=[...] or ids_file=PATH")
    if ids is not None:
        return ids if isinstance(ids, list) else [ids]
    path = Path(ids_file).expanduser()
    if not path.is_file():
        raise UsageError(f"ids_file {path} does not exist")
    if path.suffix == ".npy":
        import numpy as np

        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError):
            raise UsageError(f"ids_file {path} is not a readable .npy array of integers") from None
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise UsageError(
                f"ids_file {path} must hold a 1-d integer array, got {arr.dtype} {arr.shape}"
            )
        return arr.tolist()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"ids_file {path} is not a text file (or .npy / .json)") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"ids_file {path} is not valid JSON (line {e.lineno})") from None
        if not isinstance(data, list):
            raise UsageError(f"ids_file {path} must hold a JSON list of integers")
        return data
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        for token in line.replace(",", " ").split():
            if not token.lstrip("-").isdigit():
                raise UsageError(f"ids_file {path}: line {n} is not a list of integers")
            out.append(int(token))
    return out


def cmd_forget(cfg: dict[str, Any], overrides: list[str]) -> int:
    """Forget `ids=[...]`, `ids_file=PATH`, or a seeded stream `requests.k=K` (`requests.mode=
    batched|sequential`, `requests.distribution=uniform|exponential|pareto`; `tensorboard=true`
    also writes the retraining's scalars as TensorBoard events)."""
    from sisajax.metrics import MetricsLog
    from sisajax.requests import sample_requests

    run = _open(cfg)
    req = cfg["requests"]
    if req["k"] is not None:
        if cfg.get("ids") is not None or cfg.get("ids_file") is not None:
            raise UsageError("give either requests.k=... or ids/ids_file, not both")
        ids = sample_requests(
            run.partition.ids, req["k"], req["distribution"], req["seed"]
        ).tolist()
    else:
        ids = read_ids(cfg)
    if req["mode"] not in ("batched", "sequential"):
        raise UsageError(f"requests.mode must be batched or sequential; got {req['mode']!r}")
    run.writer_lock(cfg["lock_timeout_s"])  # checks the timeout value; takes no lock
    pending_before = _refuse_if_all_forgotten(run, ids)
    _choose_layout(run, ids, req["mode"])
    factory, bar = progress_factory(cfg["progress"])
    log = MetricsLog(run.run_dir, tensorboard=cfg["tensorboard"])
    try:
        return _forget(cfg, run, ids, req["mode"], pending_before, factory, bar, log)
    finally:
        log.close()


def _forget(cfg, run, ids, mode: str, pending_before: bool, factory, bar, log) -> int:
    """:func:`cmd_forget` once the request is checked; ``log`` receives every metrics record."""
    import sisajax as sj
    from sisajax.requests import serve_requests

    if mode == "sequential":

        def each(n: int, rep, acc) -> None:
            log(
                {
                    "event": "stream_request",
                    "request": n,
                    "generation": rep.generation,
                    "shards": len(rep.restart),
                    "examples": rep.cost.examples,
                    "wall_s": rep.cost.wall_s,
                    "accuracy": acc,
                }
            )

        with bar:
            stream = serve_requests(
                run,
                ids,
                "sequential",
                progress=factory,
                evaluate=cfg["evaluate"],
                on_request=each,
                metrics=log,
            )
        t = stream.total
        rows = [
            ("requests (one retrain each)", str(len(stream.requests))),
            ("examples retrained", f"{t.examples:,}"),
            ("full retrains would take", f"{stream.full_retrain_examples:,} examples"),
            ("examples ratio", _ratio(stream.full_retrain_examples, t.examples)),
            ("wall clock", fmt_cost(t)),
        ]
        if stream.accuracy:
            rows.append(
                (
                    "accuracy after first / last",
                    f"{stream.accuracy[0]:.4f} / {stream.accuracy[-1]:.4f}",
                )
            )
        print_table(f"sequential forget -> generation {run.generation}", rows, ("", "value"))
        _result(run, f"forget-stream-g{run.generation:06d}", stream.to_dict())
        return 0
    with bar, warnings.catch_warnings():
        warnings.simplefilter("ignore", sj.HostWarning)  # printed below from the report
        rep = sj.forget(
            run, ids, progress=factory, lock_timeout_s=cfg["lock_timeout_s"], metrics=log
        )
    if not rep.ids and not pending_before:  # forgotten by another writer since the check above
        raise UsageError(_all_forgotten_message(len(rep.already_forgotten)))
    c = rep.cost
    rows = [
        ("ids forgotten", str(len(rep.ids))),
        ("already forgotten (skipped)", str(len(rep.already_forgotten))),
        *(
            [("of them validation ids (dropped, nothing retrained)", str(rep.validation_ids))]
            if rep.validation_ids
            else []
        ),
        (
            "shards retrained",
            ", ".join(f"{k} from slice {j}" for k, j in rep.restart.items()) or "-",
        ),
        ("shard-slices retrained", str(c.shard_slices)),
        ("examples retrained", f"{c.examples:,}"),
        ("full retrain would take", f"{rep.full_retrain_examples:,} examples"),
        ("examples saved (ratio)", _ratio(rep.full_retrain_examples, c.examples)),
        ("wall clock", fmt_cost(c)),
        ("files removed", str(len(rep.removed_files))),
    ]
    for w in rep.warnings:
        say(f"warning: {w}")
    print_table(f"forget -> generation {rep.generation}", rows, ("", "value"))
    if rep.already_forgotten:
        named = "" if run.config.ledger.hash_ids else f": {_some(rep.already_forgotten)}"
        say(
            f"skipped {len(rep.already_forgotten)} id(s) forgotten before{named}"
            + (" (a pending request was finished first)" if pending_before else "")
        )
    from sisajax.layout import process_layout

    _result(run, f"forget-g{rep.generation:06d}", {**rep.to_dict(), "process": process_layout()})
    return 0


def _all_forgotten_message(n: int) -> str:
    which = "the id of the request was" if n == 1 else f"all {n} ids of the request were"
    return f"{which} already forgotten; nothing changed"


def _some(ids: list[Any], limit: int = 20) -> str:
    """``ids`` for a message, the first ``limit`` of them."""
    return str(ids[:limit]) if len(ids) <= limit else f"{ids[:limit]} and {len(ids) - limit} more"


def _choose_layout(run, ids: list[Any], mode: str) -> None:
    """Start jax in the serial layout when every retrain of this request is one shard's and that
    layout suits the run (:func:`sisajax.layout.serial_suits`); else keep the default."""
    from sisajax.layout import serial_suits, start_serial_backend
    from sisajax.planning import ForgetError, normalise_ids

    try:
        arr = normalise_ids(ids)
    except ForgetError:  # reported by the forget itself
        return
    pending = run.ledger.pending()
    shards = 1 if mode == "sequential" and not pending else len(run.partition.shards_of(arr))
    if not pending and serial_suits(run.manifest.layout, shards):
        start_serial_backend()


def _refuse_if_all_forgotten(run, ids: list[Any]) -> bool:
    """Refuse (exit 2, before anything is written) a request whose ids were all forgotten
    already. Returns whether the run has pending requests (a forget finishes them first, which may
    forget these ids, so the check is left to after it).

    Only a clear verdict refuses: malformed ids, a damaged ledger or a missing salt are left to
    :func:`sisajax.forget`, which reports them as it always does.
    """
    import numpy as np

    from sisajax.errors import SisajaxError
    from sisajax.planning import normalise_ids

    try:
        if run.ledger.pending():
            return True
        arr = normalise_ids(ids)
        if run.config.ledger.hash_ids:
            run.ledger.check_salt((run.manifest.id_hashing or {}).get("salt_fingerprint"))
        keys = run.ledger.removed_keys(arr)
        all_gone = bool(np.isin(keys, run.partition.removed).all())
    except SisajaxError:
        return False
    if all_gone:
        raise UsageError(_all_forgotten_message(len(arr)))
    return False


def _ratio(full: int, done: int) -> str:
    return "- (nothing retrained)" if done == 0 else f"{full / done:.1f}x"


def cmd_resume(cfg: dict[str, Any], overrides: list[str]) -> int:
    """Repair an interrupted ledger append, finish pending requests, remove partial files; finish
    a new run whose training Ctrl-C interrupted (from its last completed slice step)."""
    import sisajax as sj
    from sisajax.store.interrupted import INTERRUPTED

    root = Path(cfg["run_dir"]).expanduser()
    if (root / INTERRUPTED).is_file() and not (root / "MANIFEST.json").exists():
        factory, bar = progress_factory(cfg["progress"])
        with bar:
            run, cost = sj.continue_training(root, progress=factory)
        say(
            f"continued the interrupted training of {run.run_dir} from slice step "
            f"{run.manifest.origin.get('continued_after_slice_steps')}: {fmt_cost(cost)}"
        )
        return 0
    run = _open(cfg)
    pending = [r["request_id"] for r in run.ledger.pending()]
    factory, bar = progress_factory(cfg["progress"])
    with bar:
        reports = sj.resume(run, progress=factory)
    say(
        f"finished {len(pending)} pending request(s); retrained {len(reports)}; "
        f"run is at generation {run.generation}"
    )
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
    say(
        f"retained {st['retained']:,} ids (+{st['validation']:,} held out as the validation split), "
        f"forgotten {st['forgotten']:,}, ledger records "
        f"{st['ledger_records']}, pending requests {len(st['pending_requests'])}"
        + (" -> run `sisajax resume`" if st["pending_requests"] or st["interrupted_append"] else "")
    )
    _result(run, "status", st)
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
    _result(run, "audit", rep.to_dict())
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
        seed=int(cfg["seed"]),
        workdir=cfg["workdir"],
        atol=None if cfg["atol"] is None else float(cfg["atol"]),
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
        verdict = f"FAILED: shards {bad} differ from a from-scratch retrain"
        if not rep.bitwise_meaningful:
            verdict += f" by more than {rep.tolerance:g} (checkpoints of another host: verify on it for a bitwise check)"
    say(f"{verdict} ({rep.wall_s:.2f}s)")
    _log(run, verify_record(rep))
    _result(run, "verify", rep.to_dict())
    return 0 if rep.ok else 1


def cmd_serve(cfg: dict[str, Any], overrides: list[str]) -> int:
    """`spool=-` (stdin lines -> stdout JSON lines) or `spool=DIR` (DIR/incoming/*.req ->
    DIR/done/*.json until DIR/STOP). Every request is an exact `forget` with the ledger's crash
    guarantees; the program is compiled once."""
    import sys

    from sisajax.serve import ForgetServer

    run = _open(cfg)
    with ForgetServer(run, lock_timeout_s=cfg["lock_timeout_s"], evaluate=cfg["evaluate"]) as srv:
        print(
            json.dumps({"ready": True, "run_dir": str(run.run_dir), "generation": run.generation}),
            flush=True,
        )
        if cfg["spool"] == "-":
            responses = srv.serve_lines(sys.stdin)
        else:
            responses = srv.serve_spool(Path(cfg["spool"]))
        failed = 0
        for response in responses:
            failed += not response["ok"]
            print(json.dumps(response, sort_keys=True), flush=True)
    say(f"served {srv.served} request(s), {failed} failed; run at generation {run.generation}")
    return 0


def cmd_export(cfg: dict[str, Any], overrides: list[str]) -> int:
    """`out=DIR` (new); `all_slices=true` exports every (shard, slice) state ``[S, R, ...]``."""
    if not cfg["out"]:
        raise UsageError("give out=DIR (a new directory for the Orbax checkpoint)")
    run = _open(cfg)
    path = run.export(cfg["out"], all_slices=cfg["all_slices"])
    say(f"exported generation {run.generation} to {path}")
    return 0
