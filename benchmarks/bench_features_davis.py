"""Quality of the weight-free `features` backend on every DAVIS 2016 object.

Protocol (issue: foundation): per object, half of the frames (split seed 0) are the
prompt pool, the rest the test set. Reported per object, as dataset-level
foreground IoU on the test frames:
  * random 1-shot: mean over every pool frame used alone as the prompt
    (the expectation of a random single prompt), with best and worst single;
  * random 4-shot: mean and std over 10 random 4-frame prompt sets.

    python benchmarks/bench_features_davis.py --data ../shared/data/davis2016_val
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from promptopt.backends import create_backend
from promptopt.data import load_dataset, split_samples
from promptopt.oracle import ValidationOracle


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/davis2016_val")
    ap.add_argument("--draws", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results/features_davis.json")
    args = ap.parse_args()
    ds = load_dataset(args.data)
    backend = create_backend("features")
    rows, t0 = [], time.perf_counter()
    for cat in ds.categories:
        sp = split_samples(ds.samples(cat), pool=0.5, val=0, seed=0)
        oracle = ValidationOracle(backend, sp.test)
        singles = [r.miou for r in oracle.score_additions([], sp.pool)]
        four = []
        for seed in range(args.draws):
            idx = np.random.default_rng(seed).choice(len(sp.pool), size=min(4, len(sp.pool)), replace=False)
            four.append(oracle.score([sp.pool[i] for i in idx]).miou)
        rows.append({"object": cat, "pool": len(sp.pool), "test": len(sp.test),
                     "random_1shot": float(np.mean(singles)), "best_single": float(np.max(singles)),
                     "worst_single": float(np.min(singles)), "random_4shot": float(np.mean(four)),
                     "random_4shot_std": float(np.std(four))})
        r = rows[-1]
        print(f"| {cat} | {r['pool']} | {r['test']} | {r['random_1shot']:.3f} | {r['best_single']:.3f} | "
              f"{r['worst_single']:.3f} | {r['random_4shot']:.3f} ± {r['random_4shot_std']:.3f} |", flush=True)
        backend.clear_cache()
    keys = ["random_1shot", "best_single", "worst_single", "random_4shot"]
    mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    print(f"| **mean** | | | {mean['random_1shot']:.3f} | {mean['best_single']:.3f} | {mean['worst_single']:.3f} | "
          f"{mean['random_4shot']:.3f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "mean": mean, "backend": backend.config(),
                               "wall_s": time.perf_counter() - t0, "machine": platform.processor() or platform.machine(),
                               "threads": torch.get_num_threads()}, indent=2))


if __name__ == "__main__":
    main()
