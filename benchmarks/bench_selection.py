"""Selection that earns its keep (issue 15): holdout vs cross-validated oracle, with and without noise-aware stopping.

For every category (the 20 DAVIS 2016 objects and Weizmann horse) and split seed (0, 1, 2), with the weight-free
``features`` backend:

* forward selection (k capped at ``--cap``) under each oracle mode (``holdout``: the val split; ``cv``: pool ∪ val,
  each set scored on every image but its own prompts) and each acceptance rule of ``CONFIGS`` (``none``: any
  positive gain; ``se@z``: gain above z standard errors of the per-image paired differences; ``bootstrap@1``: lower
  end of a seeded one-sided paired-bootstrap interval above zero; patience 1, one config 2);
* baselines under the same oracle: random-k at the k forward chose (mean over ``--random-seeds`` draws), random
  search with as many oracle evaluations as forward used over sets of 1..cap prompts, best single;
  and, independent of any oracle, random sets of ``cap`` prompts (mean over the same draws);
* every set is scored once on the test split, which no oracle ever sees.

Rows are appended to ``<out>/selection_rows.jsonl`` as each (category, seed) finishes, so a killed run resumes
where it stopped; ``summarize`` (run at the end, or alone with ``--summary-only``) prints the tables and writes
``<out>/selection.json``.

``tuning`` (a second subcommand) runs context tuning with its checkpoint picked by each rule on the same
categories (split seed 0, ``TUNING_CONFIGS``) and writes ``<out>/tuning_rows.jsonl`` and ``tuning_selection.json``.

Backend options (``--max-side 128 --pixels 512``) and horse's split (pool 32, val 16, test 64) are below the
defaults so that everything fits in about an hour and a half of one CPU core.

    OMP_NUM_THREADS=1 python benchmarks/bench_selection.py select --davis ../shared/data/davis2016_val \\
        --horse ../shared/data/weizmann_horse --out benchmarks/results
    OMP_NUM_THREADS=1 python benchmarks/bench_selection.py tuning --davis ../shared/data/davis2016_val \\
        --horse ../shared/data/weizmann_horse --out benchmarks/results
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from promptopt.backends import create_backend
from promptopt.data import load_dataset
from promptopt.strategies import BestSingle, ForwardSelector, RandomK, RandomSearch
from promptopt.task import Task

MODES = ("holdout", "cv")
#: (name, rule, noise_z, patience): the greedy path does not depend on the rule (only where it stops), so every
#: config after the first costs little more than its baselines
CONFIGS = (("none", "none", 1.0, 1), ("se@0.5", "se", 0.5, 1), ("se@1", "se", 1.0, 1), ("se@2", "se", 2.0, 1),
           ("se@1,p2", "se", 1.0, 2), ("bootstrap@1", "bootstrap", 1.0, 1))

#: context tuning (default patience): the old behaviour (any gain is a new best), the se rule, and the se rule under a
#: cv oracle (its best-single start is chosen cross-validated; evaluations leave out the start and the training images)
TUNING_CONFIGS = (("holdout", "none"), ("holdout", "se"), ("cv", "se"))


def jobs(args) -> list[tuple[Any, str, dict[str, Any]]]:
    out = []
    if args.davis:
        ds = load_dataset(args.davis)
        out += [(ds, c, {"pool": 0.5, "val": 0.25}) for c in (args.categories or ds.categories)
                if not args.categories or c in ds.categories]
    if args.horse:
        ds = load_dataset(args.horse)
        out += [(ds, c, {"pool": args.horse_pool, "val": args.horse_val, "test": args.horse_test})
                for c in ds.categories if not args.categories or c in args.categories]
    return out


def backend_options(args) -> dict[str, Any]:
    return {"max_side": args.max_side, "pixels_per_prompt": args.pixels}


def done_keys(path: Path) -> set[tuple[str, int]]:
    if not path.is_file():
        return set()
    keys = set()
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            keys.add((r["category"], r["seed"]))
    return keys


def pending(args, name: str, seeds: Sequence[int]) -> tuple[Path, list[tuple[Any, str, dict[str, Any], int]]]:
    """The rows file ``name`` under --out, and the (dataset, category, split, seed) jobs it does not hold yet
    (a killed benchmark resumes where it stopped)."""
    torch.set_num_threads(1)
    path = Path(args.out) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    done = done_keys(path)
    return path, [(ds, cat, split, seed) for ds, cat, split in jobs(args) for seed in seeds if (cat, seed) not in done]


def append(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def select_one(ds, cat: str, split: dict[str, Any], seed: int, args) -> dict[str, Any]:
    task = Task.from_dataset(ds, cat, seed=seed, **split)
    backend = create_backend("features", **backend_options(args))
    t0 = time.perf_counter()
    _, test = task.oracles(backend)
    row: dict[str, Any] = {"category": cat, "seed": seed, "pool": len(task.split.pool), "val": len(task.split.val),
                           "test": len(task.split.test), "configs": {}}
    seeds = list(range(args.random_seeds))
    rnd_cap = RandomK(test, k=min(args.cap, len(task.pool)), seeds=seeds)  # oracle-free: only its draws matter
    rnd_cap.fit(task.pool)
    row["random_cap_test"] = rnd_cap.extra_scores(test)["mean"]
    for mode in MODES:
        oracle, _ = task.oracles(backend, mode=mode)
        best = BestSingle(oracle).fit(task.pool)
        row[f"best_single_{mode}"] = {"selected": best.selected_ids_, "test": test.score(best.selected_).miou}
        for name, rule, z, patience in CONFIGS:
            t = time.perf_counter()
            fwd = ForwardSelector(oracle, max_prompts=args.cap, rule=rule, noise_z=z, patience=patience).fit(task.pool)
            k = len(fwd.selected_)
            rk = RandomK(oracle, k=k, seeds=seeds).fit(task.pool)
            rs = RandomSearch(oracle, k=min(args.cap, len(task.pool)), n_trials=fwd.n_evaluations_, seed=0).fit(task.pool)
            row["configs"][f"{mode}/{name}"] = {
                "k": k, "selected": fwd.selected_ids_, "steps": len(fwd.history_), "evaluations": fwd.n_evaluations_,
                "stop_reason": fwd.stop_reason_, "val": fwd.score_, "test": test.score(fwd.selected_).miou,
                "random_k_test": rk.extra_scores(test)["mean"], "random_k_val": rk.extra_scores(oracle)["mean"],
                "random_search_test": test.score(rs.selected_).miou, "random_search_k": len(rs.selected_),
                "history": [{key: h[key] for key in ("chosen", "score", "gain", "noise", "images", "accepted")}
                            for h in fwd.history_],
                "seconds": round(time.perf_counter() - t, 2),
            }
        row[f"forwards_{mode}"] = oracle.forwards
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def select(args) -> None:
    path, todo = pending(args, "selection_rows.jsonl", args.seeds)
    for ds, cat, split, seed in todo:
        row = select_one(ds, cat, split, seed, args)
        row["options"] = {"backend": backend_options(args), "cap": args.cap, "configs": CONFIGS,
                          "random_seeds": args.random_seeds, "split": split}
        append(path, row)
        print(f"{cat} seed {seed}: " + "  ".join(
            f"{key} k={v['k']} test {v['test']:.3f} (rk {v['random_k_test']:.3f}, rs {v['random_search_test']:.3f})"
            for key, v in row["configs"].items() if key.endswith(("none", "se@1"))) + f"  [{row['seconds']:.0f} s]",
            flush=True)
    summarize(args)


def summarize(args) -> dict[str, Any]:
    out = Path(args.out)
    rows = [json.loads(x) for x in (out / "selection_rows.jsonl").read_text().splitlines() if x.strip()]
    table = []
    for mode in MODES:
        for name, *_ in CONFIGS:
            key = f"{mode}/{name}"
            cs = [r["configs"][key] for r in rows]
            f = np.array([c["test"] for c in cs])
            rk = np.array([c["random_k_test"] for c in cs])
            rs = np.array([c["random_search_test"] for c in cs])
            bs = np.array([r[f"best_single_{mode}"]["test"] for r in rows])
            cap = np.array([r["random_cap_test"] for r in rows])
            table.append({
                "config": key, "pairs": len(cs), "mean_k": float(np.mean([c["k"] for c in cs])),
                "forward_test": float(f.mean()), "random_k_test": float(rk.mean()),
                "beats_random_k": float(np.mean(f > rk)), "gain_vs_random_k": float((f - rk).mean()),
                "random_search_test": float(rs.mean()), "gain_vs_random_search": float((f - rs).mean()),
                "beats_random_search": float(np.mean(f > rs)),
                "best_single_test": float(bs.mean()), "random_cap_test": float(cap.mean()),
                "gain_vs_random_cap": float((f - cap).mean()),
                "evaluations": float(np.mean([c["evaluations"] for c in cs])),
            })
    print(f"\n{len(rows)} (category, seed) pairs\n")
    print("| oracle / rule | mean k | forward test | random-k test | forward > random-k | gain vs random-k | "
          "random search test | gain vs random search | best single test | random-cap test | evaluations |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for t in table:
        print(f"| {t['config']} | {t['mean_k']:.2f} | {t['forward_test']:.3f} | {t['random_k_test']:.3f} | "
              f"{100 * t['beats_random_k']:.0f} % | {t['gain_vs_random_k']:+.3f} | {t['random_search_test']:.3f} | "
              f"{t['gain_vs_random_search']:+.3f} | {t['best_single_test']:.3f} | {t['random_cap_test']:.3f} | "
              f"{t['evaluations']:.0f} |")
    per_category = category_table(rows, DETAIL)
    doc = {"summary": table, "per_category": per_category, "rows_file": "selection_rows.jsonl"}
    (out / "selection.json").write_text(json.dumps(doc, indent=1))
    return doc


#: configs shown per category: today's behaviour, the cv oracle alone, and the cv oracle with the se rule
DETAIL = ("holdout/none", "cv/none", "cv/se@1")


def category_table(rows: list[dict[str, Any]], configs: tuple[str, ...]) -> list[dict[str, Any]]:
    """Per category, means over its seeds: forward's k and test mIoU, and its gain over random-k and random search."""
    cats = list(dict.fromkeys(r["category"] for r in rows))
    out = []
    print("\n| category | seeds | " + " | ".join(f"{c}: k, test, vs random-k, vs random search" for c in configs) + " |")
    print("|---|---|" + "---|" * len(configs))
    for cat in cats:
        rs = [r for r in rows if r["category"] == cat]
        entry: dict[str, Any] = {"category": cat, "seeds": len(rs)}
        cells = []
        for c in configs:
            vals = {key: float(np.mean([r["configs"][c][field] for r in rs]))
                    for key, field in (("k", "k"), ("test", "test"), ("random_k", "random_k_test"),
                                       ("random_search", "random_search_test"))}
            entry[c] = vals
            cells.append(f"{vals['k']:.1f}, {vals['test']:.3f}, {vals['test'] - vals['random_k']:+.3f}, "
                         f"{vals['test'] - vals['random_search']:+.3f}")
        out.append(entry)
        print(f"| {cat} | {len(rs)} | " + " | ".join(cells) + " |")
    return out


