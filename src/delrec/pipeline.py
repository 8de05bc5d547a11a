"""`delrec run`: teachers → stage 1 (distill) → stage 2 (AdaLoRA) → evaluation, in one resumable run folder.

Each stage records itself in ``manifest.json`` once its artifacts are written; rerunning the same command skips
finished stages and lets the unfinished one resume from its own checkpoint. See docs/run-folder.md for the layout.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from delrec.data import CandidateSet, DataConfig, SeqDataset, Split, draw_candidates, make_split, prepare_dataset
from delrec.distill import DistillConfig
from delrec.errors import ConfigError
from delrec.finetune import FinetuneConfig
from delrec.io import read_json, write_json, write_text
from delrec.llm.backbone import BackboneConfig
from delrec.llm.prompts import ScoringConfig
from delrec.llm.soft_prompt import SoftPromptConfig
from delrec.settings import build, deep_merge, load_yaml, parse_override, set_dotted, to_dict
from delrec.teachers import MODELS, TeacherConfig

STAGES = ("data", "teachers", "distill", "finetune", "evaluate", "report")


@dataclass
class SplitConfig:
    kind: Literal["user", "loo"] = "user"  # user: the paper's 80/10/10 users; loo: leave-one-out
    seed: int = 42
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)  # user split only

    def validate(self) -> None:
        r = self.ratios
        if len(r) != 3 or any(x < 0 for x in r) or abs(sum(r) - 1.0) > 1e-6:
            raise ConfigError(f"must be three non-negative numbers summing to 1, got {list(r)}", field="split.ratios")


@dataclass
class CandidateConfig:
    size: int = 20  # target + size-1 negatives outside the user's history
    seed: int = 2024
    max_test: int | None = None  # subsample test examples (seeded) when the test set is too big to score
    max_valid: int | None = 64  # validation examples used for early stopping of the LLM stages

    def validate(self) -> None:
        if self.size < 2:
            raise ConfigError(f"must be at least 2, got {self.size}", field="candidates.size")
        for name in ("max_test", "max_valid"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"must be positive or null, got {v}", field=f"candidates.{name}")


@dataclass
class TeachersConfig:
    models: list[str] = field(default_factory=lambda: list(MODELS))  # teachers trained and reported
    distill_from: str = "sasrec"  # whose pattern stage 1 distils (ablation: sasrec | gru4rec | caser)
    top_k: int = 10  # teacher top-k exported for the RPS task
    sasrec: TeacherConfig = field(default_factory=lambda: TeacherConfig(model="sasrec"))
    gru4rec: TeacherConfig = field(default_factory=lambda: TeacherConfig(model="gru4rec"))
    caser: TeacherConfig = field(default_factory=lambda: TeacherConfig(model="caser"))

    def validate(self) -> None:
        for m in self.models:
            if m not in MODELS:
                raise ConfigError(f"unknown teacher {m!r}; choose from {', '.join(MODELS)}", field="teachers.models")
        if self.distill_from not in MODELS:
            raise ConfigError(f"unknown teacher {self.distill_from!r}; choose from {', '.join(MODELS)}",
                              field="teachers.distill_from")
        if self.top_k < 1:
            raise ConfigError(f"must be positive, got {self.top_k}", field="teachers.top_k")
        for m in MODELS:
            if getattr(self, m).model != m:
                raise ConfigError(f"teachers.{m}.model must be {m!r}", field=f"teachers.{m}.model")

    def config(self, name: str) -> TeacherConfig:
        return getattr(self, name)


@dataclass
class EvalConfig:
    batch_size: int = 4  # prompts scored together

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"must be positive, got {self.batch_size}", field="evaluate.batch_size")


@dataclass
class RunConfig:
    """Everything one DELRec run needs; `config.yaml` in the run folder is this, fully resolved."""

    profile: Literal["cpu", "cpu-long", "paper"] = "cpu"
    seed: int = 42
    device: str = "cpu"  # cpu | cuda | cuda:N — applied to the teachers and the backbone
    log: Literal["none", "tensorboard"] = "none"
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    candidates: CandidateConfig = field(default_factory=CandidateConfig)
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    soft_prompt: SoftPromptConfig = field(default_factory=SoftPromptConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)  # how titles are shown and scored, all stages
    distill: DistillConfig = field(default_factory=DistillConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            raise ConfigError(f"must be cpu, cuda, cuda:N, mps or auto, got {self.device!r}", field="device")
        # Every user must yield examples: a history item + target (user split), plus a validation target (loo).
        need = 3 if self.split.kind == "loo" else 2
        if self.data.preprocess.min_seq_len < need:
            raise ConfigError(f"must be at least {need} for the {self.split.kind!r} split, got "
                              f"{self.data.preprocess.min_seq_len}", field="data.preprocess.min_seq_len")
        for where, size in (("candidates.size", self.candidates.size), ("distill.candidate_size",
                            self.distill.candidate_size), ("finetune.candidate_size", self.finetune.candidate_size)):
            self.scoring.check_candidates(size, where)
        # The packed forms score each item as the next entry of an open list: checked here, before any training.
        packed = [("finetune.objective", self.finetune.objective == "sequence" and self.finetune.adapter != "none"),
                  ("distill.rps_form", self.distill.rps_form == "sequence" and "rps" in self.distill.tasks
                   and self.soft_prompt.num_tokens > 0)]
        for where, on in packed:
            if on and self.scoring.verbalizer != "next":
                raise ConfigError(f"the packed form needs scoring.verbalizer=next, got {self.scoring.verbalizer!r}",
                                  field=where)
            if on and self.scoring.year == "unscored":
                raise ConfigError("the packed form needs titles shown as scored (scoring.year keep or hidden)",
                                  field=where)


# Stage 1 on 2 CPU cores with SmolLM2-135M: one step = 4 TA examples + 4 packed RPS windows (each user's last 10
# items, then the teacher's 10-step greedy roll-out: 40 teacher predictions), two backward passes for the dynamic
# weights: 8–10 s (the paper: 800 steps of 20 examples per task on a GPU). lr 2e-2: stage1_log S5 (RPS loss
# 1.50 → 1.43 over 48 steps; at 5e-3, S4, it stayed within noise in 16 steps). 24 steps (~5 minutes with
# validation): at 48 (~10 minutes) the default run took 34 minutes, and neither 48 steps nor lr 0.1 (S5, S6) moved
# the frozen LM's ranking beyond noise, so the cpu budget goes to stage 2.
CPU_DISTILL = DistillConfig(lr=2e-2, warmup_steps=4, total_steps=24, batch_size=4, micro_batch_size=4,
                            eval_every=12, patience=0, history_len=10, eval_examples=32, rps_form="sequence")


def profile(name: str) -> RunConfig:
    """The built-in presets: ``cpu`` finishes on a 2-core CPU in ~30 minutes, ``cpu-long`` (the quality benchmark's)
    in ≤ 2 hours; ``paper`` is the paper's setting (GPU)."""
    if name in ("cpu", "cpu-long"):
        distill = CPU_DISTILL if name == "cpu" else dataclasses.replace(CPU_DISTILL, total_steps=96, eval_every=32,
                                                                         eval_examples=64)
        # The next verbalizer (the history an open list, candidates scored as its next entry, not listed):
        # validation NDCG@5 0.427 before any training (open: 0.393, listed: 0.117; learning_log P12, P10, P0), and
        # it trains on packed windows at ~35× the examples per CPU-second. Titles scored by their summed
        # log-likelihood (the LM's probability of the title): once trained on packed windows this ranks above the
        # per-token mean (the same adapter: HR@1 0.325 vs 0.26, NDCG@5 0.543 vs 0.510; P14, P17), though below it
        # untrained (0.366 vs 0.427). The `paper` profile keeps the paper's listed candidate set.
        # prior_weight=auto: λ chosen with each checkpoint on the validation users. ML-100K user split: λ 0 at every
        # pass, stages 1–2 + test +43 s (3%); Amazon Beauty loo (titles ≤ 8 words): λ 1, test HR@1 0.134 → 0.249
        # (benchmarks/results/quality.md). Under `next` the prior is one score per distinct item per pass.
        cfg = RunConfig(profile=name, soft_prompt=SoftPromptConfig(num_tokens=20), distill=distill,  # type: ignore[arg-type]
                        finetune=FinetuneConfig.from_profile(name),
                        scoring=ScoringConfig(verbalizer="next", reduce="sum", prior_weight="auto"))
        # ML-100K user split on 2 cores: 8–26 s per epoch, best validation epoch within the first ~5 (benchmarks/
        # results/teachers.md), so 10 epochs with patience 3 keeps all three teachers under ~8 minutes.
        for m in MODELS:
            setattr(cfg.teachers, m, dataclasses.replace(cfg.teachers.config(m), epochs=10, patience=3))
        return cfg
    if name == "paper":
        return RunConfig(profile="paper", backbone=BackboneConfig(name_or_path="google/flan-t5-xl", dtype="bfloat16"),
                         device="cuda", soft_prompt=SoftPromptConfig(num_tokens=100),
                         distill=DistillConfig(), finetune=FinetuneConfig.from_profile("paper"),
                         evaluate=EvalConfig(batch_size=20), candidates=CandidateConfig(max_valid=None))
    raise ConfigError(f"unknown profile {name!r}; choose cpu, cpu-long or paper", field="profile")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Profile defaults ← YAML file ← ``--set key=value`` overrides, validated with file:line:field errors."""
    data: dict[str, Any] = {}
    lines: dict[str, int] = {}
    if path is not None:
        data, lines = load_yaml(path)
    over: dict[str, Any] = {}
    for text in overrides or []:
        key, value = parse_override(text)
        set_dotted(over, key, value)
    merged = _migrate(deep_merge(data, over))
    # RPS reads the exported teacher top-k, so its k is teachers.top_k; copy it before validation checks it.
    top_k = merged.get("teachers", {}).get("top_k") if isinstance(merged.get("teachers"), dict) else None
    if top_k is not None and isinstance(merged.get("distill", {}), dict):
        given = merged.get("distill", {}).get("teacher_k")
        if given is not None and given != top_k:
            raise ConfigError(f"differs from teachers.top_k ({top_k}); set only teachers.top_k", file=path,
                              line=lines.get("distill.teacher_k"), field="distill.teacher_k")
        merged = deep_merge(merged, {"distill": {"teacher_k": top_k}})
    name = merged.get("profile", "cpu")
    if not isinstance(name, str):
        raise ConfigError(f"must be cpu, cpu-long or paper, got {name!r}", file=path, line=lines.get("profile"),
                          field="profile")
    try:
        base = profile(name)
    except ConfigError as e:
        raise ConfigError(e.message, file=path, line=lines.get("profile"), field="profile") from None
    cfg = build(RunConfig, merged, file=path, lines=lines, base=base)
    return _propagate(cfg)


RESOLVED_SECTIONS = ("data", "split", "candidates", "teachers", "backbone", "soft_prompt", "scoring", "distill",
                     "finetune", "evaluate")


# A resolved config written before each of these keys existed ran with this value, whatever the profile says now.
_BEFORE_KEY: dict[str, dict[str, Any]] = {
    "finetune": {"objective": "candidates",  # one example per prompt, before the packed forms
                 "windows_per_user": 0,  # every window trained
                 "lora_layers": 0},  # every block adapted
    "distill": {"rps_form": "candidates"},
    "scoring": {"prior_weight": 0.0},  # no calibration
}


def _migrate(merged: dict[str, Any]) -> dict[str, Any]:
    """Read run folders written by older versions: ``{distill,finetune,evaluate}.length_norm`` became the single
    ``scoring.reduce`` (mean | sum; the evaluation's value is the one the old run's test metrics used), and those
    versions listed the candidates (``scoring.verbalizer=title``) where the cpu profiles now use ``next``; configs
    resolved before the packed forms existed keep one example per prompt (``objective``/``rps_form`` candidates),
    and those resolved before ``finetune.windows_per_user`` trained on every window (0) — and before
    ``finetune.lora_layers`` adapted every block (0) — whatever the profile says now."""
    # A resolved config.yaml (every field written) lacking a key of _BEFORE_KEY ran with that key's old value.
    # Recognised by every section being written out (a hand-written config names a few), so a user's own config
    # without these keys still gets the profile's values.
    if all(isinstance(merged.get(k), dict) for k in RESOLVED_SECTIONS):
        missing = {sec: {k: v for k, v in keys.items() if k not in merged[sec]} for sec, keys in _BEFORE_KEY.items()}
        merged = deep_merge(merged, missing)
    old = {sec: merged[sec].pop("length_norm") for sec in ("distill", "finetune", "evaluate")
           if isinstance(merged.get(sec), dict) and "length_norm" in merged[sec]}
    if not old:
        return merged
    value = old.get("evaluate", old.get("finetune", old.get("distill")))
    return deep_merge({"scoring": {"verbalizer": "title", "reduce": "mean" if value else "sum"},
                       "finetune": {"objective": "candidates"}, "distill": {"rps_form": "candidates"}}, merged)


def _propagate(cfg: RunConfig) -> RunConfig:
    """Apply run-wide settings (device, seed) to the sections that use them."""
    for m in MODELS:
        setattr(cfg.teachers, m, dataclasses.replace(cfg.teachers.config(m), device=cfg.device))
    cfg.backbone = dataclasses.replace(cfg.backbone, device="cuda" if cfg.device == "auto" and _cuda() else
                                       ("cpu" if cfg.device == "auto" else cfg.device))
    cfg.soft_prompt = dataclasses.replace(cfg.soft_prompt, teacher=TEACHER_NAMES[cfg.teachers.distill_from])
    cfg.distill = dataclasses.replace(cfg.distill, teacher_k=cfg.teachers.top_k)
    return cfg


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


TEACHER_NAMES = {"sasrec": "SASRec", "gru4rec": "GRU4Rec", "caser": "Caser"}


# A run folder's stage artifacts, named here once: the pipeline, `recommend` and the benchmarks all read them.
def soft_prompt_dir(run_dir: str | Path) -> Path:
    """The distilled soft prompt of a run folder (`SoftPrompt.from_pretrained`); absent when stage 1 is off."""
    from delrec.distill import BEST_DIR

    return Path(run_dir) / "distill" / BEST_DIR


def adapter_dir(run_dir: str | Path) -> Path:
    """The stage-2 adapter a run folder selected (`finetune.load_adapter`); absent when ``finetune.adapter=none``."""
    from delrec.finetune import ADAPTER_DIR

    return Path(run_dir) / "finetune" / ADAPTER_DIR


def finetune_checkpoint_dir(run_dir: str | Path) -> Path:
    """Stage 2's resumable state after its last update (``adapter.safetensors``, ``state.json``…), which may be a
    later update than the selected adapter (`adapter_dir`)."""
    from delrec.finetune import CHECKPOINT_DIR

    return Path(run_dir) / "finetune" / CHECKPOINT_DIR


def chosen_prior_weight(run_dir: str | Path) -> float | None:
    """The λ a run with ``scoring.prior_weight=auto`` chose on its validation users: the one its test metrics used
    (``results/DELRec.json``), else the one the final model's last trained stage chose with it — the selected
    stage-2 adapter's, or without an adapter the selected soft prompt's; None when none has been chosen."""
    from delrec.llm.soft_prompt import CONFIG_NAME

    run_dir = Path(run_dir)
    sources: list[tuple[Path, tuple[str, ...]]] = [(run_dir / "results" / "DELRec.json", ())]
    if adapter_dir(run_dir).is_dir():  # a soft prompt's λ was chosen without this adapter: not a fallback
        sources.append((run_dir / "finetune" / "history.json", ("best",)))
    else:
        sources.append((soft_prompt_dir(run_dir) / CONFIG_NAME, ("valid",)))
    for path, keys in sources:
        if not path.is_file():
            continue
        entry: Any = read_json(path)
        for k in keys:
            entry = entry.get(k) if isinstance(entry, dict) else None
        value = entry.get("prior_weight") if isinstance(entry, dict) else None
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("delrec", "torch", "transformers", "peft", "accelerate", "numpy", "pandas", "pyarrow"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


# --- the run folder as delrec's own: what it may write into and what --fresh may delete ------------------------------
# Top-level entries delrec writes in a run folder (docs/run-folder.md); nothing else is ever deleted.
RUN_ENTRIES = frozenset({"config.yaml", "manifest.json", "data", "split.json", "candidates", "teachers", "distill",
                         "finetune", "predictions", "results", "metrics.json", "report.md", "metrics.png",
                         "curves.png", "tensorboard"})


def _own_entry(name: str) -> bool:
    """A layout entry, or a leftover of delrec.io's atomic writes (``.config.yaml.x1y2.tmp``, ``.data.old``)."""
    if name in RUN_ENTRIES:
        return True
    return name.startswith(".") and name.endswith((".tmp", ".old")) and any(
        name.startswith(f".{e}.") for e in RUN_ENTRIES)


def is_run_folder(path: str | Path) -> bool:
    """True when ``path`` holds the manifest.json delrec writes first into every run folder it makes."""
    try:
        manifest = read_json(Path(path) / "manifest.json")
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and isinstance(manifest.get("stages"), dict)


def _entries(path: Path) -> list[Path]:
    try:
        return sorted(path.iterdir())
    except OSError as e:
        raise ConfigError(f"cannot list the folder ({e.strerror})", file=path, field="--out") from None


def check_out_dir(path: Path) -> None:
    """Refuse to write a run into anything but a new folder, an empty one, or a delrec run folder: a user's
    config.yaml or data next to it must never be overwritten."""
    if path.exists() and not path.is_dir():
        raise ConfigError("is a file, not a run folder; choose another --out", file=path, field="--out")
    if path.is_dir() and _entries(path) and not is_run_folder(path):
        raise ConfigError("is not empty and not a delrec run folder (no valid manifest.json); delrec writes only "
                          "into a new or empty folder or a run folder it made; choose another --out",
                          file=path, field="--out")


def clear_run_entries(path: Path) -> None:
    """Delete what delrec wrote in ``path`` (the RUN_ENTRIES), never following a symbolic link out of it."""
    import shutil

    for entry in _entries(path):
        if not _own_entry(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def remove_run_folder(path: Path, protect: list[Path]) -> None:
    """``--fresh``: delete ``path`` only if delrec made it and it holds nothing else; never a folder that is, or
    contains, the working directory, the home folder or one of ``protect`` (the config file, the data)."""
    if path.is_symlink():
        raise ConfigError("is a symbolic link; --fresh deletes only a real run folder", file=path, field="--fresh")
    if not path.exists():
        return
    if not path.is_dir():
        raise ConfigError("is a file, not a run folder; --fresh deletes only run folders", file=path, field="--fresh")
    real = path.resolve()
    named = [(Path.cwd(), "the working directory"), (Path.home(), "your home folder")]
    for p, what in [*named, *((p, str(p)) for p in protect)]:
        p = p.expanduser().resolve()
        if real == p or real in p.parents:
            raise ConfigError(f"--fresh would delete {what}; choose another --out", file=path, field="--fresh")
    if not is_run_folder(path):
        raise ConfigError("not a delrec run folder (no valid manifest.json); --fresh deletes only folders delrec "
                          "made", file=path, field="--fresh")
    foreign = [e.name for e in _entries(path) if not _own_entry(e.name)]
    if foreign:
        shown = ", ".join(foreign[:5]) + (", …" if len(foreign) > 5 else "")
        raise ConfigError(f"holds files delrec did not write ({shown}); move them or choose another --out",
                          file=path, field="--fresh")
    clear_run_entries(path)
    path.rmdir()


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = read_json(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"unreadable run manifest ({type(e).__name__}); delete the run folder by hand or choose "
                          "another --out", file=path) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("stages"), dict):
        raise ConfigError("not a delrec run manifest (no 'stages' mapping)", file=path)
    return manifest


class Run:
    """A run folder: resolved config, manifest, and lazily loaded artifacts of each stage."""

    def __init__(self, run_dir: str | Path, cfg: RunConfig | None = None, log: Callable[[str], None] = print) -> None:
        self.dir = Path(run_dir)
        self.say = log
        cfg_file = self.dir / "config.yaml"
        if cfg is not None:  # writing a run: only into a new or empty folder or a delrec run folder
            check_out_dir(self.dir)
        if cfg is None:
            if not cfg_file.is_file():
                raise ConfigError("not a run folder (no config.yaml)", file=self.dir)
            cfg = load_config(cfg_file)
        elif cfg_file.is_file():
            saved = load_config(cfg_file)
            if to_dict(saved) != to_dict(cfg):
                changed = _first_difference(to_dict(saved), to_dict(cfg))
                raise ConfigError(f"{self.dir} holds a run with a different configuration ({changed}); "
                                  "choose another --out or pass --fresh", field=changed)
        self.cfg = cfg
        self.dir.mkdir(parents=True, exist_ok=True)
        manifest_file = self.dir / "manifest.json"
        self.manifest: dict[str, Any] = _read_manifest(manifest_file) if manifest_file.is_file() else {"stages": {}}
        self.manifest["packages"] = package_versions()
        if not manifest_file.is_file():  # first, so the folder is known as delrec's before any other file lands
            write_json(manifest_file, self.manifest)
        write_text(cfg_file, yaml.safe_dump(to_dict(cfg), sort_keys=False))
        self._dataset: SeqDataset | None = None
        self._split: Split | None = None

    # --- bookkeeping ---------------------------------------------------------------------------------------------
    def done(self, stage: str) -> bool:
        return bool(self.manifest["stages"].get(stage, {}).get("done"))

    def mark(self, stage: str, **info: Any) -> None:
        self.manifest["stages"][stage] = {"done": True, **info}
        write_json(self.dir / "manifest.json", self.manifest)

    # --- data ----------------------------------------------------------------------------------------------------
    @property
    def dataset(self) -> SeqDataset:
        if self._dataset is None:
            if (self.dir / "data" / "dataset.json").is_file():
                self._dataset = SeqDataset.load(self.dir / "data")
            else:
                self._dataset = self.prepare_data()
        return self._dataset

    def prepare_data(self) -> SeqDataset:
        t0 = time.perf_counter()
        ds = prepare_dataset(self.cfg.data)
        ds.save(self.dir / "data")
        self.say(f"data: {ds.name} from {ds.source}: {ds.stats()}")
        self.manifest.update(data_source=ds.source, data_fingerprint=ds.fingerprint(), data_stats=ds.stats())
        self.mark("data", seconds=round(time.perf_counter() - t0, 2))
        return ds

    @property
    def split(self) -> Split:
        if self._split is None:
            path = self.dir / "split.json"
            if path.is_file():
                self._split = Split.from_dict(read_json(path), self.dataset)
            else:
                s = self.cfg.split
                self._split = make_split(self.dataset, s.kind, s.seed, s.ratios)
                write_json(path, self._split.to_dict())
        return self._split

    def candidates(self, part: Literal["valid", "test"]) -> CandidateSet:
        """The frozen candidate file of ``part``; drawn once (seeded) and then always read back."""
        path = self.dir / "candidates" / f"{part}.parquet"
        if path.is_file():
            cands = CandidateSet.load(path, seed=self.cfg.candidates.seed)
        else:
            c = self.cfg.candidates
            examples = self.split.examples(part)
            cap = c.max_test if part == "test" else c.max_valid
            if cap is not None and len(examples) > cap:
                keep = np.sort(np.random.default_rng(c.seed + 1).choice(len(examples), cap, replace=False))
                examples = [examples[i] for i in keep]
            seed = c.seed if part == "test" else c.seed + 7
            cands = draw_candidates(examples, self.dataset, c.size, seed)
            cands.save(path)
        self.manifest.setdefault("candidates", {})[part] = {"hash": cands.hash(), "n": len(cands),
                                                          "size": cands.size}
        write_json(self.dir / "manifest.json", self.manifest)
        return cands

    def histories(self, part: Literal["valid", "test"], cands: CandidateSet) -> list[np.ndarray]:
        from delrec.evaluate import histories_for

        return histories_for(cands, self.split.examples(part))


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
    return prefix or "config"


# --- stages ----------------------------------------------------------------------------------------------------------
def _save_result(run: Run, name: str, result: Any, **extra: Any) -> dict[str, Any]:
    """Write RUN/results/<name>.json (metrics, per-example ranks, timings) and RUN/predictions/<name>.parquet."""
    from delrec.evaluate import save_predictions

    test = run.candidates("test")
    save_predictions(run.dir / "predictions" / f"{name}.parquet", result, run.dataset, test)
    row = {**result.to_dict(), "infer_s": round(result.seconds, 2), **extra}
    write_json(run.dir / "results" / f"{name}.json", row)
    return row


def teacher_stage(run: Run, name: str) -> dict[str, Any]:
    """Train (or resume) one teacher, then score the frozen test candidates and full-rank the test targets."""
    from delrec.evaluate import evaluate_scores
    from delrec.teachers import SeqRecommender, full_ranks, score_candidates, train_teacher

    if name not in MODELS:
        raise ConfigError(f"unknown teacher {name!r}; choose from {', '.join(MODELS)}", field="teacher.model")
    out = run.dir / "teachers" / name
    key = f"teacher:{name}"
    if run.done(key) and (run.dir / "results" / f"{name}.json").is_file():
        return read_json(run.dir / "results" / f"{name}.json")
    if (out / "history.json").is_file() and run.done(key + ":trained"):
        model = SeqRecommender.from_pretrained(out / "model", device=run.cfg.teachers.config(name).device
                                               .replace("auto", "cpu"))
    else:
        model = train_teacher(run.split, run.cfg.teachers.config(name), out)
        run.mark(key + ":trained")
    history = read_json(out / "history.json")
    epochs = history.get("epochs", [])
    train_s = float(sum(e.get("train_seconds", e.get("seconds", 0.0)) for e in epochs))
    test = run.candidates("test")
    t0 = time.perf_counter()
    scores = score_candidates(model, run.histories("test", test), test.items)
    result = evaluate_scores(scores, test, seconds=time.perf_counter() - t0)
    ranks = full_ranks(model, run.split.examples("test"))
    full = {"HR@10": float((ranks <= 10).mean()),
            "NDCG@10": float(np.where(ranks <= 10, 1 / np.log2(ranks + 1.0), 0).mean())}
    row = _save_result(run, name, result, train_s=round(train_s, 2), epochs=len(epochs),
                       best_epoch=history.get("best_epoch"), full_ranking=full)
    run.say(f"teacher {name}: HR@1 {row['metrics']['HR@1']['value']:.4f}  NDCG@5 "
            f"{row['metrics']['NDCG@5']['value']:.4f}  full NDCG@10 {full['NDCG@10']:.4f}  ({train_s:.0f}s)")
    run.mark(key, train_s=round(train_s, 2))
    return row


def popularity_stage(run: Run) -> dict[str, Any]:
    """Rank the frozen test candidates by training-interaction count (the baseline beside every model)."""
    from delrec.evaluate import evaluate_scores, popularity_scores

    path = run.dir / "results" / "popularity.json"
    if run.done("popularity") and path.is_file():
        return read_json(path)
    test = run.candidates("test")
    t0 = time.perf_counter()
    scores = popularity_scores(run.split.train_sequences, test.items, run.dataset.n_items)
    row = _save_result(run, "popularity", evaluate_scores(scores, test, seconds=time.perf_counter() - t0),
                       train_s=0.0)
    run.mark("popularity")
    return row


def _trained_teacher(run: Run, name: str, device: Any = "cpu") -> Any:
    """The run folder's trained teacher ``name`` (`SeqRecommender`); a clear error if it is not trained yet."""
    from delrec.teachers import SeqRecommender

    model_dir = run.dir / "teachers" / name / "model"
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"teacher {name!r} is not trained in {run.dir}; run `delrec teacher train` first",
                          field="teacher.model")
    return SeqRecommender.from_pretrained(model_dir, device=device)


