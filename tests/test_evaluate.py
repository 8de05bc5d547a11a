"""Evaluation: metrics on known score matrices, predictions files, refusing mixed candidate files, LLM scoring."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from delrec.data import CandidateSet, draw_candidates, make_split
from delrec.errors import DataError, DelrecError
from delrec.evaluate import (
    EvalResult,
    compare,
    evaluate_llm,
    evaluate_scores,
    histories_for,
    lsr_inputs,
    save_predictions,
)
from tiny_models import tiny_backbone, tiny_dataset, tiny_soft_prompt


def _cands(n: int = 4, c: int = 5, seed: int = 0) -> CandidateSet:
    rng = np.random.default_rng(seed)
    items = np.stack([rng.permutation(np.arange(1, 30))[:c] for _ in range(n)])
    targets = items[np.arange(n), rng.integers(0, c, n)]
    return CandidateSet(np.arange(n), targets, items, seed)


def test_evaluate_scores_known_matrix() -> None:
    cs = _cands()
    tp = cs.target_pos
    scores = np.zeros((4, 5))
    # Row 0: target best → rank 1. Row 1: two above → rank 3. Row 2: all above → rank 5.
    # Row 3: one candidate ties the target → pessimistic rank 2.
    scores[0] = -np.arange(5.0)
    scores[0, tp[0]] = 10.0
    scores[1] = [0.0] * 5
    scores[1, (tp[1] + 1) % 5] = 2.0
    scores[1, (tp[1] + 2) % 5] = 1.0
    scores[1, tp[1]] = 0.5
    scores[2] = 1.0
    scores[2, tp[2]] = -1.0
    scores[3] = -5.0
    scores[3, tp[3]] = 3.0
    scores[3, (tp[3] + 1) % 5] = 3.0
    res = evaluate_scores(scores, cs)
    assert res.ranks.tolist() == [1, 3, 5, 2]
    assert res.metrics["HR@1"]["value"] == pytest.approx(0.25)
    assert res.metrics["HR@5"]["value"] == pytest.approx(1.0)
    expected_ndcg = np.mean([1.0, 1 / math.log2(4), 1 / math.log2(6), 1 / math.log2(3)])
    assert res.metrics["NDCG@5"]["value"] == pytest.approx(expected_ndcg)
    assert res.metrics["HR@1"]["lo"] <= 0.25 <= res.metrics["HR@1"]["hi"]
    assert res.candidate_hash == cs.hash()
    assert res.valid_ratio == 1.0


def test_evaluate_scores_rejects_bad_shapes_and_nan() -> None:
    cs = _cands()
    with pytest.raises(DelrecError, match="shape"):
        evaluate_scores(np.zeros((3, 5)), cs)
    bad = np.zeros((4, 5))
    bad[0, 0] = np.nan
    with pytest.raises(DelrecError, match="NaN"):
        evaluate_scores(bad, cs)


def test_result_round_trips_through_dict() -> None:
    cs = _cands()
    res = evaluate_scores(np.random.default_rng(1).normal(size=(4, 5)), cs, seconds=1.5)
    back = EvalResult.from_dict(res.to_dict())
    assert back.ranks.tolist() == res.ranks.tolist()
    assert back.metrics == res.metrics
    assert back.candidate_hash == res.candidate_hash


def test_compare_refuses_different_candidate_files() -> None:
    a, b = _cands(seed=0), _cands(seed=1)
    rng = np.random.default_rng(0)
    ra, ra2, rb = (evaluate_scores(rng.normal(size=(4, 5)), c) for c in (a, a, b))
    table = compare({"sasrec": ra, "delrec": ra2})
    assert list(table.index) == ["sasrec", "delrec"]
    assert table.loc["delrec", "HR@1"] == ra2.metrics["HR@1"]["value"]
    assert table.loc["sasrec", "n"] == 4
    with pytest.raises(DelrecError, match="different candidate files"):
        compare({"sasrec": ra, "delrec": rb})
    with pytest.raises(DelrecError):
        compare({})


def test_save_predictions_writes_ranks_and_top_items(tmp_path) -> None:
    ds = tiny_dataset()
    split = make_split(ds, "user", seed=0)
    cs = draw_candidates(split.examples("test"), ds, size=10, seed=3)
    scores = -np.arange(10.0)[None, :].repeat(len(cs), 0)  # column 0 always on top
    res = evaluate_scores(scores, cs)
    path = save_predictions(tmp_path / "pred" / "m.parquet", res, ds, cs, top_k=3)
    df = pd.read_parquet(path)
    assert df["rank"].tolist() == (cs.target_pos + 1).tolist()
    assert [list(x) for x in df["top_items"]] == cs.items[:, :3].tolist()
    assert df["top_titles"].iloc[0][0] == ds.titles[int(cs.items[0, 0])]
    assert df["user_id"].tolist() == [ds.user_ids[u] for u in cs.users]
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.parquet"]  # no temp files left
    with pytest.raises(DelrecError, match="candidates"):
        save_predictions(tmp_path / "x.parquet", res, ds, draw_candidates(split.examples("test"), ds, 10, seed=4))


def test_histories_for_aligns_rows_and_rejects_foreign_candidates() -> None:
    ds = tiny_dataset()
    split = make_split(ds, "user", seed=0)
    test = split.examples("test")
    cs = draw_candidates(test, ds, size=10, seed=0).subset([2, 0, 1])
    hist = histories_for(cs, test)
    assert [h.tolist() for h in hist] == [test[i].history.tolist() for i in (2, 0, 1)]
    with pytest.raises(DataError, match="matches no example"):
        histories_for(cs, split.examples("valid"))


def test_lsr_inputs_show_truncated_history_and_candidates() -> None:
    ds = tiny_dataset()
    hist = [np.array([1, 2, 3, 4])]
    prompts, cands = lsr_inputs(ds, hist, np.array([[5, 6, 7]]), "movie", "SASRec", 2)
    assert cands == [[ds.titles[5], ds.titles[6], ds.titles[7]]]
    assert ds.titles[4] in prompts[0] and ds.titles[3] in prompts[0]
    assert ds.titles[2] not in prompts[0]  # older than the 2 most recent items
    assert "SASRec" in prompts[0]


@pytest.mark.parametrize("with_prompt", [True, False])
def test_evaluate_llm_ranks_every_row_like_the_scorer(with_prompt: bool) -> None:
    from delrec.llm.scoring import TitleScorer

    ds = tiny_dataset()
    split = make_split(ds, "user", seed=0)
    test = split.examples("test")
    cs = draw_candidates(test, ds, size=20, seed=0)
    bb = tiny_backbone("llama")
    sp = tiny_soft_prompt() if with_prompt else None
    hist = histories_for(cs, test)
    res = evaluate_llm(bb, sp, ds, cs, "movie", "SASRec", 5, 2, hist)
    assert res.n == len(cs) and res.candidate_hash == cs.hash() and res.valid_ratio == 1.0
    assert ((res.ranks >= 1) & (res.ranks <= 20)).all()
    # Same numbers as scoring the rows one by one (batching, sorting and padding change nothing).
    from delrec.llm.prompts import ScoringConfig

    sc = ScoringConfig()
    prompts, titles = lsr_inputs(ds, hist, cs.items, "movie", "SASRec", 5, soft_prompt=sp is not None, year=sc.year)
    with torch.no_grad():
        scorer = TitleScorer(bb, sp, append_eos=sc.append_eos(bb.kind))
        ref = np.concatenate([scorer.score([p], [t]).numpy() for p, t in zip(prompts, titles, strict=True)])
    np.testing.assert_allclose(res.scores, ref, rtol=1e-4, atol=1e-5)
    assert res.ranks.tolist() == evaluate_scores(ref, cs).ranks.tolist()


def test_popularity_scores_count_training_interactions_only() -> None:
    from delrec.evaluate import popularity_scores

    train = [np.array([1, 2, 2]), np.array([2, 3])]
    s = popularity_scores(train, np.array([[2, 1, 4], [3, 2, 1]]), n_items=4)
    np.testing.assert_array_equal(s, [[3, 1, 0], [1, 3, 1]])  # item 4 never trained: count 0


def test_chance_metrics_match_a_random_ranking() -> None:
    from delrec.evaluate import chance_metrics

    c = chance_metrics(20)
    assert c["HR@1"] == 0.05 and c["HR@5"] == 0.25
    rng = np.random.default_rng(0)
    ranks = rng.integers(1, 21, size=200_000)  # uniform rank of the target among 20
    ndcg = np.where(ranks <= 5, 1 / np.log2(ranks + 1), 0).mean()
    assert abs(ndcg - c["NDCG@5"]) < 0.003, (ndcg, c["NDCG@5"])


@pytest.mark.parametrize("weight", [0.5, 1.0])
def test_prior_weight_subtracts_each_candidates_score_after_an_empty_history(weight: float) -> None:
    """``scoring.prior_weight``: the LLM's score of each candidate less λ × its score after the same prompt with no
    history — in test evaluation (evaluate_llm → score_candidates) and in `DELRec.score` alike."""
    import dataclasses

    from delrec.llm.prompts import ScoringConfig
    from delrec.llm.scoring import TitleScorer
    from delrec.recommend import DELRec, RunSettings

    ds = tiny_dataset()
    split = make_split(ds, "user", seed=0)
    test = split.examples("test")
    cs = draw_candidates(test, ds, size=6, seed=0)
    bb = tiny_backbone("llama")
    sp = tiny_soft_prompt()
    hist = histories_for(cs, test)
    sc = ScoringConfig(verbalizer="next", reduce="sum")
    plain = evaluate_llm(bb, sp, ds, cs, "movie", "SASRec", 5, 2, hist, scoring=sc).scores
    got = evaluate_llm(bb, sp, ds, cs, "movie", "SASRec", 5, 2, hist,
                       scoring=dataclasses.replace(sc, prior_weight=weight)).scores
    empty = [np.zeros(0, dtype=np.int64)] * len(cs)
    prompts, titles = lsr_inputs(ds, empty, cs.items, "movie", "SASRec", 5, verbalizer="next")
    assert len(set(prompts)) == 1  # unlisted candidates: one empty-history prompt for every row
    scorer = sc.scorer(bb, sp)
    with torch.no_grad():
        prior = np.array([[scorer.score([p], [[t]]).item() for t in row] for p, row in zip(prompts, titles,
                                                                                          strict=True)])
    np.testing.assert_allclose(got, plain - weight * prior, rtol=1e-4, atol=1e-4)
    assert not np.allclose(got, plain)
    # DELRec.score (recommend, explain, serve) calibrates the same way
    settings = RunSettings(backbone={}, teacher_name="SASRec", history_len=5, candidates=6,
                           scoring={"verbalizer": "next", "reduce": "sum", "prior_weight": weight})
    rec = DELRec(ds, scorer=TitleScorer(bb, sp, reduce="sum", append_eos=sc.append_eos(bb.kind),
                                        end_text=sc.end_text(bb.kind)),
                 settings=settings, has_soft_prompt=True)
    rows = [h.tolist() for h in hist]
    np.testing.assert_allclose(rec.score(rows, cs.items.tolist()), got, rtol=1e-4, atol=1e-4)


def test_prior_weight_must_be_in_zero_one() -> None:
    from delrec.errors import ConfigError
    from delrec.llm.prompts import ScoringConfig

    for bad in (-0.1, 1.5, "x", True):
        with pytest.raises(ConfigError, match="prior_weight"):
            ScoringConfig(prior_weight=bad).validate()  # type: ignore[arg-type]
    assert ScoringConfig(prior_weight=0.75).validate().prior_weight == 0.75


def test_choose_prior_weight_reads_every_lambda_off_one_pair_of_score_matrices() -> None:
    """`choose_prior_weight`: the grid's λ whose ``scores − λ × prior`` ranks the targets best, the smallest on a
    tie, with each λ's metrics."""
    from delrec.metrics import PRIOR_GRID, choose_prior_weight, ndcg, ranks_from_scores

    rng = np.random.default_rng(0)
    target = np.zeros(50, dtype=np.int64)
    # the negatives outscore the target only through their strong priors: any λ ≥ 0.25 ranks it first
    prior = 10.0 + rng.normal(scale=0.1, size=(50, 6))
    prior[:, 0] = 0.0
    scores = prior.copy()
    scores[:, 0] = 9.0
    lam, table = choose_prior_weight(scores, prior, target, "NDCG@5")
    assert set(table) == set(PRIOR_GRID)
    for weight, m in table.items():
        expect = ndcg(ranks_from_scores(scores - weight * prior, target), 5).mean()
        assert m["NDCG@5"] == pytest.approx(expect)
    assert table[0.0]["HR@1"] == 0.0 and all(table[k]["HR@1"] == 1.0 for k in PRIOR_GRID if k >= 0.25)
    assert lam == 0.25  # the smallest of the tied best
    # equal scores for every λ (a zero prior): the smallest λ, i.e. no calibration
    assert choose_prior_weight(scores, np.zeros_like(prior), target)[0] == 0.0
    with pytest.raises(ValueError, match="shape"):
        choose_prior_weight(scores, prior[:, :3], target)


