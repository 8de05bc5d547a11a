"""Evaluation on frozen candidate sets: LLM scoring, metrics, per-example predictions, and safe comparison.

Every model is ranked within the same saved 20-item candidate sets (target + 19 unseen negatives). The LLM scores
each candidate title by its whole-title log-likelihood (`TitleScorer`), so every output is a valid candidate
(ValidRatio = 1 by construction). Results carry the candidate file's content hash; `compare` refuses to put side
by side numbers that were computed on different candidates.

Under ``accelerate launch``/``torchrun`` the rows are sharded across processes and gathered back in order.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from delrec.data.candidates import CandidateSet
from delrec.data.dataset import SeqDataset
from delrec.data.splits import Example
from delrec.errors import ConfigError, DataError, DelrecError
from delrec.io import atomic_path
from delrec.metrics import ranks_from_scores, summarize

if TYPE_CHECKING:
    from accelerate import PartialState

    from delrec.llm.backbone import Backbone
    from delrec.llm.prompts import ScoringConfig
    from delrec.llm.scoring import TitleScorer
    from delrec.llm.soft_prompt import SoftPrompt


@dataclass
class EvalResult:
    """Ranks of the targets within one candidate file, their metrics and provenance."""

    ranks: np.ndarray  # [N] 1-based rank of each target among its C candidates (pessimistic ties)
    metrics: dict[str, dict[str, float]]  # delrec.metrics.summarize: {"HR@1": {"value", "lo", "hi"}, ...}
    candidate_hash: str  # CandidateSet.hash() of the candidates the ranks refer to
    seconds: float = 0.0  # wall time of the scoring
    scores: np.ndarray | None = None  # [N, C] candidate scores (kept for predictions; not serialised)
    valid_ratio: float = 1.0  # share of outputs that name a candidate; 1 for likelihood scoring

    @property
    def n(self) -> int:
        return len(self.ranks)

    def to_dict(self, with_ranks: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"n": self.n, "candidate_hash": self.candidate_hash, "metrics": self.metrics,
                               "valid_ratio": self.valid_ratio, "seconds": round(self.seconds, 3)}
        if with_ranks:
            out["ranks"] = self.ranks.astype(int).tolist()
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalResult:
        return cls(ranks=np.asarray(d.get("ranks", []), dtype=np.int64), metrics=d["metrics"],
                   candidate_hash=str(d["candidate_hash"]), seconds=float(d.get("seconds", 0.0)),
                   valid_ratio=float(d.get("valid_ratio", 1.0)))


def evaluate_scores(scores: np.ndarray, candidates: CandidateSet, seconds: float = 0.0) -> EvalResult:
    """[N, C] scores aligned with ``candidates.items`` → ranks and HR@1/HR@5/NDCG@5 (with bootstrap CIs)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != candidates.items.shape:
        raise DelrecError(f"scores have shape {scores.shape} but the candidates {candidates.items.shape}",
                          field="scores")
    if not np.isfinite(scores).all():
        raise DelrecError("scores contain NaN or infinite values", field="scores")
    ranks = ranks_from_scores(scores, candidates.target_pos)
    return EvalResult(ranks=ranks, metrics=summarize(ranks), candidate_hash=candidates.hash(), seconds=seconds,
                      scores=scores)


def item_counts(train_sequences: Sequence[np.ndarray], n_items: int) -> np.ndarray:
    """[n_items + 1] interactions of each item in ``train_sequences`` (a split's training sequences: never a
    validation or test target)."""
    return np.bincount(np.concatenate([np.asarray(s, dtype=np.int64) for s in train_sequences]),
                       minlength=n_items + 1)


def popularity_scores(train_sequences: Sequence[np.ndarray], items: np.ndarray, n_items: int) -> np.ndarray:
    """[N, C] training-interaction counts of each candidate: the popularity baseline every model must beat.

    Counts come from the training sequences only (never a validation or test target); ties are ranked
    pessimistically by `ranks_from_scores`, like every other model's.
    """
    return item_counts(train_sequences, n_items)[np.asarray(items, dtype=np.int64)].astype(np.float64)