def _distill_teacher(run: Run) -> Any:
    """The trained teacher that stages 1–2 distil (``teachers.distill_from``), on its configured device."""
    from delrec.teachers.base import resolve_device

    name = run.cfg.teachers.distill_from
    return _trained_teacher(run, name, device=resolve_device(run.cfg.teachers.config(name).device))


def export_teacher_topk(run: Run, name: str, k: int | None = None, part: str = "train",
                        dest: Path | None = None, rollout: bool = False) -> Path:
    """The teacher's top-k for each prefix of ``part`` (train: each full training sequence), rows aligned; with
    ``rollout`` its greedy k-step continuation instead (`predict_rollout`, stage 1's packed RPS)."""
    from delrec.teachers import export_topk, predict_rollout, predict_topk

    k = k or run.cfg.teachers.top_k
    model = _trained_teacher(run, name)
    if part == "train":
        users, histories = run.split.train_users, run.split.train_sequences
    elif part in ("valid", "test"):
        examples = run.split.examples(part)  # type: ignore[arg-type]
        users, histories = np.array([e.user for e in examples]), [e.history for e in examples]
    else:
        raise ConfigError(f"must be train, valid or test, got {part!r}", field="--part")
    if rollout:
        topk = predict_rollout(model, histories, steps=k)
        return export_topk(dest or run.dir / "teachers" / name / f"rollout{k}_{part}.parquet", run.dataset, users,
                           topk)
    topk = predict_topk(model, histories, k=k, exclude_history=True)
    return export_topk(dest or run.dir / "teachers" / name / f"topk_{part}.parquet", run.dataset, users, topk)


