"""Ranking metrics with per-example ranks and bootstrap confidence intervals.

Ranks are 1-based and pessimistic on ties (a candidate scored equal to the target counts as ranked above it), so a
model that scores everything equal gets the worst rank, never the best.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np


def ranks_from_scores(scores: np.ndarray, target_pos: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """[N, C] scores, [N] target columns → [N] 1-based ranks. ``mask`` [N, C] True = excluded from the ranking."""
    scores = np.asarray(scores, dtype=np.float64)
    rows = np.arange(len(scores))
    tgt = scores[rows, target_pos][:, None]
    above = scores >= tgt
    if mask is not None:
        above &= ~mask
    above[rows, target_pos] = False
    return 1 + above.sum(axis=1)


def hit_rate(ranks: np.ndarray, k: int) -> np.ndarray:
    return (np.asarray(ranks) <= k).astype(np.float64)


def ndcg(ranks: np.ndarray, k: int) -> np.ndarray:
    ranks = np.asarray(ranks, dtype=np.float64)
    return np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of per-example ``values``."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return (float("nan"), float("nan"))
    idx = np.random.default_rng(seed).integers(0, len(values), size=(n_boot, len(values)))
    means = values[idx].mean(axis=1)
    return (float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2)))


def summarize(ranks: np.ndarray, hr_ks: Iterable[int] = (1, 5), ndcg_ks: Iterable[int] = (5,),
              ci: bool = True, seed: int = 0) -> dict[str, dict[str, float]]:
    """``{"HR@1": {"value": .., "lo": .., "hi": ..}, ...}`` for the given cut-offs."""
    out: dict[str, dict[str, float]] = {}
    per = [(f"HR@{k}", hit_rate(ranks, k)) for k in hr_ks] + [(f"NDCG@{k}", ndcg(ranks, k)) for k in ndcg_ks]
    for name, vals in per:
        entry = {"value": float(vals.mean()) if len(vals) else float("nan")}
        if ci:
            entry["lo"], entry["hi"] = bootstrap_ci(vals, seed=seed)
        out[name] = entry
    return out


# λ values `ScoringConfig.prior_weight="auto"` chooses from on the validation users (every λ is read off one scoring
# pass of the conditional and the prior scores, so the grid costs nothing more to search).
PRIOR_GRID: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)


def choose_prior_weight(scores: np.ndarray, prior: np.ndarray, target_pos: np.ndarray, metric: str = "NDCG@5",
                        grid: Iterable[float] = PRIOR_GRID) -> tuple[float, dict[float, dict[str, float]]]:
    """The λ of ``grid`` whose ``scores − λ × prior`` rank the targets best by ``metric`` (the smallest λ on a tie:
    calibrate no more than the validation users ask for), and every λ's HR@1, HR@5, NDCG@5 and mean rank."""
    scores, prior = np.asarray(scores, dtype=np.float64), np.asarray(prior, dtype=np.float64)
    if scores.shape != prior.shape:
        raise ValueError(f"scores {scores.shape} and prior {prior.shape} differ in shape")
    table: dict[float, dict[str, float]] = {}
    for lam in grid:
        ranks = ranks_from_scores(scores - lam * prior, target_pos)
        table[float(lam)] = {**{k: v["value"] for k, v in summarize(ranks, ci=False).items()},
                             "mean_rank": float(ranks.mean())}
    if not table:
        raise ValueError("empty grid of prior weights")
    if metric not in next(iter(table.values())):
        raise ValueError(f"unknown metric {metric!r}")
    best = max(table, key=lambda lam: (table[lam][metric], -lam))
    return best, table


def prior_record(lam: float, table: dict[float, dict[str, float]], metric: str) -> dict[str, Any]:
    """What a validation entry records of `choose_prior_weight`'s choice: the λ and every λ's ``metric``."""
    return {"prior_weight": lam, "by_prior": {str(k): v[metric] for k, v in table.items()}}


def format_metric(entry: dict[str, float]) -> str:
    if "lo" in entry:
        return f"{entry['value']:.4f} [{entry['lo']:.3f}, {entry['hi']:.3f}]"
    return f"{entry['value']:.4f}"
