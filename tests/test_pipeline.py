"""`delrec run` end to end on a tiny offline setup: run folder contents, and resume after `kill -9`.

The backbone is a random 2-layer llama saved to disk (`delrec.llm.tiny`), the data a generated TSV pair; all stages
(teachers, stage 1, stage 2, evaluation, report) run for real, just small.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from delrec.io import read_json

TITLE_WORDS = ["red", "blue", "night", "day", "river", "king", "star", "city", "ghost", "dream", "storm", "road"]


def _write_data(root: Path, n_users: int = 40, n_items: int = 36) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for u in range(n_users):
        # a walk through the catalogue, so the next item is learnable from the last one
        start = int(rng.integers(n_items))
        rows += [(f"u{u}", f"i{(start + 2 * t) % n_items}", 1000 + t) for t in range(int(rng.integers(6, 11)))]
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(root / "interactions.tsv", sep="\t",
                                                                          index=False)
    titles = [f"{TITLE_WORDS[i % 12].title()} {TITLE_WORDS[(5 * i + 1) % 12]} ({1980 + i})" for i in range(n_items)]
    pd.DataFrame({"item_id": [f"i{i}" for i in range(n_items)], "title": titles}).to_csv(
        root / "items.tsv", sep="\t", index=False)
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config file pointing at a generated dataset and a tiny saved backbone."""
    from delrec.llm.tiny import tiny_backbone

    root = tmp_path_factory.mktemp("pipeline")
    data = _write_data(root / "data")
    titles = pd.read_csv(data / "items.tsv", sep="\t")["title"].tolist()
    bb = tiny_backbone("llama", seed=0, extra_text=titles)
    bb.model.save_pretrained(root / "backbone")
    bb.tokenizer.save_pretrained(root / "backbone")
    teacher = {"hidden": 16, "epochs": 4, "patience": 4, "batch_size": 16, "max_len": 10}
    cfg = {
        "profile": "cpu",
        "seed": 3,
        "data": {"name": "tiny", "path": str(data), "format": "generic", "domain": "movie"},
        "split": {"kind": "user", "seed": 1},
        "candidates": {"size": 8, "max_valid": 4},
        "teachers": {"models": ["sasrec", "gru4rec"], "distill_from": "sasrec", "top_k": 5,
                     "sasrec": {**teacher, "layers": 1, "heads": 1}, "gru4rec": teacher},
        "backbone": {"name_or_path": str(root / "backbone"), "dtype": "float32"},
        "soft_prompt": {"num_tokens": 4},
        "distill": {"total_steps": 6, "warmup_steps": 0, "batch_size": 2, "micro_batch_size": 2, "eval_every": 1,
                    "eval_examples": 4, "history_len": 5, "candidate_size": 8},
        "finetune": {"max_steps": 6, "warmup_steps": 0, "eval_every": 1, "max_train_examples": 8,
                     "max_valid_examples": 4, "history_len": 5, "batch_size": 1, "grad_accum": 2,
                     "init_r": 4, "target_r": 2, "candidate_size": 8},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return root


def _cmd(root: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "delrec", "run", "--config", str(root / "config.yaml"), "--out", str(out)]


def _env() -> dict[str, str]:
    # one thread: identical float reductions in every process, so resumed and uninterrupted runs can match exactly
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _metrics(out: Path) -> dict[str, dict[str, float]]:
    m = read_json(out / "metrics.json")
    return {name: {k: v["value"] for k, v in row["metrics"].items()} for name, row in m["models"].items()}


@pytest.fixture(scope="module")
def reference(setup: Path) -> Path:
    out = setup / "reference"
    proc = subprocess.run(_cmd(setup, out), env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_run_folder_holds_every_artifact(reference: Path) -> None:
    for rel in ("config.yaml", "manifest.json", "metrics.json", "report.md", "metrics.png", "curves.png",
                "split.json", "candidates/test.parquet", "candidates/valid.parquet", "data/dataset.json",
                "teachers/sasrec/model/model.safetensors", "teachers/gru4rec/model/model.safetensors",
                "teachers/sasrec/rollout5_train.parquet", "distill/soft_prompt/soft_prompt.safetensors",
                "finetune/adapter/adapter_config.json", "results/DELRec.json", "predictions/DELRec.parquet",
                "results/popularity.json"):
        assert (reference / rel).is_file(), rel
    metrics = read_json(reference / "metrics.json")
    assert set(metrics["models"]) == {"popularity", "SASRec", "GRU4Rec", "DELRec"}
    assert metrics["chance"]["HR@1"] == 1 / metrics["candidate_size"]
    for row in metrics["models"].values():
        assert 0.0 <= row["metrics"]["HR@1"]["value"] <= row["metrics"]["HR@5"]["value"] <= 1.0
    manifest = read_json(reference / "manifest.json")
    assert manifest["data_fingerprint"] and manifest["packages"]["torch"]
    assert manifest["candidates"]["test"]["hash"] == metrics["candidates_hash"]
    report = (reference / "report.md").read_text(encoding="utf-8")
    assert "| DELRec |" in report and "| popularity |" in report and "| chance (random order) |" in report
    assert "![curves](curves.png)" in report
    # no temporary files left behind by the atomic writers
    assert not [p for p in reference.rglob("*") if ".tmp" in p.name]


def test_rerun_of_a_finished_run_skips_every_stage(setup: Path, reference: Path) -> None:
    before = read_json(reference / "metrics.json")
    t0 = time.perf_counter()
    proc = subprocess.run(_cmd(setup, reference), env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "teacher sasrec" not in proc.stdout  # nothing retrained
    assert _metrics(reference) == {n: {k: v["value"] for k, v in r["metrics"].items()}
                                   for n, r in before["models"].items()}
    assert time.perf_counter() - t0 < 120


def test_changed_config_is_refused_without_fresh(setup: Path, reference: Path) -> None:
    proc = subprocess.run([*_cmd(setup, reference), "--set", "distill.lr=0.5"], env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "distill" in err[0] and "Traceback" not in proc.stderr


# Kill points: a file that appears while the stage is in progress (after its first checkpoint).
KILL_POINTS = ["teachers/sasrec/checkpoint/state.json", "teachers/gru4rec/checkpoint/state.json",
               "distill/checkpoint/state.json", "finetune/checkpoint/state.json"]


def _run_until(cmd: list[str], marker: Path, timeout: float = 300) -> bool:
    """Start ``cmd``, SIGKILL it as soon as ``marker`` exists; True if it was killed before finishing."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.perf_counter()
    while proc.poll() is None and time.perf_counter() - t0 < timeout:
        if marker.exists():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.005)
    proc.wait()
    return False


def test_killed_at_several_points_resumes_to_the_same_metrics(setup: Path, reference: Path) -> None:
    out = setup / "killed"
    killed = [_run_until(_cmd(setup, out), out / marker) for marker in KILL_POINTS]
    assert all(killed), f"the run finished before some kill points: {dict(zip(KILL_POINTS, killed, strict=True))}"
    assert not (out / "metrics.json").exists()
    proc = subprocess.run(_cmd(setup, out), env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _metrics(out) == _metrics(reference)
    from safetensors.torch import load_file

    for rel in ("distill/soft_prompt/soft_prompt.safetensors", "finetune/adapter/adapter_model.safetensors",
                "teachers/sasrec/model/model.safetensors"):
        a, b = load_file(str(out / rel)), load_file(str(reference / rel))
        assert a.keys() == b.keys()
        for k in a:
            assert np.allclose(a[k].numpy(), b[k].numpy(), atol=1e-6), (rel, k)


def test_reuse_copies_only_stages_whose_settings_match(setup: Path, reference: Path, tmp_path: Path) -> None:
    from delrec.pipeline import Run, load_config, reuse_stages

    # no stage 2: data, both teachers and stage 1 are shared with the reference run, so nothing is retrained
    out = tmp_path / "no_stage2"
    proc = subprocess.run([*_cmd(setup, out), "--reuse", str(reference), "--set", "finetune.adapter=none"],
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reused from" in proc.stdout and "distill" in proc.stdout.split("reused from")[1].splitlines()[0]
    assert not (out / "finetune" / "adapter").exists()
    ref, got = _metrics(reference), _metrics(out)
    assert got["SASRec"] == ref["SASRec"] and got["GRU4Rec"] == ref["GRU4Rec"]
    assert read_json(out / "metrics.json")["candidates_hash"] == read_json(reference / "metrics.json")[
        "candidates_hash"]
    # a different stage-1 setting keeps the teachers but not the soft prompt; a different split keeps nothing
    cfg = load_config(setup / "config.yaml", ["distill.lr=0.5"])
    assert reuse_stages(Run(tmp_path / "lr", cfg), reference) == ["data", "teacher:sasrec", "teacher:gru4rec"]
    cfg = load_config(setup / "config.yaml", ["split.seed=9"])
    assert reuse_stages(Run(tmp_path / "split", cfg), reference) == []
    # a run that was itself made with --reuse can be reused in turn (its stages already record "reused")
    cfg = load_config(setup / "config.yaml", ["distill.lr=0.5"])
    assert reuse_stages(Run(tmp_path / "chain", cfg), out) == ["data", "teacher:sasrec", "teacher:gru4rec"]


def test_stage1_with_ta_alone_exports_no_teacher_predictions(setup: Path, tmp_path: Path) -> None:
    """distill.tasks=[ta] (the `w/o RPS` ablation) reads no teacher output, so stage 1 exports neither the teacher's
    top-k nor its roll-out; with RPS the roll-out is exported (the control that the first check can fail)."""
    for tasks, exported in (("[ta]", False), ("[ta,rps]", True)):
        out = tmp_path / tasks.strip("[]").replace(",", "-")
        proc = subprocess.run([*_cmd(setup, out), "--set", f"distill.tasks={tasks}", "--set",
                               "teachers.models=[sasrec]", "--until", "distill"],
                              env=_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (out / "distill" / "soft_prompt").is_dir()
        assert bool(list((out / "teachers" / "sasrec").glob("*.parquet"))) is exported, tasks


@pytest.mark.parametrize("extra", [[], ["finetune.distill_candidates=2", "finetune.distill_standardize=true"]],
                         ids=["title-tokens", "candidate-sets"])
def test_stage2_distillation_reads_the_run_folders_teacher(setup: Path, reference: Path, tmp_path: Path,
                                                           extra: list[str]) -> None:
    """finetune.distill_weight > 0: stage 2 loads `teachers.distill_from` from the run folder and logs the
    distillation loss beside the training loss — along title tokens, or over candidate sets of training prefixes
    (distill_candidates); every other stage is reused."""
    out = tmp_path / "kd"
    sets = [a for kv in ["finetune.distill_weight=0.5", *extra] for a in ("--set", kv)]
    proc = subprocess.run([*_cmd(setup, out), "--reuse", str(reference), *sets],
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hist = read_json(out / "finetune" / "history.json")
    assert hist["config"]["distill_weight"] == 0.5
    assert hist["config"]["distill_candidates"] == (2 if extra else 0)
    assert hist["config"]["distill_standardize"] is bool(extra)
    losses = [(e["loss"], e["distill_loss"]) for e in hist["history"]]
    assert losses and all(np.isfinite(a) and np.isfinite(b) and b > 0 for a, b in losses)
    assert hist["fingerprint"]["teacher_model"]
    assert _metrics(out)["SASRec"] == _metrics(reference)["SASRec"]
    if extra:  # the teacher term's candidate sets, 2 per micro-batch trained, are saved with their hash
        from delrec.data.candidates import CandidateSet

        cs = CandidateSet.load(out / "finetune" / "train_candidates.parquet")
        micro = hist["steps"] * hist["config"]["grad_accum"]
        assert cs.hash() == hist["train_candidates"] and len(cs) == 2 * micro
    else:
        assert hist["train_candidates"] is None and not (out / "finetune" / "train_candidates.parquet").exists()


def test_prior_weight_auto_is_chosen_with_the_checkpoint_and_used_by_the_test_and_recommend(
        setup: Path, reference: Path, tmp_path: Path) -> None:
    """``scoring.prior_weight=auto`` (the cpu profiles'): stage 2 keeps the adapter and λ that rank the validation
    users best together; the test evaluation, the report and `DELRec.from_pretrained` all use that λ. A run with no
    trained stage chooses it on the validation users at evaluation."""
    from delrec.metrics import PRIOR_GRID
    from delrec.recommend import DELRec

    out = reference
    assert yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))["scoring"]["prior_weight"] == "auto"
    hist = read_json(out / "finetune" / "history.json")
    evals = [e["valid"] for e in hist["history"] if "valid" in e]
    assert evals and all(v["prior_weight"] in PRIOR_GRID for v in evals)
    for v in evals:  # each pass's metric is its best λ's
        assert v["NDCG@5"] == max(v["by_prior"].values()) == v["by_prior"][str(v["prior_weight"])]
    lam = hist["best"]["prior_weight"]
    assert read_json(out / "results" / "DELRec.json")["prior_weight"] == lam
    assert read_json(out / "metrics.json")["models"]["DELRec"]["prior_weight"] == lam
    assert f"less {lam:g} × its score after an empty history" in (out / "report.md").read_text(encoding="utf-8")
    rec = DELRec.from_pretrained(out)
    assert rec.settings.scoring["prior_weight"] == lam
    # the run's test ranks, recomputed through recommend's scoring path
    from delrec.metrics import ranks_from_scores
    from delrec.pipeline import Run

    run = Run(out)
    test = run.candidates("test")
    scores = rec.score([h.tolist() for h in run.histories("test", test)], test.items.tolist())
    preds = pd.read_parquet(out / "predictions" / "DELRec.parquet")
    np.testing.assert_array_equal(ranks_from_scores(scores, test.target_pos), preds["rank"].to_numpy())

    bare = tmp_path / "bare"  # no soft prompt, no adapter: evaluation chooses λ for the untrained LM
    proc = subprocess.run([*_cmd(setup, bare), "--reuse", str(reference), "--set", "soft_prompt.num_tokens=0",
                           "--set", "finetune.adapter=none"],
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "chosen on 4 validation users" in proc.stdout + proc.stderr
    assert read_json(bare / "results" / "DELRec.json")["prior_weight"] in PRIOR_GRID


def test_chosen_prior_weight_reads_the_final_models_choice(tmp_path: Path) -> None:
    """The test's λ first; else the selected adapter's; a soft prompt's λ only when no adapter follows it (it was
    chosen for another model)."""
    from delrec.io import write_json
    from delrec.llm.soft_prompt import CONFIG_NAME
    from delrec.pipeline import adapter_dir, chosen_prior_weight, soft_prompt_dir

    assert chosen_prior_weight(tmp_path) is None
    write_json(soft_prompt_dir(tmp_path) / CONFIG_NAME, {"valid": {"NDCG@5": 0.5, "prior_weight": 0.25}})
    assert chosen_prior_weight(tmp_path) == 0.25
    adapter_dir(tmp_path).mkdir(parents=True)
    write_json(tmp_path / "finetune" / "history.json", {"best": None})  # stage 2 without validation users
    assert chosen_prior_weight(tmp_path) is None
    write_json(tmp_path / "finetune" / "history.json", {"best": {"NDCG@5": 0.6, "prior_weight": 0.75}})
    assert chosen_prior_weight(tmp_path) == 0.75
    write_json(tmp_path / "results" / "DELRec.json", {"prior_weight": 1})
    assert chosen_prior_weight(tmp_path) == 1.0


@pytest.mark.parametrize(("key", "now", "before"), [("windows_per_user", 3, 0), ("lora_layers", 15, 0)])
def test_resolved_config_from_before_a_stage2_key_keeps_what_it_trained(setup: Path, reference: Path, tmp_path: Path,
                                                                       key: str, now: int, before: int) -> None:
    """A run folder's resolved config.yaml written before finetune.windows_per_user (every window trained) or
    finetune.lora_layers (every block adapted): it reads back as what it trained (0), not as the cpu profile's value,
    so a rerun or --reuse does not take that stage 2 for another one; a hand-written config that does not name the
    key still gets the profile's value."""
    from delrec.pipeline import load_config

    saved = yaml.safe_load((reference / "config.yaml").read_text(encoding="utf-8"))
    assert saved["finetune"][key] == now  # written out now
    del saved["finetune"][key]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved), encoding="utf-8")
    assert getattr(load_config(tmp_path / "config.yaml").finetune, key) == before
    assert getattr(load_config(setup / "config.yaml").finetune, key) == now


def test_older_run_folders_length_norm_becomes_scoring_reduce(tmp_path: Path) -> None:
    from delrec.pipeline import load_config

    old = tmp_path / "config.yaml"
    old.write_text(yaml.safe_dump({"distill": {"length_norm": True}, "finetune": {"length_norm": True},
                                   "evaluate": {"length_norm": False, "batch_size": 2}}), encoding="utf-8")
    cfg = load_config(old)
    assert cfg.scoring.reduce == "sum" and cfg.evaluate.batch_size == 2  # the test metrics' setting wins
    assert cfg.scoring.verbalizer == "title"  # what every older version did, not the cpu profile's new default
    assert load_config().scoring.verbalizer == "next"
    assert load_config().scoring.prior_weight == "auto"
    # a resolved config of the version before the packed forms: its open verbalizer trains as it did
    resolved = tmp_path / "resolved.yaml"
    written = {k: {} for k in ("data", "split", "candidates", "teachers", "backbone", "soft_prompt", "evaluate")}
    resolved.write_text(yaml.safe_dump({**written, "scoring": {"verbalizer": "open"}, "finetune": {"lr": 3e-3},
                                        "distill": {"fixed_weights": [0.5, 0.5]}}), encoding="utf-8")
    cfg = load_config(resolved)
    assert (cfg.finetune.objective, cfg.distill.rps_form) == ("candidates", "candidates")
    assert cfg.scoring.prior_weight == 0.0  # resolved before the key existed: uncalibrated, as it ran
    # a user's own config that names a few sections keeps the profile's packed forms
    assert load_config(overrides=["distill.fixed_weights=[0.3, 0.7]"]).distill.rps_form == "sequence"
    from delrec.errors import ConfigError

    with pytest.raises(ConfigError, match="verbalizer=next") as e:  # a hand-written one is told what to change
        load_config(overrides=["scoring.verbalizer=open"])
    assert e.value.field == "finetune.objective"
    old.write_text(yaml.safe_dump({"finetune": {"length_norm": False}, "scoring": {"reduce": "mean"}}),
                   encoding="utf-8")
    assert load_config(old).scoring.reduce == "mean"  # an explicit new setting is kept


def test_option_words_off_and_on_stay_text(tmp_path: Path) -> None:
    """YAML 1.1 reads off/on/yes/no as booleans; `finetune.distill_lift=off` (a documented value) must arrive as
    text from --set and from a config file alike, while true/false stay booleans."""
    from delrec.pipeline import load_config

    cfg = load_config(None, ["finetune.distill_lift=off", "finetune.sliding_window=true"])
    assert cfg.finetune.distill_lift == "off" and cfg.finetune.sliding_window is True
    path = tmp_path / "config.yaml"
    path.write_text("finetune:\n  distill_lift: off\n  sliding_window: false\n", encoding="utf-8")
    cfg = load_config(path)
    assert cfg.finetune.distill_lift == "off" and cfg.finetune.sliding_window is False
