"""Stage 2: config presets and validation, target modules, AdaLoRA training, adapter round trip, resume."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from delrec.data import draw_candidates, make_split
from delrec.errors import ConfigError
from delrec.evaluate import lsr_inputs
from delrec.finetune import (
    CPU,
    PAPER,
    FinetuneConfig,
    adapted_layers,
    finetune,
    load_adapter,
    resolve_target_modules,
    train_examples,
)
from delrec.io import read_json, write_json
from tiny_models import tiny_backbone, tiny_dataset, tiny_soft_prompt, tiny_tokenizer

# Small and fast; the large lr and init scale make 12 steps of a random 2-layer model visibly learn.
# AdaLoRA on distinct whole sequences, whatever the cpu profile's stage-2 defaults are.
TINY = dict(adapter="adalora", sliding_window=False, init_r=6, target_r=2, tinit=3, tfinal=3, lr=0.1,
            warmup_steps=0, max_steps=12, batch_size=8, grad_accum=1, eval_every=4, patience=0, history_len=6,
            max_train_examples=16, max_valid_examples=0, eval_batch_size=4, seed=7, objective="candidates")


def _data():
    ds = tiny_dataset()
    return ds, make_split(ds, "user", seed=0)


def _fixed_loss(bb, sp, ds, split, cfg) -> float:
    """CE of the targets on fixed candidates: independent of the training loop's own bookkeeping."""
    from delrec.llm.prompts import ScoringConfig
    from delrec.llm.scoring import TitleScorer

    sc = ScoringConfig()  # what finetune() trains with by default
    exs = train_examples(split, cfg)
    cs = draw_candidates(exs, ds, 20, seed=99)
    prompts, titles = lsr_inputs(ds, [e.history for e in exs], cs.items, "movie", "SASRec", cfg.history_len,
                                 year=sc.year)
    with torch.no_grad():
        scores = TitleScorer(bb, sp, append_eos=sc.append_eos(bb.kind)).score(prompts, titles)
    return float(F.cross_entropy(scores, torch.as_tensor(cs.target_pos)))


def _snapshot(module: torch.nn.Module, adapter: bool) -> dict[str, torch.Tensor]:
    """Adapter tensors, or base tensors under the names they had before peft wrapped the model."""
    if hasattr(module, "get_base_model"):
        module = module.get_base_model()
    return {n.replace(".base_layer.", "."): p.detach().clone() for n, p in module.named_parameters()
            if ("lora_" in n) == adapter and (adapter or ".ranknum." not in n)}


# --- configuration ---------------------------------------------------------------------------------------------
def test_paper_profile_has_the_papers_hyperparameters() -> None:
    p = FinetuneConfig.from_profile("paper")
    assert p == PAPER.validate()
    assert (p.adapter, p.init_r, p.lora_alpha, p.lora_dropout) == ("adalora", 320, 32.0, 0.05)
    assert (p.lr, p.weight_decay, p.warmup_steps, p.max_steps) == (1e-4, 1e-6, 800, 1400)
    assert (p.grad_accum, p.batch_size, p.grad_clip, p.candidate_size) == (6, 20, 2.0, 20)
    assert p.schedule() == (140, 280)  # AdaLoRA tinit / tfinal laid out over max_steps


def test_cpu_profile_is_small_and_overridable() -> None:
    c = FinetuneConfig.from_profile("cpu", max_steps=60, seed=3)
    assert (c.max_steps, c.seed, c.profile) == (60, 3, "cpu")
    # ≤ 2,000 packed windows of ≤ 11 items: ~15 minutes at the measured ~0.055 s per prediction
    assert c.init_r < 32 and c.target_r <= c.init_r and c.max_steps * c.batch_size * c.grad_accum <= 2000
    assert c.objective == "sequence" and c.adapter == "lora"
    assert CPU.validate().history_len <= 10


