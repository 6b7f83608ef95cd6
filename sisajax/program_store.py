"""Compiled programs kept on disk between processes, so a new process skips tracing and lowering.

jax's persistent compilation cache saves compiling, but a process must still trace a program and
lower it to find the cache entry: for a one-id forget that is ~0.2 s of ~1.5 s (the first trace of
a process is the slowest). This store keeps the compiled executable itself (jax's
``serialize_executable``) with the program's argument structure, under a key made of everything
the program is a function of, computed without tracing:

* what the engine asks for (run configuration, data shapes and dtypes, width, capacity, chunk
  loop form, devices) -- the caller's ``identity``;
* the code: sisajax's own source (every ``.py`` file of the package), the model's source when it
  is a registered plug-in (the caller gives it; a model whose source cannot be read is never
  stored), and the versions of Python, jax, jaxlib, flax, optax, numpy and ml_dtypes;
* the environment: every jax configuration value, ``XLA_FLAGS``, the backend's platform and
  version, and :func:`sisajax.host.code_id` (the CPU's ISA features).

Not covered: third-party code edited in place without a version change, and a plug-in model's
helpers imported from outside its own package; turn the store off (:func:`disable`, or
``SISAJAX_PROGRAM_STORE=0`` for the command line) while editing such code. ``sisajax verify``
replays a run from scratch and compares the bits whatever the store holds.

The command line enables the store beside jax's cache; the Python API leaves it off unless
:func:`enable` is called. Entries are written atomically; an entry that cannot be read or loaded
is ignored (the program is compiled as usual, and stored again when compiled afresh); a full or read-only disk
only means nothing is stored. Loading an entry runs code from the cache folder, like jax's own
cache, so only regular files of the current user that no one else may write are loaded (a link,
or a file another user could have written, is compiled instead). The folder can be deleted at any
time.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import pickle
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sisajax.store.files import UnsafeRunError, open_read, write_file

FORMAT = 1
OFF_ENV = "SISAJAX_PROGRAM_STORE"  # "0": the command line does not use the store
_directory: Path | None = None
_stats = {"loaded": 0, "stored": 0, "missed": 0, "failed": 0}


def enable(path: str | Path) -> Path:
    """Keep compiled programs under ``path`` (created when first written). Returns the folder."""
    global _directory
    _directory = Path(path)
    return _directory


def disable() -> None:
    """Stop loading and storing programs (those on disk stay)."""
    global _directory
    _directory = None


def directory() -> Path | None:
    """The store's folder, or None when it is off."""
    return _directory


def stats() -> dict[str, int]:
    """Counts of programs loaded, stored, missed (not on disk) and failed (unreadable) so far."""
    return dict(_stats)


