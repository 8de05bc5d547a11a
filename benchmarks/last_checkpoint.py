"""Rank a finished run's test users with its *last* stage-2 checkpoint, not the validation-selected adapter.

    python benchmarks/last_checkpoint.py runs/quality/ml-100k-loo-tallrec --against runs/quality/ml-100k-loo

Two runs whose few validation users picked different steps (e.g. 1,200 vs 1,600 updates) are then also compared
at the same number of updates. RUN is copied to ``RUN@last`` (RUN itself is not touched), the checkpoint's adapter
is swapped in, the same frozen test candidates are ranked, and the paired per-user test against ``--against``'s
DELRec row is printed, written to ``RUN@last/last_checkpoint.json`` and merged into
``benchmarks/results/quality_last_checkpoint.json`` (listed by ``quality.md``). Resumable: a finished copy is re-read.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file

from delrec.io import atomic_dir, read_json, write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import paired  # noqa: E402  (benchmarks/quality.py, a sibling script)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a finished run folder with finetune/checkpoint/")
    ap.add_argument("--against", type=Path, required=True, help="a run ranked on the same test candidates")
    ap.add_argument("--name", default="TALLRec-style", help="what to call RUN's model in the paired test")
    ap.add_argument("--against-name", default="DELRec", help="what to call --against's model in the paired test")
    ap.add_argument("--out", type=Path, default=RESULTS / "quality_last_checkpoint.json",
                    help="results file, one entry per run (quality.md lists them)")
    args = ap.parse_args()

    from delrec.finetune import _load_adapter_tensors, load_adapter
    from delrec.llm.backbone import Backbone
    from delrec.pipeline import Run, adapter_dir, distill_stage, evaluate_stage, finetune_checkpoint_dir, report_stage

    src = args.run.resolve()
    ckpt = finetune_checkpoint_dir(src)
    if not (ckpt / "adapter.safetensors").is_file() or not adapter_dir(src).is_dir():
        sys.exit(f"{src}: no finished stage 2 with a checkpoint (finetune/adapter, finetune/checkpoint)")
    dst = src.with_name(src.name + "@last")
    if not dst.is_dir():
        with atomic_dir(dst) as tmp:  # a killed copy leaves no half-made RUN@last
            shutil.copytree(src, tmp, dirs_exist_ok=True)
            (tmp / "results" / "DELRec.json").unlink(missing_ok=True)  # the copy's own: RUN's selected-adapter row
            manifest = read_json(tmp / "manifest.json")
            manifest["stages"].pop("evaluate", None)
            manifest["stages"].pop("report", None)
            write_json(tmp / "manifest.json", manifest)
            # the copy's adapter is the last checkpoint: its validation entry is the copy's "best" (under
            # scoring.prior_weight=auto the test then uses the λ chosen at that checkpoint)
            hist = read_json(tmp / "finetune" / "history.json")
            last = [e for e in hist["history"] if "valid" in e]
            if last:
                hist["best"], hist["best_step"] = last[-1]["valid"], last[-1]["step"]
            write_json(tmp / "finetune" / "history.json", hist)
    step = read_json(ckpt / "state.json")["step"]
    best = read_json(src / "finetune" / "history.json").get("best_step")
    run = Run(dst)
    if not (run.done("evaluate") and (dst / "results" / "DELRec.json").is_file()):
        backbone = Backbone.load(run.cfg.backbone)
        soft = distill_stage(run, backbone)  # the finished stage 1's soft prompt, or None
        backbone = load_adapter(backbone, adapter_dir(dst))
        _load_adapter_tensors(backbone.model, load_file(str(finetune_checkpoint_dir(dst) / "adapter.safetensors")),
                              ckpt)
        evaluate_stage(run, backbone, soft)
        report_stage(run)
    result = {"run": str(src), "checkpoint_step": step, "selected_step": best,
              "metrics": read_json(dst / "results" / "DELRec.json")["metrics"],
              "paired": paired(args.against.resolve(), "DELRec", args.against_name, dst, "DELRec",
                               f"{args.name}@{step}")}
    write_json(dst / "last_checkpoint.json", result)
    merged = read_json(args.out) if args.out.is_file() else {}
    merged[os.path.relpath(src, ROOT)] = {"against": os.path.relpath(args.against.resolve(), ROOT), **result,
                                          "run": os.path.relpath(src, ROOT)}
    write_json(args.out, merged)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
