"""The paper's three hard prompts — Temporal Analysis (TA), Recommendation Pattern Simulating (RPS) and LLM-based
Sequential Recommendation (LSR) — in the movie, game, beauty and home variants plus a generic one.

Wording follows the released templates (delrec-method.md §3.2, §3.3, §4.1) with the domain nouns swapped. Every
prompt carries `SOFT_PROMPT_SLOT` right after "The recommendation pattern of the {teacher} model is:"; the scorer
splices the soft prompt in there (or drops the marker when there is none).

Every prompt *ends where the answer starts* ("...is:" / "...might be:"): a causal LM continues it with
" <title>", a seq2seq LM's decoder generates "<title>". Two consequences, both deliberate:
- the paper's ``<MASK>.`` endings become ``:`` (the answer is the continuation);
- RPS printed the teacher's top-2..k *after* the mask, which a causal LM could not see. It is printed in the same
  sentence with a placeholder, as TA does with "[movie X]": "...might be:[movie X], B, C. [movie X] is:".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from delrec.errors import ConfigError

SOFT_PROMPT_SLOT = "<|soft_prompt|>"
# Ends each history entry of the ``next`` verbalizer's prompt; the scorer tokenises the text between two markers on
# its own and puts the item separator's tokens in place of each marker, so a history entry is token for token what
# a candidate scored as the next entry is (no merge of a title's last character with the separator).
ITEM_END = "<|item_end|>"
ITEM_SEP = ","
SLOT_PHRASE = "The recommendation pattern of the {teacher} model is:"


@dataclass(frozen=True)
class DomainWords:
    history: str  # "movie viewing" → "user's movie viewing history"
    did: str  # "watched"
    item: str  # "movie"
    items: str  # "movies"
    do: str  # "watch"


DOMAINS: dict[str, DomainWords] = {
    "movie": DomainWords("movie viewing", "watched", "movie", "movies", "watch"),
    "game": DomainWords("game playing", "played", "game", "games", "play"),
    "beauty": DomainWords("item purchasing", "purchased", "item", "items", "purchase"),
    "home": DomainWords("furniture or kitchenware purchasing", "purchased", "item", "items", "purchase"),
    "generic": DomainWords("item interaction", "interacted with", "item", "items", "interact with"),
}


def domain_words(domain: str) -> DomainWords:
    if domain not in DOMAINS:
        raise ConfigError(f"unknown prompt domain {domain!r}; choose one of {', '.join(DOMAINS)}",
                          field="dataset.domain")
    return DOMAINS[domain]


def truncate_history(titles: Sequence[str], n: int | None) -> list[str]:
    """The ``n`` most recent titles (all when ``n`` is None), oldest first."""
    if n is None:
        return list(titles)
    if n < 0:
        raise ValueError(f"history length must be >= 0, got {n}")
    return list(titles)[-n:] if n else []


YearMode = Literal["keep", "unscored", "hidden"]
YEAR_MODES: tuple[str, ...] = ("keep", "unscored", "hidden")
EosMode = Literal["auto", "always", "never"]
Reduce = Literal["mean", "sum"]
REDUCTIONS: tuple[str, ...] = ("mean", "sum")
Verbalizer = Literal["title", "index", "open", "next"]
VERBALIZERS: tuple[str, ...] = ("title", "index", "open", "next")
UNLISTED: tuple[str, ...] = ("open", "next")  # verbalizers whose prompts do not list the candidates
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # index labels: " A" … " Z" are one token each in SmolLM2, Gemma 3, T5
_YEAR = re.compile(r"\s*\(\d{4}\)\s*$")  # MovieLens' trailing " (1995)"


@dataclass
class ScoringConfig:
    """How a title is verbalised: what the prompt shows and which tokens a candidate is scored on (all stages).

    ``year``: ``keep`` — titles shown and scored as the catalogue spells them; ``unscored`` — shown with the
    " (YYYY)" release year, scored without it (the released code's ``title[:-7]`` label words: the year is ~6
    digit tokens of a ~10-token title and would dominate a mean log-likelihood); ``hidden`` — the year is neither
    shown nor scored (shortest prompts). A title is kept whole where dropping its year would make it equal another.
    ``verbalizer``: ``title`` — a candidate's score is its whole title's mean log-likelihood; ``index`` — candidates
    are listed as "(A) title, (B) title, …" and a candidate's score is the log-probability of its letter at the
    answer position (LlamaRec's verbalizer): one forward pass over the prompt and one vocabulary row per example,
    nothing averaged over title tokens. At most 26 candidates. ``open`` — scored as ``title``, but the prompt does not
    list the candidates: a title's score is the LM's own likelihood of it as the next item (no copying from a list,
    ~200 fewer prompt tokens per stage-2 example). ``next`` — not listed either: the history is an open list
    (" title," per entry) and a candidate is scored as its next entry, " title" then the separator "," (which
    plays EOS's part for causal LMs). One forward pass over a user's window of items then scores every item as the
    next entry after those before it (`TitleScorer.sequence_scores`): stage 2's ``objective=sequence``.
    ``eos``: score an end-of-sequence token after each title (never after an index letter). ``auto``: for seq2seq
    backbones (T5's ``</s>`` ends every target) but not causal ones (SmolLM2's EOS is a chat-turn token that never
    follows a list item).
    ``reduce``: a title's score from its token log-likelihoods — ``mean`` or ``sum`` (the title's log-probability).
    ``prior_weight`` λ: a candidate's score minus λ × its score after the same prompt with an *empty* history — the
    title's prior under the same model (soft prompt and adapter included), which is mostly how predictable its
    wording is. A title's log-probability mixes "is this what the history points to" with "is this a likely string"
    and, in catalogues of long product titles, the second swamps the first; λ = 1 is the domain-conditional PMI of
    Holtzman et al. (2021, "Surface form competition"). Scoring only: training is unchanged. ``auto``: λ is chosen
    from `delrec.metrics.PRIOR_GRID` on the validation users, jointly with the checkpoint — each validation pass
    (stages 1 and 2) scores the candidates and their priors once and reads every λ off them; the run records the
    chosen λ (stage 2's ``history.json``, else stage 1's soft prompt, else a validation pass at evaluation) and the
    test evaluation and `delrec.recommend.DELRec` use it. The right λ is per catalogue (Beauty's long product
    titles want ~0.75, MovieLens' ~0: benchmarks/results/prior_weight.md).
    All of these hold for training (both stages), validation, test evaluation and recommendation alike.
    """

    # Defaults measured (benchmarks/results/learning_log.md, 300 stage-2 examples, 200 validation rows): whole
    # titles + EOS reach validation NDCG@5 0.385; year unscored / hidden without EOS 0.282 / 0.315, though 1.5× /
    # 2.2× cheaper per example. The EOS score acts as a learnable "is this the one" verdict on each title.
    # The cpu profiles use ``next`` with ``sum`` (pipeline.profile: packed training, learning_log P13–P17);
    # ``title`` stays the default, the paper's listed candidate set.
    year: YearMode = "keep"
    eos: EosMode = "always"
    verbalizer: Verbalizer = "title"
    reduce: Reduce = "mean"
    prior_weight: float | Literal["auto"] = 0.0

    def validate(self) -> ScoringConfig:
        if self.year not in YEAR_MODES:
            raise ConfigError(f"must be one of {', '.join(YEAR_MODES)}, got {self.year!r}", field="scoring.year")
        if self.eos not in ("auto", "always", "never"):
            raise ConfigError(f"must be auto, always or never, got {self.eos!r}", field="scoring.eos")
        if self.reduce not in REDUCTIONS:
            raise ConfigError(f"must be one of {', '.join(REDUCTIONS)}, got {self.reduce!r}", field="scoring.reduce")
        if self.prior_weight != "auto" and (
                isinstance(self.prior_weight, bool) or not isinstance(self.prior_weight, (int, float))
                or not 0.0 <= self.prior_weight <= 1.0):
            raise ConfigError(f"must be a number in [0, 1] or auto, got {self.prior_weight!r}",
                              field="scoring.prior_weight")
        if self.verbalizer not in VERBALIZERS:
            raise ConfigError(f"must be one of {', '.join(VERBALIZERS)}, got {self.verbalizer!r}",
                              field="scoring.verbalizer")
        return self

    def append_eos(self, backbone_kind: str) -> bool:
        if self.verbalizer == "index":
            return False  # a letter is the whole answer
        if self._list_entries(backbone_kind):
            return self.eos != "never"  # the list separator ends every entry
        return self.eos == "always" or (self.eos == "auto" and backbone_kind != "causal")

    def end_text(self, backbone_kind: str) -> str | None:
        """What ends a scored title instead of the EOS token: the list separator for ``next`` on a causal LM."""
        return ITEM_SEP if self._list_entries(backbone_kind) else None

    def _list_entries(self, backbone_kind: str) -> bool:
        """A candidate is scored as the next entry of the history's list, ended by the separator."""
        return self.verbalizer == "next" and backbone_kind == "causal"

    def scorer(self, backbone: Any, soft_prompt: Any = None, **kwargs: Any) -> Any:
        """The `TitleScorer` these settings describe (``kwargs``: its batch and memory knobs)."""
        from delrec.llm.scoring import TitleScorer

        return TitleScorer(backbone, soft_prompt, self.reduce, append_eos=self.append_eos(backbone.kind),
                           end_text=self.end_text(backbone.kind), **kwargs)

    def check_candidates(self, size: int, field: str) -> None:
        """Refuse a candidate-set size the verbalizer cannot label (checked before any training)."""
        if self.verbalizer == "index" and size > len(LETTERS):
            raise ConfigError(f"scoring.verbalizer=index labels at most {len(LETTERS)} candidates, got {size}",
                              field=field)


@dataclass(frozen=True)
class TitleViews:
    """Every item's title as shown in a prompt and as scored as a candidate, for one `ScoringConfig.year`."""

    shown: list[str]
    scored: list[str]

    @classmethod
    def of(cls, titles: Sequence[str], year: str = "keep") -> TitleViews:
        if year not in YEAR_MODES:
            raise ConfigError(f"must be one of {', '.join(YEAR_MODES)}, got {year!r}", field="scoring.year")
        titles = [str(t).strip() for t in titles]
        if year == "keep":
            return cls(titles, titles)
        bare = [_YEAR.sub("", t) or t for t in titles]
        counts: dict[str, int] = {}
        for b in bare:
            counts[b] = counts.get(b, 0) + 1
        # Remakes share a title ("Father of the Bride"); those keep their year so no two candidates score alike.
        stripped = [b if counts[b] == 1 else t for b, t in zip(bare, titles, strict=True)]
        return cls(stripped if year == "hidden" else titles, stripped)


def title_views(dataset: Any, year: str = "keep") -> TitleViews:
    """`TitleViews` of a dataset's catalogue (``dataset.titles``), cached on the dataset object."""
    cache = dataset.__dict__.setdefault("_title_views", {})
    key = (year, len(dataset.titles))
    if key not in cache:
        cache[key] = TitleViews.of(dataset.titles, year)
    return cache[key]


def join_titles(titles: Sequence[str]) -> str:
    return ", ".join(t.strip() for t in titles)


def candidate_sentence(titles: Sequence[str], verbalizer: str = "title") -> str:
    """ "The candidate set is: …. " as the prompts print it; empty for ``open`` and ``next`` (nothing listed)."""
    return "" if verbalizer in UNLISTED else f"The candidate set is: {candidate_list(titles, verbalizer)}. "


def candidate_list(titles: Sequence[str], verbalizer: str = "title") -> str:
    """The candidate set as a prompt shows it: "A, B, C" or, for the index verbalizer, "(A) A, (B) B, (C) C"."""
    if verbalizer == "index":
        if len(titles) > len(LETTERS):
            raise ConfigError(f"scoring.verbalizer=index labels at most {len(LETTERS)} candidates, got {len(titles)}",
                              field="scoring.verbalizer")
        return ", ".join(f"({LETTERS[j]}) {t.strip()}" for j, t in enumerate(titles))
    return join_titles(titles)


def candidate_labels(scored: Sequence[str], verbalizer: str = "title") -> list[str]:
    """What each candidate is scored on: its (scored) title, or its letter for the index verbalizer."""
    return list(LETTERS[:len(scored)]) if verbalizer == "index" else list(scored)


def open_list(titles: Sequence[str]) -> str:
    """History entries of the ``next`` verbalizer: " title<ITEM_END>" each (the scorer puts the separator in)."""
    return "".join(f" {t.strip()}{ITEM_END}" for t in titles)


def strip_slot(text: str) -> str:
    """The prompt without the soft prompt (the "no soft prompt" ablation)."""
    return text.replace(SOFT_PROMPT_SLOT, "")


def _slot(teacher: str, soft_prompt: bool) -> str:
    return SLOT_PHRASE.format(teacher=teacher) + (SOFT_PROMPT_SLOT if soft_prompt else "")


def ta_prompt(domain: str, teacher: str, demo_history: Sequence[str], demo_answer: str, demo_next: str,
              history: Sequence[str], next_title: str, candidates: Sequence[str], *,
              soft_prompt: bool = True, verbalizer: str = "title") -> str:
    """Temporal Analysis (§3.2): an in-context demo (items 1–2, masked item 3 = ``demo_answer``, then item 4 =
    ``demo_next``) and the query (``history`` = items 4..n−2, masked item n−1, then item n = ``next_title``).
    The answer (item n−1) follows the returned text."""
    w = domain_words(domain)
    return (
        f"Simulate the recommendation pattern of the {teacher} model to make a temporal analysis of the {teacher} "
        f"model by analysing the most recent item in user's {w.history} history from candidate set. "
        f"{_slot(teacher, soft_prompt)}. {candidate_sentence(candidates, verbalizer)}"
        f"The user has already {w.did} {join_titles(demo_history)}, [{w.item} M]. "
        f"Then, The next {w.item} the user plan to {w.do} is {demo_next.strip()}. "
        f"The most recent item [{w.item} M] in user's {w.history} history is {demo_answer.strip()}. "
        f"After that, the user has also {w.did} {join_titles(history)}, [{w.item} X]. "
        f"Then, The next {w.item} the user plan to {w.do} is {next_title.strip()}. "
        f"The most recent item [{w.item} X] in user's {w.history} history is:"
    )


def rps_prompt(domain: str, teacher: str, history: Sequence[str], candidates: Sequence[str],
               teacher_rest: Sequence[str], *, soft_prompt: bool = True, verbalizer: str = "title") -> str:
    """Recommendation Pattern Simulating (§3.3): predict the teacher's top-1; its top-2..k (``teacher_rest``) are
    shown. The answer (the teacher's top-1) follows the returned text."""
    w = domain_words(domain)
    head = (
        f"Simulate the recommendation pattern of the {teacher} model to predict next {w.items} that the user might "
        f"{w.do} from candidate set based on user's {w.history} history. {_slot(teacher, soft_prompt)}. "
        f"The {w.history} history of the user is: {join_titles(history)}. "
        f"{candidate_sentence(candidates, verbalizer)}"
        f"Next {w.items} the user will {w.do} (predicted by the {teacher} model) might be:"
    )
    if not teacher_rest:
        return head
    return f"{head}[{w.item} X], {join_titles(teacher_rest)}. [{w.item} X] is:"


def lsr_prompt(domain: str, teacher: str, history: Sequence[str], candidates: Sequence[str], *,
               soft_prompt: bool = True, verbalizer: str = "title") -> str:
    """Stage-2 next-item prediction (§4.1). The answer (the user's next item) follows the returned text.

    ``next``: the history is left as an open list and the answer is its next entry (`open_list`)."""
    w = domain_words(domain)
    if verbalizer == "next":
        return lsr_head(domain, teacher, soft_prompt=soft_prompt) + open_list(history)
    return (
        f"Refer to the recommendation pattern of the {teacher} model to predict the next {w.item} that the user "
        f"might {w.do} from candidate set based on user's {w.history} history. {_slot(teacher, soft_prompt)}. "
        f"The {w.history} history of the user is: {join_titles(history)}. "
        f"{candidate_sentence(candidates, verbalizer)}"
        f"The next {w.item} the user will {w.do} might be:"
    )


def rps_head(domain: str, teacher: str, *, soft_prompt: bool = True) -> str:
    """RPS in the ``next`` verbalizer's packed form, up to its open list: the user's history, then the teacher's
    greedy continuation of it, entry after entry (`delrec.teachers.predict_rollout`)."""
    w = domain_words(domain)
    return (
        f"Simulate the recommendation pattern of the {teacher} model to predict next {w.items} that the user might "
        f"{w.do} based on user's {w.history} history. {_slot(teacher, soft_prompt)}. "
        f"The {w.history} history of the user, oldest first, then the next {w.items} the {teacher} model "
        f"predicts, is:"
    )


def lsr_head(domain: str, teacher: str, *, soft_prompt: bool = True) -> str:
    """The ``next`` verbalizer's LSR prompt up to its (open) history list."""
    w = domain_words(domain)
    return (
        f"Refer to the recommendation pattern of the {teacher} model to predict the next {w.item} that the user "
        f"might {w.do} based on user's {w.history} history. {_slot(teacher, soft_prompt)}. "
        f"The {w.history} history of the user, oldest first, is:"
    )


def render_lsr(views: TitleViews, domain: str, teacher: str, histories: Sequence[Sequence[int] | np.ndarray],
               cand_items: Sequence[Sequence[int]] | np.ndarray, history_len: int | None, *,
               soft_prompt: bool = True, verbalizer: str = "title") -> tuple[list[str], list[list[str]]]:
    """The one stage-2 (LSR) renderer: item histories + [B, C] candidate items → (prompts, scored candidate titles).

    Training, validation (both stages), test evaluation and `DELRec.recommend` all build their prompts here.
    """
    prompts: list[str] = []
    cands: list[list[str]] = []
    for hist, row in zip(histories, cand_items, strict=True):
        shown = truncate_history([views.shown[int(i)] for i in hist], history_len)
        prompts.append(lsr_prompt(domain, teacher, shown, [views.shown[int(i)] for i in row],
                                  soft_prompt=soft_prompt, verbalizer=verbalizer))
        cands.append(candidate_labels([views.scored[int(i)] for i in row], verbalizer))
    return prompts, cands


def render_windows(views: TitleViews, domain: str, teacher: str, windows: Sequence[Sequence[int] | np.ndarray], *,
                   soft_prompt: bool = True) -> tuple[list[str], list[list[str]]]:
    """Stage 2's packed form (``next`` verbalizer): windows of consecutive items → (LSR heads, the items' titles).

    `TitleScorer.sequence_scores` scores item k of a window exactly as `render_lsr` would score it as a candidate
    after the window's items before it."""
    return [lsr_head(domain, teacher, soft_prompt=soft_prompt)] * len(windows), packed_titles(views, windows)


def packed_titles(views: TitleViews, windows: Sequence[Sequence[int] | np.ndarray], what: str = "training"
                  ) -> list[list[str]]:
    """Each window's titles for a packed pass, in which an item is both context (shown) and scored: so the two
    views must agree (``scoring.year`` keep or hidden)."""
    if views.shown != views.scored:
        raise ConfigError(f"packed {what} needs titles shown as scored (scoring.year keep or hidden)",
                          field="scoring.year")
    return [[views.scored[int(i)] for i in w] for w in windows]
