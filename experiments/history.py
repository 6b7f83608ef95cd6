"""A run's history as tables and plots: training loss per shard and slice, the cost of every
forget request, and accuracy along a request stream (from ``metrics.jsonl``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from sisajax.experiments.report import fmt, plt, table
from sisajax.metrics import read_metrics


def history_report(run: Any) -> tuple[str, list[Path]]:
    """``(markdown, files written)`` for ``run`` (plots go to ``results/`` when writable)."""
    records = read_metrics(run.run_dir)
    loss = [r for r in records if r.get("event") == "train_slice" and r.get("loss") is not None]
    forgets = [r for r in records if r.get("event") == "forget"]
    stream = [r for r in records if r.get("event") == "stream_request"]
    lines = [f"# History of {run.run_dir}", ""]
    lines.append(
        f"{run.num_shards} shards x {run.num_slices} slices, generation {run.generation}; "
        f"{len(loss)} slice-step losses, {len(forgets)} forget requests, "
        f"{len(stream)} stream requests with accuracy."
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
    files: list[Path] = []
    if run.files.writable() and (loss or forgets or stream):
        folder = run.run_dir / "results"
        folder.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        png = folder / f"history-{stamp}.png"
        _plot(loss, forgets, stream, png)
        files.append(png)
        md = folder / f"history-{stamp}.md"
        md.write_text("\n".join(lines) + f"\n\n![history]({png.name})\n")
        files.append(md)
    elif not run.files.writable():
        lines += ["", "(read-only run directory: plots not written)"]
    return "\n".join(lines), files


def _plot(loss: list[dict], forgets: list[dict], stream: list[dict], png: Path) -> None:
    pyplot = plt()
    panels = [
        p
        for p in ("loss", "cost", "accuracy")
        if {"loss": loss, "cost": forgets, "accuracy": stream}[p]
    ]
    fig, axes = pyplot.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "loss":
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
            ax.legend(fontsize=8)
        elif panel == "cost":
            x = np.arange(1, len(forgets) + 1)
            ax.plot(x, [r["examples"] for r in forgets], "o-", label="examples retrained")
            ax.plot(x, [r["full_retrain_examples"] for r in forgets], "k--", label="full retrain")
            ax.set_yscale("log")
            ax.set_xlabel("forget request")
            ax.set_ylabel("examples")
            ax.set_title("cost per request")
            ax.legend(fontsize=8)
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
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    pyplot.close(fig)
