"""Does the LLM know something its teacher does not? Score fusion of a finished run's DELRec with its teacher.

    python benchmarks/fusion.py --run runs/quality/ml-100k-loo-cpu-l15

DELRec's paper claims the LLM, once it has distilled the teacher's pattern, ranks better than the teacher. On the
CPU profiles it ranks far below it (quality.md). A weaker model can still carry information the stronger one lacks
(titles and their years, not item ids); if it does, a weighted sum of the two rankings beats the teacher alone. Per
row, each model's candidate scores are z-scored over the row's candidates and mixed as ``(1 − w)·LLM + w·teacher``;
``w`` is chosen on seeded validation rows (``--valid-users`` users' validation targets, a candidate file drawn here
with the project's sampler and saved; never a test user) from a grid of 0, 0.1, …, 1. The control is the same fusion
with popularity (training counts, log-scaled) in the LLM's place: if DELRec + teacher beats the teacher no more than
popularity + teacher does, the LLM adds nothing beyond popularity.

Reports, on the run's frozen test candidates: the teacher, the LLM, both fusions at their chosen ``w``, paired
per-user differences against the teacher and between the fusions (95% bootstrap CIs, sign test on HR@1), and the
whole ``w`` grid on test for reading only (not used to choose). The LLM's test ranks are checked against the run's
own ``results/DELRec.json`` before anything is fused. Writes ``benchmarks/results/fusion.json`` + ``.md`` (rows
merged by run); the LLM's candidate scores are cached under ``runs/fusion-cache/`` so a rerun costs no LLM time.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from delrec.data import CandidateSet, SeqDataset, Split, draw_candidates
from delrec.evaluate import histories_for, item_counts, popularity_scores
from delrec.io import read_json, write_json, write_text
from delrec.metrics import ranks_from_scores, summarize
from delrec.pipeline import TEACHER_NAMES, adapter_dir, chosen_prior_weight, load_config, soft_prompt_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import by_popularity, paired_ranks, popularity_table  # benchmarks/quality.py, a sibling script

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GRID = tuple(round(0.1 * i, 1) for i in range(11))


def zscore(scores: np.ndarray) -> np.ndarray:
    """Each row's scores standardised over its candidates (a constant row becomes zeros)."""
    s = np.asarray(scores, dtype=np.float64)
    sd = s.std(axis=1, keepdims=True)
    return (s - s.mean(axis=1, keepdims=True)) / np.where(sd > 0, sd, 1.0)


def mix(parts: list[np.ndarray], weights: tuple[float, ...]) -> np.ndarray:
    """``Σ wᵢ·z(partᵢ)``: the z-scored parts, weighted."""
    return sum((w * zscore(p) for w, p in zip(weights, parts, strict=True)), np.zeros(np.shape(parts[0])))


def fuse(a: np.ndarray, b: np.ndarray, w: float) -> np.ndarray:
    """``(1 − w)·z(a) + w·z(b)``: w = 0 is ``a`` alone, w = 1 is ``b`` alone."""
    return mix([a, b], (1.0 - w, w))


def choose_w(a: np.ndarray, b: np.ndarray, target_pos: np.ndarray, metric: str = "NDCG@5"
             ) -> tuple[float, dict[float, float]]:
    """The grid's w with the best ``metric`` on these rows (the smallest such w on ties) and every w's value."""
    table = {w: float(summarize(ranks_from_scores(fuse(a, b, w), target_pos))[metric]["value"]) for w in GRID}
    best = max(table.values())
    return min(w for w, v in table.items() if v == best), table


def choose_mix(parts: list[np.ndarray], target_pos: np.ndarray, metric: str = "NDCG@5") -> tuple[float, ...]:
    """Weights on the 0.1 simplex for z-scored ``parts`` with the best ``metric`` on these rows (first on ties)."""
    best, best_w = -1.0, (0.0,) * len(parts)
    for w in itertools.product(range(11), repeat=len(parts) - 1):
        if sum(w) > 10:
            continue
        ws = (*(x / 10 for x in w), (10 - sum(w)) / 10)
        v = float(summarize(ranks_from_scores(mix(parts, ws), target_pos))[metric]["value"])
        if v > best:
            best, best_w = v, ws
    return best_w


