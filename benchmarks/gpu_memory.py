"""Regenerate the GPU memory file (``../shared/gpu/h100-2026-11-25.json`` format) on any CUDA machine.

Measures, through promptopt's own backends with full-size random-init models (the
same memory as the released checkpoints) on real DAVIS 2016 camel frames
(``../shared/data/davis2016_val/camel``, else the bundled
``promptopt/sample_data/davis_mini/camel``; the last frame is the query, the
others the prompt pool), the CUDA peak (``torch.cuda.max_memory_allocated``,
weights included) of:

* ``seggpt_inference_feature_ensemble``: ``predict(pool[:k], [query])``, k = 1…15,
  float32 and bfloat16, the backend's input cache emptied before each call;
* ``seggpt_inference_bench_grid``: feature and output ensemble, k = 1, 2, 4, 8, 16;
* ``seggpt_context_tuning_one_step``: ``tuning_loss(contexts, batch)`` + backward,
  1/2/4 contexts × 1/2/4 images, with and without activation checkpointing (a
  fresh model per setting), "OOM" where it does not fit;
* ``persam_predict``: SAM ViT-B/L/H, float32 and bfloat16, k = 1 and 3, cold
  (empty embedding cache: the encoder runs) and cached, in a process holding
  nothing else (``allocated_before_bytes`` says what was allocated before).

Next to each peak: the backend's own estimate at this commit (``pred`` /
``estimate``) and the analytic model of :mod:`promptopt.backends.memory_models`
(``analytic``, with its relative error). Attention timings and the forward
selection run of the original file are not regenerated here.

    python benchmarks/gpu_memory.py --out benchmarks/results/gpu-memory-<device>.json   # needs CUDA
    python benchmarks/gpu_memory.py --dry-run                                         # any machine

``--dry-run`` plans the same rows and prints the analytic estimates without a
GPU (no weights are allocated). This script has not been run on a GPU in the
session that wrote it (none was available).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from promptopt.data import Sample, bundled_sample_root, scan_category
from promptopt.memory import cuda_peak_bytes, format_bytes
from promptopt.backends.memory_models import (
    RELEASED_SAM_VISION, persam_memory, released_sam_config, seggpt_inference_memory, seggpt_tuning_memory,
)

DTYPES = ("float32", "bfloat16")
FEATURE_KS = tuple(range(1, 16))
GRID_KS = (1, 2, 4, 8, 16)
TUNING_SHAPES = tuple((c, b) for c in (1, 2, 4) for b in (1, 2, 4))
PERSAM_KS = (1, 3)
SHARED_CAMEL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "davis2016_val" / "camel"

PeakFn = Callable[[Callable[[], object], Any], int]


def camel_frames(folder: Path | None = None) -> tuple[list[Sample], Sample]:
    """(prompt pool, query): DAVIS camel frames sorted by id, the last one the query."""
    folder = folder or (SHARED_CAMEL if SHARED_CAMEL.is_dir() else bundled_sample_root() / "camel")
    frames = sorted(scan_category(folder, "camel"), key=lambda s: s.id)
    return frames[:-1], frames[-1]


def _err(estimate: int | None, peak: Any) -> float | None:
    return estimate / peak - 1 if isinstance(peak, int) and estimate else None


# --- the plan (no GPU needed) ----------------------------------------------------------------------------------

def plan(query_hw: tuple[int, int], seggpt_config: Any = None, sam_configs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every row to measure, with its analytic estimate (config-only arithmetic, no weights)."""
    from transformers import SegGptConfig

    cfg = seggpt_config if seggpt_config is not None else SegGptConfig()
    sams = sam_configs if sam_configs is not None else {k: released_sam_config(k) for k in RELEASED_SAM_VISION}
    feature = {dt: [{"k": k, "analytic": seggpt_inference_memory(cfg, dtype=dt, k=k, image_size_hw=query_hw).total}
                    for k in FEATURE_KS] for dt in DTYPES}
    grid = [{"dtype": dt, "ensemble": ens, "k": k,
             "analytic_bytes": seggpt_inference_memory(cfg, dtype=dt, k=k, image_size_hw=query_hw, ensemble=ens,
                                                       batch_size=4).total}
            for dt in DTYPES for ens in ("feature", "output") for k in GRID_KS]
    tuning = [{"dtype": dt, "checkpointing": ck, "contexts": c, "batch_size": b,
               "analytic": seggpt_tuning_memory(cfg, dtype=dt, contexts=c, batch_size=b, checkpointing=ck,
                                                image_size_hw=query_hw).total}
              for dt in DTYPES for ck in (False, True) for c, b in TUNING_SHAPES]
    persam = [{"model": name, "dtype": dt, "k": k,
               "analytic_cold": persam_memory(sc, dtype=dt, k=k, image_size_hw=query_hw, cached=False).total,
               "analytic_cached": persam_memory(sc, dtype=dt, k=k, image_size_hw=query_hw, cached=True).total}
              for name, sc in sams.items() for dt in DTYPES for k in PERSAM_KS]
    return {"seggpt_inference_feature_ensemble": feature, "seggpt_inference_bench_grid": grid,
            "seggpt_context_tuning_one_step": {"rows": tuning}, "persam_predict": persam}


