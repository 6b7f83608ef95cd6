"""A sisajax plug-in: a residual MLP with BatchNorm and Dropout, and a data set of your own.

Use it from Python (``import tinyres_plugin`` before ``sj.train``) or from the command line::

    PYTHONPATH=docs/examples sisajax train plugins=[tinyres_plugin] model.name=tinyres \\
        data.name=moons 'data.params={n: 4000}' run_dir=runs/moons

Every later command on that run names the plug-in again (``plugins=[tinyres_plugin]``): a run
directory records which modules it needs but never imports them by itself.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

import sisajax as sj


class TinyRes(nn.Module):
    """``[B, *feat] -> [B, classes]``: dense stem, residual blocks (BatchNorm, ReLU, Dropout,
    Dense), dense head.

    The model contract (see docs/plugins.md): ``__call__(x, train=False, mask=None)``; ``train``
    switches BatchNorm to batch statistics and enables Dropout (its key comes from the ``dropout``
    RNG stream sisajax passes, derived from seed, shard, slice and step); ``mask`` is ``[B]`` bool,
    True for real examples (the last batch of an epoch is padded), so batch statistics skip the
    padding.
    """

    num_classes: int
    width: int = 64
    blocks: int = 2
    dropout: float = 0.1

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False, mask: jnp.ndarray | None = None):
        x = nn.Dense(self.width)(x.reshape((x.shape[0], -1)).astype(jnp.float32))
        m = None if mask is None else mask[:, None]
        for _ in range(self.blocks):
            h = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x, mask=m)
            h = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(h))
            x = x + nn.Dense(self.width)(h)
        return nn.Dense(self.num_classes)(x)


def _tinyres(cfg: sj.ModelConfig, num_classes: int) -> TinyRes:
    p = cfg.params
    return TinyRes(
        num_classes, int(p.get("width", 64)), int(p.get("blocks", 2)), float(p.get("dropout", 0.1))
    )


# params: the model.params keys it takes; sisajax refuses any other (a typo such as
# +model.params.widht=32 is an error, not silently the default width)
sj.register_model("tinyres", _tinyres, params=("width", "blocks", "dropout"))


@sj.register_dataset("moons")
def load_moons(n: int = 4000, noise: float = 0.25, test_fraction: float = 0.2, seed: int = 0):
    """Two interleaving half circles (scikit-learn's generator, seeded): ``[n, 2]`` float32."""
    from sklearn.datasets import make_moons

    x, y = make_moons(n_samples=n, noise=noise, random_state=seed)
    ids = np.arange(n, dtype=np.int64)
    test = ids % int(round(1 / test_fraction)) == 0
    return sj.from_arrays(
        x[~test].astype(np.float32),
        y[~test],
        x[test].astype(np.float32),
        y[test],
        train_ids=ids[~test],
        test_ids=ids[test],
        num_classes=2,
        name="moons",
    )
