"""Stage 2 (LSR): fine-tune the LLM with AdaLoRA on next-item prediction, the distilled soft prompt frozen.

Each training example is a user's history → next item, shown with a 20-item candidate set (the target + 19 items
the user never interacted with, re-drawn every epoch from a seed). The loss is the cross-entropy of the target over
the candidates' whole-title log-likelihoods (`TitleScorer.score`), not the first-token verbalizer of the released
code (method spec §4.4, §12.5). Only adapter weights train; the backbone and the soft prompt stay frozen. The best
adapter on the frozen validation candidates (``select_metric``) is kept; training stops early after ``patience``
evaluations without improvement.

Scale-out: the loop runs under `accelerate.Accelerator`. ``batch_size`` is the *global* micro-batch: each of the
``N`` processes takes ``batch_size / N`` rows of it (``split_batches``), gradients are averaged by DDP, so a run on
``N`` processes follows the single-process run with the same settings (up to float round-off). Only the main process
writes artifacts. Launch with ``accelerate launch`` or ``torchrun``; a single process needs no launcher.

Artifacts in ``out_dir``: ``adapter/`` (peft ``save_pretrained`` of the best adapter, written when training
ends), ``history.json``, ``best.safetensors`` (the best adapter so far: raw full-rank tensors, updated at each
improvement) and ``checkpoint/`` (everything needed to resume after a kill, written atomically): adapter tensors,
optimizer and scheduler state, step/epoch position, per-process torch RNG states and the AdaLoRA rank allocator's
importance statistics and rank pattern — so a resumed run continues exactly (on the same number of processes; with
another number the data order is the same but dropout noise differs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from delrec.data.candidates import CandidateSet, concat, donor_histories, draw_candidates
from delrec.data.dataset import SeqDataset
from delrec.data.splits import Example, Split
from delrec.errors import ConfigError, DataError, DelrecError
from delrec.evaluate import histories_for, item_counts, lsr_inputs, validation_metrics
from delrec.io import atomic_dir, atomic_path, read_json, sha256_bytes, write_json
from delrec.llm.scoring import ranking_loss, soft_targets
from delrec.llm.title_trie import TitleTrie
from delrec.teachers import SeqRecommender, predict_proba
from delrec.teachers import score_candidates as teacher_scores

if TYPE_CHECKING:
    from accelerate import Accelerator

    from delrec.llm.backbone import Backbone
    from delrec.llm.prompts import ScoringConfig
    from delrec.llm.soft_prompt import SoftPrompt

AdapterKind = Literal["adalora", "lora", "none"]
Objective = Literal["candidates", "sequence"]
ADAPTER_DIR = "adapter"  # the selected adapter inside stage 2's folder (peft `save_pretrained`)
CHECKPOINT_DIR = "checkpoint"  # the resumable state of the last update inside stage 2's folder
TRAIN_CANDIDATES_FILE = "train_candidates.parquet"  # every candidate set stage 2 trained on (`save_sets`)
OBJECTIVES: tuple[str, ...] = ("candidates", "sequence")
ADAPTERS: tuple[str, ...] = ("adalora", "lora", "none")
DISTILL_TARGETS: tuple[str, ...] = ("teacher", "truth")
LIFTS: tuple[str, ...] = ("off", "joint", "baseline")
METRICS: tuple[str, ...] = ("HR@1", "HR@5", "NDCG@5")
ADAPTER_NAME = "default"  # peft's adapter name; AdaLoRA trains exactly one


@dataclass
class FinetuneConfig:
    """Stage-2 settings. Defaults are the paper's (method spec §4.3); `from_profile("cpu")` fits a laptop."""

    # Each field's comment is its help text.
    adapter: AdapterKind = "adalora"  # adalora (paper) | lora (fixed rank target_r) | none (no stage 2)
    init_r: int = 320  # AdaLoRA initial rank of every adapted matrix (paper 320)
    target_r: int = 8  # AdaLoRA target average rank after pruning (peft default 8); the rank of plain lora
    lora_alpha: float = 32.0  # adapter scaling numerator (paper 32)
    lora_dropout: float = 0.05  # dropout on the adapter input (paper 0.05)
    # 'auto': the architecture's attention query/value projections (T5 q,v; llama q_proj,v_proj; GPT-2 c_attn …),
    # or an explicit list of module names.
    target_modules: str | list[str] = "auto"
    # Adapt only the last this-many transformer blocks (peft `layers_to_transform`); 0, or at least the backbone's
    # block count, = every block. The frozen blocks below the lowest adapted one then need no backward pass (nothing
    # under them trains), so an update costs less.
    lora_layers: int = 0
    tinit: int = -1  # AdaLoRA steps before rank pruning starts; -1 = 10% of max_steps
    tfinal: int = -1  # AdaLoRA last steps with a frozen rank pattern; -1 = 20% of max_steps
    delta_t: int = 1  # AdaLoRA steps between two rank re-allocations (peft default 1)
    orth_reg_weight: float = 0.5  # AdaLoRA orthogonality regulariser weight (peft default 0.5)
    lr: float = 1e-4  # peak learning rate (paper 1e-4)
    weight_decay: float = 1e-6  # AdamW weight decay (paper 1e-6)
    warmup_steps: int = 800  # linear warm-up optimizer steps, then linear decay to 0 (paper 800)
    max_steps: int = 1400  # total optimizer steps (paper 1400); AdaLoRA's schedule is laid out over it
    batch_size: int = 20  # examples per micro-batch, all processes together (paper 20)
    grad_accum: int = 6  # micro-batches per optimizer step (paper 6)
    grad_clip: float = 2.0  # max global gradient norm; 0 = no clipping (paper 2.0)
    eval_every: int = 50  # optimizer steps between validations (and checkpoints)
    patience: int = 5  # validations without improvement before stopping; 0 = never stop early
    select_metric: str = "NDCG@5"  # validation metric that picks the best adapter: HR@1 | HR@5 | NDCG@5
    history_len: int = 20  # most recent history items shown in the prompt
    sliding_window: bool = False  # also train on earlier prefixes of training users (paper: last item only)
    max_train_examples: int = 0  # cap on training examples (seeded subsample); 0 = all
    # objective=sequence: keep only each training sequence's last this-many windows (0 = all), and let the
    # candidate-level teacher term rank prefixes of that stretch only. Test rows are the ends of users' sequences,
    # and uniform windows come mostly from the middles of the longest sequences. Ignored by objective=candidates (a
    # `cpu` profile default, like the sequence objective's other settings).
    windows_per_user: int = 0
    max_valid_examples: int = 0  # cap on validation rows used for model selection (seeded subsample); 0 = all
    candidate_size: int = 20  # candidates per training example: target + size-1 unseen negatives (paper 20)
    # candidates (paper): cross-entropy of the target over its candidate set, one next item per example;
    # sequence: windows of history_len+1 consecutive training items, each item after the first scored as the next
    # entry of the history before it in one pass (needs scoring.verbalizer=next; a causal LM) — history_len next-item
    # examples for the price of about one.
    objective: Objective = "candidates"
    # Weight λ of the teacher in stage 2's loss: (1−λ)·NLL of the true next item + λ·cross-entropy against the
    # teacher's (`teachers.distill_from`) distribution over the next item — over the candidates (objective
    # candidates), or over every item, spelled along the title's tokens (objective sequence; `TitleTrie`).
    # 0 = the paper (the teacher reaches stage 2 only through the soft prompt).
    distill_weight: float = 0.0
    distill_temperature: float = 1.0  # softmax temperature of that term's target (and of the LM's scores, z-scored)
    # objective=sequence: the teacher's term ranks this many training prefixes per micro-batch (all processes
    # together) over a candidate set each — the next item + candidate_size−1 negatives outside the user's sequence,
    # on the stage-2 prompt, the metric's own form — instead of spelling its distribution along title tokens; 0 = off.
    distill_candidates: int = 0
    # Z-score each candidate set's scores, the LM's and the teacher's, before the softmaxes of the candidate-level
    # teacher term (both then over distill_temperature): it compares orderings, not the two models' scales
    # (summed title log-likelihoods are far more peaked than a teacher's softmax; stage1_log S13 vs S15).
    distill_standardize: bool = False
    # What the candidate-level term fits: teacher (its softmax over each set: distillation) | truth (a 0/1 row on the
    # true next item through the same z-scoring and temperature — ≈ one-hot, 0.997 at T 0.5 over 20 — the control
    # that separates what the teacher knows from what the term's form, a ranking over listed candidates beside the
    # windows, gives by itself; needs distill_standardize).
    distill_target: str = "teacher"
    # Share of the true next item in the teacher term's target: w·(truth's target) + (1−w)·(the teacher's softmax),
    # both as above — Hinton's knowledge distillation, where the teacher supplies the order of the negatives and the
    # truth corrects the teacher's misses; 0 = the teacher's softmax alone, 1 is distill_target=truth (refused here:
    # it would load the teacher for nothing). Needs distill_target=teacher and distill_standardize.
    distill_truth_weight: float = 0.0
    # Each training prediction's true-next-item term weighted by (1 + its item's training count)^−α, the weights
    # scaled to mean 1 over the training targets: α > 0 moves the loss toward rare targets (inverse-propensity
    # weighting; α 1 gives every item about the same total weight). Unweighted next-item training learns which titles
    # are frequent targets first and ranks the rarest fifth of targets below chance (probe_popularity.py); α 0.5 keeps
    # the backbone's cold-fifth hits but ranks the validation ends lower overall (learning_log row 74). 0 = off.
    popularity_exponent: float = 0.0
    # Training candidate sets (objective candidates, or the candidate-level term of distill_candidates) draw their
    # negatives ∝ (1 + training count)^β instead of uniformly: at β 1 a negative is as popular as a target on average,
    # so the listed titles' frequency no longer tells the target apart and only the user's sequence can. Evaluation
    # sets stay uniform. β 1 under the teacher's term ranks the validation ends as uniform negatives do, leaning more
    # on the user's history (learning_log rows 77–79). 0 = uniform.
    negative_exponent: float = 0.0
    # The candidate-level teacher term (distill_candidates) fits history *lifts*: each candidate's score minus its
    # score after a stranger's history (a seeded training prefix of another user with none of the set's candidates
    # among the items either model reads of it) — the LM's and, with distill_target=teacher, the teacher's (truth:
    # the LM's side only). A title prior cancels out of both, so the term pays only for what the user's own sequence
    # adds: the teacher's item-to-item knowledge, which plain next-item training does not reach (stage 2's gain is
    # history-free: learning_log rows 75–80). off | joint: the gradient of the lift through both of the LM's passes
    # (one batched forward; ~1.7× the term's cost) — level overall with the term without lifts, the two coldest
    # fifths of targets raised, the sequence read most of any model (rows 82–83); on the 943 ML-100K loo test users
    # 0.296 / 0.685 / 0.501 vs the cpu profile's 0.256 / 0.690 / 0.478 (quality.md); at distill_weight 0.8 it ranks
    # below 0.5 (the coldest fifth up, the rest down) and with negative_exponent 1 it loses the cold gains (rows
    # 84–85) | baseline: the stranger's pass without gradient (eval mode) — a history-free step then moves both
    # passes alike, so the term cannot lower its loss that way: it rose from 3.9 to 4.8 over 400 updates and ranked
    # below the term without lifts (row 81).
    distill_lift: str = "off"
    eval_batch_size: int = 0  # examples per validation scoring batch; 0 = batch_size
    seed: int = 1234  # adapter init, data order, negatives, subsampling (paper 1234)
    profile: str = "paper"  # the preset these values started from (recorded only)

    def validate(self) -> FinetuneConfig:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"{why}, got {getattr(self, name)!r}", field=f"finetune.{name}")

        if self.adapter not in ADAPTERS:
            raise bad("adapter", f"must be one of {', '.join(ADAPTERS)}")
        if self.objective not in OBJECTIVES:
            raise bad("objective", f"must be one of {', '.join(OBJECTIVES)}")
        for name in ("init_r", "target_r", "delta_t", "max_steps", "batch_size", "grad_accum", "eval_every",
                     "history_len", "candidate_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(name, "must be a positive integer")
        for name in ("warmup_steps", "patience", "max_train_examples", "max_valid_examples", "eval_batch_size",
                     "windows_per_user", "lora_layers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise bad(name, "must be a non-negative integer")
        for name in ("tinit", "tfinal"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < -1:
                raise bad(name, "must be -1 (automatic) or a non-negative integer")
        for name in ("lr", "lora_alpha"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
                raise bad(name, "must be a positive number")
        for name in ("weight_decay", "grad_clip", "orth_reg_weight", "distill_weight", "distill_temperature",
                     "popularity_exponent", "negative_exponent"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise bad(name, "must be a non-negative number")
        if self.distill_weight > 1:
            raise bad("distill_weight", "must be in [0, 1]")
        if self.distill_temperature <= 0:
            raise bad("distill_temperature", "must be a positive number")
        if isinstance(self.distill_candidates, bool) or not isinstance(self.distill_candidates, int) \
                or self.distill_candidates < 0:
            raise bad("distill_candidates", "must be a non-negative integer")
        if not isinstance(self.distill_standardize, bool):
            raise bad("distill_standardize", "must be true or false")
        if self.distill_candidates and (self.objective != "sequence" or not self.distill_weight):
            raise bad("distill_candidates", "needs objective=sequence and distill_weight > 0 (with objective="
                                            "candidates the teacher's term is over each example's candidates already)")
        if self.distill_lift not in LIFTS:
            raise bad("distill_lift", f"must be one of {', '.join(LIFTS)}")
        if self.distill_lift != "off" and not self.distill_candidates:
            raise bad("distill_lift", "needs objective=sequence with distill_candidates > 0 (the candidates "
                                      "objective's teacher term takes no lifts)")
        if self.negative_exponent and not (self.objective == "candidates" or self.distill_candidates):
            raise bad("negative_exponent", "shapes training candidate sets: needs objective=candidates or "
                                           "distill_candidates > 0")
        if self.distill_standardize and (not self.distill_weight or
                                         (self.objective == "sequence" and not self.distill_candidates)):
            raise bad("distill_standardize", "applies to a candidate-level teacher term only: needs distill_weight "
                                             "> 0 and objective=candidates or distill_candidates > 0")
        if self.distill_target not in DISTILL_TARGETS:
            raise bad("distill_target", f"must be one of {', '.join(DISTILL_TARGETS)}")
        if self.distill_target != "teacher" and not (self.distill_weight and self.distill_standardize and (
                self.objective == "candidates" or self.distill_candidates)):
            # without z-scoring a 0/1 row over the temperature is a near-uniform target (1/(C−1+e) at T 1)
            raise bad("distill_target", "applies to a z-scored candidate-level term only: needs distill_weight > 0, "
                                        "distill_standardize=true and objective=candidates or distill_candidates > 0")
        w = self.distill_truth_weight
        if isinstance(w, bool) or not isinstance(w, int | float) or not 0.0 <= w <= 1.0:
            raise bad("distill_truth_weight", "must be a number in [0, 1)")
        if w == 1:
            raise bad("distill_truth_weight", "1 fits the truth alone: use distill_target=truth (no teacher needed)")
        if w and (self.distill_target != "teacher" or not self.distill_standardize):
            raise bad("distill_truth_weight", "mixes the truth into the teacher's z-scored candidate-level target: "
                                              "needs distill_target=teacher and distill_standardize=true")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise bad("lora_dropout", "must be in [0, 1)")
        if self.candidate_size < 2:
            raise bad("candidate_size", "must be at least 2")
        if self.target_r > self.init_r:
            raise bad("target_r", f"must not exceed init_r ({self.init_r})")
        if self.select_metric not in METRICS:
            raise bad("select_metric", f"must be one of {', '.join(METRICS)}")
        tm = self.target_modules
        if isinstance(tm, str):
            if tm != "auto":
                raise bad("target_modules", "must be 'auto' or a list of module names")
        elif not tm or not all(isinstance(m, str) and m for m in tm):
            raise bad("target_modules", "must be 'auto' or a non-empty list of module names")
        if self.adapter == "adalora":
            tinit, tfinal = self.schedule()
            if tinit >= self.max_steps - tfinal:
                raise bad("tinit", f"AdaLoRA needs tinit < max_steps - tfinal ({self.max_steps} - {tfinal})")
        return self

    def schedule(self) -> tuple[int, int]:
        """AdaLoRA (tinit, tfinal) with the automatic values resolved against ``max_steps``."""
        tinit = self.tinit if self.tinit >= 0 else int(0.1 * self.max_steps)
        tfinal = self.tfinal if self.tfinal >= 0 else int(0.2 * self.max_steps)
        return tinit, tfinal

    @property
    def needs_teacher(self) -> bool:
        """Whether stage 2's loss consults the trained teacher (a truth-target term does not)."""
        return self.distill_weight > 0 and self.distill_target == "teacher"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules) if not isinstance(self.target_modules, str) else \
            self.target_modules
        return d

    @classmethod
    def from_profile(cls, name: str, **overrides: Any) -> FinetuneConfig:
        """A preset (``paper`` | ``cpu``) with ``overrides`` applied, validated."""
        if name not in PROFILES:
            raise ConfigError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}",
                              field="finetune.profile")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in overrides:
            if key not in known:
                raise ConfigError(f"unknown setting; expected one of: {', '.join(sorted(known))}",
                                  field=f"finetune.{key}")
        return dataclasses.replace(PROFILES[name], **overrides).validate()


# The paper's stage-2 hyper-parameters (method spec §4.3; optimizer AdamW instead of PagedLion8bit).
PAPER = FinetuneConfig()
# ~15 minutes of stage 2 on 2 CPU cores with SmolLM2-135M: the `next` verbalizer's packed windows
# (objective=sequence): 400 updates of 4 windows of 11 consecutive training items, ~15,000 next-item predictions at
# ~0.055 s each, where one listed-candidate example costs ~1.9 s (learning_log P13 vs P11). Plain LoRA (AdaLoRA's
# zero-initialised E and early pruning barely move in a few hundred updates), the first update at a non-zero lr.
# Chosen on validation rows only (benchmarks/results/learning_log.md): lr 3e-3 (P5, valid NDCG@5 0.432 vs 0.385 at
# 1e-3); with the open and listed verbalizers 5 training candidates (P7), LoRA on every linear layer (P8) and
# summed title log-likelihoods (P9) learned less; the packed objective reached 0.491 after 100 updates (P13). With
# packed training the sum ranks better than the mean (P14 vs P17), so the profile's scoring uses it (pipeline.profile).
# Validation on 64 users (~25 s each time; 16 give a 95% CI of about ±0.2 on HR@1). Both fresh runs of session 15
# still picked step 200 over 400 (NDCG@5 0.52 vs 0.49): later updates lower the validation metric (an open lead).
# 20-item histories led on 200 validation prefixes (P20, P23) but ranked the loo test users no better at either
# profile's wall time (quality.md: each update costs ~1.6x, and updates buy more than context), so 10 stays.
# Each training sequence's last 3 windows only (~2,300 on the ML-100K user split; the test rows are sequence ends):
# on the validation users' last 3 items, at the same cost, HR@1 / NDCG@5 0.319 / 0.538 vs 0.262 / 0.501 with every
# window (paired ΔNDCG@5 +0.037 [+0.007, +0.070]; learning_log W3 vs M1-ends; the last window alone: W1, 0.526).
# On those windows lr 6e-3 ranks the validation ends as 3e-3 does (ΔNDCG@5 −0.000), 1.5e-3 lower (−0.044 [−0.070,
# −0.021]) and rank 32 no better (−0.009); the same windows as 8 per update in 200 updates rank lower (−0.029
# [−0.052, −0.006]): learning_log rows 62–65. Past 400 updates they plateau: 960 read NDCG@5 0.534 (row 66, ΔNDCG@5
# −0.005 [−0.033, +0.023]). LoRA on the last 15 of SmolLM2's 30 blocks spares the backward pass below them — 1,191 s
# instead of ~1,540 s for the 400 updates — and ranks the ends as every block does (row 67: ΔNDCG@5 −0.006 [−0.033,
# +0.019]); on a backbone with fewer blocks it adapts all of them.
CPU = FinetuneConfig(adapter="lora", init_r=8, target_r=8, lr=3e-3, warmup_steps=10, max_steps=400, batch_size=4,
                     grad_accum=1, eval_every=200, patience=0, history_len=10, objective="sequence",
                     windows_per_user=3, lora_layers=15, max_train_examples=0, max_valid_examples=64,
                     eval_batch_size=4, profile="cpu")
# The benchmark's longer CPU budget (≤ 2 hours in all): 4× the updates (~1 epoch of the ML-100K user split's
# windows). On ML-100K loo the 64 validation users read NDCG@5 0.430 / 0.447 / 0.421 / 0.469 at updates 400 / 800 /
# 1,200 / 1,600 and the test users 0.498 (cpu: 0.459; popularity 0.451) — still rising at the end of the budget.
# 64 validation users cannot tell neighbouring checkpoints apart (NDCG@5 standard error ~0.04): the TALLRec-style
# run picked update 1,200 (0.451 vs 0.431), yet its update 1,600 ranks the test users better (HR@1 0.273 vs 0.245).
# Every window (windows_per_user 0): the committed quality rows measured it so. The last-3 windows gain nothing
# from 960 updates over 400 on the validation ends (learning_log W3-960 vs W3: ΔNDCG@5 −0.005 [−0.033, +0.023]), yet
# still lead every window at 960 (vs M2: +0.024 [−0.003, +0.052]); 1,600 updates on them were not measured.
CPU_LONG = dataclasses.replace(CPU, max_steps=1600, eval_every=400, windows_per_user=0, lora_layers=0,
                               profile="cpu-long")
PROFILES: dict[str, FinetuneConfig] = {"paper": PAPER, "cpu": CPU, "cpu-long": CPU_LONG}


# --- adapters --------------------------------------------------------------------------------------------------
_FALLBACK_TARGETS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "v_proj"), ("q", "v"), ("c_attn",), ("query", "value"), ("query_key_value",), ("qkv_proj",),
    ("Wqkv",),
)


