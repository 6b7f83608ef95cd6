"""Audit a run directory: is every forgotten id really gone from everything we store?

Read-only (works on a read-only run directory). Checks, each reported separately:
  * the ledger's hash chain and head anchor (an interrupted append is reported as such: ``resume``
    completes or drops it; edits, removals and reordering are reported as damage);
  * no request left ``pending`` (an interrupted command: run ``sisajax resume``); reported
    first, as it explains what else such a run shows (the files the request left behind);
  * the ledger agrees with the run: every forgotten id has a ``done`` request and every done
    request's ids are forgotten; a run past generation 0 names the request that made it (so a
    deleted or truncated ledger is noticed);
  * every live file exists, is a regular file and matches its checksum (slice checkpoints, data
    copies, the held-out split, the partition);
  * **residual exposure**: the number of stored (shard, slice) checkpoints trained on a forgotten
    id, or whose training ids cannot be established (each checkpoint's header names the exact ids
    it saw by fingerprint, which must match its shard's data copy and the manifest); must be 0;
  * every data copy and the partition are free of forgotten ids;
  * no superseded file of ours is left behind; foreign entries (links, folders, other files) in
    ``data/`` and ``checkpoints/`` are listed as warnings, never touched.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from typing import Any

import numpy as np

from sisajax.data.partition import fingerprint_ids
from sisajax.errors import RunError
from sisajax.run import SisaRun
from sisajax.store.files import sha256_file
from sisajax.store.ledger import ChainReport, LedgerError, id_key
from sisajax.store.manifest import row_file
from sisajax.store.rows import RowError, read_row


@dataclasses.dataclass
class AuditReport:
    """Outcome of :func:`audit`; ``ok`` only if every check passed (warnings do not fail)."""

    chain: ChainReport
    pending_requests: list[str]
    residual_exposure: int
    exposures: list[dict[str, Any]]
    problems: list[str]
    warnings: list[str]
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


def _forgotten_by_ledger(run: SisaRun, records: list[dict[str, Any]]) -> tuple[set[Any], list[str]]:
    """Ids (as stored) of done forget requests since the last history-discarding retrain."""
    first: dict[str, dict[str, Any]] = {}
    last: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    for r in records:
        rid = str(r.get("request_id"))
        if rid not in first:
            first[rid] = r
            order.append(rid)
        last[rid] = r
    done: set[Any] = set()
    for rid in order:
        kind, state = first[rid].get("kind", "forget"), last[rid].get("state")
        if kind == "retrain" and state == "done" and first[rid].get("discard_deletion_history"):
            done = set()
        elif kind == "forget" and state == "done":
            done.update(first[rid].get("ids", []))
            done.update(first[rid].get("already_forgotten", []))
    return done, order


def audit(run: SisaRun) -> AuditReport:
    """Run every check on ``run`` (read-only) and report."""
    run.reload()
    ledger = run.fresh_ledger()
    chain = ledger.verify()
    problems: list[str] = []
    warnings: list[str] = []
    try:
        records = ledger.records()
    except LedgerError as e:
        records = []
        problems.append(str(e))
    requests = {}
    for r in records:
        requests[str(r.get("request_id"))] = r
    pending = [rid for rid, r in requests.items() if r.get("state") == "pending"]
    if pending:  # the cause of most other findings below: say it first
        problems.append(
            f"pending request: {len(pending)} request(s) left unfinished by an interrupted "
            "command; run `sisajax resume`"
        )
    m = run.manifest
    hashed = run.config.ledger.hash_ids

    # the ledger agrees with the run
    origin = m.origin.get("request_id")
    if m.generation > 0 and origin not in requests:
        problems.append(
            f"generation {m.generation} was made by request {origin!r}, which the ledger does not "
            "record (ledger deleted or truncated?)"
        )
    try:
        part = run.partition
    except (RunError, OSError) as e:
        problems.append(str(e))
        return AuditReport(chain, pending, 0, [], problems, warnings, 0, 0)
    removed = set(part.removed.tolist())
    done_ids, _ = _forgotten_by_ledger(run, records)
    salt_ok = True
    if hashed:
        try:
            ledger.check_salt((m.id_hashing or {}).get("salt_fingerprint"))
        except LedgerError as e:
            salt_ok = False
            problems.append(str(e))
        salt = run.files.path("ledger.salt")
        if salt.exists() and stat.S_IMODE(os.lstat(salt).st_mode) & 0o077:
            warnings.append("ledger.salt is readable by other users (expected mode 0600)")
    done_keys = {id_key(i) if hashed else int(i) for i in done_ids}
    # a pending request that committed its generation before being interrupted has forgotten its
    # ids without a done record yet: `resume` writes it
    pending_ids = {i for rid in pending for i in _first_record(records, rid).get("ids", [])}
    pending_keys = {id_key(i) if hashed else int(i) for i in pending_ids}
    if done_keys - removed:
        problems.append(f"{len(done_keys - removed)} id(s) of done requests are not forgotten")
    if removed - done_keys - pending_keys:
        problems.append(
            f"{len(removed - done_keys - pending_keys)} forgotten id(s) have no done request in "
            "the ledger (ledger deleted, truncated or replaced?)"
        )

    def keys_of(ids: np.ndarray) -> np.ndarray:
        if not hashed:
            return np.asarray(ids, np.int64)
        if not salt_ok:
            return np.full(len(ids), -1, np.int64)
        return ledger.removed_keys(ids)

    removed_arr = part.removed
    if np.isin(keys_of(part.ids), removed_arr).any():
        problems.append("the partition still lists forgotten ids as training ids")

    # live files
    for ref in (m.partition, m.test_data):
        _check_file(run, ref.path, ref.sha256, problems)
    if m.val_data is not None and _check_file(run, m.val_data.path, m.val_data.sha256, problems):
        try:
            val_ids = run.val_data()[0]
        except (RunError, OSError) as e:
            problems.append(f"validation split: {e}")
        else:
            if np.isin(keys_of(val_ids), removed_arr).any():
                problems.append("the stored validation split still holds forgotten ids")
    spec = run.row_spec()
    exposures: list[dict[str, Any]] = []
    checked = 0
    for k, entry in enumerate(m.shards):
        try:
            data = run.shard_data(k)
        except (RunError, OSError) as e:
            problems.append(f"shard {k}: {e}")
            data = None
        if data is not None:
            if np.isin(keys_of(data.ids), removed_arr).any():
                problems.append(f"shard {k}: the stored data copy still holds forgotten ids")
            if part.shard_ids(k).tolist() != data.ids.tolist():
                problems.append(f"shard {k}: the data copy and the partition disagree")
        for j, ref in enumerate(entry.rows):
            checked += 1
            rel = row_file(k, j, ref.generation)
            exposed, why = 0, None
            try:
                header, _ = read_row(run.files.path(rel), ref.sha256, spec, rel)
            except (RowError, OSError) as e:
                problems.append(f"shard {k} slice {j}: {e}")
                header = None
            if header is None:
                why = "it cannot be read or fails its checksum: its training ids are unknown"
            elif header.get("ids_fingerprint") != entry.fingerprints[j]:
                why = "its recorded training ids differ from the manifest's"
            elif data is not None:
                seen = data.ids[data.slices <= j]
                if fingerprint_ids(seen) != entry.fingerprints[j]:
                    why = "its training ids do not match the shard's data copy"
                else:
                    exposed = int(np.isin(keys_of(seen), removed_arr).sum())
            if why is not None or exposed:
                exposures.append({"shard": k, "slice": j, "count": exposed, "why": why})
    foreign_hosts = run.foreign_hosts()
    for h, diff in foreign_hosts.items():
        warnings.append(f"rows made on another host {h}: {'; '.join(diff)}")
    superseded, foreign = run.files.scan(m.files())
    if superseded and pending:
        warnings.append(
            f"files the interrupted request left behind (`sisajax resume` removes them): "
            f"{superseded[:10]}"
        )
    elif superseded:
        problems.append(f"superseded files not deleted: {superseded[:10]}")
    if foreign:
        warnings.append(f"foreign entries left alone (not sisajax's): {foreign[:10]}")
    if chain.interrupted:
        problems.append(
            f"the ledger has an interrupted append ({chain.interrupted}): run `sisajax resume`"
        )
    return AuditReport(
        chain,
        pending,
        sum(max(e["count"], 1) for e in exposures),
        exposures,
        problems,
        warnings,
        checked,
        len(removed),
    )


def _first_record(records: list[dict[str, Any]], request_id: str) -> dict[str, Any]:
    """The first record of ``request_id`` (the one that lists its ids)."""
    return next((r for r in records if str(r.get("request_id")) == request_id), {})


def _check_file(run: SisaRun, rel: str, sha: str, problems: list[str]) -> bool:
    """Whether ``rel`` is there with checksum ``sha``; else a problem is appended."""
    n = len(problems)
    try:
        path = run.files.path(rel)
        if not path.is_file():
            problems.append(f"{rel} is missing")
        elif sha256_file(path) != sha:
            problems.append(f"{rel} is corrupt (checksum mismatch)")
    except OSError as e:
        problems.append(f"{rel}: {e.strerror}")
    return len(problems) == n
