"""The `delrec` command line. User mistakes print one line (file:line: field: message) and exit with status 2."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from delrec.errors import DelrecError
from delrec.settings import MAX_SEED

MAX_NAME = 200  # bytes of data.name: it becomes a folder name (runs/<name>-<profile>, the cache)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="DELRec: distil sequential patterns from conventional recommenders into an LLM recommender.")
data_app = typer.Typer(no_args_is_help=True, help="Load, preprocess and split a dataset into a run folder.")
teacher_app = typer.Typer(no_args_is_help=True, help="Train teachers and export their top-k predictions.")
app.add_typer(data_app, name="data")
app.add_typer(teacher_app, name="teacher")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (profile defaults apply)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="override, e.g. --set finetune.max_steps=20")]
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="run folder (default runs/<dataset>-<profile>)")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cpu | cuda | cuda:N | auto")]
RunArg = Annotated[Path, typer.Argument(help="run folder")]


def _config(config: Path | None, overrides: list[str] | None, device: str | None = None):  # type: ignore[no-untyped-def]
    from delrec.pipeline import load_config

    over = list(overrides or [])
    if device is not None:
        over.append(f"device={device}")
    return load_config(config, over)


def load_model(run_dir: Path, device: str | None):  # type: ignore[no-untyped-def]
    """``DELRec.from_pretrained`` for a user-given run folder: a damaged artifact in it is a one-line error."""
    from delrec.io import artifact_errors
    from delrec.recommend import DELRec

    _check_device(device, "--device")
    try:
        return DELRec.from_pretrained(run_dir, device=device)
    except DelrecError:
        raise
    except artifact_errors() as e:
        raise DelrecError(f"damaged or incompatible run folder ({type(e).__name__}: {e})", file=run_dir) from None


def _default_out(cfg) -> Path:  # type: ignore[no-untyped-def]
    return Path("runs") / f"{cfg.data.name}-{cfg.profile}"


@contextmanager
def _no_partial_folder(out: Path) -> Iterator[None]:
    """A user mistake must not leave a half-made run folder: remove what this call wrote if it failed before any
    model was trained (a later failure keeps the checkpoints so the run can resume); a folder that existed stays."""
    existed = out.exists()
    try:
        was_empty = out.is_dir() and not any(out.iterdir())
    except OSError:
        was_empty = False
    try:
        yield
    except Exception:  # a user error, an OSError on a user path, or a bug: none should leave a stub folder
        from delrec.pipeline import clear_run_entries, is_run_folder

        if ((not existed or was_empty) and out.is_dir()
                and not any((out / d).exists() for d in ("teachers", "distill", "finetune"))):
            if is_run_folder(out):  # only delrec's own entries go, whatever else appeared meanwhile
                clear_run_entries(out)
            if not existed and not any(out.iterdir()):
                out.rmdir()
        raise


def _check_inputs(cfg, config: Path | None) -> None:  # type: ignore[no-untyped-def]
    """What can be checked before anything is deleted or written: a typo in data.path must not cost a run folder."""
    if cfg.data.path is not None and not Path(cfg.data.path).expanduser().exists():
        raise DelrecError("no such file or folder", file=cfg.data.path, field="data.path")
    if config is not None and not config.is_file():
        raise DelrecError("config file not found", file=config)
    if len(cfg.data.name.encode()) > MAX_NAME:  # it names the cache and run folders (255-byte file names)
        raise DelrecError(f"at most {MAX_NAME} bytes, got {len(cfg.data.name.encode())}", field="data.name")
    _check_device(cfg.device, "device")
    _check_backbone(cfg.backbone.name_or_path)


def _check_backbone(name: str) -> None:
    """The backbone is loaded only after the teachers: a name that cannot resolve must fail before them."""
    import re

    from delrec.llm.backbone import ALIASES

    path = Path(name).expanduser()
    if name in ALIASES or path.is_file() or (path.is_dir() and (path / "config.json").is_file()):
        return
    if path.is_dir():
        raise DelrecError("this model folder holds no config.json", file=path, field="backbone.name_or_path")
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name):
        raise DelrecError(f"{name!r} is not an alias ({', '.join(ALIASES)}), an existing model folder or a "
                          "Hugging Face hub id 'org/name'", field="backbone.name_or_path")


def _check_split(r, until: str | None) -> None:  # type: ignore[no-untyped-def]
    """Prepare the data and the split (stage 0) and make sure every part has users before any teacher trains."""
    split = r.split
    sizes = {"train": len(split.train_users), "valid": len(split.examples("valid")),
             "test": len(split.examples("test"))}
    empty = [part for part, n in sizes.items() if n == 0]
    if empty:
        raise DelrecError(f"the {split.kind!r} split of {r.dataset.n_users} users leaves no examples in "
                          f"{' and '.join(empty)}; use more data or other split.ratios / data.preprocess settings",
                          field="split")
    if until in ("data", "teachers"):
        return
    cfg = r.cfg
    if cfg.soft_prompt.num_tokens > 0:  # stage 1's TA task needs long enough training sequences
        from delrec.distill import TA_MIN_LEN

        if not any(len(s) >= TA_MIN_LEN for s in split.train_sequences):
            raise DelrecError(f"no training sequence has the {TA_MIN_LEN} items stage 1's TA task needs; raise "
                              "data.preprocess.min_seq_len or use longer histories",
                              field="data.preprocess.min_seq_len")
    if cfg.finetune.adapter != "none":
        from delrec.finetune import train_examples

        n = len(train_examples(split, cfg.finetune))
        if n < cfg.finetune.batch_size:
            raise DelrecError(f"only {n} stage-2 training examples, fewer than one batch of {cfg.finetune.batch_size}",
                              field="finetune.batch_size")


def _check_device(device: str | None, field: str) -> None:
    """A device this machine has, checked before any stage runs (not after the teachers, nor in a saved config)."""
    if device is None or device in ("cpu", "auto"):
        return
    import torch

    if device == "mps":
        if not torch.backends.mps.is_available():
            raise DelrecError("MPS is not available on this machine; use cpu or auto", field=field)
        return
    if not device.startswith("cuda"):
        raise DelrecError(f"must be cpu, cuda, cuda:N, mps or auto, got {device!r}", field=field)
    if not torch.cuda.is_available():
        raise DelrecError(f"{device!r} requested but CUDA is not available on this machine; use cpu or auto",
                          field=field)
    index = device.partition(":")[2] or "0"
    if not index.isdigit() or int(index) >= torch.cuda.device_count():
        raise DelrecError(f"no such GPU {device!r}; this machine has cuda:0..cuda:{torch.cuda.device_count() - 1}",
                          field=field)


def _fresh(out: Path, cfg, config: Path | None) -> None:  # type: ignore[no-untyped-def]
    from delrec.llm.backbone import cache_root
    from delrec.pipeline import remove_run_folder

    protect = [p for p in (config, Path(cfg.data.path) if cfg.data.path else None, cache_root()) if p is not None]
    remove_run_folder(out, protect)


@app.command()
def run(config: ConfigOpt = None, overrides: SetOpt = None, out: OutOpt = None, device: DeviceOpt = None,
        fresh: Annotated[bool, typer.Option(help="delete the run folder first instead of resuming")] = False,
        until: Annotated[str | None, typer.Option(help="stop after this stage: data|teachers|distill|finetune")] = None,
        reuse: Annotated[Path | None, typer.Option(help="copy the data, teachers and stage 1 of this finished run "
                                                        "where their settings match (ablations)")] = None,
        log: Annotated[str | None, typer.Option(help="tensorboard: write losses, task weights and validation "
                                                     "metrics to RUN/tensorboard (config key `log`)")] = None,
        ) -> None:
    """Run the whole pipeline (teachers → distill → AdaLoRA → evaluation → report); resumes an interrupted run."""
    from delrec.pipeline import Run, reuse_stages, run_pipeline

    cfg = _config(config, [*(overrides or []), *([f"log={log}"] if log else [])], device)
    out = out or _default_out(cfg)
    _check_inputs(cfg, config)
    if fresh:
        _fresh(out, cfg, config)
    with _no_partial_folder(out):
        r = Run(out, cfg)
        if reuse is not None and not r.done("data"):
            typer.echo(f"reused from {reuse}: {', '.join(reuse_stages(r, reuse)) or 'nothing (settings differ)'}")
        _check_split(r, until)
        summary = run_pipeline(r, until=until)
    typer.echo(summary)


@data_app.command("prepare")
def data_prepare(
    dataset: Annotated[str | None, typer.Option(help="ml-100k | amazon-beauty | steam | … (data.name)")] = None,
    path: Annotated[Path | None, typer.Option(help="folder or file with the raw data (data.path)")] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="auto | movielens | recbole | amazon | steam | "
                                                             "generic")] = None,
    split: Annotated[str | None, typer.Option(help="user | loo")] = None,
    config: ConfigOpt = None, overrides: SetOpt = None, out: OutOpt = None,
) -> None:
    """Load + preprocess a dataset, split it and freeze the candidate sets in a run folder."""
    from delrec.pipeline import Run

    over = list(overrides or [])
    for key, value in (("data.name", dataset), ("data.path", path), ("data.format", fmt), ("split.kind", split)):
        if value is not None:
            over.append(f"{key}={value}")
    cfg = _config(config, over)
    out = out or _default_out(cfg)
    _check_inputs(cfg, config)
    with _no_partial_folder(out):
        r = Run(out, cfg)
        ds = r.prepare_data() if not r.done("data") else r.dataset
        r.split  # noqa: B018  (writes split.json)
        for part in ("valid", "test"):
            r.candidates(part)  # type: ignore[arg-type]
    typer.echo(f"{r.dir}: {ds.name} ({ds.source}) {ds.stats()}; split {r.split.kind}; candidates "
               f"{r.manifest['candidates']}")


@teacher_app.command("train")
def teacher_train(run_dir: RunArg, model: Annotated[str, typer.Option(help="sasrec | gru4rec | caser")] = "sasrec",
                  ) -> None:
    """Train one teacher in RUN (resumes from its checkpoint) and evaluate it on the frozen test candidates."""
    from delrec.pipeline import Run, teacher_stage

    r = Run(run_dir)
    row = teacher_stage(r, model)
    typer.echo(f"{model}: {row['metrics']}")


@teacher_app.command("predict")
def teacher_predict(
    run_dir: RunArg,
    model: Annotated[str, typer.Option(help="sasrec | gru4rec | caser")] = "sasrec",
    k: Annotated[int, typer.Option(help="top-k per user")] = 10,
    part: Annotated[str, typer.Option(help="train | valid | test: which user prefixes")] = "train",
    out: Annotated[Path | None, typer.Option(help="Parquet file (default RUN/teachers/<model>/topk_<part>"
                                                  ".parquet)")] = None,
) -> None:
    """Export the teacher's top-k for the prefixes of one part of the split (rows aligned with users)."""
    from delrec.pipeline import Run, export_teacher_topk

    r = Run(run_dir)
    path = export_teacher_topk(r, model, k=k, part=part, dest=out)
    typer.echo(str(path))


