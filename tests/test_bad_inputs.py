"""The bad-input corpus (tests/bad_inputs/): every malformed file must give one `DataError` line that names the file,
the line (where the format has lines) and the field, and nothing may be written anywhere.

Regenerate the corpus with ``python tests/bad_inputs/make_cases.py``; the manifest lists each case's expectation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from delrec.data import DataConfig, PreprocessConfig, prepare_dataset
from delrec.errors import DataError

HERE = Path(__file__).parent / "bad_inputs"
MANIFEST: list[dict[str, Any]] = json.loads((HERE / "manifest.json").read_text(encoding="utf-8"))


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("DELREC_OFFLINE", "1")
    monkeypatch.setenv("DELREC_CACHE", str(cache))
    return cache


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _config(case: dict[str, Any]) -> DataConfig:
    cfg = dict(case["config"])
    pre = cfg.pop("preprocess", {})
    return DataConfig(name=case["id"], path=str(HERE / case["path"]), preprocess=PreprocessConfig(**pre), **cfg)


def test_corpus_is_big_enough() -> None:
    assert sum(c["expect"] == "error" for c in MANIFEST) >= 25
    ids = [c["id"] for c in MANIFEST]
    assert len(ids) == len(set(ids))
    for c in MANIFEST:
        assert (HERE / c["path"]).is_dir(), c["id"]


@pytest.mark.parametrize("case", [c for c in MANIFEST if c["expect"] == "error"], ids=lambda c: c["id"])
def test_bad_input_raises_a_located_data_error(case: dict[str, Any], _offline: Path) -> None:
    folder = HERE / case["path"]
    before = _snapshot(folder)
    with pytest.raises(DataError) as info:
        prepare_dataset(_config(case))
    err = info.value
    msg = str(err)
    assert "\n" not in msg and msg == err.one_line()
    assert case["file"] in msg, msg
    assert err.file is not None and Path(err.file).name == case["file"], msg
    if case["line"] is not None:
        assert err.line == case["line"], msg
        assert f"{case['file']}:{case['line']}" in msg, msg
    if case["field"] is not None:
        assert err.field is not None and case["field"] in err.field, msg
        assert f"field '{err.field}'" in msg, msg
    assert _snapshot(folder) == before, "the loader wrote into the data folder"
    assert not _offline.exists(), "the loader created a cache"


@pytest.mark.parametrize("case", [c for c in MANIFEST if c["expect"] == "ok"], ids=lambda c: c["id"])
def test_tricky_input_is_accepted_and_recorded(case: dict[str, Any]) -> None:
    ds = prepare_dataset(_config(case))
    for key, want in case["meta"].items():
        value: Any = ds.meta
        for part in key.split("."):
            value = value[part]
        assert value == want, (key, value, want)
    assert all(t.strip() for t in ds.titles[1:])
