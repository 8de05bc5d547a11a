"""Mistakes that used to surface only after the teachers trained are caught before stage 1: too few users for the
split, a backbone name that cannot resolve."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from delrec.cli import main


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DELREC_OFFLINE", "1")
    monkeypatch.setenv("DELREC_CACHE", str(tmp_path / "cache"))


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def _data(root: Path, users: int, length: int) -> Path:
    data = root / "data"
    data.mkdir()
    rows = [(f"u{u}", f"i{(u + t) % 10}", 1000 + t) for u in range(users) for t in range(length)]
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(data / "interactions.tsv", sep="\t",
                                                                          index=False)
    pd.DataFrame({"item_id": [f"i{i}" for i in range(10)], "title": [f"T {i}" for i in range(10)]}).to_csv(
        data / "items.tsv", sep="\t", index=False)
    return data


def test_three_users_fail_before_the_teachers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _data(tmp_path, users=3, length=8)
    out = tmp_path / "run"
    # no --until: were the check missing, the teachers would start training here
    line = _refused(["run", "--set", "data.name=t3", "--set", f"data.path={data}", "--set", "data.format=generic",
                     "--set", "candidates.size=4", "--out", str(out)], capsys)
    assert "field 'split'" in line and "3 users" in line and "valid" in line, line
    assert not out.exists()


def test_short_sequences_fail_before_the_teachers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _data(tmp_path, users=40, length=4)
    out = tmp_path / "run"
    line = _refused(["run", "--set", "data.name=short", "--set", f"data.path={data}", "--set", "data.format=generic",
                     "--set", "candidates.size=4", "--set", "data.preprocess.min_seq_len=2", "--out", str(out)], capsys)
    assert "field 'data.preprocess.min_seq_len'" in line, line
    assert not out.exists()


@pytest.mark.parametrize("name", ["a/b/c", "not a model", "/"])
def test_backbone_that_cannot_resolve(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    line = _refused(["run", "--set", f"backbone.name_or_path={name}", "--out", str(out)], capsys)
    assert "field 'backbone.name_or_path'" in line, line
    assert not out.exists()


def test_backbone_folder_without_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "model").mkdir()
    line = _refused(["run", "--set", f"backbone.name_or_path={tmp_path / 'model'}", "--out", str(tmp_path / "r")],
                    capsys)
    assert "config.json" in line, line


def test_plausible_backbone_names_pass_the_check() -> None:
    from delrec.cli import _check_backbone

    for name in ("smollm2-135m", "google/flan-t5-xl", "HuggingFaceTB/SmolLM2-135M"):
        _check_backbone(name)
