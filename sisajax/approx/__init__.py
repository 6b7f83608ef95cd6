"""Approximate-unlearning baselines to compare exact SISA unlearning against.

These methods change a trained model so that it behaves *more like* one never trained on a
forget set, at a fraction of a retrain's cost; none of them guarantees the result equals a
retrained model (SISA's :func:`sisajax.forget` does, bit for bit). They exist for comparison.

Every method is one function of the same form (see :mod:`sisajax.approx.common`)::

    new_params, cost = method(apply_fn, params, forget, retain, budget, hp, key, ctx=None)

with ``apply_fn(params, ctx, x) -> logits [B, C]``, ``forget`` and ``retain`` :class:`Rows`
(``[N, *feat]`` inputs, ``[N]`` labels, the real-row count), a :class:`Budget`, the method's
hyperparameter dataclass and a key. Methods by registry name (``conf/unlearn/<name>.yaml`` holds
each one's defaults and budget):

* ``ft``: fine-tune on the retain set;
* ``neggrad_plus``: ascent on forget + descent on retain, weighted;
* ``scrub``: teacher-student max/min steps;
* ``salun``: saliency-masked random-label fine-tuning;
* ``ssd``: selective synaptic dampening (no retraining);
* ``l1_sparse``: fine-tuning with an l1 penalty;
* ``newton``: one Newton step on the retained data (L2-regularised linear models).

:func:`sisajax.approx.sisa.unlearn_constituents` applies a method to the affected shards of a
trained SISA run, in memory.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax

from sisajax.approx import (
    forget_sets,
    ft,
    l1_sparse,
    neggrad,
    newton,
    salun,
    scrub,
    sisa,
    ssd,
)
from sisajax.approx.common import ApplyFn, ApproxCost, Budget, Method, PyTree, Rows, rows

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        ft.METHOD,
        neggrad.METHOD,
        scrub.METHOD,
        salun.METHOD,
        ssd.METHOD,
        l1_sparse.METHOD,
        newton.METHOD,
    )
}


def get_method(name: str) -> Method:
    """The registered method ``name`` (ValueError listing the names otherwise)."""
    if name not in METHODS:
        raise ValueError(f"unknown unlearning method {name!r}; one of {', '.join(METHODS)}")
    return METHODS[name]


def config_file(name: str) -> Path:
    """``conf/unlearn/<name>.yaml`` (the packaged config group)."""
    import importlib.resources

    return Path(str(importlib.resources.files("sisajax.conf"))) / "unlearn" / f"{name}.yaml"


def from_config(cfg: dict[str, Any]) -> tuple[Method, Budget, Any]:
    """``(method, budget, hyperparameters)`` of a ``conf/unlearn`` entry: a mapping with
    ``name``, ``budget`` (Budget fields) and ``hparams`` (the method's fields).

    Raises:
      ValueError: an unknown method or field.
    """
    cfg = dict(cfg)
    method = get_method(str(cfg.get("name")))
    extra = set(cfg) - {"name", "budget", "hparams"}
    if extra:
        raise ValueError(f"unlearn.{sorted(extra)[0]}: unknown key")

    def build(cls, values, where):
        values = dict(values or {})
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(values) - names)
        if bad:
            raise ValueError(f"unlearn.{where}.{bad[0]}: unknown for {method.name}")
        return cls(**values)

    return (
        method,
        build(Budget, cfg.get("budget"), "budget"),
        build(method.hparams, cfg.get("hparams"), "hparams"),
    )


def load_config(name: str, **overrides: Any) -> tuple[Method, Budget, Any]:
    """``(method, budget, hyperparameters)`` from ``conf/unlearn/<name>.yaml``; ``overrides``
    replace top-level sections or fields, e.g. ``budget={"steps": 10}``."""
    import yaml

    path = config_file(name)
    if not path.is_file():
        raise ValueError(f"unknown unlearning method {name!r}; one of {', '.join(METHODS)}")
    cfg = yaml.safe_load(path.read_text())
    for section, values in overrides.items():
        if isinstance(values, dict):
            cfg[section] = {**(cfg.get(section) or {}), **values}
        else:
            cfg[section] = values
    return from_config(cfg)


def unlearn(
    name: str,
    apply_fn: ApplyFn,
    params: PyTree,
    forget: Rows,
    retain: Rows,
    key: jax.Array,
    budget: Budget | None = None,
    hp: Any = None,
    ctx: PyTree = None,
) -> tuple[PyTree, ApproxCost]:
    """Run method ``name`` on one model; ``budget`` and ``hp`` default to its config file's."""
    method, cfg_budget, cfg_hp = load_config(name)
    return method.run(
        apply_fn,
        params,
        forget,
        retain,
        cfg_budget if budget is None else budget,
        cfg_hp if hp is None else hp,
        key,
        ctx,
    )


__all__ = [
    "METHODS",
    "ApproxCost",
    "Budget",
    "Method",
    "Rows",
    "config_file",
    "forget_sets",
    "from_config",
    "get_method",
    "load_config",
    "rows",
    "sisa",
    "unlearn",
]
