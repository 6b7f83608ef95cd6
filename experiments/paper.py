"""Paper reproduction (Bourtoule et al., "Machine Unlearning", S&P 2021): the experiment suite.

One entry point, :func:`run_experiment`, dispatches on ``experiment.kind``:

  * ``shards``: accuracy vs S (both aggregations from one evaluate, and the "one constituent model
    on 1/S of the data" baseline = the per-shard accuracies).
  * ``slices``: accuracy vs R at fixed S with recalibrated epochs, and the measured cost of single
    deletion requests vs the analytic speed-up S * 3R / (2R + 1).
  * ``requests``: retraining cost vs the number of requests K, sequential and batched, measured
    (examples, wall clock) and predicted (``sisajax.costs``), against the full retrain.
  * ``dist_aware``: the paper's Algorithm 1 (distribution-aware sharding) vs uniform hash sharding
    with the same number of shards under a skewed request distribution.
  * ``single``: one configuration (the job of ``sisajax sweep -m sisa.shards=1,2,5 ...``): train,
    evaluate, optionally serve ``k`` requests, compare with a full retrain.

Every kind also trains the full-retrain baseline (S = 1, R = 1 on the same data). A top-level
``features`` section selects the transfer-learning setup of :mod:`sisajax.features` (a frozen
extractor pretrained on a public split; SISA trains heads on the features) or a plain input scale.

Outputs in the experiment's directory (Hydra's job directory under ``sisajax sweep``; otherwise
``experiment.out_dir`` or ``outputs/paper/<name>``): ``results.json`` (config, data, every row,
baselines, timings, machine), ``results.csv`` (the rows' scalar columns), ``report.md`` and
``<name>.png`` (by :func:`make_report`, also what ``sisajax report <dir>`` runs). SISA run
directories go to ``<out>/runs/`` and are deleted afterwards unless ``experiment.keep_runs``.

    python -m experiments.paper experiment=shards [overrides, e.g. experiment.shards=[1,5]]
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sisajax.config import ConfigError, RunConfig
from sisajax.data.datasets import Dataset
from sisajax.data.partition import Partition
from sisajax.run import SisaRun

KINDS = ("single", "shards", "slices", "requests", "dist_aware")

COMMON_DEFAULTS: dict[str, Any] = {
    "kind": "single",
    "name": None,  # default: the kind
    "out_dir": None,  # default: outputs/paper/<name> (Hydra's job dir under `sisajax sweep`)
    "keep_runs": False,  # keep the SISA run directories under <out>/runs
    "full_baseline": True,  # also train the S=1, R=1 baseline on the same data
    "report": True,  # write report.md and the plot after the run
}
KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "single": {"k": 0, "mode": "batched", "distribution": "uniform", "seed": 0},
    "shards": {"shards": [1, 2, 5, 10, 20]},
    "slices": {"slices": [1, 2, 5, 10, 20], "probe_requests": 3, "seed": 0},
    "requests": {
        "k": [1, 2, 5, 8, 10, 18, 20, 50],
        "modes": ["batched", "sequential"],
        "max_sequential": None,  # serve the sequential stream only up to this K (null: all)
        "distribution": "uniform",
        "seed": 0,
    },
    "dist_aware": {
        # groups: [{fraction, p}] = share of the training ids and per-id deletion probability
        # (the paper's SVHN scenario); or a request_weights distribution: exponential, pareto
        "scenario": "groups",
        "groups": [
            {"fraction": 0.7717, "p": 3.0e-6},
            {"fraction": 0.1001, "p": 3.0e-5},
            {"fraction": 0.1282, "p": 6.0e-6},
        ],
        "target_shards": 19,  # sets the bound C = sum(p) / target_shards (ignored if bound set)
        "bound": None,  # C, expected deletions per shard, in units of p
        "k": [1, 5, 10, 20],
        "modes": ["batched", "sequential"],
        "seed": 0,
    },
}
FEATURE_DEFAULTS: dict[str, Any] = {
    "extractor": None,  # null: train on the (scaled) raw features; cnn | mlp: transfer learning
    "input_scale": None,  # e.g. 1/255: raw pixels -> [0, 1] (ignored with an extractor)
    "public_fraction": 0.1,  # share of training ids held out as the public pretraining split
    "public_seed": 0,
    "conv_features": [16, 32],
    "hidden": [],
    "embed_dim": 64,
    "epochs": 5,
    "batch_size": 64,
    "learning_rate": 1.0e-3,
    "seed": 0,
}


class ExperimentError(ConfigError):
    """An experiment option is unknown or invalid (a ConfigError: the CLI prints it in one line)."""


def options(cfg: dict[str, Any]) -> dict[str, Any]:
    """The ``experiment`` section merged over the defaults of its kind; unknown keys fail."""
    given = dict(cfg.get("experiment") or {})
    kind = given.get("kind", "single")
    if kind not in KINDS:
        raise ExperimentError(f"unknown experiment.kind {kind!r}; use one of {KINDS}")
    allowed = {**COMMON_DEFAULTS, **KIND_DEFAULTS[kind]}
    unknown = set(given) - set(allowed)
    if unknown:
        raise ExperimentError(
            f"unknown options for experiment.kind={kind}: {sorted(unknown)} (known: {sorted(allowed)})"
        )
    opts = {**allowed, **given}
    opts["name"] = opts["name"] or kind
    modes = list(opts.get("modes", [])) + ([opts["mode"]] if "mode" in opts else [])
    bad = [m for m in modes if m not in ("batched", "sequential")]
    if bad:
        raise ExperimentError(f"unknown request modes {bad}; use batched or sequential")
    for key in ("shards", "slices", "k"):
        if isinstance(opts.get(key), list) and not opts[key]:
            raise ExperimentError(f"experiment.{key} must list at least one value")
    return opts


def feature_options(cfg: dict[str, Any]) -> dict[str, Any]:
    """The ``features`` section merged over :data:`FEATURE_DEFAULTS`; unknown keys fail."""
    given = dict(cfg.get("features") or {})
    unknown = set(given) - set(FEATURE_DEFAULTS)
    if unknown:
        raise ExperimentError(
            f"unknown features options {sorted(unknown)} (known: {sorted(FEATURE_DEFAULTS)})"
        )
    return {**FEATURE_DEFAULTS, **given}


def log(msg: str) -> None:
    print(f"[paper] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Data


def prepare_data(rc: RunConfig, fopts: dict[str, Any]) -> tuple[Dataset, dict[str, Any]]:
    """Load ``rc.data`` and apply the ``features`` section.

    Returns:
      ``(dataset, info)``: what SISA trains on and a JSON-able description (sizes, extractor
      stats and fingerprint when transfer learning is on).
    """
    import sisajax as sj
    from sisajax import features as F

    t0 = time.perf_counter()
    ds = sj.load_dataset(rc.data.name, **rc.data.params)
    info: dict[str, Any] = {"source": ds.summary(), "load_s": time.perf_counter() - t0}
    if fopts["extractor"]:
        ec = F.ExtractorConfig(
            name=fopts["extractor"],
            conv_features=tuple(fopts["conv_features"]),
            hidden=tuple(fopts["hidden"]),
            embed_dim=int(fopts["embed_dim"]),
            epochs=int(fopts["epochs"]),
            batch_size=int(fopts["batch_size"]),
            learning_rate=float(fopts["learning_rate"]),
            seed=int(fopts["seed"]),
        )
        ds, _, stats = F.transfer_dataset(
            ds, ec, float(fopts["public_fraction"]), int(fopts["public_seed"])
        )
        info["extractor"] = {"config": ec.to_dict(), **stats}
        log(
            f"extractor {ec.name}: pretrained on {stats['public_examples']} public ids in "
            f"{stats['pretrain_s']:.1f}s (its own test accuracy {stats['test_accuracy']:.4f}); "
            f"features extracted in {stats['extract_s']:.1f}s"
        )
    elif fopts["input_scale"] is not None:
        ds = F.scale_features(ds, float(fopts["input_scale"]))
    info.update(
        {
            "name": ds.name,
            "num_train": len(ds.train_ids),
            "num_test": len(ds.test_ids),
            "feature_shape": list(ds.feature_shape),
            "num_classes": ds.num_classes,
            "summary": ds.summary(),
        }
    )
    log(f"data: {ds.summary()}")
    return ds, info


# ---------------------------------------------------------------------------------------------
# Helpers shared by the kinds


class Workspace:
    """Where one experiment's SISA run directories live (deleted at the end unless kept)."""

    def __init__(self, out: Path, keep: bool):
        self.root = out / "runs"
        self.keep = keep
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        p = self.root / name
        if p.exists():
            shutil.rmtree(p)
        return p

    def copy(self, src: Path, name: str) -> Path:
        """A fresh copy of a run directory (so each measurement starts from the same state)."""
        dst = self.path(name)
        shutil.copytree(src, dst)
        return dst

    def drop(self, p: Path) -> None:
        if not self.keep and p.exists():
            shutil.rmtree(p)

    def close(self) -> None:
        if not self.keep and self.root.exists():
            shutil.rmtree(self.root)


