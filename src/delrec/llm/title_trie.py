"""A teacher's distribution over items as next-token targets for an LM that spells item titles token by token.

An LM ranks a title by the product of its token probabilities, so a distribution over items factorises along the
prefix tree (trie) of the titles' token ids: at each prefix, the teacher's mass of the items that share it, grouped
by their next token. Cross-entropy against those conditionals, along the tokens of the title the LM is trained on,
is knowledge distillation (Hinton et al. 2015) at the positions the LM already computes, one gather each. It is
not the full item-level KL: only the prefixes of the trained title are visited, so the teacher's ranking reaches
the LM mostly through the first token (every item's mass, grouped by its title's first token) — on ML-100K titles
the deeper prefixes rarely branch (benchmarks/results/learning_log.md P18).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class TitleTrie:
    """The token-id prefix tree of every item's scored tokens (``token_ids[i]`` = item ``i``'s; index 0 unused)."""

    def __init__(self, token_ids: Sequence[Sequence[int]]) -> None:
        self.token_ids = [list(t) for t in token_ids]
        node_of: dict[tuple[int, ...], int] = {}
        members: list[list[tuple[int, int]]] = []  # node → (item, its next token)
        self.path: list[list[int]] = [[] for _ in self.token_ids]  # item → node at each of its tokens
        for item, ids in enumerate(self.token_ids):
            if item == 0:
                continue
            for depth, tok in enumerate(ids):
                key = tuple(ids[:depth])
                node = node_of.setdefault(key, len(members))
                if node == len(members):
                    members.append([])
                members[node].append((item, tok))
                self.path[item].append(node)
        # Per node: its items, and each item's next token as an index into the node's distinct tokens.
        self.items: list[np.ndarray] = []
        self.tokens: list[np.ndarray] = []
        self.slot: list[np.ndarray] = []
        for m in members:
            arr = np.asarray(m, dtype=np.int64)
            toks, slot = np.unique(arr[:, 1], return_inverse=True)
            self.items.append(arr[:, 0])
            self.tokens.append(toks)
            self.slot.append(slot.reshape(-1))

    def targets(self, item: int, probs: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each token of ``item``'s title, the teacher's next-token distribution given the tokens before it:
        (distinct token ids, their probabilities). ``probs``: the teacher's probability of every item (index 0
        ignored). A prefix on which the teacher puts no mass falls back to the title's own token."""
        out = []
        for depth, node in enumerate(self.path[item]):
            mass = np.bincount(self.slot[node], weights=probs[self.items[node]], minlength=len(self.tokens[node]))
            total = mass.sum()
            if not total > 0:
                out.append((np.asarray([self.token_ids[item][depth]]), np.ones(1)))
            else:
                out.append((self.tokens[node], mass / total))
        return out


def pad_targets(rows: Sequence[tuple[np.ndarray, np.ndarray]], device: torch.device | str = "cpu"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged per-position (tokens, probs) → padded [N, S] token ids and probabilities (padding: token 0, p 0)."""
    width = max(len(t) for t, _ in rows)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    p = np.zeros((len(rows), width), dtype=np.float32)
    for r, (t, q) in enumerate(rows):
        ids[r, :len(t)] = t
        p[r, :len(q)] = q
    return torch.from_numpy(ids).to(device), torch.from_numpy(p).to(device)
