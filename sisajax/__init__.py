"""sisajax: exact machine unlearning with SISA training in JAX.

Researcher-facing API::

    import sisajax as sj
    ds = sj.load_dataset("digits")
    cfg = sj.RunConfig(sisa=sj.SisaConfig(shards=5, slices=4))
    run, cost = sj.train(cfg, ds, "runs/a")
    print(run.evaluate().accuracy)
    report = sj.forget(run, [3, 17, 256])
    labels = run.predict(ds.x_test)
"""

from sisajax.aggregation import accuracy, aggregate, mean_prob, vote
from sisajax.audit import AuditReport, audit
from sisajax.checkpoint import CheckpointError, CheckpointStore
from sisajax.config import (
    ConfigError,
    DataConfig,
    LedgerConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    SisaConfig,
)
from sisajax.costs import CostReport, expected_speedup_single, full_retrain_cost
from sisajax.data import (
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
from sisajax.engine import Engine, ShardData, TrainState
from sisajax.features import (
    Extractor,
    ExtractorConfig,
    extract_features,
    pretrain_extractor,
    split_public,
    transfer_dataset,
)
from sisajax.ledger import Ledger, LedgerError
from sisajax.models import build_model, register_model
from sisajax.requests import sample_requests, serve_requests
from sisajax.run import EvalReport, RunBusyError, RunError, SisaRun, open_run, train
from sisajax.unlearning import (
    ForgetError,
    ForgetPlan,
    ForgetReport,
    forget,
    full_retrain,
    plan_forget,
    resume,
)
from sisajax.verify import VerifyError, VerifyReport, verify

__version__ = "0.1.0"

__all__ = [
    "Extractor",
    "ExtractorConfig",
    "extract_features",
    "pretrain_extractor",
    "split_public",
    "transfer_dataset",
    "VerifyError",
    "VerifyReport",
    "verify",
    "AuditReport",
    "Ledger",
    "LedgerConfig",
    "LedgerError",
    "RunBusyError",
    "audit",
    "resume",
    "sample_requests",
    "serve_requests",
    "CheckpointError",
    "CheckpointStore",
    "ConfigError",
    "CostReport",
    "DataConfig",
    "DataError",
    "Dataset",
    "Engine",
    "EvalReport",
    "ForgetError",
    "ForgetPlan",
    "ForgetReport",
    "ModelConfig",
    "OptimConfig",
    "Partition",
    "PartitionError",
    "RunConfig",
    "RunError",
    "ShardData",
    "SisaConfig",
    "SisaRun",
    "TrainState",
    "accuracy",
    "aggregate",
    "available_datasets",
    "build_model",
    "expected_speedup_single",
    "forget",
    "from_arrays",
    "full_retrain",
    "full_retrain_cost",
    "hash_partition",
    "load_dataset",
    "mean_prob",
    "open_run",
    "plan_forget",
    "register_dataset",
    "register_model",
    "train",
    "vote",
]
