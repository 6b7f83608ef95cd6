"""The ``sisajax`` command line (thin glue over the library; see :mod:`sisajax.cli.app`).

Importing this package configures nothing; :func:`main` gives XLA one CPU device per core before
jax is imported (the fastest layout for SISA, see :mod:`sisajax.layout`).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """``sisajax COMMAND [...]`` (``argv=None``: the process's arguments, and the process ends
    here, see :func:`exit_now`)."""
    from sisajax.cli.app import main as app_main
    from sisajax.cli.base import fail, output_closed
    from sisajax.config import ConfigError
    from sisajax.layout import configure_cpu_devices

    try:
        configure_cpu_devices()
    except ConfigError as e:  # a bad SISAJAX_CPU_DEVICES: one line, before anything runs
        code = fail(str(e), 2)
    else:
        try:
            code = app_main(argv)
        except BrokenPipeError:  # printed outside the command's error handler (top-level help)
            code = output_closed()
    if argv is None:
        exit_now(code)
    return code


def exit_now(code: int) -> None:
    """End the process with ``code`` without the interpreter's teardown.

    Tearing down the XLA CPU client and every module takes ~0.25 s (measured on 2 cores: a
    third of a fresh ``sisajax forget``'s overhead beyond retraining). Everything a command
    writes is synced before it returns, so once the atexit handlers have run and the output is
    flushed there is nothing left to do. With other threads still alive (e.g. a sweep's
    launcher) the process exits normally instead. ``SISAJAX_FAST_EXIT=0`` turns this off.
    """
    import atexit
    import contextlib
    import os
    import threading

    if os.environ.get("SISAJAX_FAST_EXIT", "1") == "0" or threading.active_count() > 1:
        return
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe
            stream.flush()
    os._exit(code)


def sweep_main(argv: list[str] | None = None) -> int:
    """``sisajax-sweep [...]``: the same as ``sisajax train -m [...]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    args = [a for a in args if a not in ("-m", "--multirun")]
    return main(["train", "-m", *args])


if __name__ == "__main__":
    sys.exit(main())
