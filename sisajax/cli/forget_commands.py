"""The commands that change a run by forgetting: ``forget`` (one batched request or a request
stream), ``resume`` (finish what an interrupted command left pending) and ``serve`` (a long-lived
process answering forget requests). Thin glue over :mod:`sisajax.unlearning`,
:mod:`sisajax.requests` and :mod:`sisajax.serve`; listed in :mod:`sisajax.cli.table`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from sisajax.cli.base import UsageError, import_plugins, run_dir_arg, write_result
from sisajax.cli.base import open_run as _open
from sisajax.console import fmt_cost, print_table, progress_factory, say


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
        except (ValueError, RecursionError):  # nested too deeply, or a number too long to read
            raise UsageError(
                f"ids_file {path} is not valid JSON (nested too deeply or a number too long)"
            ) from None
        if not isinstance(data, list):
            raise UsageError(f"ids_file {path} must hold a JSON list of integers")
        return data
    from sisajax.planning import parse_id_token

    out = []
    for n, line in enumerate(text.splitlines(), 1):
        for token in line.replace(",", " ").split():
            v = parse_id_token(token)
            if v is None:
                raise UsageError(f"ids_file {path}: line {n} is not a list of integers")
            out.append(v)
    return out


def cmd_forget(cfg: dict[str, Any], overrides: list[str]) -> int:
    """Forget `ids=[...]`, `ids_file=PATH`, or a seeded stream `requests.k=K` (`requests.mode=
    batched|sequential`, `requests.distribution=uniform|exponential|pareto`; `tensorboard=true`
    also writes the retraining's scalars as TensorBoard events). A request that retrains one
    shard of a CPU `map` run runs in the serial layout (one device, XLA's pools sized for one
    core: faster for one shard, same bits) unless SISAJAX_CPU_DEVICES chooses the layout."""
    from sisajax.metrics import MetricsLog
    from sisajax.requests import sample_requests

    run = _open(cfg)
    req = cfg["requests"]
    sampled = req["k"] is not None
    if sampled and (cfg.get("ids") is not None or cfg.get("ids_file") is not None):
        raise UsageError("give either requests.k=... or ids/ids_file, not both")
    ids = None if sampled else read_ids(cfg)
    if req["mode"] not in ("batched", "sequential"):
        raise UsageError(f"requests.mode must be batched or sequential; got {req['mode']!r}")
    run.writer_lock(cfg["lock_timeout_s"])  # checks the timeout value; takes no lock
    # The checks below read the partition and the ledger: under the reader lock, so that they
    # read one generation (a writer switching generations deletes the old one's files).
    with run.reader_lock():
        run.reload()
        if sampled:
            ids = sample_requests(
                run.partition.ids, req["k"], req["distribution"], req["seed"]
            ).tolist()
        pending_before = _refuse_if_all_forgotten(run, ids)
        _choose_layout(run, ids, req["mode"], cfg["evaluate"], pending_before)
    factory, bar = progress_factory(cfg["progress"])
    log = MetricsLog(run.run_dir, tensorboard=cfg["tensorboard"])
    try:
        return _forget(cfg, run, ids, req["mode"], pending_before, factory, bar, log)
    finally:
        log.close()


def _forget(cfg, run, ids, mode: str, pending_before: bool, factory, bar, log) -> int:
    """:func:`cmd_forget` once the request is checked; ``log`` receives every metrics record."""
    import sisajax as sj
    from sisajax.requests import StreamInterrupted, serve_requests

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

        try:
            with bar:
                stream = serve_requests(
                    run,
                    ids,
                    "sequential",
                    progress=factory,
                    evaluate=cfg["evaluate"],
                    on_request=each,
                    metrics=log,
                    lock_timeout_s=cfg["lock_timeout_s"],
                )
        except StreamInterrupted as e:  # the requests done are recorded; the exit code is 1
            done = {"completed": len(e.report.requests), "requested": e.requested}
            write_result(
                run,
                f"forget-stream-g{run.generation:06d}",
                {**e.report.to_dict(), **done, "error": str(e)},
            )
            raise
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
        write_result(run, f"forget-stream-g{run.generation:06d}", stream.to_dict())
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

    write_result(
        run, f"forget-g{rep.generation:06d}", {**rep.to_dict(), "process": process_layout()}
    )
    return 0


def _all_forgotten_message(n: int) -> str:
    which = "the id of the request was" if n == 1 else f"all {n} ids of the request were"
    return f"{which} already forgotten; nothing changed"


def _some(ids: list[Any], limit: int = 20) -> str:
    """``ids`` for a message, the first ``limit`` of them."""
    return str(ids[:limit]) if len(ids) <= limit else f"{ids[:limit]} and {len(ids) - limit} more"


def _choose_layout(run, ids: list[Any], mode: str, evaluate: bool, pending: bool) -> None:
    """Start jax in the serial layout when the request's only work is retraining one shard at a
    time and that layout suits the run (:func:`sisajax.layout.serial_suits`); else keep the
    default (a sequential stream that evaluates every model after each request also predicts
    with all shards, which one device per core does faster; ``pending``: requests left pending
    are finished first, whatever they retrain)."""
    from sisajax.layout import serial_suits, start_serial_backend
    from sisajax.planning import ForgetError, normalise_ids

    try:
        arr = normalise_ids(ids)
    except ForgetError:  # reported by the forget itself
        return
    if pending or (mode == "sequential" and evaluate):
        return
    shards = 1 if mode == "sequential" else len(run.partition.shards_of(arr))
    if serial_suits(run.manifest.layout, shards):
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

    root = Path(run_dir_arg(cfg["run_dir"])).expanduser()
    if (root / INTERRUPTED).is_file() and not (root / "MANIFEST.json").exists():
        import_plugins(cfg)  # the ones the user names; the run directory's record imports none
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


def cmd_serve(cfg: dict[str, Any], overrides: list[str]) -> int:
    """`spool=-` (stdin lines -> stdout JSON lines) or `spool=DIR` (DIR/incoming/*.req ->
    DIR/done/*.json, failed requests kept in DIR/rejected/, until DIR/STOP; clients write a
    request under a dot-name and rename it to *.req when complete, see :mod:`sisajax.serve`).
    Every request is an exact `forget` with the ledger's crash guarantees; the program is compiled
    once; a bad request gets an error response and the server goes on."""
    import sys

    from sisajax.serve import ForgetServer

    run = _open(cfg)
    with ForgetServer(run, lock_timeout_s=cfg["lock_timeout_s"], evaluate=cfg["evaluate"]) as srv:
        print(
            json.dumps({"ready": True, "run_dir": str(run.run_dir), "generation": run.generation}),
            flush=True,
        )
        if cfg["spool"] == "-":
            if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8: a refused request
                sys.stdin.reconfigure(errors="replace")
            responses = srv.serve_lines(sys.stdin)
        else:
            responses = srv.serve_spool(Path(cfg["spool"]))
        failed = 0
        for response in responses:
            failed += not response["ok"]
            print(json.dumps(response, sort_keys=True), flush=True)
    say(f"served {srv.served} request(s), {failed} failed; run at generation {run.generation}")
    return 0
