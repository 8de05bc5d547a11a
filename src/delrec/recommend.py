"""Recommend and explain with a trained run folder: ``DELRec.from_pretrained(RUN).recommend(history, k)``.

The LLM ranks a candidate set by scoring each candidate title after the stage-2 (LSR) prompt — the same prompt and
scorer the evaluation uses. Candidates are either given, drawn the standard way (20 items uniformly from outside the
history, seeded), or all items, ranked in chunks of ``chunk_size`` candidates per prompt (scores of different chunks
come from different prompts, so an all-items ranking is an approximation the model was never trained on exactly).

``explain`` is leave-one-out: for the top recommendation, how much its score drops when each history item is removed
from the prompt (same candidates, same order), next to the distilled teacher's own top-k.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from delrec.data import SeqDataset
from delrec.errors import ConfigError, DelrecError

DEFAULT_CANDIDATES = 20  # the paper's candidate-set size (target + 19 negatives at evaluation)


@dataclass(frozen=True)
class Recommendation:
    item: int  # item index in the run's dataset (1..n_items)
    title: str
    score: float  # the LLM's title log-likelihood (per-token mean or sum: scoring.reduce); higher = better


@dataclass(frozen=True)
class Influence:
    item: int
    title: str
    position: int  # 0-based position in the prompt's history, oldest first
    influence: float  # score(top | history) − score(top | history without this item); > 0: it supported the top


@dataclass(frozen=True)
class TeacherPick:
    item: int
    title: str
    rank: int  # 1-based rank in the teacher's full-catalogue top-k
    in_candidates: bool  # whether the LLM saw this item among its candidates


@dataclass
class Explanation:
    history: list[int]  # the history as it went into the prompt (after truncation)
    candidates: list[int]  # the candidate set the LLM ranked, in prompt order
    recommendations: list[Recommendation]  # the LLM's top-k on `candidates`
    influences: list[Influence]  # for recommendations[0], most supporting first
    teacher: str | None  # the distilled teacher's name (None if the run folder has no teacher)
    teacher_topk: list[TeacherPick] = field(default_factory=list)

    @property
    def top(self) -> Recommendation:
        return self.recommendations[0]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RunSettings:
    """What `DELRec` needs from a run folder's config.yaml (missing keys fall back to these defaults)."""

    backbone: dict[str, Any]  # BackboneConfig fields (name_or_path, kind, dtype, device)
    domain: str | None = None  # prompt wording; None: the dataset's own domain
    teacher: str = "sasrec"  # the distilled teacher: folder teachers/<teacher>/model
    teacher_name: str = "SASRec"  # how the prompt names it
    history_len: int | None = 20  # most recent history items put in the prompt (None: all)
    candidates: int = DEFAULT_CANDIDATES  # size of a drawn candidate set
    scoring: dict[str, Any] = field(default_factory=dict)  # ScoringConfig fields (how titles are shown and scored)


def read_run_config(run_dir: str | Path) -> RunSettings:
    """Read the few settings recommendation needs from ``RUN/config.yaml`` (the one place that knows its layout).

    Mirrors what the pipeline's evaluation uses: ``finetune.history_len`` (the stage-2 prompt's history), the teacher
    ``teachers.distill_from`` named as in `pipeline.TEACHER_NAMES`, ``scoring``.
    """
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError("not a run folder (no config.yaml)", file=path)
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML: {e}", file=path) from None
    if not isinstance(cfg, dict):
        raise ConfigError("config.yaml must be a mapping of sections", file=path)

    def section(name: str) -> dict[str, Any]:
        value = cfg.get(name) or {}
        if not isinstance(value, dict):
            raise ConfigError("expected a mapping", file=path, field=name)
        return value

    backbone = section("backbone")
    if not backbone.get("name_or_path"):
        raise ConfigError("the run's backbone is not named", file=path, field="backbone.name_or_path")
    data, teachers = section("data"), section("teachers")
    teacher = str(teachers.get("distill_from") or "sasrec")
    history_len = next((s["history_len"] for s in (section("finetune"), section("distill")) if "history_len" in s),
                       20)
    return RunSettings(
        backbone=backbone,
        domain=data.get("domain") or None,
        teacher=teacher,
        teacher_name=_teacher_names().get(teacher.lower(), teacher),
        history_len=None if history_len is None else int(history_len),
        candidates=int(section("candidates").get("size") or DEFAULT_CANDIDATES),
        # Runs written before the `scoring` section existed showed and scored whole titles with an EOS; before
        # `scoring.reduce`, the mean-or-sum choice was `evaluate.length_norm`.
        scoring={"reduce": "mean" if section("evaluate").get("length_norm", True) else "sum",
                 **(section("scoring") or {"year": "keep", "eos": "always"})},
    )