def _load_topk(path: Path) -> np.ndarray:
    import pandas as pd

    df = pd.read_parquet(path)
    col = "items" if "items" in df.columns else "topk"
    return np.stack([np.asarray(v, dtype=np.int64) for v in df[col]])


def _backbone(run: Run):  # type: ignore[no-untyped-def]
    from delrec.llm.backbone import Backbone

    return Backbone.load(run.cfg.backbone)


def distill_stage(run: Run, backbone: Any, log: Callable[..., None] | None = None) -> Any:
    """Stage 1: distil the chosen teacher's pattern into the soft prompt (None when the soft prompt is disabled)."""
    from delrec.distill import distill
    from delrec.llm.soft_prompt import SoftPrompt

    cfg = run.cfg
    if cfg.soft_prompt.num_tokens == 0:
        run.mark("distill", skipped="soft prompt disabled (soft_prompt.num_tokens = 0)")
        return None
    out = run.dir / "distill"
    if run.done("distill") and soft_prompt_dir(run.dir).is_dir():
        return SoftPrompt.from_pretrained(soft_prompt_dir(run.dir), device=backbone.device)
    teacher = cfg.teachers.distill_from
    topk, model = None, None
    rps = "rps" in cfg.distill.tasks  # TA alone reads no teacher output: nothing is exported for it
    if rps and cfg.distill.rps_form == "ranking":  # the teacher scores each example's candidates
        model = _distill_teacher(run)
    elif rps and cfg.distill.rps_form == "sequence":  # packed RPS: the teacher's greedy roll-out, not its top-k
        k = cfg.distill.teacher_k
        topk_file = run.dir / "teachers" / teacher / f"rollout{k}_train.parquet"
        if not topk_file.is_file():
            export_teacher_topk(run, teacher, k=k, part="train", rollout=True)
        topk = _load_topk(topk_file)
    elif rps:
        topk_file = run.dir / "teachers" / teacher / "topk_train.parquet"
        if not topk_file.is_file():
            export_teacher_topk(run, teacher, part="train")
        topk = _load_topk(topk_file)
    t0 = time.perf_counter()
    soft = distill(backbone, run.dataset, run.split, topk, TEACHER_NAMES[teacher], cfg.distill,
                   out, valid_candidates=run.candidates("valid"), soft_prompt_cfg=cfg.soft_prompt, log=log,
                   scoring=cfg.scoring, teacher=model)
    run.mark("distill", seconds=round(time.perf_counter() - t0, 1))
    return soft


