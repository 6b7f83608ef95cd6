"""The ``sisajax`` command line (thin glue over the library; see :mod:`sisajax.cli.app`).

Importing this package configures nothing; :func:`main` gives XLA one CPU device per core before
jax is imported (the fastest layout for SISA, see :mod:`sisajax.layout`).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """``sisajax COMMAND [...]``."""
    from sisajax.layout import configure_cpu_devices

    configure_cpu_devices()
    from sisajax.cli.app import main as app_main

    return app_main(argv)


def sweep_main(argv: list[str] | None = None) -> int:
    """``sisajax-sweep [...]``: the same as ``sisajax train -m [...]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    args = [a for a in args if a not in ("-m", "--multirun")]
    return main(["train", "-m", *args])


if __name__ == "__main__":
    sys.exit(main())
