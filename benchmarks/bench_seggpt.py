"""Peak memory and latency of the `seggpt` backend against the number of prompts, and how well
``memory_bytes(k)`` predicts the peak.

Random-init weights cost the same memory and time as the real ones, so no
checkpoint is needed. One query with k prompts (synthetic 480x854 images, DAVIS
size), k = 1, 2, 4, 8, 16:

* on CUDA (when available): the full-size default ``SegGptConfig`` (SegGPT
  ViT-L, 448x448 per image), fp32 and bf16, ``ensemble="feature"`` vs
  ``"output"``; measured peak (``torch.cuda.max_memory_allocated``) next to the
  profiled ``memory_bytes(k)`` (profile at 1 and 2 rows, linear extrapolation);
* on CPU: the tiny test config for the same grid (latency; memory is the
  analytic estimate, there is no allocator peak to compare with), then one
  full-size k = 1 forward (latency and analytic estimate).

    OMP_NUM_THREADS=1 python benchmarks/bench_seggpt.py            # CPU part here, CUDA part where a GPU exists
    python benchmarks/bench_seggpt.py --skip-full                  # tiny config only
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from transformers import SegGptConfig, SegGptForImageSegmentation

from promptopt.backends.seggpt import SegGPTBackend, tiny_config
from promptopt.data import Sample
from promptopt.memory import cuda_peak_bytes, format_bytes

KS = (1, 2, 4, 8, 16)


def samples(n: int, size=(480, 854), seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    h, w = size
    return [Sample(f"b{i}", "bench", image=rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                   mask=(rng.random((h, w)) > 0.5).astype(np.int64)) for i in range(n)]


def timed(fn, reps: int) -> float:
    """Median wall time of ``reps`` calls after one warm-up call (seconds)."""
    fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def grid(model, device: str, dtypes, ks, reps: int, pool: list[Sample], query: Sample) -> list[dict]:
    rows = []
    for dtype in dtypes:
        for ensemble in ("feature", "output"):
            be = SegGPTBackend(model, device=device, dtype=dtype, ensemble=ensemble, batch_size=4)
            be.prepare([query, *pool])
            for k in ks:
                prompts = pool[:k]

                def run():
                    with torch.no_grad():
                        be.predict(prompts, [query], 2)

                row = {"device": device, "dtype": dtype, "ensemble": ensemble, "k": k,
                       "latency_s": timed(run, reps), "predicted_bytes": be.memory_bytes(k, query.size),
                       "memory_kind": be.memory_kind}
                if device.startswith("cuda"):
                    row["peak_bytes"] = cuda_peak_bytes(run, device)
                    row["prediction_error"] = row["predicted_bytes"] / row["peak_bytes"] - 1
                rows.append(row)
                print(json.dumps(row), flush=True)
            del be
    return rows


def _rss_bytes() -> int:
    """Current resident set size (Linux /proc), in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def table(rows: list[dict]) -> str:
    lines = ["| config | device | dtype | ensemble | k | latency | predicted peak | measured peak | error |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        err = f"{100 * r['prediction_error']:+.1f}%" if "prediction_error" in r else "-"
        lines.append(
            f"| {r.get('config', 'full')} | {r['device']} | {r['dtype']} | {r['ensemble']} | {r['k']} | "
            f"{r['latency_s'] * 1000:.1f} ms | {format_bytes(r['predicted_bytes'])} ({r['memory_kind']}) | "
            f"{format_bytes(r.get('peak_bytes', r.get('rss_growth_bytes')))}"
            f"{' (RSS growth)' if 'rss_growth_bytes' in r else ''} | {err} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-full", action="store_true", help="CPU: skip the full-size k=1 forward")
    ap.add_argument("--out", default="benchmarks/results/seggpt.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    pool, query = samples(max(KS)), samples(1, seed=1)[0]
    out: dict = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor(),
                 "rows": []}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        model = SegGptForImageSegmentation(SegGptConfig(drop_path_rate=0.0))
        out["params"] = sum(p.numel() for p in model.parameters())
        out["rows"] += grid(model, "cuda", ("float32", "bfloat16"), KS, args.reps, pool, query)
    else:
        model = SegGptForImageSegmentation(tiny_config())
        out["rows"] += [dict(r, config="tiny") for r in grid(model, "cpu", ("float32",), KS, args.reps, pool, query)]
        if not args.skip_full:
            rss0 = _rss_bytes()
            full = SegGptForImageSegmentation(SegGptConfig(drop_path_rate=0.0))
            out["params"] = sum(p.numel() for p in full.parameters())
            be = SegGPTBackend(full, device="cpu")
            be.prepare([query, pool[0]])

            def run():
                with torch.no_grad():
                    be.predict([pool[0]], [query], 2)

            walls = []
            for _ in range(2):  # the first call includes one-time costs; report the faster
                t0 = time.perf_counter()
                run()
                walls.append(time.perf_counter() - t0)
            row = {"device": "cpu", "dtype": "float32", "ensemble": "feature", "k": 1, "config": "full",
                   "latency_s": min(walls), "predicted_bytes": be.memory_bytes(1, query.size),
                   "memory_kind": be.memory_kind,
                   # process high-water RSS above the RSS before the model was built: a rough CPU check
                   "rss_growth_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0}
            print(json.dumps(row), flush=True)
            out["rows"].append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(table(out["rows"]))


if __name__ == "__main__":
    main()
