"""What the experiment kinds share: options, data preparation, run workspaces, result files.

Experiments are library code operating on composed config dicts (no Hydra, no command-line
imports); each kind lives in its own module (``shards``, ``slices``, ``requests``, ``dist_aware``,
``single``, ``accuracy``, ``tune``) with ``DEFAULTS``, ``run(rc, ds, opts, ws)``, ``report(res, png)``,
``ROW_KEYS`` (the row fields naming a configuration, for averaging over seeds) and optionally
``SEED_LOOP = True`` (``run`` trains every seed of ``opts["seeds"]`` itself; otherwise the driver
runs it once per seed with ``rc.sisa.seed`` set and merges the results).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from sisajax.config import ConfigError, RunConfig
from sisajax.costs import CostReport
from sisajax.data.datasets import Dataset
from sisajax.data.partition import Partition
from sisajax.errors import UserInputError
from sisajax.store.run_dir import remove_run_dir

COMMON_DEFAULTS: dict[str, Any] = {
    "kind": "single",
    "name": None,  # default: the kind
    "out_dir": None,  # default: outputs/paper/<name> (Hydra's job dir under -m)
    "keep_runs": False,  # keep the SISA run directories under <out>/runs
    "report": True,  # write report.md and the plot after the run
    # null: the top-level seed; a list: run every listed seed (wins over seed; see seeds.py)
    "seeds": None,
}
FEATURE_DEFAULTS: dict[str, Any] = {
    "extractor": None,  # null: train on the data set's features; cnn | mlp: transfer learning
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
    """An experiment option is unknown or invalid (exit code 2)."""


# An option of the kinds that read it (their DEFAULTS declare it): also train the S=1, R=1
# baseline on the same data. The others train their own full-model reference whatever it says.
FULL_BASELINE = "full_baseline"


def options(cfg: dict[str, Any], kinds: dict[str, Any]) -> dict[str, Any]:
    """The ``experiment`` section merged over the defaults of its kind; unknown keys fail, and so
    does an option the kind would ignore (``full_baseline`` where the kind always trains its own
    full-model reference)."""
    given = dict(cfg.get("experiment") or {})
    kind = given.get("kind", "single")
    if kind not in kinds:
        raise ExperimentError(f"experiment.kind must be one of {', '.join(kinds)}; got {kind!r}")
    allowed = {**COMMON_DEFAULTS, **kinds[kind].DEFAULTS}
    unknown = set(given) - set(allowed)
    if FULL_BASELINE in unknown:
        readers = [k for k, m in kinds.items() if FULL_BASELINE in m.DEFAULTS]
        raise ExperimentError(
            f"experiment.full_baseline is not read by experiment.kind={kind} (it always trains "
            f"its own full-model reference): remove it (kinds with the option: {', '.join(readers)})"
        )
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


def partition_digest(part: Partition) -> str:
    """16 hex digits naming a partition: which (shard, slice) every id is in."""
    h = hashlib.sha256()
    for a in (part.ids.astype("<i8"), part.shard.astype("<i4"), part.slice.astype("<i4")):
        h.update(a.tobytes())
    return h.hexdigest()[:16]


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


def prepare_data(rc: RunConfig, fopts: dict[str, Any]) -> tuple[Dataset, dict[str, Any]]:
    """Load ``rc.data`` (its own preprocessing included) and apply the ``features`` section.

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
    info.update(
        {
            "name": ds.name,
            "num_train": len(ds.train_ids),
            "num_test": len(ds.test_ids),
            "feature_shape": list(ds.feature_shape),
            "num_classes": ds.num_classes,
            "preprocessing": dict(ds.preprocessing),
            "summary": ds.summary(),
        }
    )
    log(f"data: {ds.summary()}")
    return ds, info


class Workspace:
    """Where one experiment's SISA run directories live (deleted at the end unless kept)."""

    def __init__(self, out: Path, keep: bool):
        self.root = out / "runs"
        self.keep = keep
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        """``runs/<name>``, emptied for a new run (only a sisajax run there is deleted)."""
        p = self.root / name
        remove_run_dir(p)
        return p

    def copy(self, src: Path, name: str) -> Path:
        """A fresh copy of a run directory (so each measurement starts from the same state)."""
        dst = self.path(name)
        shutil.copytree(src, dst)
        return dst

    def drop(self, p: Path) -> None:
        if not self.keep:
            remove_run_dir(p)

    def close(self) -> None:
        """Remove the runs made here (unless kept), and the folder when nothing else is in it."""
        if self.keep or not self.root.is_dir():
            return
        for p in self.root.iterdir():
            with contextlib.suppress(UserInputError):  # not a run: the user's, left alone
                remove_run_dir(p)
        with contextlib.suppress(OSError):
            self.root.rmdir()


def eval_row(ev: Any) -> dict[str, Any]:
    """Accuracy columns of an :class:`~sisajax.EvalReport` (ensemble and constituents)."""
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


def cost_cols(cost: CostReport, prefix: str) -> dict[str, Any]:
    return {
        f"{prefix}_examples": int(cost.examples),
        f"{prefix}_steps": int(cost.grad_steps),
        f"{prefix}_wall_s": float(cost.wall_s),
        f"{prefix}_compile_s": float(cost.compile_s),
        f"{prefix}_retrain_s": float(cost.retrain_s),
    }


