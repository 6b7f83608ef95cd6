"""A run's history as tables and plots: training loss per program call (per slice step for runs
that predate those records), the cost of every forget request, accuracy along a request stream,
and the evaluations and verifications run on it (from ``metrics.jsonl``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from sisajax.experiments.report import fmt, integer_axis, plt, table
from sisajax.metrics import read_metrics


def history_report(run: Any) -> tuple[str, list[Path]]:
    """``(markdown, files written)`` for ``run`` (plots go to ``results/`` when writable)."""
    records = read_metrics(run.run_dir)
    chunks = _chunk_losses(records)
    loss = _events(records, "train_slice")
    loss = [r for r in loss if r.get("loss") is not None]
    forgets = _events(records, "forget")
    stream = _events(records, "stream_request")
    evals = _events(records, "evaluate")
    verifies = _events(records, "verify")
    lines = [f"# History of {run.run_dir}", ""]
    lines.append(
        f"{run.num_shards} shards x {run.num_slices} slices, generation {run.generation}; "
        f"{len(chunks)} per-call losses, {len(loss)} slice-step losses, {len(forgets)} forget "
        f"requests, {len(stream)} stream requests with accuracy, {len(evals)} evaluations, "
        f"{len(verifies)} verifications."
    )
    if forgets:
        lines += ["", "## Forget requests", ""]
        lines.append(
            table(
                [
                    "#",
                    "generation",
                    "ids",
                    "shards",
                    "examples retrained",
                    "full retrain examples",
                    "ratio",
                    "wall s",
                ],
                [
                    [
                        str(i),
                        str(r.get("generation")),
                        str(r.get("ids")),
                        str(r.get("shards")),
                        f"{r.get('examples', 0):,}",
                        f"{r.get('full_retrain_examples', 0):,}",
                        fmt(r["full_retrain_examples"] / r["examples"], ".1f")
                        if r.get("examples")
                        else "-",
                        fmt(r.get("wall_s"), ".2f"),
                    ]
                    for i, r in enumerate(forgets)
                ],
            )
        )
    if stream:
        acc = [r["accuracy"] for r in stream if r.get("accuracy") is not None]
        if acc:
            lines += [
                "",
                f"Accuracy along the stream: first {acc[0]:.4f}, last {acc[-1]:.4f}, "
                f"min {min(acc):.4f}, max {max(acc):.4f}.",
            ]
    for split in ("test", "val"):  # records without a split are test evaluations
        of_split = [e for e in evals if e.get("split", "test") == split]
        if of_split:
            e = of_split[-1]
            lines += [
                "",
                f"Last {'test' if split == 'test' else 'validation'} evaluation (generation "
                f"{e.get('generation')}): vote {fmt(e.get('vote_accuracy'))}, mean prob "
                f"{fmt(e.get('mean_prob_accuracy'))}.",
            ]
    if verifies:
        v = verifies[-1]
        lines += [
            "",
            f"Last verification (generation {v.get('generation')}): "
            f"{v.get('identical_shards')}/{v.get('verified_shards')} shards bit-identical, "
            f"{'ok' if v.get('ok') else 'FAILED'}.",
        ]
    files: list[Path] = []
    if run.files.writable() and (chunks or loss or forgets or stream):
        folder = run.run_dir / "results"
        folder.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        png = folder / f"history-{stamp}.png"
        fig = history_figure(records)
        try:
            fig.savefig(png, dpi=110)
        finally:
            plt().close(fig)
        files.append(png)
        md = folder / f"history-{stamp}.md"
        md.write_text("\n".join(lines) + f"\n\n![history]({png.name})\n")
        files.append(md)
    elif not run.files.writable():
        lines += ["", "(read-only run directory: plots not written)"]
    return "\n".join(lines), files


def _events(records: list[dict], event: str) -> list[dict]:
    return [r for r in records if r.get("event") == event]


def _chunk_losses(records: list[dict]) -> list[dict]:
    return [
        r
        for r in _events(records, "train_chunk")
        if r.get("loss") is not None and r.get("global_step") is not None
    ]


def history_figure(records: list[dict[str, Any]]) -> Any:
    """The history plot of a run's metrics records (a matplotlib Figure; the caller closes it).

    Panels, each when its records exist: training loss per program call of the first generation
    that has them (per slice step for older runs), examples retrained per forget request against
    a full retrain, and accuracy along a request stream. Counting axes get whole-number ticks.
    """
    chunks = _chunk_losses(records)
    loss = [r for r in _events(records, "train_slice") if r.get("loss") is not None]
    forgets = _events(records, "forget")
    stream = _events(records, "stream_request")
    pyplot = plt()
    panels = [
        p
        for p in ("loss", "cost", "accuracy")
        if {"loss": chunks or loss, "cost": forgets, "accuracy": stream}[p]
    ]
    n = max(len(panels), 1)
    fig, axes = pyplot.subplots(1, n, figsize=(5.5 * n, 4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=False):
        if panel == "loss" and chunks:
            _plot_chunk_loss(ax, chunks)
        elif panel == "loss":
            _plot_slice_loss(ax, loss)
        elif panel == "cost":
            _plot_cost(ax, forgets)
        else:
            pts = [
                (i + 1, r["accuracy"])
                for i, r in enumerate(stream)
                if r.get("accuracy") is not None
            ]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3)
            ax.set_xlabel("requests served")
            ax.set_ylabel("test accuracy (ensemble)")
            ax.set_title("accuracy along the request stream")
            integer_axis(ax)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _plot_chunk_loss(ax: Any, chunks: list[dict]) -> None:
    """Mean loss per example of every program call against the shard's gradient steps: one thin
    line per shard, the mean over shards of each (slice step, call) bold."""
    gen0 = min(r["generation"] for r in chunks)
    first = [r for r in chunks if r["generation"] == gen0]
    shards = sorted({r["shard"] for r in first})
    for k in shards:
        own = sorted((r["global_step"], r["loss"]) for r in first if r["shard"] == k)
        ax.plot([s for s, _ in own], [v for _, v in own], color="C0", alpha=0.25, lw=1)
    groups: dict[tuple[int, int], list[dict]] = {}
    for r in first:
        groups.setdefault((r["slice"], r["chunk"]), []).append(r)
    keys = sorted(groups)
    x = [float(np.mean([r["global_step"] for r in groups[g]])) for g in keys]
    y = [float(np.mean([r["loss"] for r in groups[g]])) for g in keys]
    ax.plot(x, y, "o-", ms=3, color="C0", label="mean over shards")
    ax.set_xlabel("gradient steps of the shard")
    ax.set_ylabel("mean training loss per program call")
    ax.set_title(f"training loss (generation {gen0}, {len(shards)} shards)")
    integer_axis(ax)
    ax.legend(fontsize=8)


def _plot_slice_loss(ax: Any, loss: list[dict]) -> None:
    """Mean loss of every slice step (runs recorded before per-call losses existed)."""
    gen0 = min(r["generation"] for r in loss)
    first = [r for r in loss if r["generation"] == gen0]
    shards = sorted({r["shard"] for r in first})
    slices = sorted({r["slice"] for r in first})
    grid = np.full((len(shards), len(slices)), np.nan)
    for r in first:
        grid[shards.index(r["shard"]), slices.index(r["slice"])] = r["loss"]
    for row in grid:
        ax.plot(slices, row, color="C0", alpha=0.25, lw=1)
    ax.plot(slices, np.nanmean(grid, 0), "o-", color="C0", label="mean over shards")
    ax.set_xlabel("slice step")
    ax.set_ylabel("mean training loss of the step")
    ax.set_title(f"training loss (generation {gen0}, {len(shards)} shards)")
    integer_axis(ax)
    ax.legend(fontsize=8)


def _plot_cost(ax: Any, forgets: list[dict]) -> None:
    """Examples retrained per request, and what a full retrain would take (a line across the
    panel when there is one request: a single point of a dashed line would not show)."""
    x = np.arange(1, len(forgets) + 1)
    ax.plot(x, [r["examples"] for r in forgets], "o-", label="examples retrained")
    full = [r["full_retrain_examples"] for r in forgets]
    if len(forgets) == 1:
        ax.axhline(full[0], color="k", ls="--", label="full retrain")
        ax.set_xlim(0.5, 1.5)
    else:
        ax.plot(x, full, "k--", label="full retrain")
    ax.set_yscale("log")
    ax.set_xlabel("forget request")
    ax.set_ylabel("examples")
    ax.set_title("cost per request")
    integer_axis(ax)
    ax.legend(fontsize=8)
