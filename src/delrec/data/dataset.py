"""The one normalised in-memory form every loader produces.

Items are re-indexed to ``1..n_items``; ``0`` is padding (teachers use it, so the LLM side keeps the same ids).
``titles[i]`` is item ``i``'s title (``titles[0]`` is a placeholder). ``sequences[u]`` is user ``u``'s items in
chronological order (stable for equal timestamps: ties keep file order).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from delrec.errors import DataError
from delrec.io import atomic_dir, sha256_bytes

PAD = 0


@dataclass
class SeqDataset:
    """Users' chronological item sequences plus the item id ↔ title table."""

    name: str
    titles: list[str]  # [n_items + 1]; titles[0] == "<pad>"
    item_ids: list[str]  # [n_items + 1] original item ids; item_ids[0] == ""
    user_ids: list[str]  # [n_users] original user ids
    sequences: list[np.ndarray]  # [n_users] of int64 arrays of item indices in 1..n_items
    domain: str = "generic"  # prompt wording: movie | game | beauty | home | generic
    source: str = ""  # where the raw data came from (path, cache, download, recbole wheel)
    meta: dict[str, Any] = field(default_factory=dict)  # preprocessing options and statistics

    @property
    def n_items(self) -> int:
        return len(self.titles) - 1

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def stats(self) -> dict[str, Any]:
        lens = np.array([len(s) for s in self.sequences]) if self.sequences else np.zeros(1)
        return {
            "users": self.n_users,
            "items": self.n_items,
            "interactions": self.n_interactions,
            "seq_len_min": int(lens.min()),
            "seq_len_mean": round(float(lens.mean()), 3),
            "seq_len_max": int(lens.max()),
        }

    def fingerprint(self) -> str:
        """A hash of the prepared data (titles + sequences); recorded in every run folder."""
        seq = np.concatenate([*self.sequences, np.array([-1])]) if self.sequences else np.zeros(0)
        lens = np.array([len(s) for s in self.sequences], dtype=np.int64)
        return sha256_bytes(
            "\x1f".join(self.titles).encode(),
            "\x1f".join(self.user_ids).encode(),
            lens.tobytes(),
            seq.astype(np.int64).tobytes(),
        )

    def title_to_item(self) -> dict[str, int]:
        """Title → item index (first item wins for duplicated titles)."""
        out: dict[str, int] = {}
        for i, t in enumerate(self.titles[1:], start=1):
            out.setdefault(t, i)
        return out

    # --- persistence: Parquet + JSON, never pickle -------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        with atomic_dir(path) as tmp:
            pd.DataFrame({"item": np.arange(1, self.n_items + 1), "item_id": self.item_ids[1:],
                          "title": self.titles[1:]}).to_parquet(tmp / "items.parquet", index=False)
            pd.DataFrame({"user_id": self.user_ids,
                          "items": [s.astype(np.int64) for s in self.sequences]}).to_parquet(
                tmp / "sequences.parquet", index=False)
            info = {"name": self.name, "domain": self.domain, "source": self.source, "meta": self.meta,
                    "stats": self.stats(), "fingerprint": self.fingerprint()}
            (tmp / "dataset.json").write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> SeqDataset:
        path = Path(path)
        info_file = path / "dataset.json"
        if not info_file.is_file():
            raise DataError("not a prepared dataset folder (no dataset.json)", file=path)
        info = json.loads(info_file.read_text(encoding="utf-8"))
        items = pd.read_parquet(path / "items.parquet")
        seqs = pd.read_parquet(path / "sequences.parquet")
        ds = cls(
            name=info["name"],
            titles=["<pad>", *items["title"].astype(str).tolist()],
            item_ids=["", *items["item_id"].astype(str).tolist()],
            user_ids=seqs["user_id"].astype(str).tolist(),
            sequences=[np.asarray(s, dtype=np.int64) for s in seqs["items"]],
            domain=info.get("domain", "generic"),
            source=info.get("source", ""),
            meta=info.get("meta", {}),
        )
        if info.get("fingerprint") and ds.fingerprint() != info["fingerprint"]:
            raise DataError("prepared data does not match its recorded fingerprint (files changed?)", file=path)
        return ds

    @classmethod
    def from_frames(
        cls,
        interactions: pd.DataFrame,
        items: pd.DataFrame,
        *,
        name: str,
        domain: str = "generic",
        source: str = "",
    ) -> SeqDataset:
        """Build from ``interactions[user_id, item_id, timestamp]`` and ``items[item_id, title]`` (string ids).

        Rows are sorted by (user, timestamp) with a stable sort, so equal timestamps keep file order. Items without
        a title are not dropped here (see `preprocess`); they get an empty title.
        """
        inter = interactions[["user_id", "item_id", "timestamp"]].copy()
        inter["user_id"] = inter["user_id"].astype(str)
        inter["item_id"] = inter["item_id"].astype(str)
        inter["_order"] = np.arange(len(inter))
        inter = inter.sort_values(["user_id", "timestamp", "_order"], kind="stable")
        title_of = dict(zip(items["item_id"].astype(str), items["title"].astype(str), strict=False))
        # Item order: by first appearance in the title table, then unseen ids; deterministic for a given input.
        used = pd.unique(inter["item_id"])
        used_set = set(used)  # built once: a set per table row made this quadratic
        order = [i for i in items["item_id"].astype(str) if i in used_set]
        seen = set(order)
        order += sorted(i for i in used if i not in seen)
        index = {iid: k for k, iid in enumerate(order, start=1)}
        inter["item"] = inter["item_id"].map(index).astype(np.int64)
        # Rows are sorted by user, so each user is one contiguous run (a per-group loop was seconds at 20k users).
        uids = inter["user_id"].to_numpy(dtype=object)
        item_col = inter["item"].to_numpy(dtype=np.int64)
        starts = np.flatnonzero(np.r_[True, uids[1:] != uids[:-1]]) if len(uids) else np.zeros(0, np.int64)
        user_ids: list[str] = [str(u) for u in uids[starts]]
        sequences: list[np.ndarray] = [a.copy() for a in np.split(item_col, starts[1:])] if len(uids) else []
        return cls(
            name=name,
            titles=["<pad>", *[title_of.get(i, "") for i in order]],
            item_ids=["", *order],
            user_ids=user_ids,
            sequences=sequences,
            domain=domain,
            source=source,
        )