def _scoring(settings: RunSettings) -> Any:
    from delrec.llm.prompts import ScoringConfig

    known = {f.name for f in dataclasses.fields(ScoringConfig)}
    return ScoringConfig(**{k: v for k, v in settings.scoring.items() if k in known}).validate()


def _teacher_names() -> dict[str, str]:
    try:
        from delrec.pipeline import TEACHER_NAMES

        return dict(TEACHER_NAMES)
    except ImportError:  # keep recommendation usable if the pipeline module moves
        return {"sasrec": "SASRec", "gru4rec": "GRU4Rec", "caser": "Caser"}


class DELRec:
    """A trained DELRec model: backbone + distilled soft prompt + AdaLoRA adapter, over the run's item catalogue."""

    def __init__(self, dataset: SeqDataset, scorer: Any, settings: RunSettings, *, teacher: Any = None,
                 run_dir: Path | None = None, has_soft_prompt: bool = False, has_adapter: bool = False,
                 backbone_name: str = "") -> None:
        self.dataset = dataset
        self.scorer = scorer  # delrec.llm.scoring.TitleScorer
        self._prior_cache: dict[tuple[str, str], float] = {}  # each title's prior: the model is frozen here
        self.settings = settings
        self.teacher = teacher  # delrec.teachers.SeqRecommender or None
        self.run_dir = run_dir
        self.has_soft_prompt = has_soft_prompt
        self.has_adapter = has_adapter
        self.backbone_name = backbone_name
        self.domain = settings.domain or dataset.domain
        self._title_index = dataset.title_to_item()
        self._norm_titles: dict[str, list[int]] = {}
        for i, t in enumerate(dataset.titles[1:], start=1):
            self._norm_titles.setdefault(_norm(t), []).append(i)

    # --- loading -----------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, run_dir: str | Path, device: str | None = None) -> DELRec:
        """Load a run folder: dataset, backbone, soft prompt and adapter (if trained), the distilled teacher.

        CLI (``delrec recommend RUN``, ``delrec serve RUN``): ``--device`` (auto | cpu | cuda | cuda:N; default: the
        run's config). The teacher always runs on CPU (it is small); a missing soft prompt, adapter or teacher is
        simply not used (e.g. a run stopped after stage 1).
        """
        from delrec.llm.backbone import Backbone, BackboneConfig
        from delrec.pipeline import adapter_dir, chosen_prior_weight, soft_prompt_dir

        run_dir = Path(run_dir)
        settings = read_run_config(run_dir)
        if settings.scoring.get("prior_weight") == "auto":  # score as the run's evaluation did
            lam = chosen_prior_weight(run_dir)
            if lam is None:
                raise ConfigError("scoring.prior_weight is auto but no stage of this run has chosen it yet; finish "
                                  "the run (`delrec run`)", file=run_dir / "config.yaml", field="scoring.prior_weight")
            settings = dataclasses.replace(settings, scoring={**settings.scoring, "prior_weight": lam})
        dataset = SeqDataset.load(run_dir / "data")
        known = {f.name for f in dataclasses.fields(BackboneConfig)}
        bcfg = BackboneConfig(**{k: v for k, v in settings.backbone.items() if k in known})
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device is not None:
            bcfg = dataclasses.replace(bcfg, device=device)
        backbone = Backbone.load(bcfg)

        soft_prompt = None
        sp_dir = soft_prompt_dir(run_dir)
        if sp_dir.is_dir():
            from delrec.llm.soft_prompt import SoftPrompt

            soft_prompt = SoftPrompt.from_pretrained(sp_dir, device=bcfg.device)
        if adapter_dir(run_dir).is_dir():
            from delrec.finetune import load_adapter

            backbone = load_adapter(backbone, adapter_dir(run_dir))
        _eval(getattr(backbone, "model", None))

        teacher = None
        teacher_dir = _teacher_dir(run_dir, settings.teacher)
        if teacher_dir is not None:
            from delrec.teachers import SeqRecommender

            teacher = SeqRecommender.from_pretrained(teacher_dir, device="cpu")  # small: CPU is fast enough
        scoring = _scoring(settings)
        scorer = scoring.scorer(backbone, soft_prompt)
        return cls(dataset, scorer, settings, teacher=teacher, run_dir=run_dir,
                   has_soft_prompt=soft_prompt is not None, has_adapter=adapter_dir(run_dir).is_dir(),
                   backbone_name=str(bcfg.name_or_path))

    # --- resolving user input ------------------------------------------------------------------------------------
    def resolve(self, ref: str | int, *, what: str = "history") -> int:
        """An item index (int, 1..n_items) or a title (exact, then case-insensitive, then fuzzy) → item index."""
        if isinstance(ref, bool) or not isinstance(ref, int | np.integer | str):
            raise DelrecError(f"expected an item title or index, got {ref!r}", field=what)
        if not isinstance(ref, str):
            if not 1 <= int(ref) <= self.dataset.n_items:
                raise DelrecError(f"item index {int(ref)} is out of range 1..{self.dataset.n_items}", field=what)
            return int(ref)
        if ref in self._title_index:
            return self._title_index[ref]
        key = _norm(ref)
        if not key:
            raise DelrecError("empty title", field=what)
        if key in self._norm_titles:
            return self._norm_titles[key][0]
        # A title without its year ("Toy Story" for "Toy Story (1995)") is the commonest near miss.
        prefix = sorted({t for t in self._norm_titles if t.startswith(key + " (")})
        if len(prefix) == 1:
            return self._norm_titles[prefix[0]][0]
        by_norm = {n: self.dataset.titles[items[0]] for n, items in self._norm_titles.items()}
        if len(prefix) > 1:
            raise DelrecError(f"{ref!r} is ambiguous; it could be: {_listing([by_norm[p] for p in prefix])}",
                              field=what)
        close = difflib.get_close_matches(key, list(self._norm_titles), n=5, cutoff=0.6)
        if not close:
            raise DelrecError(f"no item titled {ref!r} (and no close match) in dataset {self.dataset.name!r}",
                              field=what)
        ratios = [difflib.SequenceMatcher(None, key, c).ratio() for c in close]
        if ratios[0] >= 0.9 and (len(ratios) == 1 or ratios[1] < 0.9):
            return self._norm_titles[close[0]][0]
        raise DelrecError(f"no item titled {ref!r}; did you mean: {_listing([by_norm[c] for c in close])}",
                          field=what)

    def resolve_history(self, history: Sequence[str | int]) -> list[int]:
        if isinstance(history, str | bytes) or not isinstance(history, Sequence) or len(history) == 0:
            raise DelrecError("history must be a non-empty list of item titles or indices", field="history")
        return [self.resolve(h, what=f"history[{i}]") for i, h in enumerate(history)]

    def search(self, query: str, limit: int = 20) -> list[tuple[int, str]]:
        """Titles containing ``query`` (case-insensitive), those starting with it first; for autocomplete."""
        q = _norm(query)
        if not q:
            return []
        starts, contains = [], []
        for i, t in enumerate(self.dataset.titles[1:], start=1):
            n = _norm(t)
            if n.startswith(q):
                starts.append((i, t))
            elif q in n:
                contains.append((i, t))
            if len(starts) >= limit:
                break
        return (starts + contains)[:limit]

    # --- ranking ------------------------------------------------------------------------------------------------
    def draw_candidates(self, history: Sequence[int], n: int | None = None, seed: int = 0) -> list[int]:
        """``n`` items (default: the run's candidate-set size) uniformly from outside the history, shuffled."""
        n = n or self.settings.candidates
        pool = np.setdiff1d(np.arange(1, self.dataset.n_items + 1), np.asarray(history, dtype=np.int64))
        if len(pool) == 0:
            raise DelrecError("the history already holds every item; nothing is left to recommend", field="history")
        rng = np.random.default_rng(seed)
        return [int(i) for i in rng.choice(pool, size=min(n, len(pool)), replace=False)]

    def inputs(self, histories: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]]
               ) -> tuple[list[str], list[list[str]]]:
        """Stage-2 (LSR) prompts and scored candidate titles, from the one renderer the evaluation uses."""
        from delrec.llm.prompts import render_lsr, title_views

        sc = _scoring(self.settings)
        return render_lsr(title_views(self.dataset, sc.year), self.domain,
                          self.settings.teacher_name, histories, candidates, self.settings.history_len,
                          soft_prompt=self.has_soft_prompt, verbalizer=sc.verbalizer)

    def prompt(self, history: Sequence[int], candidates: Sequence[int]) -> str:
        """The stage-2 (LSR) prompt for item indices, exactly as the evaluation builds it."""
        return self.inputs([history], [candidates])[0][0]

    def score(self, histories: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]],
              batch_size: int = 8, progress: bool = False) -> np.ndarray:
        """[B, C] LLM scores (no grad) of each row's candidates after its history's prompt (rows share one C),
        less ``scoring.prior_weight`` × their scores after an empty history, as the evaluation scores them."""
        prompts, titles = self.inputs(histories, candidates)
        self.scorer.batch_size = batch_size  # prompts per forward pass
        scores = np.asarray(self.scorer.rank(prompts, titles, progress=progress), dtype=np.float64)
        weight = _scoring(self.settings).prior_weight
        if weight:
            from delrec.llm.scoring import prior_scores

            empty = self.inputs([[] for _ in histories], candidates)[0]
            scores -= weight * prior_scores(self.scorer, empty, titles, cache=self._prior_cache)
        return scores

    def _truncate(self, history: Sequence[int]) -> list[int]:
        """The most recent ``history_len`` items (all of a shorter history), oldest first."""
        n = self.settings.history_len
        return list(history) if n is None else list(history)[-n:] if n > 0 else []

    def _candidates(self, history: list[int], candidates: Sequence[str | int] | None, all_items: bool, k: int,
                    seed: int) -> list[int]:
        if all_items and candidates is not None:
            raise DelrecError("give either candidates or all_items, not both", field="candidates")
        if all_items:
            rest = [int(i) for i in np.setdiff1d(np.arange(1, self.dataset.n_items + 1), history)]
            if not rest:
                raise DelrecError("the history already holds every item; nothing is left to rank", field="history")
            return rest
        if candidates is None:
            return self.draw_candidates(history, max(self.settings.candidates, k), seed=seed)
        if isinstance(candidates, str | bytes) or len(candidates) == 0:
            raise DelrecError("candidates must be a non-empty list of item titles or indices", field="candidates")
        resolved = [self.resolve(c, what=f"candidates[{i}]") for i, c in enumerate(candidates)]
        return list(dict.fromkeys(resolved))  # drop duplicates, keep the given order

    def recommend(self, history: Sequence[str | int], k: int = 10, candidates: Sequence[str | int] | None = None,
                  all_items: bool = False, batch_size: int = 8, chunk_size: int = DEFAULT_CANDIDATES,
                  seed: int = 0) -> list[Recommendation]:
        """The top ``k`` items (sorted by score, best first) for a history of titles or item indices.

        Candidates: ``candidates`` as given; else ``all_items`` ranks every item outside the history in prompts of
        ``chunk_size`` candidates; else ``max(20, k)`` items are drawn uniformly outside the history with ``seed``.
        Returns ``min(k, number of candidates)`` items.

        CLI (``delrec recommend RUN``): ``--history TITLE_OR_INDEX`` (repeatable) or ``--user USER_ID``, ``-k``,
        ``--candidate TITLE_OR_INDEX`` (repeatable), ``--all-items``, ``--batch-size``, ``--seed``, ``--device``,
        ``--explain`` (print `explain`), ``--json``.
        """
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise DelrecError(f"k must be a positive integer, got {k!r}", field="k")
        if chunk_size < 2 or batch_size < 1:
            raise DelrecError("chunk_size must be ≥ 2 and batch_size ≥ 1", field="chunk_size")
        if _scoring(self.settings).verbalizer == "index":
            from delrec.llm.prompts import LETTERS

            chunk_size = min(chunk_size, len(LETTERS))  # a prompt can letter at most 26 candidates
        hist = self.resolve_history(history)
        cands = self._candidates(hist, candidates, all_items, int(k), seed)
        return self._rank(self._truncate(hist), cands, int(k), batch_size, chunk_size, progress=all_items)

    def _rank(self, hist: list[int], cands: list[int], k: int, batch_size: int, chunk_size: int,
              progress: bool = False) -> list[Recommendation]:
        chunks = [cands[s:s + chunk_size] for s in range(0, len(cands), chunk_size)]
        items, scores = [], []
        # Rows of one `score` call must have equal width: score the full chunks together, the short tail alone.
        full = [c for c in chunks if len(c) == len(chunks[0])]
        rest = chunks[len(full):]
        for group in (full, rest):
            if group:
                s = self.score([hist] * len(group), group, batch_size=batch_size, progress=progress)
                items.extend(i for c in group for i in c)
                scores.extend(s.reshape(-1).tolist())
        order = sorted(range(len(items)), key=lambda j: (-scores[j], j))[:k]
        return [Recommendation(items[j], self.dataset.titles[items[j]], float(scores[j])) for j in order]

    def recommend_user(self, user_id: str | int, k: int = 10, **kwargs: Any) -> list[Recommendation]:
        """`recommend` with a dataset user's whole sequence as history (``user_id``: the original user id).

        CLI: ``delrec recommend RUN --user USER_ID``.
        """
        return self.recommend(self.user_history(user_id), k=k, **kwargs)

    def user_history(self, user_id: str | int) -> list[int]:
        try:
            u = self.dataset.user_ids.index(str(user_id))
        except ValueError:
            raise DelrecError(f"no user {str(user_id)!r} in dataset {self.dataset.name!r}", field="user") from None
        return [int(i) for i in self.dataset.sequences[u]]

    # --- explaining ---------------------------------------------------------------------------------------------
    def explain(self, history: Sequence[str | int], k: int = 10, candidates: Sequence[str | int] | None = None,
                batch_size: int = 8, seed: int = 0) -> Explanation:
        """Leave-one-out influence of each history item on the top recommendation, plus the teacher's top-k.

        The candidate set is drawn (or given) once and kept fixed, so every influence is a score difference on the
        same candidates in the same order. Costs one prompt per history item in the prompt.

        CLI: ``delrec recommend RUN --history ... --explain``.
        """
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise DelrecError(f"k must be a positive integer, got {k!r}", field="k")
        full = self.resolve_history(history)
        cands = self._candidates(full, candidates, False, int(k), seed)
        hist = self._truncate(full)
        scores = self.score([hist], [cands], batch_size=batch_size)[0]  # [C]
        order = sorted(range(len(cands)), key=lambda j: (-scores[j], j))
        recs = [Recommendation(cands[j], self.dataset.titles[cands[j]], float(scores[j])) for j in order[:k]]
        top = order[0]
        influences: list[Influence] = []
        if len(hist) > 1:  # removing the only item would leave an empty history
            without = [hist[:p] + hist[p + 1:] for p in range(len(hist))]
            loo = self.score(without, [cands] * len(without), batch_size=batch_size)[:, top]  # [H]
            influences = [Influence(hist[p], self.dataset.titles[hist[p]], p, float(scores[top] - loo[p]))
                          for p in range(len(hist))]
            influences.sort(key=lambda x: (-x.influence, x.position))
        return Explanation(history=hist, candidates=cands, recommendations=recs, influences=influences,
                           teacher=self.settings.teacher_name if self.teacher is not None else None,
                           teacher_topk=self.teacher_topk(full, k, set(cands)))

    def teacher_topk(self, history: list[int], k: int, candidates: set[int] | None = None) -> list[TeacherPick]:
        """The distilled teacher's top-k over the whole catalogue (history excluded); [] without a teacher."""
        k = min(k, self.dataset.n_items - len(set(history)))
        if self.teacher is None or k < 1:
            return []
        from delrec.teachers import predict_topk

        top = predict_topk(self.teacher, [np.asarray(history, dtype=np.int64)], k, exclude_history=True)[0]
        cands = candidates or set()
        return [TeacherPick(int(i), self.dataset.titles[int(i)], r, int(i) in cands)
                for r, i in enumerate(top, start=1) if int(i) > 0]

    def info(self) -> dict[str, Any]:
        """What is loaded (for /health and logs)."""
        return {"dataset": self.dataset.name, "domain": self.domain, "n_items": self.dataset.n_items,
                "n_users": self.dataset.n_users, "backbone": self.backbone_name,
                "soft_prompt": self.has_soft_prompt, "adapter": self.has_adapter,
                "teacher": self.settings.teacher_name if self.teacher is not None else None,
                "history_len": self.settings.history_len, "candidates": self.settings.candidates}


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def _listing(titles: list[str]) -> str:
    return "; ".join(repr(t) for t in titles)


def _teacher_dir(run_dir: Path, name: str) -> Path | None:
    """``teachers/<name>/model`` (the name as written, or lower-cased); None when the run has no teacher."""
    for candidate in (name, name.lower()):
        d = run_dir / "teachers" / candidate / "model"
        if d.is_dir():
            return d
    return None


def _eval(module: Any) -> None:
    ev = getattr(module, "eval", None)
    if callable(ev):
        ev()
