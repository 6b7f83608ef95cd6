"""The run directory cannot be tricked: links never followed, nothing outside touched, foreign
entries left alone, damage detected by audit, readers work on read-only runs."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_env, copy_run, pick, tiny_config, tiny_digits, tree_bytes

import sisajax as sj
from sisajax.cli import main as cli
from sisajax.store.manifest import row_file


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    run, _ = sj.train(tiny_config(), tiny_digits(), tmp_path_factory.mktemp("base") / "run")
    return run.run_dir


@pytest.fixture
def victim(tmp_path):
    """Files and a folder outside the run that nothing may touch."""
    v = tmp_path / "victim"
    (v / "folder").mkdir(parents=True)
    (v / "folder" / "keep.txt").write_text("precious")
    (v / "file.txt").write_text("precious")
    return v


def _move_and_link(run_dir: Path, rel: str, victim: Path) -> None:
    """Replace a managed path of the run by a link to a copy of it outside the run."""
    src = run_dir / rel
    dst = victim / ("linked_" + src.name)
    shutil.move(src, dst)
    os.symlink(dst, src)


@pytest.mark.parametrize(
    "rel", ["checkpoints", "data", "MANIFEST.json", "ledger.jsonl", "results", "row", "data_file"]
)
def test_links_to_outside_are_refused_and_nothing_outside_is_touched(
    base_run, tmp_path, victim, rel, capsys
):
    run = copy_run(base_run, tmp_path / "run")
    sj.forget(run, pick(run, 0, 1))  # superseded files exist in history: GC would have work
    if rel == "row":
        ref = run.manifest.shards[1].rows[2]
        rel = row_file(1, 2, ref.generation)
    elif rel == "data_file":
        rel = run.manifest.shards[2].data.path
    elif rel == "results":
        (run.run_dir / "results").mkdir(exist_ok=True)
    _move_and_link(run.run_dir, rel, victim)
    outside = tree_bytes(victim)
    inside = tree_bytes(run.run_dir)
    for args in (
        ["forget", f"run_dir={run.run_dir}", f"ids=[{pick_safe(run)}]", "progress=false"],
        ["resume", f"run_dir={run.run_dir}", "progress=false"],
        ["evaluate", f"run_dir={run.run_dir}"],
        ["audit", f"run_dir={run.run_dir}"],
    ):
        code = cli(args)
        err = capsys.readouterr().err
        assert code in (1, 2) and len(err.strip().splitlines()) == 1, (args, err)
        assert "link" in err or "symbolic" in err or "missing" in err or "corrupt" in err
    assert tree_bytes(victim) == outside  # nothing outside the run was read-modified or deleted
    assert tree_bytes(run.run_dir) == inside


def pick_safe(run) -> int:
    return int(run.partition.ids[-1])


def test_run_dir_given_through_a_link_is_fine(base_run, tmp_path):
    run = copy_run(base_run, tmp_path / "real")
    os.symlink(run.run_dir, tmp_path / "alias")
    rep = sj.forget(sj.open_run(tmp_path / "alias"), pick(run, 2, 0))
    assert rep.generation == 1 and sj.audit(sj.open_run(tmp_path / "real")).ok


def test_foreign_entries_are_reported_left_alone_and_do_not_block(base_run, tmp_path, victim):
    run = copy_run(base_run, tmp_path / "run")
    os.symlink(victim / "folder", run.run_dir / "checkpoints" / "s000r000.g000009.row")
    os.symlink(victim / "file.txt", run.run_dir / "data" / "shard_000.g000009.npz")
    (run.run_dir / "data" / "notes").mkdir()
    (run.run_dir / "data" / "notes" / "mine.txt").write_text("user notes")
    (run.run_dir / "checkpoints" / "README").write_text("user file")
    outside = tree_bytes(victim)
    sj.forget(run, pick(run, 0, 0))
    sj.resume(run)
    assert tree_bytes(victim) == outside
    assert (run.run_dir / "data" / "notes" / "mine.txt").read_text() == "user notes"
    assert (run.run_dir / "checkpoints" / "README").is_file()
    rep = sj.audit(run)
    assert rep.ok, rep.problems  # foreign entries warn, they do not fail
    warned = " ".join(rep.warnings)
    for name in ("s000r000.g000009.row", "shard_000.g000009.npz", "notes", "README"):
        assert name in warned


def test_audit_sees_everything(base_run, tmp_path):
    cases = {
        "ledger_and_head_deleted": lambda d: [
            (d / "ledger.jsonl").unlink(),
            (d / "ledger.head").unlink(),
        ],
        "test_data_deleted": lambda d: next((d / "data").glob("test.*")).unlink(),
        "generation_not_an_int": lambda d: _edit_manifest(d, generation="x"),
        "orphan_pending_file": lambda d: [
            (d / "pending").mkdir(),
            (d / "pending" / "r.json").write_text("[3]"),
        ],
        "superseded_row_left": lambda d: (d / "checkpoints" / "s000r000.g000000.row").write_bytes(
            b"old"
        ),
    }
    for name, damage in cases.items():
        run = copy_run(base_run, tmp_path / name)
        sj.forget(run, pick(run, 1, 0))
        damage(run.run_dir)
        try:
            rep = sj.audit(sj.open_run(run.run_dir))
            ok = rep.ok
        except sj.SisajaxError as e:  # a malformed manifest: a clear error, exit code 1
            ok, rep = False, e
            assert e.exit_code in (1, 2) and "\n" not in str(e)
        assert not ok, name


def _edit_manifest(d: Path, **changes) -> None:
    m = json.loads((d / "MANIFEST.json").read_text())
    m.update(changes)
    (d / "MANIFEST.json").write_text(json.dumps(m))


@pytest.mark.parametrize("garbage", [b"", b"\x00\x01binary", b"[1, 2]", b'{"schema": 2}', b"{"])
def test_garbage_manifest_or_head_is_one_clear_line(base_run, tmp_path, garbage, capsys):
    run = copy_run(base_run, tmp_path / "run")
    sj.forget(run, pick(run, 1, 0))
    (run.run_dir / "ledger.head").write_bytes(garbage)
    assert cli(["audit", f"run_dir={run.run_dir}"]) == 1
    capsys.readouterr()
    (run.run_dir / "MANIFEST.json").write_bytes(garbage)
    for cmd in ("audit", "status", "evaluate", "forget"):
        args = [cmd, f"run_dir={run.run_dir}"] + (["ids=[1]"] if cmd == "forget" else [])
        code = cli(args)
        err = capsys.readouterr().err
        assert code in (1, 2) and len(err.strip().splitlines()) == 1 and "MANIFEST" in err


def _readonly(d: Path) -> list[str] | None:
    """A command prefix that runs a child with ``d`` read-only (a read-only bind mount in a
    private mount namespace when we are root, since root ignores permission bits; plain
    ``chmod a-w`` otherwise), or None when neither is possible here."""
    if os.geteuid() != 0:
        for p in [d, *d.rglob("*")]:
            p.chmod(stat.S_IMODE(p.stat().st_mode) & ~0o222)
        return []
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount --bind {d} {d} && mount -o remount,ro,bind {d}"],
        capture_output=True,
    )
    if probe.returncode != 0:
        return None
    script = f'mount --bind "{d}" "{d}" && mount -o remount,ro,bind "{d}" && exec "$@"'
    return ["unshare", "-m", "sh", "-c", script, "sh"]


@pytest.mark.slow
def test_readers_work_on_a_read_only_run(base_run, tmp_path):
    d = tmp_path / "ro"
    shutil.copytree(base_run, d)
    sj.forget(sj.open_run(d), [int(sj.open_run(d).partition.ids[0])])
    prefix = _readonly(d)
    if prefix is None:
        pytest.skip("cannot make a read-only directory here (root without mount namespaces)")
    before = tree_bytes(d)
    try:
        for cmd, code in (
            ("evaluate", 0),
            ("status", 0),
            ("audit", 0),
            ("verify", 0),
            ("forget", 1),
        ):
            args = [sys.executable, "-m", "sisajax.cli", cmd, f"run_dir={d}"]
            args += [f"ids=[{int(sj.open_run(d).partition.ids[1])}]"] if cmd == "forget" else []
            r = subprocess.run(
                prefix + args, env=cli_env(), capture_output=True, text=True, timeout=180
            )
            assert r.returncode == code, (cmd, r.stdout[-800:], r.stderr[-800:])
            assert "Traceback" not in r.stderr
            if code == 0:
                assert "read-only" in r.stdout  # results not written, and said so
            else:
                assert len(r.stderr.strip().splitlines()) == 1 and "read-only" in r.stderr
        assert tree_bytes(d) == before
    finally:
        for p in [d, *d.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)


def test_syncfs_is_looked_up_once_per_process(tmp_path, monkeypatch):
    """A training syncs once per slice step: finding libc's ``syncfs`` must not cost a
    subprocess (``ctypes.util.find_library`` runs ``ldconfig``) per call."""
    import ctypes.util

    from sisajax.store import files

    lookups: list[str] = []
    monkeypatch.setattr(ctypes.util, "find_library", lambda n: lookups.append(n) or "libc.so.6")
    files._syncfs_call.cache_clear()
    try:
        results = [files._syncfs(tmp_path) for _ in range(5)]
        assert files._syncfs_call.cache_info().misses == 1
        assert len(set(results)) == 1
        if sys.platform.startswith("linux"):  # glibc's own symbols hold syncfs: no search at all
            assert results[0] is True and lookups == []
    finally:
        files._syncfs_call.cache_clear()


def test_without_syncfs_the_new_files_and_their_folders_are_synced(tmp_path, monkeypatch):
    """Where ``syncfs`` is missing, making written files durable fsyncs each file and each
    folder holding one (a new file's name is in its folder: without that, a power cut could
    lose the names a committed manifest points to)."""
    from sisajax.store import files

    synced: list[tuple[str, Path]] = []
    monkeypatch.setattr(files, "_syncfs", lambda root: False)
    monkeypatch.setattr(files, "fsync_file", lambda p: synced.append(("file", Path(p))))
    monkeypatch.setattr(files, "fsync_dir", lambda p: synced.append(("dir", Path(p))))
    paths = []
    for rel in ("data/a.npz", "data/b.npz", "checkpoints/c.row"):
        p = tmp_path / rel
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"x")
        paths.append(p)
    files.sync_files(tmp_path, paths)
    assert sorted(p for kind, p in synced if kind == "file") == sorted(paths)
    assert sorted(p for kind, p in synced if kind == "dir") == sorted(
        [tmp_path / "checkpoints", tmp_path / "data"]
    )


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS])
def test_a_writer_on_a_run_it_cannot_write_is_told_what_still_works(tmp_path, monkeypatch, code):
    """Taking the writer lock is the first thing a command that changes a run does: when the
    run directory refuses writes (permission bits, a read-only mount) nothing has changed, so
    the one line says so and names the commands that work, not a `resume` to run."""
    from sisajax.errors import StorageError
    from sisajax.store import locks

    real_open = os.open

    def refusing(path, flags, *a, **kw):
        if flags & os.O_RDWR:
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(locks.os, "open", refusing)
    with pytest.raises(StorageError) as e, locks.writer_lock(tmp_path, 0.0):
        pass
    msg = str(e.value)
    assert "read-only to this process" in msg and "evaluate, status, audit and verify" in msg
    assert "resume" not in msg and len(msg.splitlines()) == 1


def test_a_manifest_naming_another_shards_data_or_odd_fields_is_refused(base_run):
    """A shard entry must name its own shard's data copy (another shard's would let a forget say
    done while a file that holds the id stays live), and origin, id_hashing and the dataset's
    preprocessing must be objects: anything else is a ManifestError, never a traceback."""
    from sisajax.store.manifest import ManifestError, parse_manifest

    good = json.loads((base_run / "MANIFEST.json").read_text())
    assert parse_manifest(good).shards[1].data.path.startswith("data/shard_001.")

    def bad(change):
        d = json.loads(json.dumps(good))
        change(d)
        with pytest.raises(ManifestError):
            parse_manifest(d)

    def swap(d):
        d["shards"][0]["data"] = dict(d["shards"][1]["data"])

    def future(d):
        d["shards"][0]["data"]["path"] = "data/shard_000.g000009.npz"

    bad(swap)
    bad(future)
    bad(lambda d: d.update(origin="ab"))
    bad(lambda d: d.update(origin={"request_id": [1]}))
    bad(lambda d: d.update(id_hashing=[1]))
    bad(lambda d: d["dataset"].update(preprocessing=[1, 2]))
