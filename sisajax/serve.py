"""Serving a stream of deletion requests from one long-lived process.

A fresh ``sisajax forget`` process pays for start-up (imports, compiling or loading the training
program, opening the run) on every request. :class:`ForgetServer` keeps one run open with its
program compiled and its writer lock held, and serves requests one at a time: each is a normal
:func:`sisajax.forget` (pending record, retrain, durable files, atomic switch, done record), so the
ledger and crash guarantees are those of ``forget``; a server killed mid-request leaves a pending
request that the next server (or ``sisajax resume``) finishes first.

Requests come from an iterator of lines (``sisajax serve run_dir=... spool=-`` reads stdin) or a
spool folder (``spool=DIR``): each file ``DIR/incoming/*.req`` holds one request; when it is done
its response goes to ``DIR/done/<name>.json`` and the request file is removed. A request left in
``incoming/`` by a crash is served again on restart, which is safe: ids already forgotten are
reported, not retrained. A request line (or file) is whitespace/comma separated ids, a JSON list
of ids ``[3, 17]``, or JSON ``{"ids": [...], "tag": "..."}``. Responses never repeat raw ids when
the run keeps only hashes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from sisajax.errors import SisajaxError, UserInputError
from sisajax.generation import prepare_ledger, writer_session
from sisajax.planning import parse_id_token
from sisajax.run import SisaRun
from sisajax.unlearning import finish_pending, forget_in

STOP_FILE = "STOP"


def parse_request(text: str) -> tuple[list[Any], str | None]:
    """``(ids, tag)`` from one request: ``"3 17 256"``, ``"3,17"``, ``[3, 17]`` or
    ``{"ids": [...], "tag": "..."}``."""
    text = text.strip()
    if text.startswith(("{", "[")):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            raise UserInputError("request is not valid JSON") from None
        if isinstance(obj, list):
            if not obj or any(isinstance(v, bool) or not isinstance(v, int) for v in obj):
                raise UserInputError("a JSON list request is a non-empty list of integer ids")
            return obj, None
        if not isinstance(obj, dict) or not isinstance(obj.get("ids"), list):
            raise UserInputError('a JSON request needs "ids": [...]')
        tag = obj.get("tag")
        return obj["ids"], None if tag is None else str(tag)[:100]
    ids = [parse_id_token(t) for t in text.replace(",", " ").split()]
    if not ids or None in ids:
        raise UserInputError("a request is a list of integer ids")
    return ids, None


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
            wall_s=time.perf_counter() - t0,
        )
        response["overhead_s"] = response["wall_s"] - c.retrain_s - c.save_s
        if self.evaluate:
            response["accuracy"] = self.run.evaluate().accuracy
        return response

    def serve_lines(self, lines: Iterable[str]) -> Iterator[dict[str, Any]]:
        """A response per non-empty line (``#`` starts a comment)."""
        for line in lines:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            try:
                ids, tag = parse_request(line)
            except UserInputError as e:
                self.served += 1
                yield {"request": self.served, "ok": False, "error": str(e), "exit_code": 2}
                continue
            yield self.forget(ids, tag)

    def serve_spool(
        self,
        spool: Path,
        *,
        poll_s: float = 0.2,
        stop: Callable[[], bool] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Serve ``spool/incoming/*.req`` (oldest first) until ``spool/STOP`` exists or ``stop()``.

        Each response is written to ``spool/done/<name>.json`` before its request file is removed.
        """
        from sisajax.store.files import ensure_dir, write_json

        spool = Path(spool).expanduser().resolve()
        incoming, done = ensure_dir(spool, "incoming"), ensure_dir(spool, "done")
        while True:
            reqs = sorted(incoming.glob("*.req"), key=lambda p: (p.stat().st_mtime, p.name))
            if not reqs:
                if (spool / STOP_FILE).exists() or (stop is not None and stop()):
                    return
                time.sleep(poll_s)
                continue
            for req in reqs:
                try:
                    ids, tag = parse_request(req.read_text(encoding="utf-8", errors="replace"))
                    response = self.forget(ids, tag or req.stem)
                except UserInputError as e:
                    self.served += 1
                    response = {
                        "request": self.served,
                        "tag": req.stem,
                        "ok": False,
                        "error": str(e),
                        "exit_code": 2,
                    }
                write_json(done / f"{req.stem}.json", response)
                req.unlink()
                yield response