@app.command()
def evaluate(runs: Annotated[list[Path], typer.Argument(help="run folders (or results JSON files)")]) -> None:
    """Compare every model evaluated in the given runs; refuses results computed on different candidate files."""
    from delrec.pipeline import collect_results

    table = collect_results(runs)
    typer.echo(table.to_string(float_format=lambda v: f"{v:.4f}"))


@app.command()
def recommend(
    run_dir: RunArg,
    user: Annotated[str | None, typer.Option(help="a user id of the run's dataset")] = None,
    history: Annotated[str | None, typer.Option(help="titles or item indices separated by ';' (for a user not in "
                                                     "the data)")] = None,
    k: Annotated[int, typer.Option(min=1, help="how many items to return")] = 10,
    candidates: Annotated[str | None, typer.Option(help="candidate titles separated by ';' (default: 20 drawn "
                                                        "outside the history)")] = None,
    all_items: Annotated[bool, typer.Option("--all-items", help="rank every item (slow)")] = False,
    explain: Annotated[bool, typer.Option("--explain", help="show which history items moved the top pick")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="seed of the drawn candidate set")] = 0,
    device: DeviceOpt = None,
) -> None:
    """Recommend the next items for a user or a typed history, optionally with an explanation."""
    import json

    if (user is None) == (history is None):
        raise DelrecError("give exactly one of --user or --history", field="--user/--history")
    model = load_model(run_dir, device)
    hist: list[str | int] = (list(model.user_history(user)) if user is not None
                             else [t.strip() for t in (history or "").split(";") if t.strip()])
    cands = [t.strip() for t in candidates.split(";") if t.strip()] if candidates else None
    if explain:
        ex = model.explain(hist, k=k, candidates=cands, seed=seed)
        if as_json:
            typer.echo(json.dumps(ex.to_dict(), indent=2))
            return
        _print_recs(ex.recommendations)
        typer.echo(f"\nwhy {ex.top.title!r}: history items by influence (score drop when removed)")
        for inf in ex.influences:
            typer.echo(f"  {inf.influence:+8.3f}  {inf.title}")
        if ex.teacher_topk:
            typer.echo(f"\n{ex.teacher}'s own top-{len(ex.teacher_topk)} (* = among the LLM's candidates)")
            for t in ex.teacher_topk:
                typer.echo(f"  {t.rank:3d}{'*' if t.in_candidates else ' '} {t.title}")
        return
    recs = model.recommend(hist, k=k, candidates=cands, all_items=all_items, seed=seed)
    if as_json:
        typer.echo(json.dumps([dataclasses.asdict(r) for r in recs], indent=2))
    else:
        _print_recs(recs)


