#!/usr/bin/env python
"""Benchmark the teachers (SASRec, GRU4Rec, Caser) and compare them with RecBole 1.2.1 on the same data.

    python benchmarks/teachers.py                 # everything (~35-45 min; two processes at once)
    python benchmarks/teachers.py --quick         # 2 epochs each, to check the plumbing
    python benchmarks/teachers.py --no-recbole --runs ml-100k/loo

What it measures, per teacher and split (ML-100K loo + user, Amazon Beauty loo):
- HR@1, HR@5, NDCG@5 on the frozen 20-candidate test sets (target + 19 unseen items, seed 0), 95% bootstrap CIs;
- full-ranking HR@10 / NDCG@10 on the test targets (history not masked, as RecBole does for sequential models);
- training seconds per epoch, epochs run (early stopping on valid NDCG@10), peak RSS, process CPU time / wall time
  (≈ threads when the machine is otherwise idle; lower means other work took the cores).
Each run is its own subprocess, so its peak RSS and CPU time are its own.

RecBole: its SASRec/GRU4Rec/Caser train on the same ML-100K leave-one-out split, written as RecBole atomic files
(timestamps replaced by positions, so both sides order every sequence identically), with the same hidden size,
max length, loss (CE over all items), batch size, learning rate, dropout and early stopping, in their own virtual
environment (benchmarks/.work/recbole-venv; made on first use). Ours and RecBole's run one after the other in the
same process tree, so their times are comparable even if the machine is shared.

Writes benchmarks/results/teachers.json and teachers.md (atomically). Only the standard library is imported at
module level: the RecBole worker runs this same file under the RecBole venv's Python.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".work" / "teachers"
VENV = ROOT / "benchmarks" / ".work" / "recbole-venv"
RESULTS = ROOT / "benchmarks" / "results"
SHARED = Path(os.environ.get("DELREC_SHARED_DATA", "/work/shared/data"))
DATASETS: dict[str, dict[str, Any]] = {
    "ml-100k": {"name": "ml-100k", "path": str(SHARED / "ml-100k")},
    "amazon-beauty": {"name": "amazon-beauty", "path": str(SHARED / "amazon-beauty"), "format": "generic"},
}
RUNS = ["ml-100k/loo", "ml-100k/user", "amazon-beauty/loo"]
MODELS = ["sasrec", "gru4rec", "caser"]
RECBOLE_NAMES = {"sasrec": "SASRec", "gru4rec": "GRU4Rec", "caser": "Caser"}
RECBOLE_PINS = ["torch==2.13.0", "recbole==1.2.1", "numpy<2", "pandas<3", "scipy<1.17", "scikit-learn<1.8",
                "setuptools<81"]
SEED = 42
CANDIDATE_SEED = 0


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def usage(t_wall: float, t_cpu: float) -> dict[str, float]:
    wall = time.perf_counter() - t_wall
    cpu = time.process_time() - t_cpu
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "cpu_per_wall": round(cpu / max(wall, 1e-9), 3),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


# --- our side --------------------------------------------------------------------------------------------------
def load_dataset(key: str):  # type: ignore[no-untyped-def]
    from delrec.data import DataConfig, prepare_dataset

    return prepare_dataset(DataConfig(**DATASETS[key]))


def worker_ours(a: argparse.Namespace) -> None:
    import torch

    from delrec.data import draw_candidates, make_split
    from delrec.metrics import ranks_from_scores, summarize
    from delrec.teachers import TeacherConfig, full_ranks, score_candidates, train_teacher

    torch.set_num_threads(a.threads)
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    ds = load_dataset(a.dataset)
    split = make_split(ds, a.split, seed=SEED)
    cfg = TeacherConfig(model=a.model, epochs=a.epochs, patience=a.patience, seed=SEED, device="cpu",
                        **json.loads(a.overrides))
    run_dir = WORK / "runs" / f"{a.tag}_{a.dataset}_{a.split}_{a.model}"
    t_train = time.perf_counter()
    model = train_teacher(split, cfg, run_dir, resume=False)
    train_wall = time.perf_counter() - t_train
    hist = json.loads((run_dir / "history.json").read_text())
    test = split.examples("test")
    cands = draw_candidates(test, ds, size=20, seed=CANDIDATE_SEED)
    cand_hash = cands.save(WORK / "candidates" / f"{a.dataset}_{a.split}.parquet")
    scores = score_candidates(model, [ex.history for ex in test], cands.items)
    cand_metrics = summarize(ranks_from_scores(scores, cands.target_pos), hr_ks=(1, 5), ndcg_ks=(5,))
    full = summarize(full_ranks(model, test), hr_ks=(10,), ndcg_ks=(10,))
    epochs = hist["epochs"]
    out = {
        "impl": "delrec", "tag": a.tag, "dataset": a.dataset, "split": a.split, "model": a.model, "data": ds.stats(),
        "data_fingerprint": ds.fingerprint(), "n_test": len(test), "candidates_hash": cand_hash,
        "config": cfg.resolved().to_dict(), "threads": a.threads,
        "epochs_run": len(epochs), "best_epoch": hist["best_epoch"],
        "best_valid_ndcg10": hist["best_valid_ndcg10"],
        "train_s_per_epoch": round(statistics.median(e["train_seconds"] for e in epochs), 2),
        "train_cpu_s_per_epoch": round(statistics.median(e["train_cpu_seconds"] for e in epochs), 2),
        "epoch_s_with_valid": round(statistics.median(e["seconds"] for e in epochs), 2),
        "train_wall_s": round(train_wall, 1),
        "candidates20": cand_metrics, "full": full,
        "test_full_ndcg10": full["NDCG@10"]["value"], "test_full_hr10": full["HR@10"]["value"],
        "valid_ndcg10_by_epoch": [round(e["valid"]["NDCG@10"], 5) for e in epochs], "n_train_examples": int(sum(
            max(len(s) - 1, 0) for s in split.train_sequences)),
        **usage(t_wall, t_cpu),
    }
    atomic_write(Path(a.out), json.dumps(out, indent=2) + "\n")


def write_recbole_atomic(key: str, out_root: Path) -> tuple[str, dict[str, Any]]:
    """The dataset as RecBole atomic files; timestamps = positions, so RecBole's time order is ours exactly."""
    ds = load_dataset(key)
    name = f"{key.replace('-', '')}_delrec"
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for u, seq in enumerate(ds.sequences):
        lines.extend(f"u{u}\ti{int(i)}\t{t}" for t, i in enumerate(seq))
    atomic_write(out_root / name / f"{name}.inter", "\n".join(lines) + "\n")
    return name, {"fingerprint": ds.fingerprint(), **ds.stats()}


