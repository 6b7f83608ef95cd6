"""Serving a stream of deletion requests from one long-lived process.

A fresh ``sisajax forget`` process pays for start-up (imports, compiling or loading the training
program, opening the run) on every request. :class:`ForgetServer` keeps one run open with its
program compiled and its writer lock held, and serves requests one at a time: each is a normal
:func:`sisajax.forget` (pending record, retrain, durable files, atomic switch, done record), so the
ledger and crash guarantees are those of ``forget``; a server killed mid-request leaves a pending
request that the next server (or ``sisajax resume``) finishes first. One bad request gets an error
response and the server goes on.

A request is whitespace/comma separated ids, a JSON list of ids ``[3, 17]``, or JSON
``{"ids": [...], "tag": "..."}``. ``#`` starts a comment that runs to the end of its line, except
inside a JSON value (``{"ids": [5], "tag": "x#1"}`` keeps its tag). A successful response names
the ledger request that did the work (``ledger_request``) and the position of its done record
(``ledger_seq``, what ``sisajax receipt request=...`` takes). Responses never repeat raw ids when
the run keeps only hashes.

Requests come from an iterator of lines (``sisajax serve run_dir=... spool=-`` reads stdin: one
request per line; blank and comment-only lines are skipped) or a spool folder (``spool=DIR``):

* Handoff: a client writes its request under a name the server ignores (a name starting with
  ``.``, or one not ending in ``.req``, e.g. ``DIR/incoming/.r1.tmp``) and, once it is complete,
  renames it to ``DIR/incoming/<name>.req`` (a rename within one file system is atomic). The server
  takes only regular files named ``*.req`` that have not changed for :data:`SETTLE_S` seconds, so a
  client that writes the final name in place is not read half-written unless it pauses longer than
  that mid-write. Folders, links, FIFOs and other entries that are not regular files are left
  where they are (reported once on stderr); a request file its client takes back before it is
  read is skipped. Requests are served oldest first.
* Responses: each goes to ``DIR/done/<stem>.json`` (``<stem>.2.json``, ``<stem>.3.json``, ... when
  an earlier response has that name; a stem too long for a file name is shortened and given a
  hash) with the request file's name in ``file``. Then a request that succeeded is removed, and
  one that failed (unreadable, malformed, refused, or a forget that failed) is moved to
  ``DIR/rejected/`` (its response says where), so nothing a client sent is lost.
* Crashes: a request left in ``incoming/`` by a crash is served again on restart, which is safe:
  ids already forgotten are reported, not retrained.
* Stopping: the server returns once ``DIR/STOP`` exists and no request is waiting (a request
  placed before ``STOP`` is served first).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from sisajax.errors import SisajaxError, UserInputError, storage_error
from sisajax.generation import prepare_ledger, writer_session
from sisajax.planning import parse_id_token
from sisajax.run import SisaRun
from sisajax.unlearning import finish_pending, forget_in

STOP_FILE = "STOP"
# A spool request file is taken once it has not changed for this many seconds (its modification
# time is that old, or the server saw it unchanged for that long).
SETTLE_S = 1.0
# The largest spool request file read; a larger one is rejected.
MAX_REQUEST_BYTES = 64 << 20
# Response and rejected file names keep at most this many bytes of the request's stem (a longer
# stem is cut and given a hash of the whole), well inside file-name limits with the suffixes.
MAX_STEM_BYTES = 120


class RequestError(UserInputError):
    """A request that cannot be read as one (exit code 2); ``tag`` is its tag when it named
    one."""

    def __init__(self, message: str, tag: str | None = None):
        super().__init__(message)
        self.tag = tag


def _without_comments(text: str) -> str:
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def _tag_text(tag: Any) -> str | None:
    if tag is None:
        return None
    return (tag if isinstance(tag, str) else json.dumps(tag))[:100]


def parse_request(text: str) -> tuple[list[Any], str | None]:
    """``(ids, tag)`` from one request: ``"3 17 256"``, ``"3,17"``, ``[3, 17]`` or
    ``{"ids": [...], "tag": "..."}``; ``#`` comments outside JSON values are ignored.

    Raises:
      RequestError: not a request (one line; names the tag when a JSON request gave one).
    """
    lines = text.strip().splitlines()
    while lines and lines[0].lstrip().startswith("#"):  # comment lines before a JSON request
        lines.pop(0)
    text = "\n".join(lines).strip()
    if not text.startswith(("{", "[")):
        ids = [parse_id_token(t) for t in _without_comments(text).replace(",", " ").split()]
        if not ids or None in ids:
            raise RequestError("a request is a list of integer ids")
        return ids, None
    try:
        obj, end = json.JSONDecoder().raw_decode(text)
        tag = _tag_text(obj.get("tag")) if isinstance(obj, dict) else None
    except (ValueError, RecursionError):  # malformed, too deeply nested, or an oversized number
        raise RequestError("request is not valid JSON") from None
    if _without_comments(text[end:]).strip():
        raise RequestError("request is not valid JSON (text after the JSON value)", tag)
    if isinstance(obj, list):
        if not obj or any(isinstance(v, bool) or not isinstance(v, int) for v in obj):
            raise RequestError("a JSON list request is a non-empty list of integer ids")
        return obj, None
    if not isinstance(obj, dict) or not isinstance(obj.get("ids"), list):
        raise RequestError('a JSON request needs "ids": [...]', tag)
    return obj["ids"], tag


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")


def _to_stderr(message: str) -> None:
    print(f"spool: {message}", file=sys.stderr, flush=True)


def _short_stem(stem: str) -> str:
    """``stem`` if it fits :data:`MAX_STEM_BYTES`, else its start and a hash of all of it."""
    raw = stem.encode("utf-8", "surrogateescape")
    if len(raw) <= MAX_STEM_BYTES:
        return stem
    digest = hashlib.sha256(raw).hexdigest()[:16]
    return raw[: MAX_STEM_BYTES - 17].decode("utf-8", "surrogateescape") + "-" + digest


def _free_name(folder: Path, stem: str, suffix: str) -> str:
    """``<stem><suffix>``, or ``<stem>.<n><suffix>`` with the smallest free ``n >= 2``."""
    stem = _short_stem(stem)
    name, n = stem + suffix, 1
    while os.path.lexists(folder / name):
        n += 1
        name = f"{stem}.{n}{suffix}"
    return name


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


class ForgetServer:
    """One run, held open for a stream of forget requests (see the module docstring).

    Args:
      run: the run (its writer lock is held while the server is open).
      lock_timeout_s: how long to wait for the writer lock when opening.
      evaluate: report test accuracy after every request.
    """

    def __init__(
        self, run: SisaRun, *, lock_timeout_s: float | None = None, evaluate: bool = False
    ):
        self.run = run
        self.evaluate = evaluate
        self._session = writer_session(run, lock_timeout_s)
        self.served = 0

    def __enter__(self) -> ForgetServer:
        self._session.__enter__()
        try:
            finish_pending(self.run)  # finish what a crashed server left
            # compile (or load) once, not inside the first requests: the program of a request
            # that retrains every shard, and what a single-id request runs (one shard, init)
            _ = self.run.engine.compiled(*self._program_shape())
            self.run.engine.prepare_one_shard(self.run.capacity)
        except BaseException:
            self._session.__exit__(None, None, None)
            raise
        return self

    def _program_shape(self) -> tuple[int, int]:
        eng = self.run.engine
        return eng.padded_width(self.run.num_shards), self.run.capacity

    def __exit__(self, *exc: object) -> None:
        self._session.__exit__(*exc)

    def refused(self, error: str, tag: str | None = None, exit_code: int = 2) -> dict[str, Any]:
        """The response of a request that was not served (nothing changed)."""
        self.served += 1
        return {
            "request": self.served,
            "tag": tag,
            "ok": False,
            "error": error,
            "exit_code": exit_code,
        }

    def forget(self, ids: Any, tag: str | None = None) -> dict[str, Any]:
        """Serve one request; returns its response (errors are responses, not exceptions)."""
        t0 = time.perf_counter()
        self.served += 1
        response: dict[str, Any] = {"request": self.served, "tag": tag}
        try:
            prepare_ledger(self.run)  # a failed request may have left an interrupted append
            rep = forget_in(self.run, ids)
        except SisajaxError as e:
            response.update(ok=False, error=str(e), exit_code=e.exit_code)
            return response
        except Exception as e:  # unexpected: this request fails, the server goes on
            response.update(ok=False, error=_one_line(e), exit_code=1)
            return response
        c = rep.cost
        response.update(
            ok=True,
            generation=rep.generation,
            forgotten=len(rep.ids),
            already_forgotten=len(rep.already_forgotten),
            shards=len(rep.restart),
            examples=c.examples,
            full_retrain_examples=rep.full_retrain_examples,
            retrain_s=c.retrain_s,
            save_s=c.save_s,
            **self._done_record(),
            wall_s=time.perf_counter() - t0,
        )
        response["overhead_s"] = response["wall_s"] - c.retrain_s - c.save_s
        if self.evaluate:
            try:
                response["accuracy"] = self.run.evaluate().accuracy
            except Exception as e:  # the forget is done: the response says so all the same
                response.update(accuracy=None, accuracy_error=_one_line(e))
        return response

    def _done_record(self) -> dict[str, Any]:
        """The ledger id and position of the done record the last request appended."""
        with contextlib.suppress(SisajaxError, OSError, IndexError):
            last = self.run.ledger.records()[-1]
            if last.get("state") == "done":
                return {"ledger_request": last.get("request_id"), "ledger_seq": last.get("seq")}
        return {}

    def serve_lines(self, lines: Iterable[str]) -> Iterator[dict[str, Any]]:
        """A response per line that is not blank or only a comment (see the module docstring)."""
        for line in lines:
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            try:
                ids, tag = parse_request(text)
            except UserInputError as e:
                yield self.refused(str(e), getattr(e, "tag", None))
                continue
            yield self.forget(ids, tag)

    def serve_spool(
        self,
        spool: Path,
        *,
        poll_s: float = 0.2,
        settle_s: float = SETTLE_S,
        stop: Callable[[], bool] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Serve ``spool/incoming/*.req`` (oldest first) until ``spool/STOP`` exists or
        ``stop()`` and no request is waiting (the rules are in the module docstring).

        Args:
          poll_s: how long to sleep when there is nothing to serve.
          settle_s: how long a request file must be unchanged before it is taken.
          stop: also stop when this returns True.
          log: where notes on entries left alone go (default: stderr).
        """
        from sisajax.store.files import ensure_dir

        spool = Path(spool).expanduser().resolve()
        incoming, done = ensure_dir(spool, "incoming"), ensure_dir(spool, "done")
        rejected = ensure_dir(spool, "rejected")
        spooler = _Spool(self, incoming, done, rejected, settle_s, log or _to_stderr)
        while True:
            # asked before the scan: a request placed before the stop signal is always served
            stopping = (spool / STOP_FILE).exists() or (stop is not None and stop())
            ready, waiting = spooler.scan()
            if not ready:
                if stopping and not waiting:
                    return
                time.sleep(poll_s)
                continue
            for name in ready:
                response = spooler.serve(name)
                if response is not None:
                    yield response


