"""Latency and memory of the PerSAM backend (random-init SAM: the architecture's cost, not its accuracy).

CUDA (when available): full-size ViT-B and ViT-H, fp32 and bf16, both ``reference`` modes —
image-encoder latency per image, PerSAM latency per (reference, query) pair given cached embeddings
(the decoder cascade: 3 decoder runs), peak CUDA memory of each, and the analytic ``memory_bytes``
next to it.
CPU (always): a tiny config end to end in both modes (encoder per image, PerSAM and PerSAM-F per
pair, PerSAM-F training per reference: official trains on full-resolution 480x854 logits), then one
full-size ViT-B encoder pass and ViT-B's decoder cascade per pair.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/bench_persam.py [--skip-vit-b] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time

import numpy as np
import torch

from promptopt.backends.persam import PerSAMBackend
from promptopt.data import Sample
from promptopt.memory import format_bytes

VIT = {  # SAM's released image encoders (hidden size, layers, heads, global-attention layers)
    "vit-b": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, global_attn_indexes=[2, 5, 8, 11]),
    "vit-h": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, global_attn_indexes=[7, 15, 23, 31]),
}


def sam_model(kind: str):
    from transformers import SamConfig, SamModel

    if kind == "tiny":
        cfg = SamConfig(
            vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=8,
                               window_size=4, global_attn_indexes=[1], output_channels=32, num_pos_feats=16, mlp_dim=64),
            prompt_encoder_config=dict(hidden_size=32, image_size=64, patch_size=8, mask_input_channels=4),
            mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32))
    else:
        cfg = SamConfig(vision_config=VIT[kind])
    torch.manual_seed(0)
    return SamModel(cfg).eval()


def samples(n: int, size=(480, 854), seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
        mask = np.zeros(size, np.int64)
        mask[size[0] // 4: size[0] // 2, size[1] // 3: size[1] // 2] = 1
        out.append(Sample(f"x{i}", "bench", image=img, mask=mask))
    return out


def timed(fn, repeats: int, sync=lambda: None) -> float:
    """Median seconds of ``repeats`` calls (after one warm-up call)."""
    fn()
    sync()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def bench_backend(model, device: str, dtype: str, n_images: int, repeats: int, variant: str = "persam",
                  train_steps: int = 0, reference: str = "official") -> dict:
    be = PerSAMBackend(model=model, device=device, dtype=dtype, variant=variant, train_steps=train_steps,
                       reference=reference)
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    imgs = samples(n_images)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    be.prepare(imgs)
    sync()
    enc = (time.perf_counter() - t) / n_images
    enc_peak = torch.cuda.max_memory_allocated() if cuda else None
    ref, query = imgs[0], imgs[1]
    train_s = None
    if variant == "persam-f":
        t = time.perf_counter()
        be.weights_for(ref, 1, be.targets(ref, 2)[1])
        train_s = time.perf_counter() - t
    be.pair_stats(ref, query, 2)
    calls0 = be.decoder_calls
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    pair = timed(lambda: be.pair_stats(ref, query, 2), repeats, sync)
    dec_peak = torch.cuda.max_memory_allocated() if cuda else None
    return {
        "device": device, "dtype": dtype, "variant": variant, "reference": reference, "encoder_s_per_image": enc,
        "pair_s": pair, "decoder_runs_per_pair": (be.decoder_calls - calls0) / (repeats + 1),
        "train_s_per_reference": train_s, "train_steps": train_steps if variant == "persam-f" else None,
        "peak_encoder_bytes": enc_peak, "peak_pair_bytes": dec_peak,
        "memory_bytes_estimate_k1": be.memory_bytes(1, query.size),
        "params": sum(p.numel() for p in be.model.parameters()),
    }


def encoder_once(model, dtype: torch.dtype = torch.float32) -> float:
    """Seconds of one encoder pass on a 1024x1024 input (no warm-up: a single pass, as documented)."""
    x = torch.randn(1, 3, model.config.vision_config.image_size, model.config.vision_config.image_size, dtype=dtype)
    model = model.to(dtype)
    t = time.perf_counter()
    with torch.no_grad():
        model.get_image_embeddings(x)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-vit-b", action="store_true", help="CPU: skip the full-size ViT-B encoder pass")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    rows = []
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
           "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    print(json.dumps(env))
    if torch.cuda.is_available():
        for kind in ("vit-b", "vit-h"):
            for dtype in ("float32", "bfloat16"):
                for reference in ("official", "transformers"):
                    row = {"model": kind, **bench_backend(sam_model(kind), "cuda", dtype, n_images=8, repeats=20,
                                                          reference=reference)}
                    rows.append(row)
                    print(json.dumps(row))
                    torch.cuda.empty_cache()
    # CPU: tiny config end to end, both references (official: full-resolution geometry and PerSAM-F training)
    for reference in ("official", "transformers"):
        for variant, steps in (("persam", 0), ("persam-f", 1000)):
            row = {"model": "tiny", **bench_backend(sam_model("tiny"), "cpu", "float32", n_images=4, repeats=10,
                                                    variant=variant, train_steps=steps, reference=reference)}
            rows.append(row)
            print(json.dumps(row))
    if not args.skip_vit_b:
        model = sam_model("vit-b")
        enc = encoder_once(model)
        be = PerSAMBackend(model=model, device="cpu")
        imgs = samples(2)
        # the decoder cascade per pair, with embeddings cached (a random embedding: no second encoder pass)
        for s in imgs:
            from promptopt.backends.persam import ImageState

            be._images.put(s.key, ImageState(torch.randn(1, 256, 64, 64), s.size, (576, 1024)))
        pair = timed(lambda: be.pair_stats(imgs[0], imgs[1], 2), 3)
        row = {"model": "vit-b", "device": "cpu", "dtype": "float32", "encoder_s_single_pass": enc, "pair_s": pair,
               "memory_bytes_estimate_k1": be.memory_bytes(1, imgs[1].size),
               "params": sum(p.numel() for p in model.parameters()),
               "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        rows.append(row)
        print(json.dumps(row))
    print("\n| model | device | dtype | reference | variant | encoder s/image | PerSAM s/pair | peak enc / pair | estimate k=1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        enc = r.get("encoder_s_per_image", r.get("encoder_s_single_pass"))
        peaks = f"{format_bytes(r.get('peak_encoder_bytes'))} / {format_bytes(r.get('peak_pair_bytes'))}" \
            if r.get("peak_encoder_bytes") else "-"
        print(f"| {r['model']} | {r['device']} | {r['dtype']} | {r.get('reference', 'official')} | {r.get('variant', 'persam')} | {enc:.4f} | "
              f"{r['pair_s']:.4f} | {peaks} | {format_bytes(r['memory_bytes_estimate_k1'])} |")
        if r.get("train_s_per_reference") is not None:
            print(f"|  | | | | PerSAM-F training, {r['train_steps']} steps: {r['train_s_per_reference']:.2f} s/reference | | | | |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
