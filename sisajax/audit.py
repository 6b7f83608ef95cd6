"""Audit a run directory: is every forgotten id really gone from everything we store?

Checks, each reported separately:
  * the deletion ledger's hash chain and head anchor;
  * no request left ``pending`` (an interrupted ``forget``: run ``sisajax resume``);
  * every live file's checksum (checkpoint blocks, data copies, partition);
  * **residual exposure**: the number of stored checkpoints (shard, slice) whose recorded training
    ids include a forgotten id (must be 0); each block records exactly which ids every row saw,
    and its fingerprints must match them;
  * every data copy and the partition are free of forgotten ids, and each checkpoint was trained
    on exactly the ids of its shard's data copy;
  * every id of a ``done`` ledger request is in the removed list;
  * no stray files (superseded checkpoints or data copies) are left behind.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from sisajax.checkpoint import CheckpointError
from sisajax.data.partition import fingerprint_ids
from sisajax.ledger import ChainReport
from sisajax.run import RunError, SisaRun


@dataclasses.dataclass
class AuditReport:
    """Outcome of :func:`audit`; ``ok`` only if every check passed."""

    chain: ChainReport
    pending_requests: list[str]
    residual_exposure: int
    exposures: list[dict[str, Any]]
    problems: list[str]
    checkpoints_checked: int
    forgotten_ids: int

    @property
    def ok(self) -> bool:
        return (
            self.chain.ok
            and not self.pending_requests
            and self.residual_exposure == 0
            and not self.problems
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ok"] = self.ok
        return d


def audit(run: SisaRun) -> AuditReport:
    """Run every check on ``run`` (read-only) and report."""
    from sisajax.unlearning import _removed_keys

    run.reload()
    ledger = run.ledger
    chain = ledger.verify()
    problems: list[str] = []
    pending = [r["request_id"] for r in ledger.pending()] if chain.records else []
    try:
        part = run.partition
    except RunError as e:
        return AuditReport(chain, pending, 0, [], [str(e)], 0, 0)
    removed = part.removed
    hashed = run.config.ledger.hash_ids
    if np.isin(_removed_keys(run, part.ids), removed).any():
        problems.append("the partition still lists forgotten ids as training ids")

    exposures: list[dict[str, Any]] = []
    checked = 0
    for k in range(run.num_shards):
        entry = run.shard_entry(k)
        try:
            run.store.verify(entry["checkpoint"])
            meta = run.store.read_meta(entry["checkpoint"])
        except (CheckpointError, OSError, ValueError) as e:
            problems.append(f"shard {k}: {e}")
            continue
        ids = np.asarray(meta["ids"], np.int64)
        slices = np.asarray(meta["slices"], np.int64)
        keys = _removed_keys(run, ids)
        for j in range(run.num_slices):
            checked += 1
            seen = slices <= j
            hit = np.isin(keys[seen], removed)
            if hit.any():
                bad = ids[seen][hit]
                exposures.append(
                    {
                        "shard": k,
                        "slice": j,
                        "ids": [] if hashed else bad.tolist(),
                        "count": int(hit.sum()),
                    }
                )
            fp = fingerprint_ids(ids[seen])
            if fp != meta["fingerprints"][j] or fp != entry["fingerprints"][j]:
                problems.append(f"shard {k} slice {j}: fingerprint does not match its recorded ids")
        try:
            data = run.shard_data(k)
        except RunError as e:
            problems.append(f"shard {k}: {e}")
            continue
        if np.isin(_removed_keys(run, data.ids), removed).any():
            problems.append(f"shard {k}: the stored data copy still holds forgotten ids")
        if not (np.array_equal(data.ids, ids) and np.array_equal(data.slices, slices)):
            problems.append(f"shard {k}: checkpoint ids differ from the shard's data copy")

    if chain.ok:
        first: dict[str, dict[str, Any]] = {}
        for r in ledger.records():
            first.setdefault(r["request_id"], r)
        removed_set = set(removed.tolist())
        for rid, last in ledger.requests().items():
            if last["state"] != "done":
                continue
            for i in first[rid].get("ids", []):
                key = int(i[:16], 16) & 0x7FFFFFFFFFFFFFFF if hashed else int(i)
                if key not in removed_set:
                    problems.append(f"ledger request {rid}: id {i} is marked done but not removed")
                    break

    live_blocks = {e["checkpoint"]["block"] for e in run.manifest["shards"].values()}
    stray = [p.name for p in run.store.root.iterdir() if p.name not in live_blocks]
    live = {p.name for p in run.live_files()}
    stray += [p.name for p in (run.run_dir / "data").iterdir() if p.name not in live]
    stray += [p.name for p in run.run_dir.glob("partition.*") if p.name not in live]
    if stray:
        problems.append(f"stray files not referenced by the manifest: {sorted(stray)}")
    return AuditReport(
        chain,
        pending,
        sum(e["count"] for e in exposures),
        exposures,
        problems,
        checked,
        len(removed),
    )
