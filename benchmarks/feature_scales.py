"""Measure the typical magnitude (std) of each raw filter-bank channel type.

The `features` backend divides its channels by fixed constants (module
constants in promptopt/backends/features.py) so that no prediction depends on
which other images were loaded. This script is how those constants were
chosen:  python benchmarks/feature_scales.py ../shared/data
"""
import sys
from pathlib import Path

import numpy as np
import torch

import promptopt.backends.features as fb
from promptopt.data import load_dataset

root = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data")
for name in ("_LAB_SCALE",):
    setattr(fb, name, (1.0, 1.0, 1.0))
for name in ("_GRAD_SCALE", "_DOG_SCALE", "_ST_SCALE", "_ANISO_SCALE", "_POS_SCALE"):
    setattr(fb, name, 1.0)
backend = fb.FeaturesBackend(max_side=192, colour=1, texture=1, position=1)
rows = []
for ds_dir in sorted(p for p in root.iterdir() if p.is_dir()):
    ds = load_dataset(ds_dir)
    for cat in ds.categories:
        for s in ds.samples(cat)[::5]:
            with torch.no_grad():
                f = backend.compute_features(torch.from_numpy(s.image).permute(2, 0, 1).float() / 255)
            rows.append(f.flatten(1).std(1).numpy())
std = np.mean(rows, 0)
names = []
for s in backend.scales:
    names += [f"L@{s}", f"a@{s}", f"b@{s}", f"grad@{s}", f"dog@{s}", f"st@{s}", f"aniso@{s}"]
names += ["x", "y"]
for n, v in zip(names, std):
    print(f"{n:10s} {v:8.3f}")
print("(grad and st rows are already multiplied by sigma: scale-normalised)")
