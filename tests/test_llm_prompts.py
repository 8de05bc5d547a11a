"""Prompt templates: slot placement, domain wording, endings, history truncation."""

from __future__ import annotations

import pytest

from delrec.errors import ConfigError
from delrec.llm.prompts import (
    DOMAINS,
    SLOT_PHRASE,
    SOFT_PROMPT_SLOT,
    lsr_prompt,
    rps_prompt,
    strip_slot,
    ta_prompt,
    truncate_history,
)

H = ["A (1990)", "B (1991)", "C (1992)"]
C = ["X (2000)", "Y (2001)"]


def _all(domain: str, soft: bool = True) -> dict[str, str]:
    return {
        "ta": ta_prompt(domain, "SASRec", H[:2], "M (1)", "N (2)", H, "Z (3)", C, soft_prompt=soft),
        "rps": rps_prompt(domain, "SASRec", H, C, ["Q (4)", "R (5)"], soft_prompt=soft),
        "lsr": lsr_prompt(domain, "SASRec", H, C, soft_prompt=soft),
    }


@pytest.mark.parametrize("domain", list(DOMAINS))
def test_slot_right_after_phrase_in_every_template(domain):
    for name, text in _all(domain).items():
        assert text.count(SOFT_PROMPT_SLOT) == 1, name
        assert SLOT_PHRASE.format(teacher="SASRec") + SOFT_PROMPT_SLOT in text, name
        assert text.endswith(":"), name  # the answer continues the prompt
        assert "X (2000), Y (2001)" in text, name


def test_domain_nouns():
    movie, game, home = _all("movie"), _all("game"), _all("home")
    assert "user's movie viewing history" in movie["ta"] and "The user has already watched" in movie["ta"]
    assert "user's game playing history" in game["ta"] and "has already played" in game["ta"]
    assert "furniture or kitchenware purchasing history" in home["lsr"]
    assert "The next movie the user will watch might be:" in movie["lsr"]
    assert "The next game the user will play might be:" in game["lsr"]
    assert "item purchasing" in _all("beauty")["rps"]


def test_ta_fields_in_order():
    t = _all("movie")["ta"]
    order = ["A (1990), B (1991), [movie M]", "plan to watch is N (2)", "history is M (1)",
             "also watched A (1990), B (1991), C (1992), [movie X]", "plan to watch is Z (3)",
             "[movie X] in user's movie viewing history is:"]
    positions = [t.index(s) for s in order]
    assert positions == sorted(positions)


def test_rps_shows_teacher_rest_before_the_answer():
    r = _all("movie")["rps"]
    assert r.endswith("might be:[movie X], Q (4), R (5). [movie X] is:")
    assert rps_prompt("movie", "SASRec", H, C, []).endswith("(predicted by the SASRec model) might be:")


def test_no_soft_prompt_removes_slot_only():
    for name, text in _all("movie", soft=False).items():
        assert SOFT_PROMPT_SLOT not in text
        assert text == strip_slot(_all("movie")[name])


def test_truncate_history_and_unknown_domain():
    assert truncate_history(H, 2) == H[1:]
    assert truncate_history(H, 10) == H
    assert truncate_history(H, 0) == []
    assert truncate_history(H, None) == H
    with pytest.raises(ValueError):
        truncate_history(H, -1)
    with pytest.raises(ConfigError) as e:
        lsr_prompt("books", "SASRec", H, C)
    assert e.value.field == "dataset.domain"


