"""User mistakes the CLI must answer in one `error:` line with exit 2 — never a traceback, never a run folder: its
own argument errors (typer's vendored click), out-of-range seeds, alias bombs and odd config paths."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from delrec.cli import main
from delrec.errors import MAX_LINE, DelrecError


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
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("argv,names", [
    (["run", "--bogus"], "--bogus"),
    (["recommend"], "run_dir"),
    (["recommend", "X", "--k", "abc"], "--k"),
    (["frobnicate"], "frobnicate"),
    (["recommend", "X", "--seed", "-1"], "--seed"),
    (["recommend", "X", "--k", "0"], "--k"),
    (["serve", "X", "--port", "0"], "--port"),
    (["serve", "X", "--port", "70000"], "--port"),
    (["serve", "X", "--max-history", "0"], "--max-history"),
    (["serve", "X", "--max-candidates", "0"], "--max-candidates"),
])
def test_argument_errors_are_one_line(argv: list[str], names: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert names in _refused(argv, capsys)


def test_argument_error_through_the_installed_entry_point(tmp_path: Path) -> None:
    """The real process: typer raises its own click's exceptions, which `click.ClickException` does not catch."""
    env = {**os.environ, "DELREC_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "delrec", "run", "--bogus"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "--bogus" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())


def test_no_arguments_prints_help_without_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([])
    out = capsys.readouterr()
    assert "Traceback" not in out.err and "Usage" in out.out + out.err


@pytest.mark.parametrize("override", ["split.seed=-1", "candidates.seed=-5", "teachers.sasrec.seed=-3", "seed=-1",
                                      "seed=4294967296", "teachers.gru4rec.seed=-1"])
def test_out_of_range_seed_is_refused_before_the_run_folder(override: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    line = _refused(["run", "--set", override, "--out", str(out), "--until", "data"], capsys)
    assert f"field '{override.split('=')[0]}'" in line and "seed" in line, line
    assert not out.exists()


def test_seed_bounds_are_inclusive(tmp_path: Path) -> None:
    from delrec.pipeline import load_config

    assert load_config(None, ["split.seed=0", "candidates.seed=4294967295"]).candidates.seed == 2**32 - 1


def _bomb(levels: int = 9) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("name,text,why", [
    ("bomb.yaml", _bomb(), "expands"),
    ("aliases.yaml", "a: &a 1\nb: [" + ", ".join(["*a"] * 500) + "]\n", "aliases"),
    ("huge.yaml", "# " + "x" * (1 << 20) + "\n", "MB"),
])
def test_unbounded_yaml_is_refused_quickly(name: str, text: str, why: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    import time

    config = tmp_path / name
    config.write_text(text, encoding="utf-8")
    t0 = time.perf_counter()
    line = _refused(["run", "-c", str(config), "--out", str(tmp_path / "run"), "--until", "data"], capsys)
    assert time.perf_counter() - t0 < 5
    assert why in line and name in line, line
    assert not (tmp_path / "run").exists()


def test_bomb_in_an_override_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    value = "[" + ", ".join(["*a"] * 200) + "]"
    _refused(["run", "--set", f"teachers.models={value}", "--out", str(tmp_path / "run")], capsys)


def test_a_few_aliases_still_work(tmp_path: Path) -> None:
    from delrec.pipeline import load_config

    config = tmp_path / "c.yaml"
    config.write_text("teachers:\n  sasrec: &t {epochs: 3}\n  gru4rec: *t\n", encoding="utf-8")
    cfg = load_config(config)
    assert cfg.teachers.sasrec.epochs == cfg.teachers.gru4rec.epochs == 3


def test_odd_config_paths_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loop = tmp_path / "loop.yaml"
    loop.symlink_to(tmp_path / "loop2.yaml")
    (tmp_path / "loop2.yaml").symlink_to(loop)
    long_name = tmp_path / ("n" * 300 + ".yaml")
    for config, why in ((tmp_path, "folder"), (loop, "symbolic links"), (long_name, "")):
        line = _refused(["run", "-c", str(config), "--out", str(tmp_path / "run")], capsys)
        assert why in line, line
        assert len(line) <= len("error: ") + MAX_LINE
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("seed: 1\n", encoding="utf-8")
    config.chmod(0)
    assert "c.yaml" in _refused(["run", "-c", str(config), "--out", str(tmp_path / "run")], capsys)


def test_error_lines_are_clipped() -> None:
    line = DelrecError("x" * 10_000, file="/" + "d" * 500, line=3, field="data.name").one_line()
    assert len(line) <= MAX_LINE and line.endswith("…") and ":3: field 'data.name'" in line


def test_exponent_floats_without_a_dot_are_numbers(tmp_path: Path) -> None:
    """PyYAML (YAML 1.1) would read 1e-4 as a string and the lr check would refuse it."""
    from delrec.pipeline import load_config

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("finetune: {lr: 2e-4}\n", encoding="utf-8")
    assert load_config(cfg_file).finetune.lr == 2e-4
    assert load_config(overrides=["finetune.lr=3e-3", "distill.lr=1E-2"]).finetune.lr == 3e-3
    assert load_config(overrides=["distill.lr=1E-2"]).distill.lr == 1e-2
    assert load_config(overrides=["seed=7"]).seed == 7  # ints stay ints
