"""The few-shot vs supervised experiment runs end to end on a tiny config and resumes without redoing work."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import fewshot_vs_supervised as exp  # noqa: E402
from promptopt import run as run_module  # noqa: E402
from promptopt.artifacts import read_json  # noqa: E402

FAST = {"max_side": 64, "pixels_per_prompt": 128}


def _config(blob_dataset: Path) -> dict:
    return {"name": "smoke", "data": str(blob_dataset), "labelled": 8, "fewshot_val": 0.25, "backend_options": FAST,
            "few_shot": {"random": {"strategy": "random", "k": 2, "seeds": 2},
                         "forward": {"strategy": "forward", "max_prompts": 2},
                         "tuned": {"strategy": "tuned", "steps": 2},
                         "retrieval": {"strategy": "retrieval", "encoder": "features", "k": 2}},
            "n_values": [2, 4], "unet_seeds": 1, "unet": {"size": [32, 32], "steps": 3, "batch_size": 2, "width": 4}}


class Killed(BaseException):
    """Stands for SIGKILL: nothing in promptopt catches it."""


def test_experiment_runs_resumes_after_a_kill_and_reruns_for_free(blob_dataset: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "smoke.json"
    path.write_text(json.dumps(_config(blob_dataset)))
    out = tmp_path / "out"
    logs: list[str] = []

    def kill_after_third_save(n: int) -> None:
        if n == 3:
            raise Killed

    monkeypatch.setattr(run_module, "fault_hook", kill_after_third_save)
    monkeypatch.setattr(run_module, "_saves", 0)
    with pytest.raises(Killed):
        exp.run(path, out, log=logs.append)
    assert len(logs) == 3  # three units finished before the kill
    monkeypatch.setattr(run_module, "fault_hook", None)
    summary = exp.run(path, out, log=logs.append)
    units = read_json(out / "results.json")["units"]
    assert len(logs) == 6  # the three finished units were not recomputed
    assert set(units) == {"blob/few-shot/random", "blob/few-shot/forward", "blob/few-shot/tuned",
                          "blob/few-shot/retrieval", "blob/unet/n=2/seed=0", "blob/unet/n=4/seed=0"}
    assert all(0.0 <= u["test_miou"] <= 1.0 for u in units.values())
    assert set(summary["unet"]) == {"2", "4"} and set(summary["few_shot"]) == {"random", "forward", "tuned", "retrieval"}
    assert summary["few_shot"]["random"] == units["blob/few-shot/random"]["test_miou"]
    assert (out / "mIoU_vs_n.png").is_file() and "U-Net n=4" in (out / "table.md").read_text()
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert exp.run(path, out, log=logs.append) == summary
    assert len(logs) == 6 and stamp == {p: p.stat().st_mtime_ns for p in out.rglob("*")}
