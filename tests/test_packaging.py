"""The built wheel, installed into a fresh venv, runs every command from any folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv with only the sisajax wheel installed (its dependencies are borrowed from
    the test venv by a plain path entry, so no editable hook and no repository is visible)."""
    root = tmp_path_factory.mktemp("wheel")
    dist = root / "dist"
    src = root / "src"  # a copy of the tree: building writes build/ and *.egg-info next to it
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    for rel in files:
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dist),
            str(src),
        ],
        check=True,
        cwd=root,
        capture_output=True,
    )
    (wheel,) = dist.glob("sisajax-*.whl")
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
    )
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site) / "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = root / "elsewhere"
    work.mkdir()
    return env_dir / "bin", work, wheel


def _run(bin_dir: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(SISAJAX_CACHE_DIR="", SISAJAX_CPU_DEVICES="2")
    return subprocess.run(
        [str(bin_dir / args[0]), *args[1:]],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_wheel_contents(installed):
    import zipfile

    names = zipfile.ZipFile(installed[2]).namelist()
    assert "sisajax/conf/train.yaml" in names and "sisajax/conf/data/digits.yaml" in names
    assert "sisajax/experiments/shards.py" in names and "sisajax/cli/app.py" in names
    assert not [n for n in names if n.startswith(("experiments/", "conf/", "tests/"))]
    # every config of the repository ships (a new group folder must be listed in pyproject)
    configs = {
        f"sisajax/conf/{p.relative_to(REPO / 'conf')}" for p in (REPO / "conf").rglob("*.yaml")
    }
    assert configs and configs <= set(names), sorted(configs - set(names))


@pytest.mark.slow
def test_installed_cli_works_outside_the_repository(installed):
    bin_dir, cwd, _ = installed
    r = _run(bin_dir, cwd, "python", "-c", "import sisajax, sys; print(sisajax.__file__)")
    assert "site-packages" in r.stdout and str(REPO) not in r.stdout, r.stdout + r.stderr
    for cmd in ("train", "forget", "paper", "demo"):
        r = _run(bin_dir, cwd, "sisajax", cmd, "--help")
        assert r.returncode == 0 and "options and defaults" in r.stdout, r.stderr
    tiny = [
        "sisa.shards=3",
        "sisa.slices=2",
        "sisa.epochs=2",
        "model.hidden=[16]",
        "progress=false",
    ]
    r = _run(bin_dir, cwd, "sisajax", "train", "run_dir=run", *tiny)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 cpu (per_device)" in r.stdout  # the CPU default: one device per core
    r = _run(bin_dir, cwd, "sisajax", "forget", "run_dir=run", "ids=[5,6,7]", "progress=false")
    assert r.returncode == 0, r.stderr[-2000:]
    for cmd in ("evaluate", "verify", "audit", "status"):
        r = _run(bin_dir, cwd, "sisajax", cmd, "run_dir=run")
        assert r.returncode == 0, (cmd, r.stderr[-2000:])
    r = _run(bin_dir, cwd, "sisajax-sweep", "seed=0,1", "hydra.sweep.dir=sweep", *tiny)
    assert r.returncode == 0 and (cwd / "sweep" / "sweep.json").is_file(), r.stdout + r.stderr
    shutil.rmtree(cwd / "sweep")