def _eval_row(ev: Any) -> dict[str, Any]:  # ev: sisajax.EvalReport
    acc = np.array([a for a in ev.shard_accuracy if a == a], dtype=np.float64)
    return {
        "vote": ev.vote_accuracy,
        "mean_prob": ev.mean_prob_accuracy,
        "shard_mean": float(acc.mean()) if acc.size else float("nan"),
        "shard_sd": float(acc.std()) if acc.size else float("nan"),
        "shard_min": float(acc.min()) if acc.size else float("nan"),
        "shard_max": float(acc.max()) if acc.size else float("nan"),
        "shard_accuracy": [float(a) for a in ev.shard_accuracy],
    }


def _cost_cols(cost: Any, prefix: str) -> dict[str, Any]:
    return {
        f"{prefix}_examples": int(cost.examples),
        f"{prefix}_steps": int(cost.grad_steps),
        f"{prefix}_wall_s": float(cost.wall_s),
        f"{prefix}_compile_s": float(cost.compile_s),
        f"{prefix}_retrain_s": float(cost.retrain_s),
    }


def train_and_eval(
    rc: RunConfig, ds: Dataset, run_dir: Path, partition: Partition | None = None
) -> tuple[SisaRun, dict[str, Any]]:
    """Train one SISA configuration and evaluate it; returns (run, row)."""
    import sisajax as sj

    run, cost = sj.train(rc, ds, run_dir, overwrite=True, partition=partition)
    sizes = run.partition.sizes().sum(1)
    row = {
        "shards": rc.sisa.shards,
        "slices": rc.sisa.slices,
        "epochs": rc.sisa.epochs,
        "n_train": int(sizes.sum()),
        "shard_size_min": int(sizes.min()),
        "shard_size_max": int(sizes.max()),
        **_eval_row(run.evaluate()),
        **_cost_cols(cost, "train"),
    }
    log(
        f"S={rc.sisa.shards:>3} R={rc.sisa.slices:>3}: vote {row['vote']:.4f}, mean prob "
        f"{row['mean_prob']:.4f}, one constituent {row['shard_mean']:.4f}; "
        f"train {cost.examples:,} examples in {cost.wall_s:.1f}s"
    )
    return run, row


