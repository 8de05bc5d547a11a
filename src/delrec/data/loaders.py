"""Readers for the raw dataset formats; each returns a `SeqDataset` (via `SeqDataset.from_frames`).

Formats (see `delrec.data.sources.detect_format` for how a folder is recognised):

- ``movielens``: GroupLens MovieLens-100K ``u.data`` (user, item, rating, unix time; tab-separated) and ``u.item``
  (``|``-separated, latin-1; a UTF-8 re-save is accepted too).
- ``recbole``: RecBole atomic files ``<name>.inter`` / ``<name>.item`` with typed headers (``user_id:token``).
- ``amazon``: McAuley 2014 ``reviews_<Cat>[_5].json[.gz]`` + ``meta_<Cat>.json[.gz]``, one JSON or Python-literal
  dict per line.
- ``steam``: Kang & McAuley ``steam_reviews.json[.gz]`` + ``steam_games.json[.gz]`` (Python-literal lines).
- ``generic``: ``interactions.{tsv,csv,parquet}`` + ``items.{tsv,csv,parquet}`` with configurable column names.

Rules every loader follows:

- Any malformed input raises `DataError` naming the file, the 1-based line (where the format has lines) and the
  field. Timestamps must be numbers (dates for Steam) in [1970, 2100); titles are capped at `MAX_TITLE_CHARS`.
- Identical duplicate interaction rows (same user, item and timestamp) are dropped; the count is in
  ``ds.meta["load"]["duplicate_rows_dropped"]``.
- An interaction whose item is missing from the item table is *kept* with an empty title and counted in
  ``ds.meta["load"]["interactions_unknown_item"]``; `preprocess` (``drop_untitled``, on by default) removes it.
- Titles have their whitespace collapsed to single spaces; movie titles also get their article moved back to the
  front (`normalize_title`), so raw GroupLens and RecBole files give the same titles.

Known limits: in a CSV, a quoted field that spans several lines shifts the reported line numbers after it (TSV
fields are never quoted). Steam review lines in the Kang & McAuley key order are read by a prefix regex up to the
free-text ``text`` field, which is not itself parsed (~3 µs vs ~60 µs a line with ``ast.literal_eval``;
the full file has 7.8M lines).
"""

from __future__ import annotations

import ast
import csv
import html
import io
import json
import re
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from delrec.data.dataset import SeqDataset
from delrec.errors import DataError

MAX_TITLE_CHARS = 1000  # longer "titles" are almost always a misread column (a description, a whole line)
MAX_TIMESTAMP = 4_102_444_800  # 2100-01-01T00:00:00Z; later values are usually milliseconds or garbage
TITLE_FIELDS = ("movie_title", "title", "app_name", "name")  # auto-picked title column, first present wins

# Articles MovieLens moves to the end ("Usual Suspects, The"); English plus the foreign ones ML-100K uses.
_ARTICLES = ("The", "A", "An", "La", "Le", "Les", "L'", "Il", "Das", "Der", "Die", "Det", "El", "Los", "Las")
_ARTICLE_RE = re.compile(r"^(?P<body>.+),\s+(?P<art>" + "|".join(re.escape(a) for a in _ARTICLES) + r")$")
_TRAILING_GROUP_RE = re.compile(r"\s*(\([^()]*\))\s*$")
_ENTITY_RE = re.compile(r"&(?:[A-Za-z][A-Za-z0-9]{1,31}|#[0-9]{1,7}|#[xX][0-9A-Fa-f]{1,6});")
_NO_YEAR = {"unkonwn", "unknown"}
# Typos in RecBole's copy of ML-100K that the raw GroupLens file does not have (item 267 is "unknown" there).
_RECBOLE_TITLE_FIXES = {"unkonwn": "unknown"}


# --- titles ------------------------------------------------------------------------------------------------------
def _move_article(text: str) -> str:
    m = _ARTICLE_RE.match(text)
    if not m:
        return text
    art = m["art"]
    return f"{art}{'' if art.endswith(chr(39)) else ' '}{m['body']}"


def normalize_title(title: str, *, move_articles: bool = True) -> str:
    """Decode HTML character references and collapse whitespace; with ``move_articles`` turn "Usual Suspects, The
    (1995)" into "The Usual Suspects (1995)".

    Amazon's metadata keeps entities such as "Crabtree &amp; Evelyn" (~9% of Beauty's titles), which the LLM would
    read and be scored on as written; only references that end in ";" are decoded, so a plain "&" stays. Trailing
    parenthesised groups (the year, an alternative title) are kept in place and an article inside an alternative
    title is moved too: "Big Blue, The (Grand bleu, Le) (1988)" → "The Big Blue (Le Grand bleu) (1988)".
    """
    text = " ".join(_ENTITY_RE.sub(lambda m: html.unescape(m.group(0)), title).split())
    if not move_articles:
        return text
    groups: list[str] = []
    while (m := _TRAILING_GROUP_RE.search(text)) and m.start() > 0:
        groups.append(m.group(1))
        text = text[: m.start()]
    parts = [_move_article(text), *(f"({_move_article(g[1:-1])})" for g in reversed(groups))]
    return " ".join(parts)