@pytest.mark.parametrize(("key", "value"), [
    ("lr", -1.0), ("lr", 0.0), ("batch_size", 0), ("max_steps", 0), ("grad_accum", -2), ("adapter", "qlora"),
    ("lora_dropout", 1.0), ("target_r", 999), ("select_metric", "MRR"), ("target_modules", "everything"),
    ("target_modules", []), ("candidate_size", 1), ("weight_decay", -1e-3), ("tinit", 5000), ("patience", -1),
    ("init_r", True), ("distill_weight", 1.5), ("distill_weight", -0.1), ("distill_weight", "half"),
    ("distill_temperature", 0.0), ("distill_candidates", -1), ("distill_candidates", True),
    # the paper profile: objective=candidates, no teacher term — both candidate-level options are refused there
    ("distill_candidates", 4), ("distill_standardize", True), ("distill_standardize", "yes"),
    ("windows_per_user", -1), ("windows_per_user", 1.5), ("lora_layers", -1), ("lora_layers", True),
    ("distill_target", "oracle"), ("distill_target", "truth"),  # truth: no candidate-level term in PAPER
    ("distill_truth_weight", 1.5), ("distill_truth_weight", -0.1), ("distill_truth_weight", "half"),
    ("distill_truth_weight", True), ("distill_truth_weight", float("nan")),
    ("distill_truth_weight", 0.5),  # PAPER: no z-scored candidate-level teacher term to mix the truth into
])
def test_bad_values_raise_config_error_naming_the_field(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as err:
        dataclasses.replace(PAPER, **{key: value}).validate()
    assert err.value.field in (f"finetune.{key}", "finetune.tinit")
    assert "finetune." in str(err.value)


def test_truth_target_needs_a_z_scored_candidate_level_term() -> None:
    """distill_target=truth is refused where no candidate-level term exists or where it is not z-scored (a 0/1 row
    over the temperature would then be a near-uniform target), and accepted on the z-scored term."""
    term = dict(distill_weight=0.5, distill_candidates=2, distill_standardize=True, distill_temperature=0.5)
    assert FinetuneConfig.from_profile("cpu", **term, distill_target="truth").distill_target == "truth"
    for bad in ({**term, "distill_standardize": False}, {**term, "distill_candidates": 0,
                                                           "distill_standardize": False}, {}):
        with pytest.raises(ConfigError) as err:
            FinetuneConfig.from_profile("cpu", **bad, distill_target="truth")
        assert err.value.field == "finetune.distill_target"


def test_unknown_profile_or_setting_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown profile") as err:
        FinetuneConfig.from_profile("gpu-cluster")
    assert err.value.field == "finetune.profile"
    with pytest.raises(ConfigError) as err:
        FinetuneConfig.from_profile("cpu", learning_rate=1e-3)
    assert err.value.field == "finetune.learning_rate"


def test_target_modules_resolve_per_architecture() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    assert resolve_target_modules(tiny_backbone("llama").model) == ["q_proj", "v_proj"]
    assert resolve_target_modules(tiny_backbone("t5").model) == ["q", "v"]
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer()), n_embd=16, n_layer=1, n_head=2))
    assert resolve_target_modules(gpt2) == ["c_attn"]
    assert resolve_target_modules(tiny_backbone("llama").model, ["k_proj", "o_proj"]) == ["k_proj", "o_proj"]
    with pytest.raises(ConfigError, match="no linear layer named q") as err:
        resolve_target_modules(tiny_backbone("llama").model, ["q", "v"])
    assert err.value.field == "finetune.target_modules"


# --- training ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One AdaLoRA run on the tiny llama, shared by the tests below (~2 s)."""
    ds, split = _data()
    cfg = FinetuneConfig.from_profile("cpu", **TINY)
    bb = tiny_backbone("llama", scale=5.0)
    sp = tiny_soft_prompt()
    before = _fixed_loss(bb, sp, ds, split, cfg)
    base0, sp0 = _snapshot(bb.model, adapter=False), sp.weight.detach().clone()
    out_dir = tmp_path_factory.mktemp("ft") / "finetune"
    logged: list[dict] = []
    returned = finetune(bb, ds, split, sp, "SASRec", cfg, out_dir, log=logged.append)
    return dict(ds=ds, split=split, cfg=cfg, bb=returned, sp=sp, before=before, base0=base0, sp0=sp0,
                out_dir=out_dir, logged=logged)


def test_adalora_training_lowers_the_loss(trained) -> None:
    after = _fixed_loss(trained["bb"], trained["sp"], trained["ds"], trained["split"], trained["cfg"])
    assert after < trained["before"] - 0.05, (trained["before"], after)
    losses = [e["loss"] for e in trained["logged"]]
    assert len(losses) == 12
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    assert all(np.isfinite(losses))


def test_only_adapter_weights_change(trained) -> None:
    from peft import PeftModel

    model = trained["bb"].model
    assert isinstance(model, PeftModel)
    base_now = _snapshot(model, adapter=False)
    assert base_now.keys() == trained["base0"].keys()
    for n, t in trained["base0"].items():
        assert torch.equal(base_now[n], t), n  # backbone frozen
    assert torch.equal(trained["sp"].weight, trained["sp0"])  # soft prompt frozen
    assert not trained["sp"].weight.requires_grad
    lora = _snapshot(model, adapter=True)
    lora_E = [t for n, t in lora.items() if "lora_E" in n]
    assert lora_E and any(t.abs().sum() > 0 for t in lora_E)  # AdaLoRA's E starts at zero: it trained


