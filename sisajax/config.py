"""Typed, self-validating configuration for a SISA run.

Plain dataclasses (no Hydra here): the Hydra layer in ``experiments/`` composes YAML from ``conf/``
and hands a plain dict to :func:`RunConfig.from_dict`. Every field that changes the trained bits is
part of :meth:`RunConfig.fingerprint`, which checkpoints record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Literal

ShardExec = Literal["auto", "vmap", "map"]
Aggregation = Literal["vote", "mean_prob"]


class ConfigError(ValueError):
    """A configuration value is invalid or conflicts with a stored run."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which data set to load (by registry name) and its parameters."""

    name: str = "digits"
    params: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("data.name must be a non-empty data set name")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A model from the registry in :mod:`sisajax.models`."""

    name: str = "mlp"
    hidden: tuple[int, ...] = (128,)
    activation: str = "tanh"
    params: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if any(h <= 0 for h in self.hidden):
            raise ConfigError(f"model.hidden sizes must be positive, got {self.hidden}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """An optax optimizer: ``sgd`` (optionally with momentum) or ``adam``."""

    name: Literal["sgd", "adam"] = "sgd"
    learning_rate: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in ("sgd", "adam"):
            raise ConfigError(f"optim.name must be 'sgd' or 'adam', got {self.name!r}")
        if not self.learning_rate > 0:
            raise ConfigError(f"optim.learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"optim.momentum must be in [0, 1), got {self.momentum}")


@dataclasses.dataclass(frozen=True)
class SisaConfig:
    """Shards, slices and the training budget.

    Attributes:
      shards: S, the number of constituent models.
      slices: R, slices per shard; step r trains on slices 1..r and is checkpointed.
      epochs: e, the epoch budget of an equivalent unsliced run. The R slice steps together run
        e' = 2R/(R+1) * e epochs, each step ``2e/(R+1)`` epochs over its prefix (counted in steps).
      batch_size: examples per gradient step per constituent model.
      seed: the root of every key (partition hash, init, batch order).
      aggregation: ``vote`` (majority of labels) or ``mean_prob`` (mean of probabilities).
      shard_exec: how shards run inside the one compiled program: ``vmap``, ``map`` (``lax.map``,
        faster on CPU) or ``auto`` (``map`` on CPU, ``vmap`` on accelerators). The bits depend on
        it, so a run stores the resolved choice and unlearning reuses it.
      chunk_steps: gradient steps per call of the compiled program (a fixed shape: one compile).
      allow_empty_shards: permit shards with no training ids (they drop out of aggregation).
    """

    shards: int = 5
    slices: int = 4
    epochs: float = 20.0
    batch_size: int = 16
    seed: int = 0
    aggregation: Aggregation = "vote"
    shard_exec: ShardExec = "auto"
    chunk_steps: int = 128
    allow_empty_shards: bool = False

    def __post_init__(self) -> None:
        if self.shards < 1:
            raise ConfigError(f"sisa.shards must be >= 1, got {self.shards}")
        if self.slices < 1:
            raise ConfigError(f"sisa.slices must be >= 1, got {self.slices}")
        if not self.epochs > 0:
            raise ConfigError(f"sisa.epochs must be > 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"sisa.batch_size must be >= 1, got {self.batch_size}")
        if self.aggregation not in ("vote", "mean_prob"):
            raise ConfigError(
                f"sisa.aggregation must be 'vote' or 'mean_prob', got {self.aggregation!r}"
            )
        if self.shard_exec not in ("auto", "vmap", "map"):
            raise ConfigError(
                f"sisa.shard_exec must be 'auto', 'vmap' or 'map', got {self.shard_exec!r}"
            )
        if self.chunk_steps < 1:
            raise ConfigError(f"sisa.chunk_steps must be >= 1, got {self.chunk_steps}")

    @property
    def epochs_per_slice_step(self) -> float:
        """Epochs each slice step runs over its prefix: 2e/(R+1) (e when R = 1)."""
        return 2.0 * self.epochs / (self.slices + 1)


@dataclasses.dataclass(frozen=True)
class LedgerConfig:
    """How deletion requests are recorded (does not change trained bits).

    Attributes:
      hash_ids: store salted hashes of forgotten ids (ledger, results, removed-id list) instead of
        the raw ids.
      lock_timeout_s: how long a second writer (``forget``) waits for the run's lock before failing.
    """

    hash_ids: bool = False
    lock_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.lock_timeout_s < 0:
            raise ConfigError(f"ledger.lock_timeout_s must be >= 0, got {self.lock_timeout_s}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that defines a SISA run."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    sisa: SisaConfig = dataclasses.field(default_factory=SisaConfig)
    ledger: LedgerConfig = dataclasses.field(default_factory=LedgerConfig)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Build from a nested plain dict (e.g. ``OmegaConf.to_container``); unknown keys fail."""
        parts = {
            "data": DataConfig,
            "model": ModelConfig,
            "optim": OptimConfig,
            "sisa": SisaConfig,
            "ledger": LedgerConfig,
        }
        unknown = set(d) - set(parts)
        if unknown:
            raise ConfigError(f"unknown config sections: {sorted(unknown)}")
        kwargs = {}
        for key, typ in parts.items():
            sub = dict(d.get(key) or {})
            names = {f.name for f in dataclasses.fields(typ)}
            bad = set(sub) - names
            if bad:
                raise ConfigError(f"unknown keys in {key}: {sorted(bad)} (known: {sorted(names)})")
            if "hidden" in sub:
                sub["hidden"] = tuple(sub["hidden"])
            kwargs[key] = typ(**sub)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"]["hidden"] = list(self.model.hidden)
        return d

    def replace(self, **sections: Any) -> RunConfig:
        """Return a copy with some sections' fields replaced, e.g. ``replace(sisa={"shards": 1})``."""
        new = {}
        for key, changes in sections.items():
            new[key] = dataclasses.replace(getattr(self, key), **changes)
        return dataclasses.replace(self, **new)

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of everything that determines the trained bits."""
        d = self.to_dict()
        d["sisa"].pop("aggregation")  # chosen at prediction time; does not change trained bits
        d.pop("ledger")  # bookkeeping only
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()
