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
XLA's single default device. On a GPU, importing sisajax before jax starts also turns on XLA's
deterministic ops, which bit-exact unlearning needs (``SISAJAX_ALLOW_NONDETERMINISTIC=1`` opts
out; such runs record it and are not exact).
"""

from sisajax.layout import configure_cpu_devices_at_import, configure_gpu_determinism

configure_cpu_devices_at_import()
configure_gpu_determinism()

# Names are imported on first use (PEP 562): `import sisajax` stays cheap, so the command line
# pays only for what a command needs (no jax for `--help`, no Orbax for `forget`, ...).
_EXPORTS = {
    "AuditReport": "sisajax.auditing",
    "ConfigError": "sisajax.config",
    "CostReport": "sisajax.costs",
    "DataConfig": "sisajax.config",
    "DataError": "sisajax.data",
    "Dataset": "sisajax.data",
    "Engine": "sisajax.engine",
    "EvalReport": "sisajax.aggregation",
    "Extractor": "sisajax.features",
    "ExtractorConfig": "sisajax.features",
    "ForgetError": "sisajax.planning",
    "ForgetPlan": "sisajax.planning",
    "ForgetReport": "sisajax.unlearning",
    "HostWarning": "sisajax.run",
    "LayoutError": "sisajax.layout",
    "Ledger": "sisajax.store.ledger",
    "LedgerConfig": "sisajax.config",
    "LedgerError": "sisajax.store.ledger",
    "ModelConfig": "sisajax.config",
    "NotARunError": "sisajax.errors",
    "OptimConfig": "sisajax.config",
    "Partition": "sisajax.data",
    "PartitionError": "sisajax.data",
    "PluginChangeWarning": "sisajax.plugins",
    "PluginChangedError": "sisajax.plugins",
    "RowError": "sisajax.store.rows",
    "RunBusyError": "sisajax.store.locks",
    "RunConfig": "sisajax.config",
    "recipe_summary": "sisajax.config",
    "RunError": "sisajax.errors",
    "RunStateError": "sisajax.errors",
    "ShardData": "sisajax.engine",
    "ShardJob": "sisajax.engine",
    "SisaConfig": "sisajax.config",
    "SisaRun": "sisajax.run",
    "SisajaxError": "sisajax.errors",
    "StorageError": "sisajax.errors",
    "TrainState": "sisajax.step",
    "StepSpec": "sisajax.step",
    "UnsafeRunError": "sisajax.store.files",
    "UserInputError": "sisajax.errors",
    "VerifyError": "sisajax.verification",
    "VerifyReport": "sisajax.verification",
    "accuracy": "sisajax.aggregation",
    "aggregate": "sisajax.aggregation",
    "audit": "sisajax.auditing",
    "available_datasets": "sisajax.data",
    "build_model": "sisajax.models",
    "continue_training": "sisajax.training",
    "expected_speedup_single": "sisajax.costs",
    "extract_features": "sisajax.features",
    "forget": "sisajax.unlearning",
    "from_arrays": "sisajax.data",
    "full_retrain": "sisajax.training",
    "full_retrain_cost": "sisajax.costs",
    "hash_partition": "sisajax.data",
    "load_dataset": "sisajax.data",
    "mean_prob": "sisajax.aggregation",
    "open_run": "sisajax.run",
    "plan_forget": "sisajax.planning",
    "pretrain_extractor": "sisajax.features",
    "register_dataset": "sisajax.data",
    "register_model": "sisajax.models",
    "resume": "sisajax.unlearning",
    "sample_requests": "sisajax.requests",
    "serve_requests": "sisajax.requests",
    "split_public": "sisajax.features",
    "train": "sisajax.training",
    "transfer_dataset": "sisajax.features",
    "verify": "sisajax.verification",
    "vote": "sisajax.aggregation",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sisajax' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


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
    "PluginChangeWarning",
    "PluginChangedError",
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
    "StepSpec",
    "UnsafeRunError",
    "UserInputError",
    "VerifyError",
    "VerifyReport",
    "accuracy",
    "aggregate",
    "audit",
    "available_datasets",
    "build_model",
    "continue_training",
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
    "recipe_summary",
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
