"""The learnable soft prompt: ``P`` vectors spliced into the hard prompt after
"The recommendation pattern of the {teacher} model is:" (stage 1 trains them; stage 2 keeps them frozen).

With ``deep=True`` (deep prompt tuning, P-Tuning v2 — Liu et al. 2022) the soft positions also get learned vectors
at the input of every transformer block, not only at the embeddings: an input-only prompt of 20 tokens does not move
a 135M-parameter LM (benchmarks/results/stage1_log.md; Lester et al. 2021: prompt tuning needs billions of
parameters to match fine-tuning). On SmolLM2 the deep prompt learns both stage-1 tasks where the input prompt does
not, though the ranking has not followed (stage1_log S10).

Saved like a peft adapter: ``soft_prompt.safetensors`` (one tensor, ``weight``: [P, d], or [L, P, d] when deep, row
0 the embeddings and row l the input of block l) + ``soft_prompt_config.json``.
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
from delrec.llm.backbone import block_input

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
    deep: bool = field(default=False, metadata={
        "help": "also learn the soft positions' input to every transformer block (deep prompt tuning), not only "
                "their embeddings (the paper's); ~L x the parameters, for backbones too small for an input prompt"})

    def validate(self) -> SoftPromptConfig:
        # 0 is legal in a run config: it disables the soft prompt (the "no distillation" ablation).
        if not isinstance(self.num_tokens, int) or isinstance(self.num_tokens, bool) or self.num_tokens < 0:
            raise ConfigError(f"must be an integer >= 0, got {self.num_tokens!r}", field="soft_prompt.num_tokens")
        if self.init not in ("random", "vocab"):
            raise ConfigError(f"must be random or vocab, got {self.init!r}", field="soft_prompt.init")
        if self.random_scale not in ("embedding", "unit"):
            raise ConfigError(f"must be embedding or unit, got {self.random_scale!r}",
                              field="soft_prompt.random_scale")
        if not isinstance(self.deep, bool):
            raise ConfigError(f"must be true or false, got {self.deep!r}", field="soft_prompt.deep")
        if not self.teacher or not isinstance(self.teacher, str):
            raise ConfigError("must be a non-empty name", field="soft_prompt.teacher")
        return self


class SoftPrompt(nn.Module):
    """``weight`` [P, d] (or [L, P, d] when deep); ``forward()`` returns the [P, d] the scorer splices into the input
    embeddings, ``layer(l)`` the [P, d] a deep prompt sets at the input of block l.

    Why the default init differs from the paper's N(0, 1): the paper's backbone (Flan-T5-XL) has large token
    embeddings, while SmolLM2's have std ≈ 0.14 (row norm ≈ 3.2 vs ≈ 24 for N(0, 1) at d=576), so unit-variance
    soft tokens would be ~7x larger than any real token. ``random_scale="unit"`` restores the paper's init.
    """

    def __init__(self, config: SoftPromptConfig, hidden_size: int, weight: torch.Tensor | None = None,
                 num_layers: int = 1, scale: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = config.validate()
        if config.num_tokens < 1:
            raise ConfigError("a soft prompt needs at least one token (0 means: run without one)",
                              field="soft_prompt.num_tokens")
        shape = (num_layers, config.num_tokens, hidden_size) if config.deep else (config.num_tokens, hidden_size)
        if weight is None:
            g = torch.Generator().manual_seed(config.seed)
            weight = torch.randn(*shape, generator=g)
        if tuple(weight.shape) != shape:
            raise ValueError(f"soft prompt weight must be {list(shape)}, got {list(weight.shape)}")
        # Deep: block l's vectors are trained in units of `scale[l]` (the spread of what that block receives relative
        # to the embeddings', which grows ~100x through SmolLM2's 30 blocks), so one learning rate moves every block
        # by the same relative amount; `layer(l)` and the saved file hold the actual vectors.
        n = int(weight.shape[0]) if config.deep else 1
        scale = torch.ones(n) if scale is None else scale.detach().float().reshape(-1)
        if scale.numel() != n or not bool((scale > 0).all()):
            raise ValueError(f"soft prompt scale must be {n} positive numbers, got {scale.tolist()}")
        self.register_buffer("scale", scale.clone())
        self.weight = nn.Parameter(weight.detach().float() / (scale[:, None, None] if config.deep else 1.0))

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
            scale = None
            if config.deep:  # start as the input-only prompt would run: each block's input at those positions
                w = _block_inputs(backbone, w, f"The recommendation pattern of the {config.teacher} model is:")
                scale = w.std(dim=(1, 2)) / w[0].std()
        n_layers = int(w.shape[0]) if config.deep else 1
        return cls(config, backbone.hidden_size, w, num_layers=n_layers, scale=scale).to(backbone.device)

    @property
    def num_tokens(self) -> int:
        return int(self.weight.shape[-2])

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[-1])

    @property
    def deep(self) -> bool:
        return self.weight.ndim == 3

    @property
    def num_layers(self) -> int:
        """Blocks whose input the prompt sets (1: the embeddings only)."""
        return int(self.weight.shape[0]) if self.deep else 1

    def forward(self) -> torch.Tensor:
        return self.layer(0)  # [P, d] spliced into the input embeddings

    def layer(self, index: int) -> torch.Tensor:
        """[P, d]: the input of block ``index`` at the soft positions (0: the embeddings)."""
        if not 0 <= index < self.num_layers:
            raise IndexError(f"block {index} of a {self.num_layers}-layer soft prompt")
        return self.weight[index] * self.scale[index] if self.deep else self.weight

    def vectors(self) -> torch.Tensor:
        """The actual vectors: [P, d], or [L, P, d] when deep (what `save_pretrained` writes as ``weight``)."""
        return self.weight * self.scale[:, None, None] if self.deep else self.weight

    def freeze(self) -> SoftPrompt:
        self.weight.requires_grad_(False)
        return self

    def save_pretrained(self, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write ``soft_prompt.safetensors`` + ``soft_prompt_config.json`` atomically into ``directory``."""
        directory = Path(directory)
        with atomic_dir(directory) as tmp:
            tensors = {"weight": self.vectors().detach().float().cpu().contiguous()}
            if self.deep:
                tensors["scale"] = self.scale.detach().float().cpu().contiguous()
            save_file(tensors, str(tmp / WEIGHTS_NAME))
            meta = {**asdict(self.config), "hidden_size": self.hidden_size, "num_layers": self.num_layers,
                    **(extra or {})}
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
        if w.ndim != (3 if config.deep else 2) or w.shape[-2] != config.num_tokens:
            raise DataError(f"weight shape {tuple(w.shape)} does not match num_tokens={config.num_tokens}"
                            f"{' (deep)' if config.deep else ''}", file=w_file, field="weight")
        scale = tensors.get("scale") if config.deep else None
        if scale is not None and (scale.ndim != 1 or scale.shape[0] != w.shape[0] or not bool((scale > 0).all())):
            raise DataError(f"scale must be {w.shape[0]} positive numbers", file=w_file, field="scale")
        return cls(config, int(w.shape[-1]), w, num_layers=int(w.shape[0]) if config.deep else 1,
                   scale=scale).to(device)


