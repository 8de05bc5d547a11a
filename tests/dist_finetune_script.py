"""Stage 2 + evaluation on a tiny model, run by tests/test_distributed.py with 1 process or under torchrun.

Usage: ``python tests/dist_finetune_script.py OUT [OBJECTIVE]`` or
``torchrun --nproc_per_node=2 tests/dist_finetune_script.py OUT [OBJECTIVE]`` (candidates | sequence: packed windows
scored with the next verbalizer | sequence-kd: the same plus the teacher's term over candidate sets). Writes
``OUT/finetune/`` (adapter, history) and ``OUT/result.json`` (test scores and metrics), from the main process only.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

from delrec.data import draw_candidates, make_split
from delrec.evaluate import evaluate_llm, histories_for
from delrec.finetune import FinetuneConfig, finetune
from delrec.io import write_json
from tiny_models import tiny_backbone, tiny_dataset, tiny_soft_prompt

# Dropout off: the per-process dropout streams differ from a single process's by design.
CFG = dict(init_r=6, target_r=2, tinit=2, tfinal=2, lr=0.1, warmup_steps=0, max_steps=6, batch_size=4,
           grad_accum=2, eval_every=3, patience=0, history_len=6, max_train_examples=16, eval_batch_size=3,
           lora_dropout=0.0, seed=7)


def main(out: Path, objective: str = "candidates") -> None:
    from accelerate import PartialState

    from delrec.llm.prompts import ScoringConfig

    ds = tiny_dataset(n_users=60)  # 6 validation and 6 test users
    split = make_split(ds, "user", seed=0)
    teacher = None
    if objective == "sequence-kd":  # packed windows + the teacher's z-scored ranking of 2 candidate sets per batch
        from delrec.teachers import TeacherConfig, build_teacher

        torch.manual_seed(3)
        teacher = build_teacher(TeacherConfig(model="sasrec").resolved(), ds.n_items).eval()
        cfg = FinetuneConfig.from_profile("cpu", **CFG, objective="sequence", distill_weight=0.5,
                                          distill_candidates=2, distill_standardize=True, candidate_size=10)
    else:
        cfg = FinetuneConfig.from_profile("cpu", **CFG, objective=objective)
    scoring = ScoringConfig(verbalizer="title" if objective == "candidates" else "next")
    sp = tiny_soft_prompt()
    bb = finetune(tiny_backbone("llama", scale=5.0), ds, split, sp, "SASRec", cfg, out / "finetune",
                  scoring=scoring, teacher=teacher)
    test = split.examples("test")
    cands = draw_candidates(test, ds, size=20, seed=11)
    state = PartialState()
    res = evaluate_llm(bb, sp, ds, cands, ds.domain, "SASRec", cfg.history_len, 2, histories_for(cands, test),
                       state=state, scoring=scoring)
    if state.is_main_process:
        write_json(out / "result.json",
                   {**res.to_dict(), "scores": res.scores.tolist(), "processes": state.num_processes})
    state.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:3])
