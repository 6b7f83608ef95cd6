"""Compiled programs kept on disk between processes, so a new process skips tracing and lowering.

jax's persistent compilation cache saves compiling, but a process must still trace a program and
lower it to find the cache entry: for a one-id forget that is ~0.2 s of ~1.5 s (the first trace of
a process is the slowest). This store keeps the compiled executable itself (jax's
``serialize_executable``) with the program's argument structure, under a key made of everything
the program is a function of, computed without tracing:

* what the engine asks for (run configuration, data shapes and dtypes, width, capacity, chunk
  loop form, devices) -- the caller's ``identity``;
* the code: sisajax's own source (every ``.py`` file of the package) and the model's source when
  it is a registered plug-in (the caller gives it), both as this process imported them: once a
  file differs on disk from what the process imported, nothing is stored or loaded (a model whose
  source cannot be read is never stored); and the versions of Python, jax, jaxlib, flax, optax,
  numpy and ml_dtypes;
* the environment: every jax configuration value, ``XLA_FLAGS``, the backend's platform and
  version, :func:`sisajax.host.code_id` (the ISA features that decide generated code) and
  :func:`sisajax.host.cpu_signature` (the CPU's model and every feature it reports).

A value of the identity that is not plain JSON (numbers, strings, lists, dicts) makes the program
unkeyed: it is compiled, never stored.

Not covered: third-party code edited in place without a version change, and a plug-in model's
helpers imported from outside its own package; turn the store off (:func:`disable`, or
``SISAJAX_PROGRAM_STORE=0`` for the command line) while editing such code. ``sisajax verify``
replays a run from scratch and compares the bits whatever the store holds.

The command line enables the store beside jax's cache; the Python API leaves it off unless
:func:`enable` is called. Entries are written atomically and carry a sha256 of their content,
checked before anything in them is used; an entry that cannot be read, fails its checksum or
cannot be loaded is ignored (the program is compiled as usual, and stored again when compiled
afresh); a full or read-only disk only means nothing is stored. Loading an entry runs code from
the cache folder, like jax's own cache, so only regular files of the current user that no one
else may write are loaded (a link, or a file another user could have written, is compiled
instead). The store keeps at most ``max_bytes`` (default 512 MiB, ``SISAJAX_PROGRAM_STORE_MAX_MB``
for the command line): after writing an entry, the least recently used ones go until it holds
at most 80% of that, and temp files a killed writer left behind go after an hour. The folder can
be deleted at any time.
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

from sisajax.plugins import first_source_hash, source_hash
from sisajax.store.files import UnsafeRunError, open_read, write_file

FORMAT = 2
OFF_ENV = "SISAJAX_PROGRAM_STORE"  # "0": the command line does not use the store
MAX_MB_ENV = "SISAJAX_PROGRAM_STORE_MAX_MB"  # the command line's size limit, in MiB
DEFAULT_MAX_BYTES = 512 * 2**20
STALE_TEMP_S = 3600.0  # a temp file this old was left by a writer that died
_directory: Path | None = None
_max_bytes = DEFAULT_MAX_BYTES
_stats = {"loaded": 0, "stored": 0, "missed": 0, "failed": 0, "evicted": 0}

first_source_hash("sisajax")  # the source this process imports, before anything can edit it


def enable(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> Path:
    """Keep compiled programs under ``path`` (created when first written), at most ``max_bytes``
    of them (least recently used go first). Returns the folder."""
    global _directory, _max_bytes
    if max_bytes <= 0:
        raise ValueError(f"the program store's size limit must be positive, got {max_bytes}")
    _directory = Path(path)
    _max_bytes = int(max_bytes)
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
def _versions() -> list[str]:
    import flax
    import jax
    import jaxlib
    import ml_dtypes
    import numpy
    import optax

    return [sys.version] + [m.__version__ for m in (jax, jaxlib, flax, optax, numpy, ml_dtypes)]


def code_digest() -> str | None:
    """sha256 over sisajax's source files as this process imported them and the versions of the
    libraries its programs use. None when sisajax's source cannot be read (e.g. imported from a
    zip) or differs on disk from what this process imported (edited since): then nothing is
    stored or loaded."""
    source = first_source_hash("sisajax")
    if source is None or source_hash("sisajax") != source:
        return None
    parts = {"sisajax": source, "versions": _versions()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def environment(devices: Sequence[Any], code: str | None = None) -> dict[str, Any]:
    """What the code, the backend and jax's configuration add to a program's key (read at every
    key; ``code``: :func:`code_digest` when the caller has it)."""
    import jax

    from sisajax.host import code_id, cpu_signature

    d = devices[0]
    config = {k: repr(v) for k, v in sorted(jax.config.values.items())}
    return {
        "code": code_digest() if code is None else code,
        "host": code_id(),
        "cpu": cpu_signature(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "platform": d.platform,
        "platform_version": getattr(d.client, "platform_version", ""),
        "device_kind": d.device_kind,
        "devices": [int(x.id) for x in devices],
        "jax_config": config,
    }


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python number it holds; anything else that is not JSON is refused
    (its text form need not name it exactly: a long array's repr elides values)."""
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == ():
        return value.item()
    raise TypeError(f"{type(value).__name__} in a program identity")


