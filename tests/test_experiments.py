"""The few-shot vs supervised experiment runs end to end on a tiny config and resumes without redoing work."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import fewshot_vs_supervised as exp  # noqa: E402
from promptopt.artifacts import read_json  # noqa: E402


def test_experiment_runs_and_resumes(blob_dataset: Path, tmp_path: Path) -> None:
    cfg = {"name": "smoke", "data": str(blob_dataset), "labelled": 8, "fewshot_val": 0.25, "few_shot": ["random", "forward", "tuned", "retrieval"], "tuned": {"steps": 2, "prompts": 1, "backend_options": {"max_side": 64, "pixels_per_prompt": 128}},
           "k": 2, "random_seeds": 2, "max_prompts": 2, "n_values": [2, 4], "unet_seeds": 1,
           "unet": {"size": [32, 32], "steps": 3, "batch_size": 2, "width": 4}}
    path = tmp_path / "smoke.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "out"
    logs: list[str] = []
    summary = exp.run(path, out, log=logs.append)
    units = read_json(out / "results.json")["units"]
    assert set(units) == {"blob/few-shot/random", "blob/few-shot/forward", "blob/few-shot/tuned", "blob/few-shot/retrieval", "blob/unet/n=2/seed=0", "blob/unet/n=4/seed=0"}
    assert all(0.0 <= u["test_miou"] <= 1.0 for u in units.values())
    assert set(summary["unet"]) == {2, 4} and set(summary["few_shot"]) == {"random", "forward", "tuned", "retrieval"}
    assert (out / "mIoU_vs_n.png").is_file() and "U-Net n=4" in (out / "table.md").read_text()
    # the U-Net and few-shot strategies are scored on the same 4 test images
    assert units["blob/unet/n=2/seed=0"]["n"] == 2
    n_logs = len(logs)
    exp.run(path, out, log=logs.append)
    assert len(logs) == n_logs  # nothing recomputed
