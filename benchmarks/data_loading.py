"""Load time and statistics of the data layer on real data (not a test: needs the files).

    python benchmarks/data_loading.py                       # /work/shared/data or ../shared/data
    python benchmarks/data_loading.py --data /path/to/data  # a folder with ml-100k/ (raw) and amazon-beauty/

Loads ML-100K from the raw GroupLens files and from the recbole wheel, and Amazon Beauty from the generic layout;
reports the median of ``--repeats`` wall times, process CPU/wall (≈1 on an idle core), raw and preprocessed stats,
and how many ML-100K titles differ between the two sources. Writes benchmarks/results/data_loading.json and .md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from delrec.data import DataConfig, PreprocessConfig
from delrec.data.prepare import load_raw
from delrec.data.preprocess import preprocess
from delrec.io import write_json, write_text


def timed(cfg: DataConfig, repeats: int) -> tuple[Any, dict[str, float]]:
    walls, cpus = [], []
    ds = None
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        ds = load_raw(cfg)
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return ds, {"load_s_median": round(statistics.median(walls), 3), "load_s_min": round(min(walls), 3),
                "cpu_over_wall": round(sum(cpus) / sum(walls), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    here = Path(__file__).resolve().parent
    default = next((p for p in (Path("/work/shared/data"), here.parent.parent / "shared" / "data") if p.is_dir()),
                   Path("/work/shared/data"))
    ap.add_argument("--data", type=Path, default=default)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=here / "results" / "data_loading")
    args = ap.parse_args()
    os.environ.setdefault("DELREC_OFFLINE", "1")

    pre = PreprocessConfig()
    runs = {
        "ml-100k (raw GroupLens)": DataConfig(name="ml-100k", path=str(args.data / "ml-100k"), preprocess=pre),
        "ml-100k (recbole wheel)": DataConfig(name="ml-100k", format="recbole", download=False, preprocess=pre),
        "amazon-beauty (generic)": DataConfig(name="amazon-beauty", path=str(args.data / "amazon-beauty"),
                                              preprocess=pre),
    }
    results: dict[str, Any] = {"machine": platform.processor() or platform.machine(), "repeats": args.repeats,
                               "preprocess": vars(pre), "datasets": {}}
    loaded = {}
    for label, cfg in runs.items():
        ds, t = timed(cfg, args.repeats)
        w0 = time.perf_counter()
        out = preprocess(ds, cfg.preprocess)
        t["preprocess_s"] = round(time.perf_counter() - w0, 3)
        loaded[label] = ds
        results["datasets"][label] = {"source": ds.source, **t, "raw": ds.stats(), "prepared": out.stats(),
                                      "load": ds.meta["load"], "dropped": out.meta["preprocess"]["dropped"]}
    a, b = loaded["ml-100k (raw GroupLens)"], loaded["ml-100k (recbole wheel)"]
    ta, tb = dict(zip(a.item_ids, a.titles, strict=True)), dict(zip(b.item_ids, b.titles, strict=True))
    diff = sorted((k for k in ta if ta[k] != tb.get(k)), key=int)
    results["ml100k_title_differences"] = {"count": len(diff), "items": diff[:20],
                                           "same_fingerprint": a.fingerprint() == b.fingerprint()}

    lines = [f"# Data loading ({results['machine']}, median of {args.repeats})", "",
             "| dataset | load s | cpu/wall | raw users / items / inter | prepared users / items / inter |",
             "|---|---|---|---|---|"]
    for label, r in results["datasets"].items():
        raw, prep = r["raw"], r["prepared"]
        lines.append(f"| {label} | {r['load_s_median']} | {r['cpu_over_wall']} | {raw['users']:,} / {raw['items']:,} "
                     f"/ {raw['interactions']:,} | {prep['users']:,} / {prep['items']:,} / {prep['interactions']:,} |")
    d = results["ml100k_title_differences"]
    lines += ["", f"ML-100K titles differing between raw and recbole: {d['count']} "
                  f"(same fingerprint: {d['same_fingerprint']})", ""]
    text = "\n".join(lines)
    print(text)
    write_json(args.out.with_suffix(".json"), results)
    write_text(args.out.with_suffix(".md"), text)


if __name__ == "__main__":
    main()
