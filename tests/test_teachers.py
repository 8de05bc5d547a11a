"""Teachers (SASRec, GRU4Rec, Caser) and their trainer: learning, no leakage, save/load, resume, inference API."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from delrec.data import SeqDataset, draw_candidates, make_split
from delrec.errors import ConfigError, DataError
from delrec.metrics import ranks_from_scores
from delrec.settings import build
from delrec.teachers import (
    MODELS,
    Prefixes,
    SeqRecommender,
    TeacherConfig,
    build_teacher,
    export_topk,
    full_ranks,
    pad_histories,
    predict_topk,
    score_candidates,
    train_teacher,
)
from delrec.teachers import trainer as trainer_mod
from delrec.teachers.trainer import compute_loss

TINY = {"hidden": 32, "heads": 2, "max_len": 10, "batch_size": 64, "device": "cpu", "caser_heights": (2, 3)}


def make_dataset(sequences: list[list[int]], name: str = "synthetic") -> SeqDataset:
    """A dataset whose item ids are the given integers (as strings) and titles ``"item <id>"``."""
    rows = [(f"u{u}", str(i), t) for u, seq in enumerate(sequences) for t, i in enumerate(seq)]
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    ids = sorted({i for seq in sequences for i in seq})
    items = pd.DataFrame({"item_id": [str(i) for i in ids], "title": [f"item {i}" for i in ids]})
    return SeqDataset.from_frames(inter, items, name=name)


def successor_dataset(n_users: int = 80, n_items: int = 40, seed: int = 0) -> SeqDataset:
    """Every user walks i, i+1, i+2, … (mod n_items): the next item is fully predictable from the last one."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(n_users):
        start, length = int(rng.integers(n_items)), int(rng.integers(6, 12))
        seqs.append([(start + k) % n_items + 1 for k in range(length)])
    return make_dataset(seqs, "successor")


def cfg(model: str, **kw: object) -> TeacherConfig:
    return TeacherConfig(model=model, **{**TINY, **kw})  # type: ignore[arg-type]