def test_artifacts_and_rank_pruning(trained) -> None:
    out = trained["out_dir"]
    hist = read_json(out / "history.json")
    assert hist["steps"] == 12 and hist["adapter"] == "adalora" and hist["best"] is not None
    assert [e["step"] for e in hist["history"] if "valid" in e] == [4, 8, 12]
    for e in hist["history"]:  # the mean target rank is logged beside the metrics, within [1, C]
        if "valid" in e:
            assert 1.0 <= e["valid"]["mean_rank"] <= trained["cfg"].candidate_size
            assert e["valid"]["HR@1"] < 1.0 or e["valid"]["mean_rank"] == 1.0
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    cfg = read_json(out / "adapter" / "adapter_config.json")
    assert cfg["peft_type"] == "ADALORA" and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    assert cfg["rank_pattern"], "AdaLoRA should have allocated ranks within 12 steps"
    kept = sum(sum(v) for v in cfg["rank_pattern"].values())
    # The saved adapter is the best validation step's; pruning reaches the target budget (target_r=2 per matrix)
    # only after step max_steps - tfinal = 9, so an earlier best step keeps more, though fewer than init_r=6.
    assert kept < 6 * len(cfg["rank_pattern"])
    if hist["best_step"] == 12:
        assert kept <= 2 * len(cfg["rank_pattern"])
    state = read_json(out / "checkpoint" / "state.json")
    assert state["finished"] and state["step"] == 12
    assert not [p for p in out.rglob("*.tmp")]


def test_training_candidate_sets_are_saved_as_drawn(trained) -> None:
    """objective=candidates re-draws each example's negatives every epoch; the file holds every epoch's sets, as
    trained on (`epoch_sets`), with their hash in history.json."""
    import pandas as pd

    from delrec.data.candidates import CandidateSet
    from delrec.finetune import TRAIN_CANDIDATES_FILE, epoch_sets

    out, cfg, ds, split = trained["out_dir"], trained["cfg"], trained["ds"], trained["split"]
    path = out / TRAIN_CANDIDATES_FILE
    cs, df = CandidateSet.load(path), pd.read_parquet(path)
    assert cs.hash() == read_json(out / "history.json")["train_candidates"]
    exs = train_examples(split, cfg)
    epochs = cfg.max_steps * cfg.batch_size * cfg.grad_accum // len(exs)  # 12 updates of 8 over 16 examples: 6
    assert sorted(set(df["epoch"])) == list(range(epochs)) and len(cs) == epochs * len(exs)
    for e in range(epochs):
        rows = np.flatnonzero(df["epoch"].to_numpy() == e)
        np.testing.assert_array_equal(cs.items[rows], epoch_sets(exs, ds, cfg, e).items)
    assert not np.array_equal(cs.items[: len(exs)], cs.items[len(exs): 2 * len(exs)])  # re-drawn per epoch


def test_adapter_save_load_round_trip_gives_identical_scores(trained) -> None:
    from delrec.llm.scoring import TitleScorer

    ds, split, sp = trained["ds"], trained["split"], trained["sp"]
    cs = draw_candidates(split.examples("test"), ds, 20, seed=5)
    prompts, titles = lsr_inputs(ds, [e.history for e in split.examples("test")], cs.items, "movie", "SASRec", 6)
    trained_scores = TitleScorer(trained["bb"], sp).rank(prompts, titles)
    fresh = load_adapter(tiny_backbone("llama", scale=5.0), trained["out_dir"] / "adapter")
    assert not any(p.requires_grad for p in fresh.model.parameters())
    loaded_scores = TitleScorer(fresh, sp).rank(prompts, titles)
    np.testing.assert_allclose(loaded_scores, trained_scores, rtol=1e-5, atol=1e-6)
    plain = TitleScorer(tiny_backbone("llama", scale=5.0), sp).rank(prompts, titles)
    assert not np.allclose(plain, trained_scores, atol=1e-4)  # the adapter does change the scores


def test_finished_run_is_not_retrained(trained, tmp_path) -> None:
    ds, split = trained["ds"], trained["split"]
    called: list[dict] = []
    bb = finetune(tiny_backbone("llama", scale=5.0), ds, split, trained["sp"], "SASRec", trained["cfg"],
                  trained["out_dir"], log=called.append)
    assert called == []
    a = _snapshot(bb.model, adapter=True)
    b = _snapshot(trained["bb"].model, adapter=True)
    assert all(torch.equal(a[n], b[n]) for n in b)


