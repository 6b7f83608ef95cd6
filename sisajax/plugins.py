"""Plug-ins: the researcher's own models and data sets, by module name.

A plug-in is an importable module that registers models (:func:`sisajax.register_model`) and/or
data sets (:func:`sisajax.register_dataset`) when imported. Name it with ``plugins=[my.module]``
on the command line (or ``SISAJAX_PLUGINS=my.module``, or ``sj.train(..., plugins=...)`` after
importing it yourself); the run records the names, and every later command on the run needs them
named again: opening a run directory never imports what the directory says on its own (a run
directory is data, not code). See ``docs/plugins.md`` for the model contract and an example.
"""

from __future__ import annotations

import importlib
import re

from sisajax.config import ConfigError

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


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
        if name not in out:
            out.append(name)
    return tuple(out)