def _base_model(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def resolve_target_modules(model: nn.Module, spec: str | list[str] = "auto") -> list[str]:
    """Module names to adapt: the architecture's query/value projections for ``"auto"``, else ``spec`` checked."""
    from transformers.pytorch_utils import Conv1D

    base = _base_model(model)
    linear = {name.rsplit(".", 1)[-1] for name, m in base.named_modules() if isinstance(m, nn.Linear | Conv1D)}
    if isinstance(spec, str):
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as known

        model_type = str(getattr(getattr(base, "config", None), "model_type", ""))
        found = known.get(model_type)
        if not found or not all(m in linear for m in found):
            found = next((list(c) for c in _FALLBACK_TARGETS if all(m in linear for m in c)), None)
        if not found:
            raise ConfigError(f"cannot tell the attention projections of model type {model_type!r}; list them in "
                              f"finetune.target_modules (linear layers: {', '.join(sorted(linear)[:20])})",
                              field="finetune.target_modules")
        return list(found)
    missing = [m for m in spec if m not in linear]
    if missing:
        raise ConfigError(f"no linear layer named {', '.join(missing)} in the backbone (it has: "
                          f"{', '.join(sorted(linear)[:20])})", field="finetune.target_modules")
    return list(spec)


def _task_type(backbone: Backbone) -> str:
    kind = getattr(backbone, "kind", None)
    if kind not in ("causal", "seq2seq"):
        kind = "seq2seq" if getattr(_base_model(backbone.model).config, "is_encoder_decoder", False) else "causal"
    return "SEQ_2_SEQ_LM" if kind == "seq2seq" else "CAUSAL_LM"


def adapted_layers(backbone: Backbone, cfg: FinetuneConfig) -> list[int] | None:
    """The block indices ``cfg.lora_layers`` adapts (the last ones, all of a smaller backbone's), or None for every
    block."""
    if not cfg.lora_layers:
        return None
    conf = backbone.model.config
    n = getattr(conf, "num_hidden_layers", None) or getattr(conf, "num_layers", None)
    if not isinstance(n, int):
        raise ConfigError(f"{type(backbone.model).__name__} does not say how many blocks it has; use 0 (every block)",
                          field="finetune.lora_layers")
    return list(range(max(0, n - cfg.lora_layers), n))  # a smaller backbone: every block


def peft_config(backbone: Backbone, cfg: FinetuneConfig) -> Any:
    """The `peft` config for ``cfg.adapter`` on this backbone (AdaLoRA's schedule laid out over max_steps)."""
    from peft import AdaLoraConfig, LoraConfig

    targets = resolve_target_modules(backbone.model, cfg.target_modules)
    common = dict(target_modules=targets, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                  task_type=_task_type(backbone), bias="none", layers_to_transform=adapted_layers(backbone, cfg))
    if cfg.adapter == "lora":
        return LoraConfig(r=cfg.target_r, **common)
    tinit, tfinal = cfg.schedule()
    return AdaLoraConfig(init_r=cfg.init_r, target_r=cfg.target_r, tinit=tinit, tfinal=tfinal, deltaT=cfg.delta_t,
                         orth_reg_weight=cfg.orth_reg_weight, total_step=cfg.max_steps, **common)


def load_adapter(backbone: Backbone, adapter_dir: str | Path) -> Backbone:
    """Attach a saved stage-2 adapter (peft folder) to ``backbone`` for inference; returns the same backbone.

    Loaded with ``is_trainable=True`` because peft 0.21's AdaLoRA in inference mode breaks a forward with
    ``labels=`` (stack.md); the adapter weights are then frozen and the model put in eval mode.
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise DataError("not an adapter folder (no adapter_config.json)", file=adapter_dir)
    if hasattr(backbone.model, "peft_config"):
        raise DelrecError("the backbone already carries an adapter; load a fresh backbone", file=adapter_dir)
    with warnings.catch_warnings():
        # AdaLoRA's saved rank pattern names lora_E tensors, which peft's generic LoRA rank_pattern check reports
        # as unmatched; AdaLoRA itself applies the pattern (ranks are resized on load).
        warnings.filterwarnings("ignore", message=".*rank_pattern keys did not match.*")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        model = PeftModel.from_pretrained(backbone.model, str(adapter_dir), is_trainable=True)
    model.requires_grad_(False)
    model.eval()
    backbone.model = model
    return backbone


def orthogonal_regularizer(model: nn.Module, adapter_name: str = ADAPTER_NAME) -> torch.Tensor:
    """AdaLoRA's ‖PᵀP − I‖_F + ‖QQᵀ − I‖_F averaged over adapted matrices (what peft adds when given labels)."""
    total: torch.Tensor | None = None
    n = 0
    for name, p in model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and adapter_name in name and p.numel():
            cov = p @ p.T if "lora_A" in name else p.T @ p
            eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
            term = torch.linalg.matrix_norm(cov - eye)
            total = term if total is None else total + term
            n += 1
    if total is None:
        return torch.zeros(())
    return total / n


# --- data --------------------------------------------------------------------------------------------------------
def train_windows(split: Split, cfg: FinetuneConfig) -> list[np.ndarray]:
    """``objective=sequence``: each training sequence cut from its end into windows of ``history_len + 1`` items
    that overlap by one, so every item but a sequence's first is predicted once, from up to ``history_len`` items
    before it (the most a prompt shows). ``windows_per_user`` keeps each sequence's last windows only; then the
    seeded cap ``max_train_examples`` (in windows)."""
    h = cfg.history_len
    out: list[np.ndarray] = []
    for seq in split.train_sequences:
        ends = range(len(seq), 1, -h)
        for end in ends[:cfg.windows_per_user] if cfg.windows_per_user else ends:
            out.append(seq[max(0, end - h - 1):end])
    if cfg.max_train_examples and len(out) > cfg.max_train_examples:
        keep = np.sort(np.random.default_rng(cfg.seed).choice(len(out), cfg.max_train_examples, replace=False))
        out = [out[i] for i in keep]
    return out


def train_prefixes(split: Split, cfg: FinetuneConfig) -> list[Example]:
    """The prefixes the candidate-level teacher term ranks: training sequences only (no validation or test target),
    and with ``windows_per_user`` only the next items those windows predict (the same stretch of each sequence)."""
    exs = split.examples("train", sliding=True)
    if cfg.windows_per_user:
        n = {int(u): len(s) for u, s in zip(split.train_users, split.train_sequences, strict=True)}
        exs = [e for e in exs if len(e.history) >= n[e.user] - cfg.windows_per_user * cfg.history_len]
    return exs


def train_examples(split: Split, cfg: FinetuneConfig) -> list[Example]:
    """Training users' next-item examples (last item, or every prefix with sliding_window), seeded cap."""
    exs = split.examples("train", sliding=cfg.sliding_window)
    if cfg.max_train_examples and len(exs) > cfg.max_train_examples:
        keep = np.sort(np.random.default_rng(cfg.seed).choice(len(exs), cfg.max_train_examples, replace=False))
        exs = [exs[i] for i in keep]
    return exs


def target_weights(split: Split, examples: Sequence[Any], cfg: FinetuneConfig) -> np.ndarray | None:
    """[n_items + 1] loss weight of each item as a training target, (1 + training count)^−α scaled so the training
    predictions' weights average 1 (the loss keeps its scale, so the learning rate keeps its meaning); None at α 0.

    Counts come from the training sequences only; the mean runs over what the loss predicts — every window item
    after the first (objective sequence) or each example's next item (objective candidates)."""
    if not cfg.popularity_exponent:
        return None
    raw = (1.0 + item_counts(split.train_sequences, split.dataset.n_items)) ** -float(cfg.popularity_exponent)
    if cfg.objective == "sequence":
        predicted = np.concatenate([np.asarray(w[1:], dtype=np.int64) for w in examples])
    else:
        predicted = np.asarray([e.target for e in examples], dtype=np.int64)
    return raw / raw[predicted].mean()


def window_targets(teacher: SeqRecommender, trie: TitleTrie, windows: Sequence[np.ndarray],
                   cfg: FinetuneConfig) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """The teacher's next-item distribution for every scored item of every window (item k of a window, from the
    items before it — what the LM sees), spelled along that item's title tokens (`TitleTrie.targets`)."""
    hists = [np.asarray(w[:k]) for w in windows for k in range(1, len(w))]
    probs = predict_proba(teacher, hists, temperature=cfg.distill_temperature)
    items = [int(w[k]) for w in windows for k in range(1, len(w))]
    return [trie.targets(item, probs[r]) for r, item in enumerate(items)]


def candidate_distill_loss(scores: torch.Tensor, target: np.ndarray, cfg: FinetuneConfig) -> torch.Tensor:
    """Stage 2's candidate-level term (`ranking_loss`): the LM's softmax over each candidate set ([B, C] scores),
    z-scored first with ``distill_standardize`` and over ``distill_temperature``, against ``target``
    (`term_targets`)."""
    t = torch.as_tensor(target, device=scores.device, dtype=torch.float32)
    return ranking_loss(scores, t, cfg.distill_temperature, cfg.distill_standardize)


def term_targets(teacher: SeqRecommender | None, histories: Sequence[np.ndarray], items: np.ndarray,
                 targets: np.ndarray, cfg: FinetuneConfig,
                 donors: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """The [B, C] distribution over each candidate set that the candidate-level term fits: the teacher's softmax
    (`soft_targets` of its scores), or with ``distill_target=truth`` that of a 0/1 row on each set's true next item
    (``targets``) — near one-hot after z-scoring and the temperature — or, with ``distill_truth_weight`` w, the mix
    w·truth + (1−w)·teacher. ``donors`` (``distill_lift``): the teacher's scores less its scores for the same
    candidates after these histories."""
    def soft(logits: np.ndarray) -> np.ndarray:
        t = torch.as_tensor(logits, dtype=torch.float32)
        return soft_targets(t, cfg.distill_temperature, cfg.distill_standardize).numpy()

    def truth() -> np.ndarray:
        return soft((np.asarray(items) == np.asarray(targets)[:, None]).astype(np.float32))

    if cfg.distill_target == "truth":
        return truth()
    assert teacher is not None
    logits = teacher_scores(teacher, histories, items)
    if donors is not None:
        logits = logits - teacher_scores(teacher, donors, items)
    p = soft(logits)
    w = cfg.distill_truth_weight
    return w * truth() + (1 - w) * p if w else p


def negative_weights(split: Split, cfg: FinetuneConfig) -> np.ndarray | None:
    """[n_items + 1] sampling weights of training negatives, (1 + training count)^β; None (uniform) at β 0."""
    if not cfg.negative_exponent:
        return None
    return (1.0 + item_counts(split.train_sequences, split.dataset.n_items)) ** float(cfg.negative_exponent)


def teacher_term_sets(prefixes: Sequence[Example], dataset: SeqDataset, cfg: FinetuneConfig, epoch: int, batch: int,
                      weights: np.ndarray | None = None) -> tuple[list[Example], CandidateSet]:
    """The ``distill_candidates`` training prefixes of one micro-batch's teacher term and their candidate sets,
    seeded by (seed, epoch, batch): a resumed run draws the same, and the saved file (`save_sets`) redraws them all.
    ``weights``: `negative_weights`."""
    rng = np.random.default_rng([cfg.seed, epoch, batch])
    exs = [prefixes[i] for i in rng.choice(len(prefixes), cfg.distill_candidates, replace=False)]
    return exs, draw_candidates(exs, dataset, size=cfg.candidate_size, seed=int(rng.integers(2**31)),
                                weights=weights)


def epoch_sets(examples: Sequence[Example], dataset: SeqDataset, cfg: FinetuneConfig, epoch: int,
               weights: np.ndarray | None = None) -> CandidateSet:
    """``objective=candidates``: each training example's candidate set for one epoch (re-drawn every epoch)."""
    return draw_candidates(list(examples), dataset, size=cfg.candidate_size, seed=_epoch_seed(cfg.seed, epoch),
                           weights=weights)


def trained_batches(epoch: int, batch: int, batches_per_epoch: int) -> list[tuple[int, int]]:
    """The (epoch, micro-batch) pairs a run at ``epoch``/``batch`` has trained on, in order."""
    return [(e, b) for e in range(epoch) for b in range(batches_per_epoch)] + [(epoch, b) for b in range(batch)]


def save_sets(path: Path, sets: Sequence[tuple[int, int, CandidateSet]]) -> str:
    """(epoch, micro-batch or -1, sets) as one Parquet file (`CandidateSet.save` + those two columns)."""
    sizes = [len(cs) for *_, cs in sets]
    cols = {"epoch": np.repeat(np.array([e for e, _, _ in sets], dtype=np.int64), sizes),
            "batch": np.repeat(np.array([b for _, b, _ in sets], dtype=np.int64), sizes)}
    return concat([cs for *_, cs in sets]).save(path, extra=cols)


def lr_lambda(step: int, *, warmup: int, total: int) -> float:
    """Linear warm-up then linear decay to 0 at ``total``; the first update already has lr/(warmup+1), not 0 (the
    transformers schedule spends a whole update at lr 0, a large share of a 30-update CPU budget)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total - step) / max(1, total - warmup))


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class _EpochBatches(torch.utils.data.Sampler[list[int]]):
    """Global batches of a seeded per-epoch permutation (last partial batch dropped); resumable mid-epoch."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.drop_last = True  # read by accelerate's BatchSamplerShard
        self.epoch = 0
        self.start = 0  # first batch of the epoch to yield (resume)

    def __len__(self) -> int:
        return max(self.n // self.batch_size - self.start, 0)

    def __iter__(self):  # type: ignore[no-untyped-def]
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        for b in range(self.start, self.n // self.batch_size):
            yield perm[b * self.batch_size:(b + 1) * self.batch_size].tolist()


class _Scoring(nn.Module):
    """What `accelerator.prepare` wraps (DDP on several processes): forward = TitleScorer.score.

    The backbone model is a registered submodule so DDP sees (and synchronises) its trainable adapter weights; the
    scorer is kept outside the module tree.
    """

    def __init__(self, model: nn.Module, scorer: Any) -> None:
        super().__init__()
        self.model = model
        self._scorer = (scorer,)

    def forward(self, prompts: list[str], candidates: list[list[str]], sequence: bool = False,
                targets: Any = None) -> Any:
        if sequence:  # candidates = each window's items; → [N] scores of items 2.. of every window
            if targets is not None:  # → ([N] scores, [N] cross-entropies against the teacher's targets)
                return self._scorer[0].sequence_distill(prompts, candidates, targets)
            return self._scorer[0].sequence_scores(prompts, candidates)
        return self._scorer[0].score(prompts, candidates)  # [B, C]


# --- checkpoints ---------------------------------------------------------------------------------------------------
def _adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor at full (unpruned) shape, incl. AdaLoRA's lora_E and ranknum."""
    return {n: p.detach().cpu().contiguous().clone() for n, p in model.named_parameters() if "lora_" in n or
            ".ranknum." in n}


def _load_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    params = dict(model.named_parameters())
    missing = sorted(set(_adapter_tensors(model)) - set(tensors))
    if missing or any(n not in params or params[n].shape != t.shape for n, t in tensors.items()):
        raise DataError("checkpoint adapter does not fit this model (different backbone or adapter settings?)",
                        file=where)
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t.to(params[n].device))


def _optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    other: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}/{k}"] = v.detach().cpu().contiguous()
            else:
                other.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "state": other}


def _load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        pid, k = key.split("/", 1)
        state.setdefault(int(pid), {})[k] = t
    for pid, st in meta["state"].items():
        state.setdefault(int(pid), {}).update(st)
    groups = meta["param_groups"]
    for g, cur in zip(groups, opt.state_dict()["param_groups"], strict=True):
        for k, v in cur.items():  # JSON turned tuples (betas) into lists
            if isinstance(v, tuple) and isinstance(g.get(k), list):
                g[k] = tuple(g[k])
    opt.load_state_dict({"state": state, "param_groups": groups})


def _allocator_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], Any]:
    base = getattr(model, "base_model", None)
    alloc = getattr(base, "rankallocator", None)
    if alloc is None:
        return {}, None
    tensors = {}
    for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        for n, t in getattr(alloc, kind).items():
            tensors[f"{kind}/{n}"] = t.detach().cpu().contiguous()
    return tensors, base.peft_config[ADAPTER_NAME].rank_pattern