def test_resume_after_interruption_equals_uninterrupted(tmp_path: Path) -> None:
    ds, split = _data()
    # Dropout on, AdaLoRA pruning inside the run, 2 micro-batches per step: every piece of state matters.
    cfg = FinetuneConfig.from_profile("cpu", **{**TINY, "lora_dropout": 0.2, "max_steps": 8, "eval_every": 3,
                                                "batch_size": 4, "grad_accum": 2, "tinit": 2, "tfinal": 2})

    def run(out: Path, crash_at: int | None) -> dict[str, torch.Tensor]:
        def log(entry: dict) -> None:
            if entry["step"] == crash_at:
                raise KeyboardInterrupt  # as if killed after step 5 (last checkpoint: step 3)
        bb = tiny_backbone("llama", scale=5.0)
        finetune(bb, ds, split, tiny_soft_prompt(), "SASRec", cfg, out, log=log)
        return load_file(str(out / "checkpoint" / "adapter.safetensors"))

    ref = run(tmp_path / "a", None)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", 5)
    state_file = tmp_path / "b" / "checkpoint" / "state.json"
    assert read_json(state_file)["step"] == 3
    state = read_json(state_file)  # as a version before scoring.prior_weight (and these options) wrote it: resumes
    del state["fingerprint"]["scoring"]["prior_weight"]
    for key in ("popularity_exponent", "negative_exponent", "distill_lift"):
        del state["fingerprint"]["config"][key]
    write_json(state_file, state)
    resumed = run(tmp_path / "b", None)
    assert ref.keys() == resumed.keys()
    for n in ref:
        assert torch.equal(ref[n], resumed[n]), n
    ha, hb = read_json(tmp_path / "a" / "history.json"), read_json(tmp_path / "b" / "history.json")
    assert [e["loss"] for e in ha["history"]] == [e["loss"] for e in hb["history"]]
    assert ha["best"] == hb["best"]
    assert ha["train_candidates"] and ha["train_candidates"] == hb["train_candidates"]


def test_checkpoint_of_another_run_is_refused(trained) -> None:
    cfg = dataclasses.replace(trained["cfg"], lr=0.05)
    with pytest.raises(ConfigError, match="different stage-2 run") as err:
        finetune(tiny_backbone("llama", scale=5.0), trained["ds"], trained["split"], trained["sp"], "SASRec",
                 cfg, trained["out_dir"])
    assert "config.lr" in str(err.value) and err.value.file.endswith("state.json")


def test_t5_adalora_trains_q_and_v(tmp_path: Path) -> None:
    ds, split = _data()
    cfg = FinetuneConfig.from_profile("cpu", **{**TINY, "max_steps": 3, "eval_every": 3, "tinit": 1, "tfinal": 1})
    bb = tiny_backbone("t5", scale=3.0)
    base0 = _snapshot(bb.model, adapter=False)
    out = finetune(bb, ds, split, tiny_soft_prompt(), "SASRec", cfg, tmp_path)
    names = [n for n, _ in out.model.named_parameters() if "lora_A" in n]
    assert names and all(n.split(".lora_A")[0].endswith((".q", ".v")) for n in names)
    assert all(torch.equal(p, base0[n]) for n, p in _snapshot(out.model, adapter=False).items())
    assert read_json(tmp_path / "adapter" / "adapter_config.json")["task_type"] == "SEQ_2_SEQ_LM"


