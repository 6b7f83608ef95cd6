"""Seeds of the paper experiments: which seeds a job runs, and mean ± sd over seeds.

The rule, for every preset and every experiment kind:

* the top-level ``seed`` is the run's seed: the partition hash, the initialisation, the batch
  order and dropout of every SISA run the job trains (and of its full-retrain baseline);
* ``experiment.seeds`` is declared in every preset (default ``null``: just the top-level
  ``seed``); a list runs every listed seed in one job and wins over the top-level ``seed``, which
  the log line and the report header then say;
* ``experiment.seed`` (kinds that draw deletion requests or a deletion scenario: ``slices``,
  ``requests``, ``dist_aware``, ``single``) defaults to ``null``: the run's seed, so each seed gets
  its own stream; a number pins the stream for every seed;
* data preparation is not seeded by ``seed``: a generator's ``data.params.seed``, a split's
  ``split_seed`` and the transfer extractor's ``features.seed`` / ``features.public_seed`` keep
  the data set (and the frozen extractor) the same for every seed.

Every result row records ``seed`` (the run's seed it was trained with) and, where requests were
drawn, ``request_seed``. Results of one configuration with different seeds, from one job with a
list or from one Hydra job per seed (``sisajax paper -m ... seed=0,1,2``), merge into rows of
mean ± sample standard deviation (:func:`merge_runs`, :func:`aggregate_rows`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import numpy as np

from sisajax.config import ConfigError

# keys of a result dict that describe the job, not a measurement (kept from the first job)
JOB_KEYS = (
    "kind",
    "name",
    "experiment",
    "features",
    "config",
    "data",
    "machine",
    "versions",
    "created",
    "files",
)
# options that say where results go, not what is measured: ignored when matching configurations
_NOT_CONFIG = ("seeds", "out_dir", "keep_runs", "report")
# row fields that are seeds or identities, never averaged
_NOT_MEASURED = ("seed", "request_seed", "n")
# row fields that describe the configuration: copied when every seed has the same value
_SETTINGS = ("shards", "slices", "epochs", "k", "n_train", "probe_requests")


class SeedError(ConfigError):
    """``seed`` / ``experiment.seeds`` are invalid (exit code 2)."""


def _seed(v: Any, key: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int | np.integer) or int(v) < 0:
        raise SeedError(f"{key} must be a non-negative integer, got {v!r}")
    return int(v)


def resolve_seeds(cfg: dict[str, Any], opts: dict[str, Any]) -> tuple[list[int], dict[str, Any]]:
    """The seeds a job runs and how they were chosen.

    Args:
      cfg: the composed config (its top-level ``seed``, default 0).
      opts: the experiment options (``seeds``: null or a non-empty list of distinct seeds).

    Returns:
      ``(seeds, seeding)``: the run seeds in order, and a JSON-able record ``{"seeds", "from"
      ("seed" | "experiment.seeds"), "top_level_seed", "note"}`` for results.json and the header.
    """
    top = _seed(cfg.get("seed", 0), "seed")
    given = opts.get("seeds")
    if given is None:
        seeds, source = [top], "seed"
        note = f"seed {top} (the top-level seed; experiment.seeds is null)"
    else:
        if not isinstance(given, list | tuple) or not given:
            raise SeedError(
                f"experiment.seeds must be null or a non-empty list such as [0,1,2], got {given!r}"
            )
        seeds = [_seed(s, "experiment.seeds entries") for s in given]
        if len(set(seeds)) != len(seeds):
            raise SeedError(f"experiment.seeds lists a seed twice: {seeds}")
        source = "experiment.seeds"
        if seeds == [top]:
            note = f"seed {top} (experiment.seeds=[{top}], the top-level seed too)"
        else:
            listed = ", ".join(map(str, seeds))
            note = f"seeds {listed} from experiment.seeds, which wins over the top-level seed={top}"
    return seeds, {"seeds": seeds, "from": source, "top_level_seed": top, "note": note}


def request_seed(opts: dict[str, Any], run_seed: int) -> int:
    """The seed of a job's request stream or deletion scenario: ``experiment.seed``, or the run's
    seed when it is null (or absent)."""
    given = opts.get("seed")
    return int(run_seed) if given is None else _seed(given, "experiment.seed")


def stamp_seed(body: dict[str, Any], seed: int) -> dict[str, Any]:
    """Record ``seed`` in every row of a kind's results that does not carry one (in place)."""
    for row in body.get("rows", []):
        row.setdefault("seed", seed)
    for key in ("full", "trained"):
        if isinstance(body.get(key), dict):
            body[key].setdefault("seed", seed)
    for part in (body.get("partitions") or {}).values():
        part.setdefault("seed", seed)
    return body


