"""The analytic memory models against a measured GPU file: worst under- and over-estimate per block.

    python benchmarks/memory_vs_h100.py [--file tests/data/h100-2026-11-25.json]

Runs on any machine (configs only, no weights). ``tests/test_memory_models.py`` asserts every row
(never below, at most 10 % above); this prints the summary that BENCHMARKS.md quotes.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from transformers import SegGptConfig

from promptopt.backends.memory_models import persam_memory, released_sam_config, seggpt_inference_memory, seggpt_tuning_memory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", default=str(Path(__file__).resolve().parents[1] / "tests" / "data" / "h100-2026-11-25.json"))
    h = json.loads(Path(ap.parse_args().file).read_text())
    hw = tuple(int(v) for v in re.search(r"image_size_hw = \[(\d+), (\d+)\]", h["data"]).groups())
    s = SegGptConfig()
    print(f"measured on: {h['device']}, torch {h['torch']}, transformers {h['transformers']}\n")
    print("| block | rows | worst under | worst over |\n|---|---|---|---|")

    def row(name: str, pairs: list[tuple[int, int]]) -> None:
        r = [e / p - 1 for e, p in pairs]
        under = "none" if min(r) >= 0 else f"{min(r) * 100:+.1f} %"
        print(f"| {name} | {len(r)} | {under} (min {min(r) * 100:+.1f} %) | {max(r) * 100:+.1f} % |")

    feat = h["seggpt_inference_feature_ensemble"]
    row("SegGPT ViT-L inference, feature ensemble, k = 1-15, float32 + bfloat16",
        [(seggpt_inference_memory(s, dtype=dt, k=r["k"], image_size_hw=hw).total, r["peak"])
         for dt in ("float32", "bfloat16") for r in feat[dt]])
    row("SegGPT ViT-L inference grid, feature + output ensemble, k = 1-16",
        [(seggpt_inference_memory(s, dtype=r["dtype"], k=r["k"], image_size_hw=hw, ensemble=r["ensemble"]).total,
          r["peak_bytes"]) for r in h["seggpt_inference_bench_grid"]])
    tuning = h["seggpt_context_tuning_one_step"]["rows"]
    for ck in (False, True):
        rows = [r for r in tuning if r["checkpointing"] == ck]
        est = lambda r: seggpt_tuning_memory(s, dtype=r["dtype"], contexts=r["contexts"],  # noqa: E731
                                             batch_size=r["batch_size"], checkpointing=ck, image_size_hw=hw).total
        row(f"SegGPT context tuning step, checkpointing={ck}, 1/2/4 contexts x 1/2/4 images",
            [(est(r), r["peak"]) for r in rows if r["peak"] != "OOM"])
        for r in rows:
            if r["peak"] == "OOM":
                print(f"| ... {r['dtype']} {r['contexts']}x{r['batch_size']} did not fit in 80 GB | | estimate "
                      f"{est(r) / 1e9:.1f} GB | |")
    bench = [r for r in h["persam_bench"]["rows"] if r["device"] == "cuda"]  # 8 images: 7 embeddings cached meanwhile
    row("PerSAM ViT-B/H encoding an image (bench_persam, 7 embeddings cached)",
        [(persam_memory(released_sam_config(r["model"]), dtype=r["dtype"], k=7, image_size_hw=hw, cached=False).total,
          r["peak_encoder_bytes"]) for r in bench])
    row("PerSAM ViT-B/H pairs with every embedding cached (bench_persam)",
        [(persam_memory(released_sam_config(r["model"]), dtype=r["dtype"], k=7, image_size_hw=hw, cached=True).total,
          r["peak_pair_bytes"]) for r in bench])

if __name__ == "__main__":
    main()