# --- low-level readers ---------------------------------------------------------------------------------------------
def _decode(path: Path, data: bytes, encoding: str, sep: str | None, columns: Sequence[str] | None,
            header: bool) -> str:
    """Decode ``data``; a bad byte becomes a `DataError` naming its line and (for tables) its column."""
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        line = data.count(b"\n", 0, e.start) + 1
        field = None
        if sep is not None and columns:
            col = data.count(sep.encode(), line_start, e.start)
            field = columns[col] if col < len(columns) else None
        raise DataError(f"byte 0x{data[e.start]:02x} is not valid {encoding} text; re-save the file as "
                        f"{'UTF-8' if encoding.startswith('utf') else encoding}",
                        file=path, line=line, field=field) from None


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise DataError("file not found", file=path)
    data = path.read_bytes()
    if not data.strip():
        raise DataError("file is empty", file=path)
    return data


def _delimiter_hint(value: str, sep: str) -> str:
    for other, name in ((",", "comma"), (";", "semicolon"), ("\t", "tab"), ("|", "'|'")):
        if other != sep and other in value:
            return f" (the line looks {name}-separated; expected {_sep_name(sep)})"
    return ""


def _sep_name(sep: str) -> str:
    return {"\t": "tab-separated", ",": "comma-separated", "|": "'|'-separated"}.get(sep, f"{sep!r}-separated")


class _Table:
    """A delimited text table read as strings, with the 1-based file line of every row."""

    def __init__(self, path: Path, frame: pd.DataFrame, lines: np.ndarray, sep: str) -> None:
        self.path = path
        self.frame = frame
        self.lines = lines
        self.sep = sep

    def __len__(self) -> int:
        return len(self.frame)

    def fail(self, row: int, field: str | None, message: str) -> DataError:
        return DataError(message, file=self.path, line=int(self.lines[row]), field=field)

    def require(self, names: Sequence[str]) -> None:
        """The earliest row with an empty value in any of ``names`` is an error (a missing field, a wrong
        delimiter), so the reported line is the first bad line whichever column it is in."""
        empty = np.zeros(len(self.frame), dtype=bool)
        for n in names:
            empty |= (self.frame[n].str.strip() == "").to_numpy()
        rows = np.flatnonzero(empty)
        if len(rows):
            r = int(rows[0])
            name = next(n for n in names if not str(self.frame[n].iat[r]).strip())
            first = str(self.frame.iloc[r, 0])
            raise self.fail(r, name, f"empty or missing {name.replace('_', ' ')}{_delimiter_hint(first, self.sep)}")

    def column(self, name: str, *, required: bool = True, what: str = "value") -> pd.Series:
        """Stripped strings; an empty required value is an error (a missing field or a wrong delimiter)."""
        col = self.frame[name].str.strip()
        if required:
            empty = np.flatnonzero((col == "").to_numpy())
            if len(empty):
                r = int(empty[0])
                first = str(self.frame.iloc[r, 0])
                raise self.fail(r, name, f"empty or missing {what}{_delimiter_hint(first, self.sep)}")
        if what.endswith(" id"):
            _check_id_spelling(col, self.fail, name)
        return col


def _read_table(path: Path, *, sep: str, header: bool, names: Sequence[str] | None = None,
                required: Sequence[str] = (), encoding: str = "utf-8", quoting: int = csv.QUOTE_NONE) -> _Table:
    """Read a delimited file as strings. ``header``: the first line names the columns (they must include
    ``required``); otherwise ``names`` are positional and the file needs at least ``len(required)`` fields."""
    data = _read_bytes(path)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    head_line = data.split(b"\n", 1)[0].rstrip(b"\r")
    if header:
        columns = [c.strip() for c in head_line.decode(encoding, errors="replace").split(sep)]
    else:
        columns = list(names or [])
    text = _decode(path, data, encoding, sep, columns, header)
    if header:
        seen: set[str] = set()
        for c in columns:
            if c in seen:
                raise DataError(f"column {c!r} appears twice in the header", file=path, line=1, field=c)
            seen.add(c)
        for c in required:
            if c not in columns:
                hint = _delimiter_hint(head_line.decode(encoding, errors="replace"), sep)
                raise DataError(f"missing column {c!r}; the header has {columns}{hint}", file=path, line=1,
                                field=c)
        body_start = text.find("\n") + 1 if "\n" in text else len(text)
        body, first_line = text[body_start:], 2
    else:
        body, first_line = text, 1
    if not body.strip():
        raise DataError("the file has a header but no data rows" if header else "file is empty", file=path,
                        line=first_line if header else None, field=None)
    try:
        frame = pd.read_csv(io.StringIO(body), sep=sep, header=None, names=columns if header else None,
                            dtype=str, keep_default_na=False, na_filter=False, skip_blank_lines=False,
                            quoting=quoting, index_col=False, engine="c")
    except pd.errors.ParserError as e:
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(e))
        if not m:
            raise DataError(f"cannot parse the file: {e}", file=path) from None
        line = int(m[2]) + first_line - 1
        cols = columns or [f"column {i + 1}" for i in range(int(m[1]))]
        raise DataError(f"the line has {m[3]} {_sep_name(sep)} fields, expected {m[1]}", file=path, line=line,
                        field=cols[-1] if cols else None) from None
    if not header:
        if frame.shape[1] < len(required):
            first = str(frame.iloc[0, 0]) if len(frame) else ""
            missing = list(names or [])[frame.shape[1]]
            raise DataError(f"expected at least {len(required)} {_sep_name(sep)} fields, found {frame.shape[1]}"
                            f"{_delimiter_hint(first, sep)}", file=path, line=1, field=missing)
        frame.columns = [*(names or []), *[f"_extra{i}" for i in range(frame.shape[1] - len(names or []))]][
            : frame.shape[1]]
    lines = np.arange(first_line, first_line + len(frame))
    # Blank (or whitespace-only) lines are allowed anywhere, e.g. a trailing one.
    blank = (frame.apply(lambda c: c.str.strip() == "")).all(axis=1).to_numpy()
    if blank.any():
        frame, lines = frame.loc[~blank].reset_index(drop=True), lines[~blank]
    if frame.empty:
        raise DataError("no data rows", file=path, line=first_line, field=None)
    return _Table(path, frame, lines, sep)


