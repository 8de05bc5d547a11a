"""Load test of `delrec serve`: requests/second and latency percentiles on loopback.

Starts the server in a subprocess (``delrec.serve.serve``) on a tiny random run folder (default) or a real one
(``--real RUN``), warms it up, then fires ``--requests`` POSTs with ``--concurrency`` in flight (httpx AsyncClient).
Histories are prefixes of the dataset's users' sequences (seeded). Inference is serialized by the server's lock, so
throughput is one model's; latency under load includes the queue.

    python benchmarks/serve.py                      # tiny model, /recommend, 8 concurrent, 200 requests
    python benchmarks/serve.py --endpoint explain
    python benchmarks/serve.py --real runs/ml100k --requests 40

Writes benchmarks/results/serve.json and serve.md (or ``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc); NaN elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def start_server(run_dir: Path, port: int, threads: int | None) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    code = ("import sys; from delrec.serve import serve; "
            "serve(sys.argv[1], port=int(sys.argv[2]), max_history=50, max_candidates=100, log_level='warning')")
    return subprocess.Popen([sys.executable, "-c", code, str(run_dir), str(port)], env=env)


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with status {proc.returncode}")
        try:
            r = httpx.get(f"{url}/health", timeout=2)
            if r.status_code == 200:
                return dict(r.json())
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("server did not become ready")


async def fire(url: str, endpoint: str, bodies: list[dict[str, Any]], concurrency: int
               ) -> tuple[list[float], list[float], list[int], float]:
    """→ (client latencies s, server inference s, status codes, wall s)."""
    latencies: list[float] = []
    inference: list[float] = []
    codes: list[int] = []
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            body = queue.get_nowait()
            t0 = time.perf_counter()
            r = await client.post(f"/{endpoint}", json=body)
            latencies.append(time.perf_counter() - t0)
            codes.append(r.status_code)
            if r.status_code == 200:
                inference.append(float(r.json()["seconds"]))

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return latencies, inference, codes, wall


def make_bodies(run_dir: Path, n: int, k: int, seed: int) -> list[dict[str, Any]]:
    from delrec.data import SeqDataset

    ds = SeqDataset.load(run_dir / "data")
    rng = np.random.default_rng(seed)
    bodies = []
    for r in range(n):
        seq = ds.sequences[int(rng.integers(ds.n_users))]
        length = int(rng.integers(1, min(len(seq), 50) + 1))
        bodies.append({"history": [int(i) for i in seq[:length]], "k": k, "seed": r})
    return bodies


def summarize(lat: list[float], inf: list[float], codes: list[int], wall: float, cpu: float) -> dict[str, Any]:
    ok = sum(c == 200 for c in codes)
    return {"requests": len(codes), "ok": ok, "wall_s": round(wall, 3), "requests_per_s": round(ok / wall, 2),
            "latency_ms": {"p50": pct(lat, 50), "p90": pct(lat, 90), "p99": pct(lat, 99),
                           "mean": round(float(np.mean(lat)) * 1000, 2)},
            "inference_ms": {"p50": pct(inf, 50), "p99": pct(inf, 99)},
            "server_cpu_s_per_wall_s": round(cpu / wall, 2)}


def pct(xs: list[float], q: float) -> float:
    return round(float(np.percentile(xs, q)) * 1000, 2) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--real", type=Path, help="a trained run folder (default: a tiny random one)")
    ap.add_argument("--endpoint", choices=["recommend", "explain"], default="recommend")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the server (default: torch's)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds on the same warm server (median reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.real is not None:
            run_dir, model = args.real, "real"
        else:
            sys.path.insert(0, str(ROOT / "tests"))
            from tiny_run import build_tiny_run

            run_dir, model = build_tiny_run(Path(tmp)), "tiny (random 2-layer llama, d=32, 40 items)"
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(run_dir, port, args.threads)
        try:
            t_start = time.perf_counter()
            health = wait_ready(url, proc)
            startup = time.perf_counter() - t_start
            warm = make_bodies(run_dir, min(5, args.requests), args.k, args.seed + 1)
            asyncio.run(fire(url, args.endpoint, warm, 1))
            bodies = make_bodies(run_dir, args.requests, args.k, args.seed)
            repeats = []
            for _ in range(args.repeats):
                cpu0 = cpu_seconds(proc.pid)
                lat, inf, codes, wall = asyncio.run(fire(url, args.endpoint, bodies, args.concurrency))
                repeats.append(summarize(lat, inf, codes, wall, cpu_seconds(proc.pid) - cpu0))
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    # The machine may be shared: report the repeat with the median throughput, and every repeat.
    med = sorted(repeats, key=lambda r: r["requests_per_s"])[len(repeats) // 2]
    errors = sum(r["requests"] - r["ok"] for r in repeats)
    result = {
        "endpoint": f"POST /{args.endpoint}",
        "model": model,
        "backbone": health["backbone"] if args.real else "tiny",
        "dataset": health["dataset"],
        "n_items": health["n_items"],
        "history_len_in_prompt": health["history_len"],
        "candidates_per_request": health["candidates"],
        "k": args.k,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "repeats": args.repeats,
        "median_repeat": med,
        "all_repeats": repeats,
        "server_startup_s": round(startup, 2),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    from delrec.io import write_json, write_text

    write_json(args.out.with_suffix(".json"), result)
    md = "\n".join([
        f"# `delrec serve` load test ({result['endpoint']})", "",
        f"Model: {model}; {result['n_items']} items; {result['candidates_per_request']} drawn candidates per request, "
        f"k={args.k}; {args.requests} requests, {args.concurrency} in flight, loopback, {os.cpu_count()} CPUs "
        "(load generator included). Inference is serialized by the server's model lock. First row: the "
        f"median-throughput repeat of {args.repeats} timed repeats; the other rows: the rest.", "",
        "| requests/s | p50 ms | p90 ms | p99 ms | mean ms | inference p50 ms | server CPU/wall | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        *("| " + " | ".join(str(v) for v in (r["requests_per_s"], *r["latency_ms"].values(), r["inference_ms"]["p50"],
                                             r["server_cpu_s_per_wall_s"], r["requests"] - r["ok"])) + " |"
          for r in [med, *(r for r in repeats if r is not med)]), "",
        "Reproduce: `" + " ".join(["python", "benchmarks/serve.py", *sys.argv[1:]]) + "`", ""])
    write_text(args.out.with_suffix(".md"), md)
    print(md)
    if errors:
        raise SystemExit(f"{errors} requests failed")


if __name__ == "__main__":
    main()
