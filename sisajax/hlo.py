"""Reading compiled programs: op counts and loop facts from HLO text.

What makes a training program slow on an accelerator is often visible in its compiled HLO
(``jax.jit(f).lower(...).compile().as_text()``), also on a CPU: a ``conditional`` (the device waits
for the host to pick a branch), a ``while`` without a known trip count (the loop predicate is
copied to the host every iteration), a ``scatter`` (deterministic mode runs it as a serial loop),
and the number of kernels launched per step. Used by tests and by the benchmarks.
"""

from __future__ import annotations

import re
from collections import Counter

# "  %name = <type> opcode(" or "  ROOT %name = ..."; the type may be a tuple "(s32[], ...)"
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+ = .*?[\s}\])]([a-z][a-z0-9\-]*)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
# ops that launch no kernel of their own
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "iota"}


def computations(text: str) -> dict[str, list[str]]:
    """``{computation name: opcodes of its instructions}`` of an HLO module's text."""
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if current is None:
            m = _COMPUTATION.match(line)
            if m and not line.startswith("HloModule"):
                current = out.setdefault(m.group(1), [])
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            current.append(m.group(1))
    return out


def op_counts(text: str) -> Counter:
    """Opcode -> count over every computation (fused ones included) of the module."""
    return Counter(op for ops in computations(text).values() for op in ops)


def while_loops(text: str) -> list[dict[str, object]]:
    """Every ``while`` of the module: ``{"body": name, "trip_count": int or None}``."""
    loops = []
    for line in text.splitlines():
        if " while(" not in line:
            continue
        body = re.search(r"body=%?([\w.\-]+)", line)
        trip = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
        loops.append(
            {
                "body": body.group(1) if body else None,
                "trip_count": int(trip.group(1)) if trip else None,
            }
        )
    return loops


def kernels_per_iteration(text: str, body: str) -> int:
    """Instructions of loop body ``body`` that launch work (fusions count once; parameters,
    constants, tuples and bitcasts do not)."""
    ops = computations(text).get(body, [])
    return sum(1 for op in ops if op not in _FREE)


def census(text: str) -> dict[str, object]:
    """A summary of a compiled training program: total instructions, the ops that stall or
    serialise an accelerator, and the loops with their trip counts and kernels per iteration."""
    counts = op_counts(text)
    loops = while_loops(text)
    return {
        "instructions": sum(counts.values()),
        "fusion": counts.get("fusion", 0),
        "scatter": counts.get("scatter", 0),
        "gather": counts.get("gather", 0),
        "conditional": counts.get("conditional", 0),
        "while": len(loops),
        "custom-call": counts.get("custom-call", 0),
        "loops": [
            {**lp, "kernels_per_iteration": kernels_per_iteration(text, str(lp["body"]))}
            for lp in loops
        ],
    }


__all__ = ["census", "computations", "kernels_per_iteration", "op_counts", "while_loops"]
