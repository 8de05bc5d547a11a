"""CUDA path of the product and the paper's Flan-T5-XL profile timed on one GPU (nothing downloaded).

    PYTHONPATH=src python3 benchmarks/cuda_check.py --out $OUT            # GPU: < 5 minutes on one H200
    OMP_NUM_THREADS=1 PYTHONPATH=src python3 benchmarks/cuda_check.py --device cpu --small  # smoke run (< 1 min)

Part 1, checks (each passes or fails on its own, with its error): tiny llama and T5 backbones (`delrec.llm.tiny`) —
`TitleScorer.score` and its soft-prompt gradient on the device equal the CPU ones for the same weights (fp32), a few
stage-1 `distill` steps on the device, a few stage-2 `finetune` steps (adalora, lora) with the distilled soft prompt,
the trained adapter's scores on the device equal the CPU ones.
Part 2, timing: a T5 with Flan-T5-XL's shape built from its config with random weights (bf16), the tiny tokenizer,
a 100-token soft prompt, prompts of ~``--prompt-tokens`` tokens (soft prompt included) with 20 candidates of
~``--title-tokens`` tokens. Timed (median of ``--repeats`` after one warm-up): (a) a stage-1 task gradient over 20
examples as `distill` computes it (only the soft prompt trains; micro-batches of `DistillConfig.micro_batch_size`, and
the whole batch in one pass), (b) a stage-2 micro-batch of 20 with AdaLoRA (`peft_config` of the paper
`FinetuneConfig`) and the optimizer update, (c) forward-only scoring (`TitleScorer.rank`), examples/s. Peak GPU memory
per phase; the paper's stage-1 (800 steps, 2 tasks × 20) and stage-2 (1400 updates × 6 × 20) wall time extrapolated.
Writes cuda_check.json and cuda_check.md to ``--out`` after every check and phase (so a timeout keeps what ran).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DELREC_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import math
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from delrec.data.splits import Split, make_split
from delrec.distill import DistillConfig, _task_grad, distill
from delrec.finetune import ADAPTER_DIR, PAPER, FinetuneConfig, finetune, orthogonal_regularizer, peft_config
from delrec.io import read_json, write_json, write_text
from delrec.llm import Backbone, SoftPrompt, SoftPromptConfig, lsr_prompt
from delrec.llm.prompts import ScoringConfig
from delrec.llm.tiny import successor_topk, tiny_backbone, tiny_dataset, tiny_tokenizer

SCORE_RTOL = 5e-5  # max |device − cpu| / max |cpu| of fp32 title log-likelihoods (reduction order differs)
GRAD_TOL = 1e-3  # max |device − cpu| / max |cpu| of the soft prompt's gradient
XL = dict(d_model=2048, d_ff=5120, num_layers=24, num_decoder_layers=24, num_heads=32, d_kv=64)
SMALL = dict(d_model=64, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=16)
WORDS = ["Star", "Wars", "Heat", "Fargo", "Alien", "Batman", "Casino", "Babe", "Toy", "Story", "Trek", "Returns",
         "Jumanji", "Sabrina", "Aliens"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def peak_gib(dev: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def timed(fn: Callable[[], Any], dev: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` runs after ``warmup`` runs (device synchronised)."""
    walls = []
    for i in range(warmup + repeats):
        sync(dev)
        t = time.perf_counter()
        fn()
        sync(dev)
        if i >= warmup:
            walls.append(time.perf_counter() - t)
    return statistics.median(walls)


