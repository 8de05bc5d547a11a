"""TitleScorer: the fast path equals one-forward-per-candidate scoring, and gradients go where they should."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from delrec.llm import SoftPrompt, SoftPromptConfig, TitleScorer, lsr_prompt, rps_prompt
from delrec.llm.tiny import tiny_backbone

TITLES = ["Fargo (1996)", "Alien (1979)", "Batman Returns (1992)", "Babe (1995)", "Star Wars (1977)",
          "Star Trek (1979)", "Heat (1995)", "Toy Story (1995)", "Aliens (1986)", "Casino (1995)", "X"]


def _batch() -> tuple[list[str], list[list[str]]]:
    """Three examples of different prompt lengths and titles of different token lengths (forces padding)."""
    cands = [TITLES[0:4], TITLES[4:8], [TITLES[10], TITLES[8], "Batman (1989)", TITLES[9]]]
    prompts = [
        lsr_prompt("movie", "SASRec", TITLES[5:6], cands[0]),
        lsr_prompt("game", "GRU4Rec", TITLES[0:7], cands[1]),
        rps_prompt("beauty", "Caser", TITLES[1:4], cands[2], TITLES[6:8]),
    ]
    return prompts, cands


@pytest.fixture(scope="module", params=["llama", "t5", "gemma3"])
def backbone(request):
    return tiny_backbone(request.param)


@pytest.mark.parametrize("with_soft", [True, False])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_fast_equals_naive(backbone, with_soft, reduce):
    soft = SoftPrompt.init_for(backbone, SoftPromptConfig(num_tokens=6)) if with_soft else None
    scorer = TitleScorer(backbone, soft, reduce)
    prompts, cands = _batch()
    with torch.no_grad():
        fast = scorer.score(prompts, cands)
        naive = scorer.score_naive(prompts, cands)
    assert fast.shape == (3, 4)
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, naive, atol=2e-5, rtol=1e-5)
    # a real difference between candidates, so equality above is not trivial
    assert float(fast.std()) > 1e-3


def test_fast_equals_naive_eager_attention_and_tiny_logit_chunks():
    bb = tiny_backbone("llama", attn_implementation="eager")
    soft = SoftPrompt.init_for(bb, SoftPromptConfig(num_tokens=3))
    prompts, cands = _batch()
    scorer = TitleScorer(bb, soft, logit_chunk_mb=0)  # one row per logit chunk
    with torch.no_grad():
        torch.testing.assert_close(scorer.score(prompts, cands), scorer.score_naive(prompts, cands),
                                   atol=2e-5, rtol=1e-5)


def test_soft_prompt_changes_scores_and_slot_is_used(backbone):
    prompts, cands = _batch()
    a = SoftPrompt.init_for(backbone, SoftPromptConfig(num_tokens=4, seed=0))
    b = SoftPrompt.init_for(backbone, SoftPromptConfig(num_tokens=4, seed=1))
    with torch.no_grad():
        sa = TitleScorer(backbone, a).score(prompts, cands)
        sb = TitleScorer(backbone, b).score(prompts, cands)
    assert not torch.allclose(sa, sb)
    ids = TitleScorer(backbone, a).encode_prompt(prompts[0])
    assert ids.count(-1) == 4
    assert -1 not in TitleScorer(backbone, None).encode_prompt(prompts[0])


def test_gradients_reach_soft_prompt_only_and_match_naive(backbone):
    soft = SoftPrompt.init_for(backbone, SoftPromptConfig(num_tokens=5))
    scorer = TitleScorer(backbone, soft)
    prompts, cands = _batch()
    target = torch.tensor([1, 0, 3])
    F.cross_entropy(scorer.score(prompts, cands), target).backward()
    g_fast = soft.weight.grad.clone()
    assert g_fast.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in backbone.model.parameters())
    soft.weight.grad = None
    F.cross_entropy(scorer.score_naive(prompts, cands), target).backward()
    torch.testing.assert_close(g_fast, soft.weight.grad, atol=1e-4, rtol=1e-3)


def test_rank_is_numpy_in_input_order_and_restores_mode():
    bb = tiny_backbone("llama")
    soft = SoftPrompt.init_for(bb, SoftPromptConfig(num_tokens=2))
    scorer = TitleScorer(bb, soft, batch_size=2)
    prompts, cands = _batch()
    bb.model.train()
    r = scorer.rank(prompts, cands)
    assert bb.model.training
    bb.model.eval()
    assert isinstance(r, np.ndarray) and r.shape == (3, 4)
    with torch.no_grad():
        np.testing.assert_allclose(r, scorer.score(prompts, cands).numpy(), atol=1e-5)


def test_peft_wrapped_model_scores_and_trains_adapters():
    from peft import LoraConfig, get_peft_model

    bb = tiny_backbone("llama")
    soft = SoftPrompt.init_for(bb, SoftPromptConfig(num_tokens=3)).freeze()
    bb.model = get_peft_model(bb.model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    for n, p in bb.model.named_parameters():  # make the LoRA B matrices non-zero so adapters matter
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    bb.model.eval()
    assert bb.embed(torch.tensor([[1, 2]])).shape == (1, 2, bb.hidden_size)
    scorer = TitleScorer(bb, soft)
    prompts, cands = _batch()
    s = scorer.score(prompts, cands)
    with torch.no_grad():
        torch.testing.assert_close(s.detach(), scorer.score_naive(prompts, cands), atol=2e-5, rtol=1e-5)
    F.cross_entropy(s, torch.tensor([0, 1, 2])).backward()
    lora = [p for n, p in bb.model.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None for p in lora)
    assert soft.weight.grad is None


def test_input_errors():
    bb = tiny_backbone("llama")
    soft = SoftPrompt.init_for(bb, SoftPromptConfig(num_tokens=2))
    scorer = TitleScorer(bb, soft)
    prompts, cands = _batch()
    with pytest.raises(ValueError, match="same, non-zero number"):
        scorer.score(prompts, [cands[0], cands[1][:2], cands[2]])
    with pytest.raises(ValueError, match="prompts but"):
        scorer.score(prompts[:2], cands)
    with pytest.raises(ValueError, match="slot exactly once"):
        scorer.score(["no slot here:"], [["A"]])
    with pytest.raises(ValueError, match="hidden size"):
        TitleScorer(bb, SoftPrompt(SoftPromptConfig(num_tokens=2), bb.hidden_size + 1))


def test_index_verbalizer_scores_each_letter_at_the_answer_position(backbone):
    """With the index verbalizer a candidate's score is log p(its letter | prompt): one row of the head."""
    from delrec.llm.prompts import candidate_labels

    scorer = TitleScorer(backbone, None, append_eos=False)
    prompts = [lsr_prompt("movie", "SASRec", TITLES[:3], TITLES[3:7], verbalizer="index")]
    labels = [candidate_labels(TITLES[3:7], "index")]
    assert labels == [["A", "B", "C", "D"]] and "(A) Babe (1995), (B) Star Wars (1977)" in prompts[0]
    with torch.no_grad():
        fast = scorer.score(prompts, labels)
        naive = scorer.score_naive(prompts, labels)
    torch.testing.assert_close(fast, naive, atol=2e-5, rtol=1e-5)
    assert float(fast.std()) > 1e-4


