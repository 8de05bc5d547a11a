"""Candidate scoring: the log-likelihood of each candidate's whole title given the prompt (with the soft prompt).

``TitleScorer.score(prompts [B], candidates [B][C]) -> [B, C]`` is the one primitive both stages train and evaluate
with (loss = cross-entropy of the target column). It encodes each prompt once:

- causal LMs: one forward pass over ``prompt ‖ cand_1[:-1] ‖ … ‖ cand_C[:-1]`` with a 4-D attention mask in which
  every candidate token sees the prompt and the earlier tokens of its own candidate only, and position ids that
  restart after the prompt for each candidate. This equals scoring each ``prompt ‖ cand_j`` separately (the
  ``score_naive`` reference) while the prompt is run once and no key/value cache is copied C times. Sliding-window
  layers (Gemma 3, Mistral) get the window applied in that mask.
- seq2seq LMs: one encoder pass; one decoder step for the start token fills the cross-attention cache; that cache
  is repeated over C and all candidates are decoded in one batched pass (cross-attention keys/values are computed
  once per example, not once per candidate).

Full-vocabulary logits are computed only where a candidate token is predicted: for the first title token once per
example (it is predicted from the same position for all C candidates), for the others in chunks of rows of at most
``logit_chunk_mb`` MB, each recomputed in backward (activation checkpointing) instead of stored. No logits are ever
computed for prompt positions.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from delrec.llm.backbone import Backbone, block_input
from delrec.llm.prompts import ITEM_END, REDUCTIONS, SOFT_PROMPT_SLOT, strip_slot
from delrec.llm.soft_prompt import SoftPrompt
from delrec.llm.title_trie import pad_targets

SOFT_ID = -1  # placeholder id of a soft-prompt position inside prompt token lists


class TitleScorer:
    """Scores candidate titles under ``backbone`` with ``soft_prompt`` spliced in at `SOFT_PROMPT_SLOT`.

    ``reduce``: a title's score from its token log-probabilities: ``mean`` per token or ``sum`` (the title's
    log-probability).
    ``append_eos``: score the end-of-sequence token after each title too, so "Toy Story" is not favoured over
    "Toy Story 2" merely for being a prefix of it (and so generation knows where a title ends).
    ``end_text``: with ``append_eos``, the text whose tokens end a title instead of EOS (the ``next``
    verbalizer's list separator ","); it also replaces every `ITEM_END` marker of a prompt.
    ``batch_size``: examples per forward pass in `rank` (`score` runs what it is given as one batch).
    """

    def __init__(self, backbone: Backbone, soft_prompt: SoftPrompt | None, reduce: str = "mean", *,
                 append_eos: bool = True, end_text: str | None = None, batch_size: int = 4,
                 logit_chunk_mb: int = 64) -> None:
        self.backbone = backbone
        self.soft_prompt = soft_prompt
        if soft_prompt is not None:
            if soft_prompt.hidden_size != backbone.hidden_size:
                raise ValueError(f"soft prompt width {soft_prompt.hidden_size} != backbone hidden size "
                                 f"{backbone.hidden_size}")
            soft_prompt.to(backbone.device)
            if soft_prompt.deep and soft_prompt.num_layers != len(backbone.blocks()):
                raise ValueError(f"deep soft prompt of {soft_prompt.num_layers} layers on a backbone of "
                                 f"{len(backbone.blocks())} blocks")
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {', '.join(REDUCTIONS)}, got {reduce!r}")
        self.reduce = reduce
        self.append_eos = append_eos
        self.batch_size = batch_size
        self.logit_chunk_mb = logit_chunk_mb
        tok = backbone.tokenizer
        self._prefix, self._suffix = _special_affixes(tok)
        if backbone.kind == "causal":
            self._suffix = []  # the title continues the prompt directly
        self._pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else 0)
        self._eos_id = tok.eos_token_id
        if append_eos and end_text is None and self._eos_id is None:
            raise ValueError("append_eos=True but the tokenizer has no eos token")
        self._sep = tok(end_text or ",", add_special_tokens=False)["input_ids"]  # what replaces ITEM_END
        self._end = list(self._sep) if end_text is not None else [] if self._eos_id is None else [int(self._eos_id)]
        self._title_cache: dict[str, list[int]] = {}

    # --- tokenization -------------------------------------------------------------------------------------------
    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of ``text`` with `SOFT_ID` at the soft prompt positions (the marker is dropped if no prompt)."""
        if self.soft_prompt is None:
            parts = [strip_slot(text)]
        else:
            parts = text.split(SOFT_PROMPT_SLOT)
            if len(parts) != 2:
                raise ValueError(f"a prompt must contain the soft prompt slot exactly once, found {len(parts) - 1}")
        ids = list(self._prefix) + self._encode_text(parts[0])
        if len(parts) == 2:
            ids += [SOFT_ID] * self.soft_prompt.num_tokens  # type: ignore[union-attr]
            ids += self._encode_text(parts[1])
        return ids + list(self._suffix)

    def _encode_text(self, text: str) -> list[int]:
        """Tokens of prompt text; each `ITEM_END`-terminated piece alone, the marker → the separator's tokens."""
        tok = self.backbone.tokenizer
        pieces = text.split(ITEM_END)
        ids: list[int] = []
        for k, piece in enumerate(pieces):
            if piece:
                ids += tok(piece, add_special_tokens=False)["input_ids"]
            if k < len(pieces) - 1:
                ids += self._sep
        return ids

    def encode_title(self, title: str) -> list[int]:
        """The tokens a title is scored on: " title" after a causal prompt, "title" for a decoder (+ eos)."""
        ids = self._title_cache.get(title)
        if ids is None:
            text = title.strip()
            if self.backbone.kind == "causal":
                text = " " + text
            ids = self.backbone.tokenizer(text, add_special_tokens=False)["input_ids"]
            if self.append_eos:
                ids = [*ids, *self._end]
            if not ids:
                raise ValueError(f"title {title!r} has no tokens")
            self._title_cache[title] = ids
        return ids

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, T] ids (with `SOFT_ID` at soft positions) → [B, T, d] embeddings; soft rows taken from the prompt in
        order. Differentiable w.r.t. the soft prompt."""
        emb = self.backbone.embed(ids.clamp_min(0))
        at, sp = self._soft_positions(ids), self.soft_prompt
        if at is not None and sp is not None:
            soft, k = at
            emb = torch.where(soft[..., None], sp().to(emb.dtype)[k], emb)
        return emb

    def _soft_positions(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """[B, T] ids → (mask of the soft positions, which soft token sits at each), or None when there are none."""
        soft = ids == SOFT_ID
        if self.soft_prompt is None or not bool(soft.any()):
            return None
        return soft, (soft.cumsum(1) - 1).clamp(0, self.soft_prompt.num_tokens - 1)

    @contextlib.contextmanager
    def deep_prompt(self, ids: torch.Tensor) -> Iterator[None]:
        """While the model runs on ``ids`` (the ones `embed_ids` embedded): with a deep soft prompt, the input of
        every block after the first is that block's soft vectors at the soft positions. No-op otherwise."""
        sp = self.soft_prompt
        at = self._soft_positions(ids)
        if sp is None or not sp.deep or at is None:
            yield
            return
        soft, k = at
        handles = [block.register_forward_pre_hook(partial(_set_soft, soft=soft, k=k, vectors=partial(sp.layer, i)),
                                                   with_kwargs=True)
                   for i, block in enumerate(self.backbone.blocks()) if i > 0]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    # --- public API ---------------------------------------------------------------------------------------------
    def score(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]]) -> torch.Tensor:
        """[B, C] log-likelihood of every candidate title (sum or per-token mean) given its example's prompt.

        Differentiable (soft prompt, adapters) when grad is enabled; the model's train/eval mode is left as is.
        """
        c = _check(prompts, candidates)
        p_ids = [self.encode_prompt(p) for p in prompts]
        c_ids = [[self.encode_title(t) for t in row] for row in candidates]
        if self.backbone.kind == "causal":
            first, rest, owner = self._causal_logprobs(p_ids, c_ids)
        else:
            first, rest, owner = self._seq2seq_logprobs(p_ids, c_ids)
        lengths = torch.tensor([[len(x) for x in row] for row in c_ids], dtype=torch.float32, device=first.device)
        total = first.float().reshape(-1)
        if rest.numel():
            total = total.index_add(0, owner, rest.float())
        total = total.view(len(prompts), c)
        return total / lengths if self.reduce == "mean" else total

    def sequence_scores(self, prompts: Sequence[str], items: Sequence[Sequence[str]],
                        skip: int | Sequence[int] = 1) -> torch.Tensor:
        """Every item of each example scored as the next entry after the prompt and the items before it, in one
        causal pass per batch (the ``next`` verbalizer's packed form) → [N] scores of items ``skip`` onward (one
        number, or one per example), example by example. Item k's score equals `score` of
        ``prompt + open_list(items[:k])`` with candidate ``items[k]``.
        """
        return self._sequence(prompts, items, skip)[0]

    def sequence_distill(self, prompts: Sequence[str], items: Sequence[Sequence[str]],
                         targets: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]],
                         skip: int | Sequence[int] = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """`sequence_scores` and, for the same [N] items, the cross-entropy of the LM's next-token distributions
        against soft ``targets``: per scored item, one (token ids, probabilities) pair per token of its title
        (`delrec.llm.title_trie.TitleTrie.targets`), summed over the title like the score (or averaged, with
        ``reduce=mean``). A one-hot target gives exactly −score."""
        scores, soft = self._sequence(prompts, items, skip, targets)
        assert soft is not None
        return scores, soft

    def _sequence(self, prompts: Sequence[str], items: Sequence[Sequence[str]], skip: int | Sequence[int],
                  targets: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        skips = [skip] * len(items) if isinstance(skip, int) else [int(x) for x in skip]
        if self.backbone.kind != "causal":
            raise ValueError("sequence scoring needs a causal LM")
        if len(prompts) != len(items) or len(skips) != len(items) or not prompts:
            raise ValueError(f"{len(prompts)} prompts, {len(items)} item lists, {len(skips)} skips")
        dev = self.backbone.device
        seqs: list[list[int]] = []
        r_b, r_t, r_tgt, r_own, lengths = [], [], [], [], []
        for b, (prompt, row) in enumerate(zip(prompts, items, strict=True)):
            ids = self.encode_prompt(prompt)
            for k, title in enumerate(row):
                t = self.encode_title(title)
                if k >= skips[b]:  # token i of this item is predicted at the position before it
                    r_b += [b] * len(t)
                    r_t += list(range(len(ids) - 1, len(ids) - 1 + len(t)))
                    r_tgt += t
                    r_own += [len(lengths)] * len(t)
                    lengths.append(len(t))
                ids += t if self.append_eos else t + self._sep  # the separator a prompt's ITEM_END becomes
            seqs.append(ids)
        if not lengths:
            raise ValueError(f"no example has an item past its skip ({skip})")
        T = max(len(x) for x in seqs)
        ids_t = torch.full((len(seqs), T), self._pad_id, dtype=torch.long)
        am = torch.zeros((len(seqs), T), dtype=torch.long)
        for b, x in enumerate(seqs):
            ids_t[b, :len(x)] = torch.tensor(x)
            am[b, :len(x)] = 1
        ids_t, am = ids_t.to(dev), am.to(dev)
        body = self.backbone.base.base_model
        with self.deep_prompt(ids_t):
            hidden = body(inputs_embeds=self.embed_ids(ids_t), attention_mask=am, use_cache=False).last_hidden_state
        rows = hidden[torch.tensor(r_b, device=dev), torch.tensor(r_t, device=dev)]
        soft = None
        if targets is not None:
            flat = [t for per_item in targets for t in per_item]
            if len(flat) != len(r_tgt):
                raise ValueError(f"{len(flat)} soft targets for {len(r_tgt)} scored tokens")
            soft = pad_targets(flat, dev)
        lp, ce = self._token_logprobs(rows, torch.tensor(r_tgt, device=dev), soft)
        own = torch.tensor(r_own, device=dev)
        norm = torch.tensor(lengths, dtype=torch.float32, device=dev) if self.reduce == "mean" else None
        total = lp.float().new_zeros(len(lengths)).index_add(0, own, lp.float())
        kd = None if ce is None else ce.float().new_zeros(len(lengths)).index_add(0, own, ce.float())
        if norm is not None:
            total = total / norm
            kd = None if kd is None else kd / norm
        return total, kd

    @torch.no_grad()
    def rank(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]],
             progress: bool = False) -> np.ndarray:
        """[B, C] scores as numpy, without grad and in eval mode, in length-sorted batches of `batch_size`."""
        c = _check(prompts, candidates)
        model = self.backbone.model
        was_training = model.training
        model.eval()
        try:
            # Sorting by prompt length keeps padding small; scores are put back in the input order.
            order = np.argsort([len(p) for p in prompts], kind="stable")
            out = np.empty((len(prompts), c), dtype=np.float32)
            starts = range(0, len(order), self.batch_size)
            if progress:
                from tqdm.auto import tqdm

                starts = tqdm(starts, desc="scoring", unit="batch", disable=None)
            for s in starts:
                idx = order[s:s + self.batch_size]
                out[idx] = self.score([prompts[i] for i in idx], [candidates[i] for i in idx]).cpu().numpy()
            return out
        finally:
            model.train(was_training)

    def score_naive(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]]) -> torch.Tensor:
        """Reference: every (prompt, candidate) pair through the model's own forward, one pair at a time."""
        c = _check(prompts, candidates)
        dev = self.backbone.device
        out = torch.empty(len(prompts), c, device=dev)
        rows = []
        for b, prompt in enumerate(prompts):
            p = self.encode_prompt(prompt)
            for j, title in enumerate(candidates[b]):
                t = self.encode_title(title)
                if self.backbone.kind == "causal":
                    ids = torch.tensor([p + t[:-1]], device=dev)
                    with self.deep_prompt(ids):
                        logits = self.backbone.model(inputs_embeds=self.embed_ids(ids),
                                                     attention_mask=torch.ones_like(ids)).logits[0]
                    logits = logits[len(p) - 1:]
                else:
                    ids = torch.tensor([p], device=dev)
                    dec = torch.tensor([[self.backbone.decoder_start_id(), *t[:-1]]], device=dev)
                    with self.deep_prompt(ids):
                        logits = self.backbone.model(inputs_embeds=self.embed_ids(ids),
                                                     attention_mask=torch.ones_like(ids),
                                                     decoder_input_ids=dec).logits[0]
                lp = F.log_softmax(logits.float(), dim=-1).gather(1, torch.tensor(t, device=dev)[:, None])
                rows.append(((b, j), lp.sum() / (len(t) if self.reduce == "mean" else 1)))
        for (b, j), v in rows:
            out[b, j] = v
        return out

    # --- causal: one packed pass --------------------------------------------------------------------------------
    def _causal_logprobs(self, p_ids: list[list[int]], c_ids: list[list[list[int]]]
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """→ first-token log-probs [B, C], other-token log-probs [N] and their flat candidate index [N]."""
        bb, dev = self.backbone, self.backbone.device
        B, C = len(p_ids), len(c_ids[0])
        lens = [len(p) + sum(len(t) - 1 for t in row) for p, row in zip(p_ids, c_ids, strict=True)]
        T = max(lens)
        ids = np.full((B, T), self._pad_id, dtype=np.int64)
        seg = np.full((B, T), -2, dtype=np.int64)  # -2 pad, -1 prompt, j candidate j
        pos = np.zeros((B, T), dtype=np.int64)
        last = np.empty(B, dtype=np.int64)  # last prompt position: predicts every candidate's first token
        r_b, r_t, r_tgt, r_own = [], [], [], []  # hidden row (b, t) → target token, owning candidate b*C+j
        for b, (p, row) in enumerate(zip(p_ids, c_ids, strict=True)):
            lp = len(p)
            ids[b, :lp], seg[b, :lp], pos[b, :lp] = p, -1, np.arange(lp)
            last[b] = lp - 1
            off = lp
            for j, t in enumerate(row):
                n = len(t) - 1
                ids[b, off:off + n], seg[b, off:off + n], pos[b, off:off + n] = t[:-1], j, lp + np.arange(n)
                # token k>=1 of candidate j is predicted at the position of its token k-1
                r_b += [b] * n
                r_t += list(range(off, off + n))
                r_tgt += t[1:]
                r_own += [b * C + j] * n
                off += n
        ids_t = torch.from_numpy(ids).to(dev)
        seg_t = torch.from_numpy(seg).to(dev)
        pos_t = torch.from_numpy(pos).to(dev)
        emb = self.embed_ids(ids_t)
        mask = self._packed_mask(seg_t, pos_t, emb.dtype)
        body = bb.base.base_model
        with self.deep_prompt(ids_t):
            hidden = body(inputs_embeds=emb, attention_mask=mask, position_ids=pos_t,
                          use_cache=False).last_hidden_state
        first_ids = torch.tensor([[t[0] for t in row] for row in c_ids], device=dev)  # [B, C]
        h_last = hidden[torch.arange(B, device=dev), torch.from_numpy(last).to(dev)]  # [B, d]
        first = F.log_softmax(bb.head_logits(h_last).float(), dim=-1).gather(1, first_ids)  # [B, C]
        if not r_b:
            return first, first.new_zeros(0), torch.zeros(0, dtype=torch.long, device=dev)
        rows = hidden[torch.tensor(r_b, device=dev), torch.tensor(r_t, device=dev)]  # [N, d]
        rest = self._token_logprobs(rows, torch.tensor(r_tgt, device=dev))[0]
        return first, rest, torch.tensor(r_own, device=dev)

    def _packed_mask(self, seg: torch.Tensor, pos: torch.Tensor, dtype: torch.dtype) -> Any:
        """Additive [B, 1, T, T] mask: prompt causal; candidate tokens see the prompt + own earlier tokens."""
        T = seg.shape[1]
        idx = torch.arange(T, device=seg.device)
        causal = idx[None, :] <= idx[:, None]  # [T(q), T(k)]
        real = seg >= -1
        same = (seg[:, None, :] == -1) | (seg[:, None, :] == seg[:, :, None])  # key is prompt or same candidate
        allowed = causal[None] & same & real[:, None, :] & real[:, :, None]
        allowed |= torch.eye(T, dtype=torch.bool, device=seg.device)[None]  # pad rows: no all-masked softmax
        cfg = self.backbone.base.config
        cfg = getattr(cfg, "text_config", None) or cfg
        window = getattr(cfg, "sliding_window", None)
        layer_types = getattr(cfg, "layer_types", None)

        def additive(a: torch.Tensor) -> torch.Tensor:
            m = torch.zeros(a.shape, dtype=dtype, device=a.device).masked_fill_(~a, torch.finfo(dtype).min)
            return m[:, None]

        if window and (layer_types is None or "sliding_attention" in layer_types) and \
                getattr(cfg, "use_sliding_window", True) is not False:
            near = (pos[:, :, None] - pos[:, None, :]) < window
            sliding = additive(allowed & (near | torch.eye(T, dtype=torch.bool, device=seg.device)[None]))
            if layer_types is None:
                return sliding
            return {"full_attention": additive(allowed), "sliding_attention": sliding}
        return additive(allowed)

    # --- seq2seq: encoder once, decoder batched over candidates -------------------------------------------------
    def _seq2seq_logprobs(self, p_ids: list[list[int]], c_ids: list[list[list[int]]]
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        bb, dev = self.backbone, self.backbone.device
        B, C = len(p_ids), len(c_ids[0])
        ids, am = _pad_right(p_ids, self._pad_id, dev)
        base = bb.base
        with self.deep_prompt(ids):
            enc = base.get_encoder()(inputs_embeds=self.embed_ids(ids), attention_mask=am).last_hidden_state
        decoder = base.get_decoder()
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        kw = _cache_kwarg(decoder)
        start = torch.full((B, 1), bb.decoder_start_id(), dtype=torch.long, device=dev)
        h0 = decoder(input_ids=start, encoder_hidden_states=enc, encoder_attention_mask=am,
                     use_cache=True, **{kw: cache}).last_hidden_state[:, 0]  # [B, d]
        first_ids = torch.tensor([[t[0] for t in row] for row in c_ids], device=dev)
        first = F.log_softmax(bb.head_logits(h0).float(), dim=-1).gather(1, first_ids)
        flat = [t for row in c_ids for t in row]  # [B*C]
        n_max = max(len(t) for t in flat) - 1
        if n_max == 0:
            return first, first.new_zeros(0), torch.zeros(0, dtype=torch.long, device=dev)
        dec_in = torch.full((B * C, n_max), self._pad_id, dtype=torch.long, device=dev)
        for i, t in enumerate(flat):  # right padding: causal self-attention never looks at later pads
            if len(t) > 1:
                dec_in[i, :len(t) - 1] = torch.tensor(t[:-1], device=dev)
        cache.batch_repeat_interleave(C)  # cross-attention K/V computed once above, shared by the C candidates
        h = decoder(input_ids=dec_in, encoder_hidden_states=enc.repeat_interleave(C, 0),
                    encoder_attention_mask=am.repeat_interleave(C, 0), use_cache=True,
                    **{kw: cache}).last_hidden_state  # [B*C, n_max, d]
        r_i = [i for i, t in enumerate(flat) for _ in range(len(t) - 1)]
        r_t = [k for t in flat for k in range(len(t) - 1)]
        r_tgt = [x for t in flat for x in t[1:]]
        rows = h[torch.tensor(r_i, device=dev), torch.tensor(r_t, device=dev)]
        return first, self._token_logprobs(rows, torch.tensor(r_tgt, device=dev))[0], torch.tensor(r_i, device=dev)

    # --- vocabulary log-softmax at the needed rows only ---------------------------------------------------------
    def _token_logprobs(self, rows: torch.Tensor, targets: torch.Tensor,
                        soft: tuple[torch.Tensor, torch.Tensor] | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[N, d] final hidden states, [N] target ids → [N] log p(target) (full softmax, chunked over rows).

        With ``soft`` = ([N, S] token ids, [N, S] probabilities) also the [N] cross-entropy −Σ p log q of each row's
        soft target, from the same logits → (log p(target), cross-entropy or None)."""
        v = self.backbone.vocab_size
        chunk = max(1, (self.logit_chunk_mb << 20) // (4 * v))
        head = self.backbone.head_logits

        def lp(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            logits = head(h).float()
            return logits.gather(1, y[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)

        def lp_ce(h: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
            logits = head(h).float()
            lse = torch.logsumexp(logits, dim=-1)
            ce = lse * p.sum(1) - (logits.gather(1, ids) * p).sum(1)
            return torch.stack([logits.gather(1, y[:, None])[:, 0] - lse, ce])

        out = []
        for s in range(0, rows.shape[0], chunk):
            h, y = rows[s:s + chunk], targets[s:s + chunk]
            args = (h, y) if soft is None else (h, y, soft[0][s:s + chunk], soft[1][s:s + chunk])
            fn = lp if soft is None else lp_ce
            if torch.is_grad_enabled() and h.requires_grad:
                out.append(checkpoint(fn, *args, use_reentrant=False))  # recompute [chunk, V] in backward
            else:
                out.append(fn(*args))
        if soft is None:
            return torch.cat(out), None
        both = torch.cat(out, dim=1)
        return both[0], both[1]


def zscore(scores: torch.Tensor) -> torch.Tensor:
    """Each row's scores less their mean, over their standard deviation (a constant row becomes zeros): ranking
    losses on z-scored rows compare two models' orderings of a candidate set, not their scales."""
    centred = scores - scores.mean(dim=-1, keepdim=True)
    return centred / centred.std(dim=-1, keepdim=True).clamp_min(1e-6)


def soft_targets(logits: torch.Tensor, temperature: float = 1.0, standardize: bool = False) -> torch.Tensor:
    """[B, C] candidate logits (a teacher's, or a 0/1 row on the true item) as the soft labels of `ranking_loss`:
    the softmax of each row over ``temperature``, of the z-scored row with ``standardize``."""
    return torch.softmax((zscore(logits) if standardize else logits) / temperature, dim=-1)


def ranking_loss(scores: torch.Tensor, target: torch.Tensor, temperature: float = 1.0, standardize: bool = False,
                 reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the LM's softmax over each candidate set ([B, C] scores) against ``target`` — each row's
    target column ([B] integers) or a distribution over its candidates ([B, C], `soft_targets`). With
    ``standardize`` the scores are z-scored and over ``temperature`` first, as `soft_targets` treats the teacher's:
    the one candidate-level ranking loss of stage 1 (``distill.rps_standardize``) and stage 2's teacher term."""
    s = scores.float()
    if standardize:
        s = zscore(s) / temperature
    return F.cross_entropy(s, target.to(s.device), reduction=reduction)


def prior_scores(scorer: TitleScorer, prompts: Sequence[str], candidates: Sequence[Sequence[str]],
                 progress: bool = False, cache: dict[tuple[str, str], float] | None = None) -> np.ndarray:
    """[B, C] score of each candidate after its row's prompt, each distinct (prompt, title) pair scored once.

    For `ScoringConfig.prior_weight`: ``prompts`` are the rows' prompts rendered with an empty history. Under the
    verbalizers that do not list the candidates every row then has the same prompt, so a catalogue item is scored
    once however many rows hold it; the pairs are packed C to a row (the scorer's batch shape). ``cache``: scores
    of pairs already known, filled in with the new ones — only for a model that no longer changes (`DELRec`)."""
    c = _check(prompts, candidates)
    value: dict[tuple[str, str], float] = {} if cache is None else cache
    by_prompt: dict[str, dict[str, None]] = {}
    for p, row in zip(prompts, candidates, strict=True):
        by_prompt.setdefault(p, {}).update(dict.fromkeys(t for t in row if (p, t) not in value))
    rows_p: list[str] = []
    rows_c: list[list[str]] = []
    for p, titles in by_prompt.items():
        ts = list(titles)
        for s in range(0, len(ts), c):
            chunk = ts[s:s + c]
            rows_p.append(p)
            rows_c.append(chunk + [chunk[0]] * (c - len(chunk)))  # pad the last row to the common width
    if rows_p:
        with torch.no_grad():
            flat = scorer.rank(rows_p, rows_c, progress=progress)
        value.update({(p, t): float(v) for p, row, vs in zip(rows_p, rows_c, flat, strict=True)
                      for t, v in zip(row, vs, strict=True)})
    return np.array([[value[(p, t)] for t in row] for p, row in zip(prompts, candidates, strict=True)],
                    dtype=np.float32)


def _set_soft(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *, soft: torch.Tensor,
              k: torch.Tensor, vectors: Any) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Forward pre-hook of one block: its input hidden states at the soft positions ``soft`` [B, T] ← row ``k`` of
    ``vectors()`` [P, d]. Calls on other shapes (a generation step after the prompt) pass through."""
    h = block_input(args, kwargs)
    if h.shape[:2] != soft.shape:
        return None
    new = torch.where(soft[..., None], vectors().to(h.dtype)[k], h)
    if args:
        return (new, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": new}


def _check(prompts: Sequence[str], candidates: Sequence[Sequence[str]]) -> int:
    if len(prompts) != len(candidates):
        raise ValueError(f"{len(prompts)} prompts but {len(candidates)} candidate lists")
    if not prompts:
        raise ValueError("nothing to score")
    sizes = {len(c) for c in candidates}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"every example needs the same, non-zero number of candidates, got {sorted(sizes)}")
    return sizes.pop()


def _special_affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer adds before/after a text (e.g. BOS for Gemma, ``</s>`` for T5)."""
    probe = "hello world"
    full = tokenizer(probe)["input_ids"]
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for k in range(len(full) - len(bare) + 1):
        if full[k:k + len(bare)] == bare:
            return full[:k], full[k + len(bare):]
    return [], []


def _pad_right(seqs: list[list[int]], pad: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    am = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        am[i, :len(s)] = 1
    return ids.to(dev), am.to(dev)


def _cache_kwarg(module: torch.nn.Module) -> str:
    """transformers ≥5.x calls the cache argument ``cache``; earlier versions ``past_key_values``."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
