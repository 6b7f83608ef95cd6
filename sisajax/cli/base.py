"""Plumbing shared by the command line's modules: composing a command's config, the one error
handler, running a command, writing a command's result file and metrics record.

The command modules (:mod:`sisajax.cli.commands`, :mod:`sisajax.cli.forget_commands`,
:mod:`sisajax.cli.experiment_commands`, ...), the sweeps (:mod:`sisajax.cli.sweep`), the command
table (:mod:`sisajax.cli.table`) and the entry point (:mod:`sisajax.cli.app`) import from here; this module imports none of them, so the command
line has no import cycle. Heavy libraries (Hydra, jax, the run store) are imported inside the
functions that need them.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

CONF_MODULE = "sisajax.conf"
SEARCH_PATH_ENV = "SISAJAX_CONFIG_PATH"
FREE_FORM = ("data.params", "model.params", "features", "experiment", "mia")


class UsageError(ValueError):
    """Bad command-line usage (exit code 2)."""

    exit_code = 2


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand: its name (its config is ``conf/<name>.yaml``), the line ``sisajax --help``
    prints for it, its function as ``"module:function"`` (imported when the command runs or shows
    its help) and whether it sweeps with ``-m``."""

    name: str
    summary: str
    target: str
    multirun: bool = False

    def function(self) -> Callable[[dict[str, Any], list[str]], int]:
        """The command's ``fn(cfg, overrides) -> exit code`` (importing its module)."""
        import importlib

        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)


# -- composing ---------------------------------------------------------------------------------


def conf_dir() -> Path:
    """The folder of the packaged configs (``sisajax.conf``)."""
    import importlib.resources

    return Path(str(importlib.resources.files(CONF_MODULE)))


def search_path(extra: list[str]) -> list[str]:
    """User config folders (``--config-dir`` and ``SISAJAX_CONFIG_PATH``), as Hydra search path
    entries; they are searched before the packaged configs (:func:`use_config_dirs`)."""
    dirs = list(extra) + [d for d in os.environ.get(SEARCH_PATH_ENV, "").split(os.pathsep) if d]
    for d in dirs:
        if not d or not Path(d).is_dir():
            raise UsageError(f"config folder {d or '(none given)'} does not exist")
    return [f"file://{Path(d).resolve()}" for d in dirs]


_USER_DIRS: list[str] = []  # search path entries searched before the packaged configs


def use_config_dirs(paths: list[str]) -> None:
    """Make Hydra search ``paths`` (``file://`` entries, first wins) before the packaged configs,
    so a user's ``data/digits.yaml`` or ``train.yaml`` replaces the packaged one of that name
    (Hydra's own ``hydra.searchpath`` would put them after it)."""
    from hydra.core.plugins import Plugins
    from hydra.plugins.search_path_plugin import SearchPathPlugin

    global _USER_DIRS
    if not _USER_DIRS and not paths:
        return
    if not getattr(use_config_dirs, "registered", False):

        class UserConfigDirs(SearchPathPlugin):
            def manipulate_search_path(self, search_path) -> None:
                for p in reversed(_USER_DIRS):
                    search_path.prepend(provider="sisajax-user", path=p)

        Plugins.instance().register(UserConfigDirs)
        use_config_dirs.registered = True  # type: ignore[attr-defined]
    _USER_DIRS = list(paths)


