"""Tiny offline models and data for stage-2 tests: a 2-layer llama, a 2-layer T5, a word-level tokenizer.

Everything is built from configs with a fixed seed, so two processes (the distributed test) build identical
weights; nothing is downloaded.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pandas as pd
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from delrec.data import SeqDataset

SPECIALS = ["<pad>", "</s>", "<unk>", "<s>"]
# Template words the prompts use; anything else maps to <unk>, which is fine for a random model.
WORDS = [
    'the', 'a', 'an', 'of', 'to', 'from', 'and', 'is', 'are', 'was', 'be', 'might', 'will', 'user',
    'users', 'movie', 'movies', 'item', 'items', 'game', 'games', 'next', 'watch', 'watched', 'watching',
    'plan', 'predict', 'recommendation', 'pattern', 'model', 'candidate', 'set', 'history', 'viewing',
    'based', 'on', 'refer', 'that', 'purchasing', 'purchase', 'bought', 'playing', 'play', 'sasrec',
    'gru4rec', 'caser', ':', ',', '.', '(', ')', '[', ']', '-', "'", '"', ';', '?', '!',
]
TITLE_WORDS = [f"w{i}" for i in range(60)]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace/punctuation word-level tokenizer over a fixed vocabulary (ids are stable)."""
    vocab: dict[str, int] = {}
    for tok in [*SPECIALS, *WORDS, *TITLE_WORDS, *[str(y) for y in range(1990, 2000)]]:
        vocab.setdefault(tok, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", bos_token="<s>")


def tiny_llama(vocab_size: int, seed: int = 0, init_std: float = 0.02) -> PreTrainedModel:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      initializer_range=init_std,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      pad_token_id=0, bos_token_id=3, eos_token_id=1, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def tiny_t5(vocab_size: int, seed: int = 0, init_factor: float = 1.0) -> PreTrainedModel:
    torch.manual_seed(seed)
    cfg = T5Config(initializer_factor=init_factor,
                   vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                   num_heads=4, dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5ForConditionalGeneration(cfg).eval()


def tiny_dataset(n_users: int = 24, n_items: int = 40, seed: int = 0, domain: str = "movie") -> SeqDataset:
    """Users with 6–12 interactions over ``n_items`` titled items ("w3 w17 (1994)")."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        items = rng.choice(n_items, size=int(rng.integers(6, 13)), replace=False)
        rows += [(f"u{u}", f"i{i}", t) for t, i in enumerate(items)]
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    titles = [f"{TITLE_WORDS[i % 60]} {TITLE_WORDS[(7 * i + 3) % 60]} ({1990 + i % 10})" for i in range(n_items)]
    items_df = pd.DataFrame({"item_id": [f"i{i}" for i in range(n_items)], "title": titles})
    return SeqDataset.from_frames(inter, items_df, name="tiny", domain=domain)


def tiny_backbone(arch: str = "llama", seed: int = 0, scale: float = 1.0):  # -> delrec.llm.backbone.Backbone
    """A frozen `Backbone` around a tiny random ``llama`` or ``t5`` with the word-level tokenizer.

    ``scale`` multiplies the init std: > 1 gives peaked, input-dependent outputs that an adapter can move quickly.
    """
    from delrec.llm.backbone import Backbone

    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), seed, 0.02 * scale) if arch == "llama" else tiny_t5(len(tok), seed, scale)
    return Backbone.from_model(model, tok)


def tiny_soft_prompt(hidden_size: int = 32, num_tokens: int = 4, seed: int = 1):  # -> SoftPrompt
    from delrec.llm.soft_prompt import SoftPrompt, SoftPromptConfig

    return SoftPrompt(SoftPromptConfig(num_tokens=num_tokens, seed=seed), hidden_size)