# --- RecBole side (runs under the RecBole venv; standard library + recbole only) ---------------------------------
def worker_recbole(a: argparse.Namespace) -> None:
    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_seed

    torch.set_num_threads(a.threads)
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    ours = json.loads(a.overrides)  # our resolved TeacherConfig, mapped to RecBole's names below
    common = {
        "data_path": a.data_root, "dataset": a.dataset, "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id",
        "TIME_FIELD": "timestamp", "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "MAX_ITEM_LIST_LENGTH": ours["max_len"], "loss_type": "CE", "train_neg_sample_args": None,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
        "metrics": ["Hit", "NDCG"], "topk": [10], "valid_metric": "NDCG@10", "epochs": a.epochs,
        "stopping_step": a.patience, "eval_step": 1, "train_batch_size": ours["batch_size"],
        "eval_batch_size": 4096, "learning_rate": ours["lr"], "weight_decay": ours["weight_decay"], "seed": SEED,
        "reproducibility": True, "use_gpu": False, "show_progress": False, "checkpoint_dir": str(Path.cwd() / "ckpt"),
        "save_dataset": False, "save_dataloaders": False, "worker": 0,
    }
    model_args = {
        "SASRec": {"hidden_size": ours["hidden"], "inner_size": 4 * ours["hidden"], "n_layers": ours["layers"],
                   "n_heads": ours["heads"], "hidden_dropout_prob": ours["dropout"],
                   "attn_dropout_prob": ours["attn_dropout"], "hidden_act": "gelu"},
        "GRU4Rec": {"embedding_size": ours["hidden"], "hidden_size": ours["hidden"], "num_layers": ours["layers"],
                    "dropout_prob": ours["dropout"]},
        "Caser": {"embedding_size": ours["hidden"], "nh": ours["caser_filters"], "nv": ours["caser_vfilters"],
                  "dropout_prob": ours["dropout"]},
    }[a.model]
    config = Config(model=a.model, dataset=a.dataset, config_dict={**common, **model_args})
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    train_times: list[float] = []
    train_cpu: list[float] = []
    valid_times: list[float] = []

    def timed(fn, sink, cpu_sink=None):  # type: ignore[no-untyped-def]
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            t, c = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                sink.append(time.perf_counter() - t)
                if cpu_sink is not None:
                    cpu_sink.append(time.process_time() - c)
        return wrapper

    trainer._train_epoch = timed(trainer._train_epoch, train_times, train_cpu)
    trainer._valid_epoch = timed(trainer._valid_epoch, valid_times)
    valid_scores: list[float] = []
    evaluate_valid = trainer._valid_epoch

    def valid_epoch(*args, **kwargs):  # type: ignore[no-untyped-def]
        score, result = evaluate_valid(*args, **kwargs)
        valid_scores.append(score)
        return score, result

    trainer._valid_epoch = valid_epoch
    t_train = time.perf_counter()
    best_valid, _ = trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    train_wall = time.perf_counter() - t_train
    test = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    n_valid = len(valid_times)
    out = {
        "impl": "recbole-1.2.1", "model": a.model, "dataset": a.dataset, "config": {**common, **model_args},
        "threads": a.threads, "epochs_run": len(train_times),
        "train_s_per_epoch": round(statistics.median(train_times), 2),
        "train_cpu_s_per_epoch": round(statistics.median(train_cpu), 2),
        "epoch_s_with_valid": round(statistics.median(
            t + v for t, v in zip(train_times[:n_valid], valid_times, strict=True)), 2) if n_valid else None,
        "train_wall_s": round(train_wall, 1), "best_valid_ndcg10": float(best_valid),
        "valid_ndcg10_by_epoch": [round(float(v), 5) for v in valid_scores],
        "test_full_ndcg10": float(test["ndcg@10"]), "test_full_hr10": float(test["hit@10"]),
        "n_params": sum(p.numel() for p in model.parameters()),
        **usage(t_wall, t_cpu),
    }
    atomic_write(Path(a.out), json.dumps(out, indent=2) + "\n")


