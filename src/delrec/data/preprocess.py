"""Preprocessing: filter a loaded `SeqDataset` into the sequences models train and evaluate on.

Steps, in order (each optional step is a `PreprocessConfig` field):

1. ``drop_untitled``: drop interactions with items whose title is empty (the LLM cannot name them; this also drops
   interactions with items missing from the item table, see `delrec.data.loaders`).
2. ``dedupe_consecutive``: collapse runs of the same item in a user's sequence (re-consumption noise).
3. k-core to a fixed point: repeatedly drop users with fewer than ``max(kcore, min_seq_len)`` interactions and
   items with fewer than ``kcore`` until nothing changes.
4. ``max_seq_len``: keep each user's most recent items. This runs last, so counts in step 3 see full histories;
   it cannot push a user under ``min_seq_len`` because ``max_seq_len >= min_seq_len``.
5. ``title_max_words``: cut each title to its first N words, lengthening a cut that two different titles would
   share until they differ (`cut_titles`). The LLM reads, and is scored on, every token of every title it sees:
   Amazon titles run to 137 words (Beauty: median 9), so a few long ones set the padded width of every batch.

Items are re-indexed to ``1..n`` with no gaps (in their old order); options and before/after statistics go into
``ds.meta["preprocess"]``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from delrec.data.dataset import SeqDataset
from delrec.errors import ConfigError, DataError

SECTION = "data.preprocess"  # config path used in error fields


@dataclass
class PreprocessConfig:
    drop_untitled: bool = field(default=True, metadata={"help": "drop interactions with items without a title"})
    kcore: int = field(default=0, metadata={"help": "k-core on users and items, iterated to a fixed point; 0 = off"})
    dedupe_consecutive: bool = field(default=False, metadata={"help": "collapse repeats of the same item in a row"})
    min_seq_len: int = field(default=3, metadata={"help": "drop users with fewer interactions (3 allows loo)"})
    max_seq_len: int | None = field(default=None, metadata={
        "help": "keep each user's most recent N; None (default) = all, the dataset as published"})
    title_max_words: int | None = field(default=None, metadata={
        "help": "cut titles to their first N words (longer where two titles would otherwise tie); None = whole"})

    def validate(self) -> PreprocessConfig:
        for name in ("drop_untitled", "dedupe_consecutive"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"must be true or false, got {getattr(self, name)!r}", field=f"{SECTION}.{name}")
        for name in ("kcore", "min_seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"must be a non-negative integer, got {v!r}", field=f"{SECTION}.{name}")
        if self.min_seq_len < 1:
            raise ConfigError("must be at least 1", field=f"{SECTION}.min_seq_len")
        w = self.title_max_words
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
            raise ConfigError(f"must be a positive integer or null, got {w!r}", field=f"{SECTION}.title_max_words")
        m = self.max_seq_len
        if m is not None:
            if isinstance(m, bool) or not isinstance(m, int) or m < 1:
                raise ConfigError(f"must be a positive integer or null, got {m!r}", field=f"{SECTION}.max_seq_len")
            if m < self.min_seq_len:
                raise ConfigError(f"max_seq_len ({m}) is smaller than min_seq_len ({self.min_seq_len})",
                                  field=f"{SECTION}.max_seq_len")
        return self


def preprocess(ds: SeqDataset, cfg: PreprocessConfig | None = None) -> SeqDataset:
    """Filter ``ds`` as ``cfg`` says and return a new, re-indexed dataset (``ds`` is left unchanged)."""
    cfg = (cfg or PreprocessConfig()).validate()
    lens = np.array([len(s) for s in ds.sequences], dtype=np.int64)
    users = np.repeat(np.arange(ds.n_users, dtype=np.int64), lens)  # [N] user of each interaction
    items = np.concatenate(ds.sequences).astype(np.int64) if ds.sequences else np.zeros(0, np.int64)  # [N]
    keep = np.ones(len(items), dtype=bool)
    dropped: dict[str, int] = {}

    if cfg.drop_untitled:
        untitled = np.array([not t.strip() for t in ds.titles], dtype=bool)
        untitled[0] = False
        bad = untitled[items]
        dropped["untitled_interactions"] = int(bad.sum())
        dropped["untitled_items"] = len(np.unique(items[bad]))
        keep &= ~bad

    if cfg.dedupe_consecutive:
        u, it = users[keep], items[keep]
        repeat = np.zeros(len(u), dtype=bool)
        repeat[1:] = (u[1:] == u[:-1]) & (it[1:] == it[:-1])
        idx = np.flatnonzero(keep)
        keep[idx[repeat]] = False
        dropped["consecutive_repeats"] = int(repeat.sum())

    user_min = max(cfg.kcore, cfg.min_seq_len)
    rounds = 0
    before_filter = int(keep.sum())
    while True:
        rounds += 1
        ucount = np.bincount(users[keep], minlength=ds.n_users)
        bad = keep & (ucount[users] < user_min)
        if cfg.kcore > 0:
            icount = np.bincount(items[keep], minlength=ds.n_items + 1)
            bad |= keep & (icount[items] < cfg.kcore)
        if not bad.any():
            break
        keep &= ~bad
    dropped["filtered_interactions"] = before_filter - int(keep.sum())

    if cfg.max_seq_len is not None:
        u = users[keep]
        # Position from the end within each user's kept run (users are contiguous and chronological).
        ucount = np.bincount(u, minlength=ds.n_users)
        ends = np.cumsum(ucount)
        from_end = ends[u] - 1 - np.arange(len(u))
        old = from_end >= cfg.max_seq_len
        idx = np.flatnonzero(keep)
        keep[idx[old]] = False
        dropped["truncated_interactions"] = int(old.sum())

    if not keep.any():
        field_name = "kcore" if cfg.kcore > cfg.min_seq_len else "min_seq_len"
        raise DataError(f"no users left after preprocessing ({ds.n_users} users, {len(items)} interactions "
                        f"before; {dropped}); lower {SECTION}.{field_name} or check the titles",
                        file=ds.meta.get("files", {}).get("interactions") or ds.source or None,
                        field=f"{SECTION}.{field_name}")

    out = _reindex(ds, users[keep], items[keep])
    titles_cut = 0
    if cfg.title_max_words is not None:
        full = out.titles[1:]
        out.titles = ["<pad>", *cut_titles(full, cfg.title_max_words)]
        titles_cut = sum(a != b for a, b in zip(full, out.titles[1:], strict=True))
    out.meta = {
        **ds.meta,
        "preprocess": {
            "options": asdict(cfg),
            "before": ds.stats(),
            "after": out.stats(),
            "dropped": dropped,
            "kcore_rounds": rounds,
            "titles_cut": titles_cut,
        },
    }
    return out


def cut_titles(titles: list[str], max_words: int) -> list[str]:
    """Each title cut to its first ``max_words`` words (trailing ",;:-–/" dropped), where a cut that another,
    different title also cuts to grows a word at a time until the two differ, so distinct titles stay distinct and
    identical titles stay identical. Idempotent for the same ``max_words``."""
    words = [t.split() for t in titles]
    whole = [" ".join(w) for w in words]
    n = [min(len(w), max_words) for w in words]

    def cut(i: int) -> str:
        if n[i] == len(words[i]):
            return whole[i]
        text = " ".join(words[i][:n[i]])
        return text.rstrip(",;:-–/ ") or text

    while True:
        cuts = [cut(i) for i in range(len(titles))]
        by_cut: dict[str, set[str]] = {}
        for c, w in zip(cuts, whole, strict=True):
            by_cut.setdefault(c, set()).add(w)
        clash = [i for i, c in enumerate(cuts) if len(by_cut[c]) > 1 and n[i] < len(words[i])]
        if not clash:
            return cuts
        for i in clash:
            n[i] += 1


def _reindex(ds: SeqDataset, users: np.ndarray, items: np.ndarray) -> SeqDataset:
    """Dataset of the kept (user, item) pairs; items renumbered 1..n in their old order, users kept in order."""
    old_items = np.unique(items)  # sorted → old order kept
    new_of = np.zeros(ds.n_items + 1, dtype=np.int64)
    new_of[old_items] = np.arange(1, len(old_items) + 1)
    new_items = new_of[items]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    return SeqDataset(
        name=ds.name,
        titles=["<pad>", *(ds.titles[i] for i in old_items)],
        item_ids=["", *(ds.item_ids[i] for i in old_items)],
        user_ids=[ds.user_ids[u] for u in users[starts]],
        sequences=[a.copy() for a in np.split(new_items, starts[1:])],
        domain=ds.domain,
        source=ds.source,
    )