def chance_metrics(size: int) -> dict[str, float]:
    """Expected HR@1, HR@5, NDCG@5 of a uniformly random ranking of ``size`` candidates."""
    k = min(5, size)
    return {"HR@1": 1 / size, "HR@5": k / size,
            "NDCG@5": float(sum(1 / np.log2(r + 1) for r in range(1, k + 1)) / size)}


# --- LLM scoring ---------------------------------------------------------------------------------------------------
def lsr_inputs(dataset: SeqDataset, histories: Sequence[np.ndarray], cand_items: np.ndarray, domain: str,
               teacher_name: str, history_len: int | None, *, soft_prompt: bool = True, year: str = "keep",
               verbalizer: str = "title") -> tuple[list[str], list[list[str]]]:
    """Stage-2 (LSR) prompts and scored candidate titles for a batch: B histories, [B, C] candidate items.

    ``soft_prompt=False`` leaves the soft-prompt slot out of the text (the "no soft prompt" ablation); ``year`` is
    `ScoringConfig.year`, ``verbalizer`` `ScoringConfig.verbalizer`. A thin wrapper of
    `delrec.llm.prompts.render_lsr`, the one LSR renderer.
    """
    from delrec.llm.prompts import render_lsr, title_views

    return render_lsr(title_views(dataset, year), domain, teacher_name, histories, cand_items, history_len,
                      soft_prompt=soft_prompt, verbalizer=verbalizer)


def histories_for(candidates: CandidateSet, examples: Sequence[Example]) -> list[np.ndarray]:
    """The history of each candidate row, looked up by (user, target) among ``examples`` (e.g. split.examples)."""
    by_key = {(ex.user, ex.target): ex.history for ex in examples}
    out = []
    for r, (u, t) in enumerate(zip(candidates.users.tolist(), candidates.targets.tolist(), strict=True)):
        hist = by_key.get((u, t))
        if hist is None:
            raise DataError(f"candidate row {r} (user {u}, target {t}) matches no example of this split; "
                            "were the candidates drawn for another split or dataset?", line=r + 1, field="user")
        out.append(hist)
    return out


def score_candidates(scorer: TitleScorer, dataset: SeqDataset, candidates: CandidateSet,
                     histories: Sequence[np.ndarray], domain: str, teacher_name: str, history_len: int,
                     batch_size: int, state: PartialState | None = None, desc: str = "evaluate",
                     soft_prompt: bool = True, year: str = "keep", verbalizer: str = "title",
                     prior_weight: float = 0.0) -> np.ndarray:
    """Score every candidate row with ``scorer`` (no grad) → [N, C], sharded over processes.

    ``prior_weight`` λ > 0 subtracts λ × each candidate's score after the row's prompt with an empty history
    (`ScoringConfig.prior_weight`; `delrec.llm.scoring.prior_scores`).

    Rows are ordered by prompt length before batching (less padding); each process takes every k-th batch-sized
    slice of that order and the gathered scores are put back in row order, so the result does not depend on the
    number of processes (up to float round-off).
    """
    n = len(candidates)
    if len(histories) != n:
        raise DelrecError(f"{len(histories)} histories for {n} candidate rows", field="histories")
    if batch_size < 1:
        raise DelrecError(f"batch size must be at least 1, got {batch_size}", field="evaluate.batch_size")
    if isinstance(prior_weight, str):
        raise ConfigError(f"scoring.prior_weight={prior_weight} is chosen on the validation users "
                          "(`validation_metrics`); pass the chosen number here", field="scoring.prior_weight")
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    prompts, cands = lsr_inputs(dataset, histories, candidates.items, domain, teacher_name, history_len,
                                soft_prompt=soft_prompt, year=year, verbalizer=verbalizer)
    order = np.argsort([len(p) + sum(len(c) for c in cs) for p, cs in zip(prompts, cands, strict=True)],
                       kind="stable")
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    mine = batches[rank::world]
    rows: list[np.ndarray] = []
    parts: list[np.ndarray] = []
    model = getattr(scorer.backbone, "model", None) if hasattr(scorer, "backbone") else None
    was_training = bool(getattr(model, "training", False))
    if model is not None:
        model.eval()
    try:
        with torch.no_grad():
            for b in tqdm(mine, desc=desc, disable=None if rank == 0 else True, leave=False):
                s = scorer.score([prompts[i] for i in b], [cands[i] for i in b])
                rows.append(b)
                parts.append(s.detach().float().cpu().numpy())
    finally:
        if model is not None and was_training:
            model.train()
    c = candidates.size
    local_rows = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    local = np.concatenate(parts) if parts else np.zeros((0, c), dtype=np.float32)
    if world > 1:
        from accelerate.utils import gather_object

        gathered = gather_object([(local_rows, local)])
        local_rows = np.concatenate([r for r, _ in gathered])
        local = np.concatenate([s for _, s in gathered])
    out = np.full((n, c), np.nan, dtype=np.float64)
    out[local_rows] = local
    if prior_weight:
        out -= prior_weight * candidate_priors(scorer, dataset, candidates, domain, teacher_name, history_len,
                                               soft_prompt=soft_prompt, year=year, verbalizer=verbalizer)
    return out