def test_ablation_switches(tmp_path: Path) -> None:
    ds, split = _data()
    # adapter="none": no stage 2 at all; the backbone comes back untouched.
    bb = tiny_backbone("llama")
    cfg = FinetuneConfig.from_profile("cpu", **{**TINY, "adapter": "none"})
    assert finetune(bb, ds, split, tiny_soft_prompt(), "SASRec", cfg, tmp_path / "none").model is bb.model
    assert not hasattr(bb.model, "peft_config")
    # Plain LoRA without a soft prompt (the "no soft prompt" ablation) and another teacher name.
    cfg = FinetuneConfig.from_profile("cpu", **{**TINY, "adapter": "lora", "max_steps": 2, "eval_every": 2})
    out = finetune(tiny_backbone("llama", scale=5.0), ds, split, None, "GRU4Rec", cfg, tmp_path / "lora")
    assert read_json(tmp_path / "lora" / "adapter" / "adapter_config.json")["peft_type"] == "LORA"
    assert any("lora_A" in n for n, _ in out.model.named_parameters())
    hist = read_json(tmp_path / "lora" / "history.json")
    assert hist["fingerprint"]["teacher"] == "GRU4Rec" and hist["fingerprint"]["soft_prompt"] is None


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # the control: block 0's inputs need no grad
def test_lora_layers_adapts_the_last_blocks_and_skips_backward_below_them(tmp_path: Path) -> None:
    """lora_layers=1 on the 2-block tiny llama: adapters in block 1 only, and block 0 (frozen, under every trainable
    weight) gets no backward pass — what makes an update cheaper. Every block (0) is the control."""
    ds, split = _data()
    fired: dict[int, int] = {}
    for n_layers in (1, 0):
        bb = tiny_backbone("llama", scale=5.0)
        fired[n_layers] = 0
        block0 = bb.model.model.layers[0]
        block0.register_full_backward_hook(lambda *_, n=n_layers: fired.__setitem__(n, fired[n] + 1))
        cfg = FinetuneConfig.from_profile("cpu", **{**TINY, "adapter": "lora", "max_steps": 2, "eval_every": 2,
                                                    "lora_layers": n_layers})
        out = finetune(bb, ds, split, None, "SASRec", cfg, tmp_path / f"l{n_layers}")
        adapted = {n.split(".layers.")[1].split(".")[0] for n, _ in out.model.named_parameters() if "lora_A" in n}
        assert adapted == ({"1"} if n_layers else {"0", "1"})
        saved = read_json(tmp_path / f"l{n_layers}" / "adapter" / "adapter_config.json")["layers_to_transform"]
        assert saved == ([1] if n_layers else None)
    assert fired[1] == 0 and fired[0] > 0
    # more blocks than a (smaller) backbone has: every block, as 0 does
    bb = tiny_backbone("llama")
    assert adapted_layers(bb, FinetuneConfig.from_profile("cpu", lora_layers=3)) == [0, 1]
    assert adapted_layers(bb, FinetuneConfig.from_profile("cpu", lora_layers=2)) == [0, 1]
    assert adapted_layers(bb, FinetuneConfig.from_profile("cpu", lora_layers=0)) is None


def test_cpu_long_profile_trains_longer_and_both_validate_on_64_users() -> None:
    from delrec.pipeline import load_config

    short, long = load_config(overrides=["profile=cpu"]), load_config(overrides=["profile=cpu-long"])
    assert long.profile == long.finetune.profile == "cpu-long"
    assert long.finetune.max_steps >= 4 * short.finetune.max_steps
    # 16 users picked the best step by noise (95% CI about ±0.2 on HR@1)
    assert long.finetune.max_valid_examples >= 64 and short.finetune.max_valid_examples >= 64
    assert long.distill.total_steps > short.distill.total_steps
    assert long.scoring == short.scoring and long.soft_prompt == short.soft_prompt
    assert short.scoring.reduce == "sum"  # packed-trained LMs rank by the title's probability (learning_log P17)


def test_train_windows_predict_every_training_item_but_the_first_once() -> None:
    from delrec.finetune import train_prefixes, train_windows

    _, split = _data()
    cfg = FinetuneConfig.from_profile("cpu", objective="sequence", history_len=3, max_train_examples=0,
                                      windows_per_user=0)
    wins = train_windows(split, cfg)
    assert all(2 <= len(w) <= 4 for w in wins)
    # items 2.. of a window are predicted: together, every item of every training sequence but its first, once
    predicted = sorted(int(x) for w in wins for x in w[1:])
    assert predicted == sorted(int(x) for s in split.train_sequences for x in s[1:])
    capped = train_windows(split, dataclasses.replace(cfg, max_train_examples=5))
    assert len(capped) == 5 and all(any(np.array_equal(c, w) for w in wins) for c in capped)
    # windows_per_user=1: each training sequence's last window alone, so its last history_len items are predicted
    last = train_windows(split, dataclasses.replace(cfg, windows_per_user=1))
    assert len(last) == len(split.train_sequences)
    assert all(np.array_equal(w, s[-4:]) for w, s in zip(last, split.train_sequences, strict=True))
    two = train_windows(split, dataclasses.replace(cfg, windows_per_user=2))
    assert len(last) < len(two) < len(wins) and all(any(np.array_equal(c, w) for w in wins) for c in two)
    # the teacher term's prefixes: the next items the kept windows predict, each once
    two_cfg = dataclasses.replace(cfg, windows_per_user=2)
    got = sorted((e.user, len(e.history), e.target) for e in train_prefixes(split, two_cfg))
    want = sorted((int(u), t, int(s[t])) for u, s in zip(split.train_users, split.train_sequences, strict=True)
                  for t in range(max(1, len(s) - 2 * 3), len(s)))
    assert got == want and len(got) == sum(len(w) - 1 for w in two) < len(train_prefixes(split, cfg))


