"""Stage 1: distil the teacher's sequential pattern into a soft prompt on a frozen LLM (delrec-method.md §3, §12).

Two auxiliary tasks train the same soft prompt, in lock-step batches:

- Temporal Analysis (TA, `build_ta_examples`): recover a masked most-recent item from the item that follows it.
- Recommendation Pattern Simulating (RPS, `build_rps_examples`): predict the teacher's top-1 from its top-2..k;
  or (``rps_form=ranking``, `build_rps_ranking`) rank a next-item candidate set as the teacher does.

Each task's loss is the cross-entropy of the target over the candidates' title log-likelihoods
(`delrec.llm.scoring.TitleScorer`); the two losses are combined with the inverse-gradient-norm weights of
`dynamic_weights` (or fixed weights). Only the soft prompt trains. Validation ranks the validation users' frozen
candidate sets with the stage-2 (LSR) prompt; the best soft prompt by ``select_metric`` is kept.

Deviations from the released code, on purpose: AdamW instead of PagedLion8bit (bitsandbytes' Lion is not available
on CPU); gradient clipping every step (the code clipped every 4th); whole-title likelihood instead of the
first-sub-token verbalizer; the LLM runs in eval mode (no dropout) since it is frozen.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from delrec.data.candidates import CandidateSet, draw_candidates
from delrec.data.dataset import SeqDataset
from delrec.data.splits import Example, Split
from delrec.errors import ConfigError, DataError
from delrec.io import atomic_dir, read_json, write_json
from delrec.llm.backbone import Backbone
from delrec.llm.prompts import (
    ScoringConfig,
    candidate_labels,
    domain_words,
    packed_titles,
    rps_head,
    rps_prompt,
    ta_prompt,
    title_views,
    truncate_history,
)
from delrec.llm.prompts import render_lsr as prompts_lsr
from delrec.llm.scoring import TitleScorer, prior_scores, ranking_loss, soft_targets
from delrec.llm.soft_prompt import SoftPrompt, SoftPromptConfig
from delrec.metrics import choose_prior_weight, hit_rate, ndcg, prior_record, ranks_from_scores
from delrec.teachers import SeqRecommender
from delrec.teachers import score_candidates as teacher_scores

TASKS = ("ta", "rps")
RPS_FORMS = ("candidates", "sequence", "ranking")
TA_MIN_LEN = 6  # items 1-4 feed the demo; the query needs items 4..n-2 (≥ 1 item), the masked n-1 and the given n
LogFn = Callable[[str, float, int], None]


@dataclass
class DistillConfig:
    """Stage-1 settings; defaults are the released code's where it has one (delrec-method.md §3.4)."""

    tasks: list[str] = field(default_factory=lambda: ["ta", "rps"], metadata={
        "help": "auxiliary tasks: ta, rps, or both (ablations use one)"})
    weighting: str = field(default="dynamic", metadata={"help": "dynamic (inverse gradient norm, §3.4) | fixed"})
    alpha: float = field(default=0.5, metadata={"help": "exponent of the dynamic weighting"})
    fixed_weights: tuple[float, float] = field(default=(0.5, 0.5), metadata={
        "help": "(TA, RPS) weights when weighting=fixed"})
    lr: float = field(default=5e-3, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=1e-5, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=400, metadata={"help": "linear warm-up steps"})
    total_steps: int = field(default=800, metadata={"help": "steps of the linear schedule (lr reaches 0)"})
    max_steps: int | None = field(default=None, metadata={
        "help": "stop after this many steps (None: total_steps; 0: no training, the soft prompt stays at its "
                "initialisation: the untrained-soft-prompt control)"})
    batch_size: int = field(default=20, metadata={"help": "examples per task per step"})
    micro_batch_size: int = field(default=4, metadata={
        "help": "examples per forward pass (gradients are accumulated; bounds memory, not the result)"})
    grad_clip: float = field(default=2.0, metadata={"help": "max gradient norm (0: no clipping)"})
    eval_every: int = field(default=50, metadata={"help": "validate and checkpoint every N steps"})
    patience: int = field(default=5, metadata={"help": "stop after N evaluations without improvement (0: never)"})
    select_metric: str = field(default="NDCG@5", metadata={"help": "HR@1 | HR@5 | NDCG@5 used to keep the best"})
    history_len: int = field(default=10, metadata={"help": "most recent N titles shown in a prompt's history"})
    candidate_size: int = field(default=20, metadata={"help": "candidates per example (target included)"})
    teacher_k: int = field(default=10, metadata={
        "help": "teacher top-k used by RPS (top-1 = target); with rps_form=sequence, the roll-out's length"})
    rps_form: str = field(default="candidates", metadata={
        "help": "candidates (paper: the teacher's top-1 among its top-k + random items) | sequence (the history, "
                "then the teacher's greedy teacher_k-step roll-out, each step scored as the next entry in one pass; "
                "needs scoring.verbalizer=next) | ranking (a training prefix's next item + random items on the "
                "stage-2 prompt; the target is the teacher's softmax over them: its whole ranking, not its argmax)"})
    rps_temperature: float = field(default=1.0, metadata={
        "help": "rps_form=ranking: temperature of the teacher's softmax over the candidates"})
    rps_standardize: bool = field(default=False, metadata={
        "help": "rps_form=ranking: z-score each row's candidate scores, the teacher's and the LM's, before the "
                "softmax (logit standardisation), so the loss compares orderings, not the two models' scales"})
    seed: int = field(default=1234, metadata={"help": "seed of example building, data order and init"})
    train_examples: int | None = field(default=None, metadata={"help": "cap on examples per task (None: all)"})
    eval_examples: int | None = field(default=200, metadata={"help": "cap on validation users (None: all)"})
    domain: str | None = field(default=None, metadata={"help": "prompt wording; None: the dataset's domain"})

    def validate(self) -> DistillConfig:
        def bad(name: str, msg: str) -> ConfigError:
            return ConfigError(msg, field=f"distill.{name}")

        if self.rps_form not in RPS_FORMS:
            raise bad("rps_form", f"must be one of {', '.join(RPS_FORMS)}, got {self.rps_form!r}")
        if not (self.rps_temperature > 0 and math.isfinite(self.rps_temperature)):
            raise bad("rps_temperature", f"must be a finite number > 0, got {self.rps_temperature!r}")
        if self.rps_form != "ranking" and (self.rps_standardize or self.rps_temperature != 1.0):
            name = "rps_standardize" if self.rps_standardize else "rps_temperature"
            raise bad(name, f"applies to rps_form=ranking only (rps_form is {self.rps_form})")
        if not self.tasks or any(t not in TASKS for t in self.tasks) or len(set(self.tasks)) != len(self.tasks):
            raise bad("tasks", f"must be a non-empty subset of {list(TASKS)}, got {self.tasks!r}")
        if self.weighting not in ("dynamic", "fixed"):
            raise bad("weighting", f"must be dynamic or fixed, got {self.weighting!r}")
        if not (self.alpha >= 0 and math.isfinite(self.alpha)):
            raise bad("alpha", f"must be a finite number >= 0, got {self.alpha!r}")
        if len(self.fixed_weights) != 2 or any(not (w >= 0) for w in self.fixed_weights):
            raise bad("fixed_weights", f"must be two non-negative numbers, got {self.fixed_weights!r}")
        if not self.lr > 0:
            raise bad("lr", f"must be > 0, got {self.lr!r}")
        if self.weight_decay < 0:
            raise bad("weight_decay", f"must be >= 0, got {self.weight_decay!r}")
        for name in ("total_steps", "batch_size", "micro_batch_size", "eval_every", "history_len", "teacher_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise bad(name, f"must be a positive integer, got {v!r}")
        if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps <= self.total_steps:
            raise bad("warmup_steps", f"must be an integer in [0, total_steps], got {self.warmup_steps!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or
                                           not 0 <= self.max_steps <= self.total_steps):
            raise bad("max_steps", f"must be in [0, total_steps={self.total_steps}], got {self.max_steps!r}")
        if self.grad_clip < 0:
            raise bad("grad_clip", f"must be >= 0, got {self.grad_clip!r}")
        if not isinstance(self.patience, int) or self.patience < 0:
            raise bad("patience", f"must be an integer >= 0, got {self.patience!r}")
        if self.select_metric not in ("HR@1", "HR@5", "NDCG@5"):
            raise bad("select_metric", f"must be HR@1, HR@5 or NDCG@5, got {self.select_metric!r}")
        if not isinstance(self.candidate_size, int) or self.candidate_size < 2:
            raise bad("candidate_size", f"must be an integer >= 2, got {self.candidate_size!r}")
        if "rps" in self.tasks and self.rps_form == "candidates" and self.teacher_k > self.candidate_size:
            raise bad("teacher_k", f"teacher top-{self.teacher_k} cannot fit {self.candidate_size} candidates")
        for name in ("train_examples", "eval_examples"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise bad(name, f"must be a positive integer or null, got {v!r}")
        if self.domain is not None:
            domain_words(self.domain)
        return self

    @property
    def steps(self) -> int:
        return self.max_steps if self.max_steps is not None else self.total_steps


# --- examples ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TAExample:
    """One Temporal Analysis example; all fields are item indices of one training sequence s = s1..sn."""

    user: int
    demo_history: np.ndarray  # s1, s2
    demo_answer: int  # s3, masked as [M] in the demo (its answer is shown)
    demo_next: int  # s4, the item after [M]
    history: np.ndarray  # s4..s(n-2)
    target: int  # s(n-1), masked as [X]; the label
    next_item: int  # sn, the item after [X]
    candidates: np.ndarray  # [C] target + negatives outside the user's sequence, shuffled

    @property
    def target_pos(self) -> int:
        return int(np.flatnonzero(self.candidates == self.target)[0])


@dataclass(frozen=True)
class RPSExample:
    """One Recommendation Pattern Simulating example: the teacher's top-1 is the label."""

    user: int
    history: np.ndarray  # the whole training sequence
    target: int  # teacher top-1
    teacher_rest: np.ndarray  # teacher top-2..k, shown in the prompt
    candidates: np.ndarray  # [C] teacher top-k + negatives outside the history, shuffled

    @property
    def target_pos(self) -> int:
        return int(np.flatnonzero(self.candidates == self.target)[0])


def _negatives(rng: np.random.Generator, n_items: int, exclude: set[int], k: int, what: str) -> list[int]:
    """``k`` distinct items in 1..n_items outside ``exclude`` (rejection sampling: histories are short)."""
    if n_items - len(exclude) < k:
        raise ConfigError(f"{what}: only {n_items - len(exclude)} items outside the user's history, cannot draw "
                          f"{k} negatives", field="distill.candidate_size")
    seen, out = set(exclude), []
    while len(out) < k:
        for x in rng.integers(1, n_items + 1, size=2 * (k - len(out)) + 8).tolist():
            if x not in seen:
                seen.add(x)
                out.append(x)
                if len(out) == k:
                    break
    return out


def build_ta_examples(split: Split, dataset: SeqDataset, size: int, rng: np.random.Generator) -> list[TAExample]:
    """TA examples from the training sequences (§3.2, §12.3), one per training user with ≥ 6 items.

    With s = s1..sn: demo = s1, s2, [M] (= s3), then s4; query = s4..s(n-2), [X], then sn; label X = s(n-1).
    Candidates = the label + ``size - 1`` random items the user never interacted with (no duplicates), shuffled.
    "Never interacted with" uses the user's whole sequence, so under a leave-one-out split the held-out validation
    and test items never appear in the user's training prompts, not even as negatives.
    """
    out = []
    for u, seq in zip(split.train_users, split.train_sequences, strict=True):
        if len(seq) < TA_MIN_LEN:
            continue
        target = int(seq[-2])
        neg = _negatives(rng, dataset.n_items, {*dataset.sequences[u].tolist(), target}, size - 1,
                         f"user {int(u)}")
        out.append(TAExample(int(u), seq[0:2].copy(), int(seq[2]), int(seq[3]), seq[3:-2].copy(), target,
                             int(seq[-1]), rng.permutation(np.array([target, *neg], dtype=np.int64))))
    return out


def build_rps_examples(split: Split, dataset: SeqDataset, teacher_topk: np.ndarray, size: int,
                       rng: np.random.Generator, k: int | None = None) -> list[RPSExample]:
    """RPS examples (§3.3, §12.4): ``teacher_topk[i]`` is the teacher's ranking for ``split.train_sequences[i]``.

    History = the training sequence; label = teacher top-1; top-2..k shown; candidates = the teacher's top-k +
    random items outside the user's whole sequence and the top-k (no duplicates) up to ``size``, shuffled.
    """
    topk = np.asarray(teacher_topk)
    seqs = split.train_sequences
    if topk.ndim != 2 or topk.shape[0] != len(seqs):
        raise DataError(f"teacher top-k must be [{len(seqs)} training users, k], got {topk.shape}",
                        field="teacher_topk")
    k = topk.shape[1] if k is None else k
    if k > topk.shape[1]:
        raise ConfigError(f"teacher top-{k} requested but only {topk.shape[1]} predictions per user were given",
                          field="distill.teacher_k")
    if k > size:
        raise ConfigError(f"teacher top-{k} does not fit {size} candidates", field="distill.teacher_k")
    if topk.size and (topk.min() < 1 or topk.max() > dataset.n_items):
        raise DataError(f"teacher predictions must be item indices in 1..{dataset.n_items}", field="teacher_topk")
    out = []
    for i, (u, seq) in enumerate(zip(split.train_users, seqs, strict=True)):
        top = list(dict.fromkeys(int(x) for x in topk[i, :k]))  # de-duplicated, rank order kept
        neg = _negatives(rng, dataset.n_items, {*dataset.sequences[u].tolist(), *top}, size - len(top),
                         f"user {int(u)}")
        out.append(RPSExample(int(u), seq.copy(), top[0], np.array(top[1:], dtype=np.int64),
                              rng.permutation(np.array([*top, *neg], dtype=np.int64))))
    return out


def build_rps_rollouts(split: Split, rollouts: np.ndarray, history_len: int) -> list[tuple[np.ndarray, int]]:
    """Packed RPS (``rps_form=sequence``): per training user, the last ``history_len`` items then the teacher's
    roll-out ``rollouts[i]`` → (items, how many of them are history and not scored)."""
    roll = np.asarray(rollouts)
    seqs = split.train_sequences
    if roll.ndim != 2 or roll.shape[0] != len(seqs):
        raise DataError(f"teacher roll-outs must be [{len(seqs)} training users, k], got {roll.shape}",
                        field="teacher_topk")
    out = []
    for seq, r in zip(seqs, roll, strict=True):
        hist = seq[-history_len:]
        out.append((np.concatenate([hist, r]).astype(np.int64), len(hist)))
    return out


def build_rps_ranking(split: Split, dataset: SeqDataset, teacher: SeqRecommender, size: int, seed: int,
                      cap: int | None, temperature: float = 1.0, standardize: bool = False
                      ) -> tuple[list[Example], CandidateSet, np.ndarray]:
    """Ranking RPS (``rps_form=ranking``): every prefix of every training sequence (seeded ``cap``), its next item
    + ``size - 1`` negatives outside the user's sequence, as stage 2 sees them, and the teacher's softmax over
    those candidates (``[N, size]`` float32 rows; of z-scored scores with ``standardize``) as the target."""
    examples = _cap(split.examples("train", sliding=True), cap, seed)
    cands = draw_candidates(examples, dataset, size=size, seed=seed)
    logits = torch.as_tensor(teacher_scores(teacher, [ex.history for ex in examples], cands.items)).double()
    return examples, cands, soft_targets(logits, temperature, standardize).float().numpy()


# --- rendering examples into (prompt, candidate titles, target column) ------------------------------------------
# Candidate tasks: (prompts, candidate titles, target column or [N, C] target distribution); sequence tasks: (heads,
# item titles, skips).
Rendered = tuple[list[str], list[list[str]], np.ndarray]


def render_rps_rollouts(examples: Sequence[tuple[np.ndarray, int]], dataset: SeqDataset, teacher: str,
                        domain: str | None = None, soft_prompt: bool = True, year: str = "keep") -> Rendered:
    titles = packed_titles(title_views(dataset, year), [items for items, _ in examples], "RPS")
    head = rps_head(domain or dataset.domain, teacher, soft_prompt=soft_prompt)
    return [head] * len(examples), titles, np.array([skip for _, skip in examples], dtype=np.int64)


def render_ta(examples: Sequence[TAExample], dataset: SeqDataset, teacher: str, history_len: int,
              domain: str | None = None, soft_prompt: bool = True, year: str = "keep",
              verbalizer: str = "title") -> Rendered:
    dom = domain or dataset.domain
    v = title_views(dataset, year)
    shown = v.shown
    prompts, cands = [], []
    for ex in examples:
        prompts.append(ta_prompt(dom, teacher, [shown[int(i)] for i in ex.demo_history], shown[ex.demo_answer],
                                 shown[ex.demo_next], truncate_history([shown[int(i)] for i in ex.history],
                                                                        history_len),
                                 shown[ex.next_item], [shown[int(i)] for i in ex.candidates],
                                 soft_prompt=soft_prompt, verbalizer=verbalizer))
        cands.append(candidate_labels([v.scored[int(i)] for i in ex.candidates], verbalizer))
    return prompts, cands, np.array([ex.target_pos for ex in examples], dtype=np.int64)


def render_rps(examples: Sequence[RPSExample], dataset: SeqDataset, teacher: str, history_len: int,
               domain: str | None = None, soft_prompt: bool = True, year: str = "keep",
               verbalizer: str = "title") -> Rendered:
    dom = domain or dataset.domain
    v = title_views(dataset, year)
    shown = v.shown
    prompts, cands = [], []
    for ex in examples:
        prompts.append(rps_prompt(dom, teacher, truncate_history([shown[int(i)] for i in ex.history], history_len),
                                  [shown[int(i)] for i in ex.candidates], [shown[int(i)] for i in ex.teacher_rest],
                                  soft_prompt=soft_prompt, verbalizer=verbalizer))
        cands.append(candidate_labels([v.scored[int(i)] for i in ex.candidates], verbalizer))
    return prompts, cands, np.array([ex.target_pos for ex in examples], dtype=np.int64)


def render_lsr(examples: Sequence[Example], candidates: CandidateSet, dataset: SeqDataset, teacher: str,
               history_len: int, domain: str | None = None, soft_prompt: bool = True, year: str = "keep",
               verbalizer: str = "title") -> Rendered:
    """LSR prompts for next-item examples with their frozen candidate rows (row r belongs to examples[r])."""
    if len(examples) != len(candidates) or any(int(ex.user) != int(u) or int(ex.target) != int(t) for ex, u, t in
                                                zip(examples, candidates.users, candidates.targets, strict=True)):
        raise ConfigError("candidate set does not match the examples (different users or targets)",
                          field="candidates")
    prompts, cands = prompts_lsr(title_views(dataset, year), domain or dataset.domain, teacher,
                                 [ex.history for ex in examples], candidates.items, history_len,
                                 soft_prompt=soft_prompt, verbalizer=verbalizer)
    return prompts, cands, candidates.target_pos


# --- loss weighting ------------------------------------------------------------------------------------------------
def weights_from_grad_norms(norms: Sequence[float] | torch.Tensor, alpha: float) -> torch.Tensor:
    """``w_i = (1/‖g_i‖)^α / Σ_j (1/‖g_j‖)^α``: tasks with smaller gradients get more weight."""
    n = torch.as_tensor(norms, dtype=torch.float64).clamp_min(1e-12)
    r = n.reciprocal() ** alpha
    return (r / r.sum()).float()


def dynamic_weights(losses: Sequence[torch.Tensor], params: Sequence[torch.Tensor], alpha: float = 0.5
                    ) -> torch.Tensor:
    """§3.4's dynamic loss weighting: weights ∝ (1/‖∂L_i/∂θ‖)^α over the shared trainable ``params``.

    Returns detached weights [T] summing to 1 (the released code's factor L_i/L_i.detach() equals 1; its gradient
    is not used here: the weights are constants, as in GradNorm-style inverse-gradient weighting).
    """
    norms = []
    for loss in losses:
        grads = torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
        sq = sum(float(g.detach().double().pow(2).sum()) for g in grads if g is not None)
        norms.append(math.sqrt(sq))
    return weights_from_grad_norms(norms, alpha)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then linear decay to 0 at ``total`` (0-based ``step``)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


# --- evaluation --------------------------------------------------------------------------------------------------
def evaluate_ranking(scorer: TitleScorer, prompts: Sequence[str], candidates: Sequence[Sequence[str]],
                     target_pos: np.ndarray, progress: bool = False,
                     prior: tuple[Sequence[str], float | str] | None = None,
                     metric: str = "NDCG@5") -> dict[str, Any]:
    """HR@1, HR@5, NDCG@5 (means) of the target among its candidates. ``prior``: the rows' prompts with empty
    histories and the weight λ of the candidates' scores after them (`ScoringConfig.prior_weight`); with λ
    ``auto``, the metrics of the grid's best λ by ``metric``, given as ``prior_weight`` (as
    `delrec.evaluate.validation_metrics`)."""
    if not prompts:
        return {}
    scores = scorer.rank(prompts, candidates, progress=progress).astype(np.float64)
    target_pos = np.asarray(target_pos)
    extra: dict[str, Any] = {}
    if prior is not None:
        prior_mat = prior_scores(scorer, prior[0], candidates)
        if prior[1] == "auto":
            lam, table = choose_prior_weight(scores, prior_mat, target_pos, metric)
            extra = prior_record(lam, table, metric)
        else:
            lam = float(prior[1])
        scores = scores - lam * prior_mat
    ranks = ranks_from_scores(scores, target_pos)
    return {"HR@1": float(hit_rate(ranks, 1).mean()), "HR@5": float(hit_rate(ranks, 5).mean()),
            "NDCG@5": float(ndcg(ranks, 5).mean()), **extra}


# --- training ------------------------------------------------------------------------------------------------------
CHECKPOINT_DIR = "checkpoint"
BEST_DIR = "soft_prompt"
HISTORY_FILE = "history.json"
TRAIN_CANDIDATES_DIR = "train_candidates"  # {task}.parquet: each task's training candidate sets, as drawn


def distill(backbone: Backbone, dataset: SeqDataset, split: Split, teacher_topk: np.ndarray | None, teacher_name: str,
            cfg: DistillConfig, out_dir: Path, valid_candidates: CandidateSet | None = None,
            soft_prompt_cfg: SoftPromptConfig | None = None, *, log: LogFn | None = None,
            progress: bool = True, scoring: ScoringConfig | None = None,
            teacher: SeqRecommender | None = None) -> SoftPrompt:
    """Train a soft prompt on the frozen ``backbone`` with TA/RPS; return the best one (also in out_dir/soft_prompt).

    ``teacher_topk[i]``: the teacher's top-k for ``split.train_sequences[i]`` (history items excluded); with
    ``rps_form=sequence`` its greedy roll-out (`delrec.teachers.predict_rollout`). ``teacher``: the trained SR
    model itself, which ``rps_form=ranking`` reads instead (its scores of each example's candidates).
    ``valid_candidates``: frozen candidate rows for ``split.examples("valid")`` (drawn with cfg.seed if None).
    Resumes from ``out_dir/checkpoint`` when present (same config except max_steps/patience). Writes
    ``history.json`` (per-step losses and task weights, evaluations) and ``distill_summary.json``.
    ``log(name, value, step)`` receives every logged scalar (e.g. for TensorBoard). ``scoring``: how titles are
    shown and scored (`ScoringConfig`).
    """
    cfg.validate()
    scoring = scoring or ScoringConfig()
    year, verb = scoring.year, scoring.verbalizer
    scoring.check_candidates(cfg.candidate_size, "distill.candidate_size")
    packed_rps = "rps" in cfg.tasks and cfg.rps_form == "sequence"
    ranking_rps = "rps" in cfg.tasks and cfg.rps_form == "ranking"
    if ranking_rps and teacher is None:
        raise ConfigError("rps_form=ranking needs the trained teacher", field="distill.rps_form")
    if "rps" in cfg.tasks and not ranking_rps and teacher_topk is None:
        raise ConfigError(f"rps_form={cfg.rps_form} needs the teacher's exported top-k", field="distill.rps_form")
    if packed_rps and (verb != "next" or backbone.kind != "causal"):
        raise ConfigError("rps_form=sequence needs scoring.verbalizer=next and a causal LM backbone, got "
                          f"verbalizer {verb!r} on a {backbone.kind} model", field="distill.rps_form")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sp_cfg = dataclasses.replace(soft_prompt_cfg or SoftPromptConfig(), teacher=teacher_name)
    sp_cfg.validate()
    domain = cfg.domain or dataset.domain
    domain_words(domain)
    backbone.freeze()  # stage 1: only the soft prompt trains; eval mode = no dropout in the frozen LM

    # Example sets: each task gets its own RNG stream, so dropping one task (ablation) leaves the other unchanged.
    tasks: dict[str, Rendered] = {}
    train_sets: dict[str, CandidateSet] = {}  # saved below: every candidate set a task trains on
    if "ta" in cfg.tasks:
        ex_ta = _cap(build_ta_examples(split, dataset, cfg.candidate_size, np.random.default_rng([cfg.seed, 1])),
                     cfg.train_examples, cfg.seed)
        tasks["ta"] = render_ta(ex_ta, dataset, teacher_name, cfg.history_len, domain, year=year, verbalizer=verb)
        train_sets["ta"] = _example_sets(ex_ta, cfg.seed)
    if packed_rps:
        tasks["rps"] = render_rps_rollouts(_cap(build_rps_rollouts(split, teacher_topk[:, :cfg.teacher_k],
                                                                   cfg.history_len), cfg.train_examples, cfg.seed),
                                           dataset, teacher_name, domain, year=year)
    elif ranking_rps:
        assert teacher is not None
        ex_rank, cands_rank, probs = build_rps_ranking(split, dataset, teacher, cfg.candidate_size, cfg.seed,
                                                       cfg.train_examples, cfg.rps_temperature, cfg.rps_standardize)
        prompts_rank, titles_rank, _ = render_lsr(ex_rank, cands_rank, dataset, teacher_name, cfg.history_len,
                                                  domain, year=year, verbalizer=verb)
        tasks["rps"] = (prompts_rank, titles_rank, probs)
        train_sets["rps"] = cands_rank
    elif "rps" in cfg.tasks:
        assert teacher_topk is not None
        ex_rps = _cap(build_rps_examples(split, dataset, teacher_topk, cfg.candidate_size,
                                         np.random.default_rng([cfg.seed, 2]), k=cfg.teacher_k),
                      cfg.train_examples, cfg.seed)
        tasks["rps"] = render_rps(ex_rps, dataset, teacher_name, cfg.history_len, domain, year=year,
                                  verbalizer=verb)
        train_sets["rps"] = _example_sets(ex_rps, cfg.seed)
    # rps_standardize: the LM's candidate scores are z-scored (and over the temperature) as the teacher's were
    zscored = {"rps"} if ranking_rps and cfg.rps_standardize else set()
    for name, (prompts, _, _) in tasks.items():
        if not prompts:
            raise DataError(f"no {name.upper()} training examples (TA needs sequences of >= {TA_MIN_LEN} items)",
                            field="distill.tasks")
    # Frozen and saved like the evaluation's sets (they follow from cfg.seed, so a resumed run writes the same).
    train_hashes = {name: cs.save(out_dir / TRAIN_CANDIDATES_DIR / f"{name}.parquet")
                    for name, cs in train_sets.items()}
    valid = _valid_inputs(split, dataset, valid_candidates, teacher_name, cfg, domain, year, verb)
    prior = None  # the same rows with empty histories, when candidates are scored against their prior
    if scoring.prior_weight and valid[0]:
        empty = _valid_inputs(split, dataset, valid_candidates, teacher_name, cfg, domain, year, verb,
                              empty_history=True)
        prior = (empty[0], scoring.prior_weight)

    # State: fresh or resumed.
    soft = SoftPrompt.init_for(backbone, sp_cfg)
    opt = torch.optim.AdamW([soft.weight], lr=cfg.lr, weight_decay=cfg.weight_decay)
    state: dict[str, Any] = {"step": 0, "best": None, "best_step": None, "bad_evals": 0, "stopped_early": False}
    history: dict[str, list[dict[str, Any]]] = {"steps": [], "evals": []}
    ckpt = out_dir / CHECKPOINT_DIR
    if (ckpt / "state.json").is_file():
        state, history = _load_checkpoint(ckpt, cfg, soft, opt, out_dir)  # also restores torch's RNG
    else:
        torch.manual_seed(cfg.seed)
    scorer = scoring.scorer(backbone, soft, batch_size=cfg.micro_batch_size)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=state["step"], desc="stage 1 (distill)", unit="step", disable=None)
    try:
        if cfg.steps == 0 and state["best_step"] is None:  # untrained control: keep (and rank) the initialisation
            _evaluate_and_checkpoint(scorer, soft, opt, valid, prior, cfg, state, history, out_dir, log)
        while state["step"] < cfg.steps and not state["stopped_early"]:
            step = state["step"]
            t0 = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = cfg.lr * lr_factor(step, cfg.warmup_steps, cfg.total_steps)
            losses, grads = {}, {}
            for name, data in tasks.items():
                rows = _batch_rows(len(data[0]), cfg.batch_size, step, cfg.seed, name)
                if name == "rps" and packed_rps:
                    losses[name], grads[name] = _sequence_grad(scorer, data, rows, cfg.micro_batch_size)
                else:
                    z = name in zscored
                    losses[name], grads[name] = _task_grad(scorer, data, rows, cfg.micro_batch_size,
                                                           cfg.rps_temperature if z else 1.0, z)
            names = list(tasks)
            if len(names) == 1:
                w = torch.ones(1)
            elif cfg.weighting == "dynamic":
                w = weights_from_grad_norms([float(grads[n].norm()) for n in names], cfg.alpha)
            else:
                w = torch.tensor([cfg.fixed_weights[TASKS.index(n)] for n in names], dtype=torch.float32)
            soft.weight.grad = sum(float(wi) * grads[n] for wi, n in zip(w, names, strict=True))
            gnorm = float(soft.weight.grad.norm())
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([soft.weight], cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            state["step"] = step = step + 1
            rec: dict[str, Any] = {"step": step, "loss": sum(float(wi) * losses[n] for wi, n in zip(w, names,
                                                                                                     strict=True)),
                                   "lr": opt.param_groups[0]["lr"], "grad_norm": gnorm,
                                   "seconds": round(time.perf_counter() - t0, 4)}
            for wi, n in zip(w, names, strict=True):
                rec[f"loss_{n}"], rec[f"weight_{n}"], rec[f"grad_norm_{n}"] = losses[n], float(wi), \
                    float(grads[n].norm())
            history["steps"].append(rec)
            if log:
                for key, val in rec.items():
                    if key != "step":
                        log(f"stage1/{key}", float(val), step)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{rec[k]:.3f}" for k in rec if k.startswith(("loss", "weight_"))})
            if step % cfg.eval_every == 0 or step == cfg.steps:
                _evaluate_and_checkpoint(scorer, soft, opt, valid, prior, cfg, state, history, out_dir, log)
    finally:
        if bar is not None:
            bar.close()
    write_json(out_dir / HISTORY_FILE, history)
    write_json(out_dir / "distill_summary.json", {
        "steps": state["step"], "best_step": state["best_step"], "best": state["best"],
        "select_metric": cfg.select_metric, "stopped_early": state["stopped_early"], "tasks": list(tasks),
        "train_examples": {n: len(d[0]) for n, d in tasks.items()}, "train_candidates": train_hashes,
        "valid_examples": len(valid[0]),
        "teacher": teacher_name, "config": asdict(cfg), "soft_prompt": asdict(sp_cfg),
        "optimizer": "AdamW (Lion unavailable)"})
    return SoftPrompt.from_pretrained(out_dir / BEST_DIR, device=backbone.device)


def _example_sets(examples: Sequence[TAExample | RPSExample], seed: int) -> CandidateSet:
    """The candidate sets of TA / RPS examples as one `CandidateSet` (the target: each example's label)."""
    return CandidateSet(np.array([ex.user for ex in examples], dtype=np.int64),
                        np.array([ex.target for ex in examples], dtype=np.int64),
                        np.stack([ex.candidates for ex in examples]).astype(np.int64), seed)


def _cap(examples: list[Any], cap: int | None, seed: int) -> list[Any]:
    if cap is None or len(examples) <= cap:
        return examples
    keep = np.sort(np.random.default_rng([seed, 3]).choice(len(examples), cap, replace=False))
    return [examples[i] for i in keep]


def _valid_inputs(split: Split, dataset: SeqDataset, cands: CandidateSet | None, teacher: str,
                  cfg: DistillConfig, domain: str, year: str = "keep", verbalizer: str = "title",
                  empty_history: bool = False) -> Rendered:
    """Stage 1's validation rows (LSR prompts over the frozen candidates); ``empty_history``: the same rows with
    no history, for the candidates' prior (`ScoringConfig.prior_weight`)."""
    examples = split.examples("valid")
    if cands is None:
        cands = draw_candidates(examples, dataset, size=cfg.candidate_size, seed=cfg.seed) if examples else None
    if cands is None or len(cands) == 0:
        return [], [], np.zeros(0, dtype=np.int64)
    # The caller's frozen set may cover a subset of the validation users (e.g. capped): align by user.
    by_user = {ex.user: ex for ex in examples}
    missing = [int(u) for u in cands.users if int(u) not in by_user]
    if missing:
        raise ConfigError(f"validation candidates name user index {missing[0]}, who is not a validation user of "
                          "this split", field="candidates")
    examples = [by_user[int(u)] for u in cands.users]
    if empty_history:
        examples = [Example(ex.user, np.zeros(0, dtype=np.int64), ex.target) for ex in examples]
    rendered = render_lsr(examples, cands, dataset, teacher, cfg.history_len, domain, year=year,
                          verbalizer=verbalizer)
    n = len(rendered[0]) if cfg.eval_examples is None else min(cfg.eval_examples, len(rendered[0]))
    return rendered[0][:n], rendered[1][:n], rendered[2][:n]


def _batch_rows(n: int, batch: int, step: int, seed: int, task: str) -> np.ndarray:
    """Rows of ``step``'s batch: a fresh permutation per epoch, fixed by (seed, task, epoch) so resuming at any step
    replays the same order."""
    tid = TASKS.index(task)
    pos = np.arange(step * batch, (step + 1) * batch)
    epochs, within = pos // n, pos % n
    perms = {int(e): np.random.default_rng([seed, 10 + tid, int(e)]).permutation(n) for e in np.unique(epochs)}
    return np.array([perms[int(e)][i] for e, i in zip(epochs, within, strict=True)], dtype=np.int64)


def _task_grad(scorer: TitleScorer, data: Rendered, rows: np.ndarray, micro: int, temperature: float = 1.0,
               standardize: bool = False) -> tuple[float, torch.Tensor]:
    """Mean cross-entropy of the target (a column, or a distribution over the candidates) over candidate scores for
    ``rows`` (`ranking_loss`), and its gradient w.r.t. the soft prompt (accumulated over micro-batches of ``micro``
    examples). ``temperature``/``standardize``: `ranking_loss`'s (``rps_temperature``/``rps_standardize``)."""
    prompts, cands, target = data
    weight = scorer.soft_prompt.weight  # type: ignore[union-attr]
    grad = torch.zeros_like(weight)
    total = 0.0
    for s in range(0, len(rows), micro):
        r = rows[s:s + micro]
        scores = scorer.score([prompts[i] for i in r], [cands[i] for i in r])  # [m, C]
        y = torch.as_tensor(target[r])
        loss = ranking_loss(scores, y, temperature, standardize, reduction="sum") / len(rows)
        (g,) = torch.autograd.grad(loss, [weight])
        grad += g
        total += float(loss.detach())
    return total, grad


def _sequence_grad(scorer: TitleScorer, data: Rendered, rows: np.ndarray, micro: int
                   ) -> tuple[float, torch.Tensor]:
    """Packed task: mean negative log-likelihood of every scored item of ``rows`` as the next list entry, and its
    gradient w.r.t. the soft prompt (accumulated over micro-batches)."""
    heads, items, skips = data
    weight = scorer.soft_prompt.weight  # type: ignore[union-attr]
    grad = torch.zeros_like(weight)
    n = sum(len(items[i]) - int(skips[i]) for i in rows)
    total = 0.0
    for s in range(0, len(rows), micro):
        r = rows[s:s + micro]
        scores = scorer.sequence_scores([heads[i] for i in r], [items[i] for i in r], [int(skips[i]) for i in r])
        loss = -scores.sum() / n
        (g,) = torch.autograd.grad(loss, [weight])
        grad += g
        total += float(loss.detach())
    return total, grad


def _evaluate_and_checkpoint(scorer: TitleScorer, soft: SoftPrompt, opt: torch.optim.Optimizer, valid: Rendered,
                             prior: tuple[list[str], float | str] | None, cfg: DistillConfig, state: dict[str, Any],
                             history: dict[str, Any], out_dir: Path, log: LogFn | None) -> None:
    step = state["step"]
    metrics = evaluate_ranking(scorer, *valid, prior=prior, metric=cfg.select_metric)
    history["evals"].append({"step": step, **metrics})
    if log:
        for k, v in metrics.items():
            if isinstance(v, int | float):
                log(f"stage1/valid_{k}", v, step)
    value = metrics.get(cfg.select_metric)
    # No validation users: the latest soft prompt is the one kept.
    if value is None or state["best"] is None or value > state["best"]:
        state["best"], state["best_step"], state["bad_evals"] = value, step, 0
        soft.save_pretrained(out_dir / BEST_DIR, extra={"step": step, "valid": metrics})
    else:
        state["bad_evals"] += 1
        if cfg.patience and state["bad_evals"] >= cfg.patience:
            state["stopped_early"] = True
    _save_checkpoint(out_dir / CHECKPOINT_DIR, cfg, soft, opt, state, history)
    write_json(out_dir / HISTORY_FILE, history)


def _resume_key(cfg: DistillConfig) -> dict[str, Any]:
    """The config fields a resumed run must share with the checkpoint (everything that changes the result)."""
    d = asdict(cfg)
    for k in ("max_steps", "patience", "eval_examples", "eval_every"):
        d.pop(k)
    return json.loads(json.dumps(d))


def _save_checkpoint(path: Path, cfg: DistillConfig, soft: SoftPrompt, opt: torch.optim.Optimizer,
                     state: dict[str, Any], history: dict[str, Any]) -> None:
    """soft prompt, AdamW moments and torch's RNG state (safetensors) + step and early-stopping state (JSON).

    Data order and learning rate are functions of the step, so nothing else is needed to resume exactly.
    """
    sd = opt.state_dict()
    tensors = {"soft_prompt": soft.weight.detach().cpu().contiguous(), "torch_rng": torch.get_rng_state(),
               "soft_prompt_scale": soft.scale.detach().cpu().contiguous()}  # a deep prompt's units
    scalars: dict[str, Any] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    meta = {"state": state, "config": _resume_key(cfg), "opt_param_groups": sd["param_groups"],
            "opt_scalars": scalars}
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / "checkpoint.safetensors"))
        write_json(tmp / "state.json", meta)
        write_json(tmp / "history.json", history)