def candidate_priors(scorer: TitleScorer, dataset: SeqDataset, candidates: CandidateSet, domain: str,
                     teacher_name: str, history_len: int, *, soft_prompt: bool = True, year: str = "keep",
                     verbalizer: str = "title") -> np.ndarray:
    """[N, C] each candidate's score after its row's prompt with an empty history (`ScoringConfig.prior_weight`).

    Every process computes the whole matrix (one score per distinct item under the unlisted verbalizers, a small
    share of the rows' cost), so all of them calibrate alike."""
    from delrec.llm.scoring import prior_scores

    empty = [np.zeros(0, dtype=np.int64)] * len(candidates)
    prompts, cands = lsr_inputs(dataset, empty, candidates.items, domain, teacher_name, history_len,
                                soft_prompt=soft_prompt, year=year, verbalizer=verbalizer)
    return prior_scores(scorer, prompts, cands).astype(np.float64)


def validation_metrics(scorer: TitleScorer, dataset: SeqDataset, candidates: CandidateSet,
                       histories: Sequence[np.ndarray], domain: str, teacher_name: str, history_len: int,
                       batch_size: int, *, scoring: ScoringConfig, metric: str = "NDCG@5",
                       state: PartialState | None = None, soft_prompt: bool = True,
                       desc: str = "validate") -> dict[str, Any]:
    """Model-selection metrics of the rows (HR@1, HR@5, NDCG@5 means and the mean target rank).

    With ``scoring.prior_weight="auto"`` they are those of the λ of `delrec.metrics.PRIOR_GRID` that ranks these rows
    best by ``metric``, given as ``prior_weight``, with every λ's ``metric`` under ``by_prior`` — the caller keeps
    the checkpoint and its λ together."""
    from delrec.metrics import choose_prior_weight, prior_record

    auto = scoring.prior_weight == "auto"
    kw: dict[str, Any] = {"soft_prompt": soft_prompt, "year": scoring.year, "verbalizer": scoring.verbalizer}
    scores = score_candidates(scorer, dataset, candidates, histories, domain, teacher_name, history_len, batch_size,
                              state=state, desc=desc, prior_weight=0.0 if auto else float(scoring.prior_weight),
                              **kw)
    if not auto:
        ranks = ranks_from_scores(scores, candidates.target_pos)
        return {**{k: v["value"] for k, v in summarize(ranks, ci=False).items()}, "mean_rank": float(ranks.mean())}
    prior = candidate_priors(scorer, dataset, candidates, domain, teacher_name, history_len, **kw)
    lam, table = choose_prior_weight(scores, prior, candidates.target_pos, metric)
    return {**table[lam], **prior_record(lam, table, metric)}


