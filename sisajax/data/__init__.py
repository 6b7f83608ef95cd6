"""Data sets, the id -> (shard, slice) partition, and batch schedules."""

from sisajax.data.datasets import (
    DataError,
    Dataset,
    available_datasets,
    from_arrays,
    load_dataset,
    register_dataset,
)
from sisajax.data.partition import Partition, PartitionError, fingerprint_ids, hash_partition
from sisajax.data.schedule import slice_step_batches, steps_for

__all__ = [
    "DataError",
    "Dataset",
    "Partition",
    "PartitionError",
    "available_datasets",
    "fingerprint_ids",
    "from_arrays",
    "hash_partition",
    "load_dataset",
    "register_dataset",
    "slice_step_batches",
    "steps_for",
]
from sisajax.data import loaders as _loaders  # noqa: E402, F401  (registers file-format data sets)
from sisajax.data import published as _published  # noqa: E402, F401  (registers releases)
from sisajax.data import synthetic as _synthetic  # noqa: E402, F401  (registers generators)
