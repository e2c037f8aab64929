"""Retrieval vs random-k (and optionally forward selection) at the same k, weight-free encoder and backend.

For each category: the usual split (seed 0: pool 50 %, val 25 %, test the
rest), a flat index of the category built with the ``features`` encoder,
then test mIoU of

* retrieval: every test image gets its k most similar pool examples (``diversity`` 0 and 0.5);
* random-k: k pool examples drawn at random, the same for every image (mean over seeds);
* forward (``--forward``): greedy selection on val, at most k prompts.

    OMP_NUM_THREADS=1 nice python benchmarks/bench_retrieval.py --data ../shared/data/davis2016_val --k 4 --forward
    OMP_NUM_THREADS=1 nice python benchmarks/bench_retrieval.py --data ../shared/data/weizmann_horse --k 4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from promptopt.backends import create_backend
from promptopt.data import load_dataset
from promptopt.embeddings import create_encoder
from promptopt.index import build_index
from promptopt.strategies import ForwardSelector, RandomK
from promptopt.strategies.retrieval import RetrievalSelector
from promptopt.task import Task


def run_category(ds, cat: str, k: int, seeds: int, forward: bool, max_side: int) -> dict:
    t0 = time.perf_counter()
    task = Task.from_dataset(ds, cat, seed=0)
    backend = create_backend("features", options={"max_side": max_side})
    val, test = task.oracles(backend)
    enc = create_encoder("features")
    idx = build_index(ds.samples(cat), enc)
    row: dict = {"category": cat, "pool": len(task.pool), "val": len(task.split.val), "test": len(task.split.test), "k": k}
    for div in (0.0, 0.5):
        sel = RetrievalSelector(val, index=idx, k=k, diversity=div, encoder=enc).fit(task.pool)
        row[f"retrieval_d{div:g}_val"] = sel.score_
        row[f"retrieval_d{div:g}_test"] = sel.evaluate(test).miou
    rnd = RandomK(val, k=k, seeds=seeds).fit(task.pool)
    on_test = rnd.extra_scores(test)
    row["random_val"], row["random_test"], row["random_test_std"] = rnd.extra_scores(val)["mean"], on_test["mean"], on_test["std"]
    if forward:
        fw = ForwardSelector(val, max_prompts=k).fit(task.pool)
        row["forward_val"], row["forward_test"], row["forward_k"] = fw.score_, test.score(fw.selected_).miou, len(fw.selected_)
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--category", nargs="*")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--max-side", type=int, default=192)
    ap.add_argument("--forward", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    ds = load_dataset(args.data, category=args.category or None)
    rows = []
    for cat in ds.categories:
        r = run_category(ds, cat, args.k, args.seeds, args.forward, args.max_side)
        print(json.dumps(r), flush=True)
        rows.append(r)
    cols = ["retrieval_d0_test", "retrieval_d0.5_test", "random_test"] + (["forward_test"] if args.forward else [])
    print("\n| category | " + " | ".join(c.replace("_test", "") for c in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for r in rows:
        print(f"| {r['category']} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
    if len(rows) > 1:
        print("| **mean** | " + " | ".join(f"{np.mean([r[c] for r in rows]):.3f}" for c in cols) + " |")
    out = Path(args.out or f"benchmarks/results/bench_retrieval_{Path(args.data).name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
