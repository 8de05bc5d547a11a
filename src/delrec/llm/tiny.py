"""Tiny randomly initialised backbones (a few thousand parameters, built offline in well under a second) for tests,
examples and smoke runs. They share one byte-level BPE tokenizer trained on the fly on the prompt wording."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch

from delrec.llm.backbone import Backbone

TinyKind = Literal["llama", "t5", "gemma3"]

_CORPUS = [
    "Simulate the recommendation pattern of the SASRec model to make a temporal analysis of the model by analysing "
    "the most recent item in user's movie viewing history from candidate set.",
    "The recommendation pattern of the GRU4Rec Caser model is: The candidate set is: The user has already watched",
    "Then, The next movie the user plan to watch is. After that, the user has also watched [movie X] [movie M].",
    "Refer to the recommendation pattern to predict the next movie that the user might watch from candidate set "
    "based on user's movie viewing history. The next movie the user will watch might be:",
    "Next movies the user will watch (predicted by the model) might be: game playing played item purchasing "
    "purchased furniture or kitchenware interaction interacted with",
    "Toy Story (1995), Heat (1995), Fargo (1996), Casino (1995), Babe (1995), Jumanji (1995), Sabrina (1995), "
    "Star Wars (1977), Star Trek (1979), Alien (1979), Aliens (1986), Batman (1989), Batman Returns (1992)",
]


def tiny_tokenizer(kind: TinyKind = "llama", extra_text: Iterable[str] = (), vocab_size: int = 400):
    """A byte-level BPE tokenizer (any text encodes). ``t5`` appends ``</s>``; ``gemma3`` prepends ``<s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<s>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([*_CORPUS, *extra_text], trainer)
    if kind == "t5":
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    elif kind == "gemma3":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                   unk_token="<unk>")


def tiny_backbone(kind: TinyKind = "llama", seed: int = 0, hidden: int = 32, layers: int = 2,
                  attn_implementation: str = "sdpa", extra_text: Iterable[str] = (),
                  init_std: float = 0.2) -> Backbone:
    """A frozen 2-layer model of the given family with the tiny tokenizer (fp32, CPU).

    ``init_std`` is larger than the usual 0.02 so the random model's outputs depend visibly on its input (and a
    soft prompt can move them), which tests of training need."""
    tok = tiny_tokenizer(kind, extra_text)
    v = len(tok)
    ids = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id}
    torch.manual_seed(seed)
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=v, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                          tie_word_embeddings=False, initializer_range=init_std, **ids)
        cfg._attn_implementation = attn_implementation
        model = LlamaForCausalLM(cfg)
    elif kind == "gemma3":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        cfg = Gemma3TextConfig(vocab_size=v, hidden_size=hidden, intermediate_size=2 * hidden,
                               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                               sliding_window=8, layer_types=["sliding_attention", "full_attention"] * (layers // 2)
                               + ["sliding_attention"] * (layers % 2), max_position_embeddings=4096,
                               initializer_range=init_std, **ids)
        cfg._attn_implementation = attn_implementation
        model = Gemma3ForCausalLM(cfg)
    elif kind == "t5":
        from transformers import T5Config, T5ForConditionalGeneration

        cfg = T5Config(vocab_size=v, d_model=hidden, d_kv=8, d_ff=2 * hidden, num_layers=layers,
                       num_decoder_layers=layers, num_heads=4, relative_attention_num_buckets=8,
                       decoder_start_token_id=tok.pad_token_id,
                       initializer_factor=init_std / 0.1, **ids)  # T5 multiplies its init stds by this
        cfg._attn_implementation = attn_implementation
        model = T5ForConditionalGeneration(cfg)
    else:
        raise ValueError(f"unknown tiny kind {kind!r}")
    return Backbone.from_model(model.float().eval(), tok)


def tiny_dataset(n_users: int = 24, n_items: int = 60, min_len: int = 7, max_len: int = 14, seed: int = 0,
                 domain: str = "movie"):
    """A synthetic `SeqDataset` with movie-like titles and a learnable pattern (mostly consecutive items)."""
    import numpy as np

    from delrec.data.dataset import SeqDataset

    rng = np.random.default_rng(seed)
    words = ["Star", "Wars", "Heat", "Fargo", "Alien", "Batman", "Casino", "Babe", "Toy", "Story", "Trek", "Returns"]
    titles = ["<pad>"] + [f"{words[i % len(words)]} {words[(i * 7 + 3) % len(words)]} ({1950 + i})"
                          for i in range(n_items)]
    seqs = []
    for _ in range(n_users):
        n = int(rng.integers(min_len, max_len + 1))
        start = int(rng.integers(1, n_items + 1))
        seq = [(start + k - 1) % n_items + 1 if rng.random() < 0.8 else int(rng.integers(1, n_items + 1))
               for k in range(n)]
        seqs.append(np.array(list(dict.fromkeys(seq)) or [start], dtype=np.int64))
    return SeqDataset(name="tiny", titles=titles, item_ids=["", *map(str, range(1, n_items + 1))],
                      user_ids=[f"u{u}" for u in range(n_users)], sequences=seqs, domain=domain)


def successor_topk(split, k: int = 5):  # type: ignore[no-untyped-def]
    """A deterministic stand-in teacher for tests: the k items after each training sequence's last one, history
    items skipped ([n_train_users, k] item indices)."""
    import numpy as np

    out = []
    for seq in split.train_sequences:
        seen, row, i = set(seq.tolist()), [], int(seq[-1])
        while len(row) < k:
            i = i % split.dataset.n_items + 1
            if i not in seen:
                row.append(i)
        out.append(row)
    return np.array(out, dtype=np.int64)
