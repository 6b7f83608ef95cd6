"""Populations of seeded models trained in one program (the forget-quality studies' oracles)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tiny_config, tiny_digits

from sisajax.populations import train_population
from sisajax.step import StepSpec


def test_a_population_keeps_the_recipe_of_s_and_its_draws_differ():
    ds = tiny_digits()
    cfg = tiny_config().replace(sisa={"shards": 2, "slices": 1}, optim={"lr_shard_exponent": 0.5})
    ids = np.arange(len(ds.y_train))
    pop = train_population(cfg, ids, ds.x_train, ds.y_train, ds.num_classes, 3, seed=7)
    # the learning rate scales with S = 2, not with the program's width 6
    assert StepSpec.build(pop.engine.config, ds.num_classes).shards == 2
    assert pop.engine.vmap_width >= 6 and pop.active.shape == (3, 2) and pop.active.all()
    z = pop.logits(ds.x_test[:9])
    assert z.shape == (3, 2, 9, ds.num_classes)
    p = pop.probs(ds.x_test[:9])
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
    assert not np.allclose(z[0], z[1])  # ensembles are independent draws
    again = train_population(cfg, ids, ds.x_train, ds.y_train, ds.num_classes, 3, seed=7)
    np.testing.assert_array_equal(again.logits(ds.x_test[:9]), z)  # same seed, same program
    other = train_population(cfg, ids, ds.x_train, ds.y_train, ds.num_classes, 3, seed=8)
    assert not np.allclose(other.logits(ds.x_test[:9]), z)
    # every example is seen the configured number of epochs by exactly one shard per ensemble
    assert pop.stats.examples == pytest.approx(3 * len(ids) * cfg.sisa.epochs, rel=0.01)
    with pytest.raises(ValueError, match="at least one"):
        train_population(cfg, ids, ds.x_train, ds.y_train, ds.num_classes, 0, seed=7)


def test_mia_shadows_keep_the_targets_recipe_of_s():
    from sisajax.mia import Population, train_shadows

    ds = tiny_digits(n_train=120)
    cfg = tiny_config(shards=2, slices=1, epochs=1).replace(optim={"lr_shard_exponent": 0.5})
    pop = Population(ds.train_ids, ds.x_train, ds.y_train)
    shadows = train_shadows(cfg, pop, ds.num_classes, 2, seed=3)
    assert shadows.config.sisa.shards == 2  # lr x 2**0.5, as the target's, not x 4**0.5
    assert shadows.logits.shape == (4, 120, ds.num_classes) and shadows.member.shape == (4, 120)
