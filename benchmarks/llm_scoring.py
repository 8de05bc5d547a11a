"""Speed of candidate scoring on SmolLM2-135M: the one-pass scorer (`TitleScorer.score`) vs one forward pass per
candidate (`TitleScorer.score_naive`), with a realistic stage-2 prompt.

    OMP_NUM_THREADS=2 python benchmarks/llm_scoring.py            # 10 history titles, 20 candidates, 20 soft tokens
    OMP_NUM_THREADS=2 python benchmarks/llm_scoring.py --naive-examples 1 --repeats 1

Reports seconds per example (median of ``--repeats``) for fast scoring without grad (ranking), fast scoring with
grad + backward (a training step's work), and naive scoring without grad; then stage 2's training work per next-item
prediction in the same run: the listed-candidate example (the paper's verbalizer), the ``open`` one (candidates not
listed) and the ``next`` verbalizer's packed window (`TitleScorer.sequence_scores`: history+1 titles, every title
after the first one prediction). Process CPU/wall (≈ threads when the machine is otherwise idle). Writes
benchmarks/results/llm_scoring.json and .md (or ``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from delrec.io import write_json, write_text
from delrec.llm import Backbone, BackboneConfig, SoftPrompt, SoftPromptConfig, TitleScorer, lsr_prompt
from delrec.llm.prompts import ScoringConfig, lsr_head

TITLES = [
    "Toy Story (1995)", "GoldenEye (1995)", "Four Rooms (1995)", "Get Shorty (1995)", "Copycat (1995)",
    "Twelve Monkeys (1995)", "Babe (1995)", "Dead Man Walking (1995)", "Richard III (1995)", "Seven (Se7en) (1995)",
    "The Usual Suspects (1995)", "Mighty Aphrodite (1995)", "Postino, Il (1994)", "Mr. Holland's Opus (1995)",
    "French Twist (Gazon maudit) (1995)", "From Dusk Till Dawn (1996)", "White Balloon, The (1995)",
    "Antonia's Line (1995)", "Angels and Insects (1995)", "Muppet Treasure Island (1996)", "Braveheart (1995)",
    "Taxi Driver (1976)", "Rumble in the Bronx (1995)", "Birdcage, The (1996)", "Brothers McMullen, The (1995)",
    "Bad Boys (1995)", "Apollo 13 (1995)", "Batman Forever (1995)", "Belle de jour (1967)", "Crimson Tide (1995)",
    "Crumb (1994)", "Desperado (1995)", "Doom Generation, The (1995)", "Free Willy 2: The Adventure Home (1995)",
    "Mad Love (1995)", "Nadja (1994)", "Net, The (1995)", "Strange Days (1995)", "To Wong Foo, Thanks for Everything! "
    "Julie Newmar (1995)", "Billy Madison (1995)", "Clerks (1994)", "Disclosure (1994)", "Dolores Claiborne (1994)",
]


def examples(n: int, history: int, cands: int, seed: int) -> tuple[list[str], list[list[str]]]:
    rng = np.random.default_rng(seed)
    prompts, rows = [], []
    for _ in range(n):
        pick = rng.choice(len(TITLES), history + cands, replace=False)
        hist, row = [TITLES[i] for i in pick[:history]], [TITLES[i] for i in pick[history:]]
        prompts.append(lsr_prompt("movie", "SASRec", hist, row))
        rows.append(row)
    return prompts, rows


def cpu_model() -> str:
    """The CPU's model name and widest vector unit: hosts of one name differ ~2x in fp32 matmul (AVX-512 or not)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.machine())
    return f"{name}, {'AVX-512' if 'avx512f' in info else 'AVX2' if 'avx2' in info else 'no AVX2'}"