def finetune_stage(run: Run, backbone: Any, soft_prompt: Any, log: Callable[..., None] | None = None) -> Any:
    """Stage 2: AdaLoRA on the backbone with the distilled soft prompt frozen (skipped when adapter = none)."""
    from delrec.finetune import finetune, load_adapter

    out = run.dir / "finetune"
    if run.cfg.finetune.adapter == "none":
        run.mark("finetune", skipped="finetune.adapter = none")
        return backbone
    if run.done("finetune") and adapter_dir(run.dir).is_dir():
        return load_adapter(backbone, adapter_dir(run.dir))
    t0 = time.perf_counter()
    teacher = None
    if run.cfg.finetune.needs_teacher:  # the teacher's distribution is part of stage 2's loss
        teacher = _distill_teacher(run)
    backbone = finetune(backbone, run.dataset, run.split, soft_prompt, TEACHER_NAMES[run.cfg.teachers.distill_from],
                        run.cfg.finetune, out, valid_candidates=run.candidates("valid"), log=log,
                        scoring=run.cfg.scoring, teacher=teacher)
    run.mark("finetune", seconds=round(time.perf_counter() - t0, 1))
    return backbone


def evaluate_stage(run: Run, backbone: Any, soft_prompt: Any) -> dict[str, Any]:
    """Rank the frozen test candidates with the LLM (backbone + soft prompt + adapter)."""
    from delrec.evaluate import evaluate_llm

    if run.done("evaluate") and (run.dir / "results" / "DELRec.json").is_file():
        return read_json(run.dir / "results" / "DELRec.json")
    test = run.candidates("test")
    cfg = run.cfg
    domain, teacher = cfg.data.domain or run.dataset.domain, TEACHER_NAMES[cfg.teachers.distill_from]
    scoring, extra = cfg.scoring, {}
    if scoring.prior_weight == "auto":
        scoring = dataclasses.replace(scoring, prior_weight=_resolve_prior_weight(run, backbone, soft_prompt))
        extra["prior_weight"] = scoring.prior_weight
    result = evaluate_llm(backbone, soft_prompt, run.dataset, test, domain, teacher, cfg.finetune.history_len,
                          cfg.evaluate.batch_size, run.histories("test", test), scoring=scoring)
    stages = run.manifest["stages"]
    train_s = sum(float(stages.get(s, {}).get("seconds", 0.0)) for s in ("distill", "finetune"))
    row = _save_result(run, "DELRec", result, train_s=round(train_s, 1), **extra)
    run.mark("evaluate", seconds=round(result.seconds, 1), **extra)
    run.say(f"DELRec: HR@1 {row['metrics']['HR@1']['value']:.4f}  HR@5 {row['metrics']['HR@5']['value']:.4f}  "
            f"NDCG@5 {row['metrics']['NDCG@5']['value']:.4f}  ({result.seconds:.0f}s to score)")
    return row