def _check_ids(values: pd.Series, fail: Any, field: str) -> None:
    empty = np.flatnonzero((values == "").to_numpy())
    if len(empty):
        raise fail(int(empty[0]), field, "empty id")


def _timestamps(values: pd.Series, fail: Any, field: str) -> np.ndarray:
    """Unix seconds as float64, checked for being numbers in [1970, 2100)."""
    num = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(np.isnan(num))
    if len(bad):
        r = int(bad[0])
        raise fail(r, field, f"timestamp {values.iloc[r]!r} is not a number (expected unix seconds)")
    return _check_time_range(num, values, fail, field)


def _check_time_range(num: np.ndarray, values: Any, fail: Any, field: str) -> np.ndarray:
    values = np.asarray(values, dtype=object)
    neg = np.flatnonzero(num < 0)
    if len(neg):
        r = int(neg[0])
        raise fail(r, field, f"negative timestamp {values[r]!r}")
    late = np.flatnonzero(~(num < MAX_TIMESTAMP))  # also catches inf
    if len(late):
        r = int(late[0])
        raise fail(r, field, f"timestamp {values[r]!r} is after the year 2100 (milliseconds instead of seconds?)")
    return num


def _titles(values: pd.Series, fail: Any, field: str, *, movie: bool) -> list[str]:
    out = [normalize_title(t, move_articles=movie) for t in values.tolist()]
    long = [i for i, t in enumerate(out) if len(t) > MAX_TITLE_CHARS]
    if long:
        r = long[0]
        raise fail(r, field, f"title is {len(out[r]):,} characters long (limit {MAX_TITLE_CHARS:,}); "
                             "is the title column right?")
    return out


def _item_table(ids: pd.Series, titles: list[str], fail: Any, id_field: str) -> pd.DataFrame:
    """Item table with one row per id; the same id twice with different titles is an error."""
    items = pd.DataFrame({"item_id": ids.to_numpy(), "title": titles})
    dup = items["item_id"].duplicated(keep="first").to_numpy()
    if dup.any():
        first_title = dict(zip(items["item_id"][~dup], items["title"][~dup], strict=True))
        for r in np.flatnonzero(dup):
            iid = items["item_id"].iat[r]
            if first_title[iid] != items["title"].iat[r]:
                raise fail(int(r), id_field, f"item id {iid!r} appears twice with different titles")
        items = items.loc[~dup].reset_index(drop=True)
    return items


def _build(inter: pd.DataFrame, items: pd.DataFrame, *, name: str, domain: str, fmt: str,
           files: dict[str, str], extra: dict[str, Any] | None = None) -> SeqDataset:
    """Drop identical duplicate rows, count unknown items, and build the dataset with load statistics in meta."""
    rows = len(inter)
    # Plain object arrays: pandas 3's Arrow-backed strings make isin/iteration much slower here.
    inter = pd.DataFrame({c: inter[c].to_numpy(dtype=object if c != "timestamp" else np.float64)
                          for c in ("user_id", "item_id", "timestamp")})
    inter = inter.drop_duplicates(["user_id", "item_id", "timestamp"], keep="first")
    table_ids = set(items["item_id"].tolist())
    inter_ids = inter["item_id"].to_numpy(dtype=object)
    known = np.fromiter((i in table_ids for i in inter_ids), dtype=bool, count=len(inter_ids))
    used_ids = set(inter_ids.tolist())
    used = items[[i in used_ids for i in items["item_id"].tolist()]]
    used = pd.DataFrame({"item_id": used["item_id"].to_numpy(dtype=object),
                         "title": used["title"].to_numpy(dtype=object)})
    ds = SeqDataset.from_frames(inter, used, name=name, domain=domain)
    ds.meta = {
        "format": fmt,
        "files": files,
        "load": {
            "rows": rows,
            "duplicate_rows_dropped": rows - len(inter),
            "items_in_item_table": len(items),
            "unknown_item_ids": len(set(inter_ids[~known].tolist())),
            "interactions_unknown_item": int((~known).sum()),
            **(extra or {}),
        },
    }
    return ds


