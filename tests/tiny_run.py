"""A tiny complete run folder for the recommend/serve tests and the serve benchmark.

A random 2-layer llama with the byte-level tokenizer of `delrec.llm.tiny` (trained on the prompt wording and the item
titles) saved with ``save_pretrained`` and referenced by path in config.yaml, the tiny dataset, a random soft prompt
and a random tiny SASRec teacher: everything `DELRec.from_pretrained` loads, built in about a second, offline.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from delrec.data import SeqDataset
from tiny_models import tiny_dataset


def build_tiny_run(root: Path, *, teacher: bool = True, soft_prompt: bool = True, adapter: bool = False,
                   history_len: int = 8, n_users: int = 24, n_items: int = 40) -> Path:
    """Write ``root/backbone`` and the run folder ``root/run``; returns the run folder."""
    from delrec.llm.tiny import tiny_backbone

    root = Path(root)
    ds = tiny_dataset(n_users=n_users, n_items=n_items)
    backbone_dir = root / "backbone"
    bb = tiny_backbone("llama", seed=0, extra_text=ds.titles[1:])
    bb.model.save_pretrained(backbone_dir)
    bb.tokenizer.save_pretrained(backbone_dir)

    run = root / "run"
    run.mkdir(parents=True, exist_ok=True)
    ds.save(run / "data")
    config = {  # the parts of a resolved pipeline config.yaml that recommendation reads
        "backbone": {"name_or_path": str(backbone_dir), "kind": "auto", "dtype": "float32", "device": "cpu"},
        "data": {"domain": "movie"},
        "candidates": {"size": 20},
        "teachers": {"distill_from": "sasrec"},
        "soft_prompt": {"num_tokens": 4, "teacher": "SASRec"},
        "finetune": {"history_len": history_len},
        "scoring": {"year": "keep", "eos": "always", "reduce": "mean"},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    if soft_prompt:
        _save_soft_prompt(run / "distill" / "soft_prompt", bb.hidden_size)
    if teacher:
        _save_teacher(run / "teachers" / "sasrec" / "model", ds)
    if adapter:
        _save_adapter(run / "finetune" / "adapter", bb.model)
    return run


def _save_adapter(path: Path, model: torch.nn.Module) -> None:
    """A LoRA adapter with non-zero B (so it changes the scores), saved the peft way like stage 2's."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(path)
    peft_model.unload()  # leave the base model as it was


def _save_soft_prompt(path: Path, hidden_size: int) -> None:
    from delrec.llm.soft_prompt import SoftPrompt, SoftPromptConfig

    SoftPrompt(SoftPromptConfig(num_tokens=4, teacher="SASRec", seed=1), hidden_size).save_pretrained(path)


def _save_teacher(path: Path, ds: SeqDataset) -> None:
    from delrec.teachers import TeacherConfig, build_teacher

    torch.manual_seed(2)
    cfg = TeacherConfig(model="sasrec", hidden=16, layers=1, heads=1, max_len=20, device="cpu")
    build_teacher(cfg, ds.n_items).eval().save_pretrained(path)
