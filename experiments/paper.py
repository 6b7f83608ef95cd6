"""Paper reproduction (Bourtoule et al., "Machine Unlearning", S&P 2021): the experiment suite.

:func:`run_experiment` runs the kind named by ``experiment.kind`` (one module each: ``shards``,
``slices``, ``requests``, ``dist_aware``, ``single``, ``accuracy``, ``tune``, ``unlearning``) on the data set the config names, with the
data set's own preprocessing; a ``features`` section selects the transfer-learning setup of
:mod:`sisajax.features`. Outputs in the experiment's folder (``experiment.out_dir``,
``outputs/paper/<name>``, or Hydra's job folder under ``-m``): ``results.json``, ``results.csv``,
``report.md`` and ``<name>.png``. SISA run directories go to ``<out>/runs/`` and are deleted
afterwards unless ``experiment.keep_runs``.

Seeds (the rule is in :mod:`sisajax.experiments.seeds`): the top-level ``seed`` is the run's
seed; ``experiment.seeds`` (declared in every preset, default null) lists several seeds for one
job and then wins over ``seed``. Kinds that loop over seeds themselves (``SEED_LOOP``) get the
list; the others run once per seed and their results are merged (mean ± sd in the report). Every
row of ``results.json`` records the seed it was trained with; ``seeding`` records how the seeds
were chosen.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sisajax.experiments import (
    accuracy,
    dist_aware,
    requests,
    shards,
    single,
    slices,
    tune,
    unlearning,
)
from sisajax.experiments.common import (
    Workspace,
    feature_options,
    log,
    machine,
    options,
    output_dir,
    prepare_data,
    write_results,
)
from sisajax.experiments.seeds import merge_runs, resolve_seeds, stamp_seed

KINDS = {
    "single": single,
    "shards": shards,
    "slices": slices,
    "requests": requests,
    "dist_aware": dist_aware,
    "accuracy": accuracy,
    "tune": tune,
    "unlearning": unlearning,
}


def run_experiment(cfg: dict[str, Any], out_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the experiment ``cfg["experiment"]["kind"]`` and write its results.

    Args:
      cfg: a composed config (run groups ``data, model, optim, sisa, ledger``, a top-level
        ``seed``, and the ``experiment`` and ``features`` sections).
      out_dir: where results go (default: ``experiment.out_dir`` or ``outputs/paper/<name>``).

    Returns:
      the results dict also written to ``<out>/results.json`` (plus ``files``: what was written).
    """
    from sisajax.config import run_config_from
    from sisajax.experiments.report import make_report
    from sisajax.planning import library_versions

    t0 = time.perf_counter()
    opts = options(cfg, KINDS)
    fopts = feature_options(cfg)
    seeds, seeding = resolve_seeds(cfg, opts)
    rc = run_config_from(cfg).replace(sisa={"seed": seeds[0]})
    out = output_dir(opts, out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log(f"{opts['kind']} -> {out}; {seeding['note']}")
    ds, data_info = prepare_data(rc, fopts)
    ws = Workspace(out, bool(opts["keep_runs"]))
    kind = KINDS[opts["kind"]]
    try:
        if getattr(kind, "SEED_LOOP", False):
            body = kind.run(rc, ds, {**opts, "seeds": seeds}, ws)
        else:
            runs = []
            for seed in seeds:
                if len(seeds) > 1:
                    log(f"seed {seed}")
                rcs = rc.replace(sisa={"seed": seed})
                runs.append(stamp_seed(kind.run(rcs, ds, opts, ws), seed))
            body = merge_runs(runs)
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
        "seeding": seeding,
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