def _metrics(ranks: np.ndarray) -> dict[str, Any]:
    m = summarize(ranks)
    return {**{k: round(m[k]["value"], 4) for k in ("HR@1", "HR@5", "NDCG@5")},
            "ci": {k: [round(m[k]["lo"], 4), round(m[k]["hi"], 4)] for k in ("HR@1", "NDCG@5")}}


def _llm_scores(run_dir: Path, cands: CandidateSet, hist: list[np.ndarray], cache: Path) -> np.ndarray:
    """The run's final LLM (backbone + soft prompt + adapter, its chosen λ) on ``cands``; cached by the candidates'
    hash and the digest of the run's trained weights, so a rerun of the run's stages is never read from a stale file."""
    digest = hashlib.sha1()
    for f in (soft_prompt_dir(run_dir) / "soft_prompt.safetensors", adapter_dir(run_dir) / "adapter_model.safetensors",
              run_dir / "results" / "DELRec.json"):
        digest.update(f.read_bytes() if f.is_file() else b"-")
    path = cache / f"llm-{cands.hash()}-{digest.hexdigest()[:12]}.npy"
    if path.is_file():
        return np.load(path)
    from delrec.evaluate import evaluate_llm
    from delrec.finetune import load_adapter
    from delrec.llm.backbone import Backbone
    from delrec.llm.soft_prompt import SoftPrompt

    cfg = load_config(run_dir / "config.yaml")
    if cfg.scoring.prior_weight == "auto":  # score as the run's test did
        cfg = dataclasses.replace(cfg, scoring=dataclasses.replace(cfg.scoring,
                                                                   prior_weight=chosen_prior_weight(run_dir) or 0.0))
    dataset = SeqDataset.load(run_dir / "data")
    backbone = Backbone.load(cfg.backbone)
    soft = (SoftPrompt.from_pretrained(soft_prompt_dir(run_dir), device=backbone.device)
            if soft_prompt_dir(run_dir).is_dir() else None)
    if adapter_dir(run_dir).is_dir():
        backbone = load_adapter(backbone, adapter_dir(run_dir))
    t0 = time.perf_counter()
    res = evaluate_llm(backbone, soft, dataset, cands, cfg.data.domain or dataset.domain,
                       TEACHER_NAMES[cfg.teachers.distill_from], cfg.finetune.history_len, cfg.evaluate.batch_size,
                       hist, scoring=cfg.scoring)
    print(f"LLM scored {len(cands)} rows in {time.perf_counter() - t0:.0f} s", flush=True)
    assert res.scores is not None
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, res.scores)
    os.replace(tmp, path)
    return res.scores


