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


def test_eval_report_counts_each_shard_and_both_aggregations():
    from sisajax.aggregation import eval_report

    # shard 0 right on both, shard 1 right on ex 0 only, shard 2 empty (dropped)
    logits = np.array(
        [
            [[3.0, 0], [0, 3.0]],
            [[3.0, 0], [1.0, 0]],
            [[0, 9.0], [9.0, 0]],
        ]
    )
    y = np.array([0, 1])
    rep = eval_report(logits, y, np.array([True, True, False]), "mean_prob")
    assert rep.shard_accuracy[:2] == [1.0, 0.5] and np.isnan(rep.shard_accuracy[2])
    assert rep.active_shards == 2 and rep.num_examples == 2
    # ex 1: one vote each, the tie broken by the mean probability (class 1); counting the empty
    # shard would outvote it
    assert rep.vote_accuracy == 1.0 and rep.mean_prob_accuracy == 1.0
    assert eval_report(logits, y, np.ones(3, bool)).vote_accuracy == 0.5
    assert rep.accuracy == rep.mean_prob_accuracy
    assert rep.to_dict()["shard_accuracy"][2] is None
    with pytest.raises(Exception, match="aggregation"):
        eval_report(logits, y, np.ones(3, bool), "median")