def _number(v: Any) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)


def aggregate_rows(
    rows: list[dict[str, Any]],
    keys: str | tuple[str, ...] = (),
    fields: tuple[str, ...] | None = None,
) -> list[dict[str, Any]]:
    """Rows grouped by ``keys`` (rows that differ only in their seed), averaged over seeds.

    Args:
      rows: result rows, each with ``seed`` and the ``keys`` fields.
      keys: the fields naming a configuration (e.g. ``"shards"`` or ``("mode", "k")``; ``()``:
        all rows are one group).
      fields: the fields to average (default: every numeric field but the seeds and the
        settings, such as ``shards`` or ``n_train``, that every seed shares).

    Returns:
      one row per group, in order of first appearance (ascending for one numeric key): the key
      fields, per averaged field its mean and ``<field>_sd`` (sample standard deviation over
      seeds, 0 for one seed), ``n`` (rows) and ``seeds``; fields that are the same in every row
      of the group are copied; ``shard_size_min`` / ``shard_size_max`` are the extremes.
    """
    ks = (keys,) if isinstance(keys, str) else tuple(keys)
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[tuple(r.get(k) for k in ks)].append(r)
    order = list(groups)
    if len(ks) == 1 and all(_number(g[0]) for g in order):
        order.sort()
    out = []
    for value in order:
        g = groups[value]
        agg: dict[str, Any] = dict(zip(ks, value, strict=True))
        agg["n"] = len(g)
        agg["seeds"] = [r.get("seed") for r in g]
        names = fields
        if names is None:
            names = tuple(
                f
                for f in dict.fromkeys(f for r in g for f in r)
                if f not in ks
                and f not in _NOT_MEASURED
                and f not in ("shard_size_min", "shard_size_max")
                and not (f in _SETTINGS and all(r.get(f) == g[0].get(f) for r in g))
                and any(_number(r.get(f)) for r in g)
            )
        for f in names:
            vals = np.array([float(r[f]) for r in g if _number(r.get(f))], np.float64)
            vals = vals[np.isfinite(vals)]
            agg[f] = float(vals.mean()) if vals.size else float("nan")
            agg[f + "_sd"] = float(vals.std(ddof=1)) if vals.size > 1 else 0.0
        for f in dict.fromkeys(f for r in g for f in r):
            if f in agg or f.endswith("_sd") and f[:-3] in agg:
                continue
            first = g[0].get(f)
            if isinstance(first, list | dict):
                continue
            if all(r.get(f) == first for r in g):
                agg[f] = first
        for f, pick in (("shard_size_min", min), ("shard_size_max", max)):
            sizes = [r[f] for r in g if _number(r.get(f))]
            if sizes:
                agg[f] = int(pick(sizes))
        out.append(agg)
    return out


