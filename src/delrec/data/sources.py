"""Where a dataset's files come from: a dataset name (and optional path) → a folder, plus its format.

``ml-100k`` is tried in this order, and the first that works wins:

1. an explicit ``path`` (never falls through: a wrong path is an error);
2. the user cache ``$DELREC_CACHE/ml-100k/`` (default ``~/.cache/delrec/ml-100k/``) holding the raw ``u.data`` and
   ``u.item``;
3. the GroupLens download (`ML100K_URL`, md5-checked, short timeout, extracted atomically into the cache), skipped
   when ``DELREC_OFFLINE=1`` or downloads are disabled; any failure falls through;
4. the RecBole atomic files shipped inside the ``recbole`` wheel (``pip install --no-deps recbole==1.2.1``), found
   with `importlib.util.find_spec` so recbole (and its heavy imports) is never imported.

Other names: an explicit ``path``, else ``$DELREC_CACHE/<name>/``, else the recbole wheel's example of that name.
GroupLens forbids redistribution, so the project never ships these files.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import logging
import os
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from delrec.data.loaders import find_table
from delrec.errors import DataError
from delrec.io import atomic_dir

log = logging.getLogger(__name__)

ML100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
ML100K_MD5 = "0e33842e24a9c977be4e0107933c0723"
DOWNLOAD_TIMEOUT_S = 10.0
_MAX_DOWNLOAD_BYTES = 64 << 20  # the zip is ~5 MB; refuse anything absurd

FORMATS = ("movielens", "recbole", "amazon", "steam", "generic")


@dataclass(frozen=True)
class Resolved:
    """A dataset's folder and how it was found (``source`` goes into `SeqDataset.source`)."""

    folder: Path
    source: str  # e.g. "path:/data/x", "cache:/home/u/.cache/delrec/ml-100k", "recbole-wheel:/.../ml-100k"
    tried: tuple[str, ...] = field(default=())  # earlier steps that did not give the data, with the reason


def cache_dir() -> Path:
    """The user cache root: ``$DELREC_CACHE`` or ``~/.cache/delrec``."""
    env = os.environ.get("DELREC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "delrec"


def is_offline() -> bool:
    """``DELREC_OFFLINE=1`` (or true/yes) turns every download off; tests set it."""
    return os.environ.get("DELREC_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def recbole_example_dir(name: str) -> Path | None:
    """``recbole/dataset_example/<name>/`` inside an installed recbole wheel, located without importing recbole."""
    try:
        spec = importlib.util.find_spec("recbole")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        folder = Path(root) / "dataset_example" / name
        if (folder / f"{name}.inter").is_file():
            return folder
    return None


def _has_ml_raw(folder: Path) -> bool:
    return (folder / "u.data").is_file() and (folder / "u.item").is_file()


def download_ml100k(dest: Path, *, url: str | None = None, md5: str | None = None,
                    timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Fetch the GroupLens zip, check its md5, and extract its ``ml-100k/`` files into ``dest`` atomically.

    ``url``/``md5`` default to `ML100K_URL`/`ML100K_MD5` (read at call time). Raises ``OSError`` (network,
    timeout) or ``ValueError`` (checksum, bad zip); callers fall through on either.
    """
    url = url or ML100K_URL
    md5 = md5 or ML100K_MD5
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # a fixed https URL (tests: file://)
        blob = resp.read(_MAX_DOWNLOAD_BYTES + 1)
    if len(blob) > _MAX_DOWNLOAD_BYTES:
        raise ValueError(f"download larger than {_MAX_DOWNLOAD_BYTES} bytes")
    got = hashlib.md5(blob, usedforsecurity=False).hexdigest()
    if got != md5:
        raise ValueError(f"md5 {got} does not match the expected {md5}")
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as zf, atomic_dir(dest) as tmp:
            for info in zf.infolist():
                # Only plain files directly under ml-100k/; never trust member paths (no "../" escapes).
                parts = info.filename.split("/")
                if info.is_dir() or len(parts) != 2 or not parts[1] or parts[1] in {".", ".."}:
                    continue
                (tmp / parts[1]).write_bytes(zf.read(info))
            if not _has_ml_raw(tmp):
                raise ValueError("the zip holds no ml-100k/u.data and u.item")
    except zipfile.BadZipFile as e:
        raise ValueError(f"not a zip file: {e}") from None
    return dest


def resolve_dataset(name: str, path: str | os.PathLike[str] | None = None, *,
                    allow_download: bool = True) -> Resolved:
    """Find the folder holding dataset ``name`` (see the module docstring for the order)."""
    if path is not None:
        folder = Path(path).expanduser()
        if not folder.exists():
            raise DataError("data path does not exist", file=folder, field="data.path")
        if not folder.is_dir():
            raise DataError("data path must be a folder holding the dataset files (name a single file with "
                            "data.interactions_file)", file=folder, field="data.path")
        return Resolved(folder.resolve(), f"path:{folder.resolve()}")

    tried: list[str] = []
    cached = cache_dir() / name
    if name == "ml-100k":
        if _has_ml_raw(cached):
            return Resolved(cached, f"cache:{cached}")
        tried.append(f"cache {cached}: no u.data/u.item")
        if not allow_download:
            tried.append("download: disabled (data.download=false)")
        elif is_offline():
            tried.append("download: skipped (DELREC_OFFLINE=1)")
        else:
            try:
                download_ml100k(cached)
                log.info("downloaded ml-100k into %s", cached)
                return Resolved(cached, f"grouplens-download:{cached}", tuple(tried))
            except (OSError, ValueError) as e:
                tried.append(f"download {ML100K_URL}: {type(e).__name__}: {e}")
                log.warning("ml-100k download failed (%s); trying the recbole wheel", e)
    elif cached.is_dir() and any(cached.iterdir()):
        return Resolved(cached, f"cache:{cached}")
    else:
        tried.append(f"cache {cached}: missing")

    wheel = recbole_example_dir(name)
    if wheel is not None:
        return Resolved(wheel, f"recbole-wheel:{wheel}", tuple(tried))
    tried.append("recbole wheel: not installed or has no such example")
    hint = ("install the files with `pip install --no-deps recbole==1.2.1`, or put u.data and u.item in "
            f"{cached}, or set data.path" if name == "ml-100k" else
            f"set data.path to the folder holding the files, or put them in {cached}")
    # The remedy comes before what was tried: an error line is clipped, and long cache paths must not cut the hint.
    raise DataError(f"dataset {name!r} not found: {hint} (tried: {'; '.join(tried)})", field="data.path")


def detect_format(folder: Path, interactions_file: str | None = None) -> str:
    """The format of the files in ``folder`` (or of ``interactions_file`` when given)."""
    if interactions_file:
        f = interactions_file
        if f == "u.data":
            return "movielens"
        if f.endswith(".inter"):
            return "recbole"
        if f.startswith("reviews_"):
            return "amazon"
        if f.startswith("steam_reviews"):
            return "steam"
        return "generic"
    if (folder / "u.data").is_file():
        return "movielens"
    if any(folder.glob("*.inter")):
        return "recbole"
    if any(folder.glob("reviews_*.json*")):
        return "amazon"
    if any(folder.glob("steam_reviews.json*")):
        return "steam"
    if find_table(folder, "interactions") is not None:
        return "generic"
    raise DataError("cannot tell the data format: expected u.data + u.item (movielens), <name>.inter + "
                    "<name>.item (recbole), reviews_*.json.gz + meta_*.json.gz (amazon), steam_reviews.json.gz "
                    "+ steam_games.json.gz (steam) or interactions.tsv + items.tsv (generic)",
                    file=folder, field="data.format")