def _load_checkpoint(path: Path, cfg: DistillConfig, soft: SoftPrompt, opt: torch.optim.Optimizer,
                     out_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    meta = read_json(path / "state.json")
    if isinstance(meta.get("config"), dict):  # checkpoints from before packed and ranking RPS
        meta["config"].setdefault("rps_form", "candidates")
        meta["config"].setdefault("rps_temperature", 1.0)
        meta["config"].setdefault("rps_standardize", False)
    if meta.get("config") != _resume_key(cfg):
        raise ConfigError(f"{out_dir} holds a stage-1 checkpoint made with a different configuration; use a new "
                          "output folder or delete the old one", file=path / "state.json", field="distill")
    tensors = load_file(str(path / "checkpoint.safetensors"))
    if tuple(tensors["soft_prompt"].shape) != tuple(soft.weight.shape):
        raise ConfigError(f"{out_dir} holds a stage-1 checkpoint of a soft prompt of shape "
                          f"{list(tensors['soft_prompt'].shape)}, not {list(soft.weight.shape)}; use a new output "
                          "folder or delete the old one", file=path / "checkpoint.safetensors", field="soft_prompt")
    with torch.no_grad():
        soft.weight.copy_(tensors["soft_prompt"].to(soft.weight.device))
        if "soft_prompt_scale" in tensors:
            soft.scale.copy_(tensors["soft_prompt_scale"].to(soft.scale.device))
    opt_state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = v.to(soft.weight.device) if name != "step" else v
    for key, v in meta["opt_scalars"].items():
        pid, name = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": opt_state, "param_groups": meta["opt_param_groups"]})
    torch.set_rng_state(tensors["torch_rng"])
    return meta["state"], read_json(path / "history.json")