# --- the `next` verbalizer's packed form ------------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "eos"), [("llama", "always"), ("gemma3", "always"), ("llama", "never")])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_sequence_scores_equal_each_item_scored_as_the_next_candidate(kind: str, eos: str, reduce: str) -> None:
    """One pass over a window scores item k exactly as `score` scores it after the window's items before it."""
    from delrec.llm.prompts import ScoringConfig, lsr_head

    bb = tiny_backbone(kind)  # gemma3's sliding window (8) is shorter than these windows: the window mask matters
    soft = SoftPrompt.init_for(bb, SoftPromptConfig(num_tokens=3))
    scorer = ScoringConfig(verbalizer="next", reduce=reduce, eos=eos).scorer(bb, soft)  # never: separator unscored
    rows = [TITLES[:6], TITLES[6:9], [TITLES[10], TITLES[2]]]  # unequal lengths: padding
    heads = [lsr_head("movie", "SASRec")] * 3
    packed = scorer.sequence_scores(heads, rows)
    ref = torch.cat([scorer.score([lsr_prompt("movie", "SASRec", row[:k], [], verbalizer="next")], [[row[k]]])[0]
                     for row in rows for k in range(1, len(row))])
    assert packed.shape == (5 + 2 + 1,)
    torch.testing.assert_close(packed.detach(), ref.detach(), atol=2e-5, rtol=1e-5)
    assert float(ref.detach().std()) > 1e-3
    packed.sum().backward()  # differentiable w.r.t. the soft prompt
    assert soft.weight.grad is not None and float(soft.weight.grad.abs().sum()) > 0


