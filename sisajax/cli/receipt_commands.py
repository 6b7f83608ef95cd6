"""``sisajax receipt`` and ``sisajax check-receipt``: deletion receipts on the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sisajax.cli.base import UsageError
from sisajax.cli.base import open_run as _open
from sisajax.console import print_table, say


def cmd_receipt(cfg: dict[str, Any], overrides: list[str]) -> int:
    """Write the receipt of a done forget request (``request=<ledger seq>``), read-only on the run
    apart from the receipt file (default: ``<run>/results/receipt-<seq>.json``)."""
    from sisajax.receipts import issue_receipt, write_receipt

    if cfg["request"] is None:
        raise UsageError("receipt needs request=<the ledger position of the forget's record>")
    try:
        seq = int(cfg["request"])
    except (TypeError, ValueError):
        raise UsageError("request must be a ledger position (an integer)") from None
    run = _open(cfg)
    rec = issue_receipt(run, seq)
    out = Path(cfg["out"]) if cfg["out"] else Path(run.run_dir) / "results" / f"receipt-{seq}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_receipt(rec, out)
    say(
        f"receipt for request {rec['request']['request_id']} ({rec['request']['ids']} ids, "
        f"ledger records {rec['ledger']['pending_seq']}..{rec['ledger']['done_seq']}): {out}"
    )
    return 0


def cmd_check_receipt(cfg: dict[str, Any], overrides: list[str]) -> int:
    """Check a receipt against a run: its hash, the run, the ledger chain, the ids, the live rows;
    ``replay=true`` retrains the affected shards and compares bit for bit. Exit 2 if it fails."""
    from sisajax.receipts import check_receipt, read_receipt

    if not cfg["receipt"]:
        raise UsageError("check-receipt needs receipt=<file>")
    receipt = read_receipt(cfg["receipt"])
    run = _open(cfg)
    rep = check_receipt(receipt, run, replay=bool(cfg["replay"]))
    print_table(
        f"receipt {cfg['receipt']} against {run.run_dir}",
        [(name, "ok" if ok else "FAILED", detail) for name, ok, detail in rep.checks],
        ("check", "result", "detail"),
    )
    if not rep.ok:
        say(f"receipt check failed: {rep.first_failure}")
        return 2
    say("receipt verified")
    return 0