def compose(name: str, overrides: list[str], config_dirs: list[str] = ()) -> dict[str, Any]:
    """Compose ``conf/<name>.yaml`` with overrides into a plain dict (no Hydra output folder).

    Raises:
      UsageError: unknown keys, a missing config group option, a malformed override, or a
        ``hydra.*`` override (only meaningful with ``-m``).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    hydra_keys = [o for o in overrides if o.lstrip("+~").startswith(("hydra.", "hydra/"))]
    if hydra_keys:
        raise UsageError(
            f"{hydra_keys[0].split('=')[0]} applies to Hydra's job folders, which only "
            "-m/--multirun uses; a single run writes where run_dir= says"
        )
    user_paths = search_path(list(config_dirs))
    use_config_dirs(user_paths)
    folders = [conf_dir(), *(Path(p[len("file://") :]) for p in user_paths)]
    groups = [o for o in overrides if _is_group_choice(o, folders)]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
            cfg = hydra_compose(config_name=name, overrides=overrides)
            # The reference config (the defaults with the same group choices) is composed only
            # when an override could add or remove a key or give a word where a flag belongs:
            # plain `key=value` on an unknown key fails in Hydra's struct mode anyway.
            ref = (
                hydra_compose(config_name=name, overrides=groups)
                if any(_needs_reference(o, groups) for o in overrides)
                else None
            )
    except Exception as e:  # Hydra/OmegaConf errors: one line naming the bad override
        if type(e).__module__.startswith(("hydra", "omegaconf")):
            bad = _overridden_key(e)
            hint = "" if bad is None else _suggestion(bad, _reference_keys(name, groups))
            raise UsageError(_hydra_message(e, hint)) from None
        if isinstance(e, ValueError | TypeError) and _raised_in(e, ("hydra", "omegaconf")):
            # Hydra fails on some overrides with a plain ValueError or TypeError (``data=null``)
            raise UsageError(_group_message(e, overrides, folders)) from None
        raise
    out = OmegaConf.to_container(cfg, resolve=True)
    ref_dict = None if ref is None else OmegaConf.to_container(ref, resolve=False)
    unknown = [] if ref_dict is None else _new_keys(out, ref_dict)
    if unknown:
        hint = _suggestion(unknown[0], _dotted_keys(ref_dict)) if len(unknown) == 1 else ""
        raise UsageError(
            f"unknown config key(s) {', '.join(unknown)} for `sisajax {name}` "
            f"({hint or f'see `sisajax {name} --help`'})"
        )
    if ref_dict is not None:
        removed = _new_keys(ref_dict, out)  # `~key`: the command reads every key it has
        if removed:
            raise UsageError(
                f"config key(s) {', '.join(removed)} cannot be removed for `sisajax {name}` "
                "(set a value instead)"
            )
        for key, got in _flag_mismatches(out, ref_dict):
            raise UsageError(f"{key} must be true or false, got {got!r}")
    return out  # type: ignore[return-value]


_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def _needs_reference(override: str, groups: list[str]) -> bool:
    """Whether ``override`` can add (``+``) or remove (``~``) a key, sets a dict, or sets a
    plain word (``no``, ``off``, ``maybe``: a string where a flag may belong, and Python reads
    any non-empty string as true)."""
    if override.startswith(("+", "~")) or "{" in override:
        return True
    if override in groups or "=" not in override:
        return False
    value = override.split("=", 1)[1].strip()
    return bool(_WORD.fullmatch(value)) and value.lower() not in ("true", "false", "null")


def _flag_mismatches(cfg: Any, ref: Any, prefix: str = ""):
    """``(key, value)`` of every key whose default is a flag (true/false) but whose value is
    not one (outside the free-form subtrees)."""
    if not isinstance(cfg, dict) or not isinstance(ref, dict):
        return
    if prefix.rstrip(".") in FREE_FORM:
        return
    for k, v in cfg.items():
        if k not in ref:
            continue
        if isinstance(ref[k], bool) and not isinstance(v, bool):
            yield f"{prefix}{k}", v
        elif isinstance(v, dict):
            yield from _flag_mismatches(v, ref[k], f"{prefix}{k}.")


def check_sweep_keys(name: str, overrides: list[str], config_dirs: list[str] = ()) -> None:
    """Refuse (before any job starts) sweep overrides whose keys ``conf/<name>.yaml`` does not
    have: a sweep composes each job only once it runs, so a typo would fail every job.

    Raises:
      UsageError: the first unknown key, with a suggestion when one is close.
    """
    paths = search_path(list(config_dirs))
    use_config_dirs(paths)
    folders = [conf_dir(), *(Path(p[len("file://") :]) for p in paths)]
    fixed = [o for o in overrides if _is_group_choice(o, folders) and "," not in o]
    known = set(_reference_keys(name, fixed))
    if not known:  # the defaults themselves do not compose: each job reports why
        return
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key.startswith(("hydra.", "hydra/")) or _is_group_choice(o, folders):
            continue
        free = any(key == f or key.startswith(f + ".") for f in FREE_FORM)
        if key not in known and not free:
            hint = _suggestion(key, sorted(known))
            raise UsageError(
                f"unknown config key {key} for `sisajax {name}` "
                f"({hint or f'see `sisajax {name} --help`'})"
            )


def _overridden_key(e: Exception) -> str | None:
    """The key of Hydra's "Could not override 'KEY'." error, if that is the error."""
    import re

    m = re.match(r"\s*Could not override '([^']+)'", str(e))
    return m.group(1) if m else None