def test_sequence_objective_needs_the_next_verbalizer(tmp_path: Path) -> None:
    from delrec.llm.prompts import ScoringConfig

    ds, split = _data()
    cfg = FinetuneConfig.from_profile("cpu", objective="sequence", max_steps=1)
    with pytest.raises(ConfigError, match="verbalizer=next") as e:
        finetune(tiny_backbone(), ds, split, None, "SASRec", cfg, tmp_path / "ft",
                 scoring=ScoringConfig(verbalizer="open"))
    assert e.value.field == "finetune.objective"
    with pytest.raises(ConfigError):
        FinetuneConfig.from_profile("cpu", objective="pairs")


def test_popularity_exponent_weights_each_prediction_by_its_targets_rarity(tmp_path: Path) -> None:
    """popularity_exponent α: each training target's term weighted by (1 + training count)^−α, weights averaging 1
    over what the loss predicts; the first update's logged loss is exactly that weighted NLL of its windows (the
    adapter starts as the identity: LoRA's B is 0), and α 0 is the plain mean."""
    from delrec.finetune import _EpochBatches, target_weights, train_windows
    from delrec.llm.prompts import ScoringConfig, render_windows, title_views

    ds, split = _data()
    cfg = FinetuneConfig.from_profile("cpu", history_len=4, windows_per_user=0, max_steps=1, batch_size=4,
                                      max_valid_examples=2, lora_dropout=0.0, popularity_exponent=1.0)
    wins = train_windows(split, cfg)
    w = target_weights(split, wins, cfg)
    assert target_weights(split, wins, dataclasses.replace(cfg, popularity_exponent=0.0)) is None
    counts = np.bincount(np.concatenate(split.train_sequences), minlength=ds.n_items + 1)
    predicted = np.concatenate([x[1:] for x in wins])
    assert w is not None and w[predicted].mean() == pytest.approx(1.0)
    assert np.allclose(w * (1 + counts), w[1] * (1 + counts[1]))  # α 1: weight ∝ 1 / (1 + count)
    rare, common = predicted[np.argmin(counts[predicted])], predicted[np.argmax(counts[predicted])]
    assert counts[rare] < counts[common] and w[rare] > w[common]
    with pytest.raises(ConfigError, match="non-negative"):
        FinetuneConfig.from_profile("cpu", popularity_exponent=-0.5)

    sc = ScoringConfig(verbalizer="next", reduce="sum")
    first = next(iter(_EpochBatches(len(wins), cfg.batch_size, cfg.seed)))
    prompts, items = render_windows(title_views(ds, sc.year), ds.domain, "SASRec", [wins[i] for i in first],
                                    soft_prompt=False)
    bb = tiny_backbone()
    with torch.no_grad():
        s = sc.scorer(bb, None).sequence_scores(prompts, items).numpy()
    target = np.concatenate([wins[i][1:] for i in first])
    for alpha, want in ((1.0, -(w[target] * s).sum() / len(s)), (0.0, -s.mean())):
        run = dataclasses.replace(cfg, popularity_exponent=alpha)
        finetune(tiny_backbone(), ds, split, None, "SASRec", run, tmp_path / f"a{alpha}", scoring=sc)
        got = read_json(tmp_path / f"a{alpha}" / "history.json")["history"][0]["loss"]
        assert got == pytest.approx(float(want), rel=1e-4)
    assert abs(-(w[target] * s).sum() / len(s) + s.mean()) > 1e-3  # the two losses differ on this batch


