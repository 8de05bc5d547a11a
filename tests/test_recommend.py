"""`DELRec`: loading a run folder, recommending, title matching and leave-one-out explanations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from delrec.data import SeqDataset
from delrec.errors import DelrecError
from delrec.recommend import DELRec, RunSettings, read_run_config
from tiny_run import build_tiny_run


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> DELRec:
    return DELRec.from_pretrained(build_tiny_run(tmp_path_factory.mktemp("rec")))


def _history(model: DELRec, n: int = 6) -> list[int]:
    return [int(i) for i in model.dataset.sequences[0][:n]]


def test_loads_everything_in_the_run_folder(model: DELRec) -> None:
    info = model.info()
    assert info["soft_prompt"] is True and info["adapter"] is False
    assert info["teacher"] == "SASRec" and info["history_len"] == 8
    assert info["n_items"] == 40 and model.domain == "movie"


def test_short_histories_go_into_the_prompt_whole(model: DELRec) -> None:
    hist = _history(model, 6)  # shorter than history_len=8
    prompt = model.prompt(hist, [30, 31])
    assert all(model.dataset.titles[i] in prompt for i in hist)
    long = [int(i) for i in model.dataset.sequences[2]][:12]  # longer: only the 8 most recent
    prompt = model.prompt(long, [30, 31])
    assert [model.dataset.titles[i] in prompt for i in long] == [False] * 4 + [True] * 8


def test_adapter_is_loaded_and_used(model: DELRec, tmp_path_factory: pytest.TempPathFactory) -> None:
    adapted = DELRec.from_pretrained(build_tiny_run(tmp_path_factory.mktemp("adapter"), adapter=True))
    assert adapted.info()["adapter"] is True
    hist, cands = _history(model), [30, 31, 32, 33]
    a = [r.score for r in adapted.recommend(hist, k=4, candidates=cands)]
    b = [r.score for r in model.recommend(hist, k=4, candidates=cands)]
    assert not np.allclose(sorted(a), sorted(b), atol=1e-4)  # same backbone and soft prompt; only the adapter differs


def test_recommend_returns_k_unseen_items_sorted_by_score(model: DELRec) -> None:
    hist = _history(model)
    recs = model.recommend(hist, k=7)
    assert len(recs) == 7
    items = [r.item for r in recs]
    assert len(set(items)) == 7
    assert all(1 <= i <= model.dataset.n_items for i in items)
    assert not set(items) & set(hist)
    scores = [r.score for r in recs]
    assert scores == sorted(scores, reverse=True) and all(np.isfinite(scores))
    assert [r.title for r in recs] == [model.dataset.titles[i] for i in items]
    # Drawn candidates are seeded: the same history gives the same answer; titles and indices are interchangeable.
    again = model.recommend([model.dataset.titles[i] for i in hist], k=7)
    assert [r.item for r in again] == items
    np.testing.assert_allclose([r.score for r in again], scores, atol=1e-5)


def test_given_candidates_and_all_items(model: DELRec) -> None:
    hist = _history(model)
    given = [i for i in range(1, 41) if i not in hist][:5]
    recs = model.recommend(hist, k=10, candidates=[model.dataset.titles[given[0]], *given[1:]])
    assert sorted(r.item for r in recs) == sorted(given)  # k > 5 candidates: all 5, best first
    everything = model.recommend(hist, k=40, all_items=True)
    assert sorted(r.item for r in everything) == [i for i in range(1, 41) if i not in hist]
    assert [r.score for r in everything] == sorted((r.score for r in everything), reverse=True)
    with pytest.raises(DelrecError, match="either candidates or all_items"):
        model.recommend(hist, candidates=given, all_items=True)


def test_recommend_rejects_bad_k_and_empty_history(model: DELRec) -> None:
    with pytest.raises(DelrecError, match="k must be a positive integer"):
        model.recommend(_history(model), k=0)
    with pytest.raises(DelrecError, match="non-empty list"):
        model.recommend([])
    with pytest.raises(DelrecError, match=r"out of range 1\.\.40"):
        model.recommend([41])


def test_recommend_user_uses_the_whole_sequence(model: DELRec) -> None:
    uid = model.dataset.user_ids[3]
    seq = set(int(i) for i in model.dataset.sequences[3])
    recs = model.recommend_user(uid, k=5)
    assert len(recs) == 5 and not {r.item for r in recs} & seq
    with pytest.raises(DelrecError, match="no user 'nobody'"):
        model.recommend_user("nobody")


def test_explain_influence_is_the_direct_score_difference(model: DELRec) -> None:
    hist = [int(i) for i in model.dataset.sequences[1]][:10]  # longer than history_len=8: truncated
    ex = model.explain(hist, k=5)
    assert ex.history == hist[-8:]
    assert len(ex.influences) == 8 and {x.item for x in ex.influences} == set(ex.history)
    assert [x.influence for x in ex.influences] == sorted((x.influence for x in ex.influences), reverse=True)
    # The top recommendation and its score are what `recommend` gives on the same candidates.
    recs = model.recommend(hist, k=5, candidates=ex.candidates)
    assert [r.item for r in recs] == [r.item for r in ex.recommendations]
    assert recs[0].score == pytest.approx(ex.top.score, abs=1e-4)
    for x in (ex.influences[0], ex.influences[-1]):
        without = [i for i in ex.history if i != x.item]
        direct = {r.item: r.score for r in model.recommend(without, k=len(ex.candidates), candidates=ex.candidates)}
        assert x.influence == pytest.approx(ex.top.score - direct[ex.top.item], abs=1e-4)
    assert abs(ex.influences[0].influence) + abs(ex.influences[-1].influence) > 0  # the prompt matters at all
    # The teacher's own top-k over the whole catalogue sits beside it, history excluded.
    assert ex.teacher == "SASRec" and len(ex.teacher_topk) == 5
    assert [t.rank for t in ex.teacher_topk] == [1, 2, 3, 4, 5]
    assert not {t.item for t in ex.teacher_topk} & set(hist)
    assert all(t.in_candidates == (t.item in ex.candidates) for t in ex.teacher_topk)


# --- title matching: no LLM needed -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def titled() -> DELRec:
    titles = ["Toy Story (1995)", "Toy Story 2 (1999)", "Heat (1995)", "Heat (1986)", "Fargo (1996)"]
    items = pd.DataFrame({"item_id": [f"i{k}" for k in range(5)], "title": titles})
    inter = pd.DataFrame({"user_id": ["u"] * 5, "item_id": items["item_id"], "timestamp": range(5)})
    ds = SeqDataset.from_frames(inter, items, name="titled")
    return DELRec(ds, scorer=None, settings=RunSettings(backbone={}))


def test_titles_match_exactly_case_insensitively_without_year_and_with_typos(titled: DELRec) -> None:
    assert titled.resolve("Toy Story (1995)") == 1
    assert titled.resolve("  toy STORY 2   (1999) ") == 2
    assert titled.resolve("Fargo") == 5  # the year left out
    assert titled.resolve("Toy Story") == 1  # "Toy Story 2 (1999)" is not "Toy Story" + year
    assert titled.resolve("Toy Stroy (1995)") == 1  # one close match
    assert titled.resolve(3) == 3


def test_ambiguous_or_unknown_titles_list_the_candidates(titled: DELRec) -> None:
    with pytest.raises(DelrecError) as e:
        titled.resolve("Heat")
    assert "ambiguous" in str(e.value) and "'Heat (1995)'" in str(e.value) and "'Heat (1986)'" in str(e.value)
    with pytest.raises(DelrecError) as e:
        titled.resolve("Toy Storyy")
    assert "did you mean" in str(e.value)
    assert "'Toy Story (1995)'" in str(e.value) and "'Toy Story 2 (1999)'" in str(e.value)
    with pytest.raises(DelrecError, match="no item titled 'Star Wars'"):
        titled.resolve("Star Wars")
    with pytest.raises(DelrecError, match=r"history\[1\]"):
        titled.resolve_history(["Fargo", "Heat"])
    for bad in (0, 6, True, 1.5):
        with pytest.raises(DelrecError):
            titled.resolve(bad)  # type: ignore[arg-type]


def test_search_puts_prefix_matches_first(titled: DELRec) -> None:
    assert [t for _, t in titled.search("heat")] == ["Heat (1995)", "Heat (1986)"]
    assert [t for _, t in titled.search("story 2")] == ["Toy Story 2 (1999)"]
    assert titled.search("  ") == []


def test_run_config_defaults_and_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "config.yaml").write_text("backbone: {name_or_path: x}\n", encoding="utf-8")
    s = read_run_config(tmp_path)
    assert (s.teacher, s.teacher_name, s.history_len, s.candidates, s.domain) == ("sasrec", "SASRec", 20, 20, None)
    (tmp_path / "config.yaml").write_text("backbone: {name_or_path: x}\nteachers: {distill_from: gru4rec}\n"
                                          "distill: {history_len: 7}\nfinetune: {history_len: 9}\n", encoding="utf-8")
    s = read_run_config(tmp_path)
    assert (s.teacher, s.teacher_name, s.history_len) == ("gru4rec", "GRU4Rec", 9)  # the stage-2 prompt's length
    (tmp_path / "config.yaml").write_text("data: {domain: movie}\n", encoding="utf-8")
    with pytest.raises(DelrecError, match=r"backbone\.name_or_path"):
        read_run_config(tmp_path)
    with pytest.raises(DelrecError, match=r"no config\.yaml"):
        read_run_config(tmp_path / "missing")


@pytest.mark.parametrize(("year", "verbalizer"), [("keep", "title"), ("hidden", "title"), ("unscored", "index"),
                                                  ("keep", "open"), ("keep", "next")])
def test_training_evaluation_and_recommend_render_the_same_prompts(model: DELRec, year: str, verbalizer: str) -> None:
    """One LSR renderer: stage-2 training/validation (evaluate.lsr_inputs), stage-1 validation (distill.render_lsr)
    and `DELRec.recommend` (DELRec.inputs) give identical prompts and scored labels for every scoring option."""
    import dataclasses

    import numpy as np

    from delrec.data import draw_candidates, make_split
    from delrec.distill import render_lsr
    from delrec.evaluate import lsr_inputs

    ds = model.dataset
    ex = make_split(ds, "user", seed=0).examples("valid")[:3]
    cs = draw_candidates(ex, ds, size=6, seed=5)
    hist = [e.history for e in ex]
    rec = DELRec(ds, scorer=None, has_soft_prompt=True, settings=dataclasses.replace(
        model.settings, scoring={"year": year, "verbalizer": verbalizer}))
    s = rec.settings
    a = lsr_inputs(ds, hist, cs.items, rec.domain, s.teacher_name, s.history_len, year=year, verbalizer=verbalizer)
    b = render_lsr(ex, cs, ds, s.teacher_name, s.history_len, rec.domain, year=year, verbalizer=verbalizer)[:2]
    c = rec.inputs([h.tolist() for h in hist], np.asarray(cs.items).tolist())
    assert a == tuple(b) == c
    assert (verbalizer == "index") == ("(A) " in a[0][0])
    assert (verbalizer in ("open", "next")) == ("candidate set is" not in a[0][0])


def test_a_run_with_prior_weight_auto_recommends_with_the_lambda_it_chose(tmp_path) -> None:
    """``scoring.prior_weight=auto``: `DELRec` scores with the λ the run recorded; a run that has not chosen one
    yet is refused with one line naming its config."""
    import yaml

    from delrec.errors import ConfigError
    from delrec.io import write_json

    run = build_tiny_run(tmp_path)
    cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    cfg["scoring"]["prior_weight"] = "auto"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    with pytest.raises(ConfigError, match="prior_weight") as e:
        DELRec.from_pretrained(run)
    assert e.value.file is not None and str(e.value.file).endswith("config.yaml")
    write_json(run / "results" / "DELRec.json", {"prior_weight": 0.5})
    rec = DELRec.from_pretrained(run)
    assert rec.settings.scoring["prior_weight"] == 0.5
    history, cands = [1, 2, 3], [[4, 5, 6, 7]]
    plain = DELRec.from_pretrained(build_tiny_run(tmp_path / "plain"))
    empty = plain.score([[]], cands)
    np.testing.assert_allclose(rec.score([history], cands), plain.score([history], cands) - 0.5 * empty,
                               rtol=1e-4, atol=1e-4)