def full_baseline(rc: RunConfig, ds: Dataset, ws: Workspace) -> dict[str, Any]:
    """The S = 1, R = 1 baseline on the same data (same model, optimizer, epochs, batch, seed)."""
    p = ws.path("full")
    _, row = train_and_eval(rc.replace(sisa={"shards": 1, "slices": 1}), ds, p)
    ws.drop(p)
    return row


def request_stream(ids: np.ndarray, k: int, distribution: str, seed: int) -> np.ndarray:
    """``[k]`` seeded request ids from ``sisajax.requests`` (the first K of it are "K requests")."""
    from sisajax.requests import sample_requests

    return sample_requests(ids, k, distribution, seed)


# ---------------------------------------------------------------------------------------------
# Kinds


def exp_single(rc: RunConfig, ds: Dataset, opts: dict[str, Any], ws: Workspace) -> dict[str, Any]:
    """One configuration: train, evaluate, optionally serve ``k`` requests and full-retrain."""
    import sisajax as sj
    from sisajax.requests import serve_requests

    run, row = train_and_eval(rc, ds, ws.path("sisa"))
    out: dict[str, Any] = {"rows": [row]}
    if opts["k"]:
        ids = request_stream(run.partition.ids, int(opts["k"]), opts["distribution"], opts["seed"])
        stream = serve_requests(run, ids, opts["mode"])
        t = stream.total
        row.update(
            {
                "k": int(opts["k"]),
                "mode": opts["mode"],
                "shards_hit": int(t.shards),
                **_cost_cols(t, "forget"),
                "full_examples": int(stream.full_retrain_examples),
                "speedup_examples": stream.full_retrain_examples / max(t.examples, 1),
            }
        )
        row.update({f"after_{k}": v for k, v in _eval_row(run.evaluate()).items()})
    if opts["full_baseline"]:
        full, full_cost = sj.full_retrain(run, ws.path("full"))
        fr = {
            "shards": 1,
            "slices": 1,
            **_eval_row(full.evaluate()),
            **_cost_cols(full_cost, "train"),
        }
        out["full"] = fr
        if opts["k"]:
            n_req = int(opts["k"]) if opts["mode"] == "sequential" else 1
            row["full_wall_s"] = fr["train_wall_s"] * n_req
            row["speedup_wall"] = row["full_wall_s"] / max(row["forget_wall_s"], 1e-9)
    return out


def exp_shards(rc: RunConfig, ds: Dataset, opts: dict[str, Any], ws: Workspace) -> dict[str, Any]:
    """Accuracy vs S at the configured R (both aggregations, per-shard baseline)."""
    rows = []
    for s in opts["shards"]:
        p = ws.path(f"S{s}")
        _, row = train_and_eval(rc.replace(sisa={"shards": int(s)}), ds, p)
        rows.append(row)
        ws.drop(p)
    out: dict[str, Any] = {"rows": rows}
    if opts["full_baseline"]:
        same = [r for r in rows if r["shards"] == 1 and r["slices"] == 1]
        out["full"] = same[0] if same else full_baseline(rc, ds, ws)
    return out


def expected_single_request(sizes: np.ndarray, epochs: float, batch_size: int) -> float:
    """Expected examples retrained by one uniformly drawn request on an actual partition.

    Args:
      sizes: ``[S, R]`` ids per (shard, slice) (``Partition.sizes()``).
      epochs, batch_size: the run's e and B.

    Returns:
      sum over (shard k, slice j) of ``n_kj / N * cost(restart shard k at slice j without the
      point)``, with the exact step schedule (rounding included).
    """
    from sisajax.costs import slice_schedule_cost

    n = sizes.sum()
    total = 0.0
    for k in range(sizes.shape[0]):
        for j in range(sizes.shape[1]):
            if sizes[k, j]:
                left = sizes[k : k + 1].copy()
                left[0, j] -= 1  # the request's point is gone
                ex, _ = slice_schedule_cost(left, epochs, batch_size, np.array([j]))
                total += sizes[k, j] / n * ex
    return float(total)


def exp_slices(rc: RunConfig, ds: Dataset, opts: dict[str, Any], ws: Workspace) -> dict[str, Any]:
    """Accuracy vs R at fixed S (recalibrated epochs) and the cost of single requests."""
    import sisajax as sj
    from sisajax.costs import expected_speedup_single, full_retrain_cost

    rows = []
    for r in opts["slices"]:
        p = ws.path(f"R{r}")
        run, row = train_and_eval(rc.replace(sisa={"slices": int(r)}), ds, p)
        n_probe = int(opts["probe_requests"])
        if n_probe:
            ids = request_stream(run.partition.ids, n_probe, "uniform", opts["seed"])
            reps = [sj.forget(run, [int(i)]) for i in ids]  # one request at a time
            ex = float(np.mean([x.cost.examples for x in reps]))
            full_ex = float(np.mean([x.full_retrain_examples for x in reps]))
            row.update(
                {
                    "probe_requests": n_probe,
                    "forget_examples_mean": ex,
                    "forget_wall_s_mean": float(np.mean([x.cost.wall_s for x in reps])),
                    "forget_retrain_s_mean": float(np.mean([x.cost.retrain_s for x in reps])),
                    "full_examples": full_ex,
                    "speedup_examples": full_ex / max(ex, 1.0),
                }
            )
        row["predicted_speedup"] = expected_speedup_single(rc.sisa.shards, int(r))
        row["partition_expected_examples"] = expected_single_request(
            run.partition.sizes(), rc.sisa.epochs, rc.sisa.batch_size
        )
        row["partition_expected_speedup"] = (
            full_retrain_cost(row["n_train"] - 1, rc.sisa.epochs, rc.sisa.batch_size)[0]
            / row["partition_expected_examples"]
        )
        row["predicted_examples"] = (
            full_retrain_cost(row["n_train"], rc.sisa.epochs, rc.sisa.batch_size)[0]
            / row["predicted_speedup"]
        )
        rows.append(row)
        ws.drop(p)
    out: dict[str, Any] = {"rows": rows}
    if opts["full_baseline"]:
        out["full"] = full_baseline(rc, ds, ws)
    return out