# --- MovieLens (GroupLens raw) -------------------------------------------------------------------------------------
def load_movielens(folder: str | Path, *, name: str = "ml-100k", domain: str = "movie") -> SeqDataset:
    """MovieLens-100K raw files ``u.data`` + ``u.item`` in ``folder``."""
    folder = Path(folder)
    data_path, item_path = folder / "u.data", folder / "u.item"
    t = _read_table(data_path, sep="\t", header=False, names=["user_id", "item_id", "rating", "timestamp"],
                    required=["user_id", "item_id", "rating", "timestamp"])
    t.require(["user_id", "item_id", "rating", "timestamp"])
    users, iids = t.column("user_id", what="user id"), t.column("item_id", what="item id")
    stamps = _timestamps(t.column("timestamp", what="timestamp"), t.fail, "timestamp")
    inter = pd.DataFrame({"user_id": users, "item_id": iids, "timestamp": stamps})

    # u.item is latin-1 per the GroupLens README; a UTF-8 re-save decodes as UTF-8 without mojibake.
    raw = _read_bytes(item_path)
    try:
        raw.decode("utf-8")
        enc = "utf-8"
    except UnicodeDecodeError:
        enc = "latin-1"
    it = _read_table(item_path, sep="|", header=False, names=["item_id", "title"], required=["item_id", "title"],
                     encoding=enc)
    ids = it.column("item_id", what="item id")
    titles = _titles(it.column("title", required=False), it.fail, "title", movie=True)
    items = _item_table(ids, titles, it.fail, "item_id")
    return _build(inter, items, name=name, domain=domain, fmt="movielens",
                  files={"interactions": str(data_path), "items": str(item_path)}, extra={"item_encoding": enc})


# --- RecBole atomic files ------------------------------------------------------------------------------------------
def _recbole_columns(t: _Table) -> dict[str, str]:
    """Bare field name → header token (``user_id`` → ``user_id:token``)."""
    return {c.split(":", 1)[0].strip(): c for c in t.frame.columns}


def _recbole_table(path: Path, required: Sequence[str]) -> tuple[_Table, dict[str, str]]:
    data = _read_bytes(path)
    head = data.split(b"\n", 1)[0].decode("utf-8", errors="replace").lstrip("\ufeff")
    bare = {c.split(":", 1)[0].strip() for c in head.rstrip("\r").split("\t")}
    for c in required:
        if c not in bare:
            raise DataError(f"missing column {c!r}; the header has {head.strip().split(chr(9))}"
                            f"{_delimiter_hint(head, chr(9))}", file=path, line=1, field=c)
    t = _read_table(path, sep="\t", header=True)
    cols = _recbole_columns(t)
    t.frame = t.frame.rename(columns={v: k for k, v in cols.items()})
    return t, cols


def load_recbole(folder: str | Path, *, name: str | None = None, domain: str | None = None,
                 inter_file: str | None = None, item_file: str | None = None, user_column: str = "user_id",
                 item_column: str = "item_id", time_column: str = "timestamp",
                 title_column: str | None = None) -> SeqDataset:
    """RecBole atomic files ``<name>.inter`` + ``<name>.item`` in ``folder``.

    ``title_column`` defaults to the first of `TITLE_FIELDS` present. ``movie_title`` + ``release_year`` (RecBole's
    MovieLens files) are rebuilt into "Title (year)" and article-normalised, matching the raw GroupLens titles;
    RecBole's "unkonwn" (ML-100K item 267) is corrected to "unknown".
    """
    folder = Path(folder)
    inter_path = folder / inter_file if inter_file else _one_file(folder, "*.inter", name)
    stem = inter_path.name[: -len(".inter")] if inter_path.name.endswith(".inter") else inter_path.stem
    item_path = folder / (item_file or f"{stem}.item")
    if not item_path.is_file():
        raise DataError(f"no item file with titles next to {inter_path.name} (expected {item_path.name})",
                        file=item_path, field=title_column or "title")
    name = name or stem
    t, _ = _recbole_table(inter_path, [user_column, item_column, time_column])
    t.require([user_column, item_column, time_column])
    users = t.column(user_column, what="user id")
    iids = t.column(item_column, what="item id")
    stamps = _timestamps(t.column(time_column, what="timestamp"), t.fail, time_column)
    inter = pd.DataFrame({"user_id": users, "item_id": iids, "timestamp": stamps})

    it, cols = _recbole_table(item_path, [item_column])
    if title_column is None:
        title_column = next((c for c in TITLE_FIELDS if c in cols), None)
        if title_column is None:
            raise DataError(f"no title column (looked for {list(TITLE_FIELDS)}; the header has "
                            f"{list(cols.values())}); set data.title_column", file=item_path, line=1, field="title")
    elif title_column not in cols:
        raise DataError(f"missing title column {title_column!r}; the header has {list(cols.values())}",
                        file=item_path, line=1, field=title_column)
    movie = title_column == "movie_title" or (domain or domain_for(name)) == "movie"
    raw_titles = it.column(title_column, required=False)
    if title_column == "movie_title":
        raw_titles = raw_titles.map(lambda s: _RECBOLE_TITLE_FIXES.get(s, s))
        if "release_year" in cols:
            # Not only years: RecBole split "... (1995) (V)" into title "... (1995)" + release_year "V".
            years = it.column("release_year", required=False)
            raw_titles = pd.Series([f"{ti} ({y})" if ti and y and y.lower() not in _NO_YEAR else ti
                                    for ti, y in zip(raw_titles, years, strict=True)])
    titles = _titles(raw_titles, it.fail, title_column, movie=movie)
    items = _item_table(it.column(item_column, what="item id"), titles, it.fail, item_column)
    return _build(inter, items, name=name, domain=domain or domain_for(name), fmt="recbole",
                  files={"interactions": str(inter_path), "items": str(item_path)},
                  extra={"title_column": title_column})


