"""Kind ``unlearning``: exact (SISA) and approximate unlearning scored against the right oracle.

For each seed and each forget set (``experiment.forget_sets``: K random ids, a whole class, a
coherent subpopulation, mislabelled canaries) on the training ids (the run's validation split
held out):

1. **Populations, one program each** (:mod:`sisajax.populations`): N single models trained on D
   (the models the approximate methods start from), two independent oracle populations of N
   single models retrained on D \\ F (the oracle and the noise floor), and for every SISA
   configuration ``(S, R)`` of ``experiment.sisa`` three populations of N ensembles on D \\ F:
   what exact unlearning produces (removing ids from a hash partition moves no other id, and a
   forget retrains the affected shards on the retained ids with the same keys), its oracle and
   a floor. One real run per configuration trains on D, forgets F with :func:`sisajax.forget`,
   is verified bit for bit against retraining from scratch, and gives the forget's measured
   cost.
2. **Methods** (``experiment.methods``, :mod:`sisajax.approx`, each with its ``conf/unlearn``
   defaults and budget): applied to all N models at once (``jax.vmap``); "none" is the model
   before unlearning and "retrain" the exact single-model baseline.
3. **Scores on the forget set** against the oracle of the same configuration (single models vs
   single models, ensembles vs ensembles): the unlearning challenge's forget quality F (with a
   bootstrap interval over forget examples and a permutation test against a second oracle
   draw, which covers the noise of drawing N models), a KLOM-style KL of margin histograms, a U-LiRA-style
   attack accuracy (shadows: half of each population; targets: the other half), each beside the
   oracle-vs-oracle floor measured the same way; utility = retain, validation and test accuracy
   against the oracle's. Costs in examples and gradient steps, and wall seconds.

Tuning, never on the evaluation forget set or the test split: every method gets the same number
of trials (``experiment.tune``: a grid per method over its conf/unlearn hyperparameters, at its
conf/unlearn budget; a study whose grids give the methods of ``experiment.methods`` different
numbers of trials, or that names a method sisajax does not know, is refused before training),
each scored on a *tuning* forget set of the same kind (disjoint ids) against that set's own
oracle population, by the challenge's forget quality times the retain and validation accuracy
relative to the oracle's. Every trial is stored.

The floor test runs ``experiment.floor_permutations`` permutations; the report corrects it over
seeds (Bonferroni), so a study with too few permutations for its seeds to ever reject (seeds /
(permutations + 1) >= 0.05) is refused (:func:`sisajax.forget_quality.floor_test_can_reject`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from sisajax.config import RunConfig
from sisajax.data.datasets import Dataset
from sisajax.experiments.common import ExperimentError, Workspace, log, partition_digest
from sisajax.experiments.unlearning_report import (  # the kind's report and tables
    headline,
    markers,
    report,  # noqa: F401 - the kind's report(res, png), called by the experiment runner
    summary,  # noqa: F401 - the per-(forget set, method) summary researchers read
)

DEFAULTS: dict[str, Any] = {
    "num_models": 32,  # N per population (the challenge used 512; >= 32 for a usable floor)
    "forget_sets": ["random", "class", "subpopulation", "canaries"],
    "forget_size": 20,  # K for random, subpopulation and canaries
    "methods": ["ft", "neggrad_plus", "scrub", "salun", "ssd", "l1_sparse"],
    "sisa": [[5, 1], [5, 4]],  # (S, R) configurations scored as points
    "retain_eval": 1000,  # retain ids scored for utility (a keyed sample)
    "tune": {},  # method -> {hparam: [values]}: the grid each method is tuned over
    # permutations of the floor test (its smallest p is 1 / (n + 1)); the Bonferroni correction
    # over seeds can reject only while seeds / (n + 1) < 0.05
    "floor_permutations": 100,
}
SEED_LOOP = True
ROW_KEYS = ("forget_set", "method")


def _forget_set(kind: str, ids, x, y, num_classes: int, k: int, key) -> dict[str, Any]:
    from sisajax.approx import forget_sets as fs

    if kind == "random":
        return {"ids": fs.random_ids(ids, k, key)}
    if kind == "class":
        cls, f = fs.random_class_ids(ids, y, key)
        return {"ids": f, "class": cls}
    if kind == "subpopulation":
        centre, f = fs.subpopulation_ids(ids, x, k, key)
        return {"ids": f, "centre": centre}
    if kind == "canaries":
        f, labels = fs.mislabelled_canaries(ids, y, k, num_classes, key)
        return {"ids": f, "labels": labels}
    raise ExperimentError(f"experiment.forget_sets: unknown kind {kind!r}")


def _phi(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    from sisajax.mia import prob_scaled_logit

    return prob_scaled_logit(probs, y)  # [N, M]


def _scores(
    u: np.ndarray, o: np.ndarray, floor: np.ndarray, seed: int, n_perm: int = 100, tests: int = 1
) -> dict[str, Any]:
    """Forget-quality scores of ``u [N, M]`` vs the oracle ``o [N, M]``, beside the floor
    ``floor [N, M]`` (a second oracle population) vs the same oracle; the floor test's p-value
    with ``n_perm`` permutations, to be corrected over ``tests`` seeds."""
    from sisajax.forget_quality import challenge_score_ci, floor_test, klom, ulira_accuracy

    def one(a: np.ndarray) -> dict[str, float]:
        f, lo, hi = challenge_score_ci(a, o, seed=seed)
        h = len(a) // 2
        truth = np.r_[np.ones(len(a) - h, bool), np.zeros(len(o) - h, bool)]
        acc = ulira_accuracy(a[:h], o[:h], np.concatenate([a[h:], o[h:]]), truth)
        return {"F": f, "F_lo": lo, "F_hi": hi, "klom": float(np.mean(klom(a, o))), "ulira": acc}

    got, base = one(u), one(floor)
    p = floor_test(u, floor, o, seed=seed, n_perm=n_perm, tests=tests)
    return {**got, **{f"floor_{k}": v for k, v in base.items()}, "floor_p": p}


def _utility(probs: dict[str, np.ndarray], ys: dict[str, np.ndarray]) -> dict[str, float]:
    return {f"{k}_acc": float((probs[k].argmax(-1) == ys[k]).mean()) for k in probs}


def run(rc: RunConfig, ds: Dataset, opts: dict[str, Any], ws: Workspace) -> dict[str, Any]:
    from sisajax.data.partition import key_word, validation_mask

    n = int(opts["num_models"])
    if n < 4:
        raise ExperimentError("experiment.num_models must be at least 4 (halves for U-LiRA)")
    if not rc.data.val_fraction > 0:
        raise ExperimentError(
            "the unlearning study tunes every method on the validation split: "
            "data.val_fraction must be > 0"
        )
    check_tuning(opts)
    check_floor_test(opts, len(opts["seeds"]))
    rows: list[dict[str, Any]] = []
    trials: list[dict[str, Any]] = []
    k = int(opts["forget_size"])
    for seed in [int(s) for s in opts["seeds"]]:
        val = validation_mask(ds.train_ids, rc.data.val_fraction, seed)
        ids, x, y = ds.train_ids[~val], ds.x_train[~val], ds.y_train[~val]
        evals = {"val": (ds.x_train[val], ds.y_train[val]), "test": (ds.x_test, ds.y_test)}
        for fi, kind in enumerate(opts["forget_sets"]):
            keys = [jax.random.PRNGKey(key_word(seed, 0xF0, fi, t) & 0x7FFFFFFF) for t in (0, 1)]
            fset = _forget_set(kind, ids, x, y, ds.num_classes, k, keys[0])
            # the tuning forget set: the same kind, drawn from the other ids
            rest = ~np.isin(ids, fset["ids"])
            tset = _forget_set(kind, ids[rest], x[rest], y[rest], ds.num_classes, k, keys[1])
            y_d = y
            if "labels" in fset:  # canaries (both sets): trained with their flipped labels
                from sisajax.approx.forget_sets import relabel

                y_d = relabel(ids, y, fset["ids"], fset["labels"])
                y_d = relabel(ids, y_d, tset["ids"], tset["labels"])
            gone, tune_gone = np.isin(ids, fset["ids"]), np.isin(ids, tset["ids"])
            rng = np.random.default_rng(key_word(seed, 0xE7A1, fi))
            kept = np.flatnonzero(~gone & ~tune_gone)
            kept = kept[rng.choice(len(kept), min(len(kept), int(opts["retain_eval"])), False)]
            sets = {"retain": (x[kept], y_d[kept]), **evals}
            study = Study(rc, ds, opts, ws, seed, kind, ids, x, y_d, sets)
            got, tried = study.run(gone, tune_gone)
            rows += got
            trials += tried
            log(f"seed {seed}, forget set {kind} ({int(gone.sum())} ids): done")
    return {"rows": rows, "trials": trials, "num_models": n}


class Study:
    """One seed and forget-set kind: the populations, the tuning and the scored rows."""

    def __init__(self, rc, ds, opts, ws, seed, kind, ids, x, y, sets):
        self.rc, self.ds, self.opts, self.ws, self.seed, self.kind = rc, ds, opts, ws, seed, kind
        self.ids, self.x, self.y, self.sets = ids, x, y, sets
        self.n = int(opts["num_models"])
        self.n_perm = int(opts["floor_permutations"])
        self.ys = {k: v[1] for k, v in sets.items()}

    def pop(self, cfg: RunConfig, keep: np.ndarray, salt: int):
        from sisajax.populations import train_population

        return train_population(
            cfg, self.ids[keep], self.x[keep], self.y[keep], self.ds.num_classes, self.n,
            seed=population_seed(self.seed, salt), preprocessing=self.ds.preprocessing,
        )  # fmt: skip

    def outputs(
        self, p, gone: np.ndarray, sets: tuple[str, ...] | None = None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``phi [N, F]`` on the forget examples and the mean probabilities on the utility sets
        named in ``sets`` (default: all; tuning reads only retain and validation)."""
        names = self.sets if sets is None else sets
        probs = {k: p.probs(self.sets[k][0]) for k in names}
        return _phi(p.probs(self.x[gone]), self.y[gone]), probs

    def row(self, method, got, oracle, floor_phi, cost, gone, shape=(1, 1)) -> dict[str, Any]:
        (phi, probs), (o_phi, o_probs) = got, oracle
        return {
            "seed": self.seed,
            "shards": shape[0],
            "slices": shape[1],
            "forget_set": self.kind,
            "forget_ids": int(gone.sum()),
            "method": method,
            **_scores(phi, o_phi, floor_phi, self.seed, self.n_perm, len(self.opts["seeds"])),
            **_utility(probs, self.ys),
            **{f"oracle_{k}": v for k, v in _utility(o_probs, self.ys).items()},
            **cost,
            "full_retrain_examples": self.full_examples,
        }

    def run(self, gone: np.ndarray, tune_gone: np.ndarray):
        single = self.rc.replace(sisa={"shards": 1, "slices": 1})
        every = np.ones(len(self.ids), bool)
        original = self.pop(single, every, 1)
        oracle, floor = self.pop(single, ~gone, 2), self.pop(single, ~gone, 3)
        # the exact baseline is a third oracle draw, so its floor test is a test (scored
        # against the floor population itself it would be at the floor by construction)
        retrain = self.pop(single, ~gone, 5)
        tune_oracle = self.pop(single, ~tune_gone, 4)
        o_out, fl_out = self.outputs(oracle, gone), self.outputs(floor, gone)
        self.full_examples = int(oracle.stats.examples // self.n)
        zero = {"examples": 0, "grad_steps": 0, "wall_s": 0.0}
        rows = [
            self.row("none", self.outputs(original, gone), o_out, fl_out[0], zero, gone),
            self.row("retrain", self.outputs(retrain, gone), o_out, fl_out[0],
                     {"examples": self.full_examples,
                      "grad_steps": int(retrain.stats.grad_steps // self.n),
                      "wall_s": retrain.wall_s / self.n}, gone),
        ]  # fmt: skip
        trials = []
        t_out = self.outputs(tune_oracle, tune_gone, TUNE_SETS)
        for name in self.opts["methods"]:
            grid = _grid(self.opts, name)
            scores = []
            for t, point in enumerate(grid):
                new, _, _ = _apply_method(name, point, original, self.x, self.y, tune_gone,
                                          population_seed(self.seed, 1000 + t))  # fmt: skip
                got = self.outputs(new, tune_gone, TUNE_SETS)
                score = _selection_score(got, t_out, self.ys) if _finite(got) else DIVERGED
                trials.append({"seed": self.seed, "forget_set": self.kind, "method": name,
                               "trial": t, "params": point, **score})  # fmt: skip
                scores.append(score["objective"])
            if max(scores) == DIVERGED["objective"]:
                log(f"{name}: every tuning trial diverged (non-finite outputs); not scored")
                continue
            point = grid[int(np.argmax(scores))]
            new, cost, wall = _apply_method(name, point, original, self.x, self.y, gone,
                                            population_seed(self.seed, 100))  # fmt: skip
            cost = {**cost, "wall_s": wall / self.n, "params": point}
            got = self.outputs(new, gone)
            if not _finite(got):
                log(f"{name}: diverged on the evaluation forget set (non-finite outputs)")
                continue
            rows.append(self.row(name, got, o_out, fl_out[0], cost, gone))
        for s, r in self.opts["sisa"]:
            cfg = self.rc.replace(sisa={"shards": int(s), "slices": int(r), "seed": self.seed})
            exact, e_oracle, e_floor = (self.pop(cfg, ~gone, 10 + i) for i in range(3))
            measured = _real_forget(cfg, self.ds, self.ids, self.x, self.y, self.ids[gone],
                                    self.ws, self.seed)  # fmt: skip
            rows.append(
                self.row(f"SISA S={s} R={r}", self.outputs(exact, gone),
                         self.outputs(e_oracle, gone), self.outputs(e_floor, gone, ())[0],
                         measured, gone, (int(s), int(r)))
            )  # fmt: skip
        return rows, trials


def check_tuning(opts: dict[str, Any]) -> None:
    """Refuse, before anything trains, a study that would tune its methods unequally: a method
    (in ``experiment.methods`` or a key of ``experiment.tune``) sisajax does not know (a
    misspelt grid would leave its method one default trial), or grids that give the methods of
    ``experiment.methods`` different numbers of trials. Grids of known methods the study does
    not run are ignored."""
    from sisajax.approx import METHODS

    known = ", ".join(METHODS)
    methods = [str(m) for m in opts["methods"]]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ExperimentError(f"experiment.methods: unknown {bad} (known: {known})")
    bad = sorted(str(m) for m in (opts.get("tune") or {}) if m not in METHODS)
    if bad:
        raise ExperimentError(f"experiment.tune: unknown methods {bad} (known: {known})")
    sizes = {m: len(_grid(opts, m)) for m in methods}
    if len(set(sizes.values())) > 1:
        given = ", ".join(f"{m} {n}" for m, n in sizes.items())
        raise ExperimentError(
            f"experiment.tune gives the methods unequal tuning budgets ({given} trials): "
            "give every method of experiment.methods a grid of the same size"
        )


def check_floor_test(opts: dict[str, Any], seeds: int) -> None:
    """Refuse a study whose floor test could never reject after the report's Bonferroni
    correction over its ``seeds`` (every row would read "at the floor")."""
    from sisajax.forget_quality import floor_test_can_reject, min_permutations

    n = int(opts["floor_permutations"])
    if not floor_test_can_reject(n, seeds):
        raise ExperimentError(
            f"experiment.floor_permutations={n} is too few for {seeds} seeds: the smallest p "
            f"(1/{n + 1}) times {seeds} is never below 0.05; set it to at least "
            f"{min_permutations(seeds)}"
        )


def _grid(opts: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """The tuning trials of method ``name``: ``experiment.tune.<name>`` is ``{hparam: [values]}``
    (the grid is their product; none: the conf/unlearn defaults only)."""
    import itertools

    space = dict((opts.get("tune") or {}).get(name) or {})
    keys = list(space)
    return [dict(zip(keys, c, strict=True)) for c in itertools.product(*space.values())] or [{}]


TUNE_SETS = ("retain", "val")  # what the tuning objective reads (never the test split)

# a tuning trial whose models produced non-finite outputs: never chosen, stored as such
DIVERGED: dict[str, Any] = {"F": None, "retain_rel": None, "val_rel": None, "objective": -1.0}


def _finite(got) -> bool:
    phi, probs = got
    return bool(np.isfinite(phi).all() and all(np.isfinite(p).all() for p in probs.values()))


def _selection_score(got, oracle, ys: dict[str, np.ndarray]) -> dict[str, float]:
    """The tuning objective on the tuning forget set (never the evaluation forget set or the
    test split): the challenge's forget quality F times how closely the retain and validation
    accuracies match the tuning oracle's, ``closeness(rel) = max(0, 1 - |1 - rel|)`` of the
    ratio ``rel = acc / oracle acc``.

    The target of unlearning is the oracle, not the highest accuracy: the validation split
    holds examples of the forgotten kind (a whole class, a subpopulation) that the oracle,
    never trained on them, gets wrong, so a method that has not forgotten scores *above* the
    oracle there (ratios ~1.1 on digits' class forget). A plain ratio rewarded that, and with F
    at its clamp it decided the tuning towards the weakest forgetting; the closeness penalises
    missing the oracle in either direction, by the same amount. It lies in [0, 1], so every
    real objective is >= 0 (a diverged trial's -1 is never chosen)."""
    from sisajax.forget_quality import challenge_score

    (phi, probs), (o_phi, o_probs) = got, oracle
    rel = {}
    for k in ("retain", "val"):
        acc, o_acc = (float((p[k].argmax(-1) == ys[k]).mean()) for p in (probs, o_probs))
        rel[k] = acc / max(o_acc, 1e-9)
    f = challenge_score(phi, o_phi)
    return {"F": f, "retain_rel": rel["retain"], "val_rel": rel["val"],
            "objective": f * closeness(rel["retain"]) * closeness(rel["val"])}  # fmt: skip


def closeness(rel: float) -> float:
    """How close an accuracy ratio to the oracle's is to 1, in [0, 1]: ``max(0, 1 - |1 - rel|)``
    (exceeding the oracle costs as much as falling short of it)."""
    return max(0.0, 1.0 - abs(1.0 - float(rel)))


def population_seed(seed: int, salt: int) -> int:
    """The seed of a study's population (or method key) number ``salt`` under ``seed``."""
    from sisajax.data.partition import key_word

    return int(key_word(seed, 0x0C1E, salt) & 0x7FFFFFFF)


def _apply_method(name, point, original, x, y, gone, key_seed: int):
    """All N models of ``original`` unlearned by method ``name`` (its conf/unlearn defaults
    with ``point``'s hyperparameters) at once (vmap): the new population, the cost per model
    and the wall seconds (compile included)."""
    import dataclasses

    from sisajax import approx
    from sisajax.approx.common import rows as make_rows
    from sisajax.approx.sisa import model_apply

    conf = _method_conf(name)
    conf["hparams"] = {**(conf.get("hparams") or {}), **point}
    method, budget, hp = approx.from_config(conf)
    states = original.states
    use_avg = states.avg_params is not None
    params = states.avg_params if use_avg else states.params
    apply_fn = model_apply(original.engine.spec)
    forget, retain = make_rows(x[gone], y[gone]), make_rows(x[~gone], y[~gone])
    keys = jax.random.split(jax.random.PRNGKey(key_seed), original.num_models)

    def one(p, ctx, k):
        return method.update(apply_fn, budget, hp, p, ctx, forget, retain, k)

    # one program for all N models: vmapped, or one after another (lax.map) where the run's
    # engine maps its shards (convolutions under vmap are slow on CPUs)
    if original.engine.shard_exec == "vmap":
        program = jax.jit(jax.vmap(one))
    else:
        program = jax.jit(lambda p, c, k: jax.lax.map(lambda a: one(*a), (p, c, k)))
    t0 = time.perf_counter()
    new = jax.device_get(program(params, dict(states.model_state), keys))
    wall = time.perf_counter() - t0
    out = states._replace(params=new, avg_params=new if use_avg else None)
    cost = method.cost(budget, hp, int(gone.sum()), int((~gone).sum()))
    pop = dataclasses.replace(original, states=out)
    return pop, {"examples": cost.examples, "grad_steps": cost.grad_steps}, wall


def _method_conf(name: str) -> dict[str, Any]:
    import yaml

    from sisajax import approx

    path = approx.config_file(name)
    if not path.is_file():
        raise ExperimentError(f"experiment.methods: no conf/unlearn/{name}.yaml")
    return yaml.safe_load(path.read_text())


def _real_forget(cfg, ds, ids, x, y, f_ids, ws: Workspace, seed: int) -> dict[str, Any]:
    """Train one real run of ``cfg`` on D, forget ``f_ids`` with the library, verify the
    affected shards bit for bit: the measured cost of SISA's exact unlearning."""
    import sisajax as sj

    d = sj.Dataset(ds.name, ids, x, y, ds.test_ids, ds.x_test, ds.y_test, ds.num_classes,
                   preprocessing=ds.preprocessing)  # fmt: skip
    p = ws.path(f"sisa_S{cfg.sisa.shards}_R{cfg.sisa.slices}_seed{seed}")
    run_, _ = sj.train(cfg.replace(data={"val_fraction": 0.0}), d, p, metrics=False)
    t0 = time.perf_counter()
    rep = sj.forget(run_, f_ids, progress=None)
    wall = time.perf_counter() - t0
    digest = partition_digest(run_.partition)
    ver = sj.verify(run_, shards=sorted(rep.restart))
    ws.drop(p)
    if not ver.ok:
        raise ExperimentError(f"the forget of {cfg.sisa.shards} shards did not verify")
    return {
        "examples": int(rep.cost.examples),
        "grad_steps": int(rep.cost.grad_steps),
        "wall_s": wall,
        "verified_shards": len(rep.restart),
        "partition_digest": digest,
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m sisajax.experiments.unlearning DOC STUDY_DIR``: rewrite DOC's unlearning
    headline table from the stored study."""
    import json
    import sys

    from sisajax.experiments.report import replace_between

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m sisajax.experiments.unlearning DOC STUDY_DIR", file=sys.stderr)
        return 2
    doc, res = Path(args[0]), json.loads((Path(args[1]) / "results.json").read_text())
    begin, end = markers(res["name"])
    doc.write_text(replace_between(doc.read_text(), begin, end, headline(res)))
    print(f"{doc}: unlearning headline from {args[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
