"""The deletion ledger: an append-only, hash-chained write-ahead log of every request on a run.

One JSON record per line in ``ledger.jsonl``. A request (``kind``: ``forget`` or ``retrain``)
writes a ``pending`` record before anything of it becomes live and a ``done`` record only after
its new files are durable and live (or ``aborted`` when it never committed); a request's state is
that of its last record. Each record holds the sha256 of the previous one (``prev``) and its own
(``hash``, over the canonical JSON of everything else). ``ledger.head`` names the count and the
last hash, so editing, reordering or truncating records is detected.

Appending is crash-consistent like a write-ahead log: the record's line is written and fsynced,
then the head is replaced atomically. A crash or a full disk between the two leaves either a torn
last line (an incomplete line: the append never happened) or one complete record after the head
(the append happened, its anchor did not). :meth:`Ledger.read` recognises both as an
*interrupted append* (not tampering) and :meth:`Ledger.recover` completes or drops it; any other
mismatch (an edited or missing record, a head naming more records than there are) is reported.

Ids: records hold raw ids, or with ``ledger.hash_ids`` salted sha256 hashes. The salt comes from
outside the run when given (``SISAJAX_LEDGER_SALT`` with the salt itself, ``SISAJAX_LEDGER_SALT_FILE``
or ``ledger.salt_file`` naming a file), else from ``ledger.salt`` in the run directory (mode 0600).
A salt inside the run lets anyone holding the run directory test candidate ids against the hashes;
only an outside salt keeps the run directory alone from revealing which ids were forgotten.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import secrets
import stat
import time
from pathlib import Path
from typing import Any

import numpy as np

from sisajax.errors import RunStateError, storage_error
from sisajax.store.faults import fault, io_fault
from sisajax.store.files import fsync_file, managed_path, open_read, read_bytes, write_file

GENESIS = "0" * 64
LEDGER = "ledger.jsonl"
HEAD = "ledger.head"
SALT = "ledger.salt"
SALT_ENV = "SISAJAX_LEDGER_SALT"
SALT_FILE_ENV = "SISAJAX_LEDGER_SALT_FILE"


class LedgerError(RunStateError):
    """The ledger is malformed, broken or tampered with (or its salt is missing or wrong)."""


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def record_hash(record: dict[str, Any]) -> str:
    """sha256 over the canonical JSON of a record without its ``hash`` field."""
    return hashlib.sha256(_canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


@dataclasses.dataclass(frozen=True)
class ChainReport:
    """Result of checking the ledger.

    Attributes:
      ok: the chain is intact and anchored (no problem, no interrupted append).
      records: number of complete records.
      problems: tampering or damage found (each one line).
      interrupted: an interrupted append that :meth:`Ledger.recover` will complete or drop
        (``"torn"`` or ``"unanchored"``), else None.
    """

    ok: bool
    records: int
    problems: list[str]
    interrupted: str | None = None


@dataclasses.dataclass(frozen=True)
class LedgerState:
    """What :meth:`Ledger.read` found: complete records, the byte length they span, the head."""

    records: list[dict[str, Any]]
    complete_bytes: int
    torn_bytes: int
    head: dict[str, Any] | None
    head_problem: str | None


def id_key(id_hash: str) -> int:
    """The int64 key a salted hash is kept under in the partition's removed list."""
    return int(id_hash[:16], 16) & 0x7FFFFFFFFFFFFFFF


