"""Deletion receipts: a self-verifying statement that a forget request was carried out.

A receipt is a JSON document issued for a *done* forget request of a run. It names, without any
raw id when the run hashes ids, what a third party needs to check the claim later:

- the run (``run_id``: a hash of the ledger's first record, so a receipt cannot be replayed
  against another run) and the request (its id, how many ids, a fingerprint of the ids as the
  ledger stores them: raw or salted hashes);
- its place in the hash-chained ledger: the pending and done records' positions and hashes,
  and the chain's head when the receipt was issued;
- what changed: the (shard, slice) locations of the ids, the slice each affected shard restarted
  from, the checkpoint rows restored (and their sha256 where the run recorded it), and the
  fingerprint of each retrained shard's rows after the forget;
- the config fingerprint, the library versions and plug-in source hashes, the hosts;
- ``receipt_hash``: sha256 over the canonical JSON of all the above (an edited receipt fails).

:func:`check_receipt` verifies a receipt against a run: its own hash, that it belongs to this
run, that the ledger chain is intact and holds both records at the stated positions with the
stated hashes, that the ids are still forgotten, that the live rows of each affected shard are
those the forget wrote (or were replaced by later recorded requests, named), and with
``replay=True`` that retraining the affected shards from scratch on the retained ids gives the
stored rows bit for bit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from sisajax.errors import RunError, UserInputError
from sisajax.run import SisaRun
from sisajax.store.ledger import id_key

FORMAT = "sisajax-receipt/1"


class ReceiptError(UserInputError):
    """A receipt cannot be issued or read (unknown request, not done, malformed file)."""


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _sha(obj: Any) -> str:
    return hashlib.sha256(_canonical(obj)).hexdigest()


def run_id(run: SisaRun) -> str:
    """The run's identity: sha256 of ``"sisajax-run:"`` + the hash of its first ledger record
    (every run writes one when it is trained)."""
    records = run.ledger.read().records
    if not records:
        raise ReceiptError(f"{run.run_dir} has no ledger records: it has no identity to cite")
    return hashlib.sha256(f"sisajax-run:{records[0]['hash']}".encode()).hexdigest()


def shard_rows_fingerprint(run: SisaRun, k: int) -> str:
    """sha256 over shard ``k``'s live row checksums, in slice order (what a forget's done
    record stores per retrained shard)."""
    from sisajax.unlearning import model_fingerprints

    return model_fingerprints(run, {str(k): 0})[str(k)]


def _request_records(records: list[dict[str, Any]], seq: int) -> tuple[dict, dict]:
    """``(pending, done)`` records of the forget request that the record at ``seq`` belongs to."""
    if not 0 <= seq < len(records):
        raise ReceiptError(f"request={seq}: the ledger has records 0..{len(records) - 1}")
    rid = records[seq]["request_id"]
    mine = [r for r in records if r["request_id"] == rid]
    pending = next((r for r in mine if r["state"] == "pending"), None)
    done = next((r for r in mine if r["state"] == "done"), None)
    kind = (pending or done or records[seq]).get("kind")
    if kind != "forget":
        raise ReceiptError(f"request={seq}: record {seq} is a {kind!r} record, not a forget")
    if done is None or pending is None:
        state = mine[-1]["state"]
        raise ReceiptError(
            f"request={seq}: that forget is {state}, not done (a receipt is issued only for done "
            "work; `sisajax resume` finishes a pending one)"
        )
    return pending, done


def issue_receipt(run: SisaRun, seq: int) -> dict[str, Any]:
    """The receipt of the done forget request whose pending or done record is at ledger
    position ``seq``.

    Raises:
      ReceiptError: no such record, not a forget, or not done.
      LedgerError: the ledger chain is broken (no receipt is issued on a tampered ledger).
    """
    from sisajax.store.ledger import LedgerError

    run.reload()
    ledger = run.ledger
    chain = ledger.verify()
    if not chain.ok:
        raise LedgerError(f"the ledger does not verify: {'; '.join(chain.problems) or 'damaged'}")
    records = ledger.read().records
    pending, done = _request_records(records, int(seq))
    ids = list(pending.get("ids") or [])
    locations = sorted({tuple(v) for v in (pending.get("locations") or {}).values()})
    m = run.manifest
    body = {
        "format": FORMAT,
        "run_id": run_id(run),
        "request": {
            "request_id": pending["request_id"],
            "ids": len(ids),
            "ids_hashed": bool(run.config.ledger.hash_ids),
            "ids_fingerprint": _sha(ids),
        },
        "ledger": {
            "pending_seq": pending["seq"],
            "pending_hash": pending["hash"],
            "done_seq": done["seq"],
            "done_hash": done["hash"],
            "head_count": len(records),
            "head_hash": records[-1]["hash"],
        },
        "locations": [list(t) for t in locations],  # [shard, slice]; [-1, -1]: validation ids
        "restart": pending.get("restart") or {},
        # the checkpoint each affected shard restarted from (with its sha256 where recorded)
        # and the fingerprint of the shard's rows before the forget (runs from older versions
        # did not record it: null)
        "rows_restored": pending.get("restored_rows") or [],
        "rows_before": pending.get("model_fingerprints_before"),
        "rows_after": done.get("model_fingerprints") or {},
        "generation": done.get("generation"),
        "config_fingerprint": m.config_fingerprint,
        "versions": dict(m.versions),
        "plugin_sources": dict(m.plugin_sources),
        "hosts": sorted(m.hosts),
        "issued": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return {**body, "receipt_hash": _sha(body)}


def write_receipt(receipt: dict[str, Any], path: str | Path) -> Path:
    """Write ``receipt`` as JSON to ``path`` (atomically); returns the path."""
    from sisajax.store.files import write_file

    p = Path(path)
    write_file(p, (json.dumps(receipt, indent=1, sort_keys=True) + "\n").encode(), what=p.name)
    return p


def read_receipt(path: str | Path) -> dict[str, Any]:
    """A receipt from ``path`` (ReceiptError if missing, unreadable or not a receipt)."""
    p = Path(path)
    try:
        obj = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError):
        raise ReceiptError(f"receipt {p}: cannot be read") from None
    except json.JSONDecodeError:
        raise ReceiptError(f"receipt {p}: not JSON") from None
    check_fields(obj, f"receipt {p}")
    return obj


_SHARD = re.compile(r"0|[1-9][0-9]{0,8}")


def check_fields(receipt: Any, where: str = "receipt") -> None:
    """ReceiptError (one line, naming ``where``) unless ``receipt`` holds every field
    :func:`check_receipt` reads, of the right type and in range. Its hash is plain sha256, so
    anyone can make a body that passes it: the fields are checked as any other input."""

    def refuse(what: str) -> None:
        raise ReceiptError(f"{where}: {what}")

    if not isinstance(receipt, dict) or receipt.get("format") != FORMAT:
        refuse(f"not a {FORMAT} document")
    if not isinstance(receipt.get("run_id"), str):
        refuse("run_id is missing or not a string")
    lg = receipt.get("ledger")
    if not isinstance(lg, dict):
        refuse("ledger is missing or not an object")
    for key in ("pending_seq", "done_seq", "head_count"):
        v = lg.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            refuse(f"ledger.{key} must be an integer >= 0")
    for key in ("pending_hash", "done_hash", "head_hash"):
        if not isinstance(lg.get(key), str):
            refuse(f"ledger.{key} is missing or not a string")
    request = receipt.get("request")
    if not isinstance(request, dict) or not isinstance(request.get("ids_fingerprint"), str):
        refuse("request.ids_fingerprint is missing or not a string")
    after = receipt.get("rows_after")
    if not isinstance(after, dict) or not all(
        isinstance(k, str) and _SHARD.fullmatch(k) and isinstance(v, str) for k, v in after.items()
    ):
        refuse("rows_after must map shard numbers to row fingerprints")


@dataclasses.dataclass
class ReceiptCheck:
    """What :func:`check_receipt` found: ``checks`` is ``[(name, ok, detail)]`` in order."""

    checks: list[tuple[str, bool, str]]

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.checks)

    @property
    def first_failure(self) -> str | None:
        bad = [f"{name}: {detail}" for name, ok, detail in self.checks if not ok]
        return bad[0] if bad else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checks": [{"check": n, "ok": o, "detail": d} for n, o, d in self.checks],
        }


def check_receipt(receipt: dict[str, Any], run: SisaRun, *, replay: bool = False) -> ReceiptCheck:
    """Verify ``receipt`` against ``run`` (see the module docstring). Stops at the first check
    that fails when later ones would read what it could not vouch for.

    Raises:
      ReceiptError: ``receipt`` lacks a field it must hold, or holds one of the wrong type.
    """
    check_fields(receipt)
    out: list[tuple[str, bool, str]] = []
    body = {k: v for k, v in receipt.items() if k != "receipt_hash"}
    intact = _sha(body) == receipt.get("receipt_hash")
    out.append(("receipt intact", intact, "its hash matches its content" if intact else
                "its content does not match receipt_hash (edited)"))  # fmt: skip
    if not intact:
        return ReceiptCheck(out)
    run.reload()
    try:
        mine = run_id(run)
    except ReceiptError as e:
        mine = str(e)
    same = mine == receipt["run_id"]
    out.append(("same run", same, "run_id matches" if same else "issued for another run"))
    if not same:
        return ReceiptCheck(out)
    ledger = run.ledger
    chain = ledger.verify()
    out.append(("ledger chain", chain.ok, f"{chain.records} records" if chain.ok else
                "; ".join(chain.problems) or "interrupted append"))  # fmt: skip
    if not chain.ok:
        return ReceiptCheck(out)
    records = ledger.read().records
    lg = receipt["ledger"]
    n = len(records)
    included = (
        lg["pending_seq"] < lg["done_seq"] < lg["head_count"] <= n
        and records[lg["pending_seq"]]["hash"] == lg["pending_hash"]
        and records[lg["done_seq"]]["hash"] == lg["done_hash"]
        and records[lg["head_count"] - 1]["hash"] == lg["head_hash"]
    )
    pending = records[lg["pending_seq"]] if included else {}
    done = records[lg["done_seq"]] if included else {}
    one_request = included and (
        pending.get("state") == "pending"
        and done.get("state") == "done"
        and pending.get("kind") == done.get("kind") == "forget"
        and pending.get("request_id") == done.get("request_id")
    )
    out.append(("in the ledger", one_request,
                f"pending at {lg['pending_seq']}, done at {lg['done_seq']}" if one_request else
                "the records at the stated positions do not have the stated hashes"
                if not included else "those records are not the pending and done records of "
                "one forget request"))  # fmt: skip
    if not one_request:
        return ReceiptCheck(out)
    ids = list(pending.get("ids") or [])
    same_ids = _sha(ids) == receipt["request"]["ids_fingerprint"]
    out.append(("ids fingerprint", same_ids, f"{len(ids)} ids" if same_ids else
                "the ledger's ids differ from the receipt's fingerprint"))  # fmt: skip
    out.append(_still_forgotten(run, ids))
    out.append(_live_rows(run, receipt, records))
    out.append(_nothing_left_behind(run))
    if replay and all(ok for _, ok, _ in out):
        out.append(_replay(run, receipt))
    return ReceiptCheck(out)


def _still_forgotten(run: SisaRun, ids: list[Any]) -> tuple[str, bool, str]:
    """The request's ids are in the run's forgotten list and in no shard or split."""
    part = run.partition
    hashed = run.config.ledger.hash_ids
    keys = (np.array([id_key(h) for h in ids], np.int64) if hashed
            else np.asarray(ids, np.int64))  # fmt: skip
    remembered = bool(np.isin(keys, part.removed).all())
    present = 0
    if not hashed:
        present = int(part.contains(keys).sum())
        if run.has_validation:
            present += int(np.isin(keys, run.val_data()[0]).sum())
    ok = remembered and present == 0
    detail = (f"{len(ids)} ids forgotten and absent" if ok else
              f"{present} ids back in the data" if present else
              "some ids are missing from the run's forgotten list")  # fmt: skip
    return ("ids still forgotten", ok, detail)


def _live_rows(run: SisaRun, receipt: dict[str, Any], records: list[dict]) -> tuple:
    """Each affected shard's live rows are the ones the forget wrote, or a later done request
    (named) retrained that shard since."""
    after, done_seq = receipt["rows_after"], receipt["ledger"]["done_seq"]
    later: dict[str, int] = {}
    pending_of = {r["request_id"]: r for r in records if r["state"] == "pending"}
    for r in records[done_seq + 1 :]:
        if r["state"] != "done":
            continue
        if r.get("kind") == "retrain":
            for k in after:
                later.setdefault(k, r["seq"])
        restart = (pending_of.get(r["request_id"]) or {}).get("restart") or {}
        for k in restart:
            if k in after:
                later.setdefault(k, r["seq"])
    bad, superseded, damaged = [], [], []
    for k, fp in after.items():
        if int(k) >= run.num_shards:
            bad.append(k)
        elif k in later:
            superseded.append(f"shard {k} by record {later[k]}")
        elif shard_rows_fingerprint(run, int(k)) != fp:
            bad.append(k)
        else:  # the manifest names the right rows: the files must hold them
            try:
                run.check_rows(int(k))
            except (RunError, OSError) as e:
                damaged.append(f"shard {k}: {e}")
    if bad:
        return ("live rows", False, f"shards {bad} hold rows the forget did not write")
    if damaged:
        return ("live rows", False, f"row files differ from what the manifest names: {damaged[0]}")
    note = f"{len(after) - len(superseded)} shards as written"
    if superseded:
        note += "; retrained since: " + ", ".join(superseded)
    return ("live rows", True, note)


def _nothing_left_behind(run: SisaRun) -> tuple[str, bool, str]:
    """No superseded file (an old checkpoint or data copy that may hold forgotten ids) is left in
    the run directory."""
    superseded, _ = run.files.scan(run.manifest.files())
    if not superseded:
        return ("nothing left behind", True, "no superseded checkpoint or data file")
    hint = "; `sisajax resume` finishes an interrupted request" if run.ledger.pending() else ""
    shown = ", ".join(superseded[:3]) + (" ..." if len(superseded) > 3 else "")
    return (
        "nothing left behind",
        False,
        f"{len(superseded)} superseded files remain: {shown}{hint}",
    )


def _replay(run: SisaRun, receipt: dict[str, Any]) -> tuple[str, bool, str]:
    """Retrain the affected shards from scratch and compare every stored row bit for bit."""
    from sisajax.verification import verify

    shards = sorted(int(k) for k in receipt["rows_after"])
    if not shards:
        return ("replay", True, "no shard was retrained (validation ids only)")
    rep = verify(run, shards=shards, write=False)
    return ("replay", rep.ok, f"{len(shards)} shards retrained from scratch: "
            + ("bit-identical" if rep.ok else "rows differ"))  # fmt: skip
