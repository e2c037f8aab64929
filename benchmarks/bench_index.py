"""Embedding index: build time, memory, query latency (p50/p99) and recall@10 against exact search.

Data: clustered unit vectors of dimension 512 (a Gaussian mixture of 1000
centres, noise chosen so that the nearest centre explains about half of the
variance), closer to real image embeddings than uniform noise, which has no
neighbourhood structure and is the worst case for every ANN index. 1000
queries are drawn from the same mixture and are not in the index. Ground
truth: exact inner-product search (FAISS flat).

Each query is searched alone (batch 1, the retrieval use case), through
:class:`promptopt.index.EmbeddingIndex`, single-threaded unless OMP_NUM_THREADS
says otherwise. Memory is the growth of the process's resident set while the
index is built (vectors included).

    OMP_NUM_THREADS=1 nice python benchmarks/bench_index.py --sizes 10000 100000 1000000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from promptopt.index import EmbeddingIndex


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def clustered(n: int, dim: int, rng: np.random.Generator, centres: np.ndarray, chunk: int = 100_000,
              noise: float = 1.0) -> np.ndarray:
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        c = centres[rng.integers(0, len(centres), size=m)]
        x = c + rng.standard_normal((m, dim), dtype=np.float32) * (noise / np.sqrt(dim))
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def exact_topk(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    import faiss

    flat = faiss.IndexFlatIP(base.shape[1])
    flat.add(base)
    return flat.search(queries, k)[1]


def measure(idx: EmbeddingIndex, queries: np.ndarray, truth: np.ndarray, k: int = 10) -> dict:
    lat, found = [], []
    for q in queries:
        t = time.perf_counter()
        _, ids = idx.search_vectors(q[None], k)
        lat.append(time.perf_counter() - t)
        found.append(ids[0])
    recall = float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth)]))
    lat_ms = np.array(lat) * 1e3
    return {"p50_ms": float(np.percentile(lat_ms, 50)), "p99_ms": float(np.percentile(lat_ms, 99)),
            "recall@10": recall}


def run_size(n: int, dim: int, kinds: list[str], queries_n: int, seed: int = 0, n_centres: int = 1000,
             noise: float = 1.0) -> list[dict]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_centres, dim), dtype=np.float32) / np.sqrt(dim)
    base = clustered(n, dim, rng, centres, noise=noise)
    queries = clustered(queries_n, dim, rng, centres, noise=noise)
    t = time.perf_counter()
    truth = exact_topk(base, queries, 10)
    print(f"n={n}: ground truth in {time.perf_counter() - t:.1f} s", flush=True)
    keys = [str(i) for i in range(n)]
    rows = []
    for kind in kinds:
        opts: dict = {}
        if kind == "hnsw":
            opts = {"hnsw_m": 32, "ef_construction": 64}
        if kind == "ivf":
            opts = {"nlist": int(2 ** round(np.log2(max(16, 2 * np.sqrt(n)))))}
        before = rss_bytes()
        t = time.perf_counter()
        idx = EmbeddingIndex(dim, kind=kind, **opts)
        idx.add(base, keys)
        build_s = time.perf_counter() - t
        mem = rss_bytes() - before
        sweep = {"flat": [None], "hnsw": [32, 64, 128, 256], "ivf": [8, 16, 32, 64]}[kind]
        for knob in sweep:
            if kind == "hnsw":
                idx.ef_search = knob
            if kind == "ivf":
                idx.nprobe = knob
            r = {"n": n, "dim": dim, "centres": n_centres, "noise": noise, "index": kind, **{k: v for k, v in opts.items()},
                 "knob": None if knob is None else ("efSearch" if kind == "hnsw" else "nprobe") + f"={knob}",
                 "build_s": round(build_s, 2), "memory_mib": round(mem / 2**20, 1)}
            # exact search at 1M reads 2 GB per query: time it on fewer queries
            nq = min(len(queries), 100) if kind == "flat" and n >= 500_000 else len(queries)
            r.update(queries=nq, **measure(idx, queries[:nq], truth[:nq]))
            print(json.dumps(r), flush=True)
            rows.append(r)
        del idx
    return rows


def cuda_exact(n: int, dim: int) -> dict | None:
    """Exact search on the GPU with torch (when CUDA is available): the no-index alternative."""
    import torch

    if not torch.cuda.is_available():
        return None
    base = torch.nn.functional.normalize(torch.randn(n, dim, device="cuda"), dim=1)
    q = torch.nn.functional.normalize(torch.randn(1, dim, device="cuda"), dim=1)
    lat = []
    for _ in range(200):
        torch.cuda.synchronize()
        t = time.perf_counter()
        (q @ base.T).topk(10)
        torch.cuda.synchronize()
        lat.append((time.perf_counter() - t) * 1e3)
    return {"n": n, "index": "torch exact (cuda)", "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "recall@10": 1.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--hnsw-max", type=int, default=100_000, help="largest size at which HNSW is built")
    ap.add_argument("--centres", type=int, default=1000, help="mixture components of the data")
    ap.add_argument("--noise", type=float, default=1.0, help="noise norm relative to a centre's (1: about half the variance)")
    ap.add_argument("--kinds", nargs="*", default=None, help="index types (default: flat, hnsw up to --hnsw-max, ivf from 100k)")
    ap.add_argument("--out", default="benchmarks/results/bench_index.json")
    args = ap.parse_args()
    rows = []
    for n in args.sizes:
        kinds = args.kinds or (["flat"] + (["hnsw"] if n <= args.hnsw_max else []) + (["ivf"] if n >= 100_000 else []))
        rows += run_size(n, args.dim, kinds, args.queries, n_centres=args.centres, noise=args.noise)
        g = cuda_exact(n, args.dim)
        if g:
            print(json.dumps(g), flush=True)
            rows.append(g)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
