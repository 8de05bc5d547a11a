"""Splits, frozen candidate sets and ranking metrics (the existing delrec.data.splits / candidates / metrics)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from delrec.data import CandidateSet, SeqDataset, draw_candidates, make_split
from delrec.errors import ConfigError, DataError
from delrec.metrics import bootstrap_ci, hit_rate, ndcg, ranks_from_scores, summarize


def make_ds(n_users: int = 60, n_items: int = 80, seed: int = 0) -> SeqDataset:
    rng = np.random.default_rng(seed)
    seqs = [rng.choice(np.arange(1, n_items + 1), size=int(rng.integers(4, 15)), replace=False) for _ in
            range(n_users)]
    return SeqDataset(name="syn", titles=["<pad>", *(f"Item {i}" for i in range(1, n_items + 1))],
                      item_ids=["", *(str(i) for i in range(1, n_items + 1))],
                      user_ids=[f"u{u}" for u in range(n_users)], sequences=[s.astype(np.int64) for s in seqs])


# --- splits ------------------------------------------------------------------------------------------------------
def test_user_split_partitions_users_reproducibly() -> None:
    ds = make_ds()
    sp = make_split(ds, "user", seed=1)
    parts = [set(sp.train_users), set(sp.valid_users), set(sp.test_users)]
    assert (len(parts[0]), len(parts[1]), len(parts[2])) == (48, 6, 6)
    assert parts[0] | parts[1] | parts[2] == set(range(ds.n_users))
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    again = make_split(ds, "user", seed=1)
    assert np.array_equal(again.test_users, sp.test_users)
    assert not np.array_equal(make_split(ds, "user", seed=2).test_users, sp.test_users)


def test_user_split_train_sequences_never_hold_valid_or_test_users() -> None:
    ds = make_ds()
    sp = make_split(ds, "user", seed=0)
    train = sp.train_sequences
    assert len(train) == len(sp.train_users)
    for u, seq in zip(sp.train_users, train, strict=True):
        assert np.array_equal(seq, ds.sequences[u])
    held = {int(u) for u in np.concatenate([sp.valid_users, sp.test_users])}
    assert held.isdisjoint(int(u) for u in sp.train_users)
    for part in ("valid", "test"):
        for ex in sp.examples(part):
            seq = ds.sequences[ex.user]
            assert ex.target == seq[-1] and np.array_equal(ex.history, seq[:-1])


def test_loo_split_semantics_and_no_leakage() -> None:
    ds = make_ds()
    sp = make_split(ds, "loo", seed=0)
    assert len(sp.train_users) == len(sp.valid_users) == len(sp.test_users) == ds.n_users
    valid = {ex.user: ex for ex in sp.examples("valid")}
    test = {ex.user: ex for ex in sp.examples("test")}
    for u, train in zip(sp.train_users, sp.train_sequences, strict=True):
        seq = ds.sequences[u]
        assert np.array_equal(train, seq[:-2])
        assert valid[u].target == seq[-2] and np.array_equal(valid[u].history, seq[:-2])
        assert test[u].target == seq[-1] and np.array_equal(test[u].history, seq[:-1])
        # items are unique per user here, so a leak would show as the target inside the training sequence
        assert valid[u].target not in train and test[u].target not in train


def test_train_examples_last_item_and_sliding() -> None:
    ds = make_ds()
    sp = make_split(ds, "loo")
    last = sp.examples("train")
    assert len(last) == ds.n_users
    for ex, train in zip(last, sp.train_sequences, strict=True):
        assert ex.target == train[-1] and np.array_equal(ex.history, train[:-1])
    sliding = sp.examples("train", sliding=True, min_history=2)
    assert len(sliding) == sum(len(s) - 2 for s in sp.train_sequences)
    assert all(len(ex.history) >= 2 for ex in sliding)


def test_split_errors() -> None:
    ds = make_ds()
    with pytest.raises(ConfigError) as e:
        make_split(ds, "random")
    assert e.value.field == "split.kind"
    with pytest.raises(ConfigError):
        make_split(ds, "user", ratios=(0.5, 0.5, 0.5))
    ds.sequences[3] = ds.sequences[3][:2]
    with pytest.raises(DataError, match="leave-one-out"):
        make_split(ds, "loo")
    ds.sequences[3] = ds.sequences[3][:1]
    with pytest.raises(DataError, match="fewer than 2"):
        make_split(ds, "user")


def test_split_round_trips_through_a_dict() -> None:
    ds = make_ds()
    sp = make_split(ds, "user", seed=5)
    back = type(sp).from_dict(sp.to_dict(), ds)
    assert back.kind == "user" and back.seed == 5
    assert all(np.array_equal(a, b) for a, b in zip(back.train_sequences, sp.train_sequences, strict=True))


# --- candidates ----------------------------------------------------------------------------------------------------
def test_candidates_unique_no_history_target_once() -> None:
    ds = make_ds()
    sp = make_split(ds, "loo")
    exs = sp.examples("test")
    cs = draw_candidates(exs, ds, size=20, seed=3)
    assert cs.items.shape == (len(exs), 20) and cs.size == 20 and len(cs) == len(exs)
    for row, ex in zip(cs.items, exs, strict=True):
        assert len(set(row.tolist())) == 20
        assert (row == ex.target).sum() == 1
        negatives = set(row.tolist()) - {ex.target}
        assert negatives.isdisjoint(ds.sequences[ex.user].tolist())  # the whole known sequence is excluded
        assert all(1 <= i <= ds.n_items for i in row)
    assert np.array_equal(cs.items[np.arange(len(cs)), cs.target_pos], cs.targets)


def test_weighted_negatives_follow_the_weights_and_keep_the_rules() -> None:
    """weights (stage 2's popularity-drawn training negatives): heavy items are drawn far more often, still without
    duplicates, history items or a second target; None keeps the uniform draw bit for bit."""
    ds = make_ds()
    exs = make_split(ds, "loo").examples("test")
    w = np.ones(ds.n_items + 1)
    w[1:11] = 1000.0  # items 1–10 carry ~93% of the weight
    heavy = draw_candidates(exs, ds, size=20, seed=3, weights=w)
    uniform = draw_candidates(exs, ds, size=20, seed=3)
    for row, ex in zip(heavy.items, exs, strict=True):
        assert len(set(row.tolist())) == 20 and (row == ex.target).sum() == 1
        assert (set(row.tolist()) - {ex.target}).isdisjoint(ds.sequences[ex.user].tolist())
    neg = lambda cs: cs.items[cs.items != cs.targets[:, None]]  # noqa: E731
    assert np.isin(neg(heavy), np.arange(1, 11)).mean() > 0.3 > np.isin(neg(uniform), np.arange(1, 11)).mean()
    np.testing.assert_array_equal(draw_candidates(exs, ds, size=20, seed=3, weights=None).items, uniform.items)


def test_candidates_reproducible_per_seed_and_hash() -> None:
    ds = make_ds()
    exs = make_split(ds, "loo").examples("test")
    a, b, c = (draw_candidates(exs, ds, size=10, seed=s) for s in (7, 7, 8))
    assert np.array_equal(a.items, b.items) and a.hash() == b.hash()
    assert not np.array_equal(a.items, c.items) and a.hash() != c.hash()
    # the target sits at varied positions (shuffled), not always first
    assert len(set(a.target_pos.tolist())) > 1


def test_candidate_hash_is_stable_and_survives_save_load(tmp_path: Path) -> None:
    cs = CandidateSet(np.array([0, 1]), np.array([3, 5]), np.array([[1, 3, 2], [5, 4, 6]]), seed=0)
    assert cs.hash() == "7b0189786373deaf"  # a change here invalidates every saved report
    h = cs.save(tmp_path / "c.parquet")
    back = CandidateSet.load(tmp_path / "c.parquet")
    assert h == back.hash() == cs.hash() and np.array_equal(back.items, cs.items)
    assert back.subset([1]).targets.tolist() == [5]


def test_candidate_load_and_draw_errors(tmp_path: Path) -> None:
    bad = CandidateSet(np.array([0]), np.array([9]), np.array([[1, 2, 3]]), seed=0)
    bad.save(tmp_path / "bad.parquet")
    with pytest.raises(DataError) as e:
        CandidateSet.load(tmp_path / "bad.parquet")
    assert e.value.line == 1 and e.value.field == "candidates"
    with pytest.raises(DataError):
        CandidateSet.load(tmp_path / "missing.parquet")
    ds = make_ds(n_items=20)
    exs = make_split(ds, "loo").examples("test")
    with pytest.raises(ConfigError):
        draw_candidates(exs, ds, size=1)
    with pytest.raises(ConfigError, match="unseen"):
        draw_candidates(exs, ds, size=20)


# --- metrics -------------------------------------------------------------------------------------------------------
def test_ranks_are_pessimistic_on_ties() -> None:
    scores = np.array([[0.5, 0.5, 0.5, 0.5], [0.1, 0.9, 0.3, 0.2], [0.4, 0.4, 0.1, 0.0], [1.0, 2.0, 3.0, 4.0]])
    target = np.array([0, 1, 1, 0])
    assert ranks_from_scores(scores, target).tolist() == [4, 1, 2, 4]
    mask = np.zeros_like(scores, dtype=bool)
    mask[3, 1:3] = True  # excluded candidates do not count above the target
    assert ranks_from_scores(scores, target, mask).tolist() == [4, 1, 2, 2]


def test_hit_rate_ndcg_summary() -> None:
    ranks = np.array([1, 2, 5, 6])
    assert hit_rate(ranks, 1).tolist() == [1, 0, 0, 0] and hit_rate(ranks, 5).mean() == 0.75
    assert np.allclose(ndcg(ranks, 5), [1.0, 1 / np.log2(3), 1 / np.log2(6), 0.0])
    s = summarize(ranks)
    assert set(s) == {"HR@1", "HR@5", "NDCG@5"} and s["HR@1"]["value"] == 0.25
    assert s["HR@5"]["lo"] <= s["HR@5"]["value"] <= s["HR@5"]["hi"]
    assert bootstrap_ci(np.ones(10)) == (1.0, 1.0)
    assert np.isnan(bootstrap_ci(np.array([]))[0])
    assert bootstrap_ci(ranks.astype(float), seed=1) == bootstrap_ci(ranks.astype(float), seed=1)
