"""Loaders: each raw format → `SeqDataset`, on small hand-written fixtures (tests/fixtures/) and on the real
ML-100K that the recbole wheel ships."""

from __future__ import annotations

import ast
import gzip
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from delrec.data import DataConfig, PreprocessConfig, prepare_dataset
from delrec.data.loaders import (
    MAX_TITLE_CHARS,
    _steam_fast,
    load_amazon,
    load_generic,
    load_movielens,
    load_recbole,
    load_steam,
    normalize_title,
)
from delrec.errors import DataError

FIX = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DELREC_OFFLINE", "1")
    monkeypatch.setenv("DELREC_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize(("raw", "want"), [
    ("Usual Suspects, The (1995)", "The Usual Suspects (1995)"),
    ("Fish Called Wanda, A (1988)", "A Fish Called Wanda (1988)"),
    ("American Werewolf in London, An (1981)", "An American Werewolf in London (1981)"),
    ("Castle, The", "The Castle"),
    ("Misérables, Les (1995)", "Les Misérables (1995)"),
    ("Enfer, L' (1994)", "L'Enfer (1994)"),
    ("Big Blue, The (Grand bleu, Le) (1988)", "The Big Blue (Le Grand bleu) (1988)"),
    ("Good, The Bad and The Ugly, The (1966)", "The Good, The Bad and The Ugly (1966)"),
    ("Paris, Texas (1984)", "Paris, Texas (1984)"),
    ("Kiss Me, Guido (1997)", "Kiss Me, Guido (1997)"),
    ("  Heidi Fleiss:  Hollywood Madam (1995) ", "Heidi Fleiss: Hollywood Madam (1995)"),
    ("(500) Days of Summer", "(500) Days of Summer"),
    ("Toy Story (1995)", "Toy Story (1995)"),
    ("Crabtree &amp; Evelyn Hand Therapy", "Crabtree & Evelyn Hand Therapy"),  # Amazon's entities are decoded
    ("L&#39;Oreal Paris &#x27;Lash&#x27;", "L'Oreal Paris 'Lash'"),
    ("Batman & Robin (1997)", "Batman & Robin (1997)"),  # a plain "&" (and "&c" without ";") stays
    ("Q&A &c", "Q&A &c"),
])
def test_normalize_title(raw: str, want: str) -> None:
    assert normalize_title(raw) == want
    assert normalize_title(want) == want  # idempotent


def test_normalize_title_without_articles_only_collapses_whitespace() -> None:
    assert normalize_title(" Castle,  The\n", move_articles=False) == "Castle, The"


def test_movielens_fixture() -> None:
    ds = load_movielens(FIX / "ml100k")
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (4, 9, 13)
    assert ds.domain == "movie" and ds.meta["load"]["item_encoding"] == "latin-1"
    assert ds.titles[1:4] == ["Toy Story (1995)", "The Usual Suspects (1995)", "Les Misérables (1995)"]
    assert ds.titles[7] == "The Castle"
    by_user = dict(zip(ds.user_ids, ds.sequences, strict=True))
    # user 2: items 4 and 5 share a timestamp → file order; item 1 is earlier.
    assert [ds.item_ids[i] for i in by_user["2"]] == ["1", "4", "5", "9"]
    assert [ds.item_ids[i] for i in by_user["4"]] == ["3"]


def test_movielens_utf8_resave_gives_the_same_titles(tmp_path: Path) -> None:
    shutil.copy(FIX / "ml100k" / "u.data", tmp_path / "u.data")
    (tmp_path / "u.item").write_bytes((FIX / "ml100k" / "u.item").read_bytes().decode("latin-1").encode("utf-8"))
    a, b = load_movielens(FIX / "ml100k"), load_movielens(tmp_path)
    assert b.meta["load"]["item_encoding"] == "utf-8"
    assert a.titles == b.titles and a.fingerprint() == b.fingerprint()


def test_recbole_fixture_matches_raw_movielens() -> None:
    raw = load_movielens(FIX / "ml100k", name="ml-mini")
    rb = load_recbole(FIX / "recbole" / "ml-mini")
    assert rb.name == "ml-mini" and rb.domain == "movie"
    # "unkonwn" is corrected, "(V)" stored as release_year is put back: every title agrees with GroupLens.
    assert rb.titles == raw.titles
    assert rb.fingerprint() == raw.fingerprint()


