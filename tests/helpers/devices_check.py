"""Checks that need several devices; run by tests/test_devices.py in a fresh process.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/helpers/devices_check.py OUT_DIR

(The flag must be set before jax is imported, hence a separate process.) For every case in
CASES it trains a run on 4 devices, forgets ids of shards that live on different devices, trains
a from-scratch run on the retained ids, and compares the two bit for bit. It also inspects the
compiled training programs for cross-device collectives. Writes ``OUT_DIR/report.json`` and
leaves the run directories and ``OUT_DIR/<case>.npz`` (logits and predictions after the forget)
for the parent test to compare with one device.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest helpers

import jax  # noqa: E402
import numpy as np  # noqa: E402

CASES = {
    # name: (tiny_config kwargs, shards to forget from). 5 shards on 4 devices: padded to 8, two
    # per device, shards 3 and 4 on devices 1 and 2; the forget of both (map) runs them on the
    # engine narrowed to devices 0 and 1, one each, and a second forget of shard 4 alone on
    # device 0 only. 4 shards (vmap): one per device at their own positions.
    "map_sgd": ({"shards": 5, "slices": 3}, (3, 4)),
    "vmap_adam": (
        {
            "shards": 4,
            "slices": 3,
            "shard_exec": "vmap",
            "optim": {"name": "adam", "learning_rate": 0.003},
        },
        (1, 2),
    ),
}


def trees_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.asarray(x).dtype == np.asarray(y).dtype
        and np.asarray(x).tobytes() == np.asarray(y).tobytes()
        for x, y in zip(la, lb, strict=True)
    )


def psum_control() -> list[str]:
    """The collective checker does see a collective when there is one."""
    from sisajax.layout import collectives_in

    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("shard",))
    spec = jax.sharding.PartitionSpec("shard")
    psum = jax.jit(
        jax.shard_map(lambda a: jax.lax.psum(a, "shard"), mesh=mesh, in_specs=spec, out_specs=spec)
    )
    return collectives_in(psum.lower(np.zeros(4, np.float32)).compile().as_text())


def shard_map_check(run, ds) -> dict:
    """The ``shard_map`` partitioning (one SPMD program) trains the same bits as ``run`` (map)."""
    from sisajax.engine import Engine, LayoutError, ShardJob, stack_states
    from sisajax.layout import collectives_in

    cfg = run.config
    eng = Engine(cfg, ds.feature_shape, ds.x_train.dtype, ds.num_classes, partitioning="shard_map")
    jobs = [ShardJob(k, run.shard_data(k)) for k in range(cfg.sisa.shards)]
    final, _ = eng.run(jobs, capacity=run.capacity)
    (program,) = eng.compiled_programs()
    try:  # refused with vmap: there its bits change with the shards per device
        vmap_cfg = cfg.replace(sisa={"shard_exec": "vmap"})
        Engine(vmap_cfg, ds.feature_shape, ds.x_train.dtype, 10, partitioning="shard_map")
        refused = False
    except LayoutError:
        refused = True
    return {
        "equal_to_per_device": trees_equal(stack_states(final), run.final_states()),
        "collectives": collectives_in(program.as_text()),
        "vmap_refused": refused,
    }


def main(out_dir: Path) -> None:
    from conftest import tiny_config, tiny_digits, without

    import sisajax as sj
    from sisajax.layout import collectives_in

    out_dir.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(out_dir / "jax-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    ds = tiny_digits()
    report: dict = {"device_count": jax.device_count(), "cases": {}}
    for name, (kwargs, (a, b)) in CASES.items():
        cfg = tiny_config(**kwargs)
        run, _ = sj.train(cfg, ds, out_dir / f"{name}_run")
        if name == "map_sgd":
            report["shard_map"] = shard_map_check(run, ds)
        ids = [int(run.shard_data(a).ids[0]), int(run.shard_data(b).ids[-1])]
        rep = sj.forget(run, ids)
        db = run.shard_data(b)
        one = [int(db.ids[db.slices == 0][0])]
        rep_one = sj.forget(run, one)  # one shard from slice 0: one device's program and init
        # what the forgets ran (map: on the engine narrowed to the devices they needed)
        engines = [run.engine, run.engine.narrowed(2), run.engine.narrowed(1)]
        programs = [p for e in engines for p in e.compiled_programs()]
        ids += one
        scratch, _ = sj.train(cfg, without(ds, ids), out_dir / f"{name}_scratch")
        blocks_equal = all(
            trees_equal(run.restore_block(k), scratch.restore_block(k))
            for k in range(cfg.sisa.shards)
        )
        _, x_test, _ = run.test_data()
        np.savez(
            out_dir / f"{name}.npz",
            ids=np.array(ids),
            logits=run.logits(x_test),
            predict=run.predict(x_test),
        )
        report["cases"][name] = {
            "layout": run.engine.layout(),
            "collectives": sorted({c for p in programs for c in collectives_in(p.as_text())}),
            "restart": {str(k): v for k, v in rep.restart.items()},
            "restart_one": {str(k): v for k, v in rep_one.restart.items()},
            "narrowed_programs": [len(e.compiled_programs()) for e in engines[1:]],
            "forget_equals_scratch": blocks_equal,
        }
    report["control_psum"] = psum_control()
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
