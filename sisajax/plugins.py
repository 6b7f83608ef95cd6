"""Plug-ins: the researcher's own models and data sets, by module name.

A plug-in is an importable module that registers models (:func:`sisajax.register_model`) and/or
data sets (:func:`sisajax.register_dataset`) when imported. Name it with ``plugins=[my.module]``
on the command line (or ``SISAJAX_PLUGINS=my.module``, or ``sj.train(..., plugins=...)`` after
importing it yourself); the run records the names, and every later command on the run needs them
named again: opening a run directory never imports what the directory says on its own (a run
directory is data, not code). See ``docs/plugins.md`` for the model contract and an example.

Training also records a sha256 of each plug-in's source (:func:`source_hashes`). A command that
writes to the run by replaying its training (``forget``, ``resume``, ``serve``) refuses a plug-in
whose source differs now (:func:`check_sources`), unless ``SISAJAX_ALLOW_PLUGIN_CHANGE=1``; a
command that only reads warns.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import sys
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

from sisajax.config import ConfigError
from sisajax.errors import UserInputError

# Set to 1 to let a writing command proceed (with a warning) on a plug-in whose source changed.
ALLOW_CHANGE_ENV = "SISAJAX_ALLOW_PLUGIN_CHANGE"


class PluginChangedError(UserInputError):
    """A plug-in's source differs from the one the run was trained with; nothing was changed."""


class PluginChangeWarning(UserWarning):
    """A plug-in's source differs from the one the run was trained with."""


_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")

# Source hashes of the plug-ins load_plugins imported, taken right after the import: the code this
# process runs, even if the files are edited while it trains.
_IMPORTED: dict[str, str | None] = {}


def load_plugins(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Import each named module (in order, once); return the names.

    Raises:
      ConfigError: a name that is not a module path, or a module that fails to import.
    """
    out = []
    for name in names:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigError(f"plugins must be module names like my_pkg.models, got {name!r}")
        try:
            importlib.import_module(name)
        except Exception as e:  # ImportError and whatever the module raises while registering
            raise ConfigError(
                f"plugin module {name!r} cannot be imported ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:150] if str(e) else ''}); is it on PYTHONPATH?"
            ) from None
        _IMPORTED.setdefault(name, source_hash(name))
        if name not in out:
            out.append(name)
    return tuple(out)


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def source_hash(name: str) -> str | None:
    """sha256 of the source of the imported module ``name``: its file, or for a package every
    ``.py`` file under its folders (relative paths included). None when the module is not
    imported in this process or its source cannot be read (e.g. a module inside a zip)."""
    module = sys.modules.get(name)
    if module is None:
        return None
    try:
        folders = getattr(module, "__path__", None)
        if folders is None:
            file = getattr(module, "__file__", None)
            return _file_sha256(Path(file)) if file else None
        h = hashlib.sha256()
        for folder in sorted({str(Path(f).resolve()) for f in folders}):
            for top, dirs, files in os.walk(folder):
                dirs[:] = sorted(d for d in dirs if d != "__pycache__")
                for f in sorted(n for n in files if n.endswith(".py")):
                    rel = Path(top, f).relative_to(folder).as_posix()
                    h.update(f"{rel}\0{_file_sha256(Path(top, f))}\n".encode())
        return h.hexdigest()
    except OSError:
        return None


# Source hashes of modules and packages as this process first saw them (registering a model
# records its package's): what the code it runs was, even if the files change later.
_FIRST_SEEN: dict[str, str | None] = {}


def first_source_hash(name: str) -> str | None:
    """:func:`source_hash` of ``name`` as this process first asked for it (the first call records
    it; a model records its package's when it is registered). None when it cannot be read."""
    if name not in _FIRST_SEEN:
        _FIRST_SEEN[name] = source_hash(name)
    return _FIRST_SEEN[name]


def source_hashes(names: Iterable[str]) -> dict[str, str]:
    """``{module name: source sha256}`` of the named plug-ins this process has imported (as
    they were when :func:`load_plugins` imported them, else as they are now)."""
    out = {}
    for name in names:
        h = _IMPORTED.get(name) or source_hash(name)
        if h is not None:
            out[name] = h
    return out


def check_sources(
    recorded: Mapping[str, str],
    *,
    writing: bool,
    warned: set[str] | None = None,
    require_imported: bool = False,
) -> None:
    """Compare the imported plug-ins' sources with the hashes ``recorded`` when the run was
    trained. A plug-in not imported here, or not recorded (a run from an older sisajax), is not
    checked. A changed one is refused when ``writing`` (unless ``SISAJAX_ALLOW_PLUGIN_CHANGE=1``),
    else warned about, once per name in ``warned``.

    Both the source this process imported (its hash at import) and the file now on disk must
    match: a long-lived process whose file was edited since still runs the old code, and a
    module reloaded after an edit runs the new one.

    Args:
      require_imported: a recorded plug-in that is not imported is refused too (``writing`` a
        run whose model comes from a plug-in: another module registering the same model name
        would otherwise pass unchecked).

    Raises:
      PluginChangedError: ``writing`` and a plug-in's source hash differs, or
        ``require_imported`` and one is not imported (one line).
    """
    if require_imported and writing:
        missing = sorted(n for n in recorded if n not in sys.modules)
        if missing:
            raise PluginChangedError(
                f"this run was trained with plug-in(s) {', '.join(missing)}, not imported here: "
                "forget must replay that code; name them with plugins=[...]"
            )
    changed = [
        n
        for n, h in recorded.items()
        if any(now is not None and now != h for now in (_IMPORTED.get(n), source_hash(n)))
    ]
    if not changed:
        return
    what = (
        f"plug-in {changed[0]} changed since this run was trained (its source hash differs)"
        if len(changed) == 1
        else f"plug-ins {', '.join(changed)} changed since this run was trained (their source "
        "hashes differ)"
    )
    allowed = os.environ.get(ALLOW_CHANGE_ENV, "") == "1"
    if writing and not allowed:
        raise PluginChangedError(
            f"{what}: forget would not replay the training exactly; restore the plug-in's code, "
            f"or retrain the run in place ({ALLOW_CHANGE_ENV}=1 proceeds anyway, inexactly)"
        )
    if warned is not None:
        if set(changed) <= warned:
            return
        warned.update(changed)
    if writing:
        msg = (
            f"{what}; proceeding because {ALLOW_CHANGE_ENV}=1: retrained slices use the new code, "
            "so the run may no longer equal training from scratch"
        )
    else:
        msg = f"{what}; this command runs the new code on the stored models"
    warnings.warn(msg, PluginChangeWarning, stacklevel=3)