def _resolve_prior_weight(run: Run, backbone: Any, soft_prompt: Any) -> float:
    """``scoring.prior_weight=auto``: the λ the selected checkpoint was chosen with, or — when no stage chose one
    (both skipped, or trained without validation users) — the best λ on the validation users for this model."""
    lam = chosen_prior_weight(run.dir)
    if lam is not None:
        run.say(f"scoring.prior_weight=auto: {lam:g}, chosen with the selected checkpoint on the validation users")
        return lam
    valid = run.candidates("valid")
    if len(valid) == 0:
        run.say("scoring.prior_weight=auto: no validation users to choose it on; using 0")
        return 0.0
    from delrec.evaluate import validation_metrics

    cfg = run.cfg
    metrics = validation_metrics(cfg.scoring.scorer(backbone, soft_prompt), run.dataset, valid,
                                 run.histories("valid", valid), cfg.data.domain or run.dataset.domain,
                                 TEACHER_NAMES[cfg.teachers.distill_from], cfg.finetune.history_len,
                                 cfg.evaluate.batch_size, scoring=cfg.scoring, metric=cfg.finetune.select_metric,
                                 soft_prompt=soft_prompt is not None)
    lam = float(metrics["prior_weight"])
    run.say(f"scoring.prior_weight=auto: {lam:g}, chosen on {len(valid)} validation users "
            f"({cfg.finetune.select_metric} by λ: {metrics['by_prior']})")
    return lam


