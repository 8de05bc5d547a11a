"""Stage 1: TA/RPS example builders, dynamic loss weighting, training, checkpoint/resume."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from delrec.data.candidates import draw_candidates
from delrec.data.splits import make_split
from delrec.distill import (
    TA_MIN_LEN,
    DistillConfig,
    build_rps_examples,
    build_ta_examples,
    distill,
    dynamic_weights,
    lr_factor,
    render_lsr,
    render_rps,
    render_ta,
    weights_from_grad_norms,
)
from delrec.errors import ConfigError, DataError
from delrec.llm import SoftPromptConfig
from delrec.llm.tiny import successor_topk, tiny_backbone, tiny_dataset


@pytest.fixture(scope="module")
def data():
    ds = tiny_dataset(n_users=30, n_items=60, min_len=5, max_len=12, seed=1)
    return ds, make_split(ds, "user", seed=0)


def _topk(split, k: int = 5):  # type: ignore[no-untyped-def]
    return successor_topk(split, k)


def test_ta_examples_follow_the_spec(data):
    ds, split = data
    exs = build_ta_examples(split, ds, 10, np.random.default_rng(0))
    seqs = {int(u): s for u, s in zip(split.train_users, split.train_sequences, strict=True)}
    assert {e.user for e in exs} == {u for u, s in seqs.items() if len(s) >= TA_MIN_LEN}
    assert any(len(s) < TA_MIN_LEN for s in seqs.values())  # the length filter is exercised
    assert set(seqs) <= set(split.train_users.tolist())
    for e in exs:
        s = seqs[e.user]
        assert e.demo_history.tolist() == s[:2].tolist()  # items 1-2
        assert (e.demo_answer, e.demo_next) == (s[2], s[3])  # [M] = item 3, then item 4
        assert e.history.tolist() == s[3:len(s) - 2].tolist()  # items 4..n-2
        assert (e.target, e.next_item) == (s[-2], s[-1])  # [X] = item n-1, then item n
        c = e.candidates.tolist()
        assert len(c) == 10 and len(set(c)) == 10 and c.count(e.target) == 1
        assert not (set(c) - {e.target}) & set(s.tolist())  # negatives never from the history
        assert all(1 <= x <= ds.n_items for x in c)
        assert c[e.target_pos] == e.target


def test_ta_uses_training_sequences_only():
    ds = tiny_dataset(n_users=30, seed=2)
    split = make_split(ds, "loo", seed=0)
    exs = build_ta_examples(split, ds, 20, np.random.default_rng(0))
    assert exs
    for e in exs:
        full = ds.sequences[e.user]
        assert e.next_item == full[-3]  # the last two items (valid/test targets) are never used
        assert full[-1] not in e.candidates and full[-2] not in e.candidates  # not even as negatives


def test_rps_examples_follow_the_spec(data):
    ds, split = data
    topk = _topk(split, 5)
    exs = build_rps_examples(split, ds, topk, 12, np.random.default_rng(0), k=4)
    assert [e.user for e in exs] == split.train_users.tolist()
    for i, e in enumerate(exs):
        assert e.history.tolist() == split.train_sequences[i].tolist()
        assert e.target == topk[i, 0] and e.teacher_rest.tolist() == topk[i, 1:4].tolist()
        c = e.candidates.tolist()
        assert len(c) == 12 and len(set(c)) == 12 and set(topk[i, :4].tolist()) <= set(c)
        assert topk[i, 4] not in c or topk[i, 4] not in e.history  # 5th prediction not forced in
        assert not (set(c) - set(topk[i, :4].tolist())) & set(e.history.tolist())
        assert c[e.target_pos] == e.target
    with pytest.raises(DataError):
        build_rps_examples(split, ds, topk[:-1], 12, np.random.default_rng(0))
    with pytest.raises(ConfigError):
        build_rps_examples(split, ds, topk, 3, np.random.default_rng(0), k=4)
    with pytest.raises(DataError):
        build_rps_examples(split, ds, topk * 0, 12, np.random.default_rng(0))


def test_rendering(data):
    ds, split = data
    ta = build_ta_examples(split, ds, 6, np.random.default_rng(0))[:2]
    prompts, cands, pos = render_ta(ta, ds, "SASRec", history_len=2)
    assert len(prompts) == 2 and all(len(c) == 6 for c in cands)
    assert cands[0][pos[0]] == ds.titles[ta[0].target]
    shown = ", ".join(ds.titles[i] for i in ta[0].history[-2:])
    assert f"also watched {shown}, [movie X]" in prompts[0]  # only the 2 most recent query items
    rps = build_rps_examples(split, ds, _topk(split), 8, np.random.default_rng(0))[:2]
    prompts, cands, pos = render_rps(rps, ds, "Caser", history_len=3)
    assert "Caser" in prompts[0] and cands[1][pos[1]] == ds.titles[rps[1].target]
    ex = split.examples("valid")
    cs = draw_candidates(ex, ds, size=5, seed=0)
    prompts, cands, pos = render_lsr(ex, cs, ds, "SASRec", history_len=3)
    assert [c[p] for c, p in zip(cands, pos, strict=True)] == [ds.titles[e.target] for e in ex]
    with pytest.raises(ConfigError):
        render_lsr(ex[::-1], cs, ds, "SASRec", 3) if len(ex) > 1 else render_lsr([], cs, ds, "SASRec", 3)


def test_dynamic_weights_on_a_toy_problem():
    theta = torch.tensor([1.0, 2.0], requires_grad=True)
    l1 = (theta * theta).sum()  # grad 2θ = [2, 4], norm 2√5
    l2 = 3 * theta.sum()  # grad [3, 3], norm 3√2
    w = dynamic_weights([l1, l2], [theta], alpha=0.5)
    r = torch.tensor([(1 / (2 * math.sqrt(5))) ** 0.5, (1 / (3 * math.sqrt(2))) ** 0.5])
    torch.testing.assert_close(w, r / r.sum())
    assert float(w.sum()) == pytest.approx(1.0) and w[1] > w[0]  # smaller gradient, larger weight
    torch.testing.assert_close(dynamic_weights([l1, l2], [theta], alpha=0.0), torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(weights_from_grad_norms([1.0, 4.0], 1.0), torch.tensor([0.8, 0.2]))
    assert theta.grad is None  # weighting computes no side-effect gradients


def test_lr_schedule():
    assert [lr_factor(s, 2, 6) for s in range(7)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    assert lr_factor(0, 0, 4) == 1.0


@pytest.mark.parametrize(("kwargs", "fld"), [
    ({"tasks": ["ta", "xx"]}, "distill.tasks"), ({"tasks": []}, "distill.tasks"),
    ({"weighting": "gradnorm"}, "distill.weighting"), ({"lr": 0}, "distill.lr"),
    ({"max_steps": 900}, "distill.max_steps"), ({"warmup_steps": 900}, "distill.warmup_steps"),
    ({"teacher_k": 30}, "distill.teacher_k"), ({"select_metric": "MRR"}, "distill.select_metric"),
    ({"batch_size": 0}, "distill.batch_size"), ({"domain": "books"}, "dataset.domain"),
    ({"rps_form": "argmax"}, "distill.rps_form"),
    ({"rps_form": "ranking", "rps_temperature": 0}, "distill.rps_temperature"),
    ({"rps_standardize": True}, "distill.rps_standardize"), ({"rps_temperature": 0.5}, "distill.rps_temperature"),
])
def test_config_validation(kwargs, fld):
    with pytest.raises(ConfigError) as e:
        DistillConfig(**kwargs).validate()
    assert e.value.field == fld


SMALL = DistillConfig(lr=0.05, warmup_steps=0, total_steps=12, max_steps=6, batch_size=4, micro_batch_size=2,
                      eval_every=3, teacher_k=4, candidate_size=8, history_len=4, train_examples=4, seed=7)
SP = SoftPromptConfig(num_tokens=4)


def test_short_run_lowers_training_loss_and_logs(data, tmp_path):
    ds, split = data
    bb = tiny_backbone("llama", extra_text=ds.titles[1:])
    logged: list[tuple[str, float, int]] = []
    cfg = dataclasses.replace(SMALL, max_steps=10)
    soft = distill(bb, ds, split, _topk(split), "SASRec", cfg, tmp_path, soft_prompt_cfg=SP,
                   log=lambda n, v, s: logged.append((n, v, s)), progress=False)
    hist = json.loads((tmp_path / "history.json").read_text())
    steps = hist["steps"]
    assert len(steps) == 10 and [e["step"] for e in hist["evals"]] == [3, 6, 9, 10]
    for task in ("ta", "rps"):  # the same 4 examples every step (train_examples=4 = batch)
        assert steps[-1][f"loss_{task}"] < steps[0][f"loss_{task}"] - 0.05
        assert all(0 < s[f"weight_{task}"] < 1 for s in steps)
    assert all(abs(s["weight_ta"] + s["weight_rps"] - 1) < 1e-6 for s in steps)
    assert {n for n, _, _ in logged} >= {"stage1/loss_ta", "stage1/weight_rps", "stage1/valid_NDCG@5"}
    assert soft.num_tokens == 4 and soft.config.teacher == "SASRec"
    assert (tmp_path / "soft_prompt" / "soft_prompt.safetensors").is_file()
    summary = json.loads((tmp_path / "distill_summary.json").read_text())
    assert summary["steps"] == 10 and summary["best_step"] in (3, 6, 9, 10)
    assert all(p.grad is None for p in bb.model.parameters())


def test_training_candidate_sets_are_saved_frozen_and_clean(data, tmp_path):
    """Every TA / RPS candidate set stage 1 trains on is written as it was drawn (hash in distill_summary.json), the
    same from the same seed; TA's negatives lie outside the user's sequence, no set holds an item twice."""
    from delrec.data.candidates import CandidateSet

    ds, split = data
    bb = tiny_backbone("llama", extra_text=ds.titles[1:])
    cfg = dataclasses.replace(SMALL, max_steps=1)
    hashes = []
    for out in ("a", "b"):
        distill(bb, ds, split, _topk(split), "SASRec", cfg, tmp_path / out, soft_prompt_cfg=SP, progress=False)
        hashes.append(json.loads((tmp_path / out / "distill_summary.json").read_text())["train_candidates"])
    assert hashes[0] == hashes[1] and set(hashes[0]) == {"ta", "rps"}
    distill(bb, ds, split, _topk(split), "SASRec", dataclasses.replace(cfg, seed=8), tmp_path / "c",
            soft_prompt_cfg=SP, progress=False)
    assert json.loads((tmp_path / "c" / "distill_summary.json").read_text())["train_candidates"] != hashes[0]
    for task in ("ta", "rps"):
        cs = CandidateSet.load(tmp_path / "a" / "train_candidates" / f"{task}.parquet")
        assert cs.hash() == hashes[0][task] and len(cs) == cfg.train_examples and cs.size == cfg.candidate_size
        assert all(len(set(row.tolist())) == cs.size for row in cs.items)
        assert set(cs.users.tolist()) <= set(split.train_users.tolist())
    ta = CandidateSet.load(tmp_path / "a" / "train_candidates" / "ta.parquet")
    for u, t, row in zip(ta.users, ta.targets, ta.items, strict=True):
        assert not (set(row.tolist()) - {int(t)}) & set(ds.sequences[u].tolist())


@pytest.mark.parametrize("deep", [False, True], ids=["input", "deep"])
def test_resume_equals_uninterrupted(data, tmp_path, deep):
    ds, split = data
    topk = _topk(split)
    bb = tiny_backbone("llama", extra_text=ds.titles[1:])
    sp = dataclasses.replace(SP, deep=deep)
    distill(bb, ds, split, topk, "SASRec", SMALL, tmp_path / "a", soft_prompt_cfg=sp, progress=False)
    distill(bb, ds, split, topk, "SASRec", dataclasses.replace(SMALL, max_steps=3), tmp_path / "b",
            soft_prompt_cfg=sp, progress=False)
    assert json.loads((tmp_path / "b" / "distill_summary.json").read_text())["steps"] == 3
    distill(bb, ds, split, topk, "SASRec", SMALL, tmp_path / "b", soft_prompt_cfg=sp, progress=False)
    a = load_file(str(tmp_path / "a" / "checkpoint" / "checkpoint.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoint" / "checkpoint.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ha = json.loads((tmp_path / "a" / "history.json").read_text())
    hb = json.loads((tmp_path / "b" / "history.json").read_text())
    assert [s["loss"] for s in ha["steps"]] == [s["loss"] for s in hb["steps"]]
    assert ha["evals"] == hb["evals"]
    with pytest.raises(ConfigError):  # a different config must not silently continue the old run
        distill(bb, ds, split, topk, "SASRec", dataclasses.replace(SMALL, lr=0.01), tmp_path / "b",
                soft_prompt_cfg=sp, progress=False)
    with pytest.raises(ConfigError, match="shape"):  # nor a soft prompt of another depth
        distill(bb, ds, split, topk, "SASRec", SMALL, tmp_path / "b",
                soft_prompt_cfg=dataclasses.replace(sp, deep=not deep), progress=False)


def test_single_task_ablation_and_fixed_weights(data, tmp_path):
    ds, split = data
    bb = tiny_backbone("llama")
    cfg = dataclasses.replace(SMALL, tasks=["rps"], max_steps=2, eval_every=2)
    distill(bb, ds, split, _topk(split), "GRU4Rec", cfg, tmp_path / "r", soft_prompt_cfg=SP, progress=False)
    steps = json.loads((tmp_path / "r" / "history.json").read_text())["steps"]
    assert all("loss_ta" not in s and s["weight_rps"] == 1.0 for s in steps)
    cfg = dataclasses.replace(SMALL, weighting="fixed", fixed_weights=(0.3, 0.7), max_steps=1, eval_every=1)
    distill(bb, ds, split, _topk(split), "GRU4Rec", cfg, tmp_path / "f", soft_prompt_cfg=SP, progress=False)
    s = json.loads((tmp_path / "f" / "history.json").read_text())["steps"][0]
    assert (s["weight_ta"], s["weight_rps"]) == pytest.approx((0.3, 0.7))


def test_validation_candidates_may_cover_a_subset_of_users(data, tmp_path):
    ds, split = data
    ex = split.examples("valid")
    cs = draw_candidates(ex, ds, size=8, seed=3).subset([len(ex) - 1])  # only the last validation user
    bb = tiny_backbone("llama")
    cfg = dataclasses.replace(SMALL, max_steps=1, eval_every=1)
    distill(bb, ds, split, _topk(split), "SASRec", cfg, tmp_path / "v", valid_candidates=cs, soft_prompt_cfg=SP,
            progress=False)
    assert json.loads((tmp_path / "v" / "distill_summary.json").read_text())["valid_examples"] == 1
    wrong = draw_candidates(split.examples("test"), ds, size=8, seed=3)
    with pytest.raises(ConfigError):
        distill(bb, ds, split, _topk(split), "SASRec", cfg, tmp_path / "w", valid_candidates=wrong,
                soft_prompt_cfg=SP, progress=False)


def test_zero_steps_keeps_the_initial_soft_prompt(data, tmp_path):
    """distill.max_steps=0: the untrained-soft-prompt control of the benchmark — no update, the initialisation is
    ranked on the validation users and saved as the stage's soft prompt."""
    from delrec.llm import SoftPrompt

    ds, split = data
    bb = tiny_backbone("llama")
    soft = distill(bb, ds, split, _topk(split), "SASRec", dataclasses.replace(SMALL, max_steps=0), tmp_path,
                   soft_prompt_cfg=SP, progress=False)
    init = SoftPrompt.init_for(bb, dataclasses.replace(SP, teacher="SASRec"))
    assert torch.equal(soft.weight.detach(), init.weight.detach())
    hist = json.loads((tmp_path / "history.json").read_text())
    assert hist["steps"] == [] and [e["step"] for e in hist["evals"]] == [0] and "NDCG@5" in hist["evals"][0]
    assert json.loads((tmp_path / "distill_summary.json").read_text())["best_step"] == 0
    with pytest.raises(ConfigError):
        DistillConfig(max_steps=-1).validate()


