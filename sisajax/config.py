"""Typed, self-validating configuration for a SISA run.

Plain frozen dataclasses (no Hydra here): the command line composes YAML and hands a plain dict to
:meth:`RunConfig.from_dict`. Every value is checked on construction (type and range; a bad value
names the key and what is allowed), and every field that changes the trained bits is part of
:meth:`RunConfig.fingerprint`, which checkpoints record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any, Literal

from sisajax.config_values import (
    MAX_BATCH_SIZE,
    MAX_CHUNK_STEPS,
    MAX_UNROLL,
    SEED_MAX,
    ConfigError,
    bool_value,
    choice_value,
    dict_value,
    float32_value,
    float_value,
    int_value,
    set_field,
    short_repr,
    str_value,
)

ShardExec = Literal["auto", "vmap", "map"]

# Version of the compiled training program (sisajax.step). Part of every fingerprint and recorded
# in every run's layout: a change that moves the trained bits bumps it, and a run trained by
# another version is refused by forget/verify (it cannot be replayed bit for bit) but can still
# be evaluated or retrained in place. 2: static-trip-count chunks, where-masked steps, one-hot
# cross-entropy, host-prepared labels.
TRAINING_PROGRAM = 2
SCHEDULES = ("constant", "cosine", "step")
Aggregation = Literal["vote", "mean_prob"]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which data set to load (by registry name) and its parameters.

    Attributes:
      val_fraction: share of the training ids held out as the run's validation split (chosen by
        a keyed hash of the run's seed and each id; never trained on; 0 for none). Selection of
        recipes and hyperparameters reads it, never the test split.
    """

    name: str = "digits"
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        set_field(self, "name", str_value(self.name, "data.name"))
        set_field(self, "params", dict_value(self.params, "data.params"))
        f = float_value(self.val_fraction, "data.val_fraction")
        if not 0.0 <= f <= 0.5:
            raise ConfigError(f"data.val_fraction must be in [0, 0.5], got {f}")
        set_field(self, "val_fraction", f)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A model from the registry in :mod:`sisajax.models` (or a plug-in's).

    Attributes:
      name: registry name.
      hidden: hidden layer sizes (MLP, CNN head).
      activation: ``tanh``, ``relu`` or ``gelu``.
      params: model-specific options (each model refuses keys it does not know).
      compute_dtype: dtype of activations and matmuls/convolutions (``bfloat16`` halves memory
        traffic on accelerators); parameters, optimizer state and the loss stay float32.
    """

    name: str = "mlp"
    hidden: tuple[int, ...] = (128,)
    activation: str = "tanh"
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    compute_dtype: Literal["float32", "bfloat16"] = "float32"

    def __post_init__(self) -> None:
        set_field(self, "name", str_value(self.name, "model.name"))
        set_field(
            self,
            "compute_dtype",
            choice_value(self.compute_dtype, "model.compute_dtype", ("float32", "bfloat16")),
        )
        if not isinstance(self.hidden, list | tuple):
            raise ConfigError(f"model.hidden must be a list of layer sizes, got {self.hidden!r}")
        set_field(self, "hidden", tuple(int_value(h, "model.hidden sizes", 1) for h in self.hidden))
        set_field(self, "activation", str_value(self.activation, "model.activation"))
        set_field(self, "params", dict_value(self.params, "model.params"))


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """An optax optimizer and the training recipe's exact extras.

    Attributes:
      name: ``sgd`` (optionally with momentum) or ``adam``.
      learning_rate: the base learning rate.
      momentum: SGD momentum (0: none).
      weight_decay: decoupled weight decay (0: none).
      averaging: ``none``, ``ema`` (exponential moving average of the weights, decay
        ``min(ema_decay, (1 + t) / (10 + t))`` at step t, so early steps are not frozen in),
        ``polyak`` (running mean of all iterates) or ``tail`` (running mean of the iterates in
        the last ``tail_fraction`` of each slice step); the average is carried in the state and
        checkpoints and used for prediction.
      ema_decay: decay of ``averaging=ema``.
      tail_fraction: share of each slice step averaged by ``averaging=tail``.
      schedule: learning-rate schedule: ``constant``, ``cosine`` (to ``final_lr_fraction``),
        ``step`` (x0.1 at 50% and 75%), each after a linear warm-up over ``warmup_fraction``.
      schedule_horizon: what the schedule spans: ``run`` (all R slice steps: progress
        ``(r + t / T_r) / R`` at step t of slice step r with T_r steps) or ``slice_step`` (each
        slice step restarts it: ``t / T_r``). Both are pure functions of the slice index and of
        the prefix's own step count, so a forget stays bit-identical to training from scratch.
      warmup_fraction: share of the horizon spent warming up linearly from 0.
      final_lr_fraction: the cosine schedule's final learning rate, relative to the peak.
      label_smoothing: mix the one-hot targets with the uniform distribution by this amount.
      lr_shard_exponent: multiply the learning rate by ``S ** lr_shard_exponent`` (recipe scaling
        with the nominal shard size N/S; a function of S only, never of the realised shard size,
        which deletions change and would break exactness).
      augment: data augmentation of training batches (images ``[H, W]`` or ``[H, W, C]``):
        ``none`` or ``crop_flip`` (random crop after zero padding by ``augment_pad`` pixels, and
        a random horizontal flip), with keys from (seed, shard, slice, step), so a retrain
        replays exactly the augmented batches training saw.
      augment_pad: padding in pixels of ``crop_flip``.
    """

    name: Literal["sgd", "adam"] = "sgd"
    learning_rate: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    averaging: Literal["none", "ema", "polyak", "tail"] = "none"
    ema_decay: float = 0.999
    tail_fraction: float = 0.5
    schedule: Literal["constant", "cosine", "step"] = "constant"
    schedule_horizon: Literal["run", "slice_step"] = "run"
    warmup_fraction: float = 0.0
    final_lr_fraction: float = 0.0
    label_smoothing: float = 0.0
    lr_shard_exponent: float = 0.0
    augment: Literal["none", "crop_flip"] = "none"
    augment_pad: int = 4

    def __post_init__(self) -> None:
        set_field(
            self, "augment", choice_value(self.augment, "optim.augment", ("none", "crop_flip"))
        )
        set_field(self, "augment_pad", int_value(self.augment_pad, "optim.augment_pad", 0))
        set_field(self, "name", choice_value(self.name, "optim.name", ("sgd", "adam")))
        set_field(
            self,
            "learning_rate",
            float32_value(
                float_value(self.learning_rate, "optim.learning_rate"), "optim.learning_rate"
            ),
        )
        if not self.learning_rate > 0:
            raise ConfigError(f"optim.learning_rate must be > 0, got {self.learning_rate}")
        set_field(self, "momentum", float_value(self.momentum, "optim.momentum"))
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"optim.momentum must be in [0, 1), got {self.momentum}")
        set_field(
            self,
            "weight_decay",
            float32_value(
                float_value(self.weight_decay, "optim.weight_decay"), "optim.weight_decay"
            ),
        )
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        set_field(
            self,
            "averaging",
            choice_value(self.averaging, "optim.averaging", ("none", "ema", "polyak", "tail")),
        )
        set_field(self, "ema_decay", float_value(self.ema_decay, "optim.ema_decay"))
        if not 0 < self.ema_decay < 1:
            raise ConfigError(f"optim.ema_decay must be in (0, 1), got {self.ema_decay}")
        set_field(self, "schedule", choice_value(self.schedule, "optim.schedule", SCHEDULES))
        set_field(
            self,
            "schedule_horizon",
            choice_value(self.schedule_horizon, "optim.schedule_horizon", ("run", "slice_step")),
        )
        for name, lo, hi in (
            ("tail_fraction", 0.0, 1.0),
            ("warmup_fraction", 0.0, 1.0),
            ("final_lr_fraction", 0.0, 1.0),
            ("label_smoothing", 0.0, 1.0),
        ):
            v = float_value(getattr(self, name), f"optim.{name}")
            if not lo <= v <= hi or (name == "tail_fraction" and v == 0.0):
                raise ConfigError(f"optim.{name} must be in [{lo}, {hi}], got {v}")
            set_field(self, name, v)
        if self.label_smoothing >= 1.0:
            raise ConfigError("optim.label_smoothing must be < 1")
        set_field(
            self,
            "lr_shard_exponent",
            float_value(self.lr_shard_exponent, "optim.lr_shard_exponent"),
        )
        if abs(self.lr_shard_exponent) > 2:
            raise ConfigError(
                f"optim.lr_shard_exponent must be in [-2, 2], got {self.lr_shard_exponent}"
            )

    @property
    def has_schedule(self) -> bool:
        """Whether the learning rate changes during training."""
        return self.schedule != "constant" or self.warmup_fraction > 0


@dataclasses.dataclass(frozen=True)
class SisaConfig:
    """Shards, slices and the training budget.

    Attributes:
      shards: S, the number of constituent models.
      slices: R, slices per shard; step r trains on slices 1..r and is checkpointed.
      epochs: e, the epoch budget of an equivalent unsliced run. The R slice steps together run
        e' = 2R/(R+1) * e epochs, each step ``2e/(R+1)`` epochs over its prefix (counted in steps).
      batch_size: examples per gradient step per constituent model, at most
        :data:`MAX_BATCH_SIZE` (2**20); a batch larger than a shard pads its steps with masked
        rows.
      seed: the root of every key (partition hash, init, batch order, dropout), in
        ``[0, 2**32)``.
      aggregation: ``vote`` (majority of labels) or ``mean_prob`` (mean of probabilities).
      shard_exec: how shards run inside one compiled program: ``vmap``, ``map`` (``lax.map``,
        faster on CPU) or ``auto`` (``map`` on CPU, ``vmap`` on accelerators).
      chunk_steps: gradient steps per call of the compiled program (a fixed shape: one
        compile), or ``auto``: 128 with a ``dynamic`` chunk loop (it runs the live steps only),
        32 with a ``static`` one, whose slice steps end in a chunk padded with masked no-op
        steps (at the paper's Purchase recipe 32 wastes 11% of the device's steps, 128 wastes
        38%; :func:`sisajax.costs.chunk_fill`). Resolved when a run is trained and recorded.
        At most :data:`MAX_CHUNK_STEPS` (4096).
      unroll: steps per loop iteration inside the compiled program (fewer loop iterations on an
        accelerator; part of the program, hence of the fingerprint), at most :data:`MAX_UNROLL`
        (128). Only the ``static`` chunk loop unrolls: training refuses ``unroll > 1`` with a
        ``dynamic`` one.
      chunk_trip: the loop over a chunk's steps: ``static`` (always ``chunk_steps`` steps, empty
        ones exact no-ops: no host round trip on an accelerator), ``dynamic`` (only the live
        steps: no wasted work on a CPU) or ``auto`` (``dynamic`` under ``map``, ``static``
        under ``vmap``; resolved when a run is trained and recorded).
      allow_empty_shards: permit shards with no training ids (they drop out of aggregation)
        and shards with fewer ids than slices (empty slices train no steps), as deletions
        can leave them: training from scratch on a run's retained data needs it then.
      epochs_shard_exponent: train each constituent for ``e * S ** epochs_shard_exponent``
        epochs (recipe scaling with the nominal shard size; costs more examples, which every
        cost report counts). 0: the same e as the full model.
    """

    shards: int = 5
    slices: int = 4
    epochs: float = 20.0
    batch_size: int = 16
    seed: int = 0
    aggregation: Aggregation = "vote"
    shard_exec: ShardExec = "auto"
    chunk_steps: int | Literal["auto"] = "auto"
    unroll: int = 1
    chunk_trip: Literal["auto", "static", "dynamic"] = "auto"
    allow_empty_shards: bool = False
    epochs_shard_exponent: float = 0.0

    def __post_init__(self) -> None:
        set_field(self, "shards", int_value(self.shards, "sisa.shards", 1))
        set_field(self, "slices", int_value(self.slices, "sisa.slices", 1))
        set_field(self, "epochs", float_value(self.epochs, "sisa.epochs"))
        if not self.epochs > 0:
            raise ConfigError(f"sisa.epochs must be > 0, got {self.epochs}")
        set_field(
            self, "batch_size", int_value(self.batch_size, "sisa.batch_size", 1, MAX_BATCH_SIZE)
        )
        # jax's keys hold 32 bits: a larger seed would share its model keys with another seed
        set_field(self, "seed", int_value(self.seed, "sisa.seed", 0, SEED_MAX))
        set_field(
            self,
            "aggregation",
            choice_value(self.aggregation, "sisa.aggregation", ("vote", "mean_prob")),
        )
        set_field(
            self,
            "shard_exec",
            choice_value(self.shard_exec, "sisa.shard_exec", ("auto", "vmap", "map")),
        )
        if isinstance(self.chunk_steps, str) and self.chunk_steps != "auto":
            raise ConfigError(
                f"sisa.chunk_steps must be an integer or 'auto', got {self.chunk_steps!r}"
            )
        if self.chunk_steps != "auto":
            set_field(
                self,
                "chunk_steps",
                int_value(self.chunk_steps, "sisa.chunk_steps", 1, MAX_CHUNK_STEPS),
            )
        set_field(self, "unroll", int_value(self.unroll, "sisa.unroll", 1, MAX_UNROLL))
        set_field(
            self,
            "chunk_trip",
            choice_value(self.chunk_trip, "sisa.chunk_trip", ("auto", "static", "dynamic")),
        )
        if self.chunk_steps != "auto" and self.chunk_steps % self.unroll:
            raise ConfigError(
                f"sisa.chunk_steps ({self.chunk_steps}) must be a multiple of sisa.unroll "
                f"({self.unroll})"
            )
        set_field(
            self,
            "allow_empty_shards",
            bool_value(self.allow_empty_shards, "sisa.allow_empty_shards"),
        )
        set_field(
            self,
            "epochs_shard_exponent",
            float_value(self.epochs_shard_exponent, "sisa.epochs_shard_exponent"),
        )
        if not 0 <= self.epochs_shard_exponent <= 1:
            raise ConfigError(
                f"sisa.epochs_shard_exponent must be in [0, 1], got {self.epochs_shard_exponent}"
            )

    @property
    def shard_epochs(self) -> float:
        """e of each constituent: ``epochs * S ** epochs_shard_exponent``."""
        return self.epochs * float(self.shards) ** self.epochs_shard_exponent

    @property
    def epochs_per_slice_step(self) -> float:
        """Epochs each slice step runs over its prefix: 2e/(R+1) (e when R = 1), with e the
        constituent's :attr:`shard_epochs`."""
        return 2.0 * self.shard_epochs / (self.slices + 1)


