"""The main job (``make demo`` / ``sisajax demo``): what SISA buys, in one table and one plot.

Trains S constituent models on the Purchase-shaped generator (embedded, seeded), forgets one
random id (one request), then a batch of ids (one batched request), verifies that every retrained
shard is bit-identical to training it from scratch on the retained ids, trains the full-retrain
baseline (one model, same recipe) on the retained data, and compares wall clock and accuracy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def run_demo(cfg: dict[str, Any]) -> int:
    import sisajax as sj
    from sisajax.config import recipe_summary, run_config_from
    from sisajax.console import fmt_cost, print_table, progress_factory, say
    from sisajax.store.run_dir import remove_run_dir

    rc = run_config_from(cfg)
    k = cfg["num_forget"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        from sisajax.config import ConfigError

        raise ConfigError(f"num_forget must be an integer >= 1, got {k!r}")
    root = Path(cfg["run_dir"]).expanduser().absolute()
    for name in ("sisa", "full_retrain"):  # the demo's own runs: start from scratch
        remove_run_dir(root / name)  # a folder there that is not a run is refused, not deleted
    ds = sj.load_dataset(rc.data.name, **rc.data.params)
    s = rc.sisa
    say(f"data: {ds.summary()}")
    say(f"SISA: {s.shards} shards x {s.slices} slices; recipe: {recipe_summary(rc)}")
    factory, bar = progress_factory(cfg["progress"])
    rng = np.random.default_rng(np.random.SeedSequence([cfg["seed"], 0xDE30]))
    with bar:
        run, train_cost = sj.train(rc, ds, root / "sisa", progress=factory)
        before = run.evaluate()
        one = [int(rng.choice(run.partition.ids))]
        rep1 = sj.forget(run, one, progress=factory)
        batch = rng.choice(run.partition.ids, size=cfg["num_forget"], replace=False)
        rep_k = sj.forget(run, np.sort(batch).tolist(), progress=factory)
        after = run.evaluate()
        touched = sorted(set(rep1.restart) | set(rep_k.restart))
        ver = sj.verify(run, shards=touched)
        full, full_cost = sj.full_retrain(run, root / "full_retrain", progress=factory)
        full_ev = full.evaluate()

    def speed(c) -> str:
        return f"{full_cost.wall_s / c.wall_s:.1f}x"

    analytic = sj.expected_speedup_single(s.shards, s.slices)
    rows = [
        (
            "test accuracy: SISA before / after forgets",
            f"{before.accuracy:.4f} / {after.accuracy:.4f}",
        ),
        ("test accuracy: full retrain (1 model)", f"{full_ev.accuracy:.4f}"),
        ("training: SISA, all shards", fmt_cost(train_cost)),
        ("training: full retrain (1 model)", fmt_cost(full_cost)),
        (
            "forget 1 id (shard, from slice)",
            ", ".join(f"{k}, {j}" for k, j in rep1.restart.items()),
        ),
        ("  wall clock / speedup vs full retrain", f"{fmt_cost(rep1.cost)} / {speed(rep1.cost)}"),
        (
            "  examples: forget / full retrain",
            f"{rep1.cost.examples:,} / {rep1.full_retrain_examples:,} "
            f"({rep1.full_retrain_examples / max(rep1.cost.examples, 1):.1f}x; "
            f"expected for 1 uniform request {analytic:.1f}x)",
        ),
        (f"forget {len(batch)} ids in one request", f"{len(rep_k.restart)} shards retrained"),
        ("  wall clock / speedup vs full retrain", f"{fmt_cost(rep_k.cost)} / {speed(rep_k.cost)}"),
        (
            "verify: retrained shards vs from scratch",
            f"{sum(x.identical for x in ver.shards)}/{len(ver.shards)} bit-identical "
            f"(every slice checkpoint)"
            if ver.bitwise_meaningful
            else f"within {ver.tolerance:g}: {ver.ok}",
        ),
    ]
    print_table("SISA demo: exact unlearning vs retraining from scratch", rows, ("", "value"))
    png = root / "demo.png"
    _plot(png, train_cost, full_cost, rep1.cost, rep_k.cost, len(batch), before, after, full_ev)
    result = {
        "data": ds.summary(),
        "config": rc.to_dict(),
        "forget_one": rep1.to_dict(),
        "forget_batch": rep_k.to_dict(),
        "accuracy_before": before.to_dict(),
        "accuracy_after": after.to_dict(),
        "accuracy_full_retrain": full_ev.to_dict(),
        "train_cost": train_cost.to_dict(),
        "full_retrain_cost": full_cost.to_dict(),
        "speedup_wall_one": full_cost.wall_s / rep1.cost.wall_s,
        "speedup_wall_batch": full_cost.wall_s / rep_k.cost.wall_s,
        "verify": ver.to_dict(),
    }
    path = run.write_result("demo", result)
    say(f"runs in {root}; plot: {png}; result: {path}")
    return 0 if ver.ok else 1


def _plot(png, train_cost, full_cost, one, batch, k, before, after, full_ev) -> None:
    from sisajax.experiments.report import plt

    pyplot = plt()
    fig, (a1, a2) = pyplot.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    names = [
        "train SISA\n(all shards)",
        "full retrain\n(1 model)",
        "forget 1 id",
        f"forget {k} ids\n(1 request)",
    ]
    walls = [train_cost.wall_s, full_cost.wall_s, one.wall_s, batch.wall_s]
    bars = a1.bar(names, walls, color=["C0", "k", "C2", "C1"])
    for b, w in zip(bars, walls, strict=True):
        a1.text(b.get_x() + b.get_width() / 2, w, f"{w:.2f}s", ha="center", va="bottom", fontsize=8)
    a1.set_ylabel("wall clock (s)")
    a1.set_title("time")
    accs = [before.accuracy, after.accuracy, full_ev.accuracy]
    a2.bar(["SISA before", "SISA after", "full retrain"], accs, color=["C0", "C2", "k"])
    lo = max(0.0, min(accs) - 0.05)
    a2.set_ylim(lo, min(1.0, max(accs) + 0.02))
    for i, a in enumerate(accs):
        a2.text(i, a, f"{a:.4f}", ha="center", va="bottom", fontsize=8)
    a2.set_title("test accuracy")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    pyplot.close(fig)
