"""sisajax: exact machine unlearning with SISA training in JAX.

Researcher-facing API::

    import sisajax as sj
    ds = sj.load_dataset("digits")
    cfg = sj.RunConfig(sisa=sj.SisaConfig(shards=5, slices=4))
    run, cost = sj.train(cfg, ds, "runs/a")
    print(run.evaluate().accuracy)
    report = sj.forget(run, [3, 17, 256])
    labels = run.predict(ds.x_test)

On a CPU, importing sisajax before jax gives XLA one device per core (the fastest layout for
SISA's independent shards; see :mod:`sisajax.layout`). Set ``SISAJAX_CPU_DEVICES=1`` to keep
XLA's single default device.
"""

from sisajax.layout import configure_cpu_devices

configure_cpu_devices()

from sisajax.aggregation import accuracy, aggregate, mean_prob, vote  # noqa: E402
from sisajax.audit import AuditReport, audit  # noqa: E402
from sisajax.config import (  # noqa: E402
    ConfigError,
    DataConfig,
    LedgerConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    SisaConfig,
)
from sisajax.costs import CostReport, expected_speedup_single, full_retrain_cost  # noqa: E402
from sisajax.data import (  # noqa: E402
    DataError,
    Dataset,
    Partition,
    PartitionError,
    available_datasets,
    from_arrays,
    hash_partition,
    load_dataset,
    register_dataset,
)
from sisajax.engine import Engine, ShardData, ShardJob, TrainState  # noqa: E402
from sisajax.errors import (  # noqa: E402
    NotARunError,
    RunError,
    RunStateError,
    SisajaxError,
    StorageError,
    UserInputError,
)
from sisajax.features import (  # noqa: E402
    Extractor,
    ExtractorConfig,
    extract_features,
    pretrain_extractor,
    split_public,
    transfer_dataset,
)
from sisajax.layout import LayoutError  # noqa: E402
from sisajax.models import build_model, register_model  # noqa: E402
from sisajax.requests import sample_requests, serve_requests  # noqa: E402
from sisajax.run import EvalReport, HostWarning, SisaRun, open_run  # noqa: E402
from sisajax.store.files import UnsafeRunError  # noqa: E402
from sisajax.store.ledger import Ledger, LedgerError  # noqa: E402
from sisajax.store.locks import RunBusyError  # noqa: E402
from sisajax.store.rows import RowError  # noqa: E402
from sisajax.training import train  # noqa: E402
from sisajax.unlearning import (  # noqa: E402
    ForgetError,
    ForgetPlan,
    ForgetReport,
    forget,
    full_retrain,
    plan_forget,
    resume,
)
from sisajax.verify import VerifyError, VerifyReport, verify  # noqa: E402

__version__ = "0.2.0"

__all__ = [
    "AuditReport",
    "ConfigError",
    "CostReport",
    "DataConfig",
    "DataError",
    "Dataset",
    "Engine",
    "EvalReport",
    "Extractor",
    "ExtractorConfig",
    "ForgetError",
    "ForgetPlan",
    "ForgetReport",
    "HostWarning",
    "LayoutError",
    "Ledger",
    "LedgerConfig",
    "LedgerError",
    "ModelConfig",
    "NotARunError",
    "OptimConfig",
    "Partition",
    "PartitionError",
    "RowError",
    "RunBusyError",
    "RunConfig",
    "RunError",
    "RunStateError",
    "ShardData",
    "ShardJob",
    "SisaConfig",
    "SisaRun",
    "SisajaxError",
    "StorageError",
    "TrainState",
    "UnsafeRunError",
    "UserInputError",
    "VerifyError",
    "VerifyReport",
    "accuracy",
    "aggregate",
    "audit",
    "available_datasets",
    "build_model",
    "expected_speedup_single",
    "extract_features",
    "forget",
    "from_arrays",
    "full_retrain",
    "full_retrain_cost",
    "hash_partition",
    "load_dataset",
    "mean_prob",
    "open_run",
    "plan_forget",
    "pretrain_extractor",
    "register_dataset",
    "register_model",
    "resume",
    "sample_requests",
    "serve_requests",
    "split_public",
    "train",
    "transfer_dataset",
    "verify",
    "vote",
]