def _curve(path: Path, key: str = "loss") -> list[tuple[int, float]]:
    """(step, value) points from a stage's history.json, whatever list it keeps them in."""
    if not path.is_file():
        return []
    hist = read_json(path)
    rows = hist if isinstance(hist, list) else next(
        (hist[k] for k in ("epochs", "steps", "train", "history") if isinstance(hist.get(k), list)), [])
    pts = []
    for i, r in enumerate(rows, start=1):
        if isinstance(r, dict) and isinstance(r.get(key), int | float):
            pts.append((int(r.get("step", r.get("epoch", i))), float(r[key])))
    return pts


def report_stage(run: Run) -> dict[str, Any]:
    """metrics.json + report.md + PNG plots from every result in RUN/results (same test candidates)."""
    from delrec.report import curves_plot, metrics_plot, write_report

    test = run.candidates("test")
    rows: dict[str, dict[str, Any]] = {}
    for name in ["popularity", *run.cfg.teachers.models, "DELRec"]:
        path = run.dir / "results" / f"{name}.json"
        if path.is_file():
            row = read_json(path)
            if row["candidate_hash"] != test.hash():
                raise ConfigError(f"{path} was computed on other candidates ({row['candidate_hash']})",
                                  file=path, field="candidate_hash")
            rows[TEACHER_NAMES.get(name, name)] = row
    images = []
    if rows:
        metrics_plot(rows, run.dir / "metrics.png")
        images.append("metrics.png")
    curves = {TEACHER_NAMES[m]: _curve(run.dir / "teachers" / m / "history.json") for m in run.cfg.teachers.models}
    curves["stage 1 (distill)"] = _curve(run.dir / "distill" / "history.json")
    curves["stage 2 (AdaLoRA)"] = _curve(run.dir / "finetune" / "history.json")
    if any(curves.values()):
        curves_plot(curves, run.dir / "curves.png")
        images.append("curves.png")
    ds = run.dataset
    info = {"dataset": ds.name, "source": ds.source, "split": run.split.kind, "n_test": len(test),
            "fingerprint": ds.fingerprint(), "candidates_hash": test.hash(), "candidate_size": test.size,
            "backbone": run.cfg.backbone.name_or_path, "profile": run.cfg.profile, "device": run.cfg.device,
            "notes": run.manifest.get("notes", [])}
    from delrec.evaluate import chance_metrics

    info["chance"] = chance_metrics(test.size)
    write_report(run.dir, info, rows, images)
    metrics = {"run": str(run.dir), **{k: v for k, v in info.items() if k != "notes"},
               "models": {name: {"metrics": r["metrics"], "train_s": r.get("train_s"), "infer_s": r.get("infer_s"),
                                 "full_ranking": r.get("full_ranking"),
                                 **({"prior_weight": r["prior_weight"]} if "prior_weight" in r else {})}
                          for name, r in rows.items()},
               "stages": run.manifest["stages"]}
    write_json(run.dir / "metrics.json", metrics)
    run.mark("report")
    return metrics