class _Spool:
    """The state of one :meth:`ForgetServer.serve_spool`: what was seen, what was left alone."""

    def __init__(self, server, incoming, done, rejected, settle_s, log):
        self.server, self.incoming, self.done, self.rejected = server, incoming, done, rejected
        self.settle_s, self.log = settle_s, log
        self.seen: dict[str, tuple[tuple[int, ...], float]] = {}  # name -> (identity, first seen)
        self.left: dict[str, tuple[int, ...]] = {}  # entries left alone: not served again as is

    def note(self, name: str, key: tuple[int, ...], message: str) -> None:
        """Report ``message`` about entry ``name`` once (until the entry changes)."""
        if self.left.get(name) != key:
            self.left[name] = key
            self.log(f"{name!r}: {message}")

    def scan(self) -> tuple[list[str], bool]:
        """``(names of the request files ready to serve, oldest first; whether others are still
        settling)``."""
        from sisajax.store.files import scan_dir

        now, mono = time.time(), time.monotonic()
        ready: list[tuple[int, str]] = []
        waiting = False
        seen: dict[str, tuple[tuple[int, ...], float]] = {}
        listed: set[str] = set()
        for entry in scan_dir(self.incoming):
            name = entry.name
            if name.startswith(".") or not name.endswith(".req"):
                continue
            listed.add(name)
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:  # taken back since the listing
                continue
            key = (st.st_mode, *_identity(st))
            if not stat.S_ISREG(st.st_mode):
                self.note(name, key, "not a regular file (a folder, link, FIFO, ...); left alone")
                continue
            if self.left.get(name) == key:
                continue
            first = self.seen.get(name)
            seen[name] = first if first is not None and first[0] == key else (key, mono)
            if now - st.st_mtime < self.settle_s and mono - seen[name][1] < self.settle_s:
                waiting = True  # perhaps still being written
                continue
            ready.append((st.st_mtime_ns, name))
        self.seen = seen
        self.left = {name: key for name, key in self.left.items() if name in listed}
        return [name for _, name in sorted(ready)], waiting

    def serve(self, name: str) -> dict[str, Any] | None:
        """Serve one request file; its response, or None when it was not served (gone, or no
        longer a regular file)."""
        try:
            return self._serve(name)
        except Exception as e:  # the loop outlives any one request
            with contextlib.suppress(OSError):
                st = os.lstat(self.incoming / name)
                self.note(name, (st.st_mode, *_identity(st)), f"not served: {_one_line(e)}")
            return None

    def _serve(self, name: str) -> dict[str, Any] | None:
        from sisajax.store.files import UnsafeRunError, open_read, write_json

        path, stem = self.incoming / name, name[: -len(".req")]
        error, exit_code, tag, ids = None, 2, None, None
        try:
            f = open_read(path)  # never follows a link, never waits on a FIFO
        except FileNotFoundError:
            self.log(f"{name!r}: taken back before it was read; skipped")
            return None
        except UnsafeRunError:
            return None  # replaced by something else since the scan: the next scan reports it
        except OSError as e:
            read, data = None, b""
            error, exit_code = str(storage_error(e, "reading the request", resumable=False)), 1
        else:
            with f:
                read = os.fstat(f.fileno())
                try:
                    data = f.read(MAX_REQUEST_BYTES + 1)
                except OSError as e:
                    data = b""
                    error = str(storage_error(e, "reading the request", resumable=False))
                    exit_code = 1
        if error is None and len(data) > MAX_REQUEST_BYTES:
            error = f"a request file holds at most {MAX_REQUEST_BYTES} bytes"
        if error is None:
            try:
                ids, tag = parse_request(data.decode("utf-8", errors="replace"))
            except UserInputError as e:
                error, tag = str(e), getattr(e, "tag", None)
        srv = self.server
        if error is not None:
            response = srv.refused(error, tag or stem, exit_code)
        else:
            response = srv.forget(ids, tag or stem)
        response["file"] = name
        if not response["ok"]:  # kept, not removed: moved to rejected/ once the response is out
            moved_to = _free_name(self.rejected, stem, ".req")
            response["rejected"] = f"rejected/{moved_to}"
        out = _free_name(self.done, stem, ".json")
        try:
            write_json(self.done / out, response)
        except OSError as e:
            response["response_error"] = _one_line(e)
            self._leave(name, read, f"response not written ({_one_line(e)}); left in incoming/")
            return response
        try:
            now = os.lstat(path)
        except FileNotFoundError:
            return response  # its client took it back: nothing to remove
        if read is not None and _identity(now) != _identity(read):
            self.log(f"{name!r}: changed while it was served; left to be served again")
            return response
        try:
            if response["ok"]:
                os.unlink(path)
            else:
                os.rename(path, self.rejected / moved_to)
        except OSError as e:
            self._leave(name, read, f"could not be moved out of incoming/ ({_one_line(e)})")
        return response

    def _leave(self, name: str, read: os.stat_result | None, message: str) -> None:
        """Leave a served request file in ``incoming/`` without serving it again (as is) in this
        process; a restarted server serves it again, which is safe."""
        with contextlib.suppress(OSError):
            st = read if read is not None else os.lstat(self.incoming / name)
            self.note(name, (st.st_mode, *_identity(st)), message)
