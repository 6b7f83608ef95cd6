"""Every ``sisajax`` subcommand, in the order ``sisajax --help`` lists them.

An entry is the command's name (its config is ``conf/<name>.yaml``), the one line ``sisajax
--help`` prints for it, its function ``fn(cfg, overrides) -> exit code`` as ``"module:function"``
and whether it sweeps with ``-m``. The functions are imported only when a command runs or shows
its help, so ``sisajax --help`` and ``sisajax --version`` import no command module (and no jax);
a command's ``sisajax NAME --help`` text is its function's docstring.

A new command: write its function in a command module, add its line here and its
``conf/<name>.yaml``.
"""

from __future__ import annotations

from sisajax.cli.base import Command

TABLE: tuple[Command, ...] = (
    Command(
        "train",
        "train a SISA run (or retrain one in place, keeping its tombstones)",
        "sisajax.cli.commands:cmd_train",
        multirun=True,
    ),
    Command(
        "evaluate",
        "test accuracy of every constituent model and of the ensemble",
        "sisajax.cli.commands:cmd_evaluate",
    ),
    Command(
        "forget",
        "forget training ids exactly (one batched request, or a request stream)",
        "sisajax.cli.forget_commands:cmd_forget",
    ),
    Command(
        "resume",
        "finish a request an interrupted command left pending",
        "sisajax.cli.forget_commands:cmd_resume",
    ),
    Command(
        "status",
        "shards, slices, sizes, forgotten ids, pending requests",
        "sisajax.cli.commands:cmd_status",
    ),
    Command(
        "ids",
        "list a run's retained, validation or forgotten ids, or find where given ids are",
        "sisajax.cli.run_commands:cmd_ids",
    ),
    Command(
        "predict",
        "labels from the ensemble for features in a file",
        "sisajax.cli.run_commands:cmd_predict",
    ),
    Command(
        "audit",
        "check that every forgotten id is gone from everything stored (exit 1 if not)",
        "sisajax.cli.commands:cmd_audit",
    ),
    Command(
        "verify",
        "retrain shards from scratch and compare every checkpoint (exit 1 if not)",
        "sisajax.cli.commands:cmd_verify",
    ),
    Command(
        "receipt",
        "write the deletion receipt of a done forget request",
        "sisajax.cli.receipt_commands:cmd_receipt",
    ),
    Command(
        "check-receipt",
        "verify a deletion receipt against a run (replay=true retrains and compares)",
        "sisajax.cli.receipt_commands:cmd_check_receipt",
    ),
    Command(
        "serve",
        "serve a stream of forget requests from one long-lived process",
        "sisajax.cli.forget_commands:cmd_serve",
    ),
    Command(
        "export",
        "write a run's states as a standard Orbax checkpoint",
        "sisajax.cli.commands:cmd_export",
    ),
    Command(
        "demo",
        "the main job: train, forget one id and a batch, verify, compare with a full retrain",
        "sisajax.cli.experiment_commands:cmd_demo",
    ),
    Command(
        "paper",
        "reproduce the paper's experiments (presets in conf/experiment/)",
        "sisajax.cli.experiment_commands:cmd_paper",
        multirun=True,
    ),
    Command(
        "mia",
        "membership inference before and after forgetting",
        "sisajax.cli.experiment_commands:cmd_mia",
    ),
    Command(
        "report",
        "tables and plots from a run's history or from experiment results",
        "sisajax.cli.experiment_commands:cmd_report",
    ),
)

COMMANDS: dict[str, Command] = {c.name: c for c in TABLE}
