"""The run report: one markdown table (every model on the same frozen candidates) and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: CI and servers have no display
import matplotlib.pyplot as plt

from delrec.io import atomic_path, write_text
from delrec.metrics import format_metric

METRICS = ("HR@1", "HR@5", "NDCG@5")


def metrics_plot(rows: dict[str, dict[str, Any]], dest: Path) -> Path:
    """Grouped bars of HR@1/HR@5/NDCG@5 per model with 95% CI whiskers."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / max(1, len(rows))
    for i, (name, row) in enumerate(rows.items()):
        vals = [row["metrics"][m]["value"] for m in METRICS]
        err = [[v - row["metrics"][m].get("lo", v) for m, v in zip(METRICS, vals, strict=True)],
               [row["metrics"][m].get("hi", v) - v for m, v in zip(METRICS, vals, strict=True)]]
        ax.bar([j + i * width for j in range(len(METRICS))], vals, width, yerr=err, capsize=3, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(METRICS))], METRICS)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score (95% bootstrap CI)")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return dest


def curves_plot(curves: dict[str, list[tuple[int, float]]], dest: Path, ylabel: str = "training loss") -> Path:
    """One line per named series of (step, value) points."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, pts in curves.items():
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, label=name)
    ax.set_xlabel("step / epoch")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return dest


def write_report(run_dir: Path, info: dict[str, Any], rows: dict[str, dict[str, Any]],
                 images: list[str]) -> Path:
    """``rows``: model name → {"metrics": summarize(...), "train_s": float, "infer_s": float}."""
    lines = [
        f"# DELRec run `{run_dir.name}`",
        "",
        f"- dataset: **{info.get('dataset')}** ({info.get('source', '')}); split `{info.get('split')}`; "
        f"{info.get('n_test')} test examples",
        f"- data fingerprint `{info.get('fingerprint', '')[:16]}`; test candidates `{info.get('candidates_hash')}` "
        f"({info.get('candidate_size')} per example: target + negatives outside the user's history)",
        f"- backbone `{info.get('backbone')}`, profile `{info.get('profile')}`, device `{info.get('device')}`",
        "",
        "All models are ranked on the same frozen candidate file. 95% bootstrap confidence intervals in brackets.",
        "",
        "| model | HR@1 | HR@5 | NDCG@5 | train s | infer s |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        m = row["metrics"]
        lines.append(f"| {name} | " + " | ".join(format_metric(m[k]) for k in METRICS)
                     + f" | {row.get('train_s', float('nan')):.1f} | {row.get('infer_s', float('nan')):.1f} |")
    if info.get("chance"):
        ch = info["chance"]
        lines.append(f"| chance (random order) | {ch['HR@1']:.4f} | {ch['HR@5']:.4f} | {ch['NDCG@5']:.4f} | – | – |")
    lines.append("")
    for name, row in rows.items():
        if row.get("prior_weight") is not None:
            lines += [f"{name} scores each candidate less {row['prior_weight']:g} × its score after an empty history "
                      "(`scoring.prior_weight=auto`, chosen on the validation users).", ""]
    for img in images:
        lines += [f"![{Path(img).stem}]({img})", ""]
    if info.get("notes"):
        lines += ["## Notes", "", *[f"- {n}" for n in info["notes"]], ""]
    dest = run_dir / "report.md"
    write_text(dest, "\n".join(lines))
    return dest
