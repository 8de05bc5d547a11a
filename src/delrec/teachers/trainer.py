"""Training and inference for the teachers: one trainer for all models (RecBole-style).

Training examples are every prefix of `Split.train_sequences` (history → next item). Those sequences never hold a
validation or test target, so neither does any example: under the user split only training users appear, under
leave-one-out every user appears without their last two items. Validation ranks each target among all items
without masking the user's history, like RecBole's sequential models, so our numbers line up with RecBole's.

Resuming is exact: each epoch reseeds numpy (shuffling) and torch (dropout, negatives) from ``(seed, epoch)``, and
the checkpoint holds the model, Adam's state and the early-stopping counters. So "2 epochs, then resume to 4" gives
the same weights as "4 epochs" on the same device.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from delrec.data.dataset import SeqDataset
from delrec.data.splits import Example, Split
from delrec.errors import ConfigError, DataError
from delrec.io import atomic_dir, atomic_path, write_json
from delrec.teachers.base import SeqRecommender, TeacherConfig, build_teacher, resolve_device

MEGA_BATCH = 32  # length bucketing: sort this many batches' worth of examples by length, then shuffle batches


# --- training examples ---------------------------------------------------------------------------------------------
@dataclass
class Prefixes:
    """All (history → next item) examples of some sequences, as indices into one flat array (no copies).

    Example ``i`` predicts ``flat[ends[i]]`` from ``flat[starts[i]:ends[i]]``; ``users[i]`` is the row of the
    sequence it came from (an index into the list given to `from_sequences`).
    """

    flat: np.ndarray  # [T] all items of all sequences, concatenated
    starts: np.ndarray  # [N] where the example's sequence begins in `flat`
    ends: np.ndarray  # [N] position of the target in `flat`
    users: np.ndarray  # [N] which sequence

    @classmethod
    def from_sequences(cls, sequences: Sequence[np.ndarray]) -> Prefixes:
        lens = np.array([len(s) for s in sequences], dtype=np.int64)
        flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences]) if len(sequences) else \
            np.zeros(0, dtype=np.int64)
        seq_start = np.cumsum(lens) - lens  # [S]
        n_ex = np.maximum(lens - 1, 0)  # a sequence of n items gives n - 1 examples (targets at positions 1..n-1)
        users = np.repeat(np.arange(len(lens)), n_ex)  # [N]
        starts = seq_start[users]
        offset = np.arange(len(users)) - np.repeat(np.cumsum(n_ex) - n_ex, n_ex)  # 0..n-2 within each sequence
        return cls(flat, starts, starts + 1 + offset, users)

    def __len__(self) -> int:
        return len(self.ends)

    def lengths(self, max_len: int) -> np.ndarray:
        return np.minimum(self.ends - self.starts, max_len)

    def batch(self, rows: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(left-padded histories ``[b, max_len]``, targets ``[b]``) for example indices ``rows``."""
        return windows(self.flat, self.starts[rows], self.ends[rows], max_len), self.flat[self.ends[rows]]


def windows(flat: np.ndarray, starts: np.ndarray, ends: np.ndarray, max_len: int) -> np.ndarray:
    """``[b, max_len]``: row ``i`` is ``flat[starts[i]:ends[i]]``'s last ``max_len`` items, left-padded with 0."""
    idx = ends[:, None] - max_len + np.arange(max_len)[None, :]  # [b, L]
    return np.where(idx >= starts[:, None], flat[np.maximum(idx, 0)], 0) if len(flat) else \
        np.zeros((len(ends), max_len), dtype=np.int64)


def pad_histories(histories: Sequence[np.ndarray], max_len: int | None = None) -> np.ndarray:
    """Left-pad (and, with ``max_len``, truncate to the most recent items) a list of histories → ``[N, L]``."""
    lens = np.array([len(h) for h in histories], dtype=np.int64)
    L = int(lens.max(initial=1)) if max_len is None else max_len
    flat = np.concatenate([np.asarray(h, dtype=np.int64) for h in histories]) if len(histories) else \
        np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lens)
    return windows(flat, ends - lens, ends, max(L, 1))


def epoch_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, bucket: bool) -> list[np.ndarray]:
    """Shuffled batches of example indices; with ``bucket``, examples of similar length share a batch.

    Bucketing sorts each mega-batch of ``MEGA_BATCH`` shuffled batches by history length, so a batch can be trimmed
    to its own longest history instead of ``max_len`` (Beauty's histories are ~9 items; ML-100K's mostly 50).
    """
    perm = rng.permutation(len(lengths))
    if bucket:
        mega = batch_size * MEGA_BATCH
        perm = np.concatenate([c[np.argsort(lengths[c], kind="stable")] for c in np.split(
            perm, np.arange(mega, len(perm), mega))]) if len(perm) else perm
    batches = np.split(perm, np.arange(batch_size, len(perm), batch_size))
    order = rng.permutation(len(batches)) if bucket else np.arange(len(batches))
    return [batches[i] for i in order]


