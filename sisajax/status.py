"""What a run holds now: shards, slices, sizes, forgotten ids, pending requests (read-only)."""

from __future__ import annotations

from typing import Any

from sisajax.run import SisaRun


def run_status(run: SisaRun) -> dict[str, Any]:
    """A JSON-able overview of ``run`` (no ids: safe with ``ledger.hash_ids``)."""
    run.reload()
    sizes = run.partition.sizes()
    active = run.active_shards()
    ledger = run.ledger
    chain = ledger.verify()
    shards = []
    for k, entry in enumerate(run.manifest.shards):
        shards.append(
            {
                "shard": k,
                "ids": int(sizes[k].sum()),
                "ids_per_slice": [int(v) for v in sizes[k]],
                "range": f"{sizes[k].min()}..{sizes[k].max()}",
                "newest_row_generation": max(r.generation for r in entry.rows),
                "active": bool(active[k]),
            }
        )
    return {
        "generation": run.generation,
        "retained": int(sizes.sum()),
        "validation": int(len(run.val_data()[0])) if run.has_validation else 0,
        "forgotten": int(len(run.partition.removed)),
        "ledger_records": chain.records,
        "ledger_ok": chain.ok,
        "interrupted_append": chain.interrupted,
        "pending_requests": [r["request_id"] for r in ledger.pending()]
        if not chain.problems
        else [],
        "shards": shards,
        "layout": run.manifest.layout,
        "hosts": sorted(run.row_hosts()),
    }