def print_plan(p: dict[str, Any]) -> None:
    for dt, rows in p["seggpt_inference_feature_ensemble"].items():
        print(f"seggpt feature ensemble {dt}: " + ", ".join(f"k={r['k']} {format_bytes(r['analytic'])}" for r in rows))
    for r in p["seggpt_inference_bench_grid"]:
        print(f"seggpt grid {r['dtype']} {r['ensemble']} k={r['k']}: {format_bytes(r['analytic_bytes'])}")
    for r in p["seggpt_context_tuning_one_step"]["rows"]:
        print(f"seggpt tuning {r['dtype']} checkpointing={r['checkpointing']} {r['contexts']} contexts x "
              f"{r['batch_size']} images: {format_bytes(r['analytic'])}")
    for r in p["persam_predict"]:
        print(f"persam {r['model']} {r['dtype']} k={r['k']}: cold {format_bytes(r['analytic_cold'])}, "
              f"cached {format_bytes(r['analytic_cached'])}")


# --- measurements ---------------------------------------------------------------------------------------------

def _free() -> None:
    """Collect garbage and return cached CUDA blocks, so the next measurement starts from live tensors only."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def _allocated(device: str) -> int | None:
    return int(torch.cuda.memory_allocated(device)) if torch.device(device).type == "cuda" else None


def _seggpt_model(config: Any):
    from transformers import SegGptForImageSegmentation

    torch.manual_seed(0)
    return SegGptForImageSegmentation(config)


def measure_seggpt_inference(p: dict, config: Any, pool: Sequence[Sample], query: Sample, device: str,
                             peak_fn: PeakFn, grid_reps: int = 3) -> None:
    """Fill the two SegGPT inference blocks of plan ``p`` in place."""
    from promptopt.backends.seggpt import SegGPTBackend

    for dt in DTYPES:
        model = _seggpt_model(config)
        be = SegGPTBackend(model, device=device, dtype=dt, ensemble="feature")
        for row in p["seggpt_inference_feature_ensemble"][dt]:
            k = row["k"]
            row["pred"] = be.memory_bytes(k, query.size)
            be.clear_cache()
            row["allocated_before_bytes"] = _allocated(device)
            t = time.perf_counter()
            with torch.no_grad():
                row["peak"] = peak_fn(lambda: be.predict(pool[:k], [query], 2), device)
            row["s"] = round(time.perf_counter() - t, 3)
            row["err"] = _err(row["pred"], row["peak"])
            row["analytic_err"] = _err(row["analytic"], row["peak"])
        for ens in ("feature", "output"):
            be = SegGPTBackend(model, device=device, dtype=dt, ensemble=ens, batch_size=4)
            be.prepare([query, *pool])
            for row in (r for r in p["seggpt_inference_bench_grid"] if (r["dtype"], r["ensemble"]) == (dt, ens)):
                prompts = pool[:row["k"]]

                def run():
                    with torch.no_grad():
                        be.predict(prompts, [query], 2)

                run()  # warm-up: prompts enter the cache, as in bench_seggpt.py
                t = time.perf_counter()
                for _ in range(grid_reps):
                    run()
                    if torch.device(device).type == "cuda":
                        torch.cuda.synchronize(device)
                row.update(device=device, latency_s=(time.perf_counter() - t) / grid_reps,
                           predicted_bytes=be.memory_bytes(row["k"], query.size), memory_kind=be.memory_kind,
                           allocated_before_bytes=_allocated(device))
                row["peak_bytes"] = peak_fn(run, device)
                row["prediction_error"] = _err(row["predicted_bytes"], row["peak_bytes"])
                row["analytic_error"] = _err(row["analytic_bytes"], row["peak_bytes"])
        del be, model
        _free()


def measure_seggpt_tuning(p: dict, config: Any, pool: Sequence[Sample], device: str, peak_fn: PeakFn) -> None:
    """Fill the tuning block: one ``tuning_loss`` + ``backward`` per row, a fresh model per (dtype, checkpointing)."""
    from promptopt.backends.base import Context
    from promptopt.backends.seggpt import SegGPTBackend

    rows = p["seggpt_context_tuning_one_step"]["rows"]
    for dt in DTYPES:
        for ck in (False, True):
            model = _seggpt_model(config)
            be = SegGPTBackend(model, device=device, dtype=dt, checkpointing=ck)
            for row in (r for r in rows if (r["dtype"], r["checkpointing"]) == (dt, ck)):
                c, b = row["contexts"], row["batch_size"]
                refs, batch = pool[len(pool) - c:], list(pool[:b])
                be.prepare(batch)
                starts = [be.to_context(s, 2) for s in refs]
                numel = sum(x.image.numel() + x.mask.numel() for x in starts)
                # what ContextTuner compares with the budget: the backend's step plus the contexts' parameter,
                # gradient and two Adam moments (float32)
                row["estimate"] = int(be.tuning_memory_bytes(c, batch[0].size, b, 2) + 4 * 4 * numel)
                row["allocated_before_bytes"] = _allocated(device)
                contexts = [Context(x.image.clone().requires_grad_(True), x.mask.clone().requires_grad_(True))
                            for x in starts]

                def step():
                    be.tuning_loss(contexts, batch, 2).backward()

                t = time.perf_counter()
                try:
                    row["peak"] = peak_fn(step, device)
                    row["s"] = round(time.perf_counter() - t, 3)
                except torch.cuda.OutOfMemoryError:
                    row["peak"] = "OOM"
                del contexts, starts
                _free()
                row["analytic_err"] = _err(row["analytic"], row["peak"])
            del be, model
            _free()


def measure_persam(p: dict, sam_configs: dict[str, Any], pool: Sequence[Sample], query: Sample, device: str,
                   peak_fn: PeakFn) -> None:
    """Fill the PerSAM block: cold then cached ``predict``, each size and dtype in a fresh backend."""
    from transformers import SamModel

    from promptopt.backends.persam import PerSAMBackend

    for name, cfg in sam_configs.items():
        for dt in DTYPES:
            torch.manual_seed(0)
            be = PerSAMBackend(model=SamModel(cfg), device=device, dtype=dt)
            for row in (r for r in p["persam_predict"] if (r["model"], r["dtype"]) == (name, dt)):
                k = row["k"]
                be.clear_cache()
                _free()
                row["estimate"] = be.memory_bytes(k, query.size)
                row["allocated_before_bytes"] = _allocated(device)
                with torch.no_grad():
                    row["peak_cold"] = peak_fn(lambda: be.predict(pool[:k], [query], 2), device)
                    row["peak_cached"] = peak_fn(lambda: be.predict(pool[:k], [query], 2), device)
                row["analytic_cold_err"] = _err(row["analytic_cold"], row["peak_cold"])
                row["analytic_cached_err"] = _err(row["analytic_cached"], row["peak_cached"])
            del be
            _free()


def run(device: str = "cuda", peak_fn: PeakFn = cuda_peak_bytes, seggpt_config: Any = None,
        sam_configs: dict[str, Any] | None = None, blocks: Sequence[str] = ("inference", "tuning", "persam"),
        frames: tuple[list[Sample], Sample] | None = None) -> dict[str, Any]:
    """Measure the planned rows on ``device`` and return the file's dictionary.

    ``peak_fn(fn, device)`` returns the peak bytes of ``fn()`` (CUDA's
    allocator by default; the tests pass a stand-in to run the harness on CPU
    with tiny models).
    """
    import transformers
    from transformers import SegGptConfig

    pool, query = frames or camel_frames()
    seggpt_config = seggpt_config if seggpt_config is not None else SegGptConfig(drop_path_rate=0.0)
    sam_configs = sam_configs if sam_configs is not None else {k: released_sam_config(k) for k in RELEASED_SAM_VISION}
    p = plan(query.size, seggpt_config, sam_configs)
    out: dict[str, Any] = {
        "what": "CUDA peak memory (torch.cuda.max_memory_allocated, weights included) of the full-size architectures "
                "with random-init weights, measured through promptopt's own backends by benchmarks/gpu_memory.py, "
                "next to the backends' own estimates (pred / estimate / predicted_bytes) and the analytic models of "
                "promptopt.backends.memory_models (analytic*).",
        "device": torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "data": f"DAVIS 2016 camel frames, {query.size[1]}x{query.size[0]} (image_size_hw = [{query.size[0]}, "
                f"{query.size[1]}]); query {query.id}, prompt pool the {len(pool)} other frames in id order",
    }
    if "inference" in blocks:
        measure_seggpt_inference(p, seggpt_config, pool, query, device, peak_fn)
        out["seggpt_inference_feature_ensemble"] = dict(
            p["seggpt_inference_feature_ensemble"],
            note="pred = memory_bytes(k, image_size); peak = measured for predict(pool[:k], [query]) with the input "
                 "cache emptied first; analytic = seggpt_inference_memory(config, dtype, k, image_size_hw); s = wall "
                 "seconds of that call")
        out["seggpt_inference_bench_grid"] = p["seggpt_inference_bench_grid"]
    if "tuning" in blocks:
        measure_seggpt_tuning(p, seggpt_config, pool, device, peak_fn)
        out["seggpt_context_tuning_one_step"] = dict(
            p["seggpt_context_tuning_one_step"],
            note="one tuning_loss(contexts, batch of queries) + backward; estimate = ContextTuner.tuning_memory_bytes "
                 "at this commit; analytic = seggpt_tuning_memory; 'OOM' = did not fit. A fresh model per dtype and "
                 "checkpointing setting.")
    if "persam" in blocks:
        _free()
        measure_persam(p, sam_configs, pool, query, device, peak_fn)
        out["persam_predict"] = p["persam_predict"]
        out["persam_note"] = ("peak_cold: predict(pool[:k], [query]) with an empty embedding cache (the SAM image "
                              "encoder runs); peak_cached: the same call again; estimate = memory_bytes(k, image_size) "
                              "at this commit; analytic_* = persam_memory; allocated_before_bytes = memory allocated "
                              "before the cold call (the weights only, in this process)")
    return out


def table(result: dict[str, Any]) -> str:
    """Markdown: per block, the worst under- and over-estimate of the analytic model against the measured peaks."""
    blocks = {
        "SegGPT inference, feature ensemble": [r.get("analytic_err") for rows in
                                               result.get("seggpt_inference_feature_ensemble", {}).values()
                                               if isinstance(rows, list) for r in rows],
        "SegGPT inference grid (feature + output)": [r.get("analytic_error") for r in
                                                     result.get("seggpt_inference_bench_grid", [])],
        "SegGPT context tuning, one step": [r.get("analytic_err") for r in
                                            result.get("seggpt_context_tuning_one_step", {}).get("rows", [])],
        "PerSAM predict, cold": [r.get("analytic_cold_err") for r in result.get("persam_predict", [])],
        "PerSAM predict, cached": [r.get("analytic_cached_err") for r in result.get("persam_predict", [])],
    }
    lines = ["| block | rows | worst under | worst over |", "|---|---|---|---|"]
    for name, errs in blocks.items():
        errs = [e for e in errs if e is not None]
        if errs:
            under = min(errs)
            lines.append(f"| {name} | {len(errs)} | {f'{100 * under:+.1f}%' if under < 0 else 'none'} | "
                         f"{100 * max(errs):+.1f}% |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="print the planned rows and analytic estimates; no GPU")
    ap.add_argument("--out", help="write the JSON here")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--blocks", default="inference,tuning,persam", help="comma-separated subset")
    args = ap.parse_args(argv)
    if args.dry_run:
        pool, query = camel_frames()
        p = plan(query.size)
        print_plan(p)
        if args.out:
            Path(args.out).write_text(json.dumps(p, indent=1))
        return
    if not torch.cuda.is_available():
        raise SystemExit("gpu_memory.py measures CUDA peaks and needs a CUDA device; use --dry-run to see the plan")
    result = run(args.device, blocks=tuple(b.strip() for b in args.blocks.split(",") if b.strip()))
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(table(result))


if __name__ == "__main__":
    main()
