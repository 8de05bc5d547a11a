"""SoftPrompt: init, save/load round trip, freezing, config validation."""

from __future__ import annotations

import json

import pytest
import torch

from delrec.errors import ConfigError, DataError
from delrec.llm import SoftPrompt, SoftPromptConfig
from delrec.llm.tiny import tiny_backbone


def test_round_trip(tmp_path):
    bb = tiny_backbone("llama")
    sp = SoftPrompt.init_for(bb, SoftPromptConfig(num_tokens=7, teacher="GRU4Rec", seed=3))
    assert sp().shape == (7, bb.hidden_size) and sp.weight.requires_grad
    sp.save_pretrained(tmp_path / "sp", extra={"step": 5})
    assert sorted(p.name for p in (tmp_path / "sp").iterdir()) == ["soft_prompt.safetensors",
                                                                   "soft_prompt_config.json"]
    meta = json.loads((tmp_path / "sp" / "soft_prompt_config.json").read_text())
    assert meta["teacher"] == "GRU4Rec" and meta["hidden_size"] == bb.hidden_size and meta["step"] == 5
    back = SoftPrompt.from_pretrained(tmp_path / "sp")
    assert torch.equal(back.weight, sp.weight) and back.config == sp.config


def test_init_scales_and_seed():
    bb = tiny_backbone("llama")
    emb_std = float(bb.embed(torch.arange(50)).std())
    scaled = SoftPrompt.init_for(bb, SoftPromptConfig(num_tokens=200)).weight.detach()
    unit = SoftPrompt.init_for(bb, SoftPromptConfig(num_tokens=200, random_scale="unit")).weight.detach()
    assert abs(float(unit.std()) - 1.0) < 0.05
    assert abs(float(scaled.std()) / emb_std - 1.0) < 0.3
    vocab = SoftPrompt.init_for(bb, SoftPromptConfig(num_tokens=4, init="vocab")).weight
    table = bb.base.get_input_embeddings().weight
    assert all(bool((table == row).all(dim=1).any()) for row in vocab)  # rows are token embeddings
    a = SoftPrompt.init_for(bb, SoftPromptConfig(num_tokens=3, seed=1)).weight
    b = SoftPrompt.init_for(bb, SoftPromptConfig(num_tokens=3, seed=1)).weight
    assert torch.equal(a, b)


def test_freeze_and_errors(tmp_path):
    sp = SoftPrompt(SoftPromptConfig(num_tokens=2), 4).freeze()
    assert not sp.weight.requires_grad
    SoftPromptConfig(num_tokens=0).validate()  # legal in a config: "no soft prompt"
    with pytest.raises(ConfigError) as e:
        SoftPromptConfig(num_tokens=-1).validate()
    assert e.value.field == "soft_prompt.num_tokens"
    with pytest.raises(ConfigError) as e:
        SoftPrompt(SoftPromptConfig(num_tokens=0), 4)
    assert e.value.field == "soft_prompt.num_tokens"
    with pytest.raises(ConfigError):
        SoftPromptConfig(init="zeros").validate()
    with pytest.raises(DataError):
        SoftPrompt.from_pretrained(tmp_path / "missing")