@dataclasses.dataclass(frozen=True)
class LedgerConfig:
    """How deletion requests are recorded (does not change trained bits).

    Attributes:
      hash_ids: store salted hashes of forgotten ids (ledger, results, removed-id list) instead of
        the raw ids.
      salt_file: a file outside the run holding the salt for ``hash_ids`` (default: the salt is
        made in the run directory; see :mod:`sisajax.store.ledger` for what that reveals).
      lock_timeout_s: how long a second writer waits for the run's lock before failing.
    """

    hash_ids: bool = False
    salt_file: str | None = None
    lock_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        set_field(self, "hash_ids", bool_value(self.hash_ids, "ledger.hash_ids"))
        if self.salt_file is not None:
            set_field(self, "salt_file", str_value(self.salt_file, "ledger.salt_file"))
        set_field(self, "lock_timeout_s", float_value(self.lock_timeout_s, "ledger.lock_timeout_s"))
        if self.lock_timeout_s < 0:
            raise ConfigError(f"ledger.lock_timeout_s must be >= 0, got {self.lock_timeout_s}")


SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "sisa": SisaConfig,
    "ledger": LedgerConfig,
}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that defines a SISA run."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    sisa: SisaConfig = dataclasses.field(default_factory=SisaConfig)
    ledger: LedgerConfig = dataclasses.field(default_factory=LedgerConfig)

    def __post_init__(self) -> None:
        for key, typ in SECTIONS.items():
            v = getattr(self, key)
            if not isinstance(v, typ):
                raise ConfigError(
                    f"RunConfig {key} must be a {typ.__name__}, got {type(v).__name__} "
                    "(RunConfig.from_dict builds a config from plain mappings)"
                )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Build from a nested plain dict (e.g. ``OmegaConf.to_container``); unknown keys fail.
        A missing (or None) section takes its defaults; any other section must be a mapping."""
        if not isinstance(d, dict):
            raise ConfigError(f"a run config must be a mapping, got {type(d).__name__}")
        unknown = set(d) - set(SECTIONS)
        if unknown:
            raise ConfigError(f"unknown config sections: {sorted(unknown, key=repr)}")
        return cls(**{key: _section(key, d.get(key)) for key in SECTIONS})

    def replace(self, **sections: Any) -> RunConfig:
        """Return a copy with some sections' fields replaced, e.g. ``replace(sisa={"shards": 1})``."""
        unknown = set(sections) - set(SECTIONS)
        if unknown:
            raise ConfigError(
                f"unknown config sections: {sorted(unknown)} (known: {', '.join(SECTIONS)})"
            )
        new = {}
        for key, changes in sections.items():
            if not isinstance(changes, Mapping):
                raise ConfigError(
                    f"the changes to {key} must be a mapping, got {type(changes).__name__}"
                )
            _check_keys(key, changes)
            new[key] = dataclasses.replace(getattr(self, key), **changes)
        return dataclasses.replace(self, **new)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"]["hidden"] = list(self.model.hidden)
        return d

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of everything that determines the trained bits."""
        d = self.to_dict()
        d["sisa"].pop("aggregation")  # chosen at prediction time; does not change trained bits
        d.pop("ledger")  # bookkeeping only
        # options added in 0.3 leave the fingerprints of runs that do not use them unchanged
        for section, defaults in _LATER_OPTIONS.items():
            for name, default in defaults.items():
                if d[section].get(name) == default:
                    d[section].pop(name)
        d["training_program"] = TRAINING_PROGRAM
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def _check_keys(key: str, fields: Mapping[Any, Any]) -> None:
    """Refuse keys of ``fields`` that section ``key`` does not have."""
    names = {f.name for f in dataclasses.fields(SECTIONS[key])}
    bad = set(fields) - names
    if bad:
        raise ConfigError(
            f"unknown keys in {key}: {sorted(bad, key=repr)} (known: {sorted(names)})"
        )


def _section(key: str, fields: Any) -> Any:
    """Section ``key`` built from a mapping of its fields (None: its defaults)."""
    if fields is None:
        fields = {}
    if not isinstance(fields, Mapping):
        raise ConfigError(f"{key} must be a mapping, got {short_repr(fields)}")
    _check_keys(key, fields)
    return SECTIONS[key](**fields)


_LATER_OPTIONS: dict[str, dict[str, Any]] = {
    "data": {"val_fraction": 0.0},
    "optim": {
        "tail_fraction": 0.5,
        "schedule": "constant",
        "schedule_horizon": "run",
        "warmup_fraction": 0.0,
        "final_lr_fraction": 0.0,
        "label_smoothing": 0.0,
        "lr_shard_exponent": 0.0,
        "augment": "none",
        "augment_pad": 4,
    },
    "model": {"compute_dtype": "float32"},
    "sisa": {"epochs_shard_exponent": 0.0, "unroll": 1},
}

RUN_GROUPS = tuple(SECTIONS)


def run_config_from(cfg: dict[str, Any]) -> RunConfig:
    """The :class:`RunConfig` of a composed command config: its run groups (``data``, ``model``,
    ``optim``, ``sisa``, ``ledger``) with the top-level ``seed`` as the run's seed."""
    parts: dict[str, Any] = {}
    for k in RUN_GROUPS:
        v = cfg.get(k)
        if v is not None and not isinstance(v, Mapping):
            raise ConfigError(f"{k} must be a mapping, got {short_repr(v)}")
        parts[k] = dict(v or {})
    if "seed" in cfg:
        parts["sisa"]["seed"] = cfg["seed"]
    return RunConfig.from_dict(parts)


