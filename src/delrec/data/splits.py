"""Train/validation/test splits.

- ``user`` (the paper's): users are shuffled with a seed into 80/10/10 disjoint groups; a validation or test user's
  last item is the target and everything before it the history. Teachers train only on training users.
- ``loo`` (leave-one-out, the SR standard): every user's last item is the test target, the second-to-last the
  validation target; training sees each sequence without its last two items.

Either way, no training sequence contains a validation or test target (`Split.train_sequences`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from delrec.data.dataset import SeqDataset
from delrec.errors import ConfigError, DataError

SplitKind = Literal["user", "loo"]


@dataclass(frozen=True)
class Example:
    """One next-item prediction: ``history`` (chronological item indices) → ``target``."""

    user: int  # index into SeqDataset.sequences
    history: np.ndarray
    target: int


@dataclass
class Split:
    kind: SplitKind
    seed: int
    train_users: np.ndarray  # user indices whose (truncated) sequences teachers and LLMs may train on
    valid_users: np.ndarray
    test_users: np.ndarray
    dataset: SeqDataset

    @property
    def train_sequences(self) -> list[np.ndarray]:
        """Sequences a model may train on; they never include a validation or test target."""
        cut = 2 if self.kind == "loo" else 0
        seqs = self.dataset.sequences
        return [seqs[u][: len(seqs[u]) - cut] for u in self.train_users]

    def examples(self, part: Literal["train", "valid", "test"], sliding: bool = False,
                 min_history: int = 1) -> list[Example]:
        """Prediction examples of one part.

        ``train``: each training sequence's last item (the paper's stage-2 data); with ``sliding`` every prefix of at
        least ``min_history`` items. ``valid``/``test``: one example per user, as the split defines.
        """
        seqs = self.dataset.sequences
        if part == "train":
            out: list[Example] = []
            for u, seq in zip(self.train_users, self.train_sequences, strict=True):
                ends = range(min_history, len(seq)) if sliding else [len(seq) - 1]
                out.extend(Example(int(u), seq[:e], int(seq[e])) for e in ends if e >= min_history)
            return out
        users = self.valid_users if part == "valid" else self.test_users
        back = 2 if (self.kind == "loo" and part == "valid") else 1
        return [Example(int(u), seqs[u][: len(seqs[u]) - back], int(seqs[u][len(seqs[u]) - back])) for u in users]

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "seed": self.seed,
            "train_users": self.train_users.tolist(),
            "valid_users": self.valid_users.tolist(),
            "test_users": self.test_users.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, object], dataset: SeqDataset) -> Split:
        return cls(
            kind=d["kind"],  # type: ignore[arg-type]
            seed=int(d["seed"]),  # type: ignore[call-overload]
            train_users=np.asarray(d["train_users"], dtype=np.int64),
            valid_users=np.asarray(d["valid_users"], dtype=np.int64),
            test_users=np.asarray(d["test_users"], dtype=np.int64),
            dataset=dataset,
        )


def make_split(dataset: SeqDataset, kind: str = "user", seed: int = 42,
               ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> Split:
    """Split `dataset` by ``kind`` (``user`` or ``loo``), reproducibly for a given ``seed``."""
    n = dataset.n_users
    if kind == "user":
        if len(ratios) != 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6:
            raise ConfigError(f"split ratios must be three non-negative numbers summing to 1, got {ratios}",
                              field="split.ratios")
        short = [u for u, s in enumerate(dataset.sequences) if len(s) < 2]
        if short:
            raise DataError(f"user {dataset.user_ids[short[0]]!r} has fewer than 2 interactions; "
                            "raise preprocessing.min_seq_len", field="user_id")
        perm = np.random.default_rng(seed).permutation(n)
        n_train = round(ratios[0] * n)
        n_valid = round(ratios[1] * n)
        return Split("user", seed, np.sort(perm[:n_train]), np.sort(perm[n_train:n_train + n_valid]),
                     np.sort(perm[n_train + n_valid:]), dataset)
    if kind == "loo":
        short = [u for u, s in enumerate(dataset.sequences) if len(s) < 3]
        if short:
            raise DataError(f"user {dataset.user_ids[short[0]]!r} has fewer than 3 interactions, too few for a "
                            "leave-one-out split; raise preprocessing.min_seq_len", field="user_id")
        users = np.arange(n, dtype=np.int64)
        return Split("loo", seed, users, users.copy(), users.copy(), dataset)
    raise ConfigError(f"unknown split {kind!r}; choose 'user' or 'loo'", field="split.kind")