def _valid_scores_and_priors(ds, split, scorer):
    """Stage 1's validation rows under the next verbalizer: [N, C] scores after the history and after an empty
    one, and the target columns."""
    from delrec.data.splits import Example
    from delrec.llm.scoring import prior_scores

    ex = split.examples("valid")
    cs = draw_candidates(ex, ds, size=SMALL.candidate_size, seed=SMALL.seed)
    prompts, cands, target = render_lsr(ex, cs, ds, "SASRec", SMALL.history_len, verbalizer="next")
    empty = [Example(e.user, np.zeros(0, dtype=np.int64), e.target) for e in ex]
    prompts0 = render_lsr(empty, cs, ds, "SASRec", SMALL.history_len, verbalizer="next")[0]
    with torch.no_grad():
        return scorer.rank(prompts, cands), prior_scores(scorer, prompts0, cands), target


def test_stage1_validation_ranks_with_the_prior_weight(data, tmp_path):
    """With ``scoring.prior_weight`` stage 1 picks its soft prompt on the same calibrated scores the evaluation
    uses: each candidate's score less λ × its score after the row's prompt with an empty history."""
    from delrec.llm.prompts import ScoringConfig
    from delrec.metrics import ndcg, ranks_from_scores

    ds, split = data
    bb = tiny_backbone("llama")
    sc = ScoringConfig(verbalizer="next", reduce="sum", prior_weight=1.0)
    soft = distill(bb, ds, split, _topk(split), "SASRec", dataclasses.replace(SMALL, max_steps=0), tmp_path,
                   soft_prompt_cfg=SP, progress=False, scoring=sc)
    got = json.loads((tmp_path / "history.json").read_text())["evals"][0]["NDCG@5"]
    raw, prior, target = _valid_scores_and_priors(ds, split, sc.scorer(bb, soft))
    calibrated = raw - prior
    assert got == pytest.approx(float(ndcg(ranks_from_scores(calibrated, target), 5).mean()), abs=1e-6)
    assert not np.allclose(raw, calibrated)