def test_popularity_exponent_weights_the_candidates_objective_too(tmp_path: Path) -> None:
    """objective=candidates: the first update's loss is the mean over its examples of weight × cross-entropy of the
    target over its candidates (the same weights, averaging 1 over the training examples' targets)."""
    from delrec.finetune import _EpochBatches, epoch_sets, target_weights
    from delrec.llm.prompts import ScoringConfig

    ds, split = _data()
    cfg = dataclasses.replace(FinetuneConfig(**TINY), adapter="lora", max_steps=1, lora_dropout=0.0,
                              max_valid_examples=2, popularity_exponent=1.0).validate()
    exs = train_examples(split, cfg)
    w = target_weights(split, exs, cfg)
    assert w is not None and w[[e.target for e in exs]].mean() == pytest.approx(1.0)
    first = next(iter(_EpochBatches(len(exs), cfg.batch_size, cfg.seed)))
    cs = epoch_sets(exs, ds, cfg, 0)
    sc = ScoringConfig()
    prompts, titles = lsr_inputs(ds, [exs[i].history for i in first], cs.items[first], "movie", "SASRec",
                                 cfg.history_len, year=sc.year)
    with torch.no_grad():
        ce = F.cross_entropy(sc.scorer(tiny_backbone(), None).score(prompts, titles),
                             torch.as_tensor(cs.target_pos[first]), reduction="none").numpy()
    finetune(tiny_backbone(), ds, split, None, "SASRec", cfg, tmp_path / "ft", scoring=sc)
    got = read_json(tmp_path / "ft" / "history.json")["history"][0]["loss"]
    assert got == pytest.approx(float((w[cs.targets[first]] * ce).mean()), rel=1e-4)
    assert abs(float((w[cs.targets[first]] * ce).mean() - ce.mean())) > 1e-4


def test_negative_exponent_draws_training_negatives_by_popularity(tmp_path: Path) -> None:
    """negative_exponent β: the saved training candidate sets hold negatives drawn ∝ (1 + training count)^β (more
    popular than uniform ones, still outside each user's sequence); evaluation sets are not touched; refused where
    no training candidate set is drawn."""
    import pandas as pd

    from delrec.data.candidates import CandidateSet
    from delrec.finetune import TRAIN_CANDIDATES_FILE

    ds, split = _data()
    counts = np.bincount(np.concatenate(split.train_sequences), minlength=ds.n_items + 1)
    mean_count = {}
    for beta in (0.0, 8.0):
        cfg = dataclasses.replace(FinetuneConfig(**TINY), adapter="lora", max_steps=4, max_valid_examples=2,
                                  negative_exponent=beta).validate()
        out = tmp_path / f"b{beta}"
        finetune(tiny_backbone(), ds, split, None, "SASRec", cfg, out)
        cs = CandidateSet.load(out / TRAIN_CANDIDATES_FILE)
        users = pd.read_parquet(out / TRAIN_CANDIDATES_FILE)["user"].to_numpy()
        neg = cs.items != cs.targets[:, None]
        assert all(set(row[m].tolist()).isdisjoint(ds.sequences[u].tolist())
                   for row, m, u in zip(cs.items, neg, users, strict=True))
        mean_count[beta] = counts[cs.items[neg]].mean()
    assert mean_count[8.0] > 1.2 * mean_count[0.0]  # counts here are 1–8: a steep β shows it
    with pytest.raises(ConfigError, match="needs objective=candidates or distill_candidates"):
        FinetuneConfig.from_profile("cpu", negative_exponent=1.0)


class _Echo(torch.nn.Module):
    """A stand-in teacher (the `SeqRecommender` interface) whose choice depends on the history: a global order (item
    i scores −i, a popularity that history lifts cancel) plus 1.5 on the item after the history's last one."""

    fixed_len = False

    def __init__(self, n_items: int) -> None:
        super().__init__()
        from delrec.teachers import TeacherConfig

        self.cfg, self.n_items = TeacherConfig(max_len=8), n_items
        self.bias = torch.nn.Parameter(torch.zeros(n_items + 1))

    def logits(self, item_seq: torch.Tensor) -> torch.Tensor:
        out = -torch.arange(self.n_items + 1, dtype=torch.float32).expand(item_seq.shape[0], -1).clone()
        nxt = (item_seq[:, -1] % self.n_items + 1)[:, None]
        out = out.scatter_add(1, nxt, torch.full_like(nxt, 1.5, dtype=torch.float32))
        out[:, 0] = float("-inf")
        return out + 0 * self.bias


