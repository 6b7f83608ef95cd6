"""``sisajax-sweep``: Hydra multirun over training runs, with the launchers in conf/hydra/launcher.

    sisajax-sweep --multirun hydra/launcher=parallel hydra.launcher.n_jobs=2 \
        sisa.shards=5,10,20 'run_dir=runs/sweep/s${sisa.shards}' progress=false

(``sisajax train`` composes configs with Hydra's compose API, which cannot launch jobs; this
entry point is a plain ``@hydra.main``. ``hydra/launcher=parallel|slurm`` needs
``pip install -e '.[cluster]'``.)
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig, OmegaConf


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    import sisajax as sj
    from experiments.cli import run_config_of, setup_jax

    logging.getLogger("absl").setLevel(logging.WARNING)
    setup_jax()
    c = OmegaConf.to_container(cfg, resolve=True)
    rc = run_config_of(c)
    ds = sj.load_dataset(rc.data.name, **rc.data.params)
    run, cost = sj.train(rc, ds, c["run_dir"], overwrite=c["overwrite"], devices=c.get("devices"))
    ev = run.evaluate()
    run.write_result("train", {"cost": cost.to_dict(), "evaluation": ev.to_dict()})
    return ev.accuracy


if __name__ == "__main__":
    main()