def mean_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row averaging ``rows`` (the same configuration, different seeds); see
    :func:`aggregate_rows`."""
    return aggregate_rows(rows, ())[0]


def result_seeds(res: dict[str, Any]) -> list[int]:
    """The run seeds a result dict holds (its ``seeding`` record, else its rows' seeds, else its
    config's seed: results written before seeds were recorded)."""
    seeding = res.get("seeding") or {}
    if seeding.get("seeds"):
        return [int(s) for s in seeding["seeds"]]
    found = [r["seed"] for r in res.get("rows", []) if isinstance(r.get("seed"), int)]
    if found:
        return list(dict.fromkeys(found))
    return [int(((res.get("config") or {}).get("sisa") or {}).get("seed", 0))]


def config_key(res: dict[str, Any]) -> str:
    """What identifies a configuration across seeds: the kind, name, options, features, data
    and run config, without the seeds and the output options."""
    cfg = json.loads(json.dumps(res.get("config") or {}))
    (cfg.get("sisa") or {}).pop("seed", None)
    exp = {k: v for k, v in (res.get("experiment") or {}).items() if k not in _NOT_CONFIG}
    return json.dumps(
        {
            "kind": res.get("kind"),
            "name": res.get("name"),
            "experiment": exp,
            "features": res.get("features"),
            "data": (res.get("data") or {}).get("name"),
            "config": cfg,
        },
        sort_keys=True,
        default=str,
    )


def _drop_seeds(rows: list[dict[str, Any]], seeds: set[int]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("seed") not in seeds]


# Values that must be the same in every merged job (the selection made on validation data, the
# test set's size): a merge of jobs that disagree would pair one job's choice with another's
# test results.
_SHARED_KEYS = ("chosen", "trials", "select_seeds", "n_test")
# Fields of a stored trial that time it (cost_cols' seconds): each process measures its own, so
# two jobs that ran the same trial differ in them and agree in everything else (which S, trial,
# parameters, seed, validation scores and counts, examples, gradient steps).
_TIMING_SUFFIXES = ("_wall_s", "_compile_s", "_retrain_s", "_restore_s", "_save_s")


def _work(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``trials`` without their timings: what two jobs that ran the same trials agree on."""
    return [{k: v for k, v in t.items() if not k.endswith(_TIMING_SUFFIXES)} for t in trials]


def _per_seed_trials(run: dict[str, Any]) -> bool:
    """Whether a job's trials were run per run seed (every trial's seed is one of the job's
    seeds, e.g. the unlearning study tunes each seed on its own), rather than on selection
    seeds shared by every job (the tune kind: its selection seeds are never a test seed)."""
    trials, own = run.get("trials") or [], set(result_seeds(run))
    return bool(trials) and all(t.get("seed") in own for t in trials)


def _merge_per_example(merged: dict[str, Any], kept: list[tuple[dict[str, Any], set[int]]]):
    """Per-example results of every merged job (so intervals and verdicts use all seeds, not the
    first job's): ``correct`` (keyed by configuration and seed) is the union, ``test_seeds`` the
    seeds in order; the values of :data:`_SHARED_KEYS` must agree. Trials are compared without
    their timings (:func:`_work`) and kept with the first job's; trials run per seed
    (:func:`_per_seed_trials`) are not shared: every job's are kept, a repeated seed's once.

    Raises:
      ConfigError: the jobs selected different recipes or used different test sets.
    """
    runs = [run for run, _ in kept]
    if any(_per_seed_trials(run) for run in runs):
        merged["trials"] = [
            t for run, dup in kept for t in run.get("trials") or [] if t.get("seed") not in dup
        ]
    for key in _SHARED_KEYS:
        if key == "trials" and "trials" in merged:
            continue
        values = [_work(run[key]) if key == "trials" else run[key] for run in runs if key in run]
        if values and any(v != values[0] for v in values[1:]):
            raise ConfigError(
                f"the jobs to merge differ in {key!r} (another selection or test set): they are "
                "not seeds of one experiment; rerun them as one job with experiment.seeds"
            )
        if values:
            merged[key] = next(run[key] for run in runs if key in run)  # the first job's
    stores = [(run.get("correct"), dup) for run, dup in kept if run.get("correct")]
    if stores:
        correct: dict[str, Any] = {}
        for store, dup in stores:
            for k, v in store.items():
                if k not in correct and not any(k.endswith(f"|seed{d}") for d in dup):
                    correct[k] = v
        merged["correct"] = correct
    if any("test_seeds" in run for run in runs):
        seeds: list[int] = []
        for run, dup in kept:
            seeds += [sd for sd in run.get("test_seeds", []) if sd not in seeds and sd not in dup]
        merged["test_seeds"] = seeds


def merge_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge results of one configuration with different seeds into one result dict.

    Args:
      runs: result dicts (a kind's ``run`` output, or whole ``results.json`` contents), each
        holding ``rows`` (every row with its ``seed``) and optionally ``full`` / ``full_rows``,
        ``trained``, ``partitions`` and other per-run values.

    Returns:
      ``rows``: every run's rows; ``full`` / ``trained``: rows averaged over seeds
      (:func:`mean_row`; ``n`` > 1) with the per-seed rows in ``full_rows`` / ``trained_rows``;
      ``partitions``: per partition the average and ``partition_rows`` the per-seed ones; other
      values from the first run and, per run, in ``per_seed``; shared selections (``chosen``,
      ``trials``: they must agree but for the trials' timings, which are the first run's) and
      per-example results (``correct``, ``test_seeds``: the union); ``seeding`` and
      ``merge_notes`` (say when a run repeated seeds already merged: counted once). A single
      run is returned as it is.
    """
    if len(runs) == 1:
        return runs[0]
    seen: set[int] = set()
    kept: list[tuple[dict[str, Any], set[int]]] = []
    notes: list[str] = []
    for i, run in enumerate(runs):
        own = set(result_seeds(run))
        dup = own & seen
        if dup:
            notes.append(
                f"run {i + 1} repeats seed(s) {sorted(dup)} already merged: counted once "
                "(experiment.seeds wins over the top-level seed)"
            )
        if own - seen:
            kept.append((run, dup))
        seen |= own
    if len(kept) == 1:
        return {**kept[0][0], "merge_notes": notes}
    first = kept[0][0]
    merged: dict[str, Any] = {k: first[k] for k in JOB_KEYS if k in first}
    merged["rows"] = [r for run, dup in kept for r in _drop_seeds(run.get("rows", []), dup)]
    fulls: list[dict[str, Any]] = []
    for run, dup in kept:
        fulls += _drop_seeds(
            run.get("full_rows") or ([run["full"]] if run.get("full") else []), dup
        )
    if fulls:
        base = [f for f in fulls if f.get("recipe") == fulls[0].get("recipe")]
        merged["full"] = mean_row(base)
        merged["full_rows"] = fulls
    trained = [
        run["trained"]
        for run, dup in kept
        if run.get("trained") and run["trained"].get("seed") not in dup
    ]
    if trained:
        merged["trained"] = mean_row(trained)
        merged["trained_rows"] = trained
    if first.get("partitions"):
        per_name: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for run, _ in kept:
            for name, p in (run.get("partitions") or {}).items():
                per_name[name].append(p)
        merged["partitions"] = {name: mean_row(ps) for name, ps in per_name.items()}
        merged["partition_rows"] = dict(per_name)
    _merge_per_example(merged, kept)
    handled = set(merged) | {"seeding", "merge_notes", "per_seed", "total_s"}
    for k, v in first.items():
        if k not in handled:
            merged[k] = v  # e.g. the accuracy study's deletion stream: the first run's
    merged["per_seed"] = [
        {"seeds": result_seeds(run), **{k: v for k, v in run.items() if k not in handled}}
        for run, _ in kept
    ]
    merged["total_s"] = float(sum(run.get("total_s") or 0.0 for run, _ in kept))
    seeds = [s for run, dup in kept for s in result_seeds(run) if s not in dup]
    merged["seeding"] = {
        "seeds": seeds,
        "from": "merged",
        "top_level_seed": (first.get("seeding") or {}).get("top_level_seed"),
        "note": f"seeds {', '.join(map(str, seeds))} (mean ± sd over {len(seeds)} seeds)",
    }
    merged["merge_notes"] = notes
    return merged
