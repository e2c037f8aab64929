"""Context tuning (issue 7): does learning the prompt tensor beat the chosen examples, and what does a step cost?

CPU part (always): the weight-free `features` backend, per object of a dataset
(DAVIS 2016 val: all 20 objects; Weizmann horse). Split seed 0: half the frames
are the prompt pool (the training images of the tuning loss, minus the starting
example), ``--val`` frames the validation set (early stopping, kept tensor), the
rest the test set. The start is the best single pool example (chosen on val by
the oracle, i.e. a selection strategy's answer); tuning runs ``--steps`` Adam steps
on image and mask. Reported per object: test mIoU of that example as a plain
prompt, of the start context (the same example as tensors) and of the tuned
context, and seconds per tuning step.

CUDA part (only when CUDA and promptopt.backends.seggpt are available):
full-size SegGPT with random weights (transformers' default SegGptConfig, saved
and loaded through the backend's from_pretrained), time and peak memory of one
tuning step with and without activation checkpointing, fp32 and bf16.

    OMP_NUM_THREADS=1 python benchmarks/bench_tuning.py --data ../shared/data/davis2016_val
    OMP_NUM_THREADS=1 python benchmarks/bench_tuning.py --data ../shared/data/weizmann_horse --val 20 --out benchmarks/results/tuning_horse.json
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from promptopt.backends import create_backend
from promptopt.data import load_dataset
from promptopt.strategies import BestSingle
from promptopt.strategies.tuning import ContextTuner
from promptopt.task import Task


def cpu_part(args) -> dict:
    ds = load_dataset(args.data)
    cats = ds.categories[: args.max_objects] if args.max_objects else ds.categories
    opts = json.loads(args.backend_options)
    rows = []
    for cat in cats:
        t0 = time.perf_counter()
        task = Task.from_dataset(ds, cat, pool=0.5, val=float(args.val) if "." in args.val else int(args.val), seed=0)
        backend = create_backend("features", **opts)
        val_o, test_o = task.oracles(backend)
        init = BestSingle(val_o).fit(task.pool).selected_
        tuner = ContextTuner(val_o, init=init, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                             warmup=max(1, args.steps // 10), eval_every=args.eval_every, patience=None,
                             context_side=args.context_side).fit(task.pool)
        row = {
            "object": cat, "pool": len(task.pool), "val": len(task.split.val), "test": len(task.split.test),
            "init": init[0].id,
            "test_examples": test_o.score(init).miou,
            "test_start": tuner.extra_scores(test_o)["start"],
            "test_tuned": tuner.evaluate(test_o).miou,
            "val_start": tuner.initial_score_, "val_tuned": tuner.score_, "best_step": tuner.best_step_,
            "s_per_step": tuner.seconds_per_step_, "wall_s": time.perf_counter() - t0,
        }
        rows.append(row)
        print(f"{cat:20s} init {row['init']}  test: examples {row['test_examples']:.3f}  start {row['test_start']:.3f}"
              f"  tuned {row['test_tuned']:.3f}  (val {row['val_start']:.3f} -> {row['val_tuned']:.3f}, best step "
              f"{row['best_step']})  {row['s_per_step']:.2f} s/step  {row['wall_s']:.0f} s", flush=True)
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("test_examples", "test_start", "test_tuned",
                                                             "val_start", "val_tuned", "s_per_step")}
    mean["tuned_better_than_examples"] = int(sum(r["test_tuned"] > r["test_examples"] for r in rows))
    print("mean", json.dumps(mean))
    return {"rows": rows, "mean": mean}


def cuda_part(args) -> dict | None:
    if not torch.cuda.is_available():
        print("CUDA part skipped: no CUDA device")
        return None
    try:
        import promptopt.backends.seggpt  # noqa: F401
    except ImportError:
        print("CUDA part skipped: promptopt.backends.seggpt is not available")
        return None
    from transformers import SegGptConfig, SegGptForImageSegmentation

    from promptopt.data import bundled_sample_root

    task = Task.from_folder(bundled_sample_root(), category="dog", seed=0)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        SegGptForImageSegmentation(SegGptConfig()).save_pretrained(tmp)
        for dtype in ("float32", "bfloat16"):
            for ckpt in (False, True):
                opts = {**json.loads(args.seggpt_options), "device": "cuda", "dtype": dtype,
                        "checkpointing": ckpt}
                backend = create_backend("seggpt", tmp, opts)
                from promptopt.oracle import ValidationOracle

                tuner = ContextTuner(ValidationOracle(backend, task.split.val[:1], task.num_classes),
                                     init=task.pool[:1], steps=args.cuda_steps, batch_size=args.batch_size,
                                     warmup=1, eval_every=10**9, patience=None)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                tuner.fit(task.pool)
                torch.cuda.synchronize()
                row = {"dtype": dtype, "activation_checkpointing": ckpt, "s_per_step": tuner.seconds_per_step_,
                       "peak_bytes": int(torch.cuda.max_memory_allocated()), "batch_size": args.batch_size}
                print(json.dumps(row), flush=True)
                out.append(row)
                del backend, tuner
                torch.cuda.empty_cache()
    return {"device": torch.cuda.get_device_name(), "rows": out}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/davis2016_val")
    ap.add_argument("--val", default="0.25", help="validation size: count or fraction")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--context-side", type=int, default=None)
    ap.add_argument("--max-objects", type=int, default=None)
    ap.add_argument("--backend-options", default='{"max_side": 128, "pixels_per_prompt": 512}',
                    help="JSON options of the features backend (default: a smaller working size, so 20 objects fit in 15 min on 2 cores)")
    ap.add_argument("--cuda-steps", type=int, default=5)
    ap.add_argument("--seggpt-options", default="{}", help="JSON options of the seggpt backend (CUDA part)")
    ap.add_argument("--skip-cpu", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/tuning_davis.json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    doc = {"args": vars(args), "machine": platform.platform(), "torch_threads": torch.get_num_threads()}
    if not args.skip_cpu:
        doc["cpu"] = cpu_part(args)
    doc["cuda"] = cuda_part(args)
    doc["wall_s"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2))
    print(f"wrote {args.out} ({doc['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