# --- index verbalizer ----------------------------------------------------------------------------------------------
def test_index_verbalizer_letters_the_candidates_and_scores_the_letters() -> None:
    import numpy as np

    from delrec.llm.prompts import ScoringConfig, TitleViews, render_lsr

    views = TitleViews.of(["pad", *H, *C])  # item 0 is padding
    prompts, cands = render_lsr(views, "movie", "SASRec", [np.array([1, 2])], np.array([[4, 5, 3]]), None,
                                verbalizer="index")
    assert "The candidate set is: (A) X (2000), (B) Y (2001), (C) C (1992). " in prompts[0]
    assert cands == [["A", "B", "C"]]  # the score of a candidate is its letter's
    titled = render_lsr(views, "movie", "SASRec", [np.array([1, 2])], np.array([[4, 5, 3]]), None)
    assert titled[1] == [["X (2000)", "Y (2001)", "C (1992)"]] and "(A)" not in titled[0][0]
    sc = ScoringConfig(verbalizer="index").validate()
    assert not sc.append_eos("causal") and not sc.append_eos("seq2seq")  # a letter is the whole answer
    with pytest.raises(ConfigError) as e:
        sc.check_candidates(27, "candidates.size")
    assert e.value.field == "candidates.size"
    with pytest.raises(ConfigError) as e:
        ScoringConfig(verbalizer="letters").validate()
    assert e.value.field == "scoring.verbalizer"


def test_index_verbalizer_reaches_ta_and_rps_prompts() -> None:
    from delrec.llm.prompts import candidate_list

    assert candidate_list(C, "index") == "(A) X (2000), (B) Y (2001)"
    ta = ta_prompt("movie", "SASRec", H[:2], "M (1)", "N (2)", H, "Z (3)", C, verbalizer="index")
    rps = rps_prompt("movie", "SASRec", H, C, ["Q (4)"], verbalizer="index")
    assert all("The candidate set is: (A) X (2000), (B) Y (2001). " in p for p in (ta, rps))


# --- open verbalizer -----------------------------------------------------------------------------------------------
def test_open_verbalizer_lists_no_candidates_and_scores_titles() -> None:
    import numpy as np

    from delrec.llm.prompts import ScoringConfig, TitleViews, render_lsr

    views = TitleViews.of(["pad", *H, *C])
    prompts, cands = render_lsr(views, "movie", "SASRec", [np.array([1, 2])], np.array([[4, 5, 3]]), None,
                                verbalizer="open")
    assert "candidate set is" not in prompts[0] and "X (2000)" not in prompts[0]
    assert prompts[0].endswith("might be:") and H[0] in prompts[0]
    assert cands == [["X (2000)", "Y (2001)", "C (1992)"]]
    ta = ta_prompt("movie", "SASRec", H[:2], "M (1)", "N (2)", H, "Z (3)", C, verbalizer="open")
    rps = rps_prompt("movie", "SASRec", H, C, ["Q (4)"], verbalizer="open")
    assert all("X (2000)" not in p and "candidate set is" not in p for p in (ta, rps))
    assert ScoringConfig(verbalizer="open", eos="always").validate().append_eos("causal")


# --- next verbalizer -----------------------------------------------------------------------------------------------
def test_next_verbalizer_leaves_the_history_list_open_and_windows_render_the_same_head() -> None:
    import numpy as np

    from delrec.llm.prompts import ITEM_END, TitleViews, lsr_head, render_lsr, render_windows

    views = TitleViews.of(["pad", *H, *C])
    prompts, cands = render_lsr(views, "movie", "SASRec", [np.array([1, 2])], np.array([[4, 5, 3]]), None,
                                verbalizer="next")
    head = lsr_head("movie", "SASRec")
    assert prompts[0] == head + f" {H[0]}{ITEM_END} {H[1]}{ITEM_END}"
    assert "candidate set" not in prompts[0] and cands == [["X (2000)", "Y (2001)", "C (1992)"]]
    heads, items = render_windows(views, "movie", "SASRec", [np.array([1, 2, 4])])
    assert heads == [head] and items == [[H[0], H[1], "X (2000)"]]
    assert render_windows(views, "movie", "SASRec", [np.array([1])], soft_prompt=False)[0][0] == strip_slot(head)
    with pytest.raises(ConfigError, match=r"scoring\.year"):
        render_windows(TitleViews.of(["pad", *H], "unscored"), "movie", "SASRec", [np.array([1, 2])])