class Ledger:
    """The ledger of the run in ``root`` (a real, checked run directory).

    Args:
      root: the run directory.
      hash_ids: keep salted hashes of ids instead of raw ids.
      salt_file: a file holding the salt, outside the run (``ledger.salt_file``).
    """

    def __init__(self, root: Path, *, hash_ids: bool = False, salt_file: str | None = None):
        self.root = root
        self.path = managed_path(root, LEDGER)
        self.head_path = managed_path(root, HEAD)
        self.hash_ids = hash_ids
        self.salt_file = salt_file
        self._salt: str | None = None
        self._cache: tuple[Any, LedgerState, ChainReport | None] | None = None

    # -- ids ------------------------------------------------------------------------------------
    def salt_source(self) -> str:
        """``env``, ``file`` (outside the run) or ``run_dir``."""
        if os.environ.get(SALT_ENV):
            return "env"
        if os.environ.get(SALT_FILE_ENV) or self.salt_file:
            return "file"
        return "run_dir"

    def load_salt(self, *, create: bool = False) -> str:
        """The salt; ``create`` makes ``ledger.salt`` (0600) when no outside salt is given."""
        if self._salt is not None:
            return self._salt
        source = self.salt_source()
        if source == "env":
            salt = os.environ[SALT_ENV].strip()
        elif source == "file":
            path = Path(os.environ.get(SALT_FILE_ENV) or str(self.salt_file)).expanduser()
            try:
                salt = read_bytes(path).decode().strip()
            except (OSError, UnicodeDecodeError):
                raise LedgerError(
                    f"the id salt file {path} cannot be read (ledger.hash_ids needs it)"
                ) from None
        else:
            path = managed_path(self.root, SALT)
            if not path.exists():
                if not create:
                    raise LedgerError(
                        f"{path.name} is missing: hashed ids cannot be checked or added; supply "
                        f"the salt with {SALT_ENV} or {SALT_FILE_ENV}"
                    )
                write_file(path, secrets.token_hex(16).encode(), mode=0o600, what=SALT)
            salt = read_bytes(path).decode(errors="replace").strip()
        if len(salt) < 16:
            raise LedgerError("the id salt is shorter than 16 characters")
        self._salt = salt
        return salt

    def salt_fingerprint(self) -> str:
        return hashlib.sha256(f"sisajax-salt:{self.load_salt()}".encode()).hexdigest()

    def check_salt(self, expected_fingerprint: str | None) -> None:
        """Raise :class:`LedgerError` unless the salt at hand is the run's."""
        if expected_fingerprint and self.salt_fingerprint() != expected_fingerprint:
            raise LedgerError(
                "the id salt given does not match the one this run was created with "
                f"(check {SALT_ENV} / {SALT_FILE_ENV} / ledger.salt_file)"
            )

    def id_hash(self, i: int) -> str:
        return hashlib.sha256(f"{self.load_salt()}:{int(i)}".encode()).hexdigest()

    def redact(self, ids: Any) -> list[Any]:
        """Ids as records and results store them: raw ints, or salted hashes with ``hash_ids``."""
        ids = [int(i) for i in np.asarray(ids).ravel()]
        return [self.id_hash(i) for i in ids] if self.hash_ids else ids

    def removed_keys(self, ids: Any) -> np.ndarray:
        """``[K]`` int64 keys under which the partition remembers forgotten ids."""
        ids = np.asarray(ids, np.int64).ravel()
        if not self.hash_ids:
            return ids
        return np.array([id_key(self.id_hash(int(i))) for i in ids], dtype=np.int64)

    def resolve(self, stored: list[Any], candidates: np.ndarray) -> np.ndarray:
        """Raw ids among ``candidates`` that records stored as ``stored`` (raw or hashes)."""
        cand = np.asarray(candidates, np.int64)
        if not self.hash_ids:
            return np.intersect1d(np.asarray(stored, np.int64), cand)
        want = set(stored)
        return np.array([i for i in cand.tolist() if self.id_hash(i) in want], dtype=np.int64)

    # -- reading --------------------------------------------------------------------------------
    def _stamp(self) -> tuple[Any, Any]:
        """(size, mtime, inode) of the ledger and its head: unchanged files are not re-read."""

        def one(p: Path) -> Any:
            try:
                st = os.stat(p, follow_symlinks=False)
            except FileNotFoundError:
                return None
            return (st.st_size, st.st_mtime_ns, st.st_ino)

        return one(self.path), one(self.head_path)

    def read(self) -> LedgerState:
        """Parse the ledger and its head without changing anything (cached while both files are
        unchanged; a long-lived writer does not re-read its own history per request).

        Raises:
          LedgerError: a complete line that is not a JSON record (tampering or damage).
        """
        stamp = self._stamp()
        if self._cache is not None and self._cache[0] == stamp:
            return self._cache[1]
        state = self._read()
        self._cache = (stamp, state, None)
        return state

    def _read(self) -> LedgerState:
        try:
            data = read_bytes(self.path)
        except FileNotFoundError:
            data = b""
        end = data.rfind(b"\n") + 1  # bytes of complete lines
        records = []
        for n, line in enumerate(data[:end].splitlines(), 1):
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise LedgerError(
                    f"{LEDGER} line {n} is not a JSON record (edited or damaged)"
                ) from None
            if not isinstance(rec, dict):
                raise LedgerError(f"{LEDGER} line {n} is not a JSON record (edited or damaged)")
            records.append(rec)
        head, problem = None, None
        try:
            raw = json.loads(read_bytes(self.head_path))
            if not (
                isinstance(raw, dict)
                and isinstance(raw.get("count"), int)
                and isinstance(raw.get("hash"), str)
            ):
                raise ValueError
            head = raw
        except FileNotFoundError:
            pass  # no head yet: the genesis anchor (a first append may have been interrupted)
        except (ValueError, UnicodeDecodeError):
            problem = f"{HEAD} is unreadable (not the expected JSON)"
        return LedgerState(records, end, len(data) - end, head, problem)

    def verify(self, state: LedgerState | None = None) -> ChainReport:
        """Check hashes, links, sequence numbers and the head anchor."""
        try:
            st = state or self.read()
        except LedgerError as e:
            return ChainReport(False, 0, [str(e)])
        if self._cache is not None and self._cache[1] is st and self._cache[2] is not None:
            return self._cache[2]
        report = self._verify(st)
        if self._cache is not None and self._cache[1] is st:
            self._cache = (self._cache[0], st, report)
        return report

    def _verify(self, st: LedgerState) -> ChainReport:
        recs = st.records
        problems: list[str] = []
        prev = GENESIS
        for n, r in enumerate(recs):
            if r.get("seq") != n:
                problems.append(f"record {n}: sequence number {r.get('seq')} (expected {n})")
            if r.get("prev") != prev:
                problems.append(f"record {n}: does not link to the previous record")
            if r.get("hash") != record_hash(r):
                problems.append(f"record {n}: content does not match its hash (edited)")
            prev = r.get("hash", "")
        if st.head_problem:
            problems.append(st.head_problem)
            return ChainReport(False, len(recs), problems)
        head = st.head or {"count": 0, "hash": GENESIS}
        count, h = head.get("count"), head.get("hash")
        interrupted = None
        # .get: a record or head without its hash (edited by hand) is a problem, not a crash
        anchored = count == len(recs) and h == (recs[-1].get("hash") if recs else GENESIS)
        unanchored = (
            not st.torn_bytes
            and count == len(recs) - 1
            and h == (recs[-2].get("hash") if len(recs) > 1 else GENESIS)
        )
        if anchored and st.torn_bytes:
            interrupted = "torn"
        elif unanchored and not problems:
            interrupted = "unanchored"
        elif not anchored:
            what = f"{HEAD} is missing" if st.head is None else f"{HEAD} names {count} records"
            problems.append(
                f"{what} but the ledger has {len(recs)} (records removed or reordered, or the "
                "head deleted)"
            )
        return ChainReport(not problems and interrupted is None, len(recs), problems, interrupted)

    def records(self) -> list[dict[str, Any]]:
        """Complete records, oldest first (an unanchored last record included)."""
        return self.read().records

    def requests(self) -> dict[str, dict[str, Any]]:
        """``{request_id: last record}`` in order of first appearance."""
        out: dict[str, dict[str, Any]] = {}
        for r in self.records():
            out[str(r.get("request_id"))] = r
        return out

    def first_records(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for r in self.records():
            out.setdefault(str(r.get("request_id")), r)
        return out

    def pending(self) -> list[dict[str, Any]]:
        """First records of requests whose last record is ``pending`` (to be finished)."""
        first = self.first_records()
        return [first[k] for k, r in self.requests().items() if r.get("state") == "pending"]

    # -- writing --------------------------------------------------------------------------------
    def recover(self) -> str | None:
        """Complete or drop an interrupted append (writers call this first). Returns what was
        done, or None. Raises :class:`LedgerError` if the ledger is damaged otherwise."""
        st = self.read()
        rep = self.verify(st)
        if rep.problems:
            raise LedgerError("the ledger is damaged: " + "; ".join(rep.problems[:3]))
        if rep.interrupted == "torn":
            try:
                io_fault("truncate ledger")
                os.truncate(self.path, st.complete_bytes)
                fsync_file(self.path)
            except OSError as e:
                raise storage_error(e, f"repairing {LEDGER}") from None
            return f"dropped a torn, incomplete last record ({st.torn_bytes} bytes)"
        if rep.interrupted == "unanchored":
            self._write_head(len(st.records), st.records[-1]["hash"])
            return f"anchored record {len(st.records) - 1}, whose append was interrupted"
        return None

    def _write_head(self, count: int, last: str) -> None:
        write_file(self.head_path, _canonical({"count": count, "hash": last}), what=HEAD)

    def new_request_id(self) -> str:
        return time.strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(4)

    def append(self, request_id: str, state: str, **fields: Any) -> dict[str, Any]:
        """Append one record durably (line written and fsynced, then the head replaced).

        The caller holds the run's writer lock and has called :meth:`recover`.

        Raises:
          StorageError: the disk is full or read-only; the ledger is left as it was, or with an
            interrupted append that :meth:`recover` completes or drops.
        """
        st = self.read()
        count, prev = len(st.records), (st.records[-1]["hash"] if st.records else GENESIS)
        record = {
            "seq": count,
            "request_id": request_id,
            "state": state,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "prev": prev,
            **fields,
        }
        record["hash"] = record_hash(record)
        line = json.dumps(record, sort_keys=True).encode() + b"\n"
        try:
            fd = os.open(
                self.path,
                os.O_WRONLY
                | os.O_APPEND
                | os.O_CREAT
                | os.O_NOFOLLOW
                | os.O_CLOEXEC
                | os.O_NONBLOCK,
                0o644,
            )
        except OSError as e:
            raise storage_error(e, f"appending to {LEDGER}") from None
        try:
            size0 = os.fstat(fd).st_size
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise LedgerError(f"{LEDGER} is not a regular file")
            try:
                io_fault(f"write {LEDGER}")
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError as e:
                with contextlib.suppress(OSError):  # left torn if this fails: recover() drops it
                    os.ftruncate(fd, size0)  # take back a partial line
                raise storage_error(e, f"appending to {LEDGER}") from None
        finally:
            os.close(fd)
        fault("ledger_after_line")
        self._write_head(count + 1, record["hash"])
        fault("ledger_after_head")
        grown = LedgerState(
            [*st.records, record],
            st.complete_bytes + len(line),
            0,
            {"count": count + 1, "hash": record["hash"]},
            None,
        )
        self._cache = (self._stamp(), grown, ChainReport(True, count + 1, []))
        return record

    def raw_bytes(self) -> bytes:
        """The ledger file as stored (for tests and exports)."""
        with open_read(self.path) as f:
            return f.read()
