"""Oracle evaluations per second of the `features` backend, cold and with cache.

One DAVIS object at its native size (854x480), prompt pool = half the frames,
val = 8 frames. "cold": a fresh oracle and backend, every prompt set of size k
drawn at random, so each new prompt costs its (prompt, image) pair statistics;
"cached": the same pool after every pair is cached, random sets of size k with
the set memo cleared before each (only merging, finalising and the metric run).

    python benchmarks/bench_oracle.py --data ../shared/data/davis2016_val --category camel
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from promptopt.backends import create_backend
from promptopt.data import load_dataset, split_samples
from promptopt.oracle import ValidationOracle


def draw(pool, k, rng):
    return [pool[i] for i in rng.choice(len(pool), size=k, replace=False)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/davis2016_val")
    ap.add_argument("--category", default="camel")
    ap.add_argument("--sets", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/oracle.json")
    args = ap.parse_args()
    ds = load_dataset(args.data, category=args.category)
    sp = split_samples(ds.samples(args.category), pool=0.5, val=8, seed=0)
    size = sp.val[0].size
    rows = []
    for k in (1, 4):
        backend = create_backend("features")
        t = time.perf_counter()
        oracle = ValidationOracle(backend, sp.val)  # prepare: features of the val images
        prep = time.perf_counter() - t
        rng = np.random.default_rng(k)
        t = time.perf_counter()
        for _ in range(args.sets):
            oracle.score(draw(sp.pool, k, rng))
        cold = time.perf_counter() - t
        oracle.score_additions([], sp.pool)  # make sure every pair is cached
        t = time.perf_counter()
        n = 0
        for _ in range(args.sets):
            oracle.clear(pairs=False)  # time the merge + metric, not a memo lookup
            oracle.score(draw(sp.pool, k, rng))
            n += 1
        warm = time.perf_counter() - t
        rows.append({"k": k, "prepare_s": prep, "cold_evals_per_s": args.sets / cold,
                     "cached_evals_per_s": n / warm, "forwards": oracle.forwards})
        print(f"k={k}: prepare {prep:.2f}s, cold {args.sets / cold:.2f} evals/s, cached {n / warm:.2f} evals/s "
              f"({len(sp.val)} val images of {size[1]}x{size[0]}, torch threads {torch.get_num_threads()})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"category": args.category, "val_images": len(sp.val), "image_size": size,
                               "rows": rows, "threads": torch.get_num_threads()}, indent=2))


if __name__ == "__main__":
    main()