def ensure_recbole_venv() -> Path:
    py = VENV / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import recbole"], capture_output=True).returncode == 0:
        return py
    print(f"creating {VENV} (RecBole 1.2.1 and its pins; a few minutes) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", *RECBOLE_PINS], check=True)
    return py


# --- orchestration -----------------------------------------------------------------------------------------------
def run_worker(python: str, args: list[str], out: Path, log: Path, env: dict[str, str] | None = None,
               cwd: Path | None = None) -> dict[str, Any] | None:
    out.unlink(missing_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        rc = subprocess.run([python, str(Path(__file__).resolve()), *args, "--out", str(out)], stdout=f,
                            stderr=subprocess.STDOUT, env=env, cwd=cwd).returncode
    if rc != 0 or not out.exists():
        print(f"  FAILED (rc={rc}); see {log}", flush=True)
        return None
    res = json.loads(out.read_text())
    print(f"  done in {time.perf_counter() - t:.0f}s: epochs {res['epochs_run']}, "
          f"{res['train_s_per_epoch']} s/epoch, test NDCG@10 {res['test_full_ndcg10']:.4f}, "
          f"cpu/wall {res['cpu_per_wall']}", flush=True)
    return res


def fmt(entry: dict[str, float]) -> str:
    return f"{entry['value']:.4f} [{entry['lo']:.3f}, {entry['hi']:.3f}]"


def render_md(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        "# Teacher benchmark", "",
        f"Generated by `benchmarks/teachers.py` on {report['created']} ({s['threads']} torch thread(s) per process, "
        f"epochs ≤ {s['epochs']}, patience {s['patience']}, seed {SEED}; candidate seed {CANDIDATE_SEED}). "
        f"Wall time of the whole benchmark: {report['total_wall_s'] / 60:.1f} min.", "",
        "20-candidate metrics: target + 19 items the user never interacted with, frozen per split "
        "(hash in the JSON); 95% bootstrap CIs. Full ranking: the test target among all items, history not masked.",
        "cpu/wall ≈ the thread count on an idle machine; lower = the cores were shared with other work "
        "(the benchmark runs two processes at once, and other jobs may share the machine).", "",
        "| data / split | teacher | HR@1 (20 cand.) | HR@5 | NDCG@5 | full HR@10 | full NDCG@10 | train s/epoch "
        "wall [CPU] | epochs (best) | peak RSS MiB | cpu/wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["ours"]:
        c, f = r["candidates20"], r["full"]
        lines.append(
            f"| {r['dataset']} / {r['split']} (n={r['n_test']}) | {r['model']} | {fmt(c['HR@1'])} | "
            f"{c['HR@5']['value']:.4f} | {c['NDCG@5']['value']:.4f} | {f['HR@10']['value']:.4f} | "
            f"{fmt(f['NDCG@10'])} | {r['train_s_per_epoch']} [{r['train_cpu_s_per_epoch']}] | "
            f"{r['epochs_run']} ({r['best_epoch']}) | {r['peak_rss_mib']} | {r['cpu_per_wall']} |")
    if report.get("recbole"):
        lines += ["", f"## Against RecBole 1.2.1 (ML-100K leave-one-out, same data and settings, "
                  f"≤ {s['compare_epochs']} epochs each)", "",
                  "Both sides: same atomic interactions, hidden 64, max length 50, CE over all items, batch 256, "
                  "lr 1e-3, same dropout, patience; run at the same time, one torch thread each. Time = training "
                  "CPU seconds per epoch (wall in brackets).", "",
                  "| teacher | test NDCG@10 ours | RecBole | ratio | CPU s/epoch ours [wall] | RecBole [wall] | "
                  "time ratio | epochs ours / RecBole | peak RSS MiB ours / RecBole | targets |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for c in report["recbole"]:
            lines.append(
                f"| {c['model']} | {c['ours_ndcg10']:.4f} | {c['recbole_ndcg10']:.4f} | {c['ndcg_ratio']:.3f} | "
                f"{c['ours_cpu_s_per_epoch']} [{c['ours_wall_s_per_epoch']}] | {c['recbole_cpu_s_per_epoch']} "
                f"[{c['recbole_wall_s_per_epoch']}] | {c['time_ratio']:.2f} | {c['ours_epochs']} / "
                f"{c['recbole_epochs']} | {c['ours_peak_rss_mib']} / {c['recbole_peak_rss_mib']} | "
                f"{'met' if c['ndcg_ok'] and c['time_ok'] else 'MISSED'} |")
        lines += ["", "Validation NDCG@10 by epoch (same validation targets and protocol on both sides):", ""]
        for c in report["recbole"]:
            lines.append(f"- {c['model']}: ours {c['ours_valid_by_epoch']}; RecBole {c['recbole_valid_by_epoch']}")
        lines += ["", "Targets: test NDCG@10 ≥ 0.95 × RecBole's, and ≤ 0.5 × its training CPU seconds per epoch."]
    lines += ["", "## Targets", ""] + [f"- {t}" for t in report["targets"]]
    lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=["ours", "recbole"], help=argparse.SUPPRESS)
    p.add_argument("--tag", default="main", help=argparse.SUPPRESS)
    p.add_argument("--dataset", help=argparse.SUPPRESS)
    p.add_argument("--split", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data-root", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--overrides", default="{}", help="JSON TeacherConfig overrides for our teachers")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated dataset/split (default {RUNS})")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--epochs", type=int, default=10, help="epoch cap of the main runs (early stopping may end sooner)")
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--compare-epochs", type=int, default=3,
                   help="epoch cap of the RecBole comparison (both sides; RecBole's SASRec takes ~3 min an epoch)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (two processes run at once)")
    p.add_argument("--no-recbole", action="store_true")
    p.add_argument("--quick", action="store_true", help="2 epochs per run: checks the plumbing, not the numbers")
    a = p.parse_args()
    if a.worker == "ours":
        return worker_ours(a)
    if a.worker == "recbole":
        return worker_recbole(a)
    if a.quick:
        a.epochs, a.compare_epochs, a.patience = 2, 1, 1

    from concurrent.futures import ThreadPoolExecutor

    from delrec.io import write_json
    from delrec.teachers import TeacherConfig

    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONUNBUFFERED": "1"}
    models = a.models.split(",")
    runs = a.runs.split(",")
    report: dict[str, Any] = {"created": time.strftime("%Y-%m-%d %H:%M"), "settings": {
        "epochs": a.epochs, "patience": a.patience, "compare_epochs": a.compare_epochs, "threads": a.threads,
        "seed": SEED, "candidate_seed": CANDIDATE_SEED, "candidates": 20, "overrides": json.loads(a.overrides),
        "runs": runs, "models": models, "cpu_count": os.cpu_count(), "load_avg_at_start": os.getloadavg()},
        "ours": [], "ours_compare": [], "recbole_raw": [], "recbole": []}

    def compare_overrides(m: str) -> dict[str, Any]:
        # RecBole's Caser has a horizontal filter for every height 1..max_len (50 filters at 50): one epoch took
        # over 15 minutes here, so the Caser comparison runs both sides at max_len 10.
        return {**json.loads(a.overrides), **({"max_len": 10} if m == "caser" else {})}

    def ours(tag: str, key: str, kind: str, m: str, epochs: int) -> dict[str, Any] | None:
        print(f"[{time.perf_counter() - t0:5.0f}s] ours/{tag} {m} on {key}/{kind}", flush=True)
        over = compare_overrides(m) if tag == "compare" else json.loads(a.overrides)
        return run_worker(sys.executable, [
            "--worker", "ours", "--tag", tag, "--dataset", key, "--split", kind, "--model", m,
            "--overrides", json.dumps(over), "--epochs", str(epochs), "--patience", str(a.patience),
            "--threads", str(a.threads)], WORK / "results" / f"{tag}_{key}_{kind}_{m}.json",
            WORK / "logs" / f"{tag}_{key}_{kind}_{m}.log", env=env)

    def lane_ours() -> None:
        if recbole_py is not None:  # equal-budget twins of RecBole's runs first, so both sides share the machine
            for m in models:
                if res := ours("compare", "ml-100k", "loo", m, a.compare_epochs):
                    report["ours_compare"].append(res)
        for run in runs:
            key, kind = run.split("/")
            for m in models:
                if res := ours("main", key, kind, m, a.epochs):
                    report["ours"].append(res)

    def lane_recbole() -> None:
        assert recbole_py is not None
        cwd = WORK / "recbole_cwd"
        cwd.mkdir(parents=True, exist_ok=True)
        for m in models:
            ours_cfg = TeacherConfig(model=m, **compare_overrides(m)).resolved().to_dict()
            print(f"[{time.perf_counter() - t0:5.0f}s] RecBole {RECBOLE_NAMES[m]} on ml-100k/loo", flush=True)
            rb = run_worker(str(recbole_py), [
                "--worker", "recbole", "--dataset", rb_name, "--data-root", str(WORK / "recbole_data"),
                "--model", RECBOLE_NAMES[m], "--overrides", json.dumps(ours_cfg), "--epochs", str(a.compare_epochs),
                "--patience", str(a.patience), "--threads", str(a.threads)],
                WORK / "results" / f"recbole_{m}.json", WORK / "logs" / f"recbole_{m}.log",
                env={**env, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}, cwd=cwd)
            if rb:
                rb["ours_model"] = m
                report["recbole_raw"].append(rb)

    recbole_py = None if a.no_recbole else ensure_recbole_venv()
    rb_name = ""
    if recbole_py is not None:
        rb_name, report["settings"]["recbole_data"] = write_recbole_atomic("ml-100k", WORK / "recbole_data")
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = [pool.submit(lane_ours)] + ([pool.submit(lane_recbole)] if recbole_py is not None else [])
        for j in jobs:
            j.result()
    for rb in report["recbole_raw"]:
        twin = [r for r in report["ours_compare"] if r["model"] == rb["ours_model"]]
        if twin:
            report["recbole"].append(compare(rb["ours_model"], twin[0], rb))
    report["total_wall_s"] = round(time.perf_counter() - t0, 1)
    report["targets"] = targets(report)
    report["notes"] = NOTES
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "teachers.json", report)
    atomic_write(RESULTS / "teachers.md", render_md(report))
    print(render_md(report))


