"""SASRec (Kang & McAuley, 2018): causal self-attention over the item sequence.

Post-LayerNorm blocks with GELU feed-forward as in RecBole's implementation; attention runs through
`F.scaled_dot_product_attention(is_causal=True)`, which was faster on CPU than `nn.TransformerEncoder`. The input is
right-aligned first (see `right_align`) so the plain causal mask is also a correct padding mask for every real item.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from delrec.teachers.base import Dropout, SeqRecommender, TeacherConfig, register, right_align


class Block(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float, attn_dropout: float) -> None:
        super().__init__()
        self.heads, self.p = heads, attn_dropout
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ff1 = nn.Linear(d, 4 * d)
        self.ff2 = nn.Linear(4 * d, d)
        self.ln1 = nn.LayerNorm(d)
        self.ln2 = nn.LayerNorm(d)
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, L, d]`` → ``[B, L, d]``; with ``last`` (``[B]`` positions) only those queries → ``[B, 1, d]``.

        The final block only needs each sequence's most recent position, so it skips the other L - 1 queries and
        their feed-forward (the result is the same as computing all positions and picking one).
        """
        B, L, d = x.shape
        h, p = self.heads, self.p if self.training else 0.0
        if last is None:
            q, k, v = self.qkv(x).view(B, L, 3, h, d // h).permute(2, 0, 3, 1, 4)  # [B, h, L, d/h]
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)  # [B, h, L, d/h]
        else:
            w_q, w_kv = self.qkv.weight.split([d, 2 * d])
            b_q, b_kv = self.qkv.bias.split([d, 2 * d])
            k, v = F.linear(x, w_kv, b_kv).view(B, L, 2, h, d // h).permute(2, 0, 3, 1, 4)  # [B, h, L, d/h]
            x = x[torch.arange(B, device=x.device), last].unsqueeze(1)  # [B, 1, d]
            q = F.linear(x, w_q, b_q).view(B, 1, h, d // h).transpose(1, 2)  # [B, h, 1, d/h]
            visible = torch.arange(L, device=x.device)[None, :] <= last[:, None]  # [B, L] causal row of `last`
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None, None, :], dropout_p=p)
        x = self.ln1(x + self.drop(self.proj(a.transpose(1, 2).reshape(B, -1, d))))
        return self.ln2(x + self.drop(self.ff2(F.gelu(self.ff1(x)))))


@register("sasrec")
class SASRec(SeqRecommender):
    def __init__(self, cfg: TeacherConfig, n_items: int) -> None:
        super().__init__(cfg, n_items)
        d = cfg.hidden
        assert d and cfg.layers and cfg.heads and cfg.dropout is not None and cfg.attn_dropout is not None
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, d)
        self.ln = nn.LayerNorm(d)
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(d, cfg.heads, cfg.dropout, cfg.attn_dropout) for _ in range(cfg.layers))
        self.apply(_init)

    def forward(self, item_seq: torch.Tensor) -> torch.Tensor:  # [B, L] left-padded → [B, d]
        seq, lengths = right_align(self.clip(item_seq))  # [B, L], [B]
        x = self.item_emb(seq) + self.pos_emb.weight[: seq.shape[1]]  # [B, L, d]
        x = self.drop(self.ln(x))
        for i, block in enumerate(self.blocks):
            x = block(x, lengths - 1 if i == len(self.blocks) - 1 else None)  # [B, L, d]; last block [B, 1, d]
        return x[:, 0]  # [B, d] at the most recent item


def _init(m: nn.Module) -> None:
    # BERT/RecBole initialisation: N(0, 0.02) weights, zero biases (PyTorch's default trains worse here).
    if isinstance(m, nn.Linear | nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)
