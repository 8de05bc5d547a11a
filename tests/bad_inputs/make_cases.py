"""Regenerate the bad-input corpus and its manifest (run: python tests/bad_inputs/make_cases.py).

Each case is a small folder under ``cases/`` holding one malformed (or tricky) dataset, plus an entry in
``manifest.json``: the data config to use, and either the `DataError` it must raise (the file name, 1-based line and
field its one-line message must contain; ``null`` where the format has no line or the error no field) or, for inputs
that are accepted on purpose, the ``ds.meta`` values that show how they were handled.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import zlib
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
CASES = HERE / "cases"

GEN_HEAD = "user_id\titem_id\ttimestamp\n"
GEN_ROWS = "u1\ti1\t100\nu1\ti2\t200\nu1\ti3\t300\nu2\ti2\t100\nu2\ti3\t200\nu2\ti1\t300\n"
GEN_ITEMS = "item_id\ttitle\ni1\tRose Toner\ni2\tHand Cream\ni3\tMascara\n"
ML_DATA = "1\t1\t5\t881250949\n1\t2\t3\t881250950\n1\t3\t4\t881250951\n2\t2\t4\t881250952\n2\t3\t4\t881250953\n" \
          "2\t1\t4\t881250954\n"
ML_ITEM = "1|Toy Story (1995)|01-Jan-1995||x\n2|Usual Suspects, The (1995)|01-Jan-1995||x\n3|Heat (1995)|||x\n"
RB_INTER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(
    f"{u}\t{i}\t4\t{t}\n" for u, i, t in [(1, 1, 10), (1, 2, 20), (1, 3, 30), (2, 3, 10), (2, 1, 20), (2, 2, 30)])
RB_ITEM = "item_id:token\tmovie_title:token_seq\trelease_year:token\n1\tToy Story\t1995\n2\tHeat\t1995\n" \
          "3\tCastle, The\t1990\n"
AMZ_REVIEWS = [
    {"reviewerID": "A1", "asin": "B1", "unixReviewTime": 1400000000},
    {"reviewerID": "A1", "asin": "B2", "unixReviewTime": 1400000001},
    {"reviewerID": "A1", "asin": "B3", "unixReviewTime": 1400000002},
    {"reviewerID": "A2", "asin": "B3", "unixReviewTime": 1400000000},
    {"reviewerID": "A2", "asin": "B1", "unixReviewTime": 1400000001},
    {"reviewerID": "A2", "asin": "B2", "unixReviewTime": 1400000002},
]
AMZ_META = [{"asin": "B1", "title": "Toner"}, {"asin": "B2", "title": "Cream"}, {"asin": "B3", "title": "Mascara"}]
STEAM_REVIEWS = [
    {"username": "u1", "product_id": "10", "date": "2017-01-01", "text": "a"},
    {"username": "u1", "product_id": "20", "date": "2017-01-02", "text": "b"},
    {"username": "u1", "product_id": "30", "date": "2017-01-03", "text": "c"},
]
STEAM_GAMES = [{"id": "10", "app_name": "Ten"}, {"id": "20", "app_name": "Twenty"}, {"id": "30", "title": "Thirty"}]


def lit(rows: list[Any]) -> str:
    return "".join(repr(r) + "\n" for r in rows)


def gz_bytes(text: str, tail: bytes = b"") -> bytes:
    """Reproducible gzip (mtime 0) of ``text`` plus raw ``tail`` bytes (for invalid UTF-8)."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, filename="") as f:
        f.write(text.encode("utf-8") + tail)
    return buf.getvalue()


def generic(inter: str | bytes = GEN_HEAD + GEN_ROWS, items: str | bytes | None = GEN_ITEMS) -> dict[str, Any]:
    files: dict[str, Any] = {"interactions.tsv": inter}
    if items is not None:
        files["items.tsv"] = items
    return files


def ml(data: str | bytes = ML_DATA, item: str | bytes | None = ML_ITEM) -> dict[str, Any]:
    files: dict[str, Any] = {"u.data": data}
    if item is not None:
        files["u.item"] = item.encode("latin-1") if isinstance(item, str) else item
    return files


def rb(inter: str | bytes = RB_INTER, item: str | bytes | None = RB_ITEM) -> dict[str, Any]:
    files: dict[str, Any] = {"mini.inter": inter}
    if item is not None:
        files["mini.item"] = item
    return files


def amz(reviews: bytes | None = None, meta: bytes | None = None) -> dict[str, Any]:
    return {"reviews_Beauty_5.json.gz": reviews if reviews is not None else gz_bytes(lit(AMZ_REVIEWS)),
            "meta_Beauty.json.gz": meta if meta is not None else gz_bytes(lit(AMZ_META))}