def test_prior_weight_auto_is_chosen_on_validation_rows_and_never_reaches_the_test_unresolved() -> None:
    """``scoring.prior_weight=auto``: `validation_metrics` returns the metrics of the best λ (as a fixed λ would
    score them) and the λ; the test evaluation refuses an unresolved ``auto``."""
    import dataclasses

    from delrec.errors import ConfigError
    from delrec.evaluate import validation_metrics
    from delrec.llm.prompts import ScoringConfig
    from delrec.metrics import PRIOR_GRID

    assert ScoringConfig(prior_weight="auto").validate().prior_weight == "auto"
    ds = tiny_dataset()
    split = make_split(ds, "user", seed=0)
    valid = split.examples("valid")
    cs = draw_candidates(valid, ds, size=6, seed=1)
    bb = tiny_backbone("llama")
    sp = tiny_soft_prompt()
    hist = histories_for(cs, valid)
    auto = ScoringConfig(verbalizer="next", reduce="sum", prior_weight="auto")
    scorer = auto.scorer(bb, sp)
    got = validation_metrics(scorer, ds, cs, hist, "movie", "SASRec", 5, 2, scoring=auto, metric="HR@5")
    assert got["prior_weight"] in PRIOR_GRID and len(got["by_prior"]) == len(PRIOR_GRID)
    fixed = {lam: validation_metrics(scorer, ds, cs, hist, "movie", "SASRec", 5, 2, metric="HR@5",
                                     scoring=dataclasses.replace(auto, prior_weight=lam)) for lam in PRIOR_GRID}
    for lam, m in fixed.items():
        assert got["by_prior"][str(lam)] == pytest.approx(m["HR@5"])
    assert got["HR@5"] == pytest.approx(max(m["HR@5"] for m in fixed.values()))
    assert got["NDCG@5"] == pytest.approx(fixed[got["prior_weight"]]["NDCG@5"])
    with pytest.raises(ConfigError, match="auto"):
        evaluate_llm(bb, sp, ds, cs, "movie", "SASRec", 5, 2, hist, scoring=auto)