def _load_allocator_state(model: nn.Module, tensors: dict[str, torch.Tensor], rank_pattern: Any) -> None:
    base = getattr(model, "base_model", None)
    alloc = getattr(base, "rankallocator", None)
    if alloc is None:
        return
    alloc.reset_ipt()
    device = next(model.parameters()).device
    for key, t in tensors.items():
        kind, n = key.split("/", 1)
        getattr(alloc, kind)[n] = t.to(device)
    base.peft_config[ADAPTER_NAME].rank_pattern = rank_pattern


def _tensor_hash(module: nn.Module | None) -> str | None:
    if module is None:
        return None
    parts = [p.detach().cpu().float().numpy().tobytes() for p in module.parameters()]
    return sha256_bytes(*parts)[:16]


# --- training ------------------------------------------------------------------------------------------------------
def _make_accelerator(device: Any) -> Accelerator:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    cpu = torch.device(str(device)).type == "cpu"
    # split_batches: batch_size is global, so results do not depend on the number of processes. We own every RNG
    # (seeded permutations), hence no rng synchronisation; the scheduler is stepped by hand once per update.
    return Accelerator(cpu=cpu, dataloader_config=DataLoaderConfiguration(split_batches=True), rng_types=[],
                       step_scheduler_with_optimizer=False)