def reuse_stages(run: Run, base_dir: str | Path) -> list[str]:
    """Copy into a fresh ``run`` the stages of the finished run ``base_dir`` whose settings are identical — data, split
    and frozen candidates; then each teacher; then stage 1 — so ablations don't retrain what they share.

    Returns the reused stage names. A stage is reused only when every setting it depends on matches, so results stay
    those of an uninterrupted run with this config; the candidate hashes are checked after the copy.
    """
    import shutil

    base = Run(base_dir, log=run.say)
    if any(run.manifest["stages"].values()):
        raise ConfigError(f"{run.dir} already holds stages; reuse only fills a fresh run folder", field="--reuse")
    a, b = to_dict(base.cfg), to_dict(run.cfg)
    same = lambda *keys: all(_get(a, k) == _get(b, k) for k in keys)  # noqa: E731
    data_keys = ("data", "split", "candidates")
    if not (base.done("data") and same(*data_keys)):
        return []

    def copy(rel: str) -> None:
        src, dst = base.dir / rel, run.dir / rel
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        elif src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)

    for rel in ("data", "split.json", "candidates"):
        copy(rel)
    for key in ("data_source", "data_fingerprint", "data_stats", "candidates"):
        if key in base.manifest:
            run.manifest[key] = base.manifest[key]
    reused = ["data"]
    def facts(key: str) -> dict[str, Any]:  # a stage's recorded facts, less its own bookkeeping (base may be reused)
        return {k: v for k, v in base.manifest["stages"][key].items() if k not in ("done", "reused")}

    run.mark("data", **facts("data"), reused=str(base.dir))
    for name in MODELS:
        key = f"teacher:{name}"
        if base.done(key) and same(*data_keys, f"teachers.{name}", "teachers.top_k"):
            for rel in (f"teachers/{name}", f"results/{name}.json", f"predictions/{name}.parquet"):
                copy(rel)
            run.mark(key + ":trained")
            run.mark(key, **facts(key), reused=str(base.dir))
            reused.append(key)
    teacher = run.cfg.teachers.distill_from
    if (base.done("distill") and f"teacher:{teacher}" in reused
            and same("teachers.distill_from", "backbone", "soft_prompt", "scoring", "distill")):
        copy("distill")
        run.mark("distill", **facts("distill"), reused=str(base.dir))
        reused.append("distill")
    run._dataset = run._split = None
    for part in ("valid", "test"):
        if run.candidates(part).hash() != base.candidates(part).hash():  # type: ignore[arg-type]
            raise ConfigError(f"copied {part} candidates differ from {base.dir}'s", field="--reuse")
    return reused


