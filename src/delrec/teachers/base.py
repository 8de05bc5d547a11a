"""Shared parts of the teacher models: the config, the `SeqRecommender` contract, save/load and the registry.

Every teacher maps a left-padded item sequence ``[B, L]`` (0 = padding, the most recent item in the last column) to a
sequence representation ``[B, d]``; item scores are its dot products with the item embedding table (tied input and
output embeddings, as in SASRec and RecBole), so ``logits`` is the same for all models.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from delrec.errors import ConfigError, DataError
from delrec.io import atomic_dir

MODELS = ("sasrec", "gru4rec", "caser")

# Per-model defaults. Kept from the DELRec teachers (method spec §5): the dropout rates (SASRec 0.5, GRU4Rec 0.3,
# Caser 0.4), Adam with lr 1e-3, Caser's 16 horizontal filters of heights 2/3/4. Changed, and why:
# - hidden 64 for all (paper: 100 for SASRec and Caser): RecBole's default, so the RecBole comparison runs one size.
# - SASRec 2 blocks x 2 heads (paper: 1 x 1) and GRU4Rec 1 layer with Adam (paper: 3 layers, Adagrad lr 0.01): the
#   settings of the SASRec paper and of RecBole; one optimizer for all teachers.
# - batch 256 (paper: 128, GRU4Rec 50): on CPU an epoch's cost is mostly per-step overhead.
# - SASRec attention-weight dropout 0 (RecBole: 0.5): keeps SDPA on its fused kernel; hidden dropout 0.5 remains.
_COMMON: dict[str, Any] = {"hidden": 64, "lr": 1e-3, "batch_size": 256, "attn_dropout": 0.0, "layers": 1, "heads": 1}
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "sasrec": {**_COMMON, "layers": 2, "heads": 2, "dropout": 0.5},
    "gru4rec": {**_COMMON, "dropout": 0.3},
    "caser": {**_COMMON, "dropout": 0.4},
}


@dataclass
class TeacherConfig:
    """Settings of one teacher model and its training. ``None`` means "this model's default" (`MODEL_DEFAULTS`)."""

    model: str = field(default="sasrec", metadata={"help": "sasrec | gru4rec | caser"})
    hidden: int | None = field(default=None, metadata={"help": "embedding / hidden size d"})
    layers: int | None = field(default=None, metadata={"help": "SASRec blocks or GRU layers (unused by Caser)"})
    heads: int | None = field(default=None, metadata={"help": "SASRec attention heads; must divide hidden"})
    dropout: float | None = field(default=None, metadata={"help": "dropout probability"})
    attn_dropout: float | None = field(default=None, metadata={"help": "SASRec dropout on attention weights"})
    # The paper's SASRec reads only the last 5 items (state_size=5). ML-100K users have ~90 interactions and Beauty
    # users ~9; 50 (the SASRec paper's and RecBole's length) lets every model use most of that history.
    max_len: int = field(default=50, metadata={"help": "how many most recent items the model reads"})
    loss: str = field(default="ce", metadata={"help": "ce: softmax over all items | bce: sampled, 1 negative"})
    lr: float | None = field(default=None, metadata={"help": "Adam learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "Adam weight decay (L2)"})
    batch_size: int | None = field(default=None, metadata={"help": "training examples per step"})
    epochs: int = field(default=200, metadata={"help": "maximum epochs (early stopping usually ends sooner)"})
    patience: int = field(default=5, metadata={"help": "stop after this many epochs without a better valid NDCG@10"})
    seed: int = field(default=42, metadata={"help": "seeds initialisation, shuffling, dropout and negatives"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    caser_heights: tuple[int, ...] = field(default=(2, 3, 4), metadata={"help": "Caser horizontal filter heights"})
    caser_filters: int = field(default=16, metadata={"help": "Caser horizontal filters per height"})
    caser_vfilters: int = field(default=4, metadata={"help": "Caser vertical filters"})

    def resolved(self) -> TeacherConfig:
        """A copy with every ``None`` replaced by the model's default (validated)."""
        self.validate()
        defaults = MODEL_DEFAULTS[self.model]
        out = dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})
        out.validate()
        return out

    def validate(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"{why}, got {getattr(self, name)!r}", field=f"teacher.{name}")

        if self.model not in MODELS:
            raise bad("model", f"unknown teacher model; choose one of {', '.join(MODELS)}")
        for name in ("hidden", "layers", "heads", "batch_size"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise bad(name, "must be a positive integer")
        for name, lo in (("max_len", 1), ("epochs", 1), ("patience", 1), ("caser_filters", 1),
                         ("caser_vfilters", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or v < lo:
                raise bad(name, f"must be an integer >= {lo}")
        for name in ("dropout", "attn_dropout"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v < 1.0:
                raise bad(name, "must be in [0, 1)")
        if self.lr is not None and not self.lr > 0:
            raise bad("lr", "must be positive")
        if self.weight_decay < 0:
            raise bad("weight_decay", "must be >= 0")
        if self.loss not in ("ce", "bce"):
            raise bad("loss", "must be 'ce' or 'bce'")
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            raise bad("device", "must be auto, cpu, cuda, cuda:N or mps")
        if self.hidden is not None and self.heads is not None and self.model == "sasrec" \
                and self.hidden % self.heads:
            raise bad("heads", f"must divide hidden ({self.hidden})")
        if not self.caser_heights or any(not isinstance(h, int) or h < 1 for h in self.caser_heights):
            raise bad("caser_heights", "must be a non-empty list of positive integers")
        if self.model == "caser" and max(self.caser_heights) > self.max_len:
            raise bad("caser_heights", f"heights cannot exceed max_len ({self.max_len})")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["caser_heights"] = list(self.caser_heights)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TeacherConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown teacher setting(s): {', '.join(unknown)}", field=f"teacher.{unknown[0]}")
        kw = dict(d)
        if "caser_heights" in kw:
            kw["caser_heights"] = tuple(kw["caser_heights"])
        return cls(**kw)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def right_align(item_seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``[B, L]`` → (right-padded ``[B, L]``, lengths ``[B]``; at least 1 so gathers stay in range).

    Right padding lets causal models (SASRec, GRU) read real items from position 0, so padding never reaches a real
    position and the output at ``length - 1`` does not depend on how much padding the batch carries.
    """
    L = item_seq.shape[1]
    lengths = (item_seq != 0).sum(dim=1)  # [B]
    index = (torch.arange(L, device=item_seq.device)[None, :] + (L - lengths)[:, None]) % L  # [B, L]
    return item_seq.gather(1, index), lengths.clamp(min=1)


class Dropout(nn.Module):
    """Dropout with a cheap mask on CPU: one random byte per element, drawn as int64 words (8 bytes per draw).

    ``torch.nn.Dropout`` spends most of a small model's CPU step drawing its Bernoulli mask (~32 ms for a
    [256, 50, 64] tensor on 2 cores; this takes ~2 ms). The keep probability is rounded to a multiple of 1/256 and
    the scale matches it, so the layer stays unbiased. Seeded by torch's generator; on GPU it is plain dropout.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.keep = round((1.0 - p) * 256)  # keep an element when its byte < keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return nn.functional.dropout(x, self.p, training=True)
        words = torch.randint(-(2**63), 2**63 - 1, (-(-x.numel() // 8),), dtype=torch.int64)
        mask = words.view(torch.uint8)[: x.numel()].view(x.shape) < self.keep
        return x * mask * (256.0 / self.keep)


class SeqRecommender(nn.Module):
    """A next-item model. Subclasses define ``item_emb`` (``[n_items + 1, d]``, row 0 = padding) and ``forward``."""

    name: ClassVar[str] = ""
    fixed_len: ClassVar[bool] = False  # True: the model needs exactly max_len columns (Caser's vertical filter)
    item_emb: nn.Embedding

    def __init__(self, cfg: TeacherConfig, n_items: int) -> None:
        super().__init__()
        if n_items < 1:
            raise DataError(f"a teacher needs at least one item, got n_items={n_items}")
        self.cfg = cfg
        self.n_items = n_items

    def forward(self, item_seq: torch.Tensor) -> torch.Tensor:  # [B, L] → [B, d]
        raise NotImplementedError

    def logits(self, item_seq: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` → scores ``[B, n_items + 1]``; column 0 (padding) is ``-inf`` so it is never recommended."""
        scores = self(item_seq) @ self.item_emb.weight.T  # [B, n_items + 1]
        return scores.index_fill(1, torch.zeros(1, dtype=torch.long, device=scores.device), float("-inf"))

    def clip(self, item_seq: torch.Tensor) -> torch.Tensor:
        """Keep the last ``max_len`` columns; fixed-length models also get left-padded up to ``max_len``."""
        L = self.cfg.max_len
        if item_seq.shape[1] > L:
            return item_seq[:, -L:]
        if self.fixed_len and item_seq.shape[1] < L:
            return nn.functional.pad(item_seq, (L - item_seq.shape[1], 0))
        return item_seq

    # --- persistence: safetensors + JSON, loadable without this training code's state -----------------------------
    def save_pretrained(self, path: str | Path) -> Path:
        path = Path(path)
        with atomic_dir(path) as tmp:
            state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            info = {"format_version": 1, "model": self.name, "n_items": self.n_items, "config": self.cfg.to_dict()}
            (tmp / "config.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> SeqRecommender:
        """Load any teacher saved by `save_pretrained` (the class is read from config.json)."""
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file() or not (path / "model.safetensors").is_file():
            raise DataError("not a saved teacher folder (needs config.json and model.safetensors)", file=path)
        try:
            info = json.loads(cfg_file.read_text(encoding="utf-8"))
            cfg = TeacherConfig.from_dict(info["config"])
            n_items = int(info["n_items"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DataError(f"unreadable teacher config ({e})", file=cfg_file) from None
        model = build_teacher(cfg, n_items)
        if cls is not SeqRecommender and not isinstance(model, cls):
            raise DataError(f"folder holds a {model.name} teacher, not {cls.name}", file=path)
        model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
        return model.to(device).eval()


TEACHERS: dict[str, type[SeqRecommender]] = {}


def register(name: str):  # type: ignore[no-untyped-def]
    """Class decorator adding a model to `TEACHERS` under ``name``."""

    def deco(cls: type[SeqRecommender]) -> type[SeqRecommender]:
        cls.name = name
        TEACHERS[name] = cls
        return cls

    return deco


def build_teacher(cfg: TeacherConfig, n_items: int) -> SeqRecommender:
    """A freshly initialised teacher (seed torch first for reproducible weights)."""
    if cfg.model not in TEACHERS:
        raise ConfigError(f"unknown teacher model {cfg.model!r}; choose one of {', '.join(TEACHERS)}",
                          field="teacher.model")
    return TEACHERS[cfg.model](cfg.resolved(), n_items)
