"""The ``sisajax`` command line: subcommands with Hydra's conventions, one error handler.

    sisajax COMMAND [--help] [--cfg job] [-m|--multirun] [key=value ...]
    sisajax --version

Each command has its own primary config in the packaged configs (the repository's ``conf/``, shipped
as ``sisajax.conf``): ``conf/<command>.yaml`` plus the config groups it uses. Users extend them by
adding a folder to the search path (``--config-dir DIR`` or ``SISAJAX_CONFIG_PATH=DIR[:DIR]``),
e.g. their own ``DIR/data/mydata.yaml`` or ``DIR/experiment/mine.yaml``.

Rules every command follows:
  * ``--help`` lists the command's config groups, their options and the composed defaults;
    ``--cfg job`` prints the composed config and exits.
  * Unknown keys are refused (``foo=1`` and ``+foo=1`` alike; free-form only under
    ``data.params`` and ``model.params``); ``hydra.*`` overrides are honoured with ``-m``
    and refused otherwise (a single run writes no Hydra output folder).
  * Errors: one line on stderr, no traceback; exit code 2 for a wrong request, 1 for a problem
    with the run or the environment (see :mod:`sisajax.errors`).

This module holds no library rules: commands only compose library calls. The commands are listed
in :mod:`sisajax.cli.table`; what the command modules share (composing a config, the one error
handler, running a command) is in :mod:`sisajax.cli.base`.
"""

from __future__ import annotations

import difflib
import inspect
import sys
from typing import Any

from sisajax.cli.base import UsageError, compose, conf_dir, fail, report_error, run_command
from sisajax.cli.table import COMMANDS

# -- help ----------------------------------------------------------------------------------------


def groups_of(name: str) -> dict[str, list[str]]:
    """``{group: [options]}`` of the config groups ``conf/<name>.yaml`` selects."""
    import yaml

    root = conf_dir()
    spec = yaml.safe_load((root / f"{name}.yaml").read_text()) or {}
    out = {}
    for entry in spec.get("defaults", []):
        if isinstance(entry, dict):
            for group in entry:
                group = group.replace("override /", "").lstrip("/")
                if (root / group).is_dir():
                    out[group] = sorted(p.stem for p in (root / group).glob("*.yaml"))
    return out


def help_text(name: str) -> str:
    """What ``sisajax NAME --help`` prints: summary, groups and options, composed defaults."""
    import yaml

    cmd = COMMANDS[name]
    lines = [f"sisajax {name}: {cmd.summary}", ""]
    doc = inspect.cleandoc(cmd.function().__doc__ or "")
    if doc:
        lines += [doc, ""]
    usage = f"usage: sisajax {name} [--help] [--cfg job] "
    usage += "[-m] " if cmd.multirun else ""
    lines += [usage + "[key=value ...]", ""]
    groups = groups_of(name)
    if groups:
        lines.append("config groups (choose with group=option):")
        for g, opts in groups.items():
            lines.append(f"  {g}: {', '.join(opts)}")
        lines.append("")
    lines.append("options and defaults (override with key=value):")
    cfg = compose(name, [])
    lines += ["  " + ln for ln in yaml.safe_dump(cfg, sort_keys=False).splitlines()]
    return "\n".join(lines)


def version() -> str:
    """The installed package's version (no jax import)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("sisajax")
    except PackageNotFoundError:
        return "unknown (not installed as a package)"


def top_help() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [
        "usage: sisajax COMMAND [--help] [--cfg job] [-m] [key=value ...]",
        "",
        "Exact machine unlearning with SISA training. Commands:",
    ]
    lines += [f"  {n:<{width}}  {c.summary}" for n, c in COMMANDS.items()]
    lines += [
        "",
        "`sisajax COMMAND --help` lists a command's config groups, options and defaults;",
        "`sisajax --version` prints the version.",
        "Exit codes: 0 ok, 1 a problem with the run or environment (or a failed check), "
        "2 a wrong request.",
    ]
    return "\n".join(lines)


# -- running -------------------------------------------------------------------------------------


def parse(argv: list[str]) -> tuple[str, dict[str, Any], list[str]]:
    """``(command, flags, overrides)`` from the arguments after ``sisajax``."""
    name, rest = argv[0], argv[1:]
    flags: dict[str, Any] = {"help": False, "cfg": None, "multirun": False, "config_dirs": []}
    overrides = []
    it = iter(rest)
    for a in it:
        if a in ("-h", "--help"):
            flags["help"] = True
        elif a in ("-m", "--multirun"):
            flags["multirun"] = True
        elif a in ("-c", "--cfg"):
            flags["cfg"] = next(it, "job")
        elif a.startswith("--cfg="):
            flags["cfg"] = a.split("=", 1)[1]
        elif a in ("-cd", "--config-dir"):
            flags["config_dirs"].append(next(it, ""))
        elif a.startswith("--config-dir="):
            flags["config_dirs"].append(a.split("=", 1)[1])
        elif a.startswith("-"):
            raise UsageError(f"unknown option {a} (see `sisajax {name} --help`)")
        else:
            overrides.append(a)
    if flags["cfg"] not in (None, "job"):
        raise UsageError(f"--cfg takes 'job' (the composed config), got {flags['cfg']!r}")
    return name, flags, overrides


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sisajax`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(top_help())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"sisajax {version()}")
        return 0
    if argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return fail(f"unknown command {argv[0]!r}{hint}; commands: {', '.join(COMMANDS)}", 2)
    try:
        name, flags, overrides = parse(argv)
        cmd = COMMANDS[name]
        if flags["help"]:
            print(help_text(name))
            return 0
        if flags["multirun"]:
            if not cmd.multirun:
                raise UsageError(f"`sisajax {name}` does not sweep; -m works with train and paper")
            if flags["cfg"] is not None:  # a sweep is many configs: show one without -m
                raise UsageError(
                    "--cfg shows one config and -m runs a sweep: leave out -m (and give one "
                    "value per key) to see a sweep point's config"
                )
            from sisajax.cli.sweep import multirun

            return multirun(name, overrides, flags["config_dirs"])
        cfg = compose(name, overrides, flags["config_dirs"])
        if flags["cfg"] == "job":
            import yaml

            print(yaml.safe_dump(cfg, sort_keys=False), end="")
            return 0
        return run_command(cmd, cfg, overrides)
    except KeyboardInterrupt:
        return fail(interrupted_message(argv[0]), 130)
    except Exception as e:  # noqa: BLE001 - the one error handler of the command line
        return report_error(e)


# What an interrupted command leaves behind, by command (what each one's code guarantees).
_INTERRUPTED = {
    "train": (
        "interrupted; a new run keeps its completed slice steps (the same `sisajax train` again, or "
        "`sisajax resume`, continues; with none completed its directory was removed), and a run "
        "retrained in place keeps its previous generation (`sisajax resume` closes the request)"
    ),
    "forget": "interrupted; the run is unchanged or resumable (`sisajax resume`)",
    "serve": "interrupted; the run is unchanged or resumable (`sisajax resume`)",
    "resume": "interrupted; the run is unchanged or resumable (`sisajax resume` again)",
}


def interrupted_message(command: str) -> str:
    """The one line printed when ``command`` is interrupted (Ctrl-C): true for that command."""
    if command in _INTERRUPTED:
        return _INTERRUPTED[command]
    if command in ("evaluate", "status", "audit", "verify", "predict", "ids", "check-receipt"):
        return "interrupted; nothing was changed"
    return "interrupted; the command's partial outputs may remain (run it again)"
