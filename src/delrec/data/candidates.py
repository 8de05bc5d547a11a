"""Frozen candidate sets: the target plus uniformly drawn negatives, seeded and saved.

Stage 2 may draw its *training* negatives by popularity instead (`draw_candidates` ``weights``).

Negatives are drawn without replacement from items the user never interacted with (their whole known sequence is
excluded, not just the prefix shown), so a candidate set holds no duplicates and no history item. Every model is
scored on the same saved file; its content hash goes into every report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from delrec.data.dataset import SeqDataset
from delrec.data.splits import Example
from delrec.errors import ConfigError, DataError
from delrec.io import atomic_path, sha256_bytes


@dataclass
class CandidateSet:
    users: np.ndarray  # [N] user indices
    targets: np.ndarray  # [N] target item indices
    items: np.ndarray  # [N, C] candidate item indices (shuffled; the target appears exactly once)
    seed: int

    def __len__(self) -> int:
        return len(self.users)

    @property
    def size(self) -> int:
        return int(self.items.shape[1])

    @property
    def target_pos(self) -> np.ndarray:
        """[N] column of the target inside `items`."""
        return np.argmax(self.items == self.targets[:, None], axis=1)

    def hash(self) -> str:
        return sha256_bytes(self.users.astype(np.int64).tobytes(), self.targets.astype(np.int64).tobytes(),
                            self.items.astype(np.int64).tobytes())[:16]

    def subset(self, rows: np.ndarray | list[int]) -> CandidateSet:
        rows = np.asarray(rows, dtype=np.int64)
        return CandidateSet(self.users[rows], self.targets[rows], self.items[rows], self.seed)

    def save(self, path: str | Path, extra: dict[str, np.ndarray] | None = None) -> str:
        """Write Parquet atomically; returns the content hash. ``extra``: more columns, one value per row (e.g.
        the epoch a training set was drawn for); `load` ignores them."""
        df = pd.DataFrame({"user": self.users, "target": self.targets, "candidates": list(self.items),
                           **(extra or {})})
        with atomic_path(path) as tmp:
            df.to_parquet(tmp, index=False)
        return self.hash()

    @classmethod
    def load(cls, path: str | Path, seed: int = -1) -> CandidateSet:
        path = Path(path)
        if not path.is_file():
            raise DataError("candidate file not found", file=path)
        df = pd.read_parquet(path)
        for col in ("user", "target", "candidates"):
            if col not in df.columns:
                raise DataError("missing column", file=path, field=col)
        items = np.stack([np.asarray(c, dtype=np.int64) for c in df["candidates"]]) if len(df) else \
            np.zeros((0, 0), dtype=np.int64)
        cs = cls(df["user"].to_numpy(np.int64), df["target"].to_numpy(np.int64), items, seed)
        bad = np.flatnonzero((cs.items == cs.targets[:, None]).sum(axis=1) != 1)
        if len(bad):
            raise DataError("target must appear exactly once among the candidates", file=path,
                            line=int(bad[0]) + 1, field="candidates")
        return cs


def concat(sets: list[CandidateSet]) -> CandidateSet:
    """Rows of several candidate sets of one size, in order (seed of the first)."""
    if not sets:
        return CandidateSet(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 0), np.int64), -1)
    return CandidateSet(np.concatenate([c.users for c in sets]), np.concatenate([c.targets for c in sets]),
                        np.concatenate([c.items for c in sets]), sets[0].seed)


def draw_candidates(examples: list[Example], dataset: SeqDataset, size: int = 20, seed: int = 0,
                    weights: np.ndarray | None = None) -> CandidateSet:
    """Target + ``size - 1`` negatives per example, reproducible for a given ``seed``.

    ``weights``: [n_items + 1] positive sampling weights of the negatives (e.g. training counts, so that negatives are
    as popular as targets and popularity alone cannot pick the target out); None = uniform, the evaluation's."""
    if size < 2:
        raise ConfigError(f"candidate set size must be at least 2, got {size}", field="candidates.size")
    rng = np.random.default_rng(seed)
    all_items = np.arange(1, dataset.n_items + 1, dtype=np.int64)
    rows = np.empty((len(examples), size), dtype=np.int64)
    for r, ex in enumerate(examples):
        seen = np.unique(np.concatenate([dataset.sequences[ex.user], [ex.target]]))
        pool = np.setdiff1d(all_items, seen, assume_unique=True)
        if len(pool) < size - 1:
            raise ConfigError(f"user {dataset.user_ids[ex.user]!r} has only {len(pool)} unseen items; "
                              f"cannot draw {size - 1} negatives", field="candidates.size")
        if weights is None:
            neg = rng.choice(pool, size - 1, replace=False)
        else:
            neg = rng.choice(pool, size - 1, replace=False, p=weights[pool] / weights[pool].sum())
        cand = np.concatenate([[ex.target], neg])
        rows[r] = rng.permutation(cand)
    users = np.array([ex.user for ex in examples], dtype=np.int64)
    targets = np.array([ex.target for ex in examples], dtype=np.int64)
    return CandidateSet(users, targets, rows, seed)


def donor_histories(examples: Sequence[Example], items: np.ndarray, history_len: int, seed: int = 0,
                    pool: Sequence[Example] | None = None) -> list[np.ndarray]:
    """Each row's history replaced by another user's: a seeded donor from ``pool`` (default: the rows themselves)
    whose last ``history_len`` items (what the model reads of it) share none of the row's candidates (``items``,
    [N, C]). What a model gives a candidate after a stranger's history is its history-free part — the control that
    asks whether a model reads the user's sequence (`benchmarks/learning_probe.py --histories donor`) and the
    baseline of stage 2's history lifts (`FinetuneConfig.distill_lift`)."""
    pool = examples if pool is None else pool
    rng = np.random.default_rng(seed)
    out = []
    for i, ex in enumerate(examples):
        cands = set(np.asarray(items[i]).tolist())
        for j in rng.permutation(len(pool)):
            donor = pool[j]
            if donor.user != ex.user and not cands & set(donor.history[-history_len:].tolist()):
                out.append(donor.history)
                break
        else:
            raise ConfigError(f"row {i}: no other user's history without one of its {len(cands)} candidates",
                              field="candidates")
    return out