@torch.no_grad()
def _block_inputs(backbone: Backbone, soft: torch.Tensor, text: str) -> torch.Tensor:
    """[P, d] input embeddings placed after ``text`` → [L, P, d]: what each transformer block receives at those
    positions in one frozen forward pass (row 0: the embeddings themselves)."""
    blocks = backbone.blocks()
    dev = backbone.device
    ids = torch.tensor([backbone.tokenizer(text, add_special_tokens=False)["input_ids"]], device=dev)
    emb = torch.cat([backbone.embed(ids), soft.to(dev, backbone.dtype)[None]], dim=1)
    seen: list[torch.Tensor] = []

    def grab(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append(block_input(args, kwargs)[0, ids.shape[1]:].float().cpu())

    handles = [b.register_forward_pre_hook(grab, with_kwargs=True) for b in blocks]
    try:
        am = torch.ones(emb.shape[:2], dtype=torch.long, device=dev)
        if backbone.kind == "seq2seq":
            backbone.base.get_encoder()(inputs_embeds=emb, attention_mask=am)
        else:
            backbone.base.base_model(inputs_embeds=emb, attention_mask=am, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if len(seen) != len(blocks):
        raise RuntimeError(f"{len(seen)} of {len(blocks)} blocks ran")
    seen[0] = soft.float().cpu()  # exactly the input prompt (no dtype round trip)
    return torch.stack(seen)
