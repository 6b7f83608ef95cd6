"""``sisajax verify``: retrain shards from scratch and check the run's checkpoints are exact.

    sisajax verify run_dir=runs/a                     every shard
    sisajax verify run_dir=runs/a verify.shards=[0,2]  chosen shards
    sisajax verify run_dir=runs/a verify.sample=3      3 random shards (verify.seed=...)
    sisajax verify run_dir=runs/a verify.atol=1e-6     accept max |diff| <= 1e-6 (GPU without
                                                       deterministic flags)

Exit code 0 when every verified checkpoint is bit-identical (or within ``verify.atol``) and every
id fingerprint names the retained ids; 1 otherwise. Writes ``run_dir/results/verify.json``.
"""

from __future__ import annotations

from typing import Any

VERIFY_KEYS = ("shards", "sample", "seed", "atol", "workdir")


def _force_add(overrides: list[str]) -> list[str]:
    """``verify.x=...`` -> ``++verify.x=...``: works whether or not conf/config.yaml has a
    ``verify`` section (``++`` adds a missing key and overrides an existing one)."""
    out = []
    for o in overrides:
        bare = o.lstrip("+")
        out.append("++" + bare if bare.startswith("verify.") else o)
    return out


def verify_options(cfg: dict[str, Any]) -> dict[str, Any]:
    """The ``verify`` section with defaults; unknown keys fail."""
    from experiments.cli import UsageError

    given = dict(cfg.get("verify") or {})
    unknown = set(given) - set(VERIFY_KEYS)
    if unknown:
        raise UsageError(f"unknown verify options {sorted(unknown)} (known: {list(VERIFY_KEYS)})")
    opts = {"shards": None, "sample": None, "seed": 0, "atol": None, "workdir": None, **given}
    if opts["shards"] is not None and not isinstance(opts["shards"], list):
        opts["shards"] = [opts["shards"]]
    return opts


def cmd_verify(overrides: list[str]) -> int:
    """Compose the config, verify the run in ``run_dir``, print a table, return the exit code."""
    import sisajax as sj
    from experiments.cli import UsageError, check_against_run, compose, console, table
    from sisajax.verify import VerifyError, verify

    overrides = _force_add(overrides)
    cfg = compose(overrides)
    run = sj.open_run(cfg["run_dir"])
    check_against_run(overrides, cfg, run.manifest["config"])
    opts = verify_options(cfg)
    try:
        rep = verify(
            run,
            shards=opts["shards"],
            sample=opts["sample"],
            seed=int(opts["seed"]),
            workdir=opts["workdir"],
            atol=None if opts["atol"] is None else float(opts["atol"]),
        )
    except VerifyError as e:
        raise UsageError(str(e)) from e
    r = run.num_slices
    rows = []
    for s in rep.shards:
        diff = "-" if s.error else f"{s.max_abs_diff:.3g}"
        rows.append(
            (
                f"shard {s.shard}",
                s.status(rep.atol) + (f" ({s.error})" if s.error else ""),
                f"{sum(s.slice_identical)}/{r}",
                diff,
                "ok" if s.fingerprints_ok else "MISMATCH",
                str(s.n_ids),
            )
        )
    console.print(
        table(
            f"verify generation {rep.generation}: {rep.mode} retrain on {rep.backend}, "
            f"shard_exec={rep.shard_exec}",
            rows,
            ("shard", "checkpoints", "slices identical", "max |diff|", "fingerprints", "ids"),
        )
    )
    if not rep.versions_match:
        changed = sorted(
            k
            for k in set(rep.versions_now) | set(rep.versions_run)
            if rep.versions_now.get(k) != rep.versions_run.get(k)
        )
        console.print(
            "[yellow]library versions differ from the run's "
            f"({', '.join(changed)}): bit-identity is not expected[/]"
        )
    if not rep.partition_consistent:
        console.print("[bold red]the stored partition does not match the retained ids[/]")
    verdict = (
        "[bold green]OK[/]: every verified checkpoint matches a from-scratch retrain"
        if rep.ok
        else "[bold red]FAILED[/]: shards "
        + str(sorted(set(rep.mismatched_shards) | set(rep.fingerprint_mismatches)))
    )
    console.print(f"{verdict} ({rep.wall_s:.2f}s); result: {run.run_dir / 'results/verify.json'}")
    return 0 if rep.ok else 1
