"""The learnable soft prompt: ``P`` vectors spliced into the hard prompt after
"The recommendation pattern of the {teacher} model is:" (stage 1 trains them; stage 2 keeps them frozen).

Saved like a peft adapter: ``soft_prompt.safetensors`` (one tensor, ``weight`` [P, d]) + ``soft_prompt_config.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from delrec.errors import ConfigError, DataError
from delrec.io import atomic_dir

if TYPE_CHECKING:
    from delrec.llm.backbone import Backbone

WEIGHTS_NAME = "soft_prompt.safetensors"
CONFIG_NAME = "soft_prompt_config.json"


@dataclass
class SoftPromptConfig:
    num_tokens: int = field(default=100, metadata={"help": "number of soft tokens P (paper: 100)"})
    init: str = field(default="random", metadata={
        "help": "random (Gaussian, the paper's) | vocab (copies of randomly chosen token embeddings)"})
    teacher: str = field(default="SASRec", metadata={"help": "teacher name printed in the prompt"})
    random_scale: str = field(default="embedding", metadata={
        "help": "embedding: N(0, s²) with s the std of the backbone's token embeddings (default) | "
                "unit: N(0, 1), exactly the paper's nn.Embedding init"})
    seed: int = field(default=0, metadata={"help": "seed of the initialisation"})

    def validate(self) -> SoftPromptConfig:
        # 0 is legal in a run config: it disables the soft prompt (the "no distillation" ablation).
        if not isinstance(self.num_tokens, int) or isinstance(self.num_tokens, bool) or self.num_tokens < 0:
            raise ConfigError(f"must be an integer >= 0, got {self.num_tokens!r}", field="soft_prompt.num_tokens")
        if self.init not in ("random", "vocab"):
            raise ConfigError(f"must be random or vocab, got {self.init!r}", field="soft_prompt.init")
        if self.random_scale not in ("embedding", "unit"):
            raise ConfigError(f"must be embedding or unit, got {self.random_scale!r}",
                              field="soft_prompt.random_scale")
        if not self.teacher or not isinstance(self.teacher, str):
            raise ConfigError("must be a non-empty name", field="soft_prompt.teacher")
        return self


class SoftPrompt(nn.Module):
    """``weight`` [P, d]; ``forward()`` returns it (the scorer splices it into the input embeddings).

    Why the default init differs from the paper's N(0, 1): the paper's backbone (Flan-T5-XL) has large token
    embeddings, while SmolLM2's have std ≈ 0.14 (row norm ≈ 3.2 vs ≈ 24 for N(0, 1) at d=576), so unit-variance
    soft tokens would be ~7x larger than any real token. ``random_scale="unit"`` restores the paper's init.
    """

    def __init__(self, config: SoftPromptConfig, hidden_size: int, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = config.validate()
        if config.num_tokens < 1:
            raise ConfigError("a soft prompt needs at least one token (0 means: run without one)",
                              field="soft_prompt.num_tokens")
        if weight is None:
            g = torch.Generator().manual_seed(config.seed)
            weight = torch.randn(config.num_tokens, hidden_size, generator=g)
        if tuple(weight.shape) != (config.num_tokens, hidden_size):
            raise ValueError(f"soft prompt weight must be [{config.num_tokens}, {hidden_size}], got "
                             f"{tuple(weight.shape)}")
        self.weight = nn.Parameter(weight.detach().clone().float())

    @classmethod
    def init_for(cls, backbone: Backbone, config: SoftPromptConfig) -> SoftPrompt:
        """A new soft prompt sized and initialised for ``backbone`` (see the class doc for the scale)."""
        config.validate()
        emb = backbone.base.get_input_embeddings()
        g = torch.Generator().manual_seed(config.seed)
        with torch.no_grad():
            if config.init == "vocab":
                ids = torch.randint(0, emb.weight.shape[0], (config.num_tokens,), generator=g)
                w = backbone.embed(ids.to(backbone.device)).float().cpu()
            else:
                w = torch.randn(config.num_tokens, backbone.hidden_size, generator=g)
                if config.random_scale == "embedding":
                    # std of what the model actually receives (includes e.g. Gemma's √d scale)
                    sample = torch.randint(0, emb.weight.shape[0], (min(4096, emb.weight.shape[0]),), generator=g)
                    w = w * backbone.embed(sample.to(backbone.device)).float().std().cpu()
        return cls(config, backbone.hidden_size, w).to(backbone.device)

    @property
    def num_tokens(self) -> int:
        return int(self.weight.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    def forward(self) -> torch.Tensor:
        return self.weight  # [P, d]

    def freeze(self) -> SoftPrompt:
        self.weight.requires_grad_(False)
        return self

    def save_pretrained(self, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write ``soft_prompt.safetensors`` + ``soft_prompt_config.json`` atomically into ``directory``."""
        directory = Path(directory)
        with atomic_dir(directory) as tmp:
            save_file({"weight": self.weight.detach().float().cpu().contiguous()}, str(tmp / WEIGHTS_NAME))
            meta = {**asdict(self.config), "hidden_size": self.hidden_size, **(extra or {})}
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> SoftPrompt:
        directory = Path(directory)
        cfg_file, w_file = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not cfg_file.is_file() or not w_file.is_file():
            raise DataError(f"not a soft prompt folder (needs {WEIGHTS_NAME} and {CONFIG_NAME})", file=directory)
        try:
            meta = json.loads(cfg_file.read_text(encoding="utf-8"))
        except ValueError as e:
            raise DataError(f"invalid JSON: {e}", file=cfg_file) from e
        known = {f.name for f in fields(SoftPromptConfig)}
        config = SoftPromptConfig(**{k: v for k, v in meta.items() if k in known})
        tensors = load_file(str(w_file))
        if "weight" not in tensors:
            raise DataError("missing tensor 'weight'", file=w_file, field="weight")
        w = tensors["weight"]
        if w.ndim != 2 or w.shape[0] != config.num_tokens:
            raise DataError(f"weight shape {tuple(w.shape)} does not match num_tokens={config.num_tokens}",
                            file=w_file, field="weight")
        return cls(config, int(w.shape[1]), w).to(device)