def timed(fn: Callable[[], Any], repeats: int) -> dict[str, float]:
    walls, cpus = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return {"wall_s": statistics.median(walls), "cpu_per_wall": round(sum(cpus) / sum(walls), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="smollm2-135m")
    ap.add_argument("--history", type=int, default=10)
    ap.add_argument("--candidates", type=int, default=20)
    ap.add_argument("--soft-tokens", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4, help="examples per fast forward pass")
    ap.add_argument("--naive-examples", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lora-layers", default="0,15,10",
                    help="stage 2's packed LoRA step (no soft prompt) adapting the last N blocks; 0 = every block")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    bb = Backbone.load(BackboneConfig(name_or_path=args.backbone))
    soft = SoftPrompt.init_for(bb, SoftPromptConfig(num_tokens=args.soft_tokens))
    scorer = TitleScorer(bb, soft)
    prompts, rows = examples(args.batch, args.history, args.candidates, seed=0)
    p_tokens = [len(scorer.encode_prompt(p)) for p in prompts]
    t_tokens = [len(scorer.encode_title(t)) for r in rows for t in r]
    with torch.no_grad():
        scorer.score(prompts[:1], rows[:1])  # warm-up
        fast = timed(lambda: scorer.score(prompts, rows), args.repeats)
        n = args.naive_examples
        naive = timed(lambda: scorer.score_naive(prompts[:n], rows[:n]), 1)
        diff = float((scorer.score(prompts[:n], rows[:n]) - scorer.score_naive(prompts[:n], rows[:n])).abs().max())

    def train_step() -> None:
        soft.weight.grad = None
        s = scorer.score(prompts, rows)
        torch.nn.functional.cross_entropy(s, torch.zeros(len(prompts), dtype=torch.long)).backward()

    train = timed(train_step, args.repeats)
    per = {"fast_no_grad": fast["wall_s"] / args.batch, "fast_grad_backward": train["wall_s"] / args.batch,
           "naive_no_grad": naive["wall_s"] / args.naive_examples}

    # Stage-2 training work per next-item prediction, three verbalizers, same run.
    rng = np.random.default_rng(1)
    hists = [[TITLES[i] for i in rng.choice(len(TITLES), args.history + 1, replace=False)] for _ in range(args.batch)]
    open_scorer = ScoringConfig(verbalizer="open").scorer(bb, soft)
    open_prompts = [lsr_prompt("movie", "SASRec", h[:-1], r, verbalizer="open") for h, r in zip(hists, rows,
                                                                                               strict=True)]
    next_scorer = ScoringConfig(verbalizer="next").scorer(bb, soft)
    heads = [lsr_head("movie", "SASRec")] * args.batch

    def open_step() -> None:
        soft.weight.grad = None
        s = open_scorer.score(open_prompts, rows)
        torch.nn.functional.cross_entropy(s, torch.zeros(len(rows), dtype=torch.long)).backward()

    def packed_step() -> None:
        soft.weight.grad = None
        (-next_scorer.sequence_scores(heads, hists).mean()).backward()

    open_t, packed_t = timed(open_step, args.repeats), timed(packed_step, args.repeats)
    per_pred = {"listed_candidates": per["fast_grad_backward"], "open_candidates": open_t["wall_s"] / args.batch,
                "next_packed_window": packed_t["wall_s"] / (args.batch * args.history)}

    # What the cpu profiles' stage 2 runs: the packed window, LoRA on q, v, no soft prompt; the blocks below the
    # lowest adapted one need no backward pass (finetune.lora_layers).
    from peft import get_peft_model

    from delrec.finetune import CPU, peft_config

    lora: dict[str, dict[str, float]] = {}
    plain = [lsr_head("movie", "SASRec", soft_prompt=False)] * args.batch
    for n in [int(x) for x in args.lora_layers.split(",") if x.strip()]:
        lbb = Backbone.load(BackboneConfig(name_or_path=args.backbone))
        lbb.model = get_peft_model(lbb.model, peft_config(lbb, dataclasses.replace(CPU, lora_layers=n)))
        lscorer = ScoringConfig(verbalizer="next", reduce="sum").scorer(lbb, None)
        lparams = [q for q in lbb.model.parameters() if q.requires_grad]

        def lora_step(sc: TitleScorer = lscorer, ps: list[torch.nn.Parameter] = lparams) -> None:
            for q in ps:
                q.grad = None
            (-sc.sequence_scores(plain, hists).mean()).backward()

        lora_step()  # warm-up
        t = timed(lora_step, args.repeats)
        lora[str(n)] = {"s_per_prediction": t["wall_s"] / (args.batch * args.history),
                        "cpu_per_wall": t["cpu_per_wall"]}
    result = {
        "backbone": args.backbone, "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "machine": cpu_model(),
        "history_titles": args.history, "candidates": args.candidates, "soft_tokens": args.soft_tokens,
        "batch": args.batch, "prompt_tokens_mean": float(np.mean(p_tokens)),
        "title_tokens_mean": float(np.mean(t_tokens)), "seconds_per_example": per,
        "speedup_naive_over_fast": per["naive_no_grad"] / per["fast_no_grad"],
        "cpu_per_wall": {"fast": fast["cpu_per_wall"], "train": train["cpu_per_wall"],
                         "naive": naive["cpu_per_wall"]},
        "max_abs_diff_fast_vs_naive": diff, "repeats": args.repeats, "naive_examples": args.naive_examples,
        "train_seconds_per_prediction": per_pred,
        "packed_speedup_over_listed": per_pred["listed_candidates"] / per_pred["next_packed_window"],
        "lora_packed_by_layers": lora,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "llm_scoring.json", result)
    md = [f"# Candidate scoring speed ({args.backbone}, {result['threads']} threads, {result['machine']})", "",
          f"{args.history} history titles, {args.candidates} candidates, {args.soft_tokens} soft tokens; prompt "
          f"≈{result['prompt_tokens_mean']:.0f} tokens, title ≈{result['title_tokens_mean']:.1f} tokens.", "",
          "| path | s / example | CPU/wall |", "|---|---|---|",
          f"| fast, no grad (rank) | {per['fast_no_grad']:.2f} | {fast['cpu_per_wall']} |",
          f"| fast, grad + backward (train) | {per['fast_grad_backward']:.2f} | {train['cpu_per_wall']} |",
          f"| naive, no grad | {per['naive_no_grad']:.2f} | {naive['cpu_per_wall']} |", "",
          f"naive / fast = {result['speedup_naive_over_fast']:.1f}x; max |fast − naive| = {diff:.2e}", "",
          "Stage-2 training (grad + backward) per next-item prediction, same run:", "",
          "| verbalizer / objective | s / prediction | CPU/wall |", "|---|---|---|",
          f"| title (listed candidates), candidates | {per_pred['listed_candidates']:.3f} | {train['cpu_per_wall']} |",
          f"| open (not listed), candidates | {per_pred['open_candidates']:.3f} | {open_t['cpu_per_wall']} |",
          f"| next, sequence (packed window of {args.history + 1} titles) | {per_pred['next_packed_window']:.3f} | "
          f"{packed_t['cpu_per_wall']} |", "",
          f"packed / listed = {result['packed_speedup_over_listed']:.1f}x more predictions per CPU-second", ""]
    if lora:
        every = lora.get("0", next(iter(lora.values())))["s_per_prediction"]
        md += ["Stage 2 as the cpu profiles run it (packed window, LoRA r 8 on q, v, no soft prompt), adapting the "
               "last N blocks (`finetune.lora_layers`; 0 = every block), same run:", "",
               "| blocks adapted | s / prediction | vs every block | CPU/wall |", "|---|---|---|---|"]
        md += [f"| {'every' if k == '0' else 'last ' + k} | {v['s_per_prediction']:.4f} | "
               f"{every / v['s_per_prediction']:.2f}x | {v['cpu_per_wall']} |" for k, v in lora.items()]
        md.append("")
    write_text(args.out / "llm_scoring.md", "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