def test_stage1_chooses_the_prior_weight_with_its_soft_prompt(data, tmp_path):
    """``scoring.prior_weight=auto``: each stage-1 validation pass reports the grid's best λ, and the kept soft prompt
    records the λ it was chosen with (the run's fallback when stage 2 is off)."""
    from delrec.llm.prompts import ScoringConfig
    from delrec.llm.soft_prompt import CONFIG_NAME
    from delrec.metrics import choose_prior_weight

    ds, split = data
    bb = tiny_backbone("llama")
    sc = ScoringConfig(verbalizer="next", reduce="sum", prior_weight="auto")
    soft = distill(bb, ds, split, _topk(split), "SASRec", dataclasses.replace(SMALL, max_steps=0), tmp_path,
                   soft_prompt_cfg=SP, progress=False, scoring=sc)
    ev = json.loads((tmp_path / "history.json").read_text())["evals"][0]
    lam, table = choose_prior_weight(*_valid_scores_and_priors(ds, split, sc.scorer(bb, soft)), SMALL.select_metric)
    assert ev["prior_weight"] == lam
    assert ev["NDCG@5"] == pytest.approx(table[lam]["NDCG@5"], abs=1e-6)
    assert ev["by_prior"] == pytest.approx({str(k): v[SMALL.select_metric] for k, v in table.items()}, abs=1e-6)
    saved = json.loads((tmp_path / "soft_prompt" / CONFIG_NAME).read_text())
    assert saved["valid"]["prior_weight"] == lam
