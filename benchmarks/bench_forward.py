"""Forward selection: cost (cached vs plain) and quality against the baselines.

speed    N = 48 candidates, V = 16 val images, up to 8 prompts (weizmann_horse):
         backend forwards ((prompt, image) pairs) and wall time of forward selection
         with the oracle's pair cache vs the plain implementation (every candidate set
         re-run through the backend), and whether both select the same prompts.
shortlist  a model-combining backend (JointFeaturesBackend: joint attention over all
         prompts' pixels, scored exactly per set; averaged per-prompt probabilities as the
         cheap proxy): exact greedy vs shortlist mode (top M re-scored exactly) — val and
         test mIoU lost, forwards saved — on the 20 DAVIS objects.
quality  every DAVIS 2016 object and weizmann_horse: test mIoU of forward selection
         vs random-k (same k, 10 seeds), best single, random search (same number of
         oracle evaluations) and worst-case greedy, through the same code path as
         `promptopt select` (run folders under --out).

    python benchmarks/bench_forward.py speed   --data ../shared/data/weizmann_horse
    python benchmarks/bench_forward.py shortlist --davis ../shared/data/davis2016_val
    python benchmarks/bench_forward.py quality --davis ../shared/data/davis2016_val --horse ../shared/data/weizmann_horse
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
from promptopt.run import run_strategy
from promptopt.strategies import ForwardSelector
from promptopt.task import Task


def speed(args) -> None:
    ds = load_dataset(args.data)
    cat = ds.categories[0]
    sp = split_samples(ds.samples(cat), pool=args.n, val=args.v, test=0, seed=0)
    out = {"n": args.n, "v": args.v, "max_prompts": args.k, "threads": torch.get_num_threads()}
    for mode in ("cached", "plain"):
        if mode == "plain" and args.skip_plain:
            continue
        oracle = ValidationOracle(create_backend("features"), sp.val, cache=(mode == "cached"))
        t = time.perf_counter()
        sel = ForwardSelector(oracle, max_prompts=args.k, patience=args.k).fit(sp.pool)
        wall = time.perf_counter() - t
        out[mode] = {"selected": sel.selected_ids_, "val_miou": sel.score_, "steps": len(sel.history_),
                     "forwards": oracle.forwards, "wall_s": wall, "chosen_per_step": [h["chosen"] for h in sel.history_]}
        print(f"{mode:6s}: {oracle.forwards} forwards, {wall:.1f} s, steps {len(sel.history_)}, "
              f"selected {sel.selected_ids_}, val mIoU {sel.score_:.4f}", flush=True)
    if "plain" in out:
        out["forward_ratio"] = out["plain"]["forwards"] / out["cached"]["forwards"]
        out["wall_ratio"] = out["plain"]["wall_s"] / out["cached"]["wall_s"]
        out["same_selection"] = out["plain"]["chosen_per_step"] == out["cached"]["chosen_per_step"]
        print(f"ratio: {out['forward_ratio']:.1f}x fewer forwards, {out['wall_ratio']:.1f}x faster, "
              f"same selection at every step: {out['same_selection']}")
    path = Path(args.out) / "forward_speed.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))


def quality(args) -> None:
    jobs = []
    if args.davis:
        ds = load_dataset(args.davis)
        jobs += [(ds, c, {"pool": 0.5, "val": 0.25}) for c in ds.categories]
    if args.horse:
        ds = load_dataset(args.horse)
        jobs += [(ds, c, {"pool": 48, "val": 16, "test": 64}) for c in ds.categories]
    rows = []
    names = ["random", "best-single", "random-search", "worst-case"]
    print("| object | k | forward | random-k (mean ± std) | best single | random search | worst-case | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for ds, cat, split in jobs:
        task = Task.from_dataset(ds, cat, seed=0, **split)
        t0 = time.perf_counter()
        res = run_strategy(task, create_backend("features"), Path(args.out) / "forward_quality" / cat, "forward",
                           {"max_prompts": args.k})
        b = res["baselines"]
        row = {"object": cat, "k": len(res["selected"]), "forward": res["test_miou"],
               **{n: b[n]["extra"]["test"].get("mean", b[n]["test_miou"]) for n in names},
               "random_std": b["random"]["extra"]["test"]["std"], "wall_s": time.perf_counter() - t0,
               "forward_val": res["val_miou"]}
        rows.append(row)
        print(f"| {cat} | {row['k']} | {row['forward']:.3f} | {row['random']:.3f} ± {row['random_std']:.3f} | "
              f"{row['best-single']:.3f} | {row['random-search']:.3f} | {row['worst-case']:.3f} | {row['wall_s']:.0f} |",
              flush=True)
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ["forward", *names]}
    print(f"| **mean** | | {mean['forward']:.3f} | {mean['random']:.3f} | {mean['best-single']:.3f} | "
          f"{mean['random-search']:.3f} | {mean['worst-case']:.3f} | |")
    path = Path(args.out) / "forward_quality.json"
    path.write_text(json.dumps({"rows": rows, "mean": mean, "max_prompts": args.k}, indent=2))


def shortlist(args) -> None:
    from promptopt.backends.testing import JointFeaturesBackend

    ds = load_dataset(args.davis)
    rows = []
    print("| object | exact val | exact test | exact forwards | "
          + " | ".join(f"M={m} val | M={m} test | M={m} forwards" for m in args.m) + " |")
    for cat in args.categories or ds.categories:
        task = Task.from_dataset(ds, cat, seed=0)
        row = {"object": cat}
        for m in [None, *args.m]:
            backend = JointFeaturesBackend()
            val_o, test_o = task.oracles(backend)
            sel = ForwardSelector(val_o, max_prompts=args.k, shortlist=m).fit(task.pool)
            row[f"M={m}" if m else "exact"] = {"selected": sel.selected_ids_, "val": sel.score_,
                                               "test": test_o.score(sel.selected_).miou, "forwards": val_o.forwards}
        rows.append(row)
        cells = [f"{row['exact']['val']:.3f} | {row['exact']['test']:.3f} | {row['exact']['forwards']}"]
        cells += [f"{row[f'M={m}']['val']:.3f} | {row[f'M={m}']['test']:.3f} | {row[f'M={m}']['forwards']}" for m in args.m]
        print(f"| {cat} | " + " | ".join(cells) + " |", flush=True)
    summary = {}
    for key in ["exact", *[f"M={m}" for m in args.m]]:
        summary[key] = {k: float(np.mean([r[key][k] for r in rows])) for k in ("val", "test", "forwards")}
        summary[key]["same_as_exact"] = int(sum(r[key]["selected"] == r["exact"]["selected"] for r in rows))
    print("| **mean** | " + " | ".join(
        f"{summary[k]['val']:.3f} | {summary[k]['test']:.3f} | {summary[k]['forwards']:.0f}"
        for k in ["exact", *[f"M={m}" for m in args.m]]) + " |")
    for k in args.m:
        print(f"M={k}: same selection as exact greedy on {summary[f'M={k}']['same_as_exact']}/{len(rows)} objects")
    path = Path(args.out) / "forward_shortlist.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rows": rows, "summary": summary, "max_prompts": args.k}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--data", default="../shared/data/weizmann_horse")
    s.add_argument("--n", type=int, default=48)
    s.add_argument("--v", type=int, default=16)
    s.add_argument("--k", type=int, default=8)
    s.add_argument("--skip-plain", action="store_true")
    s.add_argument("--out", default="benchmarks/results")
    sl = sub.add_parser("shortlist")
    sl.add_argument("--davis", default="../shared/data/davis2016_val")
    sl.add_argument("--k", type=int, default=4)
    sl.add_argument("--m", type=int, nargs="+", default=[2, 4])
    sl.add_argument("--categories", nargs="+", default=None, help="DAVIS objects (default: all)")
    sl.add_argument("--out", default="benchmarks/results")
    q = sub.add_parser("quality")
    q.add_argument("--davis", default="../shared/data/davis2016_val")
    q.add_argument("--horse", default="../shared/data/weizmann_horse")
    q.add_argument("--k", type=int, default=8)
    q.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    {"speed": speed, "shortlist": shortlist, "quality": quality}[args.cmd](args)


if __name__ == "__main__":
    main()
