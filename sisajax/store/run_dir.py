"""A run directory on disk: its managed paths, its manifest, and cleaning up after a generation.

What a run directory holds (all names derived, see :mod:`sisajax.store.manifest`)::

    MANIFEST.json            the live generation (one atomic rename switches generations)
    config.json              the resolved config, for people (MANIFEST.json holds the same)
    partition.gNNNNNN.npz    id -> (shard, slice), forgotten ids (or salted hashes)
    data/                    shard_KKK.gNNNNNN.npz (retained rows), test.gNNNNNN.npz
    checkpoints/             sKKKrJJJ.gNNNNNN.row (one per shard and slice)
    ledger.jsonl ledger.head the deletion ledger and its anchor (ledger.salt: see the ledger)
    results/                 one JSON file per command, never overwritten
    metrics.jsonl            training loss and evaluation history
    .writer.lock .reader.lock

Only regular files whose names sisajax writes are ever deleted, and only when the live manifest
does not name them; links, folders and files of other names found in ``data/`` or
``checkpoints/`` are *foreign*: reported by ``audit``, never touched.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from sisajax.errors import NotARunError, RunError, UserInputError
from sisajax.store.faults import fault
from sisajax.store.files import (
    TEMP_RE,
    ensure_dir,
    fsync_dir,
    is_regular,
    is_writable_dir,
    managed_path,
    read_json,
    real_run_dir,
    remove_if_ours,
    scan_dir,
    write_json,
)
from sisajax.store.interrupted import INTERRUPTED
from sisajax.store.locks import READER_LOCK, WRITER_LOCK, reader_lock
from sisajax.store.manifest import (
    MANIFEST,
    PARTITION_RE,
    ROW_RE,
    SHARD_DATA_RE,
    TEST_DATA_RE,
    VAL_DATA_RE,
    Manifest,
    ManifestError,
    parse_manifest,
)

MANAGED_TOP = (
    MANIFEST,
    "config.json",
    "data",
    "checkpoints",
    "results",
    "metrics.jsonl",
    "ledger.jsonl",
    "ledger.head",
    "ledger.salt",
    ".writer.lock",
    ".reader.lock",
    "pending",
    "training.interrupted.json",
)
OURS_IN = {
    "data": (SHARD_DATA_RE, TEST_DATA_RE, VAL_DATA_RE),
    "checkpoints": (ROW_RE,),
    ".": (PARTITION_RE,),
}


class RunDir:
    """The files of one run directory (its real path; every managed path checked for links).

    Raises:
      UserInputError: ``path`` is not a path (a ``str`` or an ``os.PathLike``), or a folder on
        its way is a file.
      NotARunError: ``must_exist`` and the directory holds no manifest.
      UnsafeRunError: a managed path below the directory is a symbolic link.
    """

    def __init__(self, path: str | os.PathLike[str], *, must_exist: bool = True):
        if not isinstance(path, str | os.PathLike):
            raise UserInputError(
                f"a run directory is a path (str or os.PathLike), got {type(path).__name__}"
            )
        self.given = Path(path)
        self.root = real_run_dir(path)
        blocked = _file_on_the_way(self.root)
        if blocked is not None:
            raise UserInputError(f"{self.given}: its parent {blocked} is not a directory")
        if must_exist:
            if not self.root.is_dir():
                raise NotARunError(f"{self.given} is not a directory")
            for name in MANAGED_TOP:
                managed_path(self.root, name)
            if not (self.root / MANIFEST).is_file():
                raise NotARunError(f"{self.given} is not a sisajax run directory (no {MANIFEST})")

    def path(self, rel: str) -> Path:
        """``root/rel`` (refusing links on the way)."""
        return managed_path(self.root, rel)

    def check_no_links(self, rels: set[str]) -> None:
        """Raise :class:`UnsafeRunError` if any of ``rels`` (or a folder on the way) is a link.

        One directory listing per folder (not a path walk per file: a 20 x 50 run names 1,000+
        files)."""
        by_folder: dict[str, set[str]] = {}
        for rel in rels:
            folder, _, name = rel.rpartition("/")
            by_folder.setdefault(folder, set()).add(name)
        for folder, names in by_folder.items():
            base = managed_path(self.root, folder) if folder else self.root
            links = {e.name for e in scan_dir(base) if e.is_symlink()}
            bad = sorted(names & links)
            if bad:
                managed_path(self.root, f"{folder}/{bad[0]}" if folder else bad[0])

    def writable(self) -> bool:
        return is_writable_dir(self.root)

    # -- the manifest ---------------------------------------------------------------------------
    def manifest_stamp(self) -> tuple[int, int, int] | None:
        """(inode, size, mtime) of MANIFEST.json: every switch renames a new file into place."""
        try:
            st = os.stat(self.root / MANIFEST, follow_symlinks=False)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def read_manifest(self) -> Manifest:
        path = self.path(MANIFEST)
        try:
            raw = read_json(path)
        except FileNotFoundError:
            raise NotARunError(
                f"{self.given} is not a sisajax run directory (no {MANIFEST})"
            ) from None
        except ValueError as e:
            raise ManifestError(f"{MANIFEST} is unreadable: {e}") from None
        except OSError as e:
            raise RunError(f"{MANIFEST} cannot be read ({e.strerror})") from None
        return parse_manifest(raw)

    def write_manifest(self, manifest: Manifest) -> None:
        """Make ``manifest`` live: durable temp file, atomic rename, durable folder."""
        write_json(self.path(MANIFEST), manifest.to_json(), compact=True)

    def commit(self, manifest: Manifest, timeout_s: float) -> tuple[list[str], list[str]]:
        """Switch the run to ``manifest`` and delete the files it supersedes.

        Holds the reader lock exclusively, so no reader is mid-load while files go away. Every
        file the manifest names must already be durable. Returns ``(removed, foreign)``.
        """
        with reader_lock(self.root, timeout_s, exclusive=True):
            self.write_manifest(manifest)
            fault("after_commit")
            return self.collect_garbage(manifest)

    def remove_superseded(self, manifest: Manifest, timeout_s: float) -> list[str]:
        """:meth:`collect_garbage` holding the reader lock exclusively (no reader is mid-load of
        an older generation's files while they go away); returns the files removed."""
        with reader_lock(self.root, timeout_s, exclusive=True):
            return self.collect_garbage(manifest)[0]

    def make_dirs(self) -> None:
        for d in ("data", "checkpoints"):
            ensure_dir(self.root, d)

    # -- what is on disk ------------------------------------------------------------------------
    def scan(self, live: set[str]) -> tuple[list[str], list[str]]:
        """``(superseded, foreign)``: our files the live manifest does not name (plus our temp
        files and legacy ``pending/`` id files), and entries in ``data/`` / ``checkpoints/``
        that are not ours (links, folders, other names)."""
        superseded, foreign = [], []
        for folder, patterns in OURS_IN.items():
            base = self.root if folder == "." else self.root / folder
            for e in scan_dir(base):
                rel = e.name if folder == "." else f"{folder}/{e.name}"
                ours = any(p.fullmatch(e.name) for p in patterns) or TEMP_RE.fullmatch(e.name)
                if folder == "." and not ours:
                    continue  # the run's top level also holds ledger, results, user notes
                if not ours or not is_regular(e):
                    foreign.append(rel)
                elif rel not in live:
                    superseded.append(rel)
        pending = self.root / "pending"
        if pending.is_dir() and not pending.is_symlink():
            superseded += [f"pending/{e.name}" for e in scan_dir(pending) if is_regular(e)]
        return sorted(superseded), sorted(foreign)

    def collect_garbage(self, manifest: Manifest) -> tuple[list[str], list[str]]:
        """Delete superseded files (never following links); return ``(removed, foreign)``."""
        superseded, foreign = self.scan(manifest.files())
        removed = [rel for rel in superseded if remove_if_ours(self.path(rel))]
        if removed:
            for d in {str(Path(rel).parent) for rel in removed}:
                fsync_dir(self.root / d)
        pending = self.root / "pending"
        if pending.is_dir() and not pending.is_symlink() and not any(pending.iterdir()):
            os.rmdir(pending)
        return removed, foreign

    # -- results --------------------------------------------------------------------------------
    def write_result(self, name: str, obj: dict[str, Any]) -> Path | None:
        """Write ``results/<name>-<UTC time>-<pid>.json`` (a new file, never replacing one).

        Returns the path, or None when the run directory is not writable (read-only runs).
        """
        if not self.writable():
            return None
        folder = ensure_dir(self.root, "results")
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"{time.time() % 1:.6f}"[1:]
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        path = folder / f"{safe}-{stamp}Z-{os.getpid()}.json"
        n = 1
        while path.exists():
            path = folder / f"{safe}-{stamp}Z-{os.getpid()}-{n}.json"
            n += 1
        write_json(path, obj)
        return path

    def write_config(self, config: dict[str, Any]) -> None:
        write_json(self.path("config.json"), config, durable=False)


def _file_on_the_way(root: Path) -> Path | None:
    """For a ``root`` that does not exist yet: the nearest existing path above it when that is
    not a directory (a regular file, say), so that nothing can be made below it; else None."""
    p = root
    while not os.path.exists(p):
        if p.parent == p:
            return None
        p = p.parent
    return p if p != root and not p.is_dir() else None


def remove_run_dir(path: str | Path) -> bool:
    """Delete the sisajax run directory at ``path`` (an experiment's or the demo's own run,
    about to be made again); whether there was one. An empty folder (or one holding only lock
    files) goes too; anything else is refused, so a mistyped path never deletes a user's files.

    Raises:
      UserInputError: ``path`` is a link, a file, or a folder that holds no sisajax run.
    """
    path = Path(path)
    if not os.path.lexists(path):
        return False
    is_run = (
        path.is_dir()
        and not path.is_symlink()
        and (
            (path / MANIFEST).is_file()
            or (path / INTERRUPTED).is_file()
            or all(e.name in (WRITER_LOCK, READER_LOCK) for e in path.iterdir())
        )
    )
    if not is_run:
        raise UserInputError(
            f"{path} exists and is not a sisajax run: not deleted (move it away or choose "
            "another folder)"
        )
    shutil.rmtree(path)
    return True
