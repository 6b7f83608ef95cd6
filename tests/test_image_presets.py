"""The image presets (CIFAR-10 ResNet-18, SVHN WRN-16-4) end to end at tiny size, on the
CIFAR-shaped generator instead of the real files (which tests never download)."""

from __future__ import annotations

import json

import pytest

from sisajax.cli.app import compose
from sisajax.config import run_config_from
from sisajax.experiments import paper

TINY = {
    "shards_cifar10": ["model.params.width=4", "model.params.stages=[1,1,1,1]"],
    "shards_svhn": ["model.params.depth=10", "model.params.widen=1"],
}
COMMON = [
    "data=cifar_synthetic",
    "data.params.n_train=64",
    "data.params.n_test=32",
    "experiment.shards=[1,2]",
    "sisa.epochs=1",
    "sisa.batch_size=16",
    "sisa.chunk_steps=4",
]


@pytest.mark.parametrize("preset", sorted(TINY))
def test_image_preset_composes_with_the_fields_recipe(preset):
    rc = run_config_from(compose("paper", [f"experiment={preset}"]))
    assert rc.model.name == {"shards_cifar10": "resnet18", "shards_svhn": "wrn"}[preset]
    assert rc.data.name == {"shards_cifar10": "cifar10", "shards_svhn": "svhn"}[preset]
    assert rc.optim.momentum == 0.9


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(TINY))
def test_image_preset_runs_end_to_end_at_tiny_size(preset, tmp_path):
    cfg = compose("paper", [f"experiment={preset}", *TINY[preset], *COMMON])
    res = paper.run_experiment(cfg, out_dir=tmp_path)
    assert [r["shards"] for r in res["rows"]] == [1, 2]
    for r in res["rows"]:
        assert 0.0 <= r["vote"] <= 1.0 and len(r["shard_accuracy"]) == r["shards"]
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["kind"] == "shards" and len(stored["rows"]) == 2
    assert (tmp_path / "report.md").is_file()
