"""Constrained greedy generation over a prefix trie of the candidates' titles."""

from __future__ import annotations

import pytest
import torch

from delrec.llm import SoftPrompt, SoftPromptConfig, TitleScorer, lsr_prompt
from delrec.llm.generate import Generation, TitleTrie, generate_titles
from delrec.llm.tiny import tiny_backbone

CANDS = [["Fargo (1996)", "Alien (1979)", "Aliens (1986)"],
         ["Batman", "Batman Returns (1992)", "Heat (1995)"],  # "Batman" is a token prefix of another title
         ["Babe (1995)", "Star Wars (1977)", "Star Trek (1979)"]]


@pytest.mark.parametrize("kind", ["llama", "t5", "gemma3"])
def test_constrained_generation_returns_a_candidate_batch_independent(kind):
    bb = tiny_backbone(kind)
    scorer = TitleScorer(bb, SoftPrompt.init_for(bb, SoftPromptConfig(num_tokens=3)))
    prompts = [lsr_prompt("movie", "SASRec", ["Toy Story (1995)"] * (k + 1), c) for k, c in enumerate(CANDS)]
    gens = generate_titles(scorer, prompts, CANDS)
    for g, c in zip(gens, CANDS, strict=True):
        assert g.valid and g.index is not None
        assert g.text == c[g.index]
    # left padding / batching does not change the result
    assert gens == [generate_titles(scorer, [p], [c])[0] for p, c in zip(prompts, CANDS, strict=True)]


def test_constrained_first_step_is_the_best_allowed_token():
    bb = tiny_backbone("llama")
    scorer = TitleScorer(bb, None, "sum")
    by_first: dict[int, str] = {}
    for t in ["Fargo (1996)", "Heat (1995)", "Star Wars (1977)", "Toy Story (1995)", "Batman (1989)", "1", "q"]:
        by_first.setdefault(scorer.encode_title(t)[0], t)
    cands = [list(by_first.values())[:3]]
    assert len(cands[0]) == 3  # three titles with different first tokens
    prompt = [lsr_prompt("movie", "SASRec", ["Alien (1979)"], cands[0])]
    gen = generate_titles(scorer, prompt, cands)[0]
    # greedy picks the title whose first token is most likely after the prompt
    firsts = [scorer.encode_title(t)[0] for t in cands[0]]
    with torch.no_grad():
        ids = torch.tensor([scorer.encode_prompt(prompt[0])])
        logits = bb.model(input_ids=ids).logits[0, -1]
    assert gen.index == int(torch.stack([logits[f] for f in firsts]).argmax())


def test_unconstrained_validity_follows_substring_matching():
    bb = tiny_backbone("llama")
    scorer = TitleScorer(bb, None)
    prompts = [lsr_prompt("movie", "SASRec", ["Toy Story (1995)"], c) for c in CANDS]
    for g, c in zip(generate_titles(scorer, prompts, CANDS, constrained=False, max_new_tokens=6), CANDS,
                    strict=True):
        hits = [j for j, t in enumerate(c) if t.lower() in g.text.lower()]
        assert g.valid == (len(hits) == 1)
        assert g.index == (hits[0] if len(hits) == 1 else None)
        assert isinstance(g, Generation)


def test_trie():
    trie = TitleTrie([[1, 2, 9], [1, 3, 9], [1, 2, 4, 9]])
    assert trie.allowed(trie.root) == [1]
    assert sorted(trie.allowed(trie.root[1])) == [2, 3]
    assert sorted(trie.allowed(trie.root[1][2])) == [4, 9]
    assert trie.ending_at(trie.root[1][2][9]) == [0]
    assert trie.ending_at(trie.root[1][2]) == []
