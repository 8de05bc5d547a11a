"""Odd paths and damaged run folders: one `error:` line, exit 2, no traceback (and no stub run folder)."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest

from delrec.cli import main
from tiny_run import build_tiny_run


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DELREC_OFFLINE", "1")
    monkeypatch.setenv("DELREC_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_run(tmp_path_factory.mktemp("paths"), adapter=True)


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err
    # transformers may print a weight-loading progress bar first; the error is the one last line
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("Loading weights")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize(("rel", "content"), [
    ("data/items.parquet", b"not parquet"),
    ("data/dataset.json", b"{}"),
    ("distill/soft_prompt/soft_prompt_config.json", b"{broken"),
    ("distill/soft_prompt/soft_prompt.safetensors", pickle.dumps({"payload": 1})),
    ("finetune/adapter/adapter_config.json", b"{broken"),
    ("finetune/adapter/adapter_config.json", b'{"peft_type": "NOPE"}'),
    ("finetune/adapter/adapter_model.safetensors", pickle.dumps([1, 2])),
    ("teachers/sasrec/model/model.safetensors", pickle.dumps([1, 2])),
    ("config.yaml", b"backbone: [1"),
])
def test_damaged_run_folder_is_one_line(rel: str, content: bytes, tiny_run: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / rel).write_bytes(content)
    line = _refused(["recommend", str(run), "--history", "1;2", "--k", "3"], capsys)
    assert str(run) in line, line


def test_a_pickle_is_never_loaded(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    class Boom:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (Path.touch, (str(tmp_path / "pwned"),))

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "teachers" / "sasrec" / "model" / "model.safetensors").write_bytes(pickle.dumps(Boom()))
    _refused(["recommend", str(run), "--history", "1;2", "--k", "3", "--explain"], capsys)
    assert not (tmp_path / "pwned").exists()


def test_recommend_on_a_missing_or_file_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("x", encoding="utf-8")
    for run in (tmp_path / "nope", tmp_path / "file"):
        _refused(["recommend", str(run), "--history", "1"], capsys)


def test_out_below_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("keep", encoding="utf-8")
    _refused(["run", "--out", str(tmp_path / "file" / "run"), "--until", "data"], capsys)
    assert (tmp_path / "file").read_text(encoding="utf-8") == "keep"


def test_long_dataset_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _refused(["run", "--set", "data.name=" + "d" * 300, "--out", str(tmp_path / "run")], capsys)
    assert "field 'data.name'" in line and "bytes" in line, line
    assert not (tmp_path / "run").exists()


def test_missing_data_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _refused(["data", "prepare", "--path", str(tmp_path / "nope"), "--out", str(tmp_path / "run")], capsys)
    assert "field 'data.path'" in line, line
    assert not (tmp_path / "run").exists()


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(_has_cuda(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
def test_cuda_without_cuda_is_refused_before_any_stage(device: str, tmp_path: Path, tiny_run: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    line = _refused(["run", "--set", f"device={device}", "--out", str(out), "--until", "data"], capsys)
    assert "CUDA is not available" in line and "field 'device'" in line, line
    assert not out.exists()
    line = _refused(["recommend", str(tiny_run), "--history", "1", "--device", device], capsys)
    assert "field '--device'" in line, line


def test_bad_device_name(tmp_path: Path, tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "--device" in _refused(["recommend", str(tiny_run), "--history", "1", "--device", "tpu"], capsys)


@pytest.mark.parametrize("damage", ["pickle", "garbage"])
def test_backbone_folder_with_unsafe_or_damaged_weights(damage: str, tmp_path: Path) -> None:
    """A local model folder whose pytorch_model.bin is a pickle payload, or whose safetensors is garbage: refused
    as a ConfigError (one line in the CLI), and the payload never runs."""
    from delrec.errors import ConfigError
    from delrec.llm.backbone import Backbone, BackboneConfig
    from delrec.llm.tiny import tiny_backbone

    class Boom:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (Path.touch, (str(tmp_path / "pwned"),))

    folder = tmp_path / "model"
    bb = tiny_backbone("llama")
    bb.model.save_pretrained(folder)
    bb.tokenizer.save_pretrained(folder)
    if damage == "pickle":
        (folder / "model.safetensors").unlink()
        (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Boom()))
    else:
        (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError) as e:
        Backbone.load(BackboneConfig(name_or_path=str(folder)))
    assert e.value.field == "backbone.name_or_path" and "\n" not in str(e.value)
    assert not (tmp_path / "pwned").exists()
