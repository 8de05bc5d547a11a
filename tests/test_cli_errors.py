"""Bad input through the command line: every malformed data folder (tests/bad_inputs/manifest.json) and config file
(tests/bad_inputs/configs/manifest.json) exits with status 2 and one stderr line naming the file, line and field — no
traceback, and no run folder left behind."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from delrec.cli import main

HERE = Path(__file__).parent / "bad_inputs"
DATA_CASES = [c for c in json.loads((HERE / "manifest.json").read_text(encoding="utf-8")) if c["expect"] == "error"]
CONFIG_CASES: list[dict[str, Any]] = json.loads((HERE / "configs" / "manifest.json").read_text(encoding="utf-8"))


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DELREC_OFFLINE", "1")
    monkeypatch.setenv("DELREC_CACHE", str(tmp_path / "cache"))


def _fails_cleanly(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_corpus_has_at_least_thirty_cases() -> None:
    assert len(DATA_CASES) + len(CONFIG_CASES) >= 30
    assert {c["id"] for c in CONFIG_CASES} == {p.stem for p in (HERE / "configs").glob("*.yaml")}


@pytest.mark.parametrize("case", DATA_CASES, ids=lambda c: c["id"])
def test_data_prepare_reports_one_line(case: dict[str, Any], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    argv = ["data", "prepare", "--dataset", case["id"], "--path", str(HERE / case["path"]), "--out", str(out)]
    for key, value in case["config"].items():
        for k, v in (value.items() if isinstance(value, dict) else [(None, value)]):
            argv += ["--set", f"data.{key}.{k}={v}" if k else f"data.{key}={v}"]
    line = _fails_cleanly(argv, capsys)
    want = case["file"] if case["line"] is None else f"{case['file']}:{case['line']}"
    assert want in line, line
    if case["field"] is not None:
        assert "field '" in line and case["field"] in line, line
    assert not out.exists(), "a half-made run folder was left behind"


@pytest.mark.parametrize("case", CONFIG_CASES, ids=lambda c: c["id"])
def test_run_rejects_bad_config_in_one_line(case: dict[str, Any], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    # --until data: should a case ever pass validation, the test stays fast instead of training models.
    line = _fails_cleanly(["run", "-c", str(HERE / "configs" / f"{case['id']}.yaml"), "--out", str(out),
                           "--until", "data"], capsys)
    if case["file"] is not None:
        want = case["file"] if case["line"] is None else f"{case['file']}:{case['line']}"
        assert want in line, line
    if case["field"] is not None:
        assert f"field '{case['field']}'" in line, line
    assert not out.exists(), "a half-made run folder was left behind"


@pytest.mark.parametrize("override,field", [("finetune.max_steps=many", "finetune.max_steps"),
                                            ("distill.lr", "--set"), ("seed.value=1", "seed"),
                                            # YAML 1.2 booleans: "yes" is text, which a boolean field refuses
                                            ("finetune.sliding_window=yes", "finetune.sliding_window")])
def test_bad_override_is_one_line(override: str, field: str, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    line = _fails_cleanly(["run", "--set", override, "--out", str(tmp_path / "run"), "--until", "data"], capsys)
    assert field in line, line
    assert not (tmp_path / "run").exists()
