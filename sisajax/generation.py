"""Switching a run to a new generation, as one transaction.

Every operation that writes a generation (train, retrain in place, forget, resume, the
multi-process trainer, a forget server) follows one sequence, written here once:

1. :func:`writer_session`: take the run's writer lock, reload the run, and repair an
   interrupted ledger append (:func:`prepare_ledger`);
2. :meth:`Generation.begin`: record the request as ``pending`` in the ledger;
3. :meth:`Generation.start_writer` / :meth:`Generation.on_slice`: the background writer the
   engine hands each slice step to;
4. :meth:`Generation.commit`: switch to the new manifest (one atomic rename) and adopt it;
5. :meth:`Generation.done`: record the request as ``done``.

An exception before the commit aborts: the writer stops, and (for a forget) the uncommitted
files are removed; the ``pending`` record stays for ``resume``, which either records a
committed request ``done`` or redoes it from the committed state. A new run has no ledger yet:
:meth:`Generation.new_run` takes the lock of the new directory, and its commit writes the
first manifest.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

from sisajax.data.partition import Partition
from sisajax.engine import Engine, SliceOutput
from sisajax.errors import UserInputError
from sisajax.generation_writer import GenerationWriter, MetricsSink
from sisajax.run import SisaRun
from sisajax.store.faults import fault
from sisajax.store.ledger import Ledger, LedgerError
from sisajax.store.locks import writer_lock
from sisajax.store.manifest import Manifest
from sisajax.store.run_dir import RunDir


def id_hashing_record(ledger: Ledger) -> dict[str, str]:
    """The manifest's ``id_hashing`` entry of a run whose ledger keeps salted id hashes (the
    salt is created if the run has none yet)."""
    ledger.load_salt(create=True)
    return {"salt_fingerprint": ledger.salt_fingerprint(), "salt_source": ledger.salt_source()}


def prepare_ledger(run: SisaRun) -> str | None:
    """Before writing: complete or drop an interrupted ledger append, and refuse a ledger that no
    longer records the request that made the run's generation (deleted or replaced). Returns
    what the repair did, if anything.

    Raises:
      LedgerError: the ledger is damaged or does not match the run.
    """
    ledger = run.ledger
    repaired = ledger.recover()
    origin = run.manifest.origin.get("request_id")
    if run.generation > 0 and origin not in ledger.requests():
        raise LedgerError(
            f"the ledger does not record request {origin}, which made generation "
            f"{run.generation} (ledger deleted or replaced?); restore it before changing the run"
        )
    return repaired


def require_run(run: object) -> SisaRun:
    """``run`` if it is an open run; else :class:`~sisajax.errors.UserInputError` (a path, for
    instance, must be opened first)."""
    if not isinstance(run, SisaRun):
        raise UserInputError(
            f"run must be an open run (sisajax.open_run(path) opens one), got {type(run).__name__}"
        )
    return run


def writer_session(run: SisaRun, lock_timeout_s: float | None = None, *, replays: bool = True):
    """A context holding ``run``'s writer lock, the run reloaded and its ledger prepared; yields
    what :func:`prepare_ledger` repaired. The run, the lock's arguments (and, with ``replays``,
    the plug-ins) are checked now, before the context is entered (see
    :meth:`~sisajax.run.SisaRun.writer_lock`)."""
    require_run(run)
    return _session(run, run.writer_lock(lock_timeout_s, replays=replays))


@contextlib.contextmanager
def _session(run: SisaRun, lock) -> Iterator[str | None]:
    with lock:
        run.reload()
        yield prepare_ledger(run)


def remove_uncommitted_files(run: SisaRun) -> None:
    """Delete the files of a generation that was being written but never committed (after a
    failure): whatever the manifest on disk does not name. Reading the manifest back (not the
    handle's copy) keeps a generation whose commit got as far as the rename. Best effort: the
    failure being raised is the one to report, and ``resume`` collects anything left."""
    with contextlib.suppress(Exception):
        run.files.collect_garbage(run.files.read_manifest())


@dataclasses.dataclass(frozen=True)
class _Policy:
    """How one kind of request goes through the transaction: its crash points and whether an
    abort removes the files written so far."""

    after_pending: str | None = None
    before_commit: str | None = None
    after_commit: str | None = None
    before_done: str | None = None
    remove_on_abort: bool = False


KINDS = {
    "train": _Policy(),
    "forget": _Policy("after_pending", "before_commit", None, "before_done", remove_on_abort=True),
    "retrain": _Policy(None, "retrain_before_commit", "retrain_after_commit", None),
}


class Generation:
    """One new generation of a run being written, from its ``pending`` record to its ``done``.

    Attributes:
      files: the run directory.
      number: the generation being written.
      kind: ``train`` (a new run), ``retrain`` or ``forget``.
      run: the open run (None while a new run is trained).
      request_id: the ledger's id of the request (None for a new run).
      writer: the background writer, once started.
      committed: whether the new manifest is live.
    """

    def __init__(
        self,
        files: RunDir,
        number: int,
        kind: str,
        *,
        run: SisaRun | None = None,
        request_id: str | None = None,
    ):
        self.files, self.number, self.kind = files, number, kind
        self.run, self.request_id = run, request_id
        self.writer: GenerationWriter | None = None
        self.committed = False
        self._policy = KINDS[kind]
        self._writing = False
        self._reload = False

    @classmethod
    @contextlib.contextmanager
    def begin(
        cls,
        run: SisaRun,
        kind: str,
        record: dict[str, Any] | None,
        *,
        request_id: str | None = None,
    ) -> Iterator[Generation]:
        """Start generation ``run.generation + 1`` of ``run``, whose writer session the caller
        holds (:func:`writer_session`): ``record`` is appended as the request's ``pending``
        record, or, with ``request_id``, that request is already pending (it is being redone).
        An exception inside the context aborts (:meth:`abort`) and is raised again."""
        if request_id is None:
            request_id = run.ledger.new_request_id()
            run.ledger.append(request_id, "pending", kind=kind, **(record or {}))
        g = cls(run.files, run.generation + 1, kind, run=run, request_id=request_id)
        if g._policy.after_pending:
            fault(g._policy.after_pending)
        try:
            yield g
        except BaseException:
            g.abort()
            raise

    @classmethod
    @contextlib.contextmanager
    def new_run(cls, files: RunDir, lock_timeout_s: float) -> Iterator[Generation]:
        """Generation 0 of a new run in ``files`` (an existing directory), under its writer
        lock. Undoing a failed new run is the caller's (it knows whether it made the folder)."""
        with writer_lock(files.root, lock_timeout_s):
            g = cls(files, 0, "train")
            try:
                yield g
            except BaseException:
                g.abort()
                raise

    # -- writing ---------------------------------------------------------------------------------
    def start_writer(
        self, engine: Engine, config_fingerprint: str, metrics: MetricsSink = None
    ) -> GenerationWriter:
        """The background writer of this generation's files (see :class:`GenerationWriter`)."""
        self.writer = GenerationWriter(self.files, self.number, engine, config_fingerprint, metrics)
        self._writing = True
        return self.writer

    def on_slice(self, shards: list[int]) -> Callable[[SliceOutput], None]:
        """What the engine calls with each slice step's output (job ``i`` is ``shards[i]``)."""
        return self.writer.on_slice(shards)

    def finish_writing(self) -> None:
        """Write the last slice step and wait until every file is durable."""
        self._writing = False
        self.writer.finish()

    def abort(self) -> None:
        """After a failure before the commit: stop the writer, and for a forget remove what was
        written (the ``pending`` record stays for ``resume``)."""
        if self._writing:
            self._writing = False
            self.writer.abort()
        if not self.committed and self._policy.remove_on_abort:
            remove_uncommitted_files(self.run)  # a full disk or Ctrl-C: nothing new stays behind

    # -- switching -------------------------------------------------------------------------------
    def commit(
        self,
        manifest: Manifest,
        *,
        config: dict[str, Any] | None = None,
        partition: Partition | None = None,
        lock_timeout_s: float | None = None,
    ) -> list[str]:
        """Make ``manifest`` live; returns the superseded files removed.

        Args:
          config: the new ``config.json`` (a training; written once the manifest is live, and the
            run is reloaded after :meth:`done`).
          partition: the new partition, handed to the run (not read back), with the manifest.
          lock_timeout_s: the reader-lock wait (default the run's).
        """
        if self.run is None:  # a new run: its first manifest, nothing to supersede
            self.files.write_manifest(manifest)
            self.committed = True
            if config is not None:
                self.files.write_config(config)
            return []
        k = self._policy
        if k.before_commit:
            fault(k.before_commit)
        timeout = (
            self.run.config.ledger.lock_timeout_s if lock_timeout_s is None else lock_timeout_s
        )
        removed, _ = self.files.commit(manifest, timeout)
        self.committed = True
        if k.after_commit:
            fault(k.after_commit)
        if config is not None:
            # after the commit: a training that fails before it leaves the run's config.json
            # describing the run (``resume`` rewrites it when a crash came in between)
            self.files.write_config(config)
            self._reload = True
        else:
            if partition is not None:
                self.run.adopt_partition(partition, manifest.partition.sha256)
            self.run.adopt(manifest)
        return removed

    def done(self, **fields: Any) -> None:
        """Record the committed request as ``done`` (a new run has no ledger record)."""
        if self.run is None:
            return
        if self._policy.before_done:
            fault(self._policy.before_done)
        self.run.ledger.append(self.request_id, "done", kind=self.kind, **fields)
        if self._reload:
            self.run.reload()


__all__ = [
    "Generation",
    "id_hashing_record",
    "prepare_ledger",
    "remove_uncommitted_files",
    "require_run",
    "writer_session",
]