def recipe_summary(rc: RunConfig) -> str:
    """One line naming the training recipe: model, optimizer, schedule, scaling, averaging,
    extras."""
    o, s, m = rc.optim, rc.sisa, rc.model
    model = m.name if m.name != "mlp" else f"mlp {list(m.hidden)} {m.activation}"
    parts = [model, f"{o.name} lr {o.learning_rate:g}"]
    if o.momentum:
        parts.append(f"momentum {o.momentum:g}")
    if o.schedule != "constant" or o.warmup_fraction:
        parts.append(
            f"{o.schedule} schedule over the {o.schedule_horizon.replace('_', ' ')}"
            + (f", warm-up {o.warmup_fraction:g}" if o.warmup_fraction else "")
        )
    if o.lr_shard_exponent:
        parts.append(f"lr x S^{o.lr_shard_exponent:g}")
    if o.averaging != "none":
        extra = {"ema": f" {o.ema_decay:g}", "tail": f" last {o.tail_fraction:g}"}.get(
            o.averaging, ""
        )
        parts.append(f"{o.averaging} weight averaging{extra}")
    if o.weight_decay:
        parts.append(f"weight decay {o.weight_decay:g}")
    if o.label_smoothing:
        parts.append(f"label smoothing {o.label_smoothing:g}")
    if s.epochs_shard_exponent:
        parts.append(f"epochs x S^{s.epochs_shard_exponent:g}")
    parts.append(f"{s.epochs:g} epochs, batch {s.batch_size}, R={s.slices}")
    return ", ".join(parts)
