"""What ``benchmarks.gpu`` writes beside its measurements: where a result came from, and the
Markdown table of a result (also read back by ``benchmarks.verdicts``)."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path
from typing import Any


def loop_train_s(loop: dict[str, Any]) -> float:
    """The per-shard loop's training seconds, its programs' compile left out (results stored
    before the compile was recorded hold only the wall, compile included)."""
    return float(loop.get("train_s", loop["wall_s"]))


def run_header() -> dict[str, Any]:
    """Where and from what a result came: host, load, command, library sources, git state."""
    from benchmarks.common import git_state, source_digest

    git = git_state()
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "sisajax_source_sha": source_digest(),
        "git_commit": git["commit"] or None,
        "git_dirty_files": git["dirty_files"],
    }


def summary(
    res: dict[str, Any], size: dict[str, Any], backend: str, jax_version: str, dry: bool
) -> str:
    """The Markdown table of what ``res`` holds (parts that failed or were skipped are named)."""
    import numpy as np

    from sisajax.costs import expected_cost_batched, expected_speedup_single

    s, r = size["shards"], size["slices"]
    rows: list[tuple[str, Any]] = []
    n = size["n"]
    if "program" in res:
        prog = res["program"]["rows"]
        rows += [
            (
                f"device time per step, chunk={p['chunk']} unroll={p['unroll']}, "
                f"width {p['width']} (us; per live step of the training, fill "
                f"{p.get('fill', float('nan')):.2f})",
                f"{p['us_per_step']:.1f} ({p.get('us_per_live_step', float('nan')):.1f})",
            )
            for p in prog
        ]
        p0 = next(p for p in prog if p["width"] == s)
        rows += [
            (
                "vmapped chunk HLO: instructions / fusions / scatter / conditional / gather",
                f"{p0['instructions']} / {p0['fusion']} / {p0['scatter']} / "
                f"{p0['conditional']} / {p0['gather']}",
            ),
            (
                "vmapped chunk loops: trip counts / kernels per iteration",
                f"{[lp['trip_count'] for lp in p0['loops']]} / "
                f"{[lp['kernels_per_iteration'] for lp in p0['loops']]}",
            ),
            (
                "chosen chunk, unroll (least device time per live step)",
                f"{size['chunk']}, {size.get('unroll', 1)}",
            ),
        ]
    if "train_vmap" in res:
        tv = res["train_vmap"]
        rows += [
            (
                "SISA vmap training wall s = compile + train + save",
                f"{tv['wall_s']:.2f} = {tv['compile_s']:.2f} + {tv['retrain_s']:.2f} + "
                f"{tv['wall_s'] - tv['compile_s'] - tv['retrain_s']:.2f}",
            ),
            ("vmap train ex/s", tv["examples_per_s"]),
        ]
        if "train_vmap_stored" in res:
            ts = res["train_vmap_stored"]
            rows.append(
                (
                    "the same, programs loaded from the program store (a later run): wall s = "
                    "compile + train + save (programs loaded)",
                    f"{ts['wall_s']:.2f} = {ts['compile_s']:.2f} + {ts['retrain_s']:.2f} + "
                    f"{ts['wall_s'] - ts['compile_s'] - ts['retrain_s']:.2f} "
                    f"({ts.get('programs_loaded', 0)})",
                )
            )
        for key, label in (
            ("train_map", "map train ex/s"),
            ("train_single", "one model ex/s, lax.map layout"),
            ("train_single_vmap", "one model ex/s, vmap layout"),
        ):
            if key in res:
                rows.append((label, res[key]["examples_per_s"]))
        if "train_map" in res:
            rows.append(
                (
                    "map / vmap (train time)",
                    res["train_map"]["retrain_s"] / max(tv["retrain_s"], 1e-9),
                )
            )
        if "train_loop" in res:
            rows.append(
                (
                    "per-shard loop / vmap (train time, compile excluded from both)",
                    loop_train_s(res["train_loop"]) / max(tv["retrain_s"], 1e-9),
                )
            )
        singles = [res[k] for k in ("train_single", "train_single_vmap") if k in res]
        if singles:
            best = min(singles, key=lambda c: c["wall_s"])
            rows.append(
                (
                    "SISA vmap wall / one model's wall (its fastest layout)",
                    tv["wall_s"] / max(best["wall_s"], 1e-9),
                )
            )
    if "forget_single" in res and "full_retrain" in res:
        steady = [c["wall_s"] - c["compile_s"] for c in res["forget_single"]]
        full_wall = res["full_retrain"]["wall_s"] - res["full_retrain"]["compile_s"]
        rows += [
            ("full retrain wall s (compile excluded)", full_wall),
            ("one-id forget: mean wall s (compile excluded)", float(np.mean(steady))),
            (
                "one-id forget speedup vs full retrain",
                full_wall / max(float(np.mean(steady)), 1e-9),
            ),
            ("analytic S*3R/(2R+1)", expected_speedup_single(s, r)),
        ]
        for k, c in res["forget_batched"].items():
            analytic = n / expected_cost_batched(n, s, r, int(k))
            rows.append(
                (
                    f"batched K={k} speedup (measured / analytic)",
                    f"{full_wall / max(c['wall_s'] - c['compile_s'], 1e-9):.2f} / {analytic:.2f}",
                )
            )
    if "verify" in res:
        v = res["verify"]
        rows.append(
            (
                "verify after forgets (every slice, bit for bit)",
                f"{v['bit_identical_shards']}/{v['shards']} identical, "
                f"max |diff| {v['max_abs_diff']:.3g}",
            )
        )
    if "resnet18" in res:
        rn = res["resnet18"]
        rows += [
            (
                f"ResNet-18 CIFAR-shaped, {rn['size']['epochs']:g} epochs: {label} wall s "
                "(compile / train)",
                f"{rn[key]['wall_s']:.2f} ({rn[key]['compile_s']:.2f} / "
                f"{rn[key]['retrain_s']:.2f}), accuracy {rn[key]['accuracy']:.3f}",
            )
            for key, label in (
                ("sisa_vmap", f"SISA S={rn['size']['shards']} vmap"),
                ("sisa_vmap_patches", f"SISA S={rn['size']['shards']} vmap, conv as patches"),
                ("sisa_map", f"SISA S={rn['size']['shards']} lax.map"),
                ("single", "one model"),
            )
            if key in rn
        ]
        for key in ("sisa_vmap", "sisa_vmap_patches", "sisa_map"):
            if key in rn and "single" in rn:
                rows.append(
                    (
                        f"ResNet-18: SISA {key[5:].replace('_', ', conv as ')} / one model, "
                        "wall (train only)",
                        f"{rn[key]['wall_s'] / max(rn['single']['wall_s'], 1e-9):.3f} "
                        f"({rn[key]['retrain_s'] / max(rn['single']['retrain_s'], 1e-9):.3f})",
                    )
                )
    rows.append(("total s", res.get("elapsed_s", float("nan"))))
    for name, err in res["errors"].items():
        rows.append((f"FAILED: {name}", err.replace("|", "/")[:200]))
    for name in res["skipped"]:
        rows.append((f"skipped (time budget): {name}", "-"))
    md = [
        "## gpu",
        "",
        f"Backend {backend} ({', '.join(res['devices'])}), jax {jax_version}, "
        f"python {platform.python_version()}, XLA_FLAGS `{res['xla_flags']}`"
        f"{' (dry run: tiny sizes)' if dry else ''}.",
        "",
        "| quantity | value |",
        "|---|---|",
    ]
    md += [f"| {a} | {b:,.4g} |" if isinstance(b, float) else f"| {a} | {b} |" for a, b in rows]
    return "\n".join(md) + "\n"
