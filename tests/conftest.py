"""Shared fixtures: tiny data and configs, a persistent compile cache for the session."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

import sisajax as sj


@pytest.fixture(scope="session", autouse=True)
def _compile_cache(tmp_path_factory):
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax-cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def tiny_digits(n_train: int = 360, n_test: int = 120) -> sj.Dataset:
    """The first rows of the real digits data set (fast to train)."""
    ds = sj.load_dataset("digits")
    return sj.Dataset(
        "digits",
        ds.train_ids[:n_train],
        ds.x_train[:n_train],
        ds.y_train[:n_train],
        ds.test_ids[:n_test],
        ds.x_test[:n_test],
        ds.y_test[:n_test],
        10,
    )


def tiny_config(**sisa) -> sj.RunConfig:
    base = {"shards": 3, "slices": 4, "epochs": 3, "batch_size": 8, "chunk_steps": 16}
    base.update(sisa)
    optim = base.pop("optim", {})
    return sj.RunConfig(
        model=sj.ModelConfig(hidden=(16,)),
        optim=sj.OptimConfig(**optim) if optim else sj.OptimConfig(),
        sisa=sj.SisaConfig(**base),
    )


def without(ds: sj.Dataset, ids) -> sj.Dataset:
    """``ds`` without the training rows of ``ids`` (everything else, preprocessing included,
    kept)."""
    keep = ~np.isin(ds.train_ids, np.asarray(ids))
    return dataclasses.replace(
        ds, train_ids=ds.train_ids[keep], x_train=ds.x_train[keep], y_train=ds.y_train[keep]
    )


def assert_trees_equal(a, b) -> None:
    """Bit-for-bit equality of two pytrees (structure, dtypes and values)."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes(), "not bit-identical"


# -- helpers shared by the run-directory tests ----------------------------------------------------

import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def copy_run(src: Path, dst: Path) -> sj.SisaRun:
    """A private copy of a trained run (run directories are relocatable)."""
    shutil.copytree(src, dst)
    return sj.open_run(dst)


def pick(run: sj.SisaRun, shard: int, slice_: int, n: int = 1) -> list[int]:
    """The first ``n`` retained ids of (shard, slice)."""
    d = run.shard_data(shard)
    return [int(i) for i in d.ids[d.slices == slice_][:n]]


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("SISAJAX_CACHE_DIR", str(REPO / ".pytest_cache" / "jax-cli"))
    env["SISAJAX_CPU_DEVICES"] = "1"  # the tests' runs are one-device runs
    env.update(extra or {})
    return env


def cli_run(args: list[str], env_extra: dict[str, str] | None = None, timeout: float = 180, **kw):
    """``sisajax ARGS`` in a fresh process (as a user would run it)."""
    return subprocess.run(
        [sys.executable, "-m", "sisajax.cli", *args],
        env=cli_env(env_extra),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes), lock files aside; links as targets."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.name.endswith(".lock"):
            continue
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = b"-> " + os.readlink(p).encode()
        elif p.is_file():
            out[rel] = p.read_bytes()
        elif p.is_dir():
            out[rel + "/"] = b""
    return out


ENGINE_PROBE = (
    "import sisajax as sj\n"
    "try:\n"
    "    sj.Engine(sj.RunConfig(), (4,), 'float32', 2)\n"
    "except sj.ConfigError as e:\n"
    "    print('refused:', e)\n"
)


def engine_probe(env: dict[str, str]) -> subprocess.CompletedProcess:
    """Build an engine through the Python API in a fresh process with ``env``; its stdout says
    ``refused: <message>`` when the device layout is refused."""
    return subprocess.run(
        [sys.executable, "-c", ENGINE_PROBE], env=env, capture_output=True, text=True, timeout=120
    )
