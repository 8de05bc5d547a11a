"""Preprocessing: filters, k-core fixed point, truncation, re-indexing, and what it records."""

from __future__ import annotations

import numpy as np
import pytest

from delrec.data import PreprocessConfig, SeqDataset
from delrec.data.preprocess import preprocess
from delrec.errors import ConfigError, DataError


def make_ds(seqs: dict[str, list[int]], titles: dict[int, str] | None = None, n_items: int | None = None
            ) -> SeqDataset:
    n = n_items or max(max(s) for s in seqs.values())
    t = {i: f"Item {i}" for i in range(1, n + 1)} | (titles or {})
    return SeqDataset(name="t", titles=["<pad>", *(t[i] for i in range(1, n + 1))],
                      item_ids=["", *(f"id{i}" for i in range(1, n + 1))], user_ids=list(seqs),
                      sequences=[np.array(s, dtype=np.int64) for s in seqs.values()],
                      meta={"files": {"interactions": "/data/inter.tsv"}})


def as_ids(ds: SeqDataset) -> dict[str, list[str]]:
    return {u: [ds.item_ids[i] for i in s] for u, s in zip(ds.user_ids, ds.sequences, strict=True)}


def check_dense(ds: SeqDataset) -> None:
    used = np.unique(np.concatenate(ds.sequences))
    assert used.tolist() == list(range(1, ds.n_items + 1))
    assert len(ds.titles) == len(ds.item_ids) == ds.n_items + 1


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"kcore": -1}, "data.preprocess.kcore"),
    ({"min_seq_len": 0}, "data.preprocess.min_seq_len"),
    ({"min_seq_len": 2.5}, "data.preprocess.min_seq_len"),
    ({"max_seq_len": 0}, "data.preprocess.max_seq_len"),
    ({"max_seq_len": 2, "min_seq_len": 3}, "data.preprocess.max_seq_len"),
    ({"drop_untitled": "yes"}, "data.preprocess.drop_untitled"),
    ({"kcore": True}, "data.preprocess.kcore"),
])
def test_config_validation(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        PreprocessConfig(**kwargs).validate()
    assert e.value.field == field


def test_defaults_are_valid() -> None:
    cfg = PreprocessConfig().validate()
    assert (cfg.drop_untitled, cfg.kcore, cfg.dedupe_consecutive, cfg.min_seq_len, cfg.max_seq_len) == \
        (True, 0, False, 3, None)


def test_drop_untitled_and_reindex() -> None:
    ds = make_ds({"a": [1, 2, 3, 4], "b": [4, 2, 5, 1], "c": [3, 3, 5]}, titles={2: "", 5: "   "})
    out = preprocess(ds, PreprocessConfig(min_seq_len=2))
    assert as_ids(out) == {"a": ["id1", "id3", "id4"], "b": ["id4", "id1"], "c": ["id3", "id3"]}
    assert out.item_ids[1:] == ["id1", "id3", "id4"] and out.titles[1:] == ["Item 1", "Item 3", "Item 4"]
    check_dense(out)
    d = out.meta["preprocess"]["dropped"]
    assert d["untitled_interactions"] == 4 and d["untitled_items"] == 2
    assert as_ids(ds)["a"] == ["id1", "id2", "id3", "id4"]  # input untouched


def test_keep_untitled_when_asked() -> None:
    ds = make_ds({"a": [1, 2, 3]}, titles={2: ""})
    assert preprocess(ds, PreprocessConfig(drop_untitled=False)).n_items == 3


def test_dedupe_consecutive() -> None:
    ds = make_ds({"a": [1, 1, 2, 2, 2, 1, 3], "b": [3, 3, 3, 1, 2]})
    out = preprocess(ds, PreprocessConfig(dedupe_consecutive=True, min_seq_len=1))
    assert as_ids(out) == {"a": ["id1", "id2", "id1", "id3"], "b": ["id3", "id1", "id2"]}
    assert out.meta["preprocess"]["dropped"]["consecutive_repeats"] == 5
    kept = preprocess(ds, PreprocessConfig(min_seq_len=1))
    assert kept.n_interactions == ds.n_interactions


def test_kcore_reaches_a_fixed_point() -> None:
    # Dropping item 9 (only 1 user) pushes user d under 2, which pushes item 8 under 2, and so on: a single
    # pass is not enough.
    ds = make_ds({"a": [1, 2, 3], "b": [1, 2, 3], "c": [1, 2, 7], "d": [8, 9], "e": [7, 8]})
    out = preprocess(ds, PreprocessConfig(kcore=2, min_seq_len=1))
    ucount = [len(s) for s in out.sequences]
    icount = np.bincount(np.concatenate(out.sequences))[1:]
    assert min(ucount) >= 2 and icount.min() >= 2
    assert as_ids(out) == {"a": ["id1", "id2", "id3"], "b": ["id1", "id2", "id3"], "c": ["id1", "id2"]}
    assert out.meta["preprocess"]["kcore_rounds"] >= 3
    check_dense(out)


def test_min_and_max_seq_len() -> None:
    ds = make_ds({"a": list(range(1, 11)), "b": [1, 2], "c": [3, 4, 5]})
    out = preprocess(ds, PreprocessConfig(min_seq_len=3, max_seq_len=4))
    assert as_ids(out) == {"a": ["id7", "id8", "id9", "id10"], "c": ["id3", "id4", "id5"]}  # most recent kept
    rec = out.meta["preprocess"]
    assert rec["dropped"]["truncated_interactions"] == 6 and rec["dropped"]["filtered_interactions"] == 2
    assert rec["before"] == ds.stats() and rec["after"] == out.stats()
    assert rec["options"] == {"drop_untitled": True, "kcore": 0, "dedupe_consecutive": False, "min_seq_len": 3,
                              "max_seq_len": 4, "title_max_words": None}
    assert out.meta["files"] == ds.meta["files"]  # the loader's record is kept
    check_dense(out)
    assert preprocess(ds, PreprocessConfig(max_seq_len=None)).sequences[0].tolist() == list(range(1, 11))


def test_idempotent() -> None:
    rng = np.random.default_rng(3)
    ds = make_ds({f"u{k}": rng.integers(1, 30, rng.integers(1, 12)).tolist() for k in range(40)}, n_items=30)
    cfg = PreprocessConfig(kcore=3, min_seq_len=3, max_seq_len=8)
    once = preprocess(ds, cfg)
    assert preprocess(once, cfg).fingerprint() == once.fingerprint()


def test_no_users_left_is_a_clear_error() -> None:
    ds = make_ds({"a": [1], "b": [2], "c": [3]})
    with pytest.raises(DataError) as e:
        preprocess(ds, PreprocessConfig())
    assert "no users left after preprocessing" in str(e.value)
    assert e.value.field == "data.preprocess.min_seq_len" and e.value.file == "/data/inter.tsv"
    with pytest.raises(DataError) as e:
        preprocess(make_ds({"a": [1, 2, 3], "b": [4, 5, 6]}), PreprocessConfig(kcore=5))
    assert e.value.field == "data.preprocess.kcore"


def test_title_max_words_cuts_titles_and_keeps_them_distinct() -> None:
    titles = {1: "Crabtree & Evelyn Hand Therapy, 100ml", 2: "Crabtree & Evelyn Hand Therapy, 250ml",
              3: "Crabtree & Evelyn", 4: "Short One", 5: "Crabtree & Evelyn Hand Therapy, 100ml"}
    ds = make_ds({"a": [1, 2, 3], "b": [4, 5, 1]}, titles=titles)
    out = preprocess(ds, PreprocessConfig(title_max_words=3))
    got = dict(zip(out.item_ids[1:], out.titles[1:], strict=True))
    # "Crabtree & Evelyn" is item 3's whole title, so 1 and 2 grow until they differ; 1 and 5 stay identical
    assert got == {"id1": "Crabtree & Evelyn Hand Therapy, 100ml", "id2": "Crabtree & Evelyn Hand Therapy, 250ml",
                   "id3": "Crabtree & Evelyn", "id4": "Short One", "id5": "Crabtree & Evelyn Hand Therapy, 100ml"}
    assert out.meta["preprocess"]["titles_cut"] == 0
    out = preprocess(ds, PreprocessConfig(title_max_words=2))
    assert out.titles[1:] == ["Crabtree & Evelyn Hand Therapy, 100ml", "Crabtree & Evelyn Hand Therapy, 250ml",
                              "Crabtree & Evelyn", "Short One", "Crabtree & Evelyn Hand Therapy, 100ml"]
    ds2 = make_ds({"a": [1, 2, 3]}, titles={1: "Nail Polish Red, Shiny", 2: "Hair Oil Argan Extra", 3: "Nail Art Kit"})
    out = preprocess(ds2, PreprocessConfig(title_max_words=3))
    assert out.titles[1:] == ["Nail Polish Red", "Hair Oil Argan", "Nail Art Kit"]  # trailing "," dropped
    assert out.meta["preprocess"]["titles_cut"] == 2
    assert preprocess(out, PreprocessConfig(title_max_words=3)).titles == out.titles  # idempotent
    assert preprocess(ds2, PreprocessConfig()).titles == ds2.titles  # off by default


def test_title_max_words_is_validated() -> None:
    for bad in (0, -2, 2.5, True, "8"):
        with pytest.raises(ConfigError) as e:
            PreprocessConfig(title_max_words=bad).validate()  # type: ignore[arg-type]
        assert e.value.field == "data.preprocess.title_max_words"