def compare(model: str, ours: dict[str, Any], rb: dict[str, Any]) -> dict[str, Any]:
    """Our equal-budget run vs RecBole's. Time = training CPU seconds per epoch (wall time depends on whatever
    else the machine runs; both are recorded)."""
    ratio = ours["test_full_ndcg10"] / max(rb["test_full_ndcg10"], 1e-12)
    cpu_ratio = ours["train_cpu_s_per_epoch"] / max(rb["train_cpu_s_per_epoch"], 1e-12)
    return {"model": model, "ours_ndcg10": ours["test_full_ndcg10"], "recbole_ndcg10": rb["test_full_ndcg10"],
            "ours_valid_by_epoch": ours["valid_ndcg10_by_epoch"],
            "recbole_valid_by_epoch": rb.get("valid_ndcg10_by_epoch"),
            "ndcg_ratio": round(ratio, 4), "ours_cpu_s_per_epoch": ours["train_cpu_s_per_epoch"],
            "recbole_cpu_s_per_epoch": rb["train_cpu_s_per_epoch"], "time_ratio": round(cpu_ratio, 3),
            "ours_wall_s_per_epoch": ours["train_s_per_epoch"], "recbole_wall_s_per_epoch": rb["train_s_per_epoch"],
            "wall_ratio": round(ours["train_s_per_epoch"] / max(rb["train_s_per_epoch"], 1e-12), 3),
            "ours_epochs": ours["epochs_run"], "recbole_epochs": rb["epochs_run"],
            "ours_cpu_per_wall": ours["cpu_per_wall"], "recbole_cpu_per_wall": rb["cpu_per_wall"],
            "ours_peak_rss_mib": ours["peak_rss_mib"], "recbole_peak_rss_mib": rb["peak_rss_mib"],
            "ndcg_ok": ratio >= 0.95, "time_ok": cpu_ratio <= 0.5}