def table(rows: list[dict[str, Any]]) -> str:
    out = ["# Score fusion: does the LLM add to its teacher?", "",
           "Generated by `benchmarks/fusion.py`. Per candidate row, each model's scores z-scored over the row's "
           "candidates and mixed as (1 − w)·A + w·teacher; w chosen on seeded validation rows (never a test user) "
           "by NDCG@5 from 0, 0.1, …, 1. Control: popularity (log training counts) in the LLM's place. Test: the "
           "run's frozen candidates (target + 19 negatives). The three-way mixture's weights (DELRec / popularity / "
           "teacher) are chosen the same way on the 0.1 simplex. 95% bootstrap CIs in brackets.", ""]
    for r in rows:
        out += [f"## {r['run']} (teacher {r['teacher']}; w chosen on {r['n_valid']} validation rows; "
                f"{r['n_test']} test users)", "",
                "| model | w | HR@1 [95% CI] | HR@5 | NDCG@5 [95% CI] |", "|---|---|---|---|---|"]
        for m in r["test"]:
            h, g = m["ci"]["HR@1"], m["ci"]["NDCG@5"]
            w = "–" if m.get("w") is None else m["w"] if isinstance(m["w"], str) else f"{m['w']:g}"
            out.append(f"| {m['model']} | {w} | {m['HR@1']:.4f} [{h[0]:.3f}, {h[1]:.3f}] | {m['HR@5']:.4f} "
                       f"| {m['NDCG@5']:.4f} [{g[0]:.3f}, {g[1]:.3f}] |")
        out += ["", "| A | B | ΔHR@1 [95% CI] | ΔNDCG@5 [95% CI] | HR@1 wins/losses | sign p |",
                "|---|---|---|---|---|---|"]
        for t in r["tests"]:
            d = t["diff_a_minus_b"]
            cells = " | ".join(f"{d[k]['mean']:+.4f} [{d[k]['ci'][0]:+.3f}, {d[k]['ci'][1]:+.3f}]"
                               for k in ("HR@1", "NDCG@5"))
            out.append(f"| {t['a']} | {t['b']} | {cells} | {t['HR@1_wins_losses'][0]}/{t['HR@1_wins_losses'][1]} "
                       f"| {t['sign_test_HR@1_p']:g} |")
        out += ["", "Validation NDCG@5 by w (the choice) and test NDCG@5 by w (read only, never used to choose):", "",
                "| w | " + " | ".join(f"{w:g}" for w in GRID) + " |", "|---" * (len(GRID) + 1) + "|"]
        for name, grid in r["grids"].items():
            out.append(f"| {name} | " + " | ".join(f"{grid[f'{w:g}']:.3f}" for w in GRID) + " |")
        if r.get("by_popularity"):
            out += ["", "HR@1 / NDCG@5 by the test target's training count (equal-size groups of test rows, coldest "
                    "first):", "", *popularity_table(r["by_popularity"])]
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished `delrec run` folder (with a DELRec row)")
    ap.add_argument("--teacher", default=None, choices=sorted(TEACHER_NAMES),
                    help="teacher to fuse with (default: the run's distill_from)")
    ap.add_argument("--valid-users", type=int, default=300, help="validation rows w is chosen on")
    ap.add_argument("--out", type=Path, default=RESULTS / "fusion")
    args = ap.parse_args()

    from delrec.teachers import SeqRecommender
    from delrec.teachers import score_candidates as teacher_scores

    run_dir = args.run.resolve()
    cfg = load_config(run_dir / "config.yaml")
    teacher = args.teacher or cfg.teachers.distill_from
    dataset = SeqDataset.load(run_dir / "data")
    split = Split.from_dict(read_json(run_dir / "split.json"), dataset)
    test = CandidateSet.load(run_dir / "candidates" / "test.parquet", seed=cfg.candidates.seed)
    cache = ROOT / "runs" / "fusion-cache" / hashlib.sha1(str(run_dir).encode()).hexdigest()[:12]
    vpath = cache / f"valid-{args.valid_users}.parquet"
    if vpath.is_file():
        valid = CandidateSet.load(vpath, seed=cfg.candidates.seed + 11)
    else:  # seeded validation rows of their own: the run's 64 chose its checkpoint and λ
        ex = split.examples("valid")
        keep = np.sort(np.random.default_rng(cfg.candidates.seed + 11).choice(len(ex), min(args.valid_users, len(ex)),
                                                                             replace=False))
        valid = draw_candidates([ex[i] for i in keep], dataset, cfg.candidates.size, cfg.candidates.seed + 11)
        cache.mkdir(parents=True, exist_ok=True)
        valid.save(vpath)
    parts = {"valid": (valid, histories_for(valid, split.examples("valid"))),
             "test": (test, histories_for(test, split.examples("test")))}

    model_dir = run_dir / "teachers" / teacher / "model"
    if not (model_dir / "config.json").is_file():
        sys.exit(f"{model_dir}: no trained {TEACHER_NAMES[teacher]} in this run")
    model = SeqRecommender.from_pretrained(model_dir, device="cpu")
    scores: dict[str, dict[str, np.ndarray]] = {}
    for part, (cands, hist) in parts.items():
        scores[part] = {"teacher": teacher_scores(model, hist, cands.items),
                        "LLM": _llm_scores(run_dir, cands, hist, cache),
                        "popularity": np.log1p(popularity_scores(split.train_sequences, cands.items,
                                                                 dataset.n_items))}
    # the LLM's test ranks must be the run's own before anything is fused
    own = np.asarray(read_json(run_dir / "results" / "DELRec.json")["ranks"])
    mine = ranks_from_scores(scores["test"]["LLM"], test.target_pos)
    agree = float((own == mine).mean())
    print(f"LLM test ranks equal to results/DELRec.json on {agree:.1%} of rows", flush=True)
    if agree < 0.99:
        sys.exit("the rescored LLM does not reproduce the run's test ranks; not fusing")

    tname = TEACHER_NAMES[teacher]
    llm = "DELRec" if soft_prompt_dir(run_dir).is_dir() else "TALLRec-style"  # a run without a soft prompt
    ranks: dict[str, np.ndarray] = {tname: ranks_from_scores(scores["test"]["teacher"], test.target_pos),
                                    llm: mine,
                                    "popularity": ranks_from_scores(scores["test"]["popularity"], test.target_pos)}
    chosen: dict[str, float | str] = {}
    grids: dict[str, dict[str, float]] = {}
    for a in ("LLM", "popularity"):
        name = f"{llm if a == 'LLM' else 'popularity'} + {tname}"
        w, vt = choose_w(scores["valid"][a], scores["valid"]["teacher"], valid.target_pos)
        _, tt = choose_w(scores["test"][a], scores["test"]["teacher"], test.target_pos)
        chosen[name] = w
        grids[f"{name}, validation"] = {f"{k:g}": v for k, v in vt.items()}
        grids[f"{name}, test (read only)"] = {f"{k:g}": v for k, v in tt.items()}
        ranks[name] = ranks_from_scores(fuse(scores["test"][a], scores["test"]["teacher"], w), test.target_pos)
        print(f"{name}: w {w:g} (validation NDCG@5 {vt[w]:.4f})", flush=True)

    # all three: does the LLM add to the teacher anything popularity does not?
    three = f"{llm} + popularity + {tname}"
    keys = ("LLM", "popularity", "teacher")
    ws = choose_mix([scores["valid"][k] for k in keys], valid.target_pos)
    chosen[three] = " / ".join(f"{w:g}" for w in ws)
    ranks[three] = ranks_from_scores(mix([scores["test"][k] for k in keys], ws), test.target_pos)
    print(f"{three}: w {chosen[three]}", flush=True)

    d_fused, p_fused = f"{llm} + {tname}", f"popularity + {tname}"
    row = {"run": os.path.relpath(run_dir, ROOT), "teacher": tname, "n_valid": len(valid), "n_test": len(test),
           "valid_hash": valid.hash(), "candidates_hash": test.hash(),
           "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "test": [{"model": k, "w": chosen.get(k), **_metrics(v)} for k, v in ranks.items()],
           "tests": [paired_ranks(ranks[d_fused], ranks[tname], d_fused, tname),
                     paired_ranks(ranks[p_fused], ranks[tname], p_fused, tname),
                     paired_ranks(ranks[d_fused], ranks[p_fused], d_fused, p_fused),
                     paired_ranks(ranks[three], ranks[p_fused], three, p_fused)],
           "grids": grids,
           "by_popularity": by_popularity({k: ranks[k] for k in (tname, llm, "popularity", d_fused)},
                                          item_counts(split.train_sequences, dataset.n_items)[test.targets])}
    json_path = args.out.with_suffix(".json")
    old = read_json(json_path)["rows"] if json_path.is_file() else []
    merged = [r for r in old if r["run"] != row["run"]] + [row]
    write_json(json_path, {"rows": merged})
    write_text(args.out.with_suffix(".md"), table(merged))
    print(table([row]), flush=True)


if __name__ == "__main__":
    main()