def _serve(run_dir: Path, ids: np.ndarray, mode: str) -> list[Any]:
    """Serve ``ids`` on the run at ``run_dir``: one ForgetReport per retrain."""
    import sisajax as sj

    run = sj.open_run(run_dir)
    if mode == "batched":
        return [sj.forget(run, [int(i) for i in ids])]
    return [sj.forget(run, [int(i)]) for i in ids]


def _measured(reps: list[Any]) -> dict[str, Any]:
    return {
        "shards_hit": int(sum(len(r.restart) for r in reps)),
        "examples": int(sum(r.cost.examples for r in reps)),
        "grad_steps": int(sum(r.cost.grad_steps for r in reps)),
        "wall_s": float(sum(r.cost.wall_s for r in reps)),
        "compile_s": float(sum(r.cost.compile_s for r in reps)),
        "restore_s": float(sum(r.cost.restore_s for r in reps)),
        "retrain_s": float(sum(r.cost.retrain_s for r in reps)),
        "save_s": float(sum(r.cost.save_s for r in reps)),
        "full_examples": int(sum(r.full_retrain_examples for r in reps)),
    }


def _serve_all(
    src: Path,
    stream: np.ndarray,
    ks: list[int],
    modes: list[str],
    ws: Workspace,
    tag: str,
    max_sequential: int | None = None,
) -> list[dict[str, Any]]:
    """Measure every (mode, K) on fresh copies of ``src``: batched = one copy per K; sequential =
    one copy serving the longest stream one request at a time, read off at every K (up to
    ``max_sequential``)."""
    rows = []
    for mode in modes:
        if mode == "batched":
            for k in ks:
                p = ws.copy(src, f"{tag}_batched_K{k}")
                rows.append({"mode": mode, "k": k, **_measured(_serve(p, stream[:k], mode))})
                ws.drop(p)
        elif mode == "sequential":
            seq_ks = [k for k in ks if max_sequential is None or k <= max_sequential]
            if not seq_ks:
                continue
            p = ws.copy(src, f"{tag}_sequential")
            reps = _serve(p, stream[: max(seq_ks)], mode)
            for k in seq_ks:
                rows.append({"mode": mode, "k": k, **_measured(reps[:k])})
            ws.drop(p)
        else:
            raise ExperimentError(f"unknown mode {mode!r}; use batched or sequential")
        last = rows[-1]
        log(
            f"{tag} {mode} K={last['k']}: {last['examples']:,} examples, "
            f"{last['shards_hit']} shard retrains, {last['wall_s']:.1f}s"
        )
    return rows


def exp_requests(rc: RunConfig, ds: Dataset, opts: dict[str, Any], ws: Workspace) -> dict[str, Any]:
    """Retraining cost vs K (sequential and batched), measured and predicted, vs full retrain."""
    import sisajax as sj
    from sisajax import costs

    ks = sorted(int(k) for k in opts["k"])
    src = ws.path("sisa")
    run, trained = train_and_eval(rc, ds, src)
    stream = request_stream(run.partition.ids, max(ks), opts["distribution"], opts["seed"])
    full_run, full_cost = sj.full_retrain(run, ws.path("full"))
    full = {
        "shards": 1,
        "slices": 1,
        **_eval_row(full_run.evaluate()),
        **_cost_cols(full_cost, "train"),
    }
    ws.drop(full_run.run_dir)
    rows = _serve_all(src, stream, ks, list(opts["modes"]), ws, "sisa", opts["max_sequential"])
    s, r, e, n = rc.sisa.shards, rc.sisa.slices, rc.sisa.epochs, trained["n_train"]
    for row in rows:
        k = row["k"]
        if row["mode"] == "batched":
            row["predicted_examples"] = e * costs.expected_cost_batched(n, s, r, k)
            row["predicted_shards_hit"] = costs.expected_shards_hit(s, k)
            row["predicted_speedup"] = e * n / row["predicted_examples"]
            n_full = 1
        else:
            row["predicted_examples"] = k * e * (n / s) * (2 * r + 1) / (3 * r)
            row["predicted_shards_hit"] = float(k)
            row["predicted_speedup"] = costs.expected_speedup_single(s, r)
            n_full = k
        row["speedup_examples"] = row["full_examples"] / max(row["examples"], 1)
        row["full_wall_s"] = full["train_wall_s"] * n_full
        row["full_compile_s"] = full["train_compile_s"] * n_full
        row["speedup_wall"] = row["full_wall_s"] / max(row["wall_s"], 1e-9)
        row["speedup_wall_no_compile"] = (row["full_wall_s"] - row["full_compile_s"]) / max(
            row["wall_s"] - row["compile_s"], 1e-9
        )
    ws.drop(src)
    return {"rows": rows, "trained": trained, "full": full, "requests": stream.tolist()}


