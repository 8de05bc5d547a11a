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


def _phrase_prompt() -> list[str]:
    from delrec.llm.prompts import SOFT_PROMPT_SLOT

    return [f"The recommendation pattern of the SASRec model is:{SOFT_PROMPT_SLOT} Next:"]


def test_deep_prompt_starts_as_the_input_prompt_and_steers_every_block(tmp_path):
    from delrec.llm.prompts import SOFT_PROMPT_SLOT
    from delrec.llm.scoring import TitleScorer

    bb = tiny_backbone("llama")
    shallow = SoftPrompt.init_for(bb, SoftPromptConfig(num_tokens=3, seed=2))
    deep = SoftPrompt.init_for(bb, SoftPromptConfig(num_tokens=3, seed=2, deep=True))
    n_blocks = len(bb.blocks())
    assert deep.deep and deep.num_layers == n_blocks and deep.weight.shape == (n_blocks, 3, bb.hidden_size)
    assert torch.equal(deep(), shallow.weight) and torch.equal(deep.layer(0), deep())
    assert not torch.equal(deep.layer(1), deep.layer(0))  # block 1's input is the hidden state, not the embedding
    prompts, cands = _phrase_prompt(), [["Toy Story", "Heat", "Up"]]
    bare = [prompts[0].replace(SOFT_PROMPT_SLOT, "")]
    no_sp = TitleScorer(bb, None).score(bare, cands).detach()
    # Initialised from the hidden states the input prompt produces after the same words: identical scores.
    torch.testing.assert_close(TitleScorer(bb, deep).score(prompts, cands),
                               TitleScorer(bb, shallow).score(prompts, cands))
    # Block 1's vectors alone change the scores (the hooks fire), and the gradient reaches every block's vectors.
    moved = SoftPrompt(deep.config, bb.hidden_size, deep.vectors().detach(), num_layers=n_blocks, scale=deep.scale)
    torch.testing.assert_close(moved.weight, deep.weight)  # trained in units of each block's spread
    assert float(deep.scale[0]) == 1.0 and bool((deep.scale > 0).all())
    with torch.no_grad():
        moved.weight[1] += torch.randn_like(moved.weight[1])
    assert not torch.allclose(TitleScorer(bb, moved).score(prompts, cands),
                              TitleScorer(bb, deep).score(prompts, cands))
    TitleScorer(bb, deep).score(prompts, cands).sum().backward()
    assert all(float(deep.weight.grad[i].abs().sum()) > 0 for i in range(n_blocks))
    assert torch.equal(TitleScorer(bb, None).score(bare, cands).detach(), no_sp)  # no hook outlives a call
    # save/load round trip keeps the layers; a flat weight under a deep config is refused
    deep.save_pretrained(tmp_path / "deep")
    back = SoftPrompt.from_pretrained(tmp_path / "deep")
    assert back.deep and back.config.deep and torch.equal(back.scale, deep.scale)
    torch.testing.assert_close(back.vectors(), deep.vectors())
    torch.testing.assert_close(back.weight, deep.weight)
    shallow.save_pretrained(tmp_path / "flat")
    cfg_file = tmp_path / "flat" / "soft_prompt_config.json"
    cfg_file.write_text(cfg_file.read_text().replace('"deep": false', '"deep": true'))
    with pytest.raises(DataError, match="deep"):
        SoftPrompt.from_pretrained(tmp_path / "flat")
    # a deep prompt made for another depth is refused by the scorer
    with pytest.raises(ValueError, match="blocks"):
        TitleScorer(bb, SoftPrompt(deep.config, bb.hidden_size, num_layers=n_blocks + 1))
    with pytest.raises(ConfigError) as e:
        SoftPromptConfig(deep="yes").validate()  # type: ignore[arg-type]
    assert e.value.field == "soft_prompt.deep"


def test_deep_prompt_on_a_seq2seq_encoder_and_in_generation():
    from delrec.llm.generate import generate_titles
    from delrec.llm.scoring import TitleScorer

    for arch in ("t5", "llama"):
        bb = tiny_backbone(arch)
        deep = SoftPrompt.init_for(bb, SoftPromptConfig(num_tokens=2, deep=True))
        moved = SoftPrompt(deep.config, bb.hidden_size, deep.vectors().detach() + torch.randn_like(deep.weight),
                           num_layers=deep.num_layers)
        prompts, cands = _phrase_prompt(), [["Toy Story", "Heat", "Up"]]
        a, b = TitleScorer(bb, deep), TitleScorer(bb, moved)
        assert not torch.allclose(a.score(prompts, cands), b.score(prompts, cands)), arch
        out = generate_titles(a, prompts, cands)  # the prompt pass runs under the hooks, later steps on its cache
        assert len(out) == 1 and out[0].valid, arch
