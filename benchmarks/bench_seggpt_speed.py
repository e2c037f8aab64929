"""SegGPT speed: rows per second by batch size, and forward-selection wall time, for the attention / batching variants.

Variants (all ``reference="official"``, feature ensemble, random-init weights —
the same time as the released checkpoint):

* ``eager``                — transformers' eager attention, one prompt set per model call
* ``sdpa``                 — SDPA attention, one prompt set per model call
* ``sdpa+grouped``         — SDPA, several candidate sets per model call (``predict_sets``)
* ``sdpa+grouped+compile`` — the same with ``compile=True`` (inductor)

"One set per call" is the base class's ``predict_sets`` (a loop of ``predict``),
installed on the backend instance. Forward selection runs ``ForwardSelector``
on real DAVIS frames (the bundled ``camel`` clip): ``--pool N`` candidates,
``--val V`` validation frames, ``k = 1..--k`` prompts (``patience = k``, so every
step runs). ForwardSelector hands the oracle its candidates in about eight
progress chunks; the ``whole-step`` rows score all candidates of a step in one
``score_additions`` call (same answers, bigger groups). Every variant's
per-candidate scores and selection are checked against ``eager``: the
selection must be identical; scores of SDPA variants may differ from eager's
by float rounding (max |Δ| printed), grouped vs one-set-per-call must be equal.

CPU (no GPU on the machine that wrote this): ``--config full`` is SegGPT ViT-L
(≈ 50 s per row at one thread), so on CPU run rows/s at batch 1–2 only
(``--batches 1,2 --skip-selection``) and forward selection on ``--config mid``
(a narrower, shallower SegGPT at half resolution; see MID). On CUDA run the
defaults (full size, batches 1, 4, 16, 32, N = 16, V = 8, k <= 4).

    OMP_NUM_THREADS=1 python benchmarks/bench_seggpt_speed.py --config full --batches 1,2 --skip-selection
    OMP_NUM_THREADS=1 python benchmarks/bench_seggpt_speed.py --config mid --batches 1,4,8 --pool 8 --val 4
    python benchmarks/bench_seggpt_speed.py --device cuda --dtype bfloat16      # on a GPU machine
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
import types
from pathlib import Path

import torch
from transformers import SegGptConfig

from promptopt.backends.base import Backend
from promptopt.backends.seggpt import SegGPTBackend, save_random_model, tiny_config
from promptopt.data import bundled_sample_root, load_dataset
from promptopt.oracle import ValidationOracle
from promptopt.strategies import ForwardSelector

#: a mid-size SegGPT for CPU selection timings: 448x224 stacked input (224x224 per image), 6 layers of width 192
MID = dict(hidden_size=192, num_hidden_layers=6, num_attention_heads=6, mlp_dim=768, image_size=(448, 224),
           patch_size=16, pretrain_image_size=224, decoder_hidden_size=16, merge_index=1,
           intermediate_hidden_state_indices=(2, 3, 4, 5), drop_path_rate=0.0)
VARIANTS = {  # name: (attention, grouped, compile)
    "eager": ("eager", False, False),
    "sdpa": ("sdpa", False, False),
    "sdpa+grouped": ("sdpa", True, False),
    "sdpa+grouped+compile": ("sdpa", True, True),
}


def make_config(name: str) -> SegGptConfig:
    if name == "full":
        return SegGptConfig(drop_path_rate=0.0)
    if name == "mid":
        return SegGptConfig(**MID)
    return tiny_config()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def backend_for(path: str, variant: str, args) -> SegGPTBackend:
    attention, grouped, compiled = VARIANTS[variant]
    be = SegGPTBackend.from_pretrained(path, device=args.device, dtype=args.dtype, attention=attention,
                                       compile=compiled, batch_size=args.batch_size)
    if not grouped:
        be.predict_sets = types.MethodType(Backend.predict_sets, be)
    return be


def rows_per_second(path: str, args) -> dict:
    """Independent rows (no ensemble) per second by batch size, median of ``--reps`` after a warm-up."""
    out: dict = {}
    seen = set()
    for variant in args.variants:  # grouping does not matter for independent rows: one variant per (attention, compile)
        attention, _, compiled = VARIANTS[variant]
        if (attention, compiled) in seen:
            continue
        seen.add((attention, compiled))
        be = backend_for(path, variant, args)
        h, w = be.input_size
        out[variant] = {}
        for b in args.batches:
            x = torch.randn(b, 3, h, w, device=be.device)
            sizes = [1] * b
            times = []
            with torch.no_grad():
                for rep in range(args.reps + (0 if args.no_warmup else 1)):
                    sync(be.device)
                    t0 = time.perf_counter()
                    be._forward(x, x, x, sizes)
                    sync(be.device)
                    if rep > 0 or args.no_warmup:
                        times.append(time.perf_counter() - t0)
            t = statistics.median(times)
            out[variant][str(b)] = {"s_per_call": round(t, 4), "rows_per_s": round(b / t, 3),
                                    "ms_per_row": round(1000 * t / b, 2)}
            print(f"  rows/s  {variant:22s} batch {b:3d}: {b / t:8.3f} rows/s ({1000 * t / b:.1f} ms/row)", flush=True)
    return out


class WholeStepSelector(ForwardSelector):
    """ForwardSelector that scores all candidates of a step in one oracle call (same answers, no progress chunks)."""

    def _score_step(self, selected, candidates):
        if self.shortlist is not None:
            return super()._score_step(selected, candidates)
        return {c.id: r for c, r in zip(candidates, self.oracle.score_additions(selected, candidates))}


def selection(path: str, args) -> dict:
    frames = load_dataset(bundled_sample_root(), category="camel").samples()
    pool, val = frames[: args.pool], frames[args.pool: args.pool + args.val]
    out: dict = {"pool": len(pool), "val": len(val), "max_prompts": args.k}
    reference = None
    for variant in args.variants:
        for kind, cls in (("chunked", ForwardSelector), ("whole-step", WholeStepSelector)):
            if kind == "whole-step" and not VARIANTS[variant][1]:
                continue  # one set per call: chunking changes nothing
            be = backend_for(path, variant, args)
            oracle = ValidationOracle(be, val, num_classes=2)
            sync(be.device)
            t0 = time.perf_counter()
            sel = cls(oracle, max_prompts=args.k, patience=args.k).fit(pool)
            sync(be.device)
            wall = time.perf_counter() - t0
            scores = [h["candidates"] for h in sel.history_]
            row = {"wall_s": round(wall, 2), "model_calls": be.model_calls, "rows": be.model_rows,
                   "rows_per_s": round(be.model_rows / wall, 2), "selected": [s.id for s in sel.selected_],
                   "score": sel.score_}
            if reference is None:
                reference = (row["selected"], scores)
            row["selection_identical"] = row["selected"] == reference[0]
            row["max_abs_score_diff_vs_eager"] = max(abs(a[k] - b[k]) for a, b in zip(scores, reference[1]) for k in a)
            out[f"{variant} ({kind})"] = row
            print(f"  select  {variant:22s} {kind:10s}: {wall:8.2f} s, {be.model_calls} calls, {be.model_rows} rows, "
                  f"same selection: {row['selection_identical']}, max |dscore| vs eager "
                  f"{row['max_abs_score_diff_vs_eager']:.2e}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=["full", "mid", "tiny"], default="full")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batches", default="1,4,16,32")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-warmup", action="store_true", help="time the first call too (full size on CPU)")
    ap.add_argument("--batch-size", type=int, default=32, help="rows per grouped call (the backend's batch_size)")
    ap.add_argument("--pool", type=int, default=16)
    ap.add_argument("--val", type=int, default=8)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--skip-rows", action="store_true")
    ap.add_argument("--skip-selection", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="JSON file for the results")
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.variants = [v for v in args.variants.split(",") if v]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = make_config(args.config)
    result = {"config": args.config, "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
              "batch_size": args.batch_size}
    with tempfile.TemporaryDirectory() as tmp:
        save_random_model(tmp, cfg, seed=0)  # painting head widened: scores then differ between prompt sets
        if not args.skip_rows:
            result["rows_per_second"] = rows_per_second(tmp, args)
        if not args.skip_selection:
            result["forward_selection"] = selection(tmp, args)
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
