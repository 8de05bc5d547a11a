"""How much of a title's score is its prior: rank validation prefixes by log p(title | history) − λ·log p(title | ∅).

    python benchmarks/prior_weight.py --base runs/beauty-user-w8 --adapter benchmarks/.work/probes/B1-beauty-w8-seq-400

``scoring.prior_weight`` λ subtracts from each candidate's score its score after the same prompt with an empty
history (`delrec.llm.scoring.prior_scores`). This ranks the learning probe's validation rows (``--n-valid`` prefixes
of the validation users' sequences, target + 19 negatives, seed 7 — never a test target) at λ ∈ {0, 0.25, 0.5, 0.75,
1} with the untrained LM and, given ``--adapter`` (a learning-probe folder), with its stage-2 adapter — both with its
own prior and with the untrained LM's. Conditional and prior scores are computed once each, so the grid is free.
``--popularity`` adds two families that bring the items' training counts back: the LM's prior *swapped* for the
count prior (score − λ·(prior − log(count + 1)); at λ = 1, log p(history | title) + log p(title) by Bayes, with the
title's wording taken out but its popularity kept) and the count prior simply *added* (score + μ·log(count + 1)).
Results are merged by ``--name`` into ``benchmarks/results/prior_weight.json`` and the table ``prior_weight.md``;
the score matrices are kept in ``benchmarks/.work/prior_weight/<name>.npz``.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from delrec.io import read_json, write_json, write_text

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "prior_weight.json"
GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="a run folder with data and a user split")
    ap.add_argument("--adapter", type=Path, default=None, help="a learning-probe folder with a stage-2 adapter")
    ap.add_argument("--name", default=None, help="the result's key (default: the base folder's name)")
    ap.add_argument("--n-valid", type=int, default=256)
    ap.add_argument("--popularity", action="store_true", help="also the rows that bring the training counts back")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from delrec.data import draw_candidates
    from delrec.evaluate import score_candidates
    from delrec.finetune import ADAPTER_DIR, load_adapter
    from delrec.llm.backbone import Backbone
    from delrec.metrics import ranks_from_scores, summarize
    from delrec.pipeline import TEACHER_NAMES, Run, profile
    from learning_probe import popularity_scores, valid_examples

    run = Run(args.base, log=lambda s: None)
    ds, split = run.dataset, run.split
    scoring = profile("cpu").scoring  # the next verbalizer, summed title log-likelihoods
    teacher = TEACHER_NAMES[run.cfg.teachers.distill_from]
    vex = valid_examples(split, args.n_valid)
    vc = draw_candidates(vex, ds, size=20, seed=7)
    hist = [e.history for e in vex]
    empty = [np.zeros(0, dtype=np.int64) for _ in vex]

    def scores(backbone: Any) -> tuple[np.ndarray, np.ndarray]:
        scorer = scoring.scorer(backbone, None)
        kw = dict(soft_prompt=False, year=scoring.year, verbalizer=scoring.verbalizer)
        return (score_candidates(scorer, ds, vc, hist, ds.domain, teacher, 10, 4, **kw),
                score_candidates(scorer, ds, vc, empty, ds.domain, teacher, 10, 4, **kw))

    def metrics(s: np.ndarray) -> dict[str, float]:
        ranks = ranks_from_scores(s, vc.target_pos)
        return {**{k: round(v["value"], 4) for k, v in summarize(ranks, ci=False).items()},
                "mean_rank": round(float(ranks.mean()), 3)}

    t0 = time.perf_counter()
    backbone = Backbone.load(run.cfg.backbone)
    cond0, prior0 = scores(backbone)
    rows: dict[str, dict[str, float]] = {"popularity": metrics(popularity_scores(split, vc.items))}
    rows.update({f"untrained, λ {lam}": metrics(cond0 - lam * prior0) for lam in GRID})
    log_pop = np.log(np.round(popularity_scores(split, vc.items)) + 1.0)
    mats = {"cond0": cond0, "prior0": prior0, "log_pop": log_pop, "target_pos": vc.target_pos}

    def popularity_rows(label: str, cond: np.ndarray, prior: np.ndarray) -> None:
        if args.popularity:
            rows.update({f"{label}, prior swapped for log popularity, λ {lam}": metrics(cond - lam * (prior - log_pop))
                         for lam in GRID[1:]})
            rows.update({f"{label}, + μ log popularity, μ {mu}": metrics(cond + mu * log_pop) for mu in (0.5, 1, 2)})

    popularity_rows("untrained", cond0, prior0)
    if args.adapter is not None:
        cond1, prior1 = scores(load_adapter(backbone, args.adapter / ADAPTER_DIR))
        mats.update(cond1=cond1, prior1=prior1)
        rows.update({f"stage 2, own prior, λ {lam}": metrics(cond1 - lam * prior1) for lam in GRID})
        rows.update({f"stage 2, untrained LM's prior, λ {lam}": metrics(cond1 - lam * prior0) for lam in GRID[1:]})
        popularity_rows("stage 2", cond1, prior1)
    work = ROOT / "benchmarks" / ".work" / "prior_weight"
    work.mkdir(parents=True, exist_ok=True)
    np.savez(work / f"{args.name or args.base.name}.npz", **mats)
    result = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "base": str(args.base),
              "adapter": None if args.adapter is None else str(args.adapter), "n_valid": len(vc),
              "valid_candidates": vc.hash(), "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    old = read_json(OUT) if OUT.is_file() else {}
    old[args.name or args.base.name] = result
    write_json(OUT, old)
    write_table(old)


def write_table(results: dict[str, Any]) -> None:
    lines = ["# Title prior: λ of `scoring.prior_weight` on validation prefixes", "",
             "Each candidate's summed title log-likelihood after the user's history, less λ × the same after an "
             "empty history (`benchmarks/prior_weight.py`). Validation rows only (prefixes of validation users' "
             "sequences, target + 19 negatives); chance HR@1 0.05, NDCG@5 0.147.", ""]
    for name, r in results.items():
        note = f" {r['note']}" if r.get("note") else ""
        lines += [f"## {name}", "", f"Base `{r['base']}`, adapter `{r['adapter']}`, {r['n_valid']} rows "
                  f"(candidates {r['valid_candidates']}), {r['seconds']:.0f} s.{note}",
                  "", "| scores | HR@1 | HR@5 | NDCG@5 | mean rank |",
                  "|---|---|---|---|---|"]
        lines += [f"| {k} | {v['HR@1']} | {v['HR@5']} | {v['NDCG@5']} | {v['mean_rank']} |"
                  for k, v in r["rows"].items()]
        lines.append("")
    write_text(OUT.with_suffix(".md"), "\n".join(lines))


if __name__ == "__main__":
    main()