def _get(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None  # type: ignore[assignment]
    return d


def deterministic_kernels() -> None:
    """Bit-identical reruns of one config. Without this, two runs on one CPU host differed from stage 1's second update
    on (6th significant digit: a kernel of the first update without a fixed reduction order), and stage 2 grew that
    into a different choice of λ (2026-12-07: nineteen first-command runs, two outcomes). ``warn_only``: an op
    without a deterministic kernel warns rather than failing a run. Process-wide, like any torch setting of its kind."""
    import os

    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for deterministic matmuls
    torch.use_deterministic_algorithms(True, warn_only=True)


def run_pipeline(run: Run, until: str | None = None) -> str:
    """All stages in order, each skipped when already done; returns a one-paragraph summary."""
    if until is not None and until not in STAGES:
        raise ConfigError(f"unknown stage {until!r}; choose from {', '.join(STAGES)}", field="--until")
    deterministic_kernels()
    t0 = time.perf_counter()
    cfg = run.cfg
    run.dataset  # noqa: B018  (prepares data on first use)
    run.candidates("valid")
    run.candidates("test")
    if until == "data":
        return f"{run.dir}: data prepared"
    teachers = list(dict.fromkeys([*cfg.teachers.models, cfg.teachers.distill_from]))
    popularity_stage(run)
    for name in teachers:
        teacher_stage(run, name)
    if until == "teachers":
        report_stage(run)
        return f"{run.dir}: teachers trained; LLM stages not run (--until teachers)"
    logger = _logger(run)
    backbone = _backbone(run)
    soft = distill_stage(run, backbone, log=logger)
    if until == "distill":
        return f"{run.dir}: stage 1 done"
    backbone = finetune_stage(run, backbone, soft, log=logger)
    if until == "finetune":
        return f"{run.dir}: stage 2 done"
    evaluate_stage(run, backbone, soft)
    metrics = report_stage(run)
    run.manifest["total_seconds_last_invocation"] = round(time.perf_counter() - t0, 1)
    write_json(run.dir / "manifest.json", run.manifest)
    lines = [f"{name:8s} HR@1 {m['metrics']['HR@1']['value']:.4f}  HR@5 {m['metrics']['HR@5']['value']:.4f}  "
             f"NDCG@5 {m['metrics']['NDCG@5']['value']:.4f}" for name, m in metrics["models"].items()]
    ch = metrics["chance"]
    lines.append(f"{'chance':8s} HR@1 {ch['HR@1']:.4f}  HR@5 {ch['HR@5']:.4f}  NDCG@5 {ch['NDCG@5']:.4f}")
    return "\n".join([*lines, f"report: {run.dir / 'report.md'}"])


def _logger(run: Run) -> Callable[..., None] | None:
    """A TensorBoard scalar writer when ``log: tensorboard`` (losses, task weights, validation metrics)."""
    if run.cfg.log != "tensorboard":
        return None
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run.dir / "tensorboard"))

    def log(entry: dict[str, Any] | str, value: float | None = None, step: int | None = None) -> None:
        if isinstance(entry, str):  # (tag, value, step) form
            writer.add_scalar(entry, float(value or 0.0), step or 0)
        else:
            s = int(entry.get("step", 0))
            for k, v in entry.items():
                if isinstance(v, int | float) and k != "step":
                    writer.add_scalar(k, float(v), s)
                elif isinstance(v, dict):
                    for k2, v2 in v.items():
                        if isinstance(v2, int | float):
                            writer.add_scalar(f"{k}/{k2}", float(v2), s)
        writer.flush()

    return log


def collect_results(paths: list[Path]) -> Any:
    """Every result in the given run folders (or result JSON files), compared on one candidate file."""
    from delrec.evaluate import EvalResult, compare

    results: dict[str, EvalResult] = {}
    for p in paths:
        files = sorted((p / "results").glob("*.json")) if p.is_dir() else [p]
        if not files:
            raise ConfigError("no results found (run `delrec run` or `delrec teacher train` first)", file=p)
        for f in files:
            try:
                d = read_json(f)
                res = EvalResult.from_dict(d)
            except (ValueError, KeyError) as e:
                raise ConfigError(f"not a delrec result file ({e})", file=f) from None
            label = f.stem if len(paths) == 1 else f"{p.name}/{f.stem}"
            results[label] = res
    return compare(results)