def to_device(seq: np.ndarray, device: torch.device, trim: bool) -> torch.Tensor:
    """numpy ``[b, L]`` → tensor, dropping all-padding leading columns when the model allows it."""
    if trim and seq.size:
        keep = int((seq != 0).sum(axis=1).max(initial=1))
        seq = seq[:, seq.shape[1] - max(keep, 1):]
    return torch.from_numpy(np.ascontiguousarray(seq)).to(device)


# --- loss ----------------------------------------------------------------------------------------------------------
def compute_loss(model: SeqRecommender, item_seq: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """Mean loss of one batch: ``ce`` = softmax over all items; ``bce`` = target vs one uniform negative ≠ target."""
    if loss == "ce":
        return F.cross_entropy(model.logits(item_seq), target)  # logits [B, n_items + 1]
    h = model(item_seq)  # [B, d]
    n = model.n_items
    neg = (target - 1 + torch.randint(1, max(n, 2), target.shape, device=target.device)) % n + 1  # [B], ≠ target
    pos_s = (h * model.item_emb(target)).sum(-1)  # [B]
    neg_s = (h * model.item_emb(neg)).sum(-1)  # [B]
    return F.softplus(-pos_s).mean() + F.softplus(neg_s).mean()  # -log σ(pos) - log(1 - σ(neg))


# --- inference -----------------------------------------------------------------------------------------------------
def _batched_logits(model: SeqRecommender, histories: Sequence[np.ndarray],
                    batch_size: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield (row slice, logits ``[b, n_items + 1]``) in input order; model in eval mode, no grad."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for lo in range(0, len(histories), batch_size):
                hi = min(lo + batch_size, len(histories))
                seq = pad_histories(histories[lo:hi], model.cfg.max_len)
                yield slice(lo, hi), model.logits(to_device(seq, device, not model.fixed_len))
    finally:
        model.train(was_training)


def _mask_history(logits: torch.Tensor, histories: Sequence[np.ndarray]) -> torch.Tensor:
    """``logits`` with every item of each row's history at -inf (padding 0 is -inf already)."""
    seen = torch.from_numpy(pad_histories(histories)).to(logits.device)  # [b, longest], 0 = pad
    return logits.scatter(1, seen, float("-inf"))


def predict_topk(model: SeqRecommender, histories: Sequence[np.ndarray], k: int = 10, exclude_history: bool = True,
                 batch_size: int = 1024) -> np.ndarray:
    """``[N, k]`` item indices, best first, row ``i`` for ``histories[i]`` (no reordering).

    ``exclude_history``: never recommend an item the history already holds (the whole history, not only the last
    ``max_len`` items the model reads).
    """
    if not 1 <= k <= model.n_items:
        raise ConfigError(f"k must be between 1 and the number of items ({model.n_items}), got {k}", field="k")
    out = np.zeros((len(histories), k), dtype=np.int64)
    for rows, logits in _batched_logits(model, histories, batch_size):
        if exclude_history:
            logits = _mask_history(logits, histories[rows])
        out[rows] = logits.topk(k, dim=1).indices.cpu().numpy()
    return out


def predict_proba(model: SeqRecommender, histories: Sequence[np.ndarray], temperature: float = 1.0,
                  exclude_history: bool = True, batch_size: int = 1024) -> np.ndarray:
    """``[N, n_items + 1]`` the teacher's next-item distribution for each history (softmax of logits/temperature;
    column 0, padding, and with ``exclude_history`` the history's items get 0). Stage 2's distillation target."""
    if not temperature > 0:
        raise ConfigError(f"temperature must be positive, got {temperature}", field="finetune.distill_temperature")
    out = np.zeros((len(histories), model.n_items + 1), dtype=np.float32)
    for rows, logits in _batched_logits(model, histories, batch_size):
        logits = logits.float() / temperature  # column 0 (padding) is already -inf
        if exclude_history:
            logits = _mask_history(logits, histories[rows])
        out[rows] = torch.softmax(logits, dim=1).cpu().numpy()
    return out


def predict_rollout(model: SeqRecommender, histories: Sequence[np.ndarray], steps: int = 10,
                    batch_size: int = 1024) -> np.ndarray:
    """``[N, steps]`` greedy continuation of each history: the teacher's top-1, appended, then its top-1 for the
    longer history, and so on; never an item already in the history or picked before. Column 0 is `predict_topk`'s
    top-1. Stage 1's packed RPS task teaches the soft prompt to continue a user's list this way."""
    if steps < 1:
        raise ConfigError(f"a roll-out needs at least one step, got {steps}", field="distill.teacher_k")
    hist = [np.asarray(h, dtype=np.int64) for h in histories]
    out = np.zeros((len(hist), steps), dtype=np.int64)
    for j in range(steps):
        out[:, j] = predict_topk(model, [np.concatenate([h, out[i, :j]]) for i, h in enumerate(hist)], k=1,
                                 batch_size=batch_size)[:, 0]
    return out


def score_candidates(model: SeqRecommender, histories: Sequence[np.ndarray], candidates: np.ndarray,
                     batch_size: int = 1024) -> np.ndarray:
    """``[N, C]`` scores of ``candidates[N, C]`` (item indices) given ``histories[i]``."""
    candidates = np.asarray(candidates, dtype=np.int64)
    if candidates.ndim != 2 or len(candidates) != len(histories):
        raise DataError(f"candidates must be [N, C] with N = {len(histories)} rows, got shape {candidates.shape}",
                        field="candidates")
    if candidates.size and (candidates.min() < 1 or candidates.max() > model.n_items):
        raise DataError(f"candidate item indices must be in 1..{model.n_items}", field="candidates")
    out = np.zeros(candidates.shape, dtype=np.float32)
    for rows, logits in _batched_logits(model, histories, batch_size):
        out[rows] = logits.gather(1, torch.from_numpy(candidates[rows]).to(logits.device)).float().cpu().numpy()
    return out


def full_ranks(model: SeqRecommender, examples: Sequence[Example], batch_size: int = 1024) -> np.ndarray:
    """``[N]`` 1-based rank of each target among all items (history not masked; ties count against the target)."""
    histories = [ex.history for ex in examples]
    targets = torch.tensor([ex.target for ex in examples], dtype=torch.long)
    out = np.zeros(len(examples), dtype=np.int64)
    for rows, logits in _batched_logits(model, histories, batch_size):
        tgt = targets[rows].to(logits.device)
        t_score = logits.gather(1, tgt[:, None])  # [b, 1]
        out[rows] = (logits >= t_score).sum(dim=1).cpu().numpy()  # counts the target itself once
    return out


def export_topk(path: str | Path, dataset: SeqDataset, users: Sequence[int] | np.ndarray, topk: np.ndarray) -> Path:
    """Write ``topk[N, k]`` (row ``i`` for ``users[i]``) as Parquet: user, user_id, items, titles."""
    users = np.asarray(users, dtype=np.int64)
    if topk.ndim != 2 or len(topk) != len(users):
        raise DataError(f"topk must be [N, k] with N = {len(users)}, got shape {topk.shape}", field="topk")
    df = pd.DataFrame({
        "user": users,
        "user_id": [dataset.user_ids[u] for u in users],
        "items": list(np.asarray(topk, dtype=np.int64)),
        "titles": [[dataset.titles[i] for i in row] for row in topk],
    })
    path = Path(path)
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return path


# --- checkpoints (safetensors + JSON; no pickle) -------------------------------------------------------------------
def _save_checkpoint(ckpt: Path, model: SeqRecommender, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    opt_state = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in opt_state["state"].items():
        for key, val in pstate.items():
            if isinstance(val, torch.Tensor):
                tensors[f"{pid}.{key}"] = val.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = val
    with atomic_dir(ckpt) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(tmp / "model.safetensors"))
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        info = {**state, "optimizer": {"param_groups": opt_state["param_groups"], "scalars": scalars}}
        (tmp / "state.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def _load_checkpoint(ckpt: Path, model: SeqRecommender, opt: torch.optim.Optimizer, device: torch.device) -> dict:
    info = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    model.load_state_dict(load_file(str(ckpt / "model.safetensors"), device=str(device)), strict=True)
    flat = load_file(str(ckpt / "optimizer.safetensors"), device=str(device))
    state: dict[int, dict[str, Any]] = {}
    for name, val in flat.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = val
    for pid, extra in info["optimizer"]["scalars"].items():
        state.setdefault(int(pid), {}).update(extra)
    opt.load_state_dict({"state": state, "param_groups": info["optimizer"]["param_groups"]})
    return info


# Settings that may change between a run and its resumption without invalidating the checkpoint.
_RESUMABLE = {"epochs", "patience", "device"}


def _identity(cfg: TeacherConfig, split: Split) -> dict[str, Any]:
    return {"config": {k: v for k, v in cfg.to_dict().items() if k not in _RESUMABLE},
            "data": split.dataset.fingerprint(), "split": [split.kind, split.seed], "n_items": split.dataset.n_items}


# --- training ------------------------------------------------------------------------------------------------------
def evaluate(model: SeqRecommender, examples: Sequence[Example], batch_size: int = 1024) -> dict[str, float]:
    """Full-ranking HR@10 / NDCG@10 (history not masked, like RecBole's sequential models)."""
    ranks = full_ranks(model, examples, batch_size).astype(np.float64)
    hit = ranks <= 10
    return {"HR@10": float(hit.mean()) if len(ranks) else float("nan"),
            "NDCG@10": float(np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0).mean()) if len(ranks) else float("nan")}


def train_teacher(split: Split, cfg: TeacherConfig, out_dir: str | Path, resume: bool = True) -> SeqRecommender:
    """Train one teacher on ``split`` and return the best model (by validation NDCG@10), in eval mode.

    Writes ``out_dir/model/`` (best model, `save_pretrained`), ``out_dir/checkpoint/`` (last epoch: weights, Adam
    state, counters; replaced atomically every epoch) and ``out_dir/history.json`` (per-epoch loss, validation
    metrics, seconds). With ``resume`` an existing checkpoint is continued (also after a finished run: raising
    ``epochs`` trains further); its settings must match ``cfg`` except epochs, patience and device.
    """
    cfg = cfg.resolved()
    assert cfg.batch_size is not None and cfg.lr is not None
    out_dir = Path(out_dir)
    ckpt_dir, model_dir = out_dir / "checkpoint", out_dir / "model"
    device = resolve_device(cfg.device)

    prefixes = Prefixes.from_sequences(split.train_sequences)
    if len(prefixes) == 0:
        raise DataError("no training examples: every training sequence has fewer than 2 items", field="split")
    valid = split.examples("valid")
    lengths = prefixes.lengths(cfg.max_len)

    torch.manual_seed(cfg.seed)
    model = build_teacher(cfg, split.dataset.n_items).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    identity = _identity(cfg, split)
    state: dict[str, Any] = {"epoch": 0, "best": -1.0, "best_epoch": 0, "bad_epochs": 0,
                             "stopped": False, "history": [], **identity}
    if resume and (ckpt_dir / "state.json").is_file():
        saved = json.loads((ckpt_dir / "state.json").read_text(encoding="utf-8"))
        diff = [k for k in identity["config"] if saved.get("config", {}).get(k) != identity["config"][k]]
        if diff or any(saved.get(k) != identity[k] for k in ("data", "split", "n_items")):
            what = f"setting {diff[0]!r}" if diff else "data or split"
            raise ConfigError(f"{ckpt_dir} was made with a different {what}; use another output folder or "
                              "resume=False", field=f"teacher.{diff[0]}" if diff else "teacher")
        state = _load_checkpoint(ckpt_dir, model, opt, device)
        state.pop("optimizer", None)
        if state["stopped"] and state["bad_epochs"] < cfg.patience:
            state["stopped"] = False  # a larger patience lets a stopped run go on
    trim = not model.fixed_len
    n_batches = -(-len(prefixes) // cfg.batch_size)

    while state["epoch"] < cfg.epochs and not state["stopped"]:
        epoch = state["epoch"] + 1
        rng = np.random.default_rng([cfg.seed, epoch])
        torch.manual_seed(cfg.seed * 100_003 + epoch)
        t0, c0 = time.perf_counter(), time.process_time()
        model.train()
        total, seen = 0.0, 0
        bar = tqdm(epoch_batches(lengths, cfg.batch_size, rng, bucket=trim), total=n_batches, leave=False,
                   desc=f"{cfg.model} epoch {epoch}", disable=None, dynamic_ncols=True)
        for rows in bar:
            seq, tgt = prefixes.batch(rows, cfg.max_len)
            loss = compute_loss(model, to_device(seq, device, trim), torch.from_numpy(tgt).to(device), cfg.loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(rows)
            seen += len(rows)
            bar.set_postfix(loss=f"{total / seen:.4f}", refresh=False)
        bar.close()
        train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0
        metrics = evaluate(model, valid)
        improved = metrics["NDCG@10"] > state["best"]
        if improved:
            state.update(best=metrics["NDCG@10"], best_epoch=epoch, bad_epochs=0)
            model.save_pretrained(model_dir)
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        state["stopped"] = state["bad_epochs"] >= cfg.patience
        state["history"].append({"epoch": epoch, "loss": total / max(seen, 1), "valid": metrics,
                                 "train_seconds": round(train_s, 3),
                                 "train_cpu_seconds": round(train_cpu, 3),
                                 "seconds": round(time.perf_counter() - t0, 3), "improved": improved})
        _save_checkpoint(ckpt_dir, model, opt, state)
        write_json(out_dir / "history.json", {"config": cfg.to_dict(), "best_epoch": state["best_epoch"],
                                              "best_valid_ndcg10": state["best"], "epochs": state["history"]})
    if not (model_dir / "config.json").is_file():  # e.g. no validation examples, so NDCG was always NaN
        model.save_pretrained(model_dir)
    return SeqRecommender.from_pretrained(model_dir, device=device)