class Report:
    """Results so far; written to ``out`` after every check and phase."""

    def __init__(self, out: Path, meta: dict[str, Any]) -> None:
        self.out, self.data = out, {**meta, "checks": {}, "timing": {}, "extrapolation": {}}

    def check(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        log(f"check {name} ...")
        t = time.perf_counter()
        try:
            res = fn()
            res = {"ok": bool(res.pop("ok", True)), **res, "error": None}
        except Exception as e:  # one failed check must not stop the others
            res = {"ok": False, "error": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc(limit=-4).splitlines()[-8:]}
        res["seconds"] = round(time.perf_counter() - t, 2)
        self.data["checks"][name] = res
        log(f"check {name}: {'PASS' if res['ok'] else 'FAIL'} ({res['seconds']} s) "
            f"{res['error'] or {k: v for k, v in res.items() if k not in ('ok', 'error', 'seconds')}}")
        self.save()
        return res

    def phase(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        log(f"timing {name} ...")
        try:
            res: dict[str, Any] = {**fn(), "error": None}
        except Exception as e:  # e.g. out of memory: record it, go on
            res = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        self.data["timing"][name] = res
        log(f"timing {name}: {res}")
        self.save()
        return None if res["error"] else res

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / "cuda_check.json", self.data)
        write_text(self.out / "cuda_check.md", self.markdown())

    def markdown(self) -> str:
        d = self.data
        md = [f"# CUDA check and Flan-T5-XL-shape timing ({d['device_name']})", "",
              f"torch {d['versions']['torch']}, transformers {d['versions']['transformers']}, peft "
              f"{d['versions']['peft']}; model `{d['model']}` {d['dtype']}, {d['repeats']} repeat(s).", "",
              "| check | result | detail |", "|---|---|---|"]
        for name, r in d["checks"].items():
            detail = r["error"] or ", ".join(f"{k}={_fmt(v)}" for k, v in r.items()
                                             if k not in ("ok", "error", "seconds", "traceback"))
            md.append(f"| {name} | {'pass' if r['ok'] else '**FAIL**'} | {detail} |")
        md += ["", "| timing | s / step | peak GiB | note |", "|---|---|---|---|"]
        for name, r in d["timing"].items():
            if r.get("error"):
                md.append(f"| {name} | — | — | **{r['error'][:200]}** |")
                continue
            note = ", ".join(f"{k}={_fmt(v)}" for k, v in r.items() if k not in ("seconds", "peak_gib", "error"))
            md.append(f"| {name} | {_fmt(r.get('seconds'))} | {_fmt(r.get('peak_gib'))} | {note} |")
        if d["extrapolation"]:
            md += ["", "Extrapolated paper wall time on this device (training steps; validation as noted):", ""]
            md += [f"- {k}: {_fmt(v)}" for k, v in d["extrapolation"].items()]
        return "\n".join([*md, ""])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


# --- part 1: the product's CUDA path on tiny models -----------------------------------------------------------------
def _fake_topk(split: Split, k: int = 5) -> np.ndarray:
    return successor_topk(split, k)


def _tiny_rows(titles: list[str], n: int = 4, hist: int = 5, cands: int = 8) -> tuple[list[str], list[list[str]]]:
    rng = np.random.default_rng(0)
    prompts, rows = [], []
    for _ in range(n):
        pick = rng.choice(np.arange(1, len(titles)), hist + cands, replace=False)
        row = [titles[i] for i in pick[hist:]]
        prompts.append(lsr_prompt("movie", "SASRec", [titles[i] for i in pick[:hist]], row))
        rows.append(row)
    return prompts, rows


def _score_and_grad(bb: Backbone, sp: SoftPrompt, prompts: list[str], rows: list[list[str]],
                    where: str | torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scores (and the soft prompt's gradient of a CE loss, if it is trainable) with everything on ``where``."""
    bb.device = where
    sp.to(where)
    scorer = ScoringConfig().scorer(bb, sp)
    grad_on = sp.weight.requires_grad
    with torch.set_grad_enabled(grad_on):
        scores = scorer.score(prompts, rows)
        grad = None
        if grad_on:
            loss = F.cross_entropy(scores.float(), torch.zeros(len(prompts), dtype=torch.long, device=scores.device))
            (grad,) = torch.autograd.grad(loss, [sp.weight])
            grad = grad.cpu()
    return scores.detach().float().cpu(), grad


def device_vs_cpu(bb: Backbone, sp: SoftPrompt, titles: list[str], dev: torch.device) -> dict[str, Any]:
    prompts, rows = _tiny_rows(titles)
    s_dev, g_dev = _score_and_grad(bb, sp, prompts, rows, dev)
    s_cpu, g_cpu = _score_and_grad(bb, sp, prompts, rows, "cpu")
    bb.device = dev
    sp.to(dev)
    res: dict[str, Any] = {"max_abs_diff": float((s_dev - s_cpu).abs().max()), "score_range":
                           [round(float(s_cpu.min()), 3), round(float(s_cpu.max()), 3)]}
    res["max_rel_diff"] = res["max_abs_diff"] / max(float(s_cpu.abs().max()), 1e-12)
    ok = bool(torch.isfinite(s_dev).all()) and res["max_rel_diff"] < SCORE_RTOL
    if g_dev is not None and g_cpu is not None:
        res["grad_rel_diff"] = float((g_dev - g_cpu).abs().max() / g_cpu.abs().max().clamp_min(1e-12))
        ok = ok and bool(torch.isfinite(g_dev).all()) and res["grad_rel_diff"] < GRAD_TOL
    return {"ok": ok, **res}


def run_checks(rep: Report, dev: torch.device, tmp: Path) -> None:
    torch.set_float32_matmul_precision("highest")  # fp32 really fp32 (no TF32) for the comparisons
    ds = tiny_dataset(n_users=30, n_items=60, min_len=5, max_len=12, seed=1)
    split = make_split(ds, "user", seed=0)
    titles = list(ds.titles)
    soft: dict[str, SoftPrompt] = {}
    for kind in ("llama", "t5"):
        def scores(kind: str = kind) -> dict[str, Any]:
            bb = tiny_backbone(kind, extra_text=titles[1:])
            return device_vs_cpu(bb, SoftPrompt.init_for(bb, SoftPromptConfig(num_tokens=4, seed=1)), titles, dev)

        rep.check(f"scores_{kind}_device_vs_cpu", scores)

        def stage1(kind: str = kind) -> dict[str, Any]:
            bb = tiny_backbone(kind, extra_text=titles[1:])
            bb.device = dev
            cfg = DistillConfig(lr=0.05, warmup_steps=0, total_steps=6, batch_size=4, micro_batch_size=2,
                                eval_every=3, teacher_k=4, candidate_size=8, history_len=4, train_examples=4, seed=7)
            out = tmp / f"distill_{kind}"
            sp = distill(bb, ds, split, _fake_topk(split), "SASRec", cfg, out,
                         soft_prompt_cfg=SoftPromptConfig(num_tokens=4), progress=False)
            soft[kind] = sp
            losses = [s["loss"] for s in read_json(out / "history.json")["steps"]]
            return {"ok": all(map(math.isfinite, losses)) and sp.weight.device.type == dev.type,
                    "steps": len(losses), "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
                    "soft_prompt_device": str(sp.weight.device)}

        rep.check(f"distill_{kind}", stage1)

    for kind, adapter in (("t5", "adalora"), ("llama", "adalora"), ("t5", "lora"), ("llama", "lora")):
        def stage2(kind: str = kind, adapter: str = adapter) -> dict[str, Any]:
            sp = soft[kind]  # KeyError (reported) when that kind's distill check failed
            bb = tiny_backbone(kind, extra_text=titles[1:])
            bb.device = dev
            base0 = {n: p.detach().clone() for n, p in bb.model.named_parameters()}
            cfg = FinetuneConfig.from_profile(
                "cpu", adapter=adapter, sliding_window=False, init_r=6, target_r=2, tinit=2, tfinal=2, lr=0.05,
                warmup_steps=0, max_steps=6, batch_size=8, grad_accum=2, eval_every=3, patience=0, history_len=5,
                max_train_examples=16, max_valid_examples=0, eval_batch_size=4, seed=7)
            out = tmp / f"finetune_{kind}_{adapter}"
            bb = finetune(bb, ds, split, sp, "SASRec", cfg, out)
            losses = [e["loss"] for e in read_json(out / "history.json")["history"]]
            named = dict(bb.model.named_parameters())
            lora = [p for n, p in named.items() if "lora_" in n]
            base_now = {n.replace(".base_layer.", "."): p for n, p in named.items() if "lora_" not in n}
            frozen = all(torch.equal(base_now[n], p) for n, p in base0.items() if n in base_now)
            res = device_vs_cpu(bb, sp, titles, dev)
            return {**res, "ok": res["ok"] and all(map(math.isfinite, losses)) and frozen
                    and all(p.device.type == dev.type for p in lora) and (out / ADAPTER_DIR).is_dir(),
                    "steps": len(losses), "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
                    "base_frozen": frozen, "adapter_tensors": len(lora)}

        rep.check(f"finetune_{kind}_{adapter}", stage2)


# --- part 2: the paper's profile shape ------------------------------------------------------------------------------
def xl_backbone(small: bool, dev: torch.device, dtype: torch.dtype) -> Backbone:
    from transformers import T5Config, T5ForConditionalGeneration

    tok = tiny_tokenizer("t5")
    ids = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
           "decoder_start_token_id": tok.pad_token_id}
    cfg = T5Config(**(SMALL if small else XL), vocab_size=32128, feed_forward_proj="gated-gelu",
                   tie_word_embeddings=False, **ids)
    if max(tok.get_vocab().values()) >= cfg.vocab_size:
        raise ValueError("tokenizer ids exceed the model's vocabulary")
    torch.manual_seed(0)
    with dev:  # initialise on the device: fp32 init of 2.85B parameters on the CPU would take minutes
        model = T5ForConditionalGeneration(cfg)
    return Backbone.from_model(model.to(dtype).eval(), tok)


def make_inputs(bb: Backbone, n_soft: int, n: int, prompt_tokens: int, title_tokens: int
                ) -> tuple[list[str], list[list[str]], dict[str, float]]:
    """``n`` LSR prompts of ≥ ``prompt_tokens`` tokens (soft prompt included; grown by history titles) with 20
    candidates of ~``title_tokens`` tokens (end of sequence included)."""
    rng = np.random.default_rng(0)
    scorer = ScoringConfig().scorer(bb, None)
    pool = []
    for i in range(400):
        words = [WORDS[int(rng.integers(len(WORDS)))]]
        while len(scorer.encode_title(f"{' '.join(words)} ({1900 + i})")) < title_tokens:
            words.append(WORDS[int(rng.integers(len(WORDS)))])
        pool.append(f"{' '.join(words)} ({1900 + i})")
    prompts, rows, p_len = [], [], []
    for _ in range(n):
        pick = rng.choice(len(pool), 60, replace=False)
        row, hist = [pool[i] for i in pick[:20]], [pool[i] for i in pick[20:]]
        h = 1
        while h < len(hist) and len(scorer.encode_prompt(lsr_prompt("movie", "SASRec", hist[:h], row))) + n_soft \
                < prompt_tokens:
            h += 1
        prompts.append(lsr_prompt("movie", "SASRec", hist[:h], row))
        rows.append(row)
        p_len.append(len(scorer.encode_prompt(prompts[-1])) + n_soft)
    t_len = [len(scorer.encode_title(t)) for r in rows for t in r]
    return prompts, rows, {"prompt_tokens_mean": float(np.mean(p_len)), "title_tokens_mean": float(np.mean(t_len))}


def run_timing(rep: Report, args: argparse.Namespace, dev: torch.device, dtype: torch.dtype) -> None:
    t = time.perf_counter()
    bb = xl_backbone(args.small, dev, dtype)
    n_params = sum(p.numel() for p in bb.model.parameters())
    soft = SoftPrompt.init_for(bb, SoftPromptConfig(num_tokens=args.soft_tokens))
    B = args.batch
    prompts, rows, lens = make_inputs(bb, args.soft_tokens, 2 * B, args.prompt_tokens, args.title_tokens)
    target = np.random.default_rng(1).integers(0, 20, len(prompts))
    rep.data["xl"] = {"parameters": n_params, "build_seconds": round(time.perf_counter() - t, 1), **lens}
    log(f"model built: {n_params / 1e9:.2f}B parameters, {rep.data['xl']}")
    dcfg, reps = DistillConfig(), args.repeats
    data = (prompts, rows, target)
    out: dict[str, dict[str, Any] | None] = {}

    def stage1(micro: int) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            scorer = ScoringConfig().scorer(bb, soft, batch_size=micro)
            reset_peak(dev)
            losses: list[float] = []
            s = timed(lambda: losses.append(_task_grad(scorer, data, np.arange(B), micro)[0]), dev, reps)
            return {"seconds": s, "peak_gib": peak_gib(dev), "batch": B, "micro_batch": micro,
                    "loss_finite": math.isfinite(losses[-1])}
        return run

    out["stage1"] = rep.phase(f"stage1_task_grad_b{B}_micro{dcfg.micro_batch_size}", stage1(dcfg.micro_batch_size))
    rep.phase(f"stage1_task_grad_b{B}_one_pass", stage1(B))

    def evaluate(batch: int, tag: str) -> None:
        def run() -> dict[str, Any]:
            scorer = ScoringConfig().scorer(bb, soft, batch_size=batch)
            reset_peak(dev)
            s = timed(lambda: scorer.rank(prompts, rows), dev, reps)
            return {"seconds": s, "peak_gib": peak_gib(dev), "examples_per_s": len(prompts) / s, "batch": batch,
                    "examples": len(prompts)}
        out[f"eval_{tag}_b{batch}"] = rep.phase(f"eval_{tag}_b{batch}", run)

    for b in sorted({dcfg.micro_batch_size, B}):
        evaluate(b, "base")

    fcfg = PAPER

    def stage2() -> dict[str, Any]:
        from peft import get_peft_model

        soft.freeze()
        torch.manual_seed(fcfg.seed)
        t0 = time.perf_counter()
        model = get_peft_model(bb.model, peft_config(bb, fcfg))
        bb.model = model
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=fcfg.lr, weight_decay=fcfg.weight_decay)
        scorer = ScoringConfig().scorer(bb, soft)
        tgt = torch.as_tensor(target[:B], device=dev)
        model.train()  # as finetune(): dropout on in the adapters and the backbone
        step = [fcfg.schedule()[0]]  # inside AdaLoRA's rank-pruning window: update_and_allocate does its most work

        def micro() -> None:
            scores = scorer.score(prompts[:B], rows[:B])
            (F.cross_entropy(scores.float(), tgt) / fcfg.grad_accum).backward()

        def update() -> None:
            (fcfg.orth_reg_weight * orthogonal_regularizer(model)).backward()
            torch.nn.utils.clip_grad_norm_(params, fcfg.grad_clip)
            opt.step()
            step[0] += 1
            model.base_model.update_and_allocate(step[0])
            opt.zero_grad(set_to_none=True)

        setup = time.perf_counter() - t0
        reset_peak(dev)
        t_micro, t_update = [], []
        for _ in range(1 + reps):  # the first pair is the warm-up
            t_micro.append(timed(micro, dev, 1, warmup=0))
            t_update.append(timed(update, dev, 1, warmup=0))
        return {"seconds": statistics.median(t_micro[1:]), "peak_gib": peak_gib(dev), "batch": B,
                "update_seconds": statistics.median(t_update[1:]), "adapter": fcfg.adapter, "init_r": fcfg.init_r,
                "trainable_params": sum(p.numel() for p in params), "adapter_dtype": str(params[0].dtype),
                "peft_setup_seconds": round(setup, 1)}

    out["stage2"] = rep.phase(f"stage2_adalora_micro_b{B}", stage2)
    if hasattr(bb.model, "peft_config"):
        evaluate(B, "adalora")

    ex = rep.data["extrapolation"]
    if out["stage1"]:
        s1 = dcfg.total_steps * len(dcfg.tasks) * out["stage1"]["seconds"]
        ex["stage1_train_hours"] = s1 / 3600
        ev = out.get(f"eval_base_b{dcfg.micro_batch_size}")
        if ev:
            n_eval = dcfg.total_steps // dcfg.eval_every * (dcfg.eval_examples or 0)
            ex["stage1_validation_hours"] = n_eval / ev["examples_per_s"] / 3600
        ex["stage1_formula"] = (f"{dcfg.total_steps} steps x {len(dcfg.tasks)} tasks x task gradient over "
                                f"{dcfg.batch_size} (micro {dcfg.micro_batch_size}); validation "
                                f"{dcfg.total_steps // dcfg.eval_every} x {dcfg.eval_examples} examples")
    if out["stage2"]:
        s2 = fcfg.max_steps * (fcfg.grad_accum * out["stage2"]["seconds"] + out["stage2"]["update_seconds"])
        ex["stage2_train_hours"] = s2 / 3600
        ev = out.get(f"eval_adalora_b{B}") or out.get(f"eval_base_b{B}")
        if ev:
            ex["stage2_validation_hours_per_1000_examples_every_50_steps"] = \
                fcfg.max_steps // fcfg.eval_every * 1000 / ev["examples_per_s"] / 3600
        ex["stage2_formula"] = (f"{fcfg.max_steps} updates x ({fcfg.grad_accum} micro-batches of {fcfg.batch_size} + "
                                "update); validation every 50 updates")
    rep.save()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny T5 instead of the XL shape, fp32, 1 repeat")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats after one warm-up (default 3; 1 small)")
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--prompt-tokens", type=int, default=400, help="encoder tokens per prompt, soft prompt included")
    ap.add_argument("--title-tokens", type=int, default=10, help="tokens per candidate title, end of sequence included")
    ap.add_argument("--soft-tokens", type=int, default=100)
    ap.add_argument("--skip-checks", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("CUDA is not available (use --device cpu --small for a smoke run)")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", 0)
    args.repeats = args.repeats or (1 if args.small else 3)
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    import accelerate
    import peft
    import transformers

    rep = Report(args.out, {
        "device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else
        platform.processor() or platform.machine(), "model": "t5-small-shape" if args.small else "flan-t5-xl-shape",
        "dtype": str(dtype).removeprefix("torch."), "repeats": args.repeats, "python": platform.python_version(),
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
                     "peft": peft.__version__, "accelerate": accelerate.__version__},
        "argv": sys.argv[1:]})
    t0 = time.perf_counter()
    if not args.skip_checks:
        with tempfile.TemporaryDirectory() as tmp:
            run_checks(rep, dev, Path(tmp))
    if not args.skip_timing:
        try:
            run_timing(rep, args, dev, dtype)
        except Exception as e:  # e.g. the model does not build: keep part 1's results
            rep.data["timing"]["setup"] = {"error": f"{type(e).__name__}: {e}"}
            traceback.print_exc()
    rep.data["total_seconds"] = round(time.perf_counter() - t0, 1)
    rep.data["all_checks_pass"] = all(r["ok"] for r in rep.data["checks"].values())
    rep.save()
    print((args.out / "cuda_check.json").read_text(encoding="utf-8"), flush=True)
    print((args.out / "cuda_check.md").read_text(encoding="utf-8"), flush=True)


if __name__ == "__main__":
    main()
