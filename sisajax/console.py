"""Terminal output shared by the command line and the experiments: tables, progress bars,
cost lines, and the per-host persistent compilation cache.

Tables and bars go to stdout through rich with markup off for user-provided text (so ``[...]``
in a value is printed as is); errors go to stderr (see :func:`sisajax.cli.base.fail`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any


def console():
    """Rich console on stdout; 160 columns when not a terminal (logs, pipes), so tables stay on
    one line per row."""
    import sys

    from rich.console import Console

    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def print_table(title: str, rows: list[tuple[str, ...]], header: tuple[str, ...]) -> None:
    """A table with a title, one header row and string cells (no markup interpretation)."""
    from rich.table import Table
    from rich.text import Text

    t = Table(title=Text(title))
    for i, h in enumerate(header):
        t.add_column(Text(h), justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*[Text(str(c)) for c in r])
    console().print(t)


def say(text: str) -> None:
    """A plain line on stdout (no markup)."""
    print(text, flush=True)


def fmt_cost(cost: Any) -> str:
    parts = [f"compile {cost.compile_s:.2f}s"]
    if cost.restore_s:
        parts.append(f"restore {cost.restore_s:.2f}s")
    parts += [f"train {cost.retrain_s:.2f}s", f"save/commit {cost.save_s:.2f}s"]
    return f"{cost.wall_s:.2f}s ({', '.join(parts)})"


def progress_factory(
    enabled: bool,
) -> tuple[Callable[[str, int], Callable[[int], None]] | None, AbstractContextManager]:
    """A ``progress(description, total) -> advance(n)`` factory backed by one rich Progress,
    showing steps, rate, elapsed time and ETA."""
    if not enabled:
        return None, nullcontext()
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[loss]}"),
        console=console(),
        transient=False,
    )

    def factory(desc: str, total: int) -> Callable[[int], None]:
        task = bar.add_task(desc, total=total, loss="")
        return lambda n, loss=None: bar.update(
            task, advance=n, **({"loss": f"loss {loss:.3f}"} if loss is not None else {})
        )

    return factory, bar


def program_store_limit() -> int:
    """The program store's size limit in bytes: ``SISAJAX_PROGRAM_STORE_MAX_MB`` (MiB), else the
    default. Raises ``ConfigError`` for a value that is not a positive number."""
    from sisajax import program_store
    from sisajax.config import ConfigError

    text = os.environ.get(program_store.MAX_MB_ENV, "").strip()
    if not text:
        return program_store.DEFAULT_MAX_BYTES
    try:
        mib = float(text)
    except ValueError:
        mib = float("nan")
    if not mib > 0 or mib == float("inf"):
        raise ConfigError(
            f"{program_store.MAX_MB_ENV} must be a positive number of MiB, got {text!r}"
        )
    return max(1, int(mib * 2**20))


def setup_jax() -> None:
    """Persistent compilation cache and program store (:mod:`sisajax.program_store`), one folder
    per :func:`sisajax.host.code_id` (``SISAJAX_CACHE_DIR`` overrides the location, an empty
    value turns both off; ``SISAJAX_PROGRAM_STORE=0`` turns the program store off,
    ``SISAJAX_PROGRAM_STORE_MAX_MB`` sets its size limit)."""
    import jax

    from sisajax import host, program_store
    from sisajax.layout import restore_cpu_affinity

    restore_cpu_affinity()

    base = os.environ.get(
        "SISAJAX_CACHE_DIR",
        str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sisajax" / "jax"),
    )
    if base:
        folder = Path(base) / host.code_id()
        jax.config.update("jax_compilation_cache_dir", str(folder))
        if os.environ.get(program_store.OFF_ENV) != "0":
            program_store.enable(folder / "programs", program_store_limit())
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
