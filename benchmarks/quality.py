"""Quality benchmark: DELRec against popularity, its teachers, a zero-shot LLM and TALLRec-style fine-tuning.

    python benchmarks/quality.py --part ml-100k-user                      # default cpu profile, the paper's split
    python benchmarks/quality.py --part ml-100k-user --base runs/ml-100k-cpu   # read an existing default run
    python benchmarks/quality.py --part ml-100k-loo-cpu                   # cpu profile, all 943 loo test users
    python benchmarks/quality.py --part ml-100k-loo                       # cpu-long profile, all 943 test users
    python benchmarks/quality.py --part ml-100k-loo-tallrec               # … then the TALLRec-style row on its base
    python benchmarks/quality.py --part ml-100k-loo-untrained             # … the soft prompt left untrained (control)
    python benchmarks/quality.py --part beauty-loo                        # cpu-long, 1,000 sampled test users
    python benchmarks/quality.py --part beauty-loo-cpu                    # cpu profile, the same 1,000 users
    python benchmarks/quality.py --part beauty-loo-cpu-words8             # + titles cut to 8 words
    python benchmarks/quality.py --part beauty-loo-cpu-words8-800         # … then 2x the stage-2 updates on it
    python benchmarks/quality.py --part beauty-loo-cpu-w8-prior           # cut titles scored against their prior
    python benchmarks/quality.py --part beauty-loo-cpu-w8-auto            # … with λ chosen on the validation users

One part per invocation (each ≤ 2 hours on 2 cores); rows are merged into ``benchmarks/results/quality.json`` by
(dataset, split, model, profile) and the table ``quality.md`` plus the learning curve ``quality_curve.png`` are
rebuilt from all rows. Every setting is one resumable `delrec run` under ``--runs`` that reuses its part's base run
(data, split, frozen candidates, teachers; stage 1 where unchanged), so all rows of a part are ranked on the same
frozen candidate file — checked here by its hash. Settings (profiles) were chosen on validation users only
(``benchmarks/results/learning_log.md``); nothing here is tuned on the test users.

Per row: HR@1, HR@5, NDCG@5 with 95% bootstrap CIs, stage-2 training examples seen, wall seconds (train + inference
of that model). Paired per-user tests of DELRec against the best teacher, popularity and each variant of its part
(TALLRec-style, zero-shot, the ablations, the untrained soft prompt): the mean difference with a 95% bootstrap CI,
and an exact two-sided sign test on the users where HR@1 differs.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from delrec.data import CandidateSet, SeqDataset, Split
from delrec.evaluate import chance_metrics, item_counts
from delrec.io import read_json, write_json, write_text
from delrec.metrics import hit_rate, ndcg
from delrec.pipeline import load_config

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BEAUTY = ROOT.parent / "shared" / "data" / "amazon-beauty"
TEACHERS = ("SASRec", "GRU4Rec", "Caser")

# Rows measured with an earlier version of a profile keep that version's name (results of real runs, not rerun).
LEGACY_PROFILES = {"cpu-2026-12-04-s1-48": "the cpu profile of 2026-12-04 (session 15) before stage 1 was cut to 24 "
                                           "steps: summed title scores, 48 stage-1 steps",
                   "cpu-2026-12-04-mean": "the cpu profile of 2026-12-04 (session 14): next verbalizer and packed "
                                          "training as now, titles scored by the per-token mean log-likelihood",
                   "cpu-2026-12-03-open": "the cpu profile of 2026-12-03: open verbalizer, 480 one-prompt stage-2 "
                                          "examples, stage 1 with 20-way RPS over 16 steps"}

_WORDS8 = ["data.preprocess.title_max_words=8"]
# the teacher's ranking of 2 training prefixes per update, z-scored, λ 0.5, T 0.5 (learning_log WK1, chosen on the
# validation ends)
_KD2 = ["finetune.distill_candidates=2", "finetune.distill_weight=0.5", "finetune.distill_temperature=0.5",
        "finetune.distill_standardize=true"]
# _KD2 and the history lifts undone: the term's settings back to the cpu profile's
_NO_KD = ["finetune.distill_candidates=0", "finetune.distill_weight=0", "finetune.distill_temperature=1",
          "finetune.distill_standardize=false", "finetune.distill_lift=off"]
# setting name → (--set overrides on top of the part's base run, model name of its DELRec row)
VARIANTS: dict[str, tuple[list[str], str]] = {
    "tallrec": (["soft_prompt.num_tokens=0"], "TALLRec-style"),
    "zero_shot": (["soft_prompt.num_tokens=0", "finetune.adapter=none"], "zero-shot"),
    "no_ta": (["distill.tasks=[rps]"], "DELRec w/o TA"),
    "no_rps": (["distill.tasks=[ta]"], "DELRec w/o RPS"),
    # the control of the soft prompt's edge over TALLRec-style: the same 20 tokens, left at their initialisation
    "untrained": (["distill.max_steps=0"], "DELRec, untrained soft prompt"),
    # longer histories (learning_log P20, P23): windows and prompts of 20 items, at about the wall time of the
    # profile's 10-item stage 2 (each update costs ~1.6x)
    "hist20-250": (["finetune.history_len=20", "finetune.max_steps=250"], "DELRec, history 20"),
    "hist20-1000": (["finetune.history_len=20", "finetune.max_steps=1000", "finetune.eval_every=250"],
                    "DELRec, history 20"),
    # long-title catalogues: every title cut to its first 8 words (Beauty: 21.6 → 14.7 SmolLM2 tokens per title on
    # average, the longest 255 → 122), so the same updates cost less and spend less of the loss on wording
    "words8": (_WORDS8, "DELRec, titles ≤ 8 words"),
    # … and twice the stage-2 updates (~15,600 next-item predictions): do more exposures per item move the ranking?
    "words8-800": ([*_WORDS8, "finetune.max_steps=800"], "DELRec, titles ≤ 8 words, 800 updates"),
    "words8-zero-shot": ([*_WORDS8, "soft_prompt.num_tokens=0", "finetune.adapter=none"],
                         "zero-shot, titles ≤ 8 words"),
    # the untrained LM on the group whose base cuts the titles and scores them against their prior
    "w8-prior-zero-shot": (["soft_prompt.num_tokens=0", "finetune.adapter=none"],
                           "zero-shot, titles ≤ 8 words, prior weight 0.75"),
    # the group whose base chooses λ on its validation users (scoring.prior_weight=auto)
    "w8-auto-tallrec": (["soft_prompt.num_tokens=0"], "TALLRec-style, titles ≤ 8 words, prior weight auto"),
    "w8-auto-zero-shot": (["soft_prompt.num_tokens=0", "finetune.adapter=none"],
                          "zero-shot, titles ≤ 8 words, prior weight auto"),
    # the group of the cpu profile as it is now (last 3 windows, λ chosen on validation users)
    "w3-tallrec": (["soft_prompt.num_tokens=0"], "TALLRec-style, last 3 windows, prior weight auto"),
    # + the teacher's ranking of 2 training prefixes per update (learning_log WK1, chosen on the validation ends)
    "w3-kd2": (_KD2, "DELRec, last 3 windows + teacher ranking, prior weight auto"),
    # its control: the same term fitted to the one-hot true next item (finetune.distill_target=truth): the teacher's
    # knowledge or the term's ranking form?
    "w3-truth2": ([*_KD2, "finetune.distill_target=truth"],
                  "DELRec, last 3 windows + true-item ranking, prior weight auto"),
    # what stage 1 buys the cpu profile as it is now: its soft prompt left at initialisation, or trained on one task
    "w3-untrained": (["distill.max_steps=0"], "DELRec, last 3 windows, untrained soft prompt, prior weight auto"),
    "w3-no-ta": (["distill.tasks=[rps]"], "DELRec w/o TA, last 3 windows, prior weight auto"),
    "w3-no-rps": (["distill.tasks=[ta]"], "DELRec w/o RPS, last 3 windows, prior weight auto"),
    "l15-tallrec": (["soft_prompt.num_tokens=0"], "TALLRec-style, last 3 windows, last 15 blocks, prior weight auto"),
    # the history-lift group without a soft prompt: does stage 1 still add anything once stage 2 fits the lifts?
    "liftj-tallrec": (["soft_prompt.num_tokens=0"],
                      "TALLRec-style, last 3 windows, last 15 blocks + teacher history lifts, prior weight auto"),
    # its control: the same 20 soft tokens left at their initialisation — is the edge over TALLRec-style the
    # distilled content or only the extra prompt positions?
    "liftj-untrained": (["distill.max_steps=0"], "DELRec, untrained soft prompt, last 3 windows, last 15 blocks + "
                                                 "teacher history lifts, prior weight auto"),
    # twice the group's stage-2 updates (800): its validation chose the last checkpoint at 400, so does the lift group
    # still gain with budget (the cpu-long question for this form)? The checkpoint is again chosen on validation users
    "liftj-800": (["finetune.max_steps=800"], "DELRec, last 3 windows, last 15 blocks + teacher history lifts, "
                                              "800 updates, prior weight auto"),
    # the group without its history-lift term: the cpu profile as it is now (stage 1 reused, the term's settings
    # back to the profile's), on the group's users and candidates — what the lifts buy on that catalogue, paired
    "liftj-nolift": (_NO_KD, "DELRec, last 3 windows, last 15 blocks, prior weight auto"),
    # … and without a soft prompt: what stage 1 buys the cpu profile as it is now on that catalogue
    "liftj-nolift-tallrec": ([*_NO_KD, "soft_prompt.num_tokens=0"],
                             "TALLRec-style, last 3 windows, last 15 blocks, prior weight auto"),
}
# a variant built on another variant's run (its data, teachers and stage 1), not the part's base
VARIANT_REUSE: dict[str, str] = {"words8-800": "words8", "words8-zero-shot": "words8"}


def _beauty() -> list[str]:
    return ["data.name=amazon-beauty", f"data.path={BEAUTY}", "data.format=generic", "data.domain=beauty"]


# part → (group, dataset label, base overrides, variants run on top of the base). The parts of one group share one
# base run (``--runs``/group): data, split, frozen candidates, teachers, DELRec; each part stays under 2 hours.
# The rows measured before the cpu profiles chose λ on validation users (scoring.prior_weight=auto) keep their
# uncalibrated scoring, so a part reruns (or resumes) as it was measured.
_UNCALIBRATED = "scoring.prior_weight=0"
# … and the stage-2 settings the cpu profile has changed since: rows measured before it trained on the last 3 windows
# of each sequence saw every window, and rows measured before lora_layers=15 adapted every block
_EVERY_BLOCK = "finetune.lora_layers=0"
_PRE_W3 = ["finetune.windows_per_user=0", _EVERY_BLOCK]
_ML_USER = ["profile=cpu", _UNCALIBRATED, *_PRE_W3]
_LOO = ["profile=cpu-long", "split.kind=loo", "candidates.max_test=null", _UNCALIBRATED]  # every ML-100K test user
_LOO_CPU = ["profile=cpu", "split.kind=loo", "candidates.max_test=null", _UNCALIBRATED, *_PRE_W3]
# the cpu profile of sessions 27–31: stage 2 on each training sequence's last 3 windows, λ chosen on validation users
_LOO_CPU_W3 = ["profile=cpu", "split.kind=loo", "candidates.max_test=null", _EVERY_BLOCK]
# the cpu profile as it is now: the same with LoRA on the last 15 blocks only (learning_log W3-L15)
_LOO_CPU_L15 = ["profile=cpu", "split.kind=loo", "candidates.max_test=null"]
# … plus the teacher's candidate-level term on history lifts, gradient through both passes (learning_log WK1-L15-liftj,
# chosen on the validation ends: 0.351 / 0.727 / 0.548 vs W3-L15's 0.340 / 0.709 / 0.532; ~2.3x W3-L15's stage 2)
_LOO_CPU_LIFTJ = [*_LOO_CPU_L15, *_KD2, "finetune.distill_lift=joint"]
_BEAUTY_LOO = ["profile=cpu-long", "split.kind=loo", "candidates.max_test=1000", *_beauty(), _UNCALIBRATED]
# Beauty titles are ~2x ML-100K's in tokens (~20 vs ~10), so each stage-2 update costs ~2x: the cpu-long base
# (1,600 updates) alone would not fit a 2-hour part; the cpu profile's base and its TALLRec-style row each do.
_BEAUTY_LOO_CPU = ["profile=cpu", *_BEAUTY_LOO[1:], *_PRE_W3]
_BEAUTY_LOO_CPU_W8_PRIOR = [*_BEAUTY_LOO_CPU, *_WORDS8, "scoring.prior_weight=0.75"]
_BEAUTY_LOO_CPU_W8_AUTO = [*_BEAUTY_LOO_CPU, *_WORDS8, "scoring.prior_weight=auto"]
# the cpu profile as it is now (last 3 windows, LoRA on the last 15 blocks, λ chosen on validation users) with titles
# cut to 8 words and the history-lift term of the ML-100K group ml-100k-loo-cpu-liftj: its settings were chosen on
# ML-100K validation users only, carried over unchanged; the same 1,000 users and candidates as beauty-loo-cpu
_BEAUTY_LOO_CPU_LIFTJ = ["profile=cpu", "split.kind=loo", "candidates.max_test=1000", *_beauty(), *_WORDS8, *_KD2,
                         "finetune.distill_lift=joint"]
PARTS: dict[str, tuple[str, str, list[str], list[str]]] = {
    "ml-100k-user": ("ml-100k-user", "ml-100k", _ML_USER, []),
    "ml-100k-user-tallrec": ("ml-100k-user", "ml-100k", _ML_USER, ["tallrec", "zero_shot"]),
    # The default cpu budget on all 943 loo test users: paired tests with 10× the users of the user split.
    "ml-100k-loo-cpu": ("ml-100k-loo-cpu", "ml-100k", _LOO_CPU, []),
    "ml-100k-loo-cpu-tallrec": ("ml-100k-loo-cpu", "ml-100k", _LOO_CPU, ["tallrec"]),
    "ml-100k-loo-cpu-hist20": ("ml-100k-loo-cpu", "ml-100k", _LOO_CPU, ["hist20-250"]),
    "ml-100k-loo-cpu-untrained": ("ml-100k-loo-cpu", "ml-100k", _LOO_CPU, ["untrained"]),
    "ml-100k-loo-cpu-w3": ("ml-100k-loo-cpu-w3", "ml-100k", _LOO_CPU_W3, []),
    "ml-100k-loo-cpu-w3-tallrec": ("ml-100k-loo-cpu-w3", "ml-100k", _LOO_CPU_W3, ["w3-tallrec"]),
    "ml-100k-loo-cpu-w3-kd2": ("ml-100k-loo-cpu-w3", "ml-100k", _LOO_CPU_W3, ["w3-kd2"]),
    "ml-100k-loo-cpu-w3-truth2": ("ml-100k-loo-cpu-w3", "ml-100k", _LOO_CPU_W3, ["w3-truth2"]),
    "ml-100k-loo-cpu-w3-untrained": ("ml-100k-loo-cpu-w3", "ml-100k", _LOO_CPU_W3, ["w3-untrained"]),
    "ml-100k-loo-cpu-w3-ablations": ("ml-100k-loo-cpu-w3", "ml-100k", _LOO_CPU_W3, ["w3-no-ta", "w3-no-rps"]),
    "ml-100k-loo-cpu-l15": ("ml-100k-loo-cpu-l15", "ml-100k", _LOO_CPU_L15, []),
    "ml-100k-loo-cpu-l15-tallrec": ("ml-100k-loo-cpu-l15", "ml-100k", _LOO_CPU_L15, ["l15-tallrec"]),
    "ml-100k-loo-cpu-liftj": ("ml-100k-loo-cpu-liftj", "ml-100k", _LOO_CPU_LIFTJ, []),
    "ml-100k-loo-cpu-liftj-tallrec": ("ml-100k-loo-cpu-liftj", "ml-100k", _LOO_CPU_LIFTJ, ["liftj-tallrec"]),
    "ml-100k-loo-cpu-liftj-untrained": ("ml-100k-loo-cpu-liftj", "ml-100k", _LOO_CPU_LIFTJ, ["liftj-untrained"]),
    "ml-100k-loo-cpu-liftj-800": ("ml-100k-loo-cpu-liftj", "ml-100k", _LOO_CPU_LIFTJ, ["liftj-800"]),
    "ml-100k-loo": ("ml-100k-loo", "ml-100k", _LOO, []),
    "ml-100k-loo-tallrec": ("ml-100k-loo", "ml-100k", _LOO, ["tallrec"]),
    "ml-100k-loo-zero-shot": ("ml-100k-loo", "ml-100k", _LOO, ["zero_shot"]),
    "ml-100k-loo-ablations": ("ml-100k-loo", "ml-100k", _LOO, ["no_ta", "no_rps"]),
    "ml-100k-loo-untrained": ("ml-100k-loo", "ml-100k", _LOO, ["untrained"]),
    "ml-100k-loo-hist20": ("ml-100k-loo", "ml-100k", _LOO, ["hist20-1000"]),
    "beauty-loo": ("beauty-loo", "amazon-beauty", _BEAUTY_LOO, []),
    "beauty-loo-tallrec": ("beauty-loo", "amazon-beauty", _BEAUTY_LOO, ["tallrec"]),
    "beauty-loo-cpu": ("beauty-loo-cpu", "amazon-beauty", _BEAUTY_LOO_CPU, []),
    "beauty-loo-cpu-tallrec": ("beauty-loo-cpu", "amazon-beauty", _BEAUTY_LOO_CPU, ["tallrec"]),
    "beauty-loo-cpu-zero-shot": ("beauty-loo-cpu", "amazon-beauty", _BEAUTY_LOO_CPU, ["zero_shot"]),
    "beauty-loo-cpu-words8": ("beauty-loo-cpu", "amazon-beauty", _BEAUTY_LOO_CPU, ["words8"]),
    "beauty-loo-cpu-words8-800": ("beauty-loo-cpu", "amazon-beauty", _BEAUTY_LOO_CPU, ["words8-800"]),
    "beauty-loo-cpu-words8-zero-shot": ("beauty-loo-cpu", "amazon-beauty", _BEAUTY_LOO_CPU, ["words8-zero-shot"]),
    # Cut titles scored against their prior (λ 0.75, chosen on 256 validation prefixes of the Beauty user split:
    # benchmarks/results/prior_weight.md) as the group's base: the same 1,000 users and candidates as beauty-loo-cpu
    "beauty-loo-cpu-w8-prior": ("beauty-loo-cpu-w8-prior", "amazon-beauty", _BEAUTY_LOO_CPU_W8_PRIOR, []),
    "beauty-loo-cpu-w8-prior-zero-shot": ("beauty-loo-cpu-w8-prior", "amazon-beauty", _BEAUTY_LOO_CPU_W8_PRIOR,
                                          ["w8-prior-zero-shot"]),
    # … with λ chosen per run on its 64 validation users instead (with the checkpoint), rows of every kind
    "beauty-loo-cpu-w8-auto": ("beauty-loo-cpu-w8-auto", "amazon-beauty", _BEAUTY_LOO_CPU_W8_AUTO, []),
    "beauty-loo-cpu-w8-auto-tallrec": ("beauty-loo-cpu-w8-auto", "amazon-beauty", _BEAUTY_LOO_CPU_W8_AUTO,
                                       ["w8-auto-tallrec"]),
    "beauty-loo-cpu-w8-auto-zero-shot": ("beauty-loo-cpu-w8-auto", "amazon-beauty", _BEAUTY_LOO_CPU_W8_AUTO,
                                         ["w8-auto-zero-shot"]),
    "beauty-loo-cpu-liftj": ("beauty-loo-cpu-liftj", "amazon-beauty", _BEAUTY_LOO_CPU_LIFTJ, []),
    "beauty-loo-cpu-liftj-tallrec": ("beauty-loo-cpu-liftj", "amazon-beauty", _BEAUTY_LOO_CPU_LIFTJ,
                                     ["liftj-tallrec"]),
    "beauty-loo-cpu-liftj-untrained": ("beauty-loo-cpu-liftj", "amazon-beauty", _BEAUTY_LOO_CPU_LIFTJ,
                                       ["liftj-untrained"]),
    # Beauty had no row of the cpu profile as it is now (every earlier Beauty row predates the last-3 windows and
    # the last 15 blocks): the lift group's stage 2 without the lift term
    "beauty-loo-cpu-liftj-nolift": ("beauty-loo-cpu-liftj", "amazon-beauty", _BEAUTY_LOO_CPU_LIFTJ,
                                    ["liftj-nolift"]),
    "beauty-loo-cpu-liftj-nolift-tallrec": ("beauty-loo-cpu-liftj", "amazon-beauty", _BEAUTY_LOO_CPU_LIFTJ,
                                            ["liftj-nolift-tallrec"]),
}
# a group whose base run is itself a variant of its profile names its DELRec row after that variant
BASE_NAMES: dict[str, str] = {"ml-100k-loo-cpu-w3": "DELRec, last 3 windows, prior weight auto",
                              "ml-100k-loo-cpu-l15": "DELRec, last 3 windows, last 15 blocks, prior weight auto",
                              "ml-100k-loo-cpu-liftj": "DELRec, last 3 windows, last 15 blocks + teacher history "
                                                       "lifts, prior weight auto",
                              "beauty-loo-cpu-w8-prior": "DELRec, titles ≤ 8 words, prior weight 0.75",
                              "beauty-loo-cpu-w8-auto": "DELRec, titles ≤ 8 words, prior weight auto",
                              "beauty-loo-cpu-liftj": "DELRec, titles ≤ 8 words, last 3 windows, last 15 blocks + "
                                                      "teacher history lifts, prior weight auto"}

# a group's base against another group's base on the same candidate file, where the two differ in one setting
BASE_AGAINST: dict[str, list[str]] = {"beauty-loo-cpu-w8-auto": ["beauty-loo-cpu-w8-prior"],
                                       "ml-100k-loo-cpu-liftj": ["ml-100k-loo-cpu-l15"]}
# a variant against another variant of its group (when that one has run): e.g. the untrained soft prompt against no
# soft prompt at all, which tells the extra tokens' cost from the distilled content's worth
VARIANT_AGAINST: dict[str, list[str]] = {"w3-untrained": ["w3-tallrec"], "w3-no-ta": ["w3-untrained"],
                                         "w3-no-rps": ["w3-untrained"], "w3-truth2": ["w3-kd2"],
                                         "liftj-untrained": ["liftj-tallrec"],
                                         "liftj-nolift-tallrec": ["liftj-nolift"]}


def by_popularity(ranks: dict[str, np.ndarray], counts: np.ndarray, groups: int = 5) -> list[dict[str, Any]]:
    """Each model's HR@1 and NDCG@5 within ``groups`` equal-size groups of test rows, ordered by their target's
    training count (coldest first): where, if anywhere, does the LLM's knowledge of titles beat the teacher's ids?"""
    order = np.argsort(counts, kind="stable")
    out = []
    for g, rows in enumerate(np.array_split(order, groups)):
        c = counts[rows]
        out.append({"group": g + 1, "n": len(rows), "count_range": [int(c.min()), int(c.max())],
                    **{m: {"HR@1": round(float(hit_rate(r[rows], 1).mean()), 4),
                           "NDCG@5": round(float(ndcg(r[rows], 5).mean()), 4)}
                       for m, r in ranks.items()}})
    return out


def popularity_table(groups: list[dict[str, Any]]) -> list[str]:
    """`by_popularity`'s groups as markdown rows: each model's HR@1 / NDCG@5 per group."""
    models = [k for k in groups[0] if k not in ("group", "n", "count_range")]
    out = ["| group | n | target count | " + " | ".join(models) + " |", "|---|---|---|" + "---|" * len(models)]
    for b in groups:
        lo, hi = b["count_range"]
        out.append(f"| {b['group']} | {b['n']} | {lo}–{hi} | "
                   + " | ".join(f"{b[m]['HR@1']:.3f} / {b[m]['NDCG@5']:.3f}" for m in models) + " |")
    return out


def target_counts(run: Path) -> np.ndarray:
    """Each test row's target's training count (the run's frozen test candidates, in their row order)."""
    dataset = SeqDataset.load(run / "data")
    split = Split.from_dict(read_json(run / "split.json"), dataset)
    test = CandidateSet.load(run / "candidates" / "test.parquet", seed=load_config(run / "config.yaml").candidates.seed)
    return item_counts(split.train_sequences, dataset.n_items)[test.targets]


def delrec_run(out: Path, overrides: list[str], reuse: Path | None, log: Path) -> float:
    """One resumable `delrec run` in a subprocess; returns the wall seconds of this invocation."""
    cmd = [sys.executable, "-m", "delrec", "run", "--out", str(out)]
    for o in overrides:
        cmd += ["--set", o]
    if reuse is not None:
        cmd += ["--reuse", str(reuse)]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with log.open("a", encoding="utf-8") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ})
    if proc.returncode != 0:
        sys.exit(f"{out}: delrec run failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - t0


def _ranks(run: Path, model: str) -> np.ndarray:
    name = model if model in ("DELRec", "popularity") else model.lower()
    return np.asarray(read_json(run / "results" / f"{name}.json")["ranks"], dtype=np.int64)


def _per_user(ranks: np.ndarray) -> dict[str, np.ndarray]:
    return {"HR@1": (ranks == 1).astype(float), "HR@5": (ranks <= 5).astype(float),
            "NDCG@5": np.where(ranks <= 5, 1 / np.log2(ranks + 1), 0.0)}


def _stage2_examples(run: Path) -> int | None:
    path = run / "finetune" / "history.json"
    if not path.is_file():
        return None
    h = read_json(path)
    cfg = h["config"]
    if cfg.get("adapter") == "none":
        return 0
    if h.get("train_predictions"):  # next-item predictions (a packed window holds several)
        return int(h["train_predictions"])
    return int(h["steps"]) * int(cfg["batch_size"]) * int(cfg["grad_accum"]) * int(h.get("processes", 1))


def rows_of(run: Path, part: str, models: list[str], rename: dict[str, str] | None = None) -> list[dict[str, Any]]:
    m = read_json(run / "metrics.json")
    out = []
    for model in models:
        row = m["models"][model]
        name = (rename or {}).get(model, model)
        wall = (row.get("train_s") or 0.0) + (row.get("infer_s") or 0.0)
        out.append({"dataset": m["dataset"], "split": m["split"], "model": name, "profile": m["profile"],
                    "part": part, "run": os.path.relpath(run, ROOT),
                    "train_examples": _stage2_examples(run) if model == "DELRec" else None,
                    "n_test": m["n_test"], "candidates_hash": m["candidates_hash"],
                    **{k: round(v["value"], 4) for k, v in row["metrics"].items()},
                    "ci": {k: [round(v["lo"], 4), round(v["hi"], 4)] for k, v in row["metrics"].items()},
                    "wall_s": round(wall, 1),
                    **({"prior_weight": row["prior_weight"]} if "prior_weight" in row else {})})
    return out


def sign_test(a: np.ndarray, b: np.ndarray) -> float:
    """Exact two-sided sign test p-value on the pairs where ``a`` and ``b`` differ."""
    wins, losses = int((a > b).sum()), int((a < b).sum())
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def bootstrap_diff(ra: np.ndarray, rb: np.ndarray, resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Per-row A − B of each metric, from the target ranks of the same rows: mean and 95% bootstrap CI."""
    pa, pb = _per_user(np.asarray(ra)), _per_user(np.asarray(rb))
    idx = np.random.default_rng(seed).integers(0, len(ra), size=(resamples, len(ra)))
    diff = {}
    for k in pa:
        d = pa[k] - pb[k]
        boot = d[idx].mean(axis=1)
        diff[k] = {"mean": round(float(d.mean()), 4), "ci": [round(float(np.quantile(boot, 0.025)), 4),
                                                            round(float(np.quantile(boot, 0.975)), 4)]}
    return diff


def paired(run_a: Path, model_a: str, name_a: str, run_b: Path, model_b: str, name_b: str,
           resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Per-user paired comparison of two models on the same frozen candidates."""
    ra, rb = _ranks(run_a, model_a), _ranks(run_b, model_b)
    if len(ra) != len(rb):
        raise SystemExit(f"{name_a} and {name_b} were ranked on different test sets ({len(ra)} vs {len(rb)})")
    return paired_ranks(ra, rb, name_a, name_b, resamples, seed)


def paired_ranks(ra: np.ndarray, rb: np.ndarray, name_a: str, name_b: str, resamples: int = 2000, seed: int = 0
                 ) -> dict[str, Any]:
    """`paired` on two models' target ranks of the same rows."""
    pa, pb = _per_user(ra), _per_user(rb)
    return {"a": name_a, "b": name_b, "n": len(ra), "diff_a_minus_b": bootstrap_diff(ra, rb, resamples, seed),
            "sign_test_HR@1_p": float(f"{sign_test(pa['HR@1'], pb['HR@1']):.3g}"),
            "HR@1_wins_losses": [int((pa["HR@1"] > pb["HR@1"]).sum()), int((pa["HR@1"] < pb["HR@1"]).sum())]}


def curve(run: Path, name: str) -> list[dict[str, Any]]:
    """Validation metrics of a stage-2 run against training examples seen (its periodic evaluations)."""
    path = run / "finetune" / "history.json"
    if not path.is_file():
        return []
    h = read_json(path)
    cfg = h["config"]
    per_step = int(cfg["batch_size"]) * int(cfg["grad_accum"]) * int(h.get("processes", 1))
    # entries of newer runs count next-item predictions (a packed window holds several)
    return [{"model": name, "examples": int(e.get("predictions") or int(e["step"]) * per_step),
             "n_valid": h.get("n_valid"), **e["valid"]} for e in h["history"] if "valid" in e]


def _deltas(d: dict[str, Any]) -> str:
    """The ΔHR@1 and ΔNDCG@5 cells (mean [95% CI]) of a paired test's ``diff_a_minus_b``."""
    return " | ".join(f"{d[k]['mean']:+.4f} [{d[k]['ci'][0]:+.3f}, {d[k]['ci'][1]:+.3f}]" for k in ("HR@1", "NDCG@5"))


def table(result: dict[str, Any]) -> list[str]:
    out = ["# Quality benchmark", "", f"Generated {result['generated']} by `benchmarks/quality.py`; settings chosen on "
           "validation users only (benchmarks/results/learning_log.md). All rows of one dataset/split/profile share "
           "one frozen candidate file (target + 19 negatives). 95% bootstrap CIs in brackets.", "",
           "| dataset | split | profile | model | HR@1 | HR@5 | NDCG@5 | stage-2 examples | n test | wall s |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ci = r["ci"]
        seen = "–" if r["train_examples"] is None else r["train_examples"]
        chosen = f" (chose λ {r['prior_weight']:g})" if "prior_weight" in r else ""  # prior_weight=auto's pick
        out.append(f"| {r['dataset']} | {r['split']} | {r['profile']} | {r['model']}{chosen} | {r['HR@1']:.4f} "
                   f"[{ci['HR@1'][0]:.3f}, {ci['HR@1'][1]:.3f}] | {r['HR@5']:.4f} | {r['NDCG@5']:.4f} "
                   f"[{ci['NDCG@5'][0]:.3f}, {ci['NDCG@5'][1]:.3f}] | {seen} | {r['n_test']} | {r['wall_s']:.0f} |")
    if result["tests"]:
        out += ["", "## Paired per-user tests", "",
                "| dataset | split | profile | A | B | n | ΔHR@1 (A−B) [95% CI] | ΔNDCG@5 [95% CI] | HR@1 wins/losses "
                "| sign test p |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for t in result["tests"]:
            d = t["diff_a_minus_b"]
            out.append(f"| {t['dataset']} | {t['split']} | {t['profile']} | {t['a']} | {t['b']} | {t['n']} | "
                       f"{_deltas(d)} | {t['HR@1_wins_losses'][0]}/{t['HR@1_wins_losses'][1]} | "
                       f"{t['sign_test_HR@1_p']:.3g} |")
    last = RESULTS / "quality_last_checkpoint.json"  # benchmarks/last_checkpoint.py: runs compared at equal updates
    if last.is_file():
        out += ["", "## At equal updates: a run's last stage-2 checkpoint instead of its validation-selected one", "",
                "| run | checkpoint (selected) | HR@1 | HR@5 | NDCG@5 | A | A − it: ΔHR@1 [95% CI] | ΔNDCG@5 [95% CI] "
                "| sign test p |", "|---|---|---|---|---|---|---|---|---|"]
        for e in read_json(last).values():
            mm, d = e["metrics"], e["paired"]["diff_a_minus_b"]
            out.append(f"| {e['run']} | {e['checkpoint_step']} ({e['selected_step']}) | {mm['HR@1']['value']:.4f} | "
                       f"{mm['HR@5']['value']:.4f} | {mm['NDCG@5']['value']:.4f} | "
                       f"{e['paired']['a']} ({e['against']}) | "
                       f"{_deltas(d)} | "
                       f"{e['paired']['sign_test_HR@1_p']:.3g} |")
    fifths = {p: v["by_popularity"] for p, v in result["parts"].items() if v.get("by_popularity")}
    if fifths:
        out += ["", "## HR@1 / NDCG@5 by the test target's training count", "",
                "Each part's test rows in five equal-size groups by their target's training interactions, coldest "
                "first (the runs of that part only)."]
        for p, groups in fifths.items():
            out += ["", f"`{p}`:", "", *popularity_table(groups)]
    legacy = sorted({r["profile"] for r in result["rows"]} & set(LEGACY_PROFILES))
    if legacy:
        out += ["", "Earlier settings of a profile, kept for comparison (not rerun): " + "; ".join(
            f"`{p}` = {LEGACY_PROFILES[p]}" for p in legacy) + "."]
    missing = [p for p in PARTS if p not in result["parts"]]
    if missing:
        out += ["", f"Parts not run yet: {', '.join(missing)}."]
    if result.get("curves"):
        out += ["", "![learning curve](quality_curve.png)"]
    return out


def plot(curves: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one panel per run group: its runs share one validation set, so only their curves compare
    groups: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for key, pts in curves.items():
        if pts:
            group, name = key.split(" ", 1)
            groups.setdefault(group, {})[name] = pts
    cols = min(3, max(1, len(groups)))
    rows = -(-len(groups) // cols) if groups else 1
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (group, named) in zip(axes.flat, groups.items(), strict=False):  # spare panels stay empty
        for name, pts in named.items():
            ax.plot([p["examples"] for p in pts], [p["NDCG@5"] for p in pts], marker="o", label=name)
        ax.set_title(group, fontsize=8)
        ax.set_xlabel("stage-2 training examples seen", fontsize=8)
        ax.set_ylabel("validation NDCG@5", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=list(PARTS), required=True)
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "quality")
    ap.add_argument("--base", type=Path, default=None, help="an existing base run folder for this part")
    ap.add_argument("--out", type=Path, default=RESULTS / "quality")
    ap.add_argument("--reuse", type=Path, default=None,
                    help="a finished run whose identical stages (data, teachers…) the base run copies")
    args = ap.parse_args()
    args.runs.mkdir(parents=True, exist_ok=True)
    log = args.runs / "quality.log"
    group, dataset, base_over, variants = PARTS[args.part]
    base = (args.base or args.runs / group).resolve()
    wall = {"base": delrec_run(base, base_over, args.reuse, log)}
    base_name = BASE_NAMES.get(group, "DELRec")
    rows = rows_of(base, args.part, ["popularity", *TEACHERS, "DELRec"], rename={"DELRec": base_name})
    runs = {base_name: base}
    for v in variants:
        over, name = VARIANTS[v]
        out = args.runs / f"{group}-{v}"
        src = args.runs / f"{group}-{VARIANT_REUSE[v]}" if v in VARIANT_REUSE else base
        if not (src / "metrics.json").is_file():
            sys.exit(f"variant {v} builds on {src}, which is not a finished run; run its part first")
        wall[v] = delrec_run(out, base_over + over, src, log)
        rows += rows_of(out, args.part, ["DELRec"], rename={"DELRec": name})
        runs[name] = out
    hashes = {r["candidates_hash"] for r in rows}
    if len(hashes) != 1:
        sys.exit(f"rows of part {args.part} were ranked on different candidate files: {sorted(hashes)}")

    m = read_json(base / "metrics.json")
    best = max(TEACHERS, key=lambda t: m["models"][t]["metrics"]["HR@1"]["value"])
    tests = [{"dataset": dataset, "split": m["split"], "profile": m["profile"],
              **paired(base, "DELRec", base_name, base, best, best)},
             {"dataset": dataset, "split": m["split"], "profile": m["profile"],
              **paired(base, "DELRec", base_name, base, "popularity", "popularity")}]
    for name, run in runs.items():  # DELRec against each variant of this part (TALLRec-style, ablations…)
        if run != base:
            tests.append({"dataset": dataset, "split": m["split"], "profile": m["profile"],
                          **paired(base, "DELRec", base_name, run, "DELRec", name)})
    for v in (v for v in variants if v in VARIANT_REUSE):  # a variant against the one it builds on: its extra change
        name, src_name = VARIANTS[v][1], VARIANTS[VARIANT_REUSE[v]][1]
        tests.append({"dataset": dataset, "split": m["split"], "profile": m["profile"],
                      **paired(runs[name], "DELRec", name, args.runs / f"{group}-{VARIANT_REUSE[v]}", "DELRec",
                               src_name)})
    def comparable(run: Path) -> bool:  # a finished run ranked on this part's candidate file
        return (run / "metrics.json").is_file() and \
            read_json(run / "metrics.json")["candidates_hash"] == m["candidates_hash"]

    for v in variants:
        for other in VARIANT_AGAINST.get(v, []):
            other_run = args.runs / f"{group}-{other}"
            if comparable(other_run):
                tests.append({"dataset": dataset, "split": m["split"], "profile": m["profile"],
                              **paired(runs[VARIANTS[v][1]], "DELRec", VARIANTS[v][1], other_run, "DELRec",
                                       VARIANTS[other][1])})
    for other in BASE_AGAINST.get(group, []):  # e.g. λ chosen on validation users against λ fixed by hand
        other_run = args.runs / other
        if comparable(other_run):
            tests.append({"dataset": dataset, "split": m["split"], "profile": m["profile"],
                          **paired(base, "DELRec", base_name, other_run, "DELRec", BASE_NAMES.get(other, "DELRec"))})
    # where each model's hits are: targets split into fifths by training count (the teachers' edge is the cold ones)
    fifths = by_popularity({"popularity": _ranks(base, "popularity"), best: _ranks(base, best),
                            **{name: _ranks(run, "DELRec") for name, run in runs.items()}}, target_counts(base))
    curves = {f"{group} {name}": curve(run, name) for name, run in runs.items()}  # one curve per run, not per part

    # curve keys named by a part of this group (older files) give way to the group's keys
    legacy = {p for p, spec in PARTS.items() if spec[0] == group} - {group}
    path = args.out.with_suffix(".json")
    old = read_json(path) if path.is_file() else {"rows": [], "tests": [], "parts": {}, "curves": {}}
    key = ("dataset", "split", "model", "profile")
    pairs_now = {(t["a"], t["b"]) for t in tests}
    mine = {tuple(r[k] for k in key) for r in rows}
    result = {
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows": [r for r in old["rows"] if tuple(r[k] for k in key) not in mine] + rows,
        "tests": [t for t in old["tests"] if (t["dataset"], t["split"], t["profile"]) !=
                  (dataset, m["split"], m["profile"]) or (t["a"], t["b"]) not in pairs_now] + tests,
        "parts": {**old.get("parts", {}), args.part: {"wall_s_this_invocation": {k: round(v, 1) for k, v in
                                                                                 wall.items()},
                                                      "best_teacher": best, "base": os.path.relpath(base, ROOT),
                                                      "by_popularity": fifths}},
        "curves": {**{k: v for k, v in old.get("curves", {}).items() if k.split(" ")[0] not in legacy}, **curves},
        "chance": chance_metrics(int(m["candidate_size"])),
    }
    write_json(path, result)
    write_text(args.out.with_suffix(".md"), "\n".join(table(result)) + "\n")
    plot(result["curves"], args.out.parent / f"{args.out.name}_curve.png")
    print("\n".join(table(result)))


if __name__ == "__main__":
    main()