def deletion_probabilities(ids: np.ndarray, opts: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """``([N] per-id deletion probability, [N] group index or None)`` for a dist_aware scenario."""
    from sisajax.data.partition import uniform_hash
    from sisajax.requests import request_weights

    ids = np.asarray(ids, np.int64)
    if opts["scenario"] == "groups":
        groups = opts["groups"]
        frac = np.array([float(g["fraction"]) for g in groups])
        p = np.array([float(g["p"]) for g in groups])
        if (frac <= 0).any() or (p < 0).any():
            raise ExperimentError("groups need fraction > 0 and p >= 0")
        u = uniform_hash(ids, int(opts["seed"]), stream=0x6A0)
        g = np.minimum(np.searchsorted(np.cumsum(frac) / frac.sum(), u, side="right"), len(p) - 1)
        return p[g], g
    return request_weights(ids, opts["scenario"], int(opts["seed"])), None


def weighted_stream(ids: np.ndarray, probs: np.ndarray, k: int, seed: int) -> np.ndarray:
    """``[k]`` distinct ids drawn without replacement with probability proportional to ``probs``."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xD15A]))
    return rng.choice(np.asarray(ids), size=k, replace=False, p=probs / probs.sum())


def exp_dist_aware(
    rc: RunConfig, ds: Dataset, opts: dict[str, Any], ws: Workspace
) -> dict[str, Any]:
    """Algorithm 1 vs uniform hash sharding with the same S, under skewed requests."""
    from sisajax.data.partition import distribution_aware_partition, hash_partition

    ids = np.sort(ds.train_ids)
    probs, groups = deletion_probabilities(ids, opts)
    total = float(probs.sum())
    bound = float(opts["bound"]) if opts["bound"] else total / int(opts["target_shards"])
    r, seed = rc.sisa.slices, rc.sisa.seed
    aware = distribution_aware_partition(ids, probs, bound, r, seed)
    s = aware.num_shards
    parts = {"uniform": hash_partition(ids, s, r, seed), "dist_aware": aware}
    ks = sorted(int(k) for k in opts["k"])
    stream = weighted_stream(ids, probs, max(ks), int(opts["seed"]))
    log(f"Algorithm 1: bound C={bound:.3g} (sum p = {total:.3g}) -> {s} shards")
    rcs = rc.replace(sisa={"shards": s})
    rows, partitions = [], {}
    e = rc.sisa.epochs
    for name, part in parts.items():
        src = ws.path(name)
        _, trained = train_and_eval(rcs, ds, src, partition=part)
        sizes = part.sizes().sum(1)
        share = np.bincount(part.shard, weights=probs, minlength=s) / total  # request mass
        partitions[name] = {
            **trained,
            "sizes": sizes.tolist(),
            "request_share": share.tolist(),
            "size_median": float(np.median(sizes)),
            "expected_deletions_max": float(share.max()),
        }
        for row in _serve_all(src, stream, ks, list(opts["modes"]), ws, name):
            k = row["k"]
            if r == 1:  # expected cost from the partition itself (independent draws)
                if row["mode"] == "batched":
                    hit = 1 - (1 - share) ** k
                    row["predicted_examples"] = float(e * (sizes * hit).sum())
                    row["predicted_shards_hit"] = float(hit.sum())
                else:
                    row["predicted_examples"] = float(k * e * (share * sizes).sum())
                    row["predicted_shards_hit"] = float(k)
            row["speedup_examples"] = row["full_examples"] / max(row["examples"], 1)
            rows.append({"partition": name, "shards": s, "slices": r, **row})
        ws.drop(src)
    out: dict[str, Any] = {
        "rows": rows,
        "partitions": partitions,
        "bound": bound,
        "probability_sum": total,
        "requests": stream.tolist(),
    }
    if groups is not None:
        out["groups"] = [
            {**g, "ids": int((groups == i).sum())} for i, g in enumerate(opts["groups"])
        ]
    if opts["full_baseline"]:
        out["full"] = full_baseline(rc, ds, ws)
    return out


RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {
    "single": exp_single,
    "shards": exp_shards,
    "slices": exp_slices,
    "requests": exp_requests,
    "dist_aware": exp_dist_aware,
}


# ---------------------------------------------------------------------------------------------
# Entry point


def output_dir(opts: dict[str, Any], out_dir: str | Path | None = None) -> Path:
    """``out_dir`` (e.g. Hydra's job dir) > ``experiment.out_dir`` > ``outputs/paper/<name>``."""
    return Path(out_dir or opts["out_dir"] or Path("outputs/paper") / opts["name"]).absolute()


def machine() -> dict[str, Any]:
    import jax

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "backend": jax.default_backend(),
        "devices": len(jax.devices()),
        "loadavg": list(load),
    }


def run_experiment(cfg: dict[str, Any], out_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the experiment ``cfg["experiment"]["kind"]`` and write its results.

    Args:
      cfg: a composed config (run groups ``data, model, optim, sisa, ledger``; optional sections
        ``experiment`` and ``features``, see :data:`KIND_DEFAULTS` and :data:`FEATURE_DEFAULTS`).
      out_dir: where results go (default: ``experiment.out_dir`` or ``outputs/paper/<name>``).

    Returns:
      the results dict also written to ``<out>/results.json`` (plus ``files``: what was written).
    """
    from experiments.cli import run_config_of
    from sisajax.run import library_versions

    t0 = time.perf_counter()
    opts = options(cfg)
    fopts = feature_options(cfg)
    rc = run_config_of(cfg)
    out = output_dir(opts, out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log(f"{opts['kind']} -> {out}")
    ds, data_info = prepare_data(rc, fopts)
    ws = Workspace(out, bool(opts["keep_runs"]))
    try:
        body = RUNNERS[opts["kind"]](rc, ds, opts, ws)
    finally:
        ws.close()
    results = {
        "kind": opts["kind"],
        "name": opts["name"],
        "experiment": opts,
        "features": fopts,
        "config": rc.to_dict(),
        "data": data_info,
        **body,
        "total_s": time.perf_counter() - t0,
        "machine": machine(),
        "versions": library_versions(),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    files = write_results(out, results)
    if opts["report"]:
        files["report"] = str(make_report(out))
    results["files"] = files
    log(f"done in {results['total_s']:.0f}s: {', '.join(files.values())}")
    return results


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, str | int | float | bool | np.integer | np.floating)


def write_results(out: Path, results: dict[str, Any]) -> dict[str, str]:
    """``results.json`` (everything) and ``results.csv`` (scalar columns of the rows, plus the
    full-retrain baseline as a row with ``row=full``)."""
    (out / "results.json").write_text(json.dumps(_jsonable(results), indent=1) + "\n")
    rows = [{"row": "sisa", **r} for r in results.get("rows", [])]
    if results.get("full"):
        rows.append({"row": "full", **results["full"]})
    fields: list[str] = []
    for r in rows:
        fields += [k for k, v in r.items() if _scalar(v) and k not in fields]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: v for k, v in r.items() if k in fields})
    return {"json": str(out / "results.json"), "csv": str(out / "results.csv")}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating | float):
        return None if math.isnan(float(obj)) else float(obj)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return obj


# ---------------------------------------------------------------------------------------------
# Reports: markdown tables and plots from results.json files


def _f(v: Any, spec: str = ".4f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _recipe(res: dict[str, Any]) -> str:
    c = res["config"]
    m, o, s = c["model"], c["optim"], c["sisa"]
    feats = res.get("features") or {}
    ext = ""
    if feats.get("extractor"):
        x = res["data"].get("extractor", {})
        ext = (
            f"; frozen {feats['extractor']} extractor pretrained on {x.get('public_examples')} "
            f"public ids (its test accuracy {_f(x.get('test_accuracy'))})"
        )
    return (
        f"Data: {res['data']['summary']}{ext}. Model: {m['name']} hidden {m['hidden']} "
        f"{m['activation']}; {o['name']} lr {o['learning_rate']}, batch {s['batch_size']}, "
        f"{s['epochs']:g} epochs (recalibrated over slices), seed {s['seed']}. "
        f"Took {res['total_s']:.0f}s on {res['machine']['cpus']} CPU cores "
        f"(load {res['machine']['loadavg'][0]:.1f})."
    )


def _full_line(res: dict[str, Any]) -> str:
    f = res.get("full")
    if not f:
        return ""
    return (
        f"Full-retrain baseline (S=1, R=1, same data): accuracy {_f(f['vote'])}, "
        f"{f['train_examples']:,} examples, {f['train_wall_s']:.1f}s."
    )


def report_shards(res: dict[str, Any], png: Path) -> str:
    rows = res["rows"]
    body = [
        [
            str(r["shards"]),
            str(r["slices"]),
            f"{r['shard_size_min']:,}-{r['shard_size_max']:,}",
            _f(r["vote"]),
            _f(r["mean_prob"]),
            f"{_f(r['shard_mean'])} ({_f(r['shard_min'])}-{_f(r['shard_max'])})",
            f"{r['train_examples']:,}",
            _f(r["train_wall_s"], ".1f"),
        ]
        for r in rows
    ]
    md = _table(
        [
            "S",
            "R",
            "ids per shard",
            "vote",
            "mean prob",
            "one constituent on 1/S (mean, min-max)",
            "train examples",
            "train s",
        ],
        body,
    )
    _plot_accuracy(res, "shards", "number of shards S", png)
    return md


def report_slices(res: dict[str, Any], png: Path) -> str:
    rows = res["rows"]
    body = [
        [
            str(r["slices"]),
            _f(r["vote"]),
            _f(r["mean_prob"]),
            _f(r["shard_mean"]),
            f"{r['train_examples']:,}",
            _f(r["train_wall_s"], ".1f"),
            _f(r.get("forget_examples_mean"), ",.0f"),
            _f(r.get("speedup_examples"), ".1f"),
            _f(r.get("partition_expected_speedup"), ".1f"),
            _f(r["predicted_speedup"], ".1f"),
            _f(r.get("forget_wall_s_mean"), ".2f"),
        ]
        for r in rows
    ]
    s = rows[0]["shards"] if rows else "?"
    md = _table(
        [
            "R",
            "vote",
            "mean prob",
            "one constituent",
            "train examples",
            "train s",
            "1 request: examples retrained",
            f"speedup, mean of {rows[0].get('probe_requests', 0) if rows else 0} (examples)",
            "expected on this partition",
            f"formula S*3R/(2R+1), S={s}",
            "1 request: wall s",
        ],
        body,
    )
    _plot_slices(res, png)
    return md


def report_requests(res: dict[str, Any], png: Path) -> str:
    body = [
        [
            r["mode"],
            str(r["k"]),
            f"{r['shards_hit']} / {_f(r['predicted_shards_hit'], '.1f')}",
            f"{r['examples']:,}",
            _f(r["predicted_examples"], ",.0f"),
            f"{r['full_examples']:,}",
            f"{_f(r['speedup_examples'], '.2f')} / {_f(r['predicted_speedup'], '.2f')}",
            _f(r["wall_s"], ".1f"),
            _f(r["full_wall_s"], ".1f"),
            _f(r["speedup_wall"], ".2f"),
            _f(r["speedup_wall_no_compile"], ".2f"),
        ]
        for r in res["rows"]
    ]
    md = _table(
        [
            "mode",
            "K",
            "shard retrains (measured / expected)",
            "examples retrained",
            "expected",
            "full retrain(s) examples",
            "speedup in examples (measured / expected)",
            "SISA wall s",
            "full retrain wall s",
            "speedup wall",
            "speedup wall, compile excluded",
        ],
        body,
    )
    t = res["trained"]
    md += (
        f"\n\nSISA run: S={t['shards']}, R={t['slices']}, accuracy {_f(t['vote'])} (vote), "
        f"{_f(t['mean_prob'])} (mean prob); trained {t['train_examples']:,} examples in "
        f"{t['train_wall_s']:.1f}s. Batched: one retrain of every hit shard from its earliest "
        "affected slice, vs one full retrain. Sequential: one retrain per request, vs one full "
        "retrain per request; full-retrain wall clock measured once and multiplied."
    )
    _plot_requests(res, png)
    return md


def _one_request_costs(res: dict[str, Any], p: dict[str, Any]) -> tuple[str, str]:
    """(expected, median) examples of one request drawn from the skewed distribution, R = 1 only:
    it retrains its whole shard, e * n_k, with probability = the shard's request share."""
    if res["config"]["sisa"]["slices"] != 1:
        return "-", "-"
    e = res["config"]["sisa"]["epochs"]
    cost = e * np.asarray(p["sizes"], np.float64)
    share = np.asarray(p["request_share"], np.float64)
    order = np.argsort(cost)
    median = cost[order][np.searchsorted(np.cumsum(share[order]), 0.5)]
    return f"{(share * cost).sum():,.0f}", f"{median:,.0f}"


def report_dist_aware(res: dict[str, Any], png: Path) -> str:
    parts = res["partitions"]
    md = _table(
        [
            "partition",
            "S",
            "ids per shard (min / median / max)",
            "largest request share of a shard",
            "one request: expected examples",
            "one request: median examples",
            "vote",
            "mean prob",
            "one constituent (mean)",
        ],
        [
            [
                name,
                str(p["shards"]),
                f"{p['shard_size_min']:,} / {p['size_median']:,.0f} / {p['shard_size_max']:,}",
                _f(p["expected_deletions_max"], ".3f"),
                *_one_request_costs(res, p),
                _f(p["vote"]),
                _f(p["mean_prob"]),
                _f(p["shard_mean"]),
            ]
            for name, p in parts.items()
        ],
    )
    md += "\n\n" + _table(
        [
            "partition",
            "mode",
            "K",
            "shard retrains",
            "examples retrained (expected)",
            "speedup vs full (examples)",
            "wall s",
        ],
        [
            [
                r["partition"],
                r["mode"],
                str(r["k"]),
                str(r["shards_hit"]),
                f"{r['examples']:,} ({_f(r.get('predicted_examples'), ',.0f')})",
                _f(r["speedup_examples"], ".2f"),
                _f(r["wall_s"], ".1f"),
            ]
            for r in res["rows"]
        ],
    )
    if res.get("groups"):
        md += "\n\nGroups (share of ids, per-id deletion probability p): " + ", ".join(
            f"{g['ids']:,} ids at p={g['p']:g}" for g in res["groups"]
        )
    md += f"; bound C = {res['bound']:.3g} (sum of p = {res['probability_sum']:.3g})."
    _plot_dist_aware(res, png)
    return md


REPORTERS: dict[str, Callable[[dict[str, Any], Path], str]] = {
    "shards": report_shards,
    "slices": report_slices,
    "requests": report_requests,
    "dist_aware": report_dist_aware,
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_accuracy(res: dict[str, Any], key: str, xlabel: str, png: Path, ax=None) -> None:
    plt = _plt()
    rows = sorted(res["rows"], key=lambda r: r[key])
    x = [r[key] for r in rows]
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [r["vote"] for r in rows], "o-", label="SISA, majority vote")
    ax.plot(x, [r["mean_prob"] for r in rows], "s-", label="SISA, mean probability")
    ax.plot(x, [r["shard_mean"] for r in rows], "^--", label="one constituent on 1/S of the data")
    ax.fill_between(
        x, [r["shard_min"] for r in rows], [r["shard_max"] for r in rows], alpha=0.15, color="C2"
    )
    if res.get("full"):
        ax.axhline(res["full"]["vote"], color="k", ls=":", label="full model (S=1, R=1)")
    ax.set_xscale("log")
    ax.set_xticks(x, [str(v) for v in x])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{res['name']}: {res['data']['name']}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if own:
        fig.tight_layout()
        fig.savefig(png, dpi=110)
        plt.close(fig)


def _plot_slices(res: dict[str, Any], png: Path) -> None:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    _plot_accuracy(res, "slices", "number of slices R", png, ax=a1)
    rows = sorted(res["rows"], key=lambda r: r["slices"])
    x = [r["slices"] for r in rows]
    if all("speedup_examples" in r for r in rows):
        a2.plot(x, [r["speedup_examples"] for r in rows], "o-", label="measured (examples)")
    if all("partition_expected_speedup" in r for r in rows):
        a2.plot(
            x,
            [r["partition_expected_speedup"] for r in rows],
            "s:",
            label="expected on the run's partition (exact schedule)",
        )
    a2.plot(x, [r["predicted_speedup"] for r in rows], "k--", label="formula S*3R/(2R+1)")
    a2.set_xscale("log")
    a2.set_xticks(x, [str(v) for v in x])
    a2.set_xlabel("number of slices R")
    a2.set_ylabel("speedup of one request vs full retrain")
    a2.legend(fontsize=8)
    a2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _plot_requests(res: dict[str, Any], png: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, mode in enumerate(("batched", "sequential")):
        rows = sorted((r for r in res["rows"] if r["mode"] == mode), key=lambda r: r["k"])
        if not rows:
            continue
        k = [r["k"] for r in rows]
        c = f"C{i}"
        ax.plot(k, [r["speedup_examples"] for r in rows], "o-", color=c, label=f"{mode}: examples")
        ax.plot(k, [r["predicted_speedup"] for r in rows], "--", color=c, label=f"{mode}: expected")
        ax.plot(k, [r["speedup_wall"] for r in rows], "s:", color=c, label=f"{mode}: wall clock")
    ax.axhline(1.0, color="gray", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("number of deletion requests K")
    ax.set_ylabel("speedup vs retraining from scratch")
    t = res["trained"]
    ax.set_title(f"{res['data']['name']}: S={t['shards']}, R={t['slices']}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _plot_dist_aware(res: dict[str, Any], png: Path) -> None:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, p) in enumerate(res["partitions"].items()):
        a1.bar(
            np.arange(len(p["sizes"])) + 0.4 * i, p["sizes"], width=0.4, label=name, color=f"C{i}"
        )
    a1.set_xlabel("shard")
    a1.set_ylabel("training ids")
    a1.set_title("shard sizes")
    a1.legend(fontsize=8)
    styles = {"batched": "o-", "sequential": "s--"}
    for i, name in enumerate(res["partitions"]):
        for mode, st in styles.items():
            rows = sorted(
                (r for r in res["rows"] if r["partition"] == name and r["mode"] == mode),
                key=lambda r: r["k"],
            )
            if rows:
                k = [r["k"] for r in rows]
                a2.plot(
                    k, [r["examples"] for r in rows], st, color=f"C{i}", label=f"{name}, {mode}"
                )
                if all(r.get("predicted_examples") is not None for r in rows):
                    a2.plot(
                        k,
                        [r["predicted_examples"] for r in rows],
                        ":",
                        color=f"C{i}",
                        lw=1,
                        label=f"{name}, {mode}: expected",
                    )
    a2.set_xlabel("number of requests K (skewed distribution)")
    a2.set_ylabel("examples retrained")
    a2.set_title("retraining cost (one request stream; dotted: expectation)")
    a2.legend(fontsize=8)
    a2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _job_overrides(d: Path) -> str:
    p = d / ".hydra" / "overrides.yaml"
    if not p.is_file():
        return ""
    from omegaconf import OmegaConf

    return " ".join(str(o) for o in OmegaConf.to_container(OmegaConf.load(p)))


def report_singles(found: list[tuple[Path, dict[str, Any]]], root: Path) -> str:
    """One table over the jobs of a sweep (kind ``single``), and accuracy vs S if S varies."""
    body = []
    for d, res in found:
        r = res["rows"][0]
        full = res.get("full") or {}
        body.append(
            [
                str(d.relative_to(root)) or ".",
                _job_overrides(d) or "-",
                str(r["shards"]),
                str(r["slices"]),
                _f(r["vote"]),
                _f(r["mean_prob"]),
                _f(r["shard_mean"]),
                _f(r["train_wall_s"], ".1f"),
                _f(r.get("forget_examples"), ","),
                _f(r.get("speedup_examples"), ".2f"),
                _f(full.get("vote")),
            ]
        )
    md = _table(
        [
            "job",
            "overrides",
            "S",
            "R",
            "vote",
            "mean prob",
            "one constituent",
            "train s",
            "forget examples",
            "speedup (examples)",
            "full retrain accuracy",
        ],
        body,
    )
    shards = {res["rows"][0]["shards"] for _, res in found}
    if len(shards) > 1:
        merged = {
            "name": "sweep",
            "data": found[0][1]["data"],
            "rows": [res["rows"][0] for _, res in found],
            "full": found[0][1].get("full"),
        }
        _plot_accuracy(merged, "shards", "number of shards S", root / "sweep.png")
        md += "\n\n![accuracy vs S](sweep.png)"
    return md


def make_report(root: str | Path) -> Path:
    """Turn every ``results.json`` under ``root`` into ``root/report.md`` and PNG plots.

    Each experiment's plot is written next to its ``results.json`` as ``<name>.png``; the jobs of
    a sweep (kind ``single``) are merged into one table (and ``root/sweep.png`` when S varies).

    Raises:
      FileNotFoundError: no ``results.json`` under ``root``.
    """
    root = Path(root).absolute()
    found = []
    for p in sorted(root.rglob("results.json")):
        res = json.loads(p.read_text())
        if isinstance(res, dict) and res.get("kind") in KINDS:
            found.append((p.parent, res))
    if not found:
        raise FileNotFoundError(f"no experiment results.json under {root}")
    sections = [f"# Results under {root.name}\n"]
    singles = [(d, r) for d, r in found if r["kind"] == "single"]
    for d, res in found:
        if res["kind"] == "single":
            continue
        png = d / f"{res['name']}.png"
        md = REPORTERS[res["kind"]](res, png)
        rel = png.relative_to(root)
        where = d.relative_to(root)
        sections.append(
            f"## {res['name']} ({res['kind']}){'' if str(where) == '.' else f' - {where}'}\n\n"
            f"{_recipe(res)}\n\n{md}\n\n{_full_line(res)}\n\n![{res['name']}]({rel})\n"
        )
    if singles:
        sections.append(
            f"## Sweep ({len(singles)} jobs)\n\n{_recipe(singles[0][1])}\n\n"
            f"{report_singles(singles, root)}\n"
        )
    path = root / "report.md"
    path.write_text("\n".join(sections))
    return path


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m experiments.paper experiment=<preset> [overrides]``."""
    from experiments.cli import compose, setup_jax

    setup_jax()
    results = run_experiment(compose(sys.argv[1:] if argv is None else argv))
    if "report" in results["files"]:
        print(Path(results["files"]["report"]).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
