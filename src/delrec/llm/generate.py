"""Greedy title generation, for the LLaRA-style generate-then-match protocol.

``constrained=True`` restricts every step to tokens that continue some candidate's title (a prefix trie over the
candidates' token ids, each ending with eos), so the output is always a candidate. ``constrained=False`` decodes
freely and an output is *valid* only if exactly one candidate title occurs in it (case-insensitive), as LLaRA
counts it. A short manual loop with a key/value cache is used instead of ``generate`` so that prompts can carry the
soft prompt as input embeddings for both causal and seq2seq models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from delrec.llm.scoring import TitleScorer, _cache_kwarg, _check, _pad_right


@dataclass(frozen=True)
class Generation:
    text: str  # the generated title (decoded, first line, stripped)
    index: int | None  # the candidate it names, None when invalid
    valid: bool  # exactly one candidate named


class TitleTrie:
    """Prefix trie over token sequences; a node maps token id → child, ``ends`` lists candidates ending there."""

    def __init__(self, sequences: Sequence[Sequence[int]]) -> None:
        self.root: dict[int, Any] = {}
        self.ends: dict[int, list[int]] = {}  # id(node) → candidate indices whose sequence ends at that node
        for j, seq in enumerate(sequences):
            node = self.root
            for t in seq:
                node = node.setdefault(int(t), {})
            self.ends.setdefault(id(node), []).append(j)

    def allowed(self, node: dict[int, Any]) -> list[int]:
        return list(node)

    def ending_at(self, node: dict[int, Any]) -> list[int]:
        return self.ends.get(id(node), [])


@torch.no_grad()
def generate_titles(scorer: TitleScorer, prompts: Sequence[str], candidates: Sequence[Sequence[str]], *,
                    constrained: bool = True, max_new_tokens: int = 64) -> list[Generation]:
    """Greedy-decode one title per prompt (uses the scorer's backbone, soft prompt and tokenization)."""
    _check(prompts, candidates)
    bb = scorer.backbone
    tok = bb.tokenizer
    eos = tok.eos_token_id
    tries = [TitleTrie([_gen_ids(scorer, t) for t in row]) for row in candidates]
    nodes: list[dict[int, Any] | None] = [t.root for t in tries]
    if constrained:
        max_new_tokens = max(max(len(s) for s in _flat_ids(scorer, row)) for row in candidates)
    model = bb.model
    was_training = model.training
    model.eval()
    try:
        step = _Stepper(scorer, prompts)
        out: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        logits = step.first()
        for _ in range(max_new_tokens):
            nxt = []
            for b in range(len(prompts)):
                if done[b]:
                    nxt.append(scorer._pad_id)
                    continue
                row = logits[b].float()
                if constrained:
                    node = nodes[b]
                    allowed = tries[b].allowed(node) if node is not None else []
                    if not allowed:  # a title ended without eos (append_eos=False) or nothing left
                        done[b] = True
                        nxt.append(scorer._pad_id)
                        continue
                    cand = torch.tensor(allowed, device=row.device)
                    t = int(cand[row[cand].argmax()])
                    nodes[b] = node[t]  # type: ignore[index]
                else:
                    t = int(row.argmax())
                out[b].append(t)
                if t == eos or (constrained and not nodes[b]):
                    done[b] = True
                nxt.append(t)
            if all(done):
                break
            logits = step.next(torch.tensor(nxt, device=bb.device))
    finally:
        model.train(was_training)
    results = []
    for b, ids in enumerate(out):
        text = tok.decode([t for t in ids if t != eos], skip_special_tokens=True).strip().split("\n")[0].strip()
        if constrained:
            node = nodes[b]
            hits = tries[b].ending_at(node) if node is not None and done[b] else []
            names = {candidates[b][j] for j in hits}
            ok = len(names) == 1 and len(hits) >= 1
            results.append(Generation(text, hits[0] if ok else None, ok))
        else:
            low = text.lower()
            hits = [j for j, c in enumerate(candidates[b]) if c.strip().lower() and c.strip().lower() in low]
            results.append(Generation(text, hits[0] if len(hits) == 1 else None, len(hits) == 1))
    return results


def _gen_ids(scorer: TitleScorer, title: str) -> list[int]:
    ids = scorer.encode_title(title)
    eos = scorer.backbone.tokenizer.eos_token_id
    return ids if (not ids or ids[-1] == eos or eos is None) else [*ids, eos]


def _flat_ids(scorer: TitleScorer, row: Sequence[str]) -> list[list[int]]:
    return [_gen_ids(scorer, t) for t in row]


class _Stepper:
    """Runs the prompt once, then one token per call, with a key/value cache (causal or seq2seq)."""

    def __init__(self, scorer: TitleScorer, prompts: Sequence[str]) -> None:
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        self.bb = bb = scorer.backbone
        self.scorer = scorer
        p_ids = [scorer.encode_prompt(p) for p in prompts]
        dev = bb.device
        if bb.kind == "causal":
            self.body = bb.base.base_model
            self.cache: Any = DynamicCache()
            T = max(len(p) for p in p_ids)  # left padding: every prompt ends at the same column
            ids = torch.full((len(p_ids), T), scorer._pad_id, dtype=torch.long)
            am = torch.zeros((len(p_ids), T), dtype=torch.long)
            for i, p in enumerate(p_ids):
                ids[i, T - len(p):] = torch.tensor(p)
                am[i, T - len(p):] = 1
            self.ids, self.am = ids.to(dev), am.to(dev)
            self.pos = (self.am.cumsum(1) - 1).clamp_min(0)
            self.emb = scorer.embed_ids(self.ids)
        else:
            ids, am = _pad_right(p_ids, scorer._pad_id, dev)
            with scorer.deep_prompt(ids):
                self.enc = bb.base.get_encoder()(inputs_embeds=scorer.embed_ids(ids),
                                                 attention_mask=am).last_hidden_state
            self.am = am
            self.body = bb.base.get_decoder()
            self.cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        self.kw = _cache_kwarg(self.body)

    def first(self) -> torch.Tensor:
        bb = self.bb
        if bb.kind == "causal":
            with self.scorer.deep_prompt(self.ids):  # the prompt pass; later steps read its cache
                h = self.body(inputs_embeds=self.emb, attention_mask=self.am, position_ids=self.pos, use_cache=True,
                              **{self.kw: self.cache}).last_hidden_state
        else:
            start = torch.full((self.am.shape[0], 1), bb.decoder_start_id(), dtype=torch.long, device=bb.device)
            h = self.body(input_ids=start, encoder_hidden_states=self.enc, encoder_attention_mask=self.am,
                          use_cache=True, **{self.kw: self.cache}).last_hidden_state
        return bb.head_logits(h[:, -1])

    def next(self, tokens: torch.Tensor) -> torch.Tensor:
        bb = self.bb
        if bb.kind == "causal":
            self.am = torch.cat([self.am, torch.ones_like(self.am[:, :1])], dim=1)
            self.pos = self.pos[:, -1:] + 1
            h = self.body(input_ids=tokens[:, None], attention_mask=self.am, position_ids=self.pos, use_cache=True,
                          **{self.kw: self.cache}).last_hidden_state
        else:
            h = self.body(input_ids=tokens[:, None], encoder_hidden_states=self.enc, encoder_attention_mask=self.am,
                          use_cache=True, **{self.kw: self.cache}).last_hidden_state
        return bb.head_logits(h[:, -1])