def _one_file(folder: Path, pattern: str, name: str | None) -> Path:
    found = sorted(folder.glob(pattern))
    if name:
        exact = [p for p in found if p.name.split(".")[0] == name]
        if exact:
            return exact[0]
    if len(found) == 1:
        return found[0]
    if not found:
        raise DataError(f"no {pattern} file in the folder", file=folder)
    raise DataError(f"several {pattern} files ({', '.join(p.name for p in found)}); set data.interactions_file",
                    file=folder, field="data.interactions_file")


# --- line-per-record files (Amazon 2014, Steam) -----------------------------------------------------------------
def _open_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line) of a plain or gzip file.

    Gzip is decompressed here chunk by chunk (not through `gzip.open`, whose read-ahead reports a truncation lines
    before it happens), so a truncated or corrupt stream names the first line it could not deliver.
    """
    if not path.is_file():
        raise DataError("file not found", file=path)
    with open(path, "rb") as f:
        magic = f.read(2)
    n = 0
    if magic != b"\x1f\x8b":
        with open(path, "rb") as f:
            for n, raw in enumerate(f, start=1):
                yield n, raw
        if n == 0:
            raise DataError("file is empty", file=path)
        return
    d = zlib.decompressobj(wbits=31)  # 31: expect a gzip header
    pending = b""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            while chunk:
                try:
                    pending += d.decompress(chunk)
                except zlib.error as e:
                    raise DataError(f"gzip data is corrupt ({e})", file=path, line=n + 1) from None
                chunk = b""
                if d.eof and d.unused_data:  # a multi-member gzip: the next member starts here
                    chunk, d = d.unused_data, zlib.decompressobj(wbits=31)
            *full, pending = pending.split(b"\n")
            for raw in full:
                n += 1
                yield n, raw
    if not d.eof:
        raise DataError(f"gzip data is truncated after line {n} (the download or copy was cut short)", file=path,
                        line=n + 1)
    if pending:
        n += 1
        yield n, pending
    if n == 0:
        raise DataError("file is empty", file=path)


def _literal_records(path: Path, *, desc: str, fast: Any = None,
                     skip: Any = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Parse one dict per line: JSON first (fast), then a Python literal (``ast.literal_eval``, never ``eval``).

    ``fast(text) -> dict | None`` may extract the needed fields without a full parse; ``skip(text) -> bool`` may skip
    lines that cannot matter (a meta record of an item nobody reviewed).
    """
    count = 0
    for n, raw in tqdm(_open_lines(path), desc=desc, unit=" lines", disable=None, leave=False):
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise DataError(f"byte 0x{raw[e.start]:02x} is not valid UTF-8 text", file=path, line=n) from None
        if not text:
            continue
        if skip is not None and skip(text):
            continue
        rec = fast(text) if fast is not None else None
        if rec is None:
            try:
                rec = json.loads(text)
            except ValueError:
                try:
                    rec = ast.literal_eval(text)
                except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError) as e:
                    reason = str(e.msg if isinstance(e, SyntaxError) else e)
                    reason = " ".join(re.sub(r"\(detected at line \d+\)", "", reason).split())[:120]
                    raise DataError(f"not a JSON or Python-literal dict ({type(e).__name__}: {reason})",
                                    file=path, line=n) from None
        if not isinstance(rec, dict):
            raise DataError(f"expected one dict per line, got a {type(rec).__name__}", file=path, line=n)
        count += 1
        yield n, rec
    if count == 0 and skip is None:
        raise DataError("no records (only blank lines)", file=path)


def _text_field(rec: dict[str, Any], key: str, path: Path, line: int, *, required: bool = True) -> str:
    value = rec.get(key)
    if value is None:
        if required:
            raise DataError(f"missing {key!r} (keys: {sorted(map(str, rec))[:8]})", file=path, line=line, field=key)
        return ""
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise DataError(f"{key!r} must be a string, got {type(value).__name__}", file=path, line=line, field=key)
    return str(value).strip()