def _print_recs(recs: list[Any]) -> None:
    typer.echo(f"{'rank':>4}  {'score':>8}  title")
    for i, r in enumerate(recs, start=1):
        typer.echo(f"{i:>4}  {r.score:8.3f}  {r.title}")


@app.command()
def serve(
    run_dir: RunArg,
    host: Annotated[str, typer.Option(help="interface to listen on (0.0.0.0: all)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port")] = 8000,
    max_history: Annotated[int, typer.Option(min=1, help="longest history a request may send")] = 50,
    max_candidates: Annotated[int, typer.Option(min=1, help="largest candidate set a request may send")] = 100,
    device: DeviceOpt = None,
) -> None:
    """Serve /recommend, /explain, /health and a small web page over HTTP (schemas at /openapi.json; there is no
    /docs page, since Swagger UI would need a CDN)."""
    from delrec.serve import serve as _serve

    _serve(run_dir, host=host, port=port, device=device, max_history=max_history, max_candidates=max_candidates)


def _click_errors() -> tuple[type[Exception], ...]:
    """The usage-error base classes the installed typer may raise: typer ≥0.26 raises those of its vendored click
    (``typer._click``), older typer those of upstream click; both are caught so neither upgrade shows a traceback."""
    import importlib

    found: list[type[Exception]] = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(importlib.import_module(module).ClickException)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _aborts() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = [typer.Abort]
    try:
        import click

        found.append(click.exceptions.Abort)
    except ImportError:
        pass
    return tuple(found)


def _fail(message: str) -> None:
    from delrec.errors import clip

    typer.echo(f"error: {clip(' '.join(message.split()))}", err=True)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors (exit 2) for user mistakes, tracebacks only for bugs."""
    try:
        code = app(args=argv, standalone_mode=False)
    except DelrecError as e:
        _fail(e.one_line())
    except _aborts():
        typer.echo("aborted", err=True)
        sys.exit(130)
    except _click_errors() as e:  # usage errors arrive here with standalone_mode=False
        if type(e).__name__ == "NoArgsIsHelpError":  # `delrec` / `delrec data` alone: the help, not an error
            e.show()  # type: ignore[attr-defined]
            sys.exit(getattr(e, "exit_code", 2))
        _fail(e.format_message())  # type: ignore[attr-defined]
    except OSError as e:
        # Safety net: an unreadable/odd user path (permissions, a directory given as a file, a symlink loop, a name
        # too long) is the user's to fix, not a bug; anything without a path keeps its traceback.
        if e.filename is None:
            raise
        _fail(DelrecError(e.strerror or type(e).__name__, file=e.filename).one_line())
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