def test_next_verbalizer_ends_each_entry_and_candidate_with_the_separator() -> None:
    from delrec.llm.prompts import ITEM_SEP, ScoringConfig

    bb = tiny_backbone("llama")
    scorer = ScoringConfig(verbalizer="next").scorer(bb)
    sep = bb.tokenizer(ITEM_SEP, add_special_tokens=False)["input_ids"]
    title = scorer.encode_title("Heat (1995)")
    assert title[-len(sep):] == sep and bb.tokenizer.eos_token_id not in title
    prompt = scorer.encode_prompt(lsr_prompt("movie", "SASRec", ["Heat (1995)", "Fargo (1996)"], [],
                                             verbalizer="next"))
    # the history is token for token what the two titles scored as candidates are
    both = title + scorer.encode_title("Fargo (1996)")
    assert prompt[-len(both):] == both
    assert ScoringConfig(verbalizer="next", eos="never").scorer(bb).encode_title("Heat (1995)") == title[:-len(sep)]
    with pytest.raises(ValueError, match="causal"):
        ScoringConfig(verbalizer="next").scorer(tiny_backbone("t5")).sequence_scores(["x"], [["a", "b"]])


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_prior_scores_equal_each_pair_scored_alone(kind: str) -> None:
    """`prior_scores` scores each distinct (prompt, title) once, packed C to a row; every cell equals that title
    scored alone after its prompt, however the rows repeat prompts and titles."""
    from delrec.llm.scoring import prior_scores

    bb = tiny_backbone(kind)
    scorer = TitleScorer(bb, None, reduce="sum", batch_size=2)
    empty = lsr_prompt("movie", "SASRec", [], [], verbalizer="next")
    other = lsr_prompt("movie", "SASRec", [], TITLES[:3])
    prompts = [empty, empty, other, empty]
    cands = [TITLES[0:3], [TITLES[2], TITLES[3], TITLES[0]], TITLES[0:3], [TITLES[10], TITLES[4], TITLES[5]]]
    got = prior_scores(scorer, prompts, cands)
    with torch.no_grad():
        ref = np.array([[scorer.score([p], [[t]]).item() for t in row] for p, row in zip(prompts, cands, strict=True)])
    assert got.shape == (4, 3)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    assert got[0, 0] == got[1, 2] and got[0, 2] == got[1, 0]  # the same pair, one score
    assert not np.allclose(got[0], got[2])  # another prompt, another prior
    cache = {(empty, TITLES[0]): 123.0}  # a known pair is taken from the cache, the new ones are added to it
    cached = prior_scores(scorer, prompts, cands, cache=cache)
    assert cached[0, 0] == cached[1, 2] == 123.0 and cached[2, 0] == pytest.approx(got[2, 0])
    np.testing.assert_allclose(cached[3], got[3], rtol=1e-6)
    assert len(cache) == 1 + 6 + 3  # 1 given + the other 6 distinct titles after `empty` + 3 after `other`


def test_ranking_loss_compares_orderings_when_standardized() -> None:
    """The one candidate-level ranking loss (stage 1's ranking RPS, stage 2's teacher term): z-scored, it ignores
    each row's shift and scale — an LM's summed log-likelihoods and a teacher's logits are compared by ordering —
    and a one-hot target gives plain cross-entropy of the target column."""
    from delrec.llm.scoring import ranking_loss, soft_targets, zscore

    g = torch.Generator().manual_seed(0)
    lm, teacher = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    target = soft_targets(teacher, 0.5, standardize=True)
    assert torch.allclose(target.sum(1), torch.ones(4))
    assert torch.allclose(soft_targets(teacher * 7 - 3, 0.5, standardize=True), target, atol=1e-6)
    z = ranking_loss(lm, target, 0.5, standardize=True)
    assert torch.allclose(ranking_loss(lm * 30 - 50, target, 0.5, standardize=True), z, atol=1e-5)
    assert not torch.allclose(ranking_loss(lm * 30 - 50, target), ranking_loss(lm, target))  # raw: scale counts
    # the formulas both stages used before sharing it: stage 2's teacher term and stage 1's z-scored RPS
    assert torch.allclose(z, F.cross_entropy(zscore(lm) / 0.5, torch.softmax(zscore(teacher) / 0.5, dim=1)))
    assert torch.allclose(ranking_loss(lm, target), F.cross_entropy(lm, target))
    assert torch.allclose(ranking_loss(lm, target, 0.5, True, reduction="sum") / 4,
                          F.cross_entropy(zscore(lm) * (1 / 0.5), target, reduction="sum") / 4)
    cols = torch.tensor([1, 0, 9, 3])
    onehot = F.one_hot(cols, 10).float()
    assert torch.allclose(ranking_loss(lm, onehot), ranking_loss(lm, cols))
    assert ranking_loss(lm, cols, reduction="sum").item() == pytest.approx(4 * ranking_loss(lm, cols).item(), 1e-5)
