"""Stage-2 distillation targets: a teacher's item distribution spelled along title tokens (`TitleTrie`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from delrec.llm.tiny import tiny_backbone
from delrec.llm.title_trie import TitleTrie

TITLES = ["Fargo (1996)", "Alien (1979)", "Batman Returns (1992)", "Babe (1995)", "Star Wars (1977)",
          "Heat (1995)", "Toy Story (1995)", "Jumanji (1995)", "Casino (1995)", "Sabrina (1995)"]


def test_targets_factorise_the_teacher_distribution_along_each_title() -> None:
    # items 1..4: [5, 7], [5, 8, 2], [5, 8, 3], [9]
    trie = TitleTrie([[], [5, 7], [5, 8, 2], [5, 8, 3], [9]])
    probs = np.array([0.0, 0.1, 0.2, 0.3, 0.4])
    t = trie.targets(3, probs)
    assert len(t) == 3
    root_tok, root_p = t[0]
    assert root_tok.tolist() == [5, 9] and np.allclose(root_p, [0.6, 0.4])
    assert t[1][0].tolist() == [7, 8] and np.allclose(t[1][1], [0.1 / 0.6, 0.5 / 0.6])
    assert t[2][0].tolist() == [2, 3] and np.allclose(t[2][1], [0.4, 0.6])
    # the product of the conditionals along a title is the teacher's probability of that item
    for item in range(1, 5):
        path = trie.targets(item, probs)
        p = np.prod([q[list(tok).index(tid)] for (tok, q), tid in zip(path, trie.token_ids[item], strict=True)])
        assert p == pytest.approx(probs[item])
    # no teacher mass on a prefix: the title's own token
    assert [x[0].tolist() for x in trie.targets(4, np.array([0.0, 1.0, 0, 0, 0]))] == [[5, 9]]
    assert trie.targets(2, np.array([0.0, 0, 0, 0, 1.0]))[1][0].tolist() == [8]


def test_sequence_distill_with_one_hot_targets_is_the_negative_score() -> None:
    """A one-hot target on each title's own tokens gives exactly the NLL; a spread target a larger loss, and the
    loss is differentiable."""
    from delrec.llm.prompts import ScoringConfig, lsr_head
    from delrec.llm.soft_prompt import SoftPrompt, SoftPromptConfig

    bb = tiny_backbone("llama")
    soft = SoftPrompt.init_for(bb, SoftPromptConfig(num_tokens=3))
    scorer = ScoringConfig(verbalizer="next", reduce="sum").scorer(bb, soft)
    rows = [TITLES[:4], TITLES[4:6]]
    heads = [lsr_head("movie", "SASRec")] * 2
    one_hot = [[(np.array([tid]), np.ones(1)) for tid in scorer.encode_title(row[k])]
               for row in rows for k in range(1, len(row))]
    scores, ce = scorer.sequence_distill(heads, rows, one_hot)
    torch.testing.assert_close(ce.detach(), -scores.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores.detach(), scorer.sequence_scores(heads, rows).detach())
    other = scorer.encode_title(TITLES[9])[0]
    spread = [[(np.array([tid, other]), np.array([0.5, 0.5])) for tid in scorer.encode_title(row[k])]
              for row in rows for k in range(1, len(row))]
    _, ce2 = scorer.sequence_distill(heads, rows, spread)
    assert not torch.allclose(ce2, ce)
    ce2.sum().backward()
    assert soft.weight.grad is not None and float(soft.weight.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="soft targets"):
        scorer.sequence_distill(heads, rows, one_hot[:-1])