def _reference_keys(name: str, overrides: list[str]) -> list[str]:
    """Every dotted key of ``conf/<name>.yaml`` composed with ``overrides`` (group choices);
    empty when that does not compose either."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
            ref = hydra_compose(config_name=name, overrides=overrides)
    except Exception:  # noqa: BLE001 - only a hint: the error being reported is the real one
        return []
    return _dotted_keys(OmegaConf.to_container(ref, resolve=False))


def _dotted_keys(cfg: Any, prefix: str = "") -> list[str]:
    """``["seed", "sisa", "sisa.shards", ...]``: every key of a nested dict, dotted."""
    if not isinstance(cfg, dict):
        return []
    out = []
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        out += [key, *_dotted_keys(v, key + ".")]
    return out


def _suggestion(key: str, known: list[str]) -> str:
    """``did you mean sisa.shards?`` for a mistyped ``key`` (a known key with the same last part,
    or a sibling spelled alike), how to add a key under a free-form section, or ""."""
    key = key.lstrip("+~")
    parent, _, leaf = key.rpartition(".")
    same_leaf = [k for k in known if k.rpartition(".")[2] == leaf and k != key]
    siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == parent}
    close = difflib.get_close_matches(leaf, list(siblings), n=1)
    options = same_leaf[:3] or [siblings[c] for c in close]
    if options:
        alternatives = " or ".join(
            [", ".join(options[:-1]), options[-1]] if options[1:] else options
        )
        return f"did you mean {alternatives}?"
    if parent in ("data.params", "model.params"):
        return f"{parent} takes new keys with a leading +: +{key}=..."
    return ""


def _is_group_choice(override: str, folders: list[Path]) -> bool:
    """``data=digits`` (a config group choice) rather than ``seed=3`` (a value)."""
    key = override.split("=", 1)[0].lstrip("+~")
    return "=" in override and "." not in key and any((f / key).is_dir() for f in folders)


def _raised_in(e: BaseException, packages: tuple[str, ...]) -> bool:
    """Whether the innermost frame of ``e``'s traceback is code of one of ``packages``."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = "" if tb is None else str(tb.tb_frame.f_globals.get("__name__", ""))
    return module.split(".")[0] in packages


def _group_message(e: Exception, overrides: list[str], folders: list[Path]) -> str:
    """One line for a plain ``ValueError``/``TypeError`` Hydra raised while composing: the group
    override without an option (``data=null``, ``data=[digits,null]``) and the options it has,
    or Hydra's own first line."""
    for o in overrides:
        key, _, value = o.lstrip("+~").partition("=")
        items = [v.strip() for v in value.strip().strip("[]").split(",")]
        if _is_group_choice(o, folders) and any(v in ("null", "") for v in items):
            options = sorted({p.stem for f in folders for p in (f / key).glob("*.yaml")})
            return f"{o}: {key} is a config group, choose one of its options ({', '.join(options)})"
    return _hydra_message(e)


def _hydra_message(e: Exception, hint: str = "") -> str:
    """The first line of a Hydra/OmegaConf error (plus ``hint`` for a key it does not know)."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "Could not override" in msg:
        msg += f" (no such key; {hint or 'see --help'})"
    return msg


def _new_keys(cfg: Any, ref: Any, prefix: str = "") -> list[str]:
    """Dotted keys of ``cfg`` that ``ref`` lacks (outside the free-form subtrees)."""
    if not isinstance(cfg, dict) or prefix.rstrip(".") in FREE_FORM:
        return []
    out = []
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if not isinstance(ref, dict) or k not in ref:
            out.append(key)
        else:
            out += _new_keys(v, ref[k], key + ".")
    return out


def output_path(value: Any, key: str, suffixes: tuple[str, ...] = ()) -> Path | None:
    """The file ``key=value`` names for a command's output (None when not given), checked
    before any work: its folder exists, it is not a folder, its suffix is one of ``suffixes``.

    Raises:
      UsageError: naming the key and the path.
    """
    if value in (None, ""):
        return None
    path = Path(str(value)).expanduser()
    if suffixes and path.suffix not in suffixes:
        raise UsageError(f"{key}={value}: use a {' or '.join(suffixes)} file")
    if not path.parent.is_dir():
        raise UsageError(f"{key}={value}: the folder {path.parent} does not exist")
    if path.is_dir():
        raise UsageError(f"{key}={value} is a folder, not a file")
    return path


def run_dir_arg(value: Any, key: str = "run_dir") -> str:
    """The folder ``key=value`` names, as a string. Hydra reads ``run_dir=123`` as a number: a
    whole number is taken as the folder name it spells; null, true/false, a list, a mapping, a
    fractional number (``1.50`` and ``1.5`` read alike) and an empty value are refused.

    Raises:
      UsageError: naming ``key`` and what it got.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, float):
        raise UsageError(
            f"{key} must be a folder path, got the number {value!r} (for a folder named like a "
            f"number, quote it: '{key}=\"...\"')"
        )
    got = {type(None): "null", bool: "true/false", list: "a list", dict: "a mapping"}.get(
        type(value), "an empty value" if isinstance(value, str) else type(value).__name__
    )
    raise UsageError(f"{key} must be a folder path, got {got}")