def tuning(args) -> None:
    from promptopt.strategies.tuning import ContextTuner

    path, todo = pending(args, "tuning_rows.jsonl", args.seeds[:1])
    for ds, cat, split, seed in todo:
        task = Task.from_dataset(ds, cat, seed=seed, **split)
        backend = create_backend("features", **backend_options(args))
        _, test = task.oracles(backend)
        row: dict[str, Any] = {"category": cat, "seed": seed, "configs": {}}
        t0 = time.perf_counter()
        for mode, rule in TUNING_CONFIGS:
            oracle, _ = task.oracles(backend, mode=mode)
            tuner = ContextTuner(oracle, steps=args.steps, eval_every=args.eval_every, batch_size=4,
                                 rule=rule, noise_z=args.z).fit(task.pool)
            row["configs"][f"{mode}/{rule}"] = {
                "start_test": test.score_contexts(tuner.initial_contexts_).miou,
                "tuned_test": test.score_contexts(tuner.contexts_).miou,
                "start_val": tuner.initial_score_, "tuned_val": tuner.score_, "best_step": tuner.best_step_,
                "steps_run": tuner.steps_run_, "stop_reason": tuner.stop_reason_,
                "init": tuner.selected_ids_, "evaluations": tuner.history_,
            }
        row["seconds"] = round(time.perf_counter() - t0, 1)
        row["options"] = {"backend": backend_options(args), "steps": args.steps, "eval_every": args.eval_every,
                          "noise_z": args.z, "split": split}
        append(path, row)
        print(f"{cat}: " + "  ".join(f"{k} {v['start_test']:.3f}->{v['tuned_test']:.3f} (step {v['best_step']})"
                                     for k, v in row["configs"].items()) + f"  [{row['seconds']:.0f} s]", flush=True)
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    print("\n| oracle / rule | start test | tuned test | ends below start | mean gain |")
    print("|---|---|---|---|---|")
    summary = []
    for key in rows[0]["configs"]:
        s = np.array([r["configs"][key]["start_test"] for r in rows])
        t = np.array([r["configs"][key]["tuned_test"] for r in rows])
        summary.append({"config": key, "start_test": float(s.mean()), "tuned_test": float(t.mean()),
                        "below_start": int(np.sum(t < s)), "pairs": len(rows)})
        print(f"| {key} | {s.mean():.3f} | {t.mean():.3f} | {int(np.sum(t < s))} of {len(rows)} | {(t - s).mean():+.3f} |")
    (path.parent / "tuning_selection.json").write_text(json.dumps({"summary": summary, "rows_file": path.name}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("select", "tuning"):
        p = sub.add_parser(name)
        p.add_argument("--davis", default="../shared/data/davis2016_val")
        p.add_argument("--horse", default="../shared/data/weizmann_horse")
        p.add_argument("--categories", nargs="+", default=None)
        p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
        p.add_argument("--horse-pool", type=int, default=32)
        p.add_argument("--horse-val", type=int, default=16)
        p.add_argument("--horse-test", type=int, default=64)
        p.add_argument("--max-side", type=int, default=128)
        p.add_argument("--pixels", type=int, default=512)
        p.add_argument("--z", type=float, default=1.0)
        p.add_argument("--out", default="benchmarks/results")
        if name == "select":
            p.add_argument("--cap", type=int, default=8)
            p.add_argument("--random-seeds", type=int, default=10)
            p.add_argument("--summary-only", action="store_true")
        else:
            p.add_argument("--steps", type=int, default=12)
            p.add_argument("--eval-every", type=int, default=3)
    args = ap.parse_args()
    if args.cmd == "select":
        summarize(args) if args.summary_only else select(args)
    else:
        tuning(args)


if __name__ == "__main__":
    main()