def test_recbole_wheel_ml100k_is_the_real_dataset() -> None:
    ds = prepare_dataset(DataConfig(name="ml-100k", preprocess=PreprocessConfig(max_seq_len=None)))
    assert ds.source.startswith("recbole-wheel:")
    before = ds.meta["preprocess"]["before"]
    assert (before["users"], before["items"], before["interactions"]) == (943, 1682, 100_000)
    titles = dict(zip(ds.item_ids, ds.titles, strict=True))
    assert titles["1"] == "Toy Story (1995)"
    assert titles["12"] == "The Usual Suspects (1995)"
    assert titles["267"] == "unknown"  # RecBole spells it "unkonwn"
    assert titles["1412"] == "Land Before Time III: The Time of the Great Giving (1995) (V)"
    assert titles["50"] == "Star Wars (1977)"
    assert ds.meta["load"]["title_column"] == "movie_title"


def test_amazon_fixture() -> None:
    ds = load_amazon(FIX / "amazon")
    assert ds.name == "amazon-beauty" and ds.domain == "beauty"
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (3, 5, 9)
    titles = dict(zip(ds.item_ids, ds.titles, strict=True))
    assert titles["B001"] == "Rose Water Toner 200ml"  # whitespace and newline collapsed
    assert titles["B003"] == "L'Oréal Mascara"
    assert titles["B004"] == ""  # no title in meta
    assert "B999" not in titles  # in meta, never reviewed
    by_user = dict(zip(ds.user_ids, ds.sequences, strict=True))
    assert [ds.item_ids[i] for i in by_user["A3"]] == ["B005", "B003", "B001"]  # last line is a Python literal
    after = prepare_dataset(DataConfig(name="amazon-beauty", path=str(FIX / "amazon")))
    assert "B004" not in after.item_ids and after.meta["preprocess"]["dropped"]["untitled_interactions"] == 1


def test_amazon_plain_json_and_unparsed_meta_of_unreviewed_items(tmp_path: Path) -> None:
    (tmp_path / "reviews_Beauty_5.json").write_bytes(gzip.decompress((FIX / "amazon" / "reviews_Beauty_5.json.gz")
                                                                     .read_bytes()))
    meta = gzip.decompress((FIX / "amazon" / "meta_Beauty.json.gz").read_bytes())
    # A broken meta line of an item nobody reviewed is skipped without parsing (documented behaviour).
    (tmp_path / "meta_Beauty.json").write_bytes(meta + b"{'asin': 'B777', 'title': 'broken\n")
    a, b = load_amazon(FIX / "amazon"), load_amazon(tmp_path)
    assert a.fingerprint() == b.fingerprint()
    # ...but the same break in a reviewed item's line is an error.
    (tmp_path / "meta_Beauty.json").write_bytes(meta + b"{'asin': 'B001', 'title': 'broken\n")
    with pytest.raises(DataError) as e:
        load_amazon(tmp_path)
    assert e.value.line == 7 and "meta_Beauty.json" in str(e.value)


def test_steam_fixture() -> None:
    ds = load_steam(FIX / "steam")
    assert ds.domain == "game" and ds.meta["load"]["games_without_id"] == 1
    titles = dict(zip(ds.item_ids, ds.titles, strict=True))
    assert titles["35140"] == "Batman: Arkham Asylum Game of the Year Edition"  # app_name when no title
    by_user = {u: [ds.item_ids[i] for i in s] for u, s in zip(ds.user_ids, ds.sequences, strict=True)}
    assert by_user == {"Chaos Syren": ["725280", "328100", "35140"], "O'Neil": ["725280", "328100", "35140"]}


def test_steam_fast_path_agrees_with_a_full_parse() -> None:
    lines = gzip.decompress((FIX / "steam" / "steam_reviews.json.gz").read_bytes()).decode().splitlines()
    used = 0
    for line in lines:
        fast = _steam_fast(line)
        full = ast.literal_eval(line)
        if fast is not None:
            used += 1
            assert fast == {k: full[k] for k in ("username", "product_id", "date")}
    assert used >= 3  # the real key order takes the fast path, including a double-quoted username
    assert _steam_fast("{'username': 'x', 'product_id': '1', 'date': '2017-01-01', 'text': 'cut") is None


