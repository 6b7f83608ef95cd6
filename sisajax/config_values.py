"""Checks of single configuration values: each returns the value (normalised) or raises
:class:`ConfigError` naming the key and what is allowed. :mod:`sisajax.config` builds its
dataclasses from them (and re-exports the public ones).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from sisajax.errors import UserInputError


class ConfigError(UserInputError, ValueError):
    """A configuration value is invalid or conflicts with a stored run."""


def int_value(v: Any, key: str, lo: int | None = None, hi: int | None = None) -> int:
    """``v`` as an int in ``[lo, hi]`` (Python or numpy integers, or a float holding a whole
    number); else :class:`ConfigError` naming ``key``. Booleans and strings are refused."""
    if isinstance(v, bool) or not (
        isinstance(v, numbers.Integral) or (isinstance(v, float) and v.is_integer())
    ):
        raise ConfigError(f"{key} must be an integer, got {v!r}")
    v = int(v)
    if lo is not None and v < lo:
        raise ConfigError(f"{key} must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise ConfigError(f"{key} must be <= {hi}, got {v}")
    return v


SEED_MAX = 2**32 - 1  # a run's seed: every key derives from PRNGKey(seed), which keeps 32 bits
# Upper bounds of the training program's shape options, far above anything useful (chunks of 4
# to 128 steps and unrolls of 1 to 16 are what runs use; a batch larger than a shard is padding
# of masked rows), so that a typo is refused instead of compiling or allocating for hours.
MAX_CHUNK_STEPS = 4096
MAX_UNROLL = 128
MAX_BATCH_SIZE = 2**20


def float_value(v: Any, key: str) -> float:
    """``v`` as a finite float (any real number but a boolean); else :class:`ConfigError`
    (an integer too large for a float included)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ConfigError(f"{key} must be a finite number, got {short_repr(v)}")
    try:
        f = float(v)
    except (OverflowError, ValueError):
        f = math.inf
    if not math.isfinite(f):
        raise ConfigError(f"{key} must be a finite number, got {short_repr(v)}")
    return f


# The smallest magnitude that rounds to infinity as a float32 (halfway between float32's
# largest finite value and 2**128, which rounds to even: up).
FLOAT32_OVERFLOW = 2.0**128 - 2.0**103


def float32_value(v: float, key: str) -> float:
    """``v`` (a float) unchanged, if it stays finite when the training program casts it to
    float32; else :class:`ConfigError`."""
    if not abs(v) < FLOAT32_OVERFLOW:
        raise ConfigError(
            f"{key} must be finite as a 32-bit float (below about 3.4e38 in magnitude), got {v!r}"
        )
    return v


def short_repr(v: Any) -> str:
    """``repr(v)``, cut to 60 characters (a 400-digit integer is not worth echoing)."""
    text = repr(v)
    return text if len(text) <= 60 else f"{text[:40]}... ({len(text)} characters)"


def bool_value(v: Any, key: str) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{key} must be true or false, got {v!r}")
    return v


def choice_value(v: Any, key: str, allowed: tuple[str, ...]) -> str:
    if v not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {v!r}")
    return v


def str_value(v: Any, key: str) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{key} must be a non-empty string, got {v!r}")
    return v


def dict_value(v: Any, key: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ConfigError(f"{key} must be a mapping, got {v!r}")
    return dict(v)


def set_field(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


__all__ = [
    "ConfigError",
    "FLOAT32_OVERFLOW",
    "MAX_BATCH_SIZE",
    "MAX_CHUNK_STEPS",
    "MAX_UNROLL",
    "SEED_MAX",
    "bool_value",
    "choice_value",
    "dict_value",
    "float32_value",
    "float_value",
    "int_value",
    "set_field",
    "short_repr",
    "str_value",
]
