"""The main job (``make demo``): train SISA on digits, forget 10 random ids, compare with a full
retrain on the retained data, and print one table.

    python -m experiments.demo [hydra overrides, e.g. sisa.shards=8 num_forget=20]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np


def run_demo(cfg: dict[str, Any]) -> int:
    import sisajax as sj
    from experiments.cli import console, fmt_cost, progress_factory, run_config_of, table

    rc = run_config_of(cfg)
    root = Path(cfg["run_dir"]).absolute()
    if root.name == "default":
        root = root.parent / "demo"
    ds = sj.load_dataset(rc.data.name, **rc.data.params)
    console.print(f"[bold]data[/]: {ds.summary()}")
    console.print(
        f"[bold]SISA[/]: {rc.sisa.shards} shards x {rc.sisa.slices} slices, {rc.sisa.epochs:g} epochs, "
        f"batch {rc.sisa.batch_size}, {rc.model.name} {list(rc.model.hidden)}, "
        f"{rc.optim.name} lr={rc.optim.learning_rate}"
    )
    factory, bar = progress_factory(cfg["progress"])
    with bar:
        run, train_cost = sj.train(rc, ds, root / "sisa", overwrite=True, progress=factory)
        before = run.evaluate()
        rng = np.random.default_rng(cfg["seed"])
        ids = np.sort(rng.choice(run.partition.ids, size=cfg["num_forget"], replace=False))
        console.print(f"[bold]forgetting[/] {len(ids)} ids in one request: {ids.tolist()}")
        rep = sj.forget(run, ids, progress=factory)
        after = run.evaluate()
        full, full_cost = sj.full_retrain(run, root / "full_retrain", progress=factory)
        full_ev = full.evaluate()

    speedup = full_cost.wall_s / rep.cost.wall_s
    speedup_nc = (full_cost.wall_s - full_cost.compile_s) / max(
        rep.cost.wall_s - rep.cost.compile_s, 1e-9
    )
    rows = [
        ("test accuracy, SISA before forget", f"{before.accuracy:.4f}"),
        ("test accuracy, SISA after forget", f"{after.accuracy:.4f}"),
        ("test accuracy, full retrain (1 model)", f"{full_ev.accuracy:.4f}"),
        ("shards retrained (from slice)", ", ".join(f"{k}({j})" for k, j in rep.restart.items())),
        ("examples retrained: forget / full", f"{rep.cost.examples:,} / {full_cost.examples:,}"),
        (
            "examples ratio (full / forget)",
            f"{full_cost.examples / max(rep.cost.examples, 1):.1f}x",
        ),
        ("wall clock: forget", fmt_cost(rep.cost)),
        ("wall clock: full retrain", fmt_cost(full_cost)),
        ("speedup (wall clock, all in)", f"{speedup:.1f}x"),
        ("speedup (wall clock, compile excluded)", f"{speedup_nc:.1f}x"),
        (
            "analytic speedup, 1 uniform request",
            f"{sj.expected_speedup_single(rc.sisa.shards, rc.sisa.slices):.1f}x",
        ),
    ]
    console.print(table("SISA demo: unlearning vs full retrain", rows, ("", "value")))
    result = {
        "ids": ids.tolist(),
        "accuracy_before": before.to_dict(),
        "accuracy_after": after.to_dict(),
        "accuracy_full_retrain": full_ev.to_dict(),
        "train_cost": train_cost.to_dict(),
        "forget": rep.to_dict(),
        "full_retrain_cost": full_cost.to_dict(),
        "speedup_wall": speedup,
        "speedup_wall_no_compile": speedup_nc,
    }
    path = run.write_result("demo", result)
    console.print(f"runs in {root}; result: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from experiments.cli import compose, setup_jax

    setup_jax()
    return run_demo(compose(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