def program_key(identity: dict[str, Any] | None, devices: Sequence[Any]) -> str | None:
    """The key of the program ``identity`` describes on ``devices``; None when the store is off,
    ``identity`` is None (a program that must not be stored) or holds a value that is not plain
    JSON, or the code cannot be named (:func:`code_digest`)."""
    if _directory is None or identity is None:
        return None
    code = code_digest()
    if code is None:
        return None
    try:
        blob = json.dumps(
            {"format": FORMAT, "identity": identity, "environment": environment(devices, code)},
            sort_keys=True,
            default=_plain,
            allow_nan=False,
        )
    except (TypeError, ValueError):
        return None
    return hashlib.sha256(blob.encode()).hexdigest()


def encode_entry(key: str, payload: dict[str, Any]) -> bytes:
    """The bytes of a stored entry: ``payload`` pickled, with the key and a sha256 of it."""
    body = pickle.dumps(payload, pickle.HIGHEST_PROTOCOL)
    head = {"format": FORMAT, "key": key, "sha256": hashlib.sha256(body).hexdigest()}
    return pickle.dumps({**head, "body": body}, pickle.HIGHEST_PROTOCOL)


def decode_entry(blob: bytes, key: str) -> dict[str, Any]:
    """The payload of an entry written by :func:`encode_entry` for ``key``; ``ValueError`` when it
    is of another format or key, or its content does not match its checksum (a damaged file)."""
    entry = pickle.loads(blob)
    if not isinstance(entry, dict) or entry.get("format") != FORMAT or entry.get("key") != key:
        raise ValueError("not an entry of this key")
    body = entry.get("body")
    if not isinstance(body, bytes) or hashlib.sha256(body).hexdigest() != entry.get("sha256"):
        raise ValueError("the entry's content does not match its checksum")
    payload = pickle.loads(body)
    if not isinstance(payload, dict):
        raise ValueError("not an entry")
    return payload


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
    path = _path(key)
    try:
        with open_read(path) as f:  # no link followed, regular files only
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
        entry = decode_entry(blob, key)
    except Exception:  # noqa: BLE001 - a damaged or foreign file: as if not stored
        _stats["failed"] += 1
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # used now: the last to be evicted
    return entry


def _write(key: str | None, payload: dict[str, Any]) -> bool:
    """Write an entry atomically (private to this user); False when off, when something in it
    does not pickle, or when the disk refuses it."""
    if key is None or _directory is None:
        return False
    path = _path(key)
    try:
        blob = encode_entry(key, payload)
    except Exception:  # noqa: BLE001 - something in it does not pickle: not stored
        return False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(path, blob, durable=False, mode=0o600)
    except OSError:  # StorageError included: a full or read-only disk
        return False
    _stats["stored"] += 1
    prune()
    return True


def prune(now: float | None = None) -> int:
    """Keep the store within its size limit: when its entries hold more than ``max_bytes``, delete
    the least recently used (by modification time, which loading renews) until they hold at most
    80% of it; delete temp files older than an hour (left by a writer that died). Entries another
    process deletes meanwhile are skipped. Returns how many entries were deleted."""
    import time

    if _directory is None:
        return 0
    now = time.time() if now is None else now
    entries = []
    try:
        folders = [e for e in os.scandir(_directory) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return 0
    for folder in folders:
        try:
            files = list(os.scandir(folder.path))
        except OSError:
            continue
        for e in files:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if e.name.endswith(".tmp") and now - st.st_mtime > STALE_TEMP_S:
                with contextlib.suppress(OSError):
                    os.unlink(e.path)
            elif e.name.endswith(".pkl"):
                entries.append((st.st_mtime, st.st_size, e.path))
    total = sum(size for _, size, _ in entries)
    if total <= _max_bytes:
        return 0
    removed = 0
    for _, size, path in sorted(entries):
        if total <= 0.8 * _max_bytes:
            break
        with contextlib.suppress(OSError):
            os.unlink(path)
            removed += 1
        total -= size
    _stats["evicted"] += removed
    return removed


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
    "code_digest",
    "compile_counting_hits",
    "directory",
    "disable",
    "enable",
    "environment",
    "decode_entry",
    "encode_entry",
    "load_or_compile",
    "load_or_compute",
    "program_key",
    "prune",
    "stats",
]
