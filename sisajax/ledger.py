"""The deletion ledger: an append-only, hash-chained, fsynced record of every forget request.

One JSON object per line in ``run_dir/ledger.jsonl``. A request writes a ``pending`` record before
any retraining starts and a ``done`` record only after the new checkpoints are durable and live;
a request's state is that of its last record. Each record holds the sha256 of the previous one
(``prev``) and its own (``hash``, over the canonical JSON of everything else), and
``ledger.head`` (rewritten atomically after every append) names the last hash and the count, so
editing, reordering or truncating records is detected by :meth:`Ledger.verify`.

With ``hash_ids`` the ledger stores salted sha256 hashes of the ids instead of the ids; the salt
lives in ``run_dir/ledger.salt``. The raw ids of a request in flight are kept in
``pending/<request_id>.json`` until it is done, so a crashed request can be finished.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from sisajax.checkpoint import fsync_dir

GENESIS = "0" * 64


class LedgerError(RuntimeError):
    """The ledger is malformed, broken or tampered with."""


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def record_hash(record: dict[str, Any]) -> str:
    """sha256 over the canonical JSON of a record without its ``hash`` field."""
    return hashlib.sha256(_canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


@dataclasses.dataclass(frozen=True)
class ChainReport:
    """Result of verifying the chain."""

    ok: bool
    records: int
    problems: list[str]


class Ledger:
    """Append-only hash-chained ledger in a run directory."""

    def __init__(self, run_dir: str | Path, hash_ids: bool = False):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "ledger.jsonl"
        self.head_path = self.run_dir / "ledger.head"
        self.pending_dir = self.run_dir / "pending"
        self.hash_ids = hash_ids

    # -- ids ------------------------------------------------------------------------------------
    @property
    def salt(self) -> str:
        path = self.run_dir / "ledger.salt"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_text(secrets.token_hex(16))
            os.replace(tmp, path)
        return path.read_text().strip()

    def id_hash(self, i: int) -> str:
        return hashlib.sha256(f"{self.salt}:{int(i)}".encode()).hexdigest()

    def redact(self, ids: list[int]) -> list[Any]:
        """Ids as the ledger stores them: raw, or salted hashes with ``hash_ids``."""
        return [self.id_hash(i) for i in ids] if self.hash_ids else [int(i) for i in ids]

    # -- reading --------------------------------------------------------------------------------
    def records(self) -> list[dict[str, Any]]:
        """All records, oldest first. A torn (unterminated) last line raises :class:`LedgerError`."""
        if not self.path.exists():
            return []
        text = self.path.read_text()
        if text and not text.endswith("\n"):
            raise LedgerError(f"{self.path}: last record is incomplete (torn write)")
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise LedgerError(f"{self.path}:{n}: not a JSON record ({e})") from e
        return out

    def head(self) -> dict[str, Any]:
        if not self.head_path.exists():
            return {"count": 0, "hash": GENESIS}
        return json.loads(self.head_path.read_text())

    def requests(self) -> dict[str, dict[str, Any]]:
        """``{request_id: last record}`` in order of first appearance."""
        out: dict[str, dict[str, Any]] = {}
        for r in self.records():
            out[r["request_id"]] = r
        return out

    def pending(self) -> list[dict[str, Any]]:
        """Requests whose last record is ``pending`` (interrupted, to be finished)."""
        return [r for r in self.requests().values() if r["state"] == "pending"]

    def pending_ids(self, request_id: str) -> list[int]:
        path = self.pending_dir / f"{request_id}.json"
        if not path.exists():
            raise LedgerError(f"pending request {request_id} has lost its id file {path}")
        return json.loads(path.read_text())

    # -- writing --------------------------------------------------------------------------------
    def new_request_id(self) -> str:
        return time.strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(4)

    def append(self, request_id: str, state: str, **fields: Any) -> dict[str, Any]:
        """Append one record durably (write, flush, fsync) and update the head."""
        head = self.head()
        record = {
            "seq": head["count"],
            "request_id": request_id,
            "state": state,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "prev": head["hash"],
            **fields,
        }
        record["hash"] = record_hash(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        tmp = self.head_path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump({"count": head["count"] + 1, "hash": record["hash"]}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.head_path)
        fsync_dir(self.run_dir)
        return record

    def write_pending_ids(self, request_id: str, ids: list[int]) -> None:
        self.pending_dir.mkdir(exist_ok=True)
        path = self.pending_dir / f"{request_id}.json"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump([int(i) for i in ids], f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(self.pending_dir)

    def clear_pending_ids(self, request_id: str) -> None:
        path = self.pending_dir / f"{request_id}.json"
        if path.exists():
            path.unlink()
            fsync_dir(self.pending_dir)

    def orphan_pending_files(self) -> list[Path]:
        """Id files with no pending record (a crash between writing them and the record)."""
        if not self.pending_dir.exists():
            return []
        live = {r["request_id"] for r in self.pending()}
        return [p for p in self.pending_dir.iterdir() if p.stem not in live]

    # -- verification ---------------------------------------------------------------------------
    def verify(self) -> ChainReport:
        """Check hashes, links, sequence numbers and the head anchor."""
        problems = []
        try:
            recs = self.records()
        except LedgerError as e:
            return ChainReport(False, 0, [str(e)])
        prev = GENESIS
        for n, r in enumerate(recs):
            if r.get("seq") != n:
                problems.append(f"record {n}: sequence number {r.get('seq')} (expected {n})")
            if r.get("prev") != prev:
                problems.append(f"record {n}: does not link to the previous record")
            if r.get("hash") != record_hash(r):
                problems.append(f"record {n}: content does not match its hash (edited)")
            prev = r.get("hash", "")
        head = self.head()
        if head["count"] != len(recs) or head["hash"] != (recs[-1]["hash"] if recs else GENESIS):
            problems.append(
                f"ledger.head names {head['count']} records ending {head['hash'][:12]}, "
                f"the ledger has {len(recs)} (truncated or appended without the head)"
            )
        return ChainReport(not problems, len(recs), problems)