def test_generic_fixture_duplicates_and_unknown_items() -> None:
    ds = load_generic(FIX / "generic", name="beauty-mini", domain="beauty")
    assert ds.meta["load"]["duplicate_rows_dropped"] == 1
    assert ds.meta["load"]["unknown_item_ids"] == 1 and ds.meta["load"]["interactions_unknown_item"] == 1
    titles = dict(zip(ds.item_ids, ds.titles, strict=True))
    assert titles["i9"] == "" and titles["i1"] == 'Rose "Water" Toner'  # TSV: quotes are literal
    assert "i5" not in titles  # never used
    out = prepare_dataset(DataConfig(name="beauty-mini", path=str(FIX / "generic")))
    assert "i9" not in out.item_ids and out.domain == "beauty"
    assert out.item_ids[1:] == ["i1", "i2", "i3", "i4"]


def test_generic_csv_with_custom_columns() -> None:
    ds = load_generic(FIX / "generic_csv", user_column="uid", item_column="iid", time_column="ts")
    assert ds.meta["load"]["title_column"] == "name"  # auto-picked
    assert ds.titles[1:] == ["Comb, wide tooth", "Brush", 'Dryer "Pro"']
    with pytest.raises(DataError) as e:
        load_generic(FIX / "generic_csv")
    assert e.value.field == "user_id" and e.value.line == 1


def test_generic_parquet_and_file_order(tmp_path: Path) -> None:
    inter = pd.read_csv(FIX / "generic" / "interactions.tsv", sep="\t", dtype={"user_id": str, "item_id": str})
    items = pd.read_csv(FIX / "generic" / "items.tsv", sep="\t", dtype=str, keep_default_na=False)
    inter["timestamp"] = pd.to_datetime(inter["timestamp"], unit="s")
    inter.to_parquet(tmp_path / "interactions.parquet")
    items.to_parquet(tmp_path / "items.parquet")
    a, b = load_generic(FIX / "generic"), load_generic(tmp_path)
    assert a.fingerprint() == b.fingerprint()
    # Without a time column the file order is the order.
    inter.drop(columns="timestamp").iloc[::-1].to_parquet(tmp_path / "interactions.parquet")
    c = load_generic(tmp_path, time_column=None)
    by_user = {u: [c.item_ids[i] for i in s] for u, s in zip(c.user_ids, c.sequences, strict=True)}
    assert by_user["u1"] == ["i3", "i2", "i1"]


def test_enormous_title_limit_is_exact(tmp_path: Path) -> None:
    shutil.copy(FIX / "generic" / "interactions.tsv", tmp_path)
    (tmp_path / "items.tsv").write_text(f"item_id\ttitle\ni1\t{'x' * MAX_TITLE_CHARS}\n")
    assert load_generic(tmp_path).titles[1] == "x" * MAX_TITLE_CHARS
    (tmp_path / "items.tsv").write_text(f"item_id\ttitle\ni1\t{'x' * (MAX_TITLE_CHARS + 1)}\n")
    with pytest.raises(DataError, match="limit"):
        load_generic(tmp_path)


def test_100k_rows_load_fast(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 100_000
    users, items = rng.integers(1, 944, n), rng.integers(1, 1683, n)
    stamps = rng.integers(874_724_710, 893_286_638, n)
    with open(tmp_path / "u.data", "w") as f:
        f.writelines(f"{u}\t{i}\t3\t{t}\n" for u, i, t in zip(users, items, stamps, strict=True))
    (tmp_path / "u.item").write_text("".join(f"{i}|Movie {i}, The (1990)|||x\n" for i in range(1, 1683)))
    t0 = time.perf_counter()
    ds = load_movielens(tmp_path)
    elapsed = time.perf_counter() - t0
    assert ds.meta["load"]["rows"] == n and ds.titles[1] == "The Movie 1 (1990)"
    assert elapsed < 5.0, f"100k rows took {elapsed:.2f}s (about 0.5 s expected)"