def run_config(cfg: dict[str, Any]):
    """The library's :class:`~sisajax.RunConfig` from a composed config (top-level ``seed`` is
    the run's seed)."""
    from sisajax.config import run_config_from

    return run_config_from(cfg)


def import_plugins(cfg: dict[str, Any]) -> tuple[str, ...]:
    """Import the modules the user named with ``plugins=[...]`` (and ``SISAJAX_PLUGINS``)."""
    from sisajax.plugins import load_plugins

    names = list(cfg.get("plugins") or [])
    names += [p for p in os.environ.get("SISAJAX_PLUGINS", "").split(",") if p]
    return load_plugins(names)


def open_run(cfg: dict[str, Any]):
    """The run of ``cfg["run_dir"]``, after importing the plug-ins the command names."""
    import sisajax as sj

    path = run_dir_arg(cfg["run_dir"])
    import_plugins(cfg)
    return sj.open_run(path)


# -- running -------------------------------------------------------------------------------------


def fail(message: str, code: int) -> int:
    """Print ``error: message`` as one line on stderr; return ``code``."""
    one_line = " ".join(str(message).split())
    print(f"error: {one_line}", file=sys.stderr, flush=True)
    return code


def run_command(cmd: Command, cfg: dict[str, Any], overrides: list[str]) -> int:
    """Set up jax and run the command."""
    from sisajax.console import setup_jax

    fn = cmd.function()
    setup_jax()
    return fn(cfg, overrides)


def output_closed() -> int:
    """Our reader went away (``sisajax status | head``): not an error of the run. Point stdout at
    /dev/null (so nothing fails again at exit) and return 1, quietly."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 1


def report_error(e: BaseException) -> int:
    """One line on stderr and the exit code for ``e`` (a traceback only for bugs)."""
    from sisajax.errors import SisajaxError, exit_code_of, storage_error

    if isinstance(e, UsageError | SisajaxError):
        return fail(str(e), getattr(e, "exit_code", 2))
    if isinstance(e, BrokenPipeError):
        return output_closed()
    if isinstance(e, OSError):
        if e.filename:  # a file the command was given or writes: name it, nothing to resume
            return fail(str(storage_error(e, str(e.filename), resumable=False)), exit_code_of(e))
        return fail(str(storage_error(e, "file system")), exit_code_of(e))
    if type(e).__module__.startswith(("hydra", "omegaconf")):
        return fail(_hydra_message(e), 2)
    raise e


_WRITTEN: contextvars.ContextVar[list[Path] | None] = contextvars.ContextVar(
    "sisajax_result_files", default=None
)


@contextlib.contextmanager
def recording_results(into: list[Path]):
    """Append to ``into`` the path of every result file :func:`write_result` writes inside the
    block (in this thread): a sweep's job records exactly the files its own command wrote."""
    token = _WRITTEN.set(into)
    try:
        yield into
    finally:
        _WRITTEN.reset(token)


def write_result(run, name: str, obj: dict[str, Any]) -> None:
    """Write the command's result file. The command's work is done (and its verdict printed)
    by now, so a result that cannot be written (a full disk) is reported, not a failure."""
    from sisajax.console import say
    from sisajax.errors import StorageError

    try:
        path = run.write_result(name, obj)
    except StorageError as e:
        say(f"result not written: {e}")
        return
    recording = _WRITTEN.get()
    if path and recording is not None:
        recording.append(Path(path))
    say(f"result: {path}" if path else "result not written: the run directory is read-only")


def log_metrics(run, record: dict[str, Any]) -> None:
    """Append a read-only command's metrics record (skipped on a read-only run directory; a
    record that cannot be written is reported, not a failure: the command's work is done)."""
    from sisajax.console import say
    from sisajax.metrics import log_record
    from sisajax.store.files import UnsafeRunError

    try:
        log_record(run.run_dir, record)
    except (OSError, UnsafeRunError) as e:
        say(f"metrics not written: {e}")