def _valid_rows(split: Split, dataset: SeqDataset, cfg: FinetuneConfig,
                valid_candidates: CandidateSet | None) -> tuple[CandidateSet | None, list[np.ndarray]]:
    examples = split.examples("valid")
    if valid_candidates is None:
        if not examples:
            return None, []
        valid_candidates = draw_candidates(examples, dataset, size=cfg.candidate_size, seed=cfg.seed)
    if cfg.max_valid_examples and len(valid_candidates) > cfg.max_valid_examples:
        keep = np.sort(np.random.default_rng(cfg.seed).choice(len(valid_candidates), cfg.max_valid_examples,
                                                              replace=False))
        valid_candidates = valid_candidates.subset(keep)
    return valid_candidates, histories_for(valid_candidates, examples)


def finetune(backbone: Backbone, dataset: SeqDataset, split: Split, soft_prompt: SoftPrompt | None,
             teacher_name: str, cfg: FinetuneConfig, out_dir: str | Path,
             valid_candidates: CandidateSet | None = None,
             log: Callable[[dict[str, Any]], None] | None = None, *, resume: bool = True,
             scoring: ScoringConfig | None = None, teacher: SeqRecommender | None = None) -> Backbone:
    """Stage 2: train an adapter on the backbone; returns the backbone whose ``model`` is the trained PeftModel.

    The backbone is modified in place (peft injects the adapter layers into it). ``adapter="none"`` returns it
    unchanged. ``soft_prompt`` (may be None: the "no soft prompt" ablation) is frozen. ``valid_candidates`` are the
    frozen validation candidates (drawn from ``cfg.seed`` if None). ``log`` receives every history entry (main
    process). With ``resume`` an existing ``out_dir/checkpoint`` of the same run is continued; a finished run
    returns at once with its best adapter loaded. ``scoring``: how titles are shown and scored (`ScoringConfig`).
    ``teacher``: the trained SR model whose next-item distribution ``cfg.distill_weight`` distils (needed then).
    """
    from peft import get_peft_model

    from delrec.llm.prompts import ScoringConfig, render_windows, title_views

    cfg.validate()
    scoring = scoring or ScoringConfig()
    if cfg.objective == "candidates" or cfg.distill_candidates:  # both score listed candidate sets
        scoring.check_candidates(cfg.candidate_size, "finetune.candidate_size")
    out_dir = Path(out_dir)
    if cfg.adapter == "none":
        from accelerate import PartialState

        if PartialState().is_main_process:
            write_json(out_dir / "history.json", {"config": cfg.to_dict(), "adapter": "none", "history": []})
        return backbone
    if hasattr(backbone.model, "peft_config"):
        raise DelrecError("the backbone already carries an adapter; stage 2 needs a fresh backbone",
                          field="finetune.adapter")

    accelerator = _make_accelerator(getattr(backbone, "device", "cpu"))
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    if cfg.batch_size % world:
        raise ConfigError(f"batch size {cfg.batch_size} must be a multiple of the {world} processes",
                          field="finetune.batch_size")
    sequence = cfg.objective == "sequence"
    if sequence and (scoring.verbalizer != "next" or getattr(backbone, "kind", "causal") != "causal"):
        raise ConfigError("objective=sequence needs scoring.verbalizer=next and a causal LM backbone, got "
                          f"verbalizer {scoring.verbalizer!r} on a {getattr(backbone, 'kind', '?')} model",
                          field="finetune.objective")
    kd = cfg.distill_weight > 0
    if cfg.needs_teacher and teacher is None:
        raise ConfigError(f"distill_weight {cfg.distill_weight} needs the trained teacher ({teacher_name})",
                          field="finetune.distill_weight")
    rank_kd = kd and sequence and cfg.distill_candidates > 0  # the teacher's term over candidate sets (below)
    # distill_lift's donors hold none of a set's candidates among the items the LM shows and the teacher reads
    lift_screen = max(cfg.history_len, teacher.cfg.max_len if teacher is not None and cfg.needs_teacher else 0)
    prefixes: list[Example] = []
    if rank_kd:
        if cfg.distill_candidates % world:
            raise ConfigError(f"distill_candidates {cfg.distill_candidates} must be a multiple of the {world} "
                              "processes", field="finetune.distill_candidates")
        prefixes = train_prefixes(split, cfg)
        if len(prefixes) < cfg.distill_candidates:
            raise ConfigError(f"only {len(prefixes)} training prefixes, fewer than distill_candidates "
                              f"{cfg.distill_candidates}", field="finetune.distill_candidates")
    examples: list[Any] = train_windows(split, cfg) if sequence else train_examples(split, cfg)
    if len(examples) < cfg.batch_size:
        raise ConfigError(f"only {len(examples)} training examples, fewer than one batch of {cfg.batch_size}",
                          field="finetune.batch_size")
    valid, valid_hist = _valid_rows(split, dataset, cfg, valid_candidates)
    domain = dataset.domain
    weights = target_weights(split, examples, cfg)
    neg_weights = negative_weights(split, cfg)
    weight_t = None if weights is None else torch.as_tensor(weights, dtype=torch.float32, device=accelerator.device)

    if soft_prompt is not None:
        soft_prompt.freeze()
        soft_prompt.requires_grad_(False)
        soft_prompt.to(accelerator.device)
    torch.manual_seed(cfg.seed)  # identical adapter init on every process
    with warnings.catch_warnings():  # transformers 5 deprecation raised inside peft, not actionable here
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        model = get_peft_model(backbone.model, peft_config(backbone, cfg))
    # On several GPUs every process must hold its own copy on its own device before the scorer (which places the
    # soft prompt and inputs on the backbone's device) is built; prepare() would move it only afterwards.
    model.to(accelerator.device)
    backbone.model = model
    scorer = scoring.scorer(backbone, soft_prompt)
    trie = None
    if kd and sequence and not rank_kd:
        views = title_views(dataset, scoring.year)
        trie = TitleTrie([[] if i == 0 else scorer.encode_title(views.scored[i])
                          for i in range(dataset.n_items + 1)])
    adalora = cfg.adapter == "adalora"
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_lambda, warmup=cfg.warmup_steps,
                                                                     total=cfg.max_steps))
    sampler = _EpochBatches(len(examples), cfg.batch_size, cfg.seed)
    # Its own generator: iter(DataLoader) would otherwise draw a base seed from the global RNG, which a resumed
    # run (re-entering an epoch mid-way) would consume once more than an uninterrupted one.
    loader = torch.utils.data.DataLoader(list(range(len(examples))), batch_sampler=sampler,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    wrapped, optimizer, loader = accelerator.prepare(_Scoring(model, scorer), optimizer, loader)

    fingerprint = {
        "config": cfg.to_dict(), "dataset": dataset.fingerprint()[:16], "teacher": teacher_name,
        "soft_prompt": _tensor_hash(soft_prompt), "n_train": len(examples),
        "valid_candidates": None if valid is None else valid.hash(), "processes": world,
        "scoring": dataclasses.asdict(scoring),
        "backbone_params": sum(p.numel() for p in _base_model(model).parameters()),
    }
    if cfg.needs_teacher:
        fingerprint["teacher_model"] = _tensor_hash(teacher)
    ckpt_dir = out_dir / CHECKPOINT_DIR
    st: dict[str, Any] = {"step": 0, "epoch": 0, "batch": 0, "best": None, "best_step": None, "bad_evals": 0,
                          "history": [], "finished": False, "seconds": 0.0, "predictions": 0}
    if resume and (ckpt_dir / "state.json").is_file():
        st = _load_checkpoint(ckpt_dir, fingerprint, model, optimizer, scheduler, rank)
    elif main:
        # Artifacts of an earlier run in this folder must not leak into this one (resume=False or no checkpoint).
        import shutil

        shutil.rmtree(ckpt_dir, ignore_errors=True)
        (out_dir / "best.safetensors").unlink(missing_ok=True)
    if not st["step"]:
        torch.manual_seed(cfg.seed + 1 + rank)  # dropout noise, independent per process
    accelerator.wait_for_everyone()

    def evaluate_valid() -> dict[str, Any]:
        assert valid is not None
        # The mean target rank (in the result) moves before HR@1 does and, unlike the loss over near-flat mean
        # log-likelihoods (≈ ln C even while ranks improve), reads the same for every verbalizer. Under
        # prior_weight=auto the metrics are the best λ's, so the best checkpoint keeps its λ.
        return validation_metrics(scorer, dataset, valid, valid_hist, domain, teacher_name, cfg.history_len,
                                  cfg.eval_batch_size or cfg.batch_size, scoring=scoring, metric=cfg.select_metric,
                                  state=accelerator.state, soft_prompt=soft_prompt is not None)

    def rank_distill(epoch: int, batch: int) -> torch.Tensor:
        """The teacher's term over candidate sets for one micro-batch: this process's share of its sets."""
        # every process draws all the sets (cheap), so each example's negatives do not depend on the process count
        exs, sets = teacher_term_sets(prefixes, dataset, cfg, epoch, batch, neg_weights)
        mine = slice(rank * len(exs) // world, (rank + 1) * len(exs) // world)
        hists, items = [e.history for e in exs[mine]], sets.items[mine]

        def inputs(histories: Sequence[np.ndarray]) -> tuple[list[str], list[list[str]]]:
            return lsr_inputs(dataset, histories, items, domain, teacher_name, cfg.history_len,
                              soft_prompt=soft_prompt is not None, year=scoring.year, verbalizer=scoring.verbalizer)

        donors = None
        if cfg.distill_lift != "off":  # seeded by (seed, epoch, batch) like the sets: a resume draws the same donors
            try:
                donors = donor_histories(exs, sets.items, lift_screen, pool=prefixes, seed=int(
                    np.random.default_rng([cfg.seed, epoch, batch, 1]).integers(2**31)))[mine]
            except ConfigError as err:
                raise ConfigError(f"no donor history for a training set: {err}", field="finetune.distill_lift") \
                    from None
        if cfg.distill_lift == "joint":  # one forward of both (DDP sees one pass), split: own − stranger's
            (p_own, t_own), (p_donor, t_donor) = inputs(hists), inputs(donors or [])
            both = wrapped(p_own + p_donor, t_own + t_donor)
            scores = both[:len(hists)] - both[len(hists):]
        else:
            scores = wrapped(*inputs(hists))
        if cfg.distill_lift == "baseline":
            model.eval()  # deterministic (no adapter dropout), no graph, outside DDP's reducer
            with torch.no_grad():
                base = accelerator.unwrap_model(wrapped)(*inputs(donors or []))
            model.train()
            scores = scores - base
        return candidate_distill_loss(scores, term_targets(teacher, hists, items, sets.targets[mine], cfg, donors),
                                      cfg)

    def record(entry: dict[str, Any]) -> None:
        st["history"].append(entry)
        if main and log is not None:
            log(entry)

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, initial=st["step"], desc="stage 2", disable=None if main else True)
    t_start = time.perf_counter() - st["seconds"]
    model.train()
    cands: CandidateSet | None = None
    cands_epoch = -1
    stop = st["finished"]
    loss_sum, loss_n, kd_sum = 0.0, 0, 0.0
    seen = 0  # next-item predictions trained on since the last update (this process)
    micro = 0  # micro-batches accumulated into the next update; an update may span an epoch boundary
    while not stop and st["step"] < cfg.max_steps:
        sampler.epoch, sampler.start = st["epoch"], st["batch"]
        if cands_epoch != st["epoch"] and not sequence:
            cands = epoch_sets(examples, dataset, cfg, st["epoch"], neg_weights)
            cands_epoch = st["epoch"]
        for idx in loader:
            rows = idx.tolist()
            last = micro == cfg.grad_accum - 1
            with accelerator.no_sync(wrapped) if not last else contextlib.nullcontext():
                if sequence:  # mean negative log-likelihood of every item as the next entry
                    windows = [examples[i] for i in rows]
                    prompts, items = render_windows(title_views(dataset, scoring.year), domain, teacher_name,
                                                    windows, soft_prompt=soft_prompt is not None)
                    # With the candidate-level teacher term the window term is backpropagated on its own, unsynced
                    # (DDP fixes the sync at forward time); the teacher's forward/backward then carries the sync.
                    with accelerator.no_sync(wrapped) if rank_kd else contextlib.nullcontext():
                        if trie is not None:
                            assert teacher is not None
                            item_scores, item_kd = wrapped(prompts, items, sequence=True,
                                                           targets=window_targets(teacher, trie, windows, cfg))
                        else:
                            item_scores, item_kd = wrapped(prompts, items, sequence=True), None
                        # Normalised by the whole global micro-batch's item count, times the processes DDP
                        # averages over: N processes then follow the single-process mean although windows differ
                        # in length.
                        n_items = torch.tensor(item_scores.numel(), device=accelerator.device)
                        n_global = accelerator.reduce(n_items, "sum") if world > 1 else n_items
                        if weight_t is not None:  # the window items' weights, in item_scores' order
                            scored = torch.as_tensor(np.concatenate([w[1:] for w in windows]), device=weight_t.device)
                            item_scores = item_scores * weight_t[scored]
                        nll = -item_scores.sum() * world / n_global
                        loss = nll
                        if item_kd is not None:
                            kd_loss = item_kd.sum() * world / n_global
                            loss = (1 - cfg.distill_weight) * nll + cfg.distill_weight * kd_loss
                            kd_sum += float(kd_loss.detach())
                        if rank_kd:
                            accelerator.backward((1 - cfg.distill_weight) * nll / cfg.grad_accum)
                    if rank_kd:
                        kd_loss = rank_distill(st["epoch"], st["batch"])
                        loss = (1 - cfg.distill_weight) * nll.detach() + cfg.distill_weight * kd_loss
                        kd_sum += float(kd_loss.detach())
                    seen += item_scores.numel()
                else:
                    assert cands is not None
                    prompts, titles = lsr_inputs(dataset, [examples[i].history for i in rows], cands.items[rows],
                                                 domain, teacher_name, cfg.history_len,
                                                 soft_prompt=soft_prompt is not None, year=scoring.year,
                                                 verbalizer=scoring.verbalizer)
                    target = torch.as_tensor(cands.target_pos[rows], device=accelerator.device)
                    scores = wrapped(prompts, titles)  # [b, C] whole-title log-likelihoods
                    if weight_t is None:
                        loss = ranking_loss(scores, target)
                    else:
                        w = weight_t[torch.as_tensor(cands.targets[rows], device=weight_t.device)]
                        loss = (ranking_loss(scores, target, reduction="none") * w).mean()
                    if kd:  # the teacher's softmax (or the truth's, or their mix) over the same candidates
                        soft = term_targets(teacher, [examples[i].history for i in rows], cands.items[rows],
                                            cands.targets[rows], cfg)
                        kd_loss = candidate_distill_loss(scores, soft, cfg)
                        loss = (1 - cfg.distill_weight) * loss + cfg.distill_weight * kd_loss
                        kd_sum += float(kd_loss.detach())
                    seen += len(rows)
                # the window term of a candidate-level teacher term was backpropagated above
                total = (cfg.distill_weight * kd_loss if rank_kd else loss) / cfg.grad_accum
                if last and adalora and cfg.orth_reg_weight > 0:
                    total = total + cfg.orth_reg_weight * orthogonal_regularizer(model)
                accelerator.backward(total)
            loss_sum += float(loss.detach())
            loss_n += 1
            st["batch"] += 1
            micro += 1
            if not last:
                continue
            micro = 0
            if cfg.grad_clip > 0:
                accelerator.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            st["step"] += 1
            if adalora:  # needs this step's gradients: before zero_grad (peft's contract)
                model.base_model.update_and_allocate(st["step"])
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)
            step_loss = float(accelerator.reduce(torch.tensor(loss_sum / loss_n, device=accelerator.device),
                                                 "mean"))
            step_kd = float(accelerator.reduce(torch.tensor(kd_sum / loss_n, device=accelerator.device), "mean"))
            loss_sum, loss_n, kd_sum = 0.0, 0, 0.0
            st["predictions"] = st.get("predictions", 0) + int(accelerator.reduce(
                torch.tensor(seen, device=accelerator.device), "sum"))
            seen = 0
            entry: dict[str, Any] = {"step": st["step"], "loss": step_loss, "lr": scheduler.get_last_lr()[0],
                                     "predictions": st["predictions"],
                                     "seconds": round(time.perf_counter() - t_start, 3)}
            if kd:
                entry["distill_loss"] = step_kd
            at_end = st["step"] >= cfg.max_steps
            if valid is not None and (st["step"] % cfg.eval_every == 0 or at_end):
                metrics = evaluate_valid()
                entry["valid"] = metrics
                score = metrics[cfg.select_metric]
                if st["best"] is None or score > st["best"][cfg.select_metric]:
                    st["best"], st["best_step"], st["bad_evals"] = metrics, st["step"], 0
                    if main:
                        _save_best(out_dir, model)
                else:
                    st["bad_evals"] += 1
                    stop = cfg.patience > 0 and st["bad_evals"] >= cfg.patience
                bar.set_postfix({cfg.select_metric: f"{score:.4f}"})
            record(entry)
            if stop or at_end or st["step"] % cfg.eval_every == 0:
                st["finished"] = stop or at_end
                st["seconds"] = time.perf_counter() - t_start
                _save_checkpoint(accelerator, ckpt_dir, fingerprint, st, model, optimizer, scheduler)
            if stop or at_end:
                break
        else:  # epoch exhausted
            st["epoch"] += 1
            st["batch"] = 0
            continue
        break
    bar.close()

    # Keep the best adapter (by validation), or the last one when there was no validation.
    best_file = out_dir / "best.safetensors"
    if st["best"] is not None and best_file.is_file():
        _load_best(best_file, model)
    model.eval()
    if main:
        with atomic_dir(out_dir / ADAPTER_DIR) as tmp, warnings.catch_warnings():
            # AdaLoRA may prune a matrix to rank 0; peft then warns about ZeRO-3/FSDP shards, which is not the case.
            warnings.filterwarnings("ignore", message=".*have invalid shape.*")
            model.save_pretrained(str(tmp))
        steps_run = max(st["step"], 1)
        # Every candidate set trained on, frozen like the evaluation's (redrawn from their seeds: the same on resume)
        pairs = trained_batches(st["epoch"], st["batch"], len(sampler))
        train_sets = None
        if rank_kd:
            train_sets = [(e, b, teacher_term_sets(prefixes, dataset, cfg, e, b, neg_weights)[1]) for e, b in pairs]
        elif not sequence:
            epochs = sorted({e for e, _ in pairs})
            train_sets = [(e, -1, epoch_sets(examples, dataset, cfg, e, neg_weights)) for e in epochs]
        train_hash = None if train_sets is None else save_sets(out_dir / TRAIN_CANDIDATES_FILE, train_sets)
        write_json(out_dir / "history.json", {
            "config": cfg.to_dict(), "adapter": cfg.adapter, "processes": world, "n_train_examples": len(examples),
            "train_candidates": train_hash,
            "valid_candidates": None if valid is None else valid.hash(), "n_valid": 0 if valid is None else len(valid),
            "steps": st["step"], "best_step": st["best_step"], "best": st["best"],
            "objective": cfg.objective, "train_predictions": st.get("predictions", 0),
            "stopped_early": bool(st["step"] < cfg.max_steps), "seconds": round(st["seconds"], 3),
            "seconds_per_step": round(st["seconds"] / steps_run, 4), "history": st["history"],
            "fingerprint": fingerprint,
        })
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    return backbone


