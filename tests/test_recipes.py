"""Training recipes for accuracy: each stays exact under forgetting.

Every option is a pure function of (slice index, step within the slice step, the slice step's own
budget) or of the config, so a forget restarting at slice r recomputes the same factors as a
from-scratch run on the retained data. Each test forgets ids from a middle slice and from the
first slice of another shard and compares every stored (shard, slice) state bit for bit.
"""

import numpy as np
import pytest
from conftest import assert_trees_equal, tiny_config, tiny_digits, without

import sisajax as sj
from sisajax.step import schedule_factor

RECIPES = {
    "ema": {"optim": {"averaging": "ema", "ema_decay": 0.99}},
    "polyak": {"optim": {"averaging": "polyak"}},
    "tail": {"optim": {"averaging": "tail", "tail_fraction": 0.3}},
    "cosine_run_warmup": {
        "optim": {"schedule": "cosine", "warmup_fraction": 0.1, "final_lr_fraction": 0.05}
    },
    "step_per_slice_step": {"optim": {"schedule": "step", "schedule_horizon": "slice_step"}},
    "smoothing_and_shard_scaling": {
        "optim": {"label_smoothing": 0.1, "lr_shard_exponent": 0.5, "weight_decay": 1e-4},
        "epochs_shard_exponent": 0.5,
    },
    "adam_fashion_best": {  # conf/experiment/accuracy.yaml's best recipe (ReLU aside)
        "optim": {
            "name": "adam",
            "learning_rate": 0.003,
            "schedule": "cosine",
            "warmup_fraction": 0.05,
            "lr_shard_exponent": 0.5,
            "label_smoothing": 0.2,
            "averaging": "ema",
            "ema_decay": 0.99,
        }
    },
    "adam_cosine_tail": {
        "optim": {
            "name": "adam",
            "learning_rate": 0.003,
            "schedule": "cosine",
            "averaging": "tail",
        }
    },
}


def _ids_in(run, shard, slice_):
    d = run.shard_data(shard)
    return d.ids[d.slices == slice_]


@pytest.mark.parametrize(
    ("recipe", "shard_exec"),
    [(r, "map") for r in sorted(RECIPES)]
    + [(r, "vmap") for r in ("adam_fashion_best", "tail", "step_per_slice_step")],
)
def test_recipe_forget_is_exact(tmp_path, recipe, shard_exec):
    """Under ``map`` (a loop over each shard's live steps) and ``vmap`` (a static trip count
    with masked no-op steps), every stored row after a forget equals training from scratch."""
    ds = tiny_digits()
    cfg = tiny_config(**RECIPES[recipe], shard_exec=shard_exec)
    run, _ = sj.train(cfg, ds, tmp_path / "run")
    ids = [int(_ids_in(run, 1, 2)[0]), int(_ids_in(run, 2, 0)[0])]  # middle slice, first slice
    rep = sj.forget(run, ids)
    assert rep.restart == {1: 2, 2: 0}
    scratch, _ = sj.train(cfg, without(ds, ids), tmp_path / "scratch")
    for k in range(run.num_shards):
        assert_trees_equal(run.restore_block(k), scratch.restore_block(k))
    if cfg.optim.averaging != "none":  # the average is stored and differs from the iterate
        block = run.restore_block(0)
        w, a = block.params["Dense_0"]["kernel"], block.avg_params["Dense_0"]["kernel"]
        assert w.shape == a.shape and not np.array_equal(w, a)


@pytest.mark.parametrize(
    "optim",
    [
        {"schedule": "cosine"},
        {"averaging": "tail"},
        {"label_smoothing": 0.2},
        {"lr_shard_exponent": 1.0},
    ],
)
def test_each_recipe_changes_the_model(tmp_path, optim):
    """No option is a silent no-op: the trained (or predicting) weights differ from the plain
    recipe's."""
    ds = tiny_digits()
    plain, _ = sj.train(tiny_config(), ds, tmp_path / "plain")
    other, _ = sj.train(tiny_config(optim=optim), ds, tmp_path / "other")
    a, b = plain.restore_block(0), other.restore_block(0)
    pa = a.params["Dense_0"]["kernel"][-1]
    pb = (b.avg_params or b.params)["Dense_0"]["kernel"][-1]
    assert not np.array_equal(pa, pb)


def test_schedule_factor_shapes():
    cosine = sj.OptimConfig(schedule="cosine", warmup_fraction=0.2, final_lr_fraction=0.1)
    f = [float(schedule_factor(cosine, np.float32(p))) for p in (0.0, 0.1, 0.2, 0.6, 1.0)]
    assert f[0] == 0.0 and f[1] == pytest.approx(0.5, abs=1e-3)  # linear warm-up from 0
    assert f[2] == pytest.approx(1.0, abs=1e-3)  # peak at the end of the warm-up
    assert f[3] == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-3)  # half-way through the cosine
    assert f[4] == pytest.approx(0.1, abs=1e-3)  # ends at final_lr_fraction
    step = sj.OptimConfig(schedule="step")
    g = [float(schedule_factor(step, np.float32(p))) for p in (0.1, 0.49, 0.51, 0.76)]
    assert g == pytest.approx([1.0, 1.0, 0.1, 0.01])


def test_epoch_scaling_is_counted(tmp_path):
    """More epochs per constituent cost more examples, and the train report counts them."""
    ds = tiny_digits()
    _, base = sj.train(tiny_config(), ds, tmp_path / "a")
    _, scaled = sj.train(tiny_config(epochs_shard_exponent=1.0), ds, tmp_path / "b")
    ratio = scaled.examples / base.examples
    assert 2.5 <= ratio <= 3.5  # S = 3: each constituent trains 3x the epochs


@pytest.mark.parametrize(
    "bad",
    [
        {"schedule": "linear"},
        {"schedule_horizon": "epoch"},
        {"warmup_fraction": 1.5},
        {"label_smoothing": 1.0},
        {"tail_fraction": 0.0},
        {"averaging": "swa"},
        {"lr_shard_exponent": 5},
    ],
)
def test_bad_recipe_options_are_refused(bad):
    with pytest.raises(sj.ConfigError, match="optim"):
        sj.OptimConfig(**bad)