def train_and_eval(
    rc: RunConfig, ds: Dataset, run_dir: Path, partition: Partition | None = None
) -> tuple[Any, dict[str, Any]]:
    """Train one SISA configuration and evaluate it; returns (run, row)."""
    import sisajax as sj

    run, cost = sj.train(rc, ds, run_dir, partition=partition, metrics=False)
    sizes = run.partition.sizes().sum(1)
    row = {
        "shards": rc.sisa.shards,
        "slices": rc.sisa.slices,
        "epochs": rc.sisa.epochs,
        "seed": rc.sisa.seed,
        "partition_digest": partition_digest(run.partition),
        "n_train": int(sizes.sum()),
        "shard_size_min": int(sizes.min()),
        "shard_size_max": int(sizes.max()),
        **eval_row(run.evaluate()),
        **cost_cols(cost, "train"),
    }
    log(
        f"S={rc.sisa.shards:>3} R={rc.sisa.slices:>3} seed={rc.sisa.seed}: vote {row['vote']:.4f}, "
        f"mean prob {row['mean_prob']:.4f}, one constituent {row['shard_mean']:.4f}; "
        f"train {cost.examples:,} examples in {cost.wall_s:.1f}s"
    )
    return run, row


def full_baseline(rc: RunConfig, ds: Dataset, ws: Workspace) -> dict[str, Any]:
    """The S = 1, R = 1 baseline on the same data (same model, optimizer, epochs, batch, seed)."""
    p = ws.path(f"full_seed{rc.sisa.seed}")
    _, row = train_and_eval(rc.replace(sisa={"shards": 1, "slices": 1}), ds, p)
    ws.drop(p)
    return row


def full_baselines(
    rc: RunConfig, ds: Dataset, ws: Workspace, seeds: list[int], rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """The full-retrain baseline of every seed (an S = 1, R = 1 row of that seed is reused).

    Returns:
      ``{"full": row}`` for one seed; for several, ``full`` averaged over seeds (``n``, ``*_sd``)
      and ``full_rows`` (one per seed).
    """
    from sisajax.experiments.seeds import mean_row

    fulls = []
    for seed in seeds:
        same = [r for r in rows if (r["shards"], r["slices"], r["seed"]) == (1, 1, seed)]
        fulls.append(same[0] if same else full_baseline(rc.replace(sisa={"seed": seed}), ds, ws))
    if len(fulls) == 1:
        return {"full": fulls[0]}
    return {"full": mean_row(fulls), "full_rows": fulls}


def stream_costs(costs: list[CostReport], full_examples: int) -> dict[str, Any]:
    """Summed cost columns of the requests served (``costs``: one per retrain)."""
    return {
        "shards_hit": int(sum(c.shards for c in costs)),
        "examples": int(sum(c.examples for c in costs)),
        "grad_steps": int(sum(c.grad_steps for c in costs)),
        "wall_s": float(sum(c.wall_s for c in costs)),
        "compile_s": float(sum(c.compile_s for c in costs)),
        "restore_s": float(sum(c.restore_s for c in costs)),
        "retrain_s": float(sum(c.retrain_s for c in costs)),
        "save_s": float(sum(c.save_s for c in costs)),
        "full_examples": int(full_examples),
    }


def serve_all(
    src: Path,
    stream: np.ndarray,
    ks: list[int],
    modes: list[str],
    ws: Workspace,
    tag: str,
    max_sequential: int | None = None,
) -> list[dict[str, Any]]:
    """Measure every (mode, K) on fresh copies of ``src`` with :func:`sisajax.serve_requests`:
    batched = one copy per K; sequential = one copy serving the longest stream one request at a
    time, read off at every K (up to ``max_sequential``)."""
    import sisajax as sj

    rows = []
    for mode in modes:
        if mode == "batched":
            for k in ks:
                p = ws.copy(src, f"{tag}_batched_K{k}")
                rep = sj.serve_requests(sj.open_run(p), stream[:k], "batched")
                rows.append(
                    {"mode": mode, "k": k, **stream_costs(rep.costs, rep.full_retrain_examples)}
                )
                ws.drop(p)
        else:
            seq_ks = [k for k in ks if max_sequential is None or k <= max_sequential]
            if not seq_ks:
                continue
            p = ws.copy(src, f"{tag}_sequential")
            rep = sj.serve_requests(sj.open_run(p), stream[: max(seq_ks)], "sequential")
            for k in seq_ks:
                full = sum(rep.full_per_request[:k])
                rows.append({"mode": mode, "k": k, **stream_costs(rep.costs[:k], full)})
            ws.drop(p)
        last = rows[-1]
        log(
            f"{tag} {mode} K={last['k']}: {last['examples']:,} examples, "
            f"{last['shards_hit']} shard retrains, {last['wall_s']:.1f}s"
        )
    return rows


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


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, str | int | float | bool | np.integer | np.floating)


def write_results(out: Path, results: dict[str, Any]) -> dict[str, str]:
    """``results.json`` (everything) and ``results.csv`` (scalar columns of the rows, plus the
    full-retrain baseline as a row with ``row=full``)."""
    (out / "results.json").write_text(json.dumps(jsonable(results), indent=1) + "\n")
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


def jsonable(obj: Any) -> Any:
    """Plain JSON types (NaN -> null, numpy -> Python)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating | float):
        return None if math.isnan(float(obj)) else float(obj)
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    return obj