# --- models learn --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["ce", "bce"])
@pytest.mark.parametrize("model", MODELS)
def test_loss_goes_down(model: str, loss: str) -> None:
    ds = successor_dataset()
    pre = Prefixes.from_sequences(ds.sequences)
    seq, tgt = pre.batch(np.arange(min(len(pre), 128)), 10)
    torch.manual_seed(0)
    net = build_teacher(cfg(model, dropout=0.0), ds.n_items)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, y = torch.from_numpy(seq), torch.from_numpy(tgt)
    losses = []
    for _ in range(40):
        loss_t = compute_loss(net, x, y, loss)
        opt.zero_grad()
        loss_t.backward()
        opt.step()
        losses.append(loss_t.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("model", MODELS)
def test_learns_successor_pattern(model: str, tmp_path: Path) -> None:
    ds = successor_dataset()
    split = make_split(ds, "loo", seed=0)
    net = train_teacher(split, cfg(model, epochs=12, patience=12, lr=1e-2, dropout=0.1), tmp_path)
    test = split.examples("test")
    cands = draw_candidates(test, ds, size=20, seed=0)
    scores = score_candidates(net, [ex.history for ex in test], cands.items)
    hr1 = float((ranks_from_scores(scores, cands.target_pos) == 1).mean())
    assert hr1 >= 0.6, f"{model}: HR@1 {hr1:.2f} (chance 0.05)"
    hist = json.loads((tmp_path / "history.json").read_text())
    assert len(hist["epochs"]) == 12 and hist["best_valid_ndcg10"] > 0.5


def test_sasrec_last_block_shortcut_equals_full_attention() -> None:
    from delrec.teachers.base import right_align

    torch.manual_seed(0)
    net = build_teacher(cfg("sasrec"), 50).eval()
    x = torch.from_numpy(pad_histories([np.arange(1, 13), np.array([5, 6, 7]), np.array([9])], 10))
    seq, lengths = right_align(x)
    h = net.ln(net.item_emb(seq) + net.pos_emb.weight[: seq.shape[1]])
    with torch.no_grad():
        for block in net.blocks:
            h = block(h)  # every position, no shortcut
        assert torch.allclose(h[torch.arange(3), lengths - 1], net(x), atol=1e-5)


def test_caser_matmuls_equal_conv2d() -> None:
    torch.manual_seed(0)
    net = build_teacher(cfg("caser", dropout=0.0), 50).eval()
    x = torch.from_numpy(pad_histories([np.arange(1, 13), np.array([5, 6, 7])], 10))
    E = net.item_emb(x).unsqueeze(1)  # [B, 1, L, d]
    d = E.shape[-1]
    with torch.no_grad():
        parts = []
        for i, (h, lin) in enumerate(zip(net.heights, net.conv_h, strict=True)):
            w = lin.weight.view(h, -1, d).permute(1, 0, 2).unsqueeze(1)  # Conv2d weight [n_h, 1, h, d]
            parts.append(torch.relu(torch.nn.functional.conv2d(E, w, net.bias_h[i])).squeeze(3).amax(2))
        parts.append(torch.nn.functional.conv2d(E, net.conv_v[:, None, :, None], net.bias_v[:, 0]).flatten(1))
        assert torch.allclose(torch.relu(net.fc(torch.cat(parts, 1))), net(x), atol=1e-6)


# --- no leakage ----------------------------------------------------------------------------------------------------
def _record_training(monkeypatch: pytest.MonkeyPatch) -> list[tuple[np.ndarray, np.ndarray]]:
    """Capture every (input batch, label batch) the trainer feeds to the loss."""
    seen: list[tuple[np.ndarray, np.ndarray]] = []
    real = trainer_mod.compute_loss

    def spy(model: SeqRecommender, item_seq: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
        seen.append((item_seq.cpu().numpy().copy(), target.cpu().numpy().copy()))
        return real(model, item_seq, target, loss)

    monkeypatch.setattr(trainer_mod, "compute_loss", spy)
    return seen


@pytest.mark.parametrize("kind", ["user", "loo"])
def test_no_valid_or_test_target_reaches_training(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every user owns distinct items, so an item id names its user and its position: any leak is visible.
    rng = np.random.default_rng(1)
    seqs, nxt = [], 1
    for _ in range(30):
        n = int(rng.integers(4, 9))
        seqs.append(list(range(nxt, nxt + n)))
        nxt += n
    ds = make_dataset(seqs)
    split = make_split(ds, kind, seed=3)
    seen = _record_training(monkeypatch)
    train_teacher(split, cfg("sasrec", epochs=2, batch_size=16), tmp_path)

    inputs = np.concatenate([s.ravel() for s, _ in seen])
    labels = np.concatenate([t for _, t in seen])
    used = set(inputs[inputs > 0].tolist()) | set(labels.tolist())
    if kind == "user":
        allowed = {int(i) for u in split.train_users for i in ds.sequences[u]}
        held_out_users = np.concatenate([split.valid_users, split.test_users])
        forbidden = {int(i) for u in held_out_users for i in ds.sequences[u]}
        assert len(held_out_users) > 0
    else:
        allowed = {int(i) for s in ds.sequences for i in s[:-2]}
        forbidden = {int(i) for s in ds.sequences for i in s[-2:]}  # every valid and test target
    assert forbidden and not (used & forbidden)
    assert used == allowed  # the instrument saw everything the split allows (so the check above has teeth)
    # Each epoch trains on exactly the prefixes of the training sequences, each once.
    expected = sum(len(s) - 1 for s in split.train_sequences)
    assert len(labels) == 2 * expected


def test_prefixes_match_a_plain_loop() -> None:
    seqs = [np.array([3, 1, 4, 1, 5]), np.array([9]), np.array([2, 6]), np.array([], dtype=np.int64)]
    pre = Prefixes.from_sequences(seqs)
    hist, tgt = pre.batch(np.arange(len(pre)), 3)
    want = [(s[max(0, e - 3):e], s[e]) for s in seqs for e in range(1, len(s))]
    assert len(pre) == len(want)
    for row, t, (h, wt) in zip(hist, tgt, want, strict=True):
        assert t == wt and row[3 - len(h):].tolist() == h.tolist() and not row[: 3 - len(h)].any()


# --- persistence and resume ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", MODELS)
def test_save_load_round_trip(model: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = build_teacher(cfg(model), 50).eval()
    x = torch.from_numpy(pad_histories([np.array([1, 2, 3]), np.arange(1, 30), np.array([7])], 10))
    net.save_pretrained(tmp_path / "t")
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["config.json", "model.safetensors"]
    back = SeqRecommender.from_pretrained(tmp_path / "t")
    assert type(back) is type(net) and back.n_items == 50 and back.cfg == net.cfg
    with torch.no_grad():
        assert torch.equal(net.logits(x), back.logits(x))


def test_from_pretrained_rejects_a_non_teacher_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a saved teacher"):
        SeqRecommender.from_pretrained(tmp_path)


@pytest.mark.parametrize("model", ["sasrec", "caser"])
def test_resume_after_interruption_is_exact(model: str, tmp_path: Path) -> None:
    torch.use_deterministic_algorithms(True)
    try:
        ds = successor_dataset(n_users=40)
        split = make_split(ds, "loo", seed=0)
        train_teacher(split, cfg(model, epochs=2, patience=10), tmp_path / "a")  # "killed" after epoch 2
        resumed = train_teacher(split, cfg(model, epochs=4, patience=10), tmp_path / "a", resume=True)
        straight = train_teacher(split, cfg(model, epochs=4, patience=10), tmp_path / "b")
    finally:
        torch.use_deterministic_algorithms(False)
    last_a = load_file(str(tmp_path / "a" / "checkpoint" / "model.safetensors"))
    last_b = load_file(str(tmp_path / "b" / "checkpoint" / "model.safetensors"))
    assert last_a.keys() == last_b.keys()
    assert all(torch.equal(last_a[k], last_b[k]) for k in last_a)
    sa, sb = resumed.state_dict(), straight.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ha = json.loads((tmp_path / "a" / "history.json").read_text())["epochs"]
    hb = json.loads((tmp_path / "b" / "history.json").read_text())["epochs"]
    assert [e["loss"] for e in ha] == [e["loss"] for e in hb] and len(ha) == 4


def test_resume_refuses_a_checkpoint_from_other_settings(tmp_path: Path) -> None:
    split = make_split(successor_dataset(n_users=20), "loo", seed=0)
    train_teacher(split, cfg("gru4rec", epochs=1), tmp_path)
    with pytest.raises(ConfigError, match="different setting") as e:
        train_teacher(split, cfg("gru4rec", epochs=2, hidden=16), tmp_path)
    assert e.value.field == "teacher.hidden"
    train_teacher(split, cfg("gru4rec", epochs=1, hidden=16), tmp_path, resume=False)  # explicit restart is fine


# --- inference API -------------------------------------------------------------------------------------------------
def test_predict_topk_keeps_row_order_and_excludes_history() -> None:
    torch.manual_seed(0)
    net = build_teacher(cfg("sasrec"), 60).eval()
    rng = np.random.default_rng(0)
    hists = [rng.choice(np.arange(1, 61), size=int(rng.integers(1, 25)), replace=False) for _ in range(23)]
    batched = predict_topk(net, hists, k=8, batch_size=5)
    one_by_one = np.stack([predict_topk(net, [h], k=8)[0] for h in hists])
    reversed_rows = predict_topk(net, hists[::-1], k=8, batch_size=7)[::-1]
    assert batched.shape == (23, 8)
    assert np.array_equal(batched, one_by_one) and np.array_equal(batched, reversed_rows)
    assert not any(set(row) & set(h.tolist()) for row, h in zip(batched, hists, strict=True))
    assert (batched > 0).all()
    # Without exclusion the history may come back, and the order is the model's own ranking.
    raw = predict_topk(net, hists, k=8, exclude_history=False)
    with torch.no_grad():
        logits = net.logits(torch.from_numpy(pad_histories(hists, 10)))
    assert np.array_equal(raw, logits.topk(8, dim=1).indices.numpy())
    with pytest.raises(ConfigError):
        predict_topk(net, hists, k=0)


def test_predict_rollout_is_the_greedy_continuation_without_repeats() -> None:
    from delrec.teachers import predict_rollout

    torch.manual_seed(0)
    net = build_teacher(cfg("sasrec"), 60).eval()
    rng = np.random.default_rng(1)
    hists = [rng.choice(np.arange(1, 61), size=int(rng.integers(1, 25)), replace=False) for _ in range(9)]
    roll = predict_rollout(net, hists, steps=6, batch_size=4)
    assert roll.shape == (9, 6)
    assert np.array_equal(roll[:, 0], predict_topk(net, hists, k=1)[:, 0])
    for h, r in zip(hists, roll, strict=True):
        assert len(set(r.tolist())) == 6 and not set(r.tolist()) & set(h.tolist())
        # step j is the top-1 for the history extended by steps < j
        assert predict_topk(net, [np.concatenate([h, r[:3]])], k=1)[0, 0] == r[3]
    with pytest.raises(ConfigError):
        predict_rollout(net, hists, steps=0)


def test_score_candidates_and_full_ranks_agree_with_logits() -> None:
    torch.manual_seed(1)
    net = build_teacher(cfg("gru4rec"), 30).eval()
    ds = make_dataset([[(u * 3 + k) % 30 + 1 for k in range(6)] for u in range(12)])
    examples = make_split(ds, "loo").examples("test")
    hists = [ex.history for ex in examples]
    with torch.no_grad():
        logits = net.logits(torch.from_numpy(pad_histories(hists, 10))).numpy()
    cands = np.array([[ex.target, 1, 2, 3] for ex in examples])
    assert np.allclose(score_candidates(net, hists, cands, batch_size=5), np.take_along_axis(logits, cands, 1))
    want = np.array([(logits[i, 1:] >= logits[i, ex.target]).sum() for i, ex in enumerate(examples)])
    assert np.array_equal(full_ranks(net, examples, batch_size=5), want)
    assert np.isneginf(logits[:, 0]).all()  # padding is never recommended
    with pytest.raises(DataError):
        score_candidates(net, hists, np.zeros((len(hists), 3), dtype=np.int64))


def test_export_topk_writes_titles(tmp_path: Path) -> None:
    ds = make_dataset([[1, 2, 3], [4, 5, 6]])
    topk = np.array([[4, 5], [1, 2]])
    path = export_topk(tmp_path / "top.parquet", ds, [1, 0], topk)
    df = pd.read_parquet(path)
    assert df["user"].tolist() == [1, 0] and df["user_id"].tolist() == ["u1", "u0"]
    assert [list(r) for r in df["items"]] == [[4, 5], [1, 2]]
    assert [list(r) for r in df["titles"]] == [[ds.titles[4], ds.titles[5]], [ds.titles[1], ds.titles[2]]]
    assert not list(tmp_path.glob(".*.tmp"))


# --- configuration -------------------------------------------------------------------------------------------------
def test_unknown_model_and_bad_values_raise_config_errors() -> None:
    with pytest.raises(ConfigError) as e:
        build_teacher(TeacherConfig(model="bert4rec"), 10)
    assert e.value.field == "teacher.model" and "sasrec" in e.value.message
    for bad, name in [({"heads": 3}, "heads"), ({"dropout": 1.0}, "dropout"), ({"loss": "bpr"}, "loss"),
                      ({"max_len": 0}, "max_len"), ({"model": "caser", "caser_heights": (60,)}, "caser_heights")]:
        with pytest.raises(ConfigError) as e:
            TeacherConfig(**bad).resolved()  # type: ignore[arg-type]
        assert e.value.field == f"teacher.{name}"


def test_config_from_yaml_dict() -> None:
    got = build(TeacherConfig, {"model": "caser", "caser_heights": [2, 3], "epochs": 3}, prefix="teacher")
    assert got.caser_heights == (2, 3) and got.resolved().dropout == 0.4
    with pytest.raises(ConfigError) as e:
        build(TeacherConfig, {"model": "rnn"}, prefix="teacher", file="x.yaml", lines={"teacher.model": 7})
    assert e.value.field == "teacher.model" and e.value.line == 7