def evaluate_llm(backbone: Backbone, soft_prompt: SoftPrompt | None, dataset: SeqDataset, candidates: CandidateSet,
                 domain: str, teacher_name: str, history_len: int, batch_size: int,
                 histories: Sequence[np.ndarray], *, state: PartialState | None = None,
                 scoring: ScoringConfig | None = None) -> EvalResult:
    """Rank each frozen candidate set with the LLM (backbone + optional soft prompt + optional adapter).

    ``histories[r]`` is the chronological item history of candidate row ``r`` (see `histories_for`).
    ``soft_prompt=None`` is the "no soft prompt" ablation; a backbone without adapter is "no stage 2".
    Runs sharded when launched with several processes (``state`` defaults to accelerate's `PartialState`).
    ``scoring``: how titles are shown and scored (`ScoringConfig`; None = its defaults).
    """
    from delrec.llm.prompts import ScoringConfig

    scoring = scoring or ScoringConfig()
    if state is None:
        from accelerate import PartialState

        state = PartialState(cpu=str(getattr(backbone, "device", "cpu")).startswith("cpu"))
    start = time.perf_counter()
    scorer = scoring.scorer(backbone, soft_prompt)
    scores = score_candidates(scorer, dataset, candidates, histories, domain, teacher_name, history_len,
                              batch_size, state=state, soft_prompt=soft_prompt is not None, year=scoring.year,
                              verbalizer=scoring.verbalizer, prior_weight=scoring.prior_weight)
    return evaluate_scores(scores, candidates, seconds=time.perf_counter() - start)


# --- artifacts and comparison --------------------------------------------------------------------------------------
def save_predictions(path: str | Path, result: EvalResult, dataset: SeqDataset, candidates: CandidateSet,
                     top_k: int = 10) -> Path:
    """Per-example Parquet: user, target, rank of the target and the ``top_k`` candidates by score (atomic)."""
    if result.candidate_hash != candidates.hash():
        raise DelrecError(f"result was computed on candidates {result.candidate_hash}, not {candidates.hash()}",
                          field="candidates")
    n = len(candidates)
    if result.scores is not None:
        top = np.argsort(-result.scores, axis=1, kind="stable")[:, :top_k]
        top_items = np.take_along_axis(candidates.items, top, axis=1)
    else:
        top_items = np.zeros((n, 0), dtype=np.int64)
    df = pd.DataFrame({
        "user": candidates.users,
        "user_id": [dataset.user_ids[int(u)] for u in candidates.users],
        "target": candidates.targets,
        "target_title": [dataset.titles[int(t)] for t in candidates.targets],
        "rank": result.ranks.astype(np.int64),
        "top_items": list(top_items.astype(np.int64)),
        "top_titles": [[dataset.titles[int(i)] for i in row] for row in top_items],
    })
    path = Path(path)
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return path


def compare(results: dict[str, EvalResult]) -> pd.DataFrame:
    """One row per model (value and 95% CI of each metric); refuses results from different candidate files."""
    if not results:
        raise DelrecError("nothing to compare", field="results")
    hashes = {name: r.candidate_hash for name, r in results.items()}
    if len(set(hashes.values())) > 1:
        listing = ", ".join(f"{k}={v}" for k, v in hashes.items())
        raise DelrecError(f"results were computed on different candidate files ({listing}); evaluate every "
                          "model on the same frozen candidates", field="candidates")
    rows: dict[str, dict[str, Any]] = {}
    for name, r in results.items():
        row: dict[str, Any] = {"n": r.n}
        for metric, entry in r.metrics.items():
            row[metric] = entry["value"]
            if "lo" in entry:
                row[f"{metric} lo"], row[f"{metric} hi"] = entry["lo"], entry["hi"]
        row["valid_ratio"] = r.valid_ratio
        row["candidate_hash"] = r.candidate_hash
        rows[name] = row
    return pd.DataFrame.from_dict(rows, orient="index")


__all__ = [
    "EvalResult",
    "candidate_priors",
    "chance_metrics",
    "compare",
    "evaluate_llm",
    "evaluate_scores",
    "histories_for",
    "lsr_inputs",
    "popularity_scores",
    "save_predictions",
    "score_candidates",
    "validation_metrics",
]