class _Records:
    """Column lists gathered from line records, with line numbers for later vectorised checks."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[int] = []

    def fail(self, row: int, field: str | None, message: str) -> DataError:
        return DataError(message, file=self.path, line=self.lines[row], field=field)


_META_ASIN_RE = re.compile(r"""^\{\s*['"]asin['"]\s*:\s*['"]([^'"\\]*)['"]""")


def load_amazon(folder: str | Path, *, name: str | None = None, domain: str | None = None,
                reviews_file: str | None = None, meta_file: str | None = None) -> SeqDataset:
    """Amazon 2014 reviews (``reviewerID``, ``asin``, ``unixReviewTime``) + meta (``asin``, ``title``).

    Meta lines that start with an ``asin`` nobody reviewed are skipped unparsed (the meta files hold many more items
    than a 5-core review file, and ``ast.literal_eval`` costs ~0.2 ms a line); all other lines are fully checked.
    A meta record without a title gives an empty title (dropped by preprocessing).
    """
    folder = Path(folder)
    reviews_path = folder / reviews_file if reviews_file else _amazon_file(folder, "reviews_", name)
    meta_path = folder / meta_file if meta_file else _amazon_file(folder, "meta_", name,
                                                                 _category(reviews_path.name))
    category = _category(reviews_path.name)
    name = name or f"amazon-{category.lower().replace('_', '-')}"
    rv = _Records(reviews_path)
    users: list[str] = []
    asins: list[str] = []
    times: list[Any] = []
    for n, rec in _literal_records(reviews_path, desc=f"read {reviews_path.name}"):
        users.append(_text_field(rec, "reviewerID", reviews_path, n))
        asins.append(_text_field(rec, "asin", reviews_path, n))
        t = rec.get("unixReviewTime")
        if t is None:
            raise DataError("missing 'unixReviewTime'", file=reviews_path, line=n, field="unixReviewTime")
        times.append(t)
        rv.lines.append(n)
    stamps = _timestamps(pd.Series(times, dtype=object).astype(str), rv.fail, "unixReviewTime")
    _check_ids(pd.Series(users), rv.fail, "reviewerID")
    _check_ids(pd.Series(asins), rv.fail, "asin")
    inter = pd.DataFrame({"user_id": users, "item_id": asins, "timestamp": stamps})

    needed = set(asins)

    def skip(text: str) -> bool:
        m = _META_ASIN_RE.match(text)
        return m is not None and m.group(1) not in needed

    mt = _Records(meta_path)
    ids: list[str] = []
    titles: list[str] = []
    for n, rec in _literal_records(meta_path, desc=f"read {meta_path.name}", skip=skip):
        ids.append(_text_field(rec, "asin", meta_path, n))
        titles.append(_text_field(rec, "title", meta_path, n, required=False))
        mt.lines.append(n)
    ids_s = pd.Series(ids, dtype=str)
    _check_ids(ids_s, mt.fail, "asin")
    clean = _titles(pd.Series(titles, dtype=str), mt.fail, "title", movie=False)
    items = _item_table(ids_s, clean, mt.fail, "asin")
    return _build(inter, items, name=name, domain=domain or domain_for(f"{name} {category}"),
                  fmt="amazon", files={"interactions": str(reviews_path), "items": str(meta_path)},
                  extra={"category": category})


def _category(filename: str) -> str:
    stem = re.sub(r"\.json(\.gz)?$", "", filename)
    stem = re.sub(r"^(reviews|meta)_", "", stem)
    return re.sub(r"_5$", "", stem)


def _amazon_file(folder: Path, prefix: str, name: str | None, category: str | None = None) -> Path:
    found = sorted(p for p in folder.iterdir() if p.name.startswith(prefix) and re.search(r"\.json(\.gz)?$", p.name))
    if category is not None:
        found = [p for p in found if _category(p.name) == category]
    elif name:
        key = name.lower().replace("amazon-", "").replace("-", "").replace("_", "")
        match = [p for p in found if key and key in _category(p.name).lower().replace("_", "")]
        found = match or found
    if prefix == "reviews_" and len({_category(p.name) for p in found}) == 1:
        # reviews_X_5 (5-core, what the paper uses) is preferred over the full reviews_X when both are there.
        five = [p for p in found if _category(p.name) + "_5" in p.name]
        found = five or found
    if len(found) == 1:
        return found[0]
    field = "data.interactions_file" if prefix == "reviews_" else "data.items_file"
    if not found:
        raise DataError(f"no {prefix}*.json[.gz] file" + (f" for category {category!r}" if category else ""),
                        file=folder, field=field)
    raise DataError(f"several {prefix}*.json[.gz] files ({', '.join(p.name for p in found)}); set {field}",
                    file=folder, field=field)


_STEAM_FAST_RE = re.compile(
    r"""^\{'username': (?P<u>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"), (?:'hours': [-\d.e]+, )?"""
    r"""(?:'products': \d+, )?'product_id': '(?P<p>[^'\\]*)', (?:'page_order': \d+, )?'date': '(?P<d>[^'\\]*)', """
)


def _steam_fast(text: str) -> dict[str, Any] | None:
    """The fields a review needs, read from the fixed key order of the Kang & McAuley file before the free ``text``;
    ``None`` (→ full parse) for any line of another shape."""
    m = _STEAM_FAST_RE.match(text)
    if m is None or not text.endswith("}"):
        return None
    u = m["u"]
    user = u[1:-1] if "\\" not in u else ast.literal_eval(u)
    return {"username": user, "product_id": m["p"], "date": m["d"]}


def load_steam(folder: str | Path, *, name: str = "steam", domain: str = "game", reviews_file: str | None = None,
               games_file: str | None = None) -> SeqDataset:
    """Steam (Kang & McAuley): reviews (``username``, ``product_id``, ``date`` YYYY-MM-DD) + games (``id``,
    ``title`` or else ``app_name``). Games without an ``id`` cannot be referenced and are skipped (counted)."""
    folder = Path(folder)
    reviews_path = folder / reviews_file if reviews_file else _first(folder, "steam_reviews.json")
    games_path = folder / games_file if games_file else _first(folder, "steam_games.json")
    rv = _Records(reviews_path)
    users: list[str] = []
    pids: list[str] = []
    dates: list[str] = []
    for n, rec in _literal_records(reviews_path, desc=f"read {reviews_path.name}", fast=_steam_fast):
        users.append(_text_field(rec, "username", reviews_path, n))
        pids.append(_text_field(rec, "product_id", reviews_path, n))
        dates.append(_text_field(rec, "date", reviews_path, n))
        rv.lines.append(n)
    _check_ids(pd.Series(users), rv.fail, "username")
    _check_ids(pd.Series(pids), rv.fail, "product_id")
    stamps = _dates(pd.Series(dates, dtype=str), rv.fail, "date")
    inter = pd.DataFrame({"user_id": users, "item_id": pids, "timestamp": stamps})

    gm = _Records(games_path)
    ids: list[str] = []
    titles: list[str] = []
    no_id = 0
    for n, rec in _literal_records(games_path, desc=f"read {games_path.name}"):
        gid = _text_field(rec, "id", games_path, n, required=False)
        if not gid:
            no_id += 1
            continue
        key = "title" if rec.get("title") not in (None, "") else "app_name"
        ids.append(gid)
        titles.append(_text_field(rec, key, games_path, n, required=False))
        gm.lines.append(n)
    clean = _titles(pd.Series(titles, dtype=str), gm.fail, "title", movie=False)
    items = _item_table(pd.Series(ids, dtype=str), clean, gm.fail, "id")
    return _build(inter, items, name=name, domain=domain, fmt="steam",
                  files={"interactions": str(reviews_path), "items": str(games_path)},
                  extra={"games_without_id": no_id})


def _first(folder: Path, stem: str) -> Path:
    for suffix in (".gz", ""):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    raise DataError(f"no {stem}[.gz] in the folder", file=folder)


_DATE_RE = re.compile(r"^(\d{4})-(\d{1,2})-(\d{1,2})$")


def _dates(values: pd.Series, fail: Any, field: str) -> np.ndarray:
    """YYYY-MM-DD → unix seconds (UTC midnight), checked for [1970, 2100)."""
    parts = values.str.extract(_DATE_RE)
    bad = np.flatnonzero(parts[0].isna().to_numpy())
    if len(bad):
        r = int(bad[0])
        raise fail(r, field, f"date {values.iloc[r]!r} is not YYYY-MM-DD")
    years = parts[0].astype(int).to_numpy()
    early, late = np.flatnonzero(years < 1970), np.flatnonzero(years >= 2100)
    if len(early):
        raise fail(int(early[0]), field, f"date {values.iloc[int(early[0])]!r} is before 1970")
    if len(late):
        raise fail(int(late[0]), field, f"date {values.iloc[int(late[0])]!r} is after the year 2100")
    dt = pd.to_datetime(values, format="%Y-%m-%d", errors="coerce")
    bad = np.flatnonzero(dt.isna().to_numpy())
    if len(bad):
        r = int(bad[0])
        raise fail(r, field, f"date {values.iloc[r]!r} is not a valid calendar date")
    return ((dt - pd.Timestamp("1970-01-01")) // pd.Timedelta(seconds=1)).to_numpy(dtype=np.float64)


# --- generic tables ----------------------------------------------------------------------------------------------
_TABLE_SUFFIXES = (".tsv", ".csv", ".parquet")


def find_table(folder: Path, stem: str) -> Path | None:
    """``folder/stem.{tsv,csv,parquet}``, the first that exists."""
    for suffix in _TABLE_SUFFIXES:
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


class _ParquetRows:
    """Parquet has no lines: errors name the 1-based row in the message instead."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, row: int, field: str | None, message: str) -> DataError:
        return DataError(f"row {row + 1}: {message}", file=self.path, field=field)


def _generic_table(path: Path, columns: Sequence[str], sep: str | None) -> tuple[pd.DataFrame, Any]:
    """Columns as stripped strings (or datetimes/numbers from Parquet), plus the table's error helper."""
    if path.suffix == ".parquet":
        if not path.is_file():
            raise DataError("file not found", file=path)
        try:
            frame = pd.read_parquet(path)
        except Exception as e:  # pyarrow raises several unrelated types for a bad file
            raise DataError(f"not a readable Parquet file ({type(e).__name__}: {str(e)[:120]})", file=path) from None
        for c in columns:
            if c not in frame.columns:
                raise DataError(f"missing column {c!r}; the file has {list(frame.columns)}", file=path, field=c)
        if frame.empty:
            raise DataError("no data rows", file=path)
        return frame, _ParquetRows(path)
    delim = sep or ("," if path.suffix == ".csv" else "\t")
    t = _read_table(path, sep=delim, header=True, required=columns,
                    quoting=csv.QUOTE_MINIMAL if delim == "," else csv.QUOTE_NONE)
    return t.frame, t


def _as_str(frame: pd.DataFrame, col: str, fail: Any, *, required: bool = True, what: str = "id") -> pd.Series:
    na = frame[col].isna().to_numpy()
    s = frame[col].astype(str).str.strip()
    if na.any():
        s = s.where(~na, "")
    if required:
        empty = np.flatnonzero((s == "").to_numpy())
        if len(empty):
            raise fail(int(empty[0]), col, f"empty or missing {what}")
    s = s.reset_index(drop=True)
    if what.endswith(" id"):
        _check_id_spelling(s, fail, col)
    return s


def _check_id_spelling(ids: pd.Series, fail: Any, field: str) -> None:
    """Ids are read as text: ``1``, ``01`` and ``1.0`` are three ids. When one file spells the same number two
    ways, that is almost always a formatting accident (a spreadsheet, a float column), so it is refused rather
    than silently splitting one user or item in two."""
    num = pd.to_numeric(ids, errors="coerce")
    ok = num.notna().to_numpy()
    if not ok.any():
        return
    first = pd.DataFrame({"s": ids[ok], "n": num[ok], "row": np.flatnonzero(ok)}).drop_duplicates("s")
    clash = first[first.duplicated("n", keep=False)]
    if len(clash):
        a, b = clash.iloc[0], clash[clash["n"] == clash.iloc[0]["n"]].iloc[1]
        raise fail(int(b["row"]), field, f"id {b['s']!r} is the number of id {a['s']!r} written another way; ids "
                   "are read as text, so these would be two different ids: write each id one way")


def load_generic(folder: str | Path, *, name: str = "dataset", domain: str = "generic",
                 interactions_file: str | None = None, items_file: str | None = None,
                 user_column: str = "user_id", item_column: str = "item_id", time_column: str | None = "timestamp",
                 title_column: str | None = None, sep: str | None = None) -> SeqDataset:
    """``interactions.{tsv,csv,parquet}`` (user, item, timestamp) + ``items.{tsv,csv,parquet}`` (item, title).

    ``time_column=None`` takes the file order as the chronological order. ``title_column=None`` picks the first of
    `TITLE_FIELDS` present in the items file. ``sep`` overrides the delimiter implied by the file extension.
    """
    folder = Path(folder)
    inter_path = folder / interactions_file if interactions_file else find_table(folder, "interactions")
    items_path = folder / items_file if items_file else find_table(folder, "items")
    if inter_path is None:
        raise DataError("no interactions.{tsv,csv,parquet} in the folder", file=folder, field="data.interactions_file")
    if items_path is None:
        raise DataError("no items.{tsv,csv,parquet} in the folder", file=folder, field="data.items_file")
    cols = [user_column, item_column, *([time_column] if time_column else [])]
    frame, t = _generic_table(inter_path, cols, sep)
    if isinstance(t, _Table):
        t.require(cols)
    users = _as_str(frame, user_column, t.fail, what="user id")
    iids = _as_str(frame, item_column, t.fail, what="item id")
    if time_column is None:
        stamps = np.zeros(len(frame))
    elif pd.api.types.is_datetime64_any_dtype(frame[time_column]):
        dt = frame[time_column]
        if dt.isna().any():
            raise t.fail(int(np.flatnonzero(dt.isna().to_numpy())[0]), time_column, "missing timestamp")
        secs = ((dt.dt.tz_localize(None) if dt.dt.tz is not None else dt) - pd.Timestamp("1970-01-01")) \
            // pd.Timedelta(seconds=1)
        stamps = _check_time_range(secs.to_numpy(np.float64), dt.astype(str).tolist(), t.fail, time_column)
    else:
        stamps = _timestamps(_as_str(frame, time_column, t.fail, what="timestamp"), t.fail, time_column)
    inter = pd.DataFrame({"user_id": users, "item_id": iids, "timestamp": stamps})

    head = _peek_columns(items_path, sep)
    if title_column is None:
        title_column = next((c for c in TITLE_FIELDS if c in head), "title")
    iframe, it = _generic_table(items_path, [item_column, title_column], sep)
    ids = _as_str(iframe, item_column, it.fail, what="item id")
    titles = _titles(_as_str(iframe, title_column, it.fail, required=False), it.fail, title_column,
                     movie=domain == "movie")
    items = _item_table(ids, titles, it.fail, item_column)
    return _build(inter, items, name=name, domain=domain, fmt="generic",
                  files={"interactions": str(inter_path), "items": str(items_path)},
                  extra={"title_column": title_column})


def _peek_columns(path: Path, sep: str | None) -> list[str]:
    """Column names without reading the whole file (for picking the title column)."""
    if not path.is_file():
        return []
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        except Exception:
            return []  # the full read reports the problem
    with open(path, "rb") as f:
        head = f.readline().decode("utf-8", errors="replace").lstrip("\ufeff").rstrip("\r\n")
    delim = sep or ("," if path.suffix == ".csv" else "\t")
    return [c.strip().strip('"') for c in head.split(delim)]


# --- domains ---------------------------------------------------------------------------------------------------
def domain_for(name: str) -> str:
    """Prompt domain guessed from a dataset name: ml-*/movie → movie, beauty, home/kitchen, steam/game."""
    n = name.lower()
    if n.startswith("ml-") or "movie" in n or "movielens" in n:
        return "movie"
    if "beauty" in n:
        return "beauty"
    if "home" in n or "kitchen" in n:
        return "home"
    if "steam" in n or "game" in n:
        return "game"
    return "generic"
