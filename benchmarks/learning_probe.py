"""Stage-2 learning probes: one setting per invocation, measured on ≥ 200 validation examples, logged.

    python benchmarks/learning_probe.py --base runs/ml-100k-cpu --name lora-unscored \
        --set finetune.max_train_examples=300 --set scoring.year=unscored

Reuses a finished run folder's data and split (``--base``; teachers are not needed). Trains stage 2 from the cpu
profile's settings (stage 2 and scoring; rows logged before 2026-12-04 session 15 started from the `ScoringConfig`
defaults, listed titles and per-token means — each row's ``config`` says which) with the given ``--set`` overrides
(``finetune.*``, ``scoring.*``), without a soft prompt unless
``--soft-prompt RUN`` names a run whose stage 1 is done, then ranks a fixed validation set: ``--n-valid`` examples
drawn (seeded) from every prefix of the *validation* users' sequences — never a test target, never a training user —
or with ``--rows ends`` each validation user's last 3 items (where test rows sit), each with the target + 19
negatives outside the user's sequence. Popularity (training counts) is ranked on the same
rows. Every attempt is appended to ``benchmarks/results/learning_log.jsonl`` and the table
``benchmarks/results/learning_log.md`` is rebuilt from it, so the log keeps every number, good or bad.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from delrec.data import draw_candidates
from delrec.data.candidates import donor_histories
from delrec.data.splits import Example
from delrec.io import read_json, write_text
from delrec.metrics import ranks_from_scores, summarize
from delrec.settings import parse_override

ROOT = Path(__file__).resolve().parents[1]
LOG = ROOT / "benchmarks" / "results" / "learning_log.jsonl"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import bootstrap_diff  # noqa: E402  (benchmarks/quality.py, a sibling script)


def valid_examples(split: Any, n: int, seed: int = 0, min_history: int = 5) -> list[Example]:
    """``n`` next-item examples from prefixes of the validation users' sequences (seeded)."""
    seqs = split.dataset.sequences
    # up to each validation user's validation target, as the split places it (loo: never the test item after it)
    pool = [(ex.user, e) for ex in split.examples("valid") for e in range(min_history, len(ex.history) + 1)]
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(pool), size=min(n, len(pool)), replace=False).tolist())
    return [Example(pool[i][0], seqs[pool[i][0]][:pool[i][1]], int(seqs[pool[i][0]][pool[i][1]])) for i in pick]


def end_examples(split: Any, k: int = 3, min_history: int = 5) -> list[Example]:
    """The last ``k`` next-item examples of every validation user's sequence: test rows are sequence ends (the
    user split's test example is a user's last item), and random prefixes come mostly from long sequences' middles."""
    seqs = split.dataset.sequences
    # each validation target, as the split places it (loo: never the test item after it), and the k − 1 before it
    return [Example(ex.user, seqs[ex.user][:t], int(seqs[ex.user][t])) for ex in split.examples("valid")
            for t in range(len(ex.history), len(ex.history) - k, -1) if t >= min_history]


def popularity_scores(split: Any, items: np.ndarray) -> np.ndarray:
    """Training counts of each candidate (`delrec.evaluate.popularity_scores`), ties broken by a seeded jitter."""
    from delrec.evaluate import popularity_scores as counts

    return counts(split.train_sequences, items, split.dataset.n_items) + 1e-6 * np.random.default_rng(0).random(
        items.shape)


