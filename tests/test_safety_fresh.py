"""`delrec run --fresh` deletes only a run folder delrec made, and `run` writes only into a new/empty folder or its
own run folder: each case plants decoy files that must survive a refused command (one `error:` line, exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from delrec.cli import main


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DELREC_OFFLINE", "1")
    monkeypatch.setenv("DELREC_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A tiny generic dataset (40 users, 36 items): `run --until data` on it takes well under a second."""
    root = tmp_path / "data"
    root.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for u in range(40):
        start = int(rng.integers(36))
        rows += [(f"u{u}", f"i{(start + 2 * t) % 36}", 1000 + t) for t in range(int(rng.integers(6, 11)))]
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(root / "interactions.tsv", sep="\t",
                                                                          index=False)
    pd.DataFrame({"item_id": [f"i{i}" for i in range(36)], "title": [f"Title {i}" for i in range(36)]}).to_csv(
        root / "items.tsv", sep="\t", index=False)
    return root


def _args(data: Path, out: Path | str, *extra: str) -> list[str]:
    return ["run", "--set", "data.name=tiny", "--set", f"data.path={data}", "--set", "data.format=generic",
            "--set", "candidates.size=8", "--out", str(out), "--until", "data", *extra]


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _ok(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0, capsys.readouterr().err


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _decoys(folder: Path) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "thesis.tex").write_text("three years of work\n", encoding="utf-8")
    (folder / "notes").mkdir(exist_ok=True)
    (folder / "notes" / "todo.md").write_text("- finish\n", encoding="utf-8")
    return _snapshot(folder)


def test_fresh_refuses_a_folder_of_user_files(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mine = tmp_path / "mine"
    before = _decoys(mine)
    line = _refused(_args(data, mine, "--fresh"), capsys)
    assert "not a delrec run folder" in line, line
    assert _snapshot(mine) == before


def test_fresh_refuses_the_working_directory(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    _ok(_args(data, run), capsys)  # a genuine run folder: only the "never `.`" rule can save it
    monkeypatch.chdir(run)
    before = _snapshot(run)
    line = _refused(_args(data, ".", "--fresh"), capsys)
    assert "working directory" in line, line
    assert _snapshot(run) == before
    monkeypatch.chdir(tmp_path)  # nor a folder that contains the working directory
    monkeypatch.chdir(run / "data")
    _refused(_args(data, run, "--fresh"), capsys)
    assert _snapshot(run) == before


def test_fresh_refuses_home(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    _ok(_args(data, home), capsys)  # even a home that looks like a run folder
    monkeypatch.setenv("HOME", str(home))
    before = _snapshot(home)
    line = _refused(_args(data, home, "--fresh"), capsys)
    assert "home" in line, line
    assert _snapshot(home) == before


def test_fresh_refuses_the_data_folder_and_its_parents(data: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    before = _snapshot(tmp_path)
    for out in (data, tmp_path):
        (out / "manifest.json").write_text(json.dumps({"stages": {}}), encoding="utf-8")  # a forged run marker
        line = _refused(_args(data, out, "--fresh"), capsys)
        assert "would delete" in line, line
        (out / "manifest.json").unlink()
        assert _snapshot(tmp_path) == before


def test_fresh_refuses_the_folder_of_the_config_file(data: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    _ok(_args(data, run), capsys)
    config = run / "config.yaml"
    before = _snapshot(run)
    line = _refused([*_args(data, run, "--fresh"), "--config", str(config)], capsys)
    assert "would delete" in line and "config.yaml" in line, line
    assert _snapshot(run) == before


def test_typo_in_data_path_is_reported_before_anything_is_deleted(data: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    _ok(_args(data, run), capsys)
    before = _snapshot(run)
    line = _refused(_args(tmp_path / "dta", run, "--fresh"), capsys)
    assert "field 'data.path'" in line and "no such file" in line, line
    assert _snapshot(run) == before


def test_fresh_keeps_a_run_folder_holding_foreign_files(data: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    _ok(_args(data, run), capsys)
    (run / "my_analysis.ipynb").write_text("{}", encoding="utf-8")
    before = _snapshot(run)
    line = _refused(_args(data, run, "--fresh"), capsys)
    assert "my_analysis.ipynb" in line, line
    assert _snapshot(run) == before


def test_fresh_refuses_a_symlink_and_a_file(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    _ok(_args(data, run), capsys)
    link = tmp_path / "link"
    link.symlink_to(run, target_is_directory=True)
    before = _snapshot(run)
    assert "symbolic link" in _refused(_args(data, link, "--fresh"), capsys)
    assert _snapshot(run) == before
    file = tmp_path / "file.txt"
    file.write_text("keep", encoding="utf-8")
    for extra in (["--fresh"], []):
        assert "is a file" in _refused(_args(data, file, *extra), capsys)
    assert file.read_text(encoding="utf-8") == "keep"


def test_fresh_recreates_a_run_folder_it_made(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    _ok(_args(data, run), capsys)
    (run / ".split.json.abc123.tmp").write_text("", encoding="utf-8")  # a leftover of an atomic write is delrec's
    line = _refused([*_args(data, run), "--set", "candidates.size=6"], capsys)  # changed config: --fresh needed
    assert "different configuration" in line, line
    _ok([*_args(data, run, "--fresh"), "--set", "candidates.size=6"], capsys)
    assert json.loads((run / "manifest.json").read_text(encoding="utf-8"))["candidates"]["test"]["size"] == 6
    assert not (run / ".split.json.abc123.tmp").exists()


def test_run_never_writes_into_a_user_folder(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """`--out .` next to a hand-written config.yaml: the config is neither overwritten nor joined by run files."""
    work = tmp_path / "work"
    work.mkdir()
    config = work / "config.yaml"
    config.write_text(f"# my settings\ndata:\n  name: tiny\n  path: {data}\n  format: generic\n"
                      "candidates:\n  size: 8\n", encoding="utf-8")
    before = _snapshot(work)
    monkeypatch.chdir(work)
    for extra in ([], ["--fresh"]):
        line = _refused(["run", "--config", "config.yaml", "--out", ".", "--until", "data", *extra], capsys)
        assert "error: " in line
        assert _snapshot(work) == before
    mine = tmp_path / "mine"
    before = _decoys(mine)
    line = _refused(_args(data, mine), capsys)
    assert "not empty and not a delrec run folder" in line, line
    assert _snapshot(mine) == before
    line = _refused(["data", "prepare", "--dataset", "tiny", "--path", str(data), "--format", "generic",
                     "--out", str(mine)], capsys)
    assert _snapshot(mine) == before


def test_an_empty_folder_is_used_and_left_empty_on_error(data: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "interactions.tsv").write_text("user_id\titem_id\n", encoding="utf-8")  # fails in prepare
    _refused(_args(tmp_path / "broken", empty), capsys)
    assert empty.is_dir() and not any(empty.iterdir())
    _ok(_args(data, empty), capsys)
    assert (empty / "manifest.json").is_file()


def test_corrupt_manifest_is_one_line(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    _ok(_args(data, run), capsys)
    (run / "manifest.json").write_text("{not json", encoding="utf-8")
    before = _snapshot(run)
    _refused(_args(data, run), capsys)
    _refused(_args(data, run, "--fresh"), capsys)
    assert _snapshot(run) == before