def _save_best(out_dir: Path, model: nn.Module) -> None:
    tensors = _adapter_tensors(model)
    _, rank_pattern = _allocator_state(model)
    with atomic_path(out_dir / "best.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"rank_pattern": json.dumps(rank_pattern)})


def _load_best(path: Path, model: nn.Module) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    _load_adapter_tensors(model, load_file(str(path)), path)
    base = getattr(model, "base_model", None)
    if getattr(base, "rankallocator", None) is not None:
        base.peft_config[ADAPTER_NAME].rank_pattern = json.loads(meta.get("rank_pattern", "null"))


def _save_checkpoint(accelerator: Accelerator, ckpt_dir: Path, fingerprint: dict[str, Any], st: dict[str, Any],
                     model: nn.Module, optimizer: Any, scheduler: Any) -> None:
    from accelerate.utils import gather_object

    # Every process's torch RNG (dropout) goes to the main process, which writes the whole checkpoint at once.
    rng = gather_object([torch.get_rng_state().numpy().tobytes()])
    if accelerator.is_main_process:
        opt_tensors, opt_meta = _optimizer_state(optimizer)
        alloc_tensors, rank_pattern = _allocator_state(model)
        with atomic_dir(ckpt_dir) as tmp:
            save_file(_adapter_tensors(model), str(tmp / "adapter.safetensors"))
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
            save_file(alloc_tensors, str(tmp / "allocator.safetensors"))
            save_file({f"rank{r}": torch.frombuffer(bytearray(b), dtype=torch.uint8) for r, b in enumerate(rng)},
                      str(tmp / "rng.safetensors"))
            write_json(tmp / "optimizer.json", opt_meta)
            write_json(tmp / "scheduler.json", scheduler.state_dict())
            write_json(tmp / "state.json", {**st, "fingerprint": fingerprint, "rank_pattern": rank_pattern})
    accelerator.wait_for_everyone()


def _load_checkpoint(ckpt_dir: Path, fingerprint: dict[str, Any], model: nn.Module, optimizer: Any,
                     scheduler: Any, rank: int) -> dict[str, Any]:
    state_file = ckpt_dir / "state.json"
    saved = read_json(state_file)
    old = saved.pop("fingerprint", {})
    # checkpoints from before the packed objective trained one example per prompt
    if isinstance(old.get("config"), dict):
        old["config"].setdefault("objective", "candidates")
        old["config"].setdefault("distill_candidates", 0)  # … and before the candidate-level teacher term options
        old["config"].setdefault("distill_standardize", False)
        old["config"].setdefault("windows_per_user", 0)  # … and before windows_per_user
        old["config"].setdefault("distill_target", "teacher")  # … and before distill_target
        old["config"].setdefault("distill_truth_weight", 0.0)  # … and before distill_truth_weight
        old["config"].setdefault("lora_layers", 0)  # … and before lora_layers
        old["config"].setdefault("popularity_exponent", 0.0)  # … and before the popularity exponents
        old["config"].setdefault("negative_exponent", 0.0)
        old["config"].setdefault("distill_lift", "off")  # … and before distill_lift
    if isinstance(old.get("scoring"), dict):  # … and from before scoring.prior_weight, which was 0 then
        old["scoring"].setdefault("prior_weight", 0.0)
    def flat(d: dict[str, Any]) -> dict[str, Any]:
        return {**{k: v for k, v in d.items() if k != "config"},
                **{f"config.{k}": v for k, v in (d.get("config") or {}).items()}}

    old_f, new_f = flat(old), flat(fingerprint)
    # The process count may change between runs (data order and results do not depend on it).
    diff = sorted(k for k in set(old_f) | set(new_f) if k != "processes" and old_f.get(k) != new_f.get(k))
    if diff:
        raise ConfigError(f"out_dir holds a checkpoint of a different stage-2 run (differs in: {', '.join(diff)}); "
                          "use another out_dir or delete the checkpoint folder", file=state_file, field="finetune")
    rank_pattern = saved.pop("rank_pattern", None)
    _load_adapter_tensors(model, load_file(str(ckpt_dir / "adapter.safetensors")), ckpt_dir)
    _load_optimizer_state(optimizer, load_file(str(ckpt_dir / "optimizer.safetensors")),
                          read_json(ckpt_dir / "optimizer.json"))
    scheduler.load_state_dict(read_json(ckpt_dir / "scheduler.json"))
    _load_allocator_state(model, load_file(str(ckpt_dir / "allocator.safetensors")), rank_pattern)
    rng = load_file(str(ckpt_dir / "rng.safetensors"))
    # Same process count: exact continuation. Otherwise reuse rank 0's stream offset by rank (documented).
    key = f"rank{rank}" if f"rank{rank}" in rng else "rank0"
    torch.set_rng_state(rng[key].clone())
    if key != f"rank{rank}":
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())) + rank)
    return saved


__all__ = ["CPU", "CPU_LONG", "PAPER", "PROFILES", "FinetuneConfig", "finetune", "load_adapter",
           "orthogonal_regularizer", "peft_config", "resolve_target_modules", "train_examples"]
