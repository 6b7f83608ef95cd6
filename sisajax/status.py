"""What a run holds now: shards, slices, sizes, forgotten ids, pending requests (read-only)."""

from __future__ import annotations

from typing import Any

import numpy as np

from sisajax.config import int_value
from sisajax.errors import SisajaxError, UserInputError
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
        # from the records that can be read, also when the chain is broken (None: unreadable)
        "pending_requests": _pending(ledger),
        "shards": shards,
        "layout": run.manifest.layout,
        "hosts": sorted(run.row_hosts()),
    }


def _pending(ledger) -> list[str] | None:
    try:
        return [r["request_id"] for r in ledger.pending()]
    except (SisajaxError, OSError, KeyError, TypeError, ValueError):
        return None


def locate_ids(run: SisaRun, ids: Any) -> list[dict[str, Any]]:
    """Where each of ``ids`` ``[K]`` is now: ``{"id", "status", "shard", "slice"}`` with status
    ``retained`` (shard and slice set), ``validation``, ``forgotten`` or ``unknown`` (never a
    training id of this run). Forgotten ids are matched through the ledger's keys, so this works
    when the run stores only salted hashes of them (``ledger.hash_ids``)."""
    run.reload()
    arr = np.asarray(ids, dtype=np.int64).ravel()
    part = run.partition
    row, found = np.searchsorted(part.ids, arr), part.contains(arr)
    val = np.isin(arr, run.val_data()[0]) if run.has_validation else np.zeros(len(arr), bool)
    gone = np.isin(run.ledger.removed_keys(arr), part.removed)
    out = []
    for i, x in enumerate(arr.tolist()):
        rec: dict[str, Any] = {"id": x, "status": "unknown", "shard": None, "slice": None}
        if found[i]:
            r = int(row[i])
            rec.update(status="retained", shard=int(part.shard[r]), slice=int(part.slice[r]))
        elif val[i]:
            rec["status"] = "validation"
        elif gone[i]:
            rec["status"] = "forgotten"
        out.append(rec)
    return out


def list_ids(
    run: SisaRun, which: str = "retained", shard: int | None = None, slice: int | None = None
) -> np.ndarray:
    """Sorted ids ``[K]`` of one kind: ``retained`` (optionally of one shard and/or slice),
    ``validation`` or ``forgotten``.

    Raises:
      UserInputError: an unknown kind, a shard/slice filter on a kind without one, a shard or slice
        out of range, or ``forgotten`` on a run that stores only salted hashes of them.
    """
    run.reload()
    part = run.partition
    if which not in ("retained", "validation", "forgotten"):
        raise UserInputError(f"which must be retained, validation or forgotten, not {which!r}")
    if which != "retained" and (shard is not None or slice is not None):
        raise UserInputError("shard= and slice= select retained ids only")
    if which == "validation":
        return np.sort(run.val_data()[0]) if run.has_validation else np.zeros(0, np.int64)
    if which == "forgotten":
        if run.config.ledger.hash_ids:
            raise UserInputError(
                "this run keeps only salted hashes of forgotten ids (ledger.hash_ids): they "
                "cannot be listed; ask about given ids with find=[...]"
            )
        return np.asarray(part.removed, np.int64)
    keep = np.ones(len(part.ids), bool)
    shard = None if shard is None else int_value(shard, "shard")
    slice = None if slice is None else int_value(slice, "slice")
    if shard is not None:
        if not 0 <= int(shard) < part.num_shards:
            raise UserInputError(f"shard must be in 0..{part.num_shards - 1}, not {shard}")
        keep &= part.shard == int(shard)
    if slice is not None:
        if not 0 <= int(slice) < part.num_slices:
            raise UserInputError(f"slice must be in 0..{part.num_slices - 1}, not {slice}")
        keep &= part.slice == int(slice)
    return part.ids[keep]