def test_distill_lift_targets_what_the_history_adds() -> None:
    """distill_lift: the teacher term's target is the softmax of the teacher's scores less its scores after a donor
    history — the global order cancels and the item the user's own history lifts wins, where the plain target
    follows the global order; refused without the candidate-level term."""
    from delrec.finetune import term_targets

    teacher = _Echo(12)
    items = np.array([[2, 4, 6, 11]])
    hist, donor = [np.array([1, 3])], [np.array([5, 10])]  # lifts item 4 (own) and item 11 (donor)
    cfg = FinetuneConfig.from_profile("cpu", distill_weight=0.5, distill_candidates=2, distill_standardize=True,
                                      distill_temperature=0.5, distill_lift="joint")
    plain = term_targets(teacher, hist, items, np.array([4]), cfg)
    lift = term_targets(teacher, hist, items, np.array([4]), cfg, donors=donor)
    assert items[0, plain.argmax()] == 2 and items[0, lift.argmax()] == 4
    assert lift[0, 3] < lift[0, 0] == pytest.approx(lift[0, 2])  # the donor's own lift counts against item 11
    with pytest.raises(ConfigError, match="must be one of off, joint, baseline"):
        FinetuneConfig.from_profile("cpu", distill_lift=True)
    for objective in ("sequence", "candidates"):
        with pytest.raises(ConfigError, match="needs objective=sequence with distill_candidates") as err:
            FinetuneConfig.from_profile("cpu", objective=objective, distill_weight=0.5, distill_lift="joint")
        assert err.value.field == "finetune.distill_lift"


def test_distill_lift_first_update_fits_history_lifts(tmp_path: Path) -> None:
    """objective=sequence, distill_candidates, distill_lift (λ 1, so the logged loss is the term alone): the first
    update's loss is the z-scored cross-entropy between the LM's and the teacher's history lifts over the term's sets,
    computed here from the same seeded sets and donors (other users, none of a set's candidates among the items
    either model reads of them) — and differs from the term without lifts. joint and baseline share that loss but
    not its gradient (baseline's stranger pass has none), so their first updates differ."""
    from delrec.data.candidates import donor_histories
    from delrec.finetune import teacher_term_sets, train_prefixes
    from delrec.llm.prompts import ScoringConfig
    from delrec.llm.scoring import ranking_loss, soft_targets
    from delrec.teachers import score_candidates

    ds, split = _data()
    sc = ScoringConfig(verbalizer="next", reduce="sum")
    cfg = FinetuneConfig.from_profile("cpu", adapter="lora", lora_dropout=0.0, max_steps=1, batch_size=4,
                                      grad_accum=1, history_len=4, windows_per_user=0, max_valid_examples=2,
                                      objective="sequence", distill_weight=1.0, distill_candidates=4,
                                      distill_standardize=True, distill_temperature=0.5, candidate_size=8,
                                      distill_lift="joint")
    teacher = _Echo(ds.n_items)
    prefixes = train_prefixes(split, cfg)
    exs, sets = teacher_term_sets(prefixes, ds, cfg, 0, 0)
    screen = max(cfg.history_len, teacher.cfg.max_len)  # what the LM shows and the teacher reads of a donor
    donors = donor_histories(exs, sets.items, screen, pool=prefixes,
                             seed=int(np.random.default_rng([cfg.seed, 0, 0, 1]).integers(2**31)))
    donor_users = [next(p.user for p in prefixes if p.history is d) for d in donors]
    for e, u, d, row in zip(exs, donor_users, donors, sets.items, strict=True):
        assert u != e.user and set(d[-screen:].tolist()).isdisjoint(row.tolist())
    scorer = sc.scorer(tiny_backbone(), None)
    hists = [e.history for e in exs]

    def lm(histories: list[np.ndarray]) -> torch.Tensor:
        prompts, titles = lsr_inputs(ds, histories, sets.items, ds.domain, "SASRec", cfg.history_len,
                                     year=sc.year, verbalizer="next")
        with torch.no_grad():
            return scorer.score(prompts, titles)

    def term(student: torch.Tensor, teacher_logits: np.ndarray) -> float:
        target = soft_targets(torch.as_tensor(teacher_logits), cfg.distill_temperature, True)
        return float(ranking_loss(student, target, cfg.distill_temperature, True))

    t_own, t_donor = score_candidates(teacher, hists, sets.items), score_candidates(teacher, donors, sets.items)
    want = term(lm(hists) - lm(donors), t_own - t_donor)
    plain = term(lm(hists), t_own)
    assert abs(want - plain) > 1e-3
    adapters = {}
    for lift in ("joint", "baseline"):
        finetune(tiny_backbone(), ds, split, None, "SASRec", dataclasses.replace(cfg, distill_lift=lift),
                 tmp_path / lift, scoring=sc, teacher=teacher)  # type: ignore[arg-type]
        got = read_json(tmp_path / lift / "history.json")["history"][0]["loss"]
        assert got == pytest.approx(want, rel=1e-4), lift
        adapters[lift] = load_file(str(tmp_path / lift / "checkpoint" / "adapter.safetensors"))
    assert any(not torch.allclose(adapters["joint"][n], adapters["baseline"][n]) for n in adapters["joint"])
