"""GRU4Rec (Hidasi et al., 2016; the RecBole/DELRec next-item variant): a GRU over the item embeddings."""

from __future__ import annotations

import torch
from torch import nn

from delrec.teachers.base import Dropout, SeqRecommender, TeacherConfig, register, right_align


@register("gru4rec")
class GRU4Rec(SeqRecommender):
    def __init__(self, cfg: TeacherConfig, n_items: int) -> None:
        super().__init__(cfg, n_items)
        d = cfg.hidden
        assert d is not None and cfg.layers is not None and cfg.dropout is not None
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.drop = Dropout(cfg.dropout)
        self.gru = nn.GRU(d, d, num_layers=cfg.layers, batch_first=True, bias=False)
        self.dense = nn.Linear(d, d)  # maps the GRU state into the item-embedding space
        nn.init.xavier_normal_(self.item_emb.weight)
        for w in self.gru.parameters():
            nn.init.xavier_uniform_(w)

    def forward(self, item_seq: torch.Tensor) -> torch.Tensor:  # [B, L] left-padded → [B, d]
        seq, lengths = right_align(self.clip(item_seq))  # [B, L], [B]; padding after the items cannot affect them
        out, _ = self.gru(self.drop(self.item_emb(seq)))  # [B, L, d]
        out = self.dense(out[torch.arange(len(out), device=out.device), lengths - 1])  # [B, d]
        return out