def steam(reviews: bytes | None = None, games: bytes | None = None) -> dict[str, Any]:
    return {"steam_reviews.json.gz": reviews if reviews is not None else gz_bytes(lit(STEAM_REVIEWS)),
            "steam_games.json.gz": games if games is not None else gz_bytes(lit(STEAM_GAMES))}


def err(file: str, line: int | None, field: str | None) -> dict[str, Any]:
    return {"expect": "error", "file": file, "line": line, "field": field}


BIG = "x" * 5000
# Varied records so that half of the compressed stream holds many complete lines.
full_reviews_gz = gz_bytes(lit([{"reviewerID": f"A{hashlib.sha256(str(k).encode()).hexdigest()[:12]}",
                                 "asin": f"B{(k * 7919) % 1000:04d}", "unixReviewTime": 1400000000 + k * 86400,
                                 "summary": hashlib.sha256(str(-k).encode()).hexdigest()} for k in range(200)]))
truncated_gz = full_reviews_gz[: len(full_reviews_gz) // 2]
truncated_line = zlib.decompressobj(wbits=31).decompress(truncated_gz).count(b"\n") + 1

# id → (files, config overrides, expectation)
CASE_LIST: list[tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]] = [
    # --- generic TSV ---
    # Ids are text; one number spelt two ways (1 / 01 / 1.0) is refused instead of becoming two users or items.
    ("generic_user_id_two_spellings", generic(inter=GEN_HEAD + "1\ti1\t100\n1\ti2\t200\n1\ti3\t300\n"
                                              "01\ti2\t100\n01\ti3\t200\n01\ti1\t300\n"), {},
     err("interactions.tsv", 5, "user_id")),
    ("generic_item_id_float_spelling", generic(inter=GEN_HEAD + "u1\t1\t100\nu1\t2\t200\nu1\t3\t300\n"
                                               "u2\t2\t100\nu2\t1.0\t200\n",
                                               items="item_id\ttitle\n1\tRose Toner\n2\tHand Cream\n"
                                                     "3\tMascara\n"), {},
     err("interactions.tsv", 6, "item_id")),
    ("generic_wrong_encoding", generic(items=("item_id\ttitle\ni1\tRose Toner\ni2\tCr\xe8me\ni3\tMascara\n")
                                       .encode("latin-1")), {}, err("items.tsv", 3, "title")),
    ("generic_missing_column", generic(inter="user_id\titem_id\n" + "".join(
        "\t".join(r.split("\t")[:2]) + "\n" for r in GEN_ROWS.splitlines())), {}, err("interactions.tsv", 1,
                                                                                       "timestamp")),
    ("generic_renamed_column", generic(inter="user\titem_id\ttimestamp\n" + GEN_ROWS), {},
     err("interactions.tsv", 1, "user_id")),
    ("generic_custom_column_absent", generic(), {"user_column": "uid"}, err("interactions.tsv", 1, "uid")),
    ("generic_duplicate_header", generic(inter="user_id\titem_id\titem_id\n" + GEN_ROWS), {},
     err("interactions.tsv", 1, "item_id")),
    ("generic_empty_file", generic(inter=""), {}, err("interactions.tsv", None, None)),
    ("generic_header_only", generic(inter=GEN_HEAD), {}, err("interactions.tsv", 2, None)),
    ("generic_items_header_only", generic(items="item_id\ttitle\n"), {}, err("items.tsv", 2, None)),
    ("generic_wrong_delimiter", generic(inter=(GEN_HEAD + GEN_ROWS).replace("\t", ",")), {},
     err("interactions.tsv", 1, "user_id")),
    ("generic_wrong_delimiter_rows", generic(inter=GEN_HEAD + GEN_ROWS.replace("\t", ",")), {},
     err("interactions.tsv", 2, "item_id")),
    ("generic_extra_field", generic(inter=GEN_HEAD + "u1\ti1\t100\nu1\ti2\t200\textra\n" + GEN_ROWS), {},
     err("interactions.tsv", 3, "timestamp")),
    ("generic_missing_field", generic(inter=GEN_HEAD + "u1\ti1\t100\nu1\ti2\t200\nu1\ti3\n" + GEN_ROWS), {},
     err("interactions.tsv", 4, "timestamp")),
    ("generic_empty_user_id", generic(inter=GEN_HEAD + "u1\ti1\t100\n\ti2\t200\n" + GEN_ROWS), {},
     err("interactions.tsv", 3, "user_id")),
    ("generic_non_numeric_timestamp", generic(inter=GEN_HEAD + "u1\ti1\t100\nu1\ti2\t200\nu1\ti3\t2014-07-14\n"
                                              + GEN_ROWS), {}, err("interactions.tsv", 4, "timestamp")),
    ("generic_negative_timestamp", generic(inter=GEN_HEAD + "u1\ti1\t-5\n" + GEN_ROWS), {},
     err("interactions.tsv", 2, "timestamp")),
    ("generic_year_3000_timestamp", generic(inter=GEN_HEAD + "u1\ti1\t100\nu1\ti2\t32503680000\n" + GEN_ROWS), {},
     err("interactions.tsv", 3, "timestamp")),
    ("generic_milliseconds_timestamp", generic(inter=GEN_HEAD + "u1\ti1\t1405296000000\n" + GEN_ROWS), {},
     err("interactions.tsv", 2, "timestamp")),
    ("generic_nan_timestamp", generic(inter=GEN_HEAD + "u1\ti1\tnan\n" + GEN_ROWS), {},
     err("interactions.tsv", 2, "timestamp")),
    ("generic_enormous_title", generic(items=GEN_ITEMS + f"i4\t{BIG}\n"), {}, err("items.tsv", 5, "title")),
    ("generic_conflicting_item_ids", generic(items=GEN_ITEMS + "i2\tAnother Title\n"), {},
     err("items.tsv", 5, "item_id")),
    ("generic_missing_items_file", generic(items=None), {}, err("generic_missing_items_file", None,
                                                                "data.items_file")),
    ("generic_single_interaction_users", generic(inter=GEN_HEAD + "u1\ti1\t1\nu2\ti2\t2\nu3\ti3\t3\n"), {},
     err("interactions.tsv", None, "min_seq_len")),
    ("generic_all_titles_empty", generic(items="item_id\ttitle\ni1\t\ni2\t \ni3\t\n"), {},
     err("interactions.tsv", None, "min_seq_len")),
    ("generic_kcore_too_strict", generic(), {"preprocess": {"kcore": 10}}, err("interactions.tsv", None, "kcore")),
    # --- MovieLens raw ---
    ("ml_wrong_delimiter", ml(data=ML_DATA.replace("\t", ",")), {}, err("u.data", 1, "item_id")),
    ("ml_non_numeric_timestamp", ml(data=ML_DATA + "2\t4\t3\tyesterday\n"), {}, err("u.data", 7, "timestamp")),
    ("ml_negative_timestamp", ml(data="1\t1\t5\t-881250949\n" + ML_DATA), {}, err("u.data", 1, "timestamp")),
    ("ml_year_3000_timestamp", ml(data=ML_DATA + "3\t1\t5\t32503680000\n"), {}, err("u.data", 7, "timestamp")),
    ("ml_too_few_fields", ml(data="1\t1\t5\t881250949\n1\t2\t3\t881250950\n3\t1\t5\n" + ML_DATA), {},
     err("u.data", 3, "timestamp")),
    ("ml_too_many_fields", ml(data="1\t1\t5\t881250949\n1\t2\t3\t881250950\t9\n"), {}, err("u.data", 2, "timestamp")),
    ("ml_empty_u_data", ml(data=""), {}, err("u.data", None, None)),
    ("ml_missing_u_item", ml(item=None), {}, err("u.item", None, None)),
    ("ml_enormous_title", ml(item=ML_ITEM + f"4|{BIG}|||x\n"), {}, err("u.item", 4, "title")),
    ("ml_conflicting_item_ids", ml(item=ML_ITEM + "2|Heat (1995)|||x\n"), {}, err("u.item", 4, "item_id")),
    # --- RecBole atomic ---
    ("recbole_missing_timestamp", rb(inter="user_id:token\titem_id:token\n1\t1\n1\t2\n"), {},
     err("mini.inter", 1, "timestamp")),
    ("recbole_bad_timestamp", rb(inter=RB_INTER + "2\t1\t4\tlater\n"), {}, err("mini.inter", 8, "timestamp")),
    ("recbole_no_title_column", rb(item="item_id:token\tclass:token_seq\n1\tDrama\n"), {},
     err("mini.item", 1, "title")),
    ("recbole_wrong_encoding", rb(item=RB_ITEM.replace("Heat", "H\xe9at").encode("latin-1")), {},
     err("mini.item", 3, "movie_title")),
    ("recbole_missing_item_file", rb(item=None), {}, err("mini.item", None, None)),
    ("recbole_title_column_absent", rb(), {"title_column": "name"}, err("mini.item", 1, "name")),
    # --- Amazon 2014 ---
    ("amazon_truncated_gzip", amz(reviews=truncated_gz), {},
     err("reviews_Beauty_5.json.gz", truncated_line, None)),
    ("amazon_not_gzip", amz(reviews=b"\x1f\x8b\x08\x00garbage that is not deflate data"), {},
     err("reviews_Beauty_5.json.gz", 1, None)),
    ("amazon_non_dict_line", amz(reviews=gz_bytes(lit(AMZ_REVIEWS[:1]) + "[1, 2, 3]\n" + lit(AMZ_REVIEWS[1:]))), {},
     err("reviews_Beauty_5.json.gz", 2, None)),
    ("amazon_bad_literal", amz(meta=gz_bytes(lit(AMZ_META[:2]) + "{'asin': 'B3', 'title': 'Mas\n")), {},
     err("meta_Beauty.json.gz", 3, None)),
    ("amazon_missing_time", amz(reviews=gz_bytes(lit(AMZ_REVIEWS[:1]) + "{'reviewerID': 'A1', 'asin': 'B2'}\n")),
     {}, err("reviews_Beauty_5.json.gz", 2, "unixReviewTime")),
    ("amazon_string_time", amz(reviews=gz_bytes(lit([*AMZ_REVIEWS[:2], {**AMZ_REVIEWS[2], "unixReviewTime":
                                                                          "last week"}]))), {},
     err("reviews_Beauty_5.json.gz", 3, "unixReviewTime")),
    ("amazon_title_not_string", amz(meta=gz_bytes(lit([AMZ_META[0], {"asin": "B2", "title": ["a", "list"]}]))), {},
     err("meta_Beauty.json.gz", 2, "title")),
    ("amazon_invalid_utf8", amz(reviews=gz_bytes(lit(AMZ_REVIEWS[:1]),
                                                 tail=b"{'reviewerID': 'A\xff', 'asin': 'B2'}\n")), {},
     err("reviews_Beauty_5.json.gz", 2, None)),
    # --- Steam ---
    ("steam_bad_date", steam(reviews=gz_bytes(lit([*STEAM_REVIEWS, {"username": "u2", "product_id": "10",
                                                                    "date": "2017-13-45"}]))), {},
     err("steam_reviews.json.gz", 4, "date")),
    ("steam_year_3000", steam(reviews=gz_bytes(lit([{"username": "u2", "product_id": "10", "date": "3000-01-01"},
                                                    *STEAM_REVIEWS]))), {}, err("steam_reviews.json.gz", 1, "date")),
    ("steam_missing_product_id", steam(reviews=gz_bytes(lit([*STEAM_REVIEWS[:2], {"username": "u1",
                                                                                   "date": "2017-01-05"}]))), {},
     err("steam_reviews.json.gz", 3, "product_id")),
    # --- accepted on purpose: how they were handled shows in ds.meta ---
    ("ok_duplicate_rows", generic(inter=GEN_HEAD + GEN_ROWS + "u1\ti1\t100\nu2\ti3\t200\n"), {},
     {"expect": "ok", "meta": {"load.duplicate_rows_dropped": 2, "preprocess.after.interactions": 6}}),
    ("ok_unknown_item_ids", generic(inter=GEN_HEAD + GEN_ROWS + "u1\tzz\t400\nu2\tzz\t400\n"), {},
     {"expect": "ok", "meta": {"load.unknown_item_ids": 1, "load.interactions_unknown_item": 2,
                               "preprocess.dropped.untitled_interactions": 2, "preprocess.after.items": 3}}),
    ("ok_some_titles_empty", generic(items=GEN_ITEMS + "i4\t\n", inter=GEN_HEAD + GEN_ROWS + "u1\ti4\t400\n"), {},
     {"expect": "ok", "meta": {"preprocess.dropped.untitled_items": 1, "preprocess.after.items": 3}}),
    ("ok_blank_lines_crlf_bom", generic(inter=("\ufeff" + GEN_HEAD + GEN_ROWS + "\n\n").replace("\n", "\r\n")), {},
     {"expect": "ok", "meta": {"preprocess.after.interactions": 6}}),
]


def main() -> None:
    shutil.rmtree(CASES, ignore_errors=True)
    manifest = []
    for case_id, files, config, expect in CASE_LIST:
        folder = CASES / case_id
        folder.mkdir(parents=True)
        for name, content in files.items():
            (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        manifest.append({"id": case_id, "path": f"cases/{case_id}", "config": config, **expect})
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{len(manifest)} cases, {sum(m['expect'] == 'error' for m in manifest)} errors")


if __name__ == "__main__":
    main()
