"""One call from a data config to a ready `SeqDataset`: resolve the files, load them, preprocess.

    ds = prepare_dataset(DataConfig(name="ml-100k"))                     # cache / download / recbole wheel
    ds = prepare_dataset(DataConfig(name="amazon-beauty", path="data/amazon-beauty"))  # format auto-detected
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from delrec.data.dataset import SeqDataset
from delrec.data.loaders import domain_for, load_amazon, load_generic, load_movielens, load_recbole, load_steam
from delrec.data.preprocess import PreprocessConfig, preprocess
from delrec.data.sources import FORMATS, detect_format, resolve_dataset
from delrec.errors import ConfigError

SECTION = "data"
DOMAINS = ("movie", "game", "beauty", "home", "generic")  # prompt wording; see delrec.data.dataset


@dataclass
class DataConfig:
    name: str = field(default="ml-100k", metadata={"help": "dataset name; ml-100k is found without a path"})
    path: str | None = field(default=None, metadata={"help": "folder with the raw files; None = cache/wheel"})
    format: str = field(default="auto", metadata={"help": "auto | movielens | recbole | amazon | steam | generic"})
    domain: str | None = field(default=None, metadata={"help": "movie | game | beauty | home | generic; "
                                                               "None = guessed from the format and name"})
    interactions_file: str | None = field(default=None, metadata={
        "help": "interactions file name inside path (u.data, x.inter, reviews_*.json.gz, interactions.tsv...)"})
    items_file: str | None = field(default=None, metadata={"help": "item/title file name inside path"})
    user_column: str = field(default="user_id", metadata={"help": "generic/recbole: user id column"})
    item_column: str = field(default="item_id", metadata={"help": "generic/recbole: item id column (both files)"})
    time_column: str | None = field(default="timestamp", metadata={
        "help": "generic/recbole: unix-seconds column; None (generic only) = file order is time order"})
    title_column: str | None = field(default=None, metadata={
        "help": "generic/recbole: title column; None = first of movie_title, title, app_name, name"})
    sep: str | None = field(default=None, metadata={"help": "generic: delimiter; None = by extension"})
    download: bool = field(default=True, metadata={"help": "allow the ml-100k download (DELREC_OFFLINE=1 wins)"})
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)  # a mapping is converted

    def __post_init__(self) -> None:
        if isinstance(self.preprocess, dict):  # a YAML mapping
            self.preprocess = _preprocess_from_dict(self.preprocess)

    def validate(self) -> DataConfig:
        if not isinstance(self.name, str) or not self.name.strip() or "/" in self.name or self.name in {".", ".."}:
            raise ConfigError(f"must be a non-empty name without '/', got {self.name!r}", field=f"{SECTION}.name")
        if self.format not in ("auto", *FORMATS):
            raise ConfigError(f"unknown format {self.format!r}; choose one of {['auto', *FORMATS]}",
                              field=f"{SECTION}.format")
        if self.domain is not None and self.domain not in DOMAINS:
            raise ConfigError(f"unknown domain {self.domain!r}; choose one of {list(DOMAINS)}",
                              field=f"{SECTION}.domain")
        for name in ("path", "interactions_file", "items_file", "title_column", "time_column"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise ConfigError(f"must be a non-empty string or null, got {v!r}", field=f"{SECTION}.{name}")
        for name in ("user_column", "item_column"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip():
                raise ConfigError(f"must be a non-empty string, got {v!r}", field=f"{SECTION}.{name}")
        for name in ("interactions_file", "items_file"):
            v = getattr(self, name)
            if v is not None and ("/" in v or "\\" in v):
                raise ConfigError("a file name inside data.path, not a path", field=f"{SECTION}.{name}")
        if self.sep is not None and (not isinstance(self.sep, str) or len(self.sep) != 1):
            raise ConfigError(f"must be one character, got {self.sep!r}", field=f"{SECTION}.sep")
        if not isinstance(self.download, bool):
            raise ConfigError(f"must be true or false, got {self.download!r}", field=f"{SECTION}.download")
        if self.time_column is None and self.format == "recbole":
            raise ConfigError("RecBole files need a timestamp column", field=f"{SECTION}.time_column")
        if not isinstance(self.preprocess, PreprocessConfig):
            raise ConfigError("must be a mapping of preprocessing options", field=f"{SECTION}.preprocess")
        self.preprocess.validate()
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> DataConfig:
        """Build from a YAML mapping; unknown keys are errors that name the key."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        for k in d:
            if k not in known:
                raise ConfigError(f"unknown option; known: {sorted(known)}", field=f"{SECTION}.{k}")
        pre = d.pop("preprocess", None) or {}
        if not isinstance(pre, dict):
            raise ConfigError("must be a mapping of preprocessing options", field=f"{SECTION}.preprocess")
        return cls(**d, preprocess=_preprocess_from_dict(pre)).validate()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _preprocess_from_dict(d: dict[str, Any]) -> PreprocessConfig:
    known = {f.name for f in fields(PreprocessConfig)}
    for k in d:
        if k not in known:
            raise ConfigError(f"unknown option; known: {sorted(known)}", field=f"{SECTION}.preprocess.{k}")
    return PreprocessConfig(**d)


def load_raw(cfg: DataConfig) -> SeqDataset:
    """Resolve and load, without preprocessing (``ds.meta["load"]`` has the loader's counts)."""
    cfg.validate()
    res = resolve_dataset(cfg.name, cfg.path, allow_download=cfg.download)
    fmt = cfg.format if cfg.format != "auto" else detect_format(res.folder, cfg.interactions_file)
    dom = cfg.domain
    if fmt == "movielens":
        ds = load_movielens(res.folder, name=cfg.name, domain=dom or "movie")
    elif fmt == "recbole":
        ds = load_recbole(res.folder, name=cfg.name, domain=dom, inter_file=cfg.interactions_file,
                          item_file=cfg.items_file, user_column=cfg.user_column, item_column=cfg.item_column,
                          time_column=cfg.time_column or "timestamp", title_column=cfg.title_column)
    elif fmt == "amazon":
        ds = load_amazon(res.folder, name=cfg.name, domain=dom, reviews_file=cfg.interactions_file,
                         meta_file=cfg.items_file)
    elif fmt == "steam":
        ds = load_steam(res.folder, name=cfg.name, domain=dom or "game", reviews_file=cfg.interactions_file,
                        games_file=cfg.items_file)
    else:
        ds = load_generic(res.folder, name=cfg.name, domain=dom or domain_for(cfg.name),
                          interactions_file=cfg.interactions_file, items_file=cfg.items_file,
                          user_column=cfg.user_column, item_column=cfg.item_column, time_column=cfg.time_column,
                          title_column=cfg.title_column, sep=cfg.sep)
    ds.source = res.source
    if res.tried:
        ds.meta["source_tried"] = list(res.tried)
    return ds


def prepare_dataset(cfg: DataConfig | None = None) -> SeqDataset:
    """Resolve + load + preprocess. Raises `DataError`/`ConfigError` (one line, file:line: field) on bad input."""
    cfg = cfg or DataConfig()
    return preprocess(load_raw(cfg), cfg.preprocess)
