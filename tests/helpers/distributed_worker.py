"""One process of a multi-process SISA training job (started by tests/test_distributed.py).

    python tests/helpers/distributed_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID RUN_DIR CONFIG_JSON

CONFIG_JSON holds keyword arguments for ``conftest.tiny_config``. Prints one JSON line
``{"process": ..., "layout": ..., "shards": [...]}`` when done.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest helpers


def main(argv: list[str]) -> int:
    coordinator, nproc, pid, run_dir, cfg_json = argv
    from sisajax import distributed

    distributed.initialize(coordinator, int(nproc), int(pid))  # before any other JAX call
    from conftest import tiny_config, tiny_digits

    cfg = tiny_config(**json.loads(cfg_json))
    # a plug-in module named as a user would (here the tests' own helpers): recorded
    run, cost = distributed.train_multiprocess(cfg, tiny_digits(), run_dir, plugins=["conftest"])
    shards = distributed.process_shards(cfg.sisa.shards, int(pid), int(nproc))
    print(
        json.dumps(
            {
                "process": int(pid),
                "layout": run.manifest.layout,
                "shards": shards,
                "grad_steps": cost.grad_steps,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