def targets(report: dict[str, Any]) -> list[str]:
    out = []
    for r in report["ours"]:
        if r["dataset"] == "ml-100k":
            hr1 = r["candidates20"]["HR@1"]["value"]
            out.append(f"HR@1 ≥ 0.30 on ML-100K/{r['split']} {r['model']}: {hr1:.4f} "
                       f"{'met' if hr1 >= 0.30 else 'MISSED'}")
    for c in report["recbole"]:
        out.append(f"{c['model']}: NDCG@10 ratio {c['ndcg_ratio']:.3f} ({'met' if c['ndcg_ok'] else 'MISSED'}), "
                   f"time ratio {c['time_ratio']:.2f} ({'met' if c['time_ok'] else 'MISSED'})")
    return out


NOTES = [
    "Our Caser uses horizontal filters of heights 2, 3, 4 (16 each; DELRec's teacher) and no user embedding; "
    "RecBole's Caser uses every height 1..max_len and a user embedding, so its step costs more by design. At "
    "max_len 50 one RecBole Caser epoch did not finish in 15 minutes here, so the Caser comparison uses max_len 10 "
    "on both sides (our main Caser runs use 50).",
    "Our SASRec's last block computes only the query at the most recent position (same output, fewer FLOPs); "
    "our dropout draws its mask from random bytes (torch.nn.Dropout's Bernoulli draw dominated the CPU step).",
    "RecBole's Caser adds an L2 penalty (reg_weight 1e-4) on its conv weights; ours uses weight_decay from "
    "TeacherConfig (0 by default).",
    "RecBole and ours both train on every prefix of the training part (RecBole's sequence augmentation), "
    "evaluate full ranking without masking history, and stop when valid NDCG@10 has not improved for "
    "`patience` epochs.",
]

if __name__ == "__main__":
    main()