@functools.cache
def code_digest() -> str | None:
    """sha256 over sisajax's source files and the versions of the libraries its programs use;
    None when sisajax's source cannot be read (e.g. imported from a zip): then nothing is
    stored."""
    import flax
    import jax
    import jaxlib
    import ml_dtypes
    import numpy
    import optax

    from sisajax.plugins import source_hash

    source = source_hash("sisajax")
    if source is None:
        return None
    parts = {
        "sisajax": source,
        "python": sys.version,
        "versions": [m.__version__ for m in (jax, jaxlib, flax, optax, numpy, ml_dtypes)],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def environment(devices: Sequence[Any]) -> dict[str, Any]:
    """What the backend and jax's configuration add to a program's key (read at every key)."""
    import jax

    from sisajax.host import code_id

    d = devices[0]
    config = {k: repr(v) for k, v in sorted(jax.config.values.items())}
    return {
        "code": code_digest(),
        "host": code_id(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "platform": d.platform,
        "platform_version": getattr(d.client, "platform_version", ""),
        "device_kind": d.device_kind,
        "devices": [int(x.id) for x in devices],
        "jax_config": config,
    }


def program_key(identity: dict[str, Any] | None, devices: Sequence[Any]) -> str | None:
    """The key of the program ``identity`` describes on ``devices``; None when the store is off
    or ``identity`` is None (a program that must not be stored)."""
    if _directory is None or identity is None or code_digest() is None:
        return None
    blob = json.dumps(
        {"format": FORMAT, "identity": identity, "environment": environment(devices)},
        sort_keys=True,
        default=repr,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _path(key: str) -> Path:
    assert _directory is not None
    return _directory / key[:2] / f"{key}.pkl"


def _trusted(st: os.stat_result) -> bool:
    """Whether an open regular file may be loaded (loading runs its code): this user's, and no
    one else may write it."""
    others_could_write = bool(st.st_mode & 0o022)
    return not (hasattr(os, "getuid") and (st.st_uid != os.getuid() or others_could_write))


def _read(key: str | None) -> dict[str, Any] | None:
    """The entry stored under ``key``, or None (off, not stored, or damaged). A link, or a file
    another user could have written, counts as damaged."""
    if key is None or _directory is None:
        return None
    try:
        with open_read(_path(key)) as f:  # no link followed, regular files only
            if not _trusted(os.fstat(f.fileno())):
                raise ValueError("not a private file")
            blob = f.read()
    except FileNotFoundError:
        _stats["missed"] += 1
        return None
    except (OSError, ValueError, UnsafeRunError):
        _stats["failed"] += 1
        return None
    try:
        entry = pickle.loads(blob)
        if not isinstance(entry, dict) or entry.get("format") != FORMAT or entry.get("key") != key:
            raise ValueError("not an entry of this key")
    except Exception:  # noqa: BLE001 - a damaged or foreign file: as if not stored
        _stats["failed"] += 1
        return None
    return entry


def _write(key: str | None, payload: dict[str, Any]) -> bool:
    """Write an entry atomically (private to this user); False when off, when something in it
    does not pickle, or when the disk refuses it."""
    if key is None or _directory is None:
        return False
    path = _path(key)
    try:
        blob = pickle.dumps({"format": FORMAT, "key": key, **payload}, pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - something in it does not pickle: not stored
        return False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(path, blob, durable=False, mode=0o600)
    except OSError:  # StorageError included: a full or read-only disk
        return False
    _stats["stored"] += 1
    return True


_local = threading.local()
_listening = False
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def _on_jax_event(event: str, **_: Any) -> None:
    if event == _CACHE_HIT_EVENT and getattr(_local, "hits", None) is not None:
        _local.hits += 1


def compile_counting_hits(compile_fn: Callable[[], Any]) -> tuple[Any, bool]:
    """``(compile_fn(), fresh)``: ``fresh`` is False when jax's persistent compilation cache
    served the program. Only freshly compiled programs are stored: XLA:CPU (jaxlib 0.10)
    serialises an executable it loaded from its own cache incompletely (loading that again fails
    when it runs: "Function ... not found")."""
    import jax

    global _listening
    if not _listening:
        jax.monitoring.register_event_listener(_on_jax_event)
        _listening = True
    _local.hits = 0
    try:
        compiled = compile_fn()
    finally:
        hits, _local.hits = _local.hits, None
    return compiled, hits == 0


class CheckedProgram:
    """A program loaded from the store, checked on its first call: if running it fails (an entry
    XLA cannot run after all), the entry is deleted and the program compiled instead, and the
    call runs again (training programs take no donated buffers, so their inputs are intact).
    Other attributes (``as_text()``, ...) are the loaded program's."""

    def __init__(self, compiled: Any, key: str, compile_fn: Callable[[], Any]):
        self._compiled = compiled
        self._key = key
        self._compile_fn = compile_fn
        self._checked = False

    def __call__(self, *args: Any) -> Any:
        if self._checked:
            return self._compiled(*args)
        import jax

        try:
            out = self._compiled(*args)
            jax.block_until_ready(out)
        except jax.errors.JaxRuntimeError:
            _stats["failed"] += 1
            with contextlib.suppress(OSError):
                _path(self._key).unlink()
            self._compiled = self._compile_fn()
            out = self._compiled(*args)
        self._checked = True
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._compiled, name)


def load_or_compile(
    identity: dict[str, Any] | None, devices: Sequence[Any], compile_fn: Callable[[], Any]
) -> Any:
    """The compiled program ``identity`` names on ``devices``: loaded from the store (as a
    :class:`CheckedProgram`), or ``compile_fn()`` (trace, lower, compile; a
    ``jax.stages.Compiled``), stored when it was freshly compiled."""
    key = program_key(identity, devices)
    entry = _read(key)
    if entry is not None:
        try:
            from jax.experimental.serialize_executable import deserialize_and_load

            compiled = deserialize_and_load(
                entry["executable"],
                entry["in_tree"],
                entry["out_tree"],
                backend=devices[0].client,
                execution_devices=list(devices),
            )
        except Exception:  # noqa: BLE001 - an executable this backend cannot load: compile
            _stats["failed"] += 1
        else:
            _stats["loaded"] += 1
            return CheckedProgram(compiled, key, compile_fn)
    if key is None:
        return compile_fn()
    compiled, fresh = compile_counting_hits(compile_fn)
    if fresh:
        try:
            from jax.experimental.serialize_executable import serialize

            executable, in_tree, out_tree = serialize(compiled)
        except Exception:  # noqa: BLE001 - e.g. a backend without executable serialisation
            return compiled
        _write(key, {"executable": executable, "in_tree": in_tree, "out_tree": out_tree})
    return compiled


def load_or_compute(
    identity: dict[str, Any] | None, devices: Sequence[Any], compute: Callable[[], Any]
) -> Any:
    """A picklable value derived from a program (e.g. its abstract state): stored, or
    ``compute()`` and stored."""
    key = program_key(identity, devices)
    entry = _read(key)
    if entry is not None:
        _stats["loaded"] += 1
        return entry["value"]
    value = compute()
    _write(key, {"value": value})
    return value


__all__ = [
    "CheckedProgram",
    "compile_counting_hits",
    "code_digest",
    "directory",
    "disable",
    "enable",
    "environment",
    "load_or_compile",
    "load_or_compute",
    "program_key",
    "stats",
]
