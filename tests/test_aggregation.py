import numpy as np
import pytest

from sisajax.aggregation import accuracy, aggregate, mean_prob, vote


def test_vote_majority_and_tie_break():
    # 3 shards, 2 examples, 3 classes
    logits = np.array(
        [
            [[5.0, 0, 0], [0, 3.0, 0]],
            [[5.0, 0, 0], [0, 0, 1.0]],
            [[0, 0, 5.0], [2.0, 0, 0]],
        ]
    )
    # ex 0: two votes for class 0; ex 1: one vote each -> tie broken by mean probability (class 1)
    assert vote(logits).tolist() == [0, 1]


def test_mean_prob_differs_from_vote():
    logits = np.log(np.array([[[0.4, 0.6]], [[0.4, 0.6]], [[0.99, 0.01]]]))
    assert vote(logits).tolist() == [1]
    assert mean_prob(logits).argmax(-1).tolist() == [0]
    assert np.allclose(mean_prob(logits).sum(-1), 1.0)


def test_inactive_shards_drop_out():
    logits = np.array([[[9.0, 0]], [[0, 1.0]], [[0, 1.0]]])
    active = np.array([False, True, True])
    assert aggregate(logits, "vote", active).tolist() == [1]
    assert aggregate(logits, "mean_prob", np.array([True, False, False])).tolist() == [0]
    with pytest.raises(ValueError, match="no active shard"):
        vote(logits, np.zeros(3, bool))
    with pytest.raises(ValueError, match="must be one of vote, mean_prob"):
        aggregate(logits, "median")
    assert accuracy(np.array([1, 0]), np.array([1, 1])) == 0.5