def _row(name: str, metrics: dict[str, Any]) -> dict[str, Any]:
    return {"model": name, **{k: round(v["value"], 4) for k, v in metrics.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--soft-prompt", type=Path, default=None)
    ap.add_argument("--teacher", type=Path, default=None, metavar="MODEL_DIR",
                    help="the trained teacher finetune.distill_weight distils (default: --base's "
                         "teachers/<distill_from>/model); it must have been trained on --base's split")
    ap.add_argument("--n-valid", type=int, default=200, help="with --rows prefixes: how many rows to draw")
    ap.add_argument("--rows", choices=("prefixes", "ends"), default="prefixes",
                    help="prefixes: --n-valid rows drawn from every prefix of the validation users' sequences; "
                         "ends: each validation user's last 3 items (the test rows' position)")
    ap.add_argument("--zero-shot", action="store_true", help="also rank before training")
    ap.add_argument("--rank-only", action="store_true",
                    help="do not train stage 2: rank with the backbone as loaded (+ --soft-prompt), e.g. to measure "
                         "what a stage-1 soft prompt alone changes")
    ap.add_argument("--eval-only", type=Path, default=None, metavar="PROBE_DIR",
                    help="do not train: rank with the adapter a finished probe left in PROBE_DIR (e.g. to compare "
                         "scoring settings on one trained adapter)")
    ap.add_argument("--against", action="append", default=[], metavar="NAME",
                    help="an earlier probe (ranked with per-row ranks, on the same rows) to compare this one with, "
                         "paired per row: mean difference with a 95%% bootstrap CI (repeatable)")
    ap.add_argument("--histories", choices=("own", "donor"), default="own",
                    help="donor: rank each row after another validation user's history (none of the row's "
                         "candidates in its shown items) — does the model read the user's sequence at all?")
    ap.add_argument("--note", default="", help="a remark for the log (e.g. timing shared the CPU with another job)")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work" / "probes")
    args = ap.parse_args()

    from delrec.evaluate import score_candidates
    from delrec.finetune import FinetuneConfig, finetune
    from delrec.llm.backbone import Backbone
    from delrec.pipeline import TEACHER_NAMES, Run, profile, soft_prompt_dir

    run = Run(args.base, log=lambda s: None)
    ds, split = run.dataset, run.split
    ft: dict[str, Any] = {"max_valid_examples": 8}
    sc: dict[str, Any] = {}
    bb: dict[str, Any] = {}
    for text in args.overrides:
        key, value = parse_override(text)
        section, _, field = key.partition(".")
        if section not in ("finetune", "scoring", "backbone"):
            sys.exit(f"--set {text}: only finetune.*, scoring.* and backbone.* apply to a stage-2 probe")
        {"finetune": ft, "scoring": sc, "backbone": bb}[section][field] = value
    ft.setdefault("eval_every", 10**6)  # the probe's own validation below is the measurement
    cfg = FinetuneConfig.from_profile("cpu", **ft)
    # the cpu profile's, then --set; uncalibrated unless a fixed λ is set: the probe reports its rows as they rank,
    # and choosing λ on those same rows (the profile's auto) would flatter them
    scoring = dataclasses.replace(profile("cpu").scoring, **{"prior_weight": 0.0, **sc}).validate()
    teacher = TEACHER_NAMES[run.cfg.teachers.distill_from]

    vex = valid_examples(split, args.n_valid) if args.rows == "prefixes" else end_examples(split)
    vc = draw_candidates(vex, ds, size=20, seed=7)
    hist = [e.history for e in vex]
    out: dict[str, Any] = {"name": args.name, "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "overrides": args.overrides, "note": args.note, "n_valid": len(vc), "rows": args.rows,
                           "valid_candidates": vc.hash(), "histories": args.histories}
    out["popularity"] = _row("popularity", summarize(ranks_from_scores(popularity_scores(split, vc.items),
                                                                       vc.target_pos), ci=False))
    soft = None
    if args.soft_prompt is not None:
        from delrec.llm.soft_prompt import SoftPrompt

        soft = SoftPrompt.from_pretrained(soft_prompt_dir(args.soft_prompt))
    # another backbone on the same rows (e.g. backbone.name_or_path=gemma3-270m): --base's data and split only
    backbone_cfg = dataclasses.replace(run.cfg.backbone, **bb).validate()
    backbone = Backbone.load(backbone_cfg)

    def rank() -> tuple[dict[str, Any], float]:
        t0 = time.perf_counter()
        scorer = scoring.scorer(backbone, soft)
        shown = hist if args.histories == "own" else donor_histories(vex, vc.items, cfg.history_len)
        s = score_candidates(scorer, ds, vc, shown, ds.domain, teacher, cfg.history_len, 4,
                             soft_prompt=soft is not None, year=scoring.year, verbalizer=scoring.verbalizer,
                             prior_weight=scoring.prior_weight)
        ranks = ranks_from_scores(s, vc.target_pos)
        m = summarize(ranks, ci=False)
        out["ranks"] = ranks.tolist()  # per row, for paired comparisons (--against)
        return {**_row("llm", m), "mean_rank": round(float(ranks.mean()), 3)}, time.perf_counter() - t0

    if args.rank_only:
        out.update(rank_only=True, train_s=0.0, train_examples=0, s_per_example=0.0, loss_first=None,
                   loss_last=None, config={"scoring": dataclasses.asdict(scoring),
                                                   "soft_prompt": None if soft is None else str(args.soft_prompt)})
        out["valid"], out["valid_s"] = rank()
        print(json.dumps(out["valid"]), flush=True)
        _append(out, args.against)
        return
    if args.zero_shot:
        out["zero_shot"], out["zero_shot_s"] = rank()
        print("zero-shot", out["zero_shot"], flush=True)
    work = args.work / args.name
    t0 = time.perf_counter()
    if args.eval_only is not None:
        from delrec.finetune import ADAPTER_DIR, load_adapter

        work = args.eval_only
        hist_file = read_json(work / "history.json")
        if (hist_file["fingerprint"]["soft_prompt"] is None) != (soft is None):
            raise SystemExit(f"{work} was trained {'without' if soft is not None else 'with'} a soft prompt; "
                             "pass --soft-prompt exactly when it was")
        cfg = dataclasses.replace(cfg, history_len=hist_file["config"]["history_len"])  # rank as it trained
        backbone = load_adapter(backbone, work / ADAPTER_DIR)
    else:
        tmodel = None
        if cfg.needs_teacher:
            from delrec.teachers import SeqRecommender

            tmodel = SeqRecommender.from_pretrained(
                args.teacher or args.base / "teachers" / run.cfg.teachers.distill_from / "model")
        backbone = finetune(backbone, ds, split, soft, teacher, cfg, work, scoring=scoring, resume=False,
                            teacher=tmodel)
        hist_file = read_json(work / "history.json")
    # next-item predictions trained on (a packed window holds several); older histories lack the count
    seen = hist_file.get("train_predictions") or hist_file["steps"] * cfg.batch_size * cfg.grad_accum
    if args.eval_only is not None:
        out["eval_only"] = str(args.eval_only)
    out.update(train_s=round(time.perf_counter() - t0, 1), train_examples=seen,
               s_per_example=round(hist_file["seconds"] / max(seen, 1), 3),
               loss_first=hist_file["history"][0]["loss"], loss_last=hist_file["history"][-1]["loss"],
               config={"finetune": hist_file["config"] if args.eval_only is not None else dataclasses.asdict(cfg),
                       "scoring": dataclasses.asdict(scoring), "backbone": dataclasses.asdict(backbone_cfg)})
    out["valid"], out["valid_s"] = rank()
    print(json.dumps(out["valid"]), flush=True)
    _append(out, args.against)


def _append(row: dict[str, Any], against: Sequence[str] = ()) -> None:
    LOG.parent.mkdir(parents=True, exist_ok=True)
    earlier = {r["name"]: r for r in (json.loads(line) for line in LOG.read_text(encoding="utf-8").splitlines()
                                      if line.strip())} if LOG.is_file() else {}
    for name in against:
        other = earlier.get(name)
        if other is None or "ranks" not in other or other["valid_candidates"] != row["valid_candidates"]:
            print(f"--against {name}: no earlier probe of that name with per-row ranks on these rows; skipped")
            continue
        row.setdefault("paired", {})[name] = bootstrap_diff(row["ranks"], other["ranks"])
    with LOG.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    write_table()


def write_table() -> None:
    rows = [json.loads(line) for line in LOG.read_text(encoding="utf-8").splitlines() if line.strip()]
    lines = ["# Stage-2 learning log", "",
             "Every probe of `benchmarks/learning_probe.py`, in order. Validation only: prefixes of the validation "
             "users' sequences (never a test target), target + 19 negatives; chance HR@1 0.05, NDCG@5 0.147. "
             "`n valid` ending in *ends*: each validation user's last 3 items (`--rows ends`, the position of the "
             "test rows) instead of random prefixes.", "",
             "| # | probe | overrides | train ex | s/ex | loss first → last | valid HR@1 | HR@5 | NDCG@5 | mean rank "
             "| popularity HR@1 / NDCG@5 | n valid |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        v, p = r["valid"], r["popularity"]
        note = f" ({r['note']})" if r.get("note") else ""
        if r.get("rank_only"):
            note += " (no stage-2 training: the backbone as loaded" + (
                f" + the soft prompt of {Path(r['config']['soft_prompt']).name})" if r["config"].get("soft_prompt")
                else ")")
        if r.get("eval_only"):
            note += f" (no training: the adapter of {Path(r['eval_only']).name})"
        if r.get("histories") == "donor":
            note += " (each row ranked after another validation user's history: --histories donor)"
        zs = r.get("zero_shot")
        if zs:
            note += f" (before training: NDCG@5 {zs['NDCG@5']})"
        loss = "–" if r["loss_first"] is None else f"{r['loss_first']:.3f} → {r['loss_last']:.3f}"
        lines.append(f"| {i} | {r['name']}{note} | `{' '.join(r['overrides'])}` | {r['train_examples']} | "
                     f"{r['s_per_example']} | {loss} | {v['HR@1']} | "
                     f"{v['HR@5']} | {v['NDCG@5']} | {v['mean_rank']} | {p['HR@1']} / {p['NDCG@5']} | "
                     f"{r['n_valid']}{' ends' if r.get('rows') == 'ends' else ''} |")
    pairs = [(r["name"], b, d) for r in rows for b, d in r.get("paired", {}).items()]
    if pairs:
        lines += ["", "Paired per row (the same validation rows): A − B with a 95% bootstrap CI.", "",
                  "| A | B | ΔHR@1 [95% CI] | ΔNDCG@5 [95% CI] |", "|---|---|---|---|"]
        lines += [f"| {a} | {b} | " + " | ".join(f"{d[k]['mean']:+.4f} [{d[k]['ci'][0]:+.3f}, {d[k]['ci'][1]:+.3f}]"
                                                 for k in ("HR@1", "NDCG@5")) + " |" for a, b, d in pairs]
    write_text(LOG.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
