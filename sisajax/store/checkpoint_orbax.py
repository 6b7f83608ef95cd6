"""Orbax interchange: write a run's states as a standard Orbax checkpoint (and read one back).

Slice checkpoints live in sisajax's own row files (:mod:`sisajax.store.rows`, measured ~20x
cheaper per checkpoint than an Orbax save); :meth:`sisajax.run.SisaRun.export` writes any
generation in Orbax's format for tools that read Orbax checkpoints.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from sisajax.errors import UserInputError, storage_error

PyTree = Any


def save_pytree(path: Path, tree: PyTree) -> Path:
    """Save a pytree of arrays with ``orbax.checkpoint.StandardCheckpointer`` at ``path`` (new)."""
    import jax
    import orbax.checkpoint as ocp

    path = Path(path).expanduser().absolute()  # Orbax needs absolute paths
    if os.path.lexists(path):  # a dangling link too: nothing is written through links
        raise UserInputError(f"{path} exists; export writes a new directory")
    if not path.parent.is_dir():
        raise UserInputError(f"{path}: the folder {path.parent} does not exist")
    ckptr = ocp.StandardCheckpointer()
    try:
        ckptr.save(path, jax.tree.map(np.asarray, tree))
        ckptr.wait_until_finished()
    except OSError as e:
        _remove_partial(path)
        raise storage_error(e, f"exporting to {path}", resumable=False) from None
    except BaseException:
        _remove_partial(path)
        raise
    finally:
        ckptr.close()
    return path


def _remove_partial(path: Path) -> None:
    """Orbax's temporary folder(s) of an export to ``path`` that failed (best effort)."""
    for tmp in path.parent.glob(f"{path.name}.orbax-checkpoint-tmp*"):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)


def load_pytree(path: Path, template: PyTree | None = None) -> PyTree:
    """Restore what :func:`save_pytree` wrote (as numpy; ``template`` gives structure and dtypes)."""
    import jax
    import orbax.checkpoint as ocp

    ckptr = ocp.StandardCheckpointer()
    try:
        if template is None:
            out = ckptr.restore(Path(path).absolute())
        else:
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), template)
            out = ckptr.restore(Path(path).absolute(), abstract)
    finally:
        ckptr.close()
    return jax.tree.map(np.asarray, out)
