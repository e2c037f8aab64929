"""The few-shot vs supervised experiment runs end to end on a tiny config and resumes without redoing work."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import fewshot_vs_supervised as exp  # noqa: E402
from conftest import kill_after_state_write  # noqa: E402
from promptopt.artifacts import read_json  # noqa: E402

FAST = {"max_side": 64, "pixels_per_prompt": 128}


def _config(blob_dataset: Path) -> dict:
    return {"name": "smoke", "data": str(blob_dataset), "labelled": 8, "fewshot_val": 0.25, "backend_options": FAST,
            "few_shot": {"random": {"strategy": "random", "k": 2, "seeds": 2},
                         "forward": {"strategy": "forward", "max_prompts": 2},
                         "tuned": {"strategy": "tuned", "steps": 2},
                         "retrieval": {"strategy": "retrieval", "encoder": "features", "k": 2}},
            "n_values": [2, 4], "unet_seeds": 1, "unet": {"size": [32, 32], "steps": 3, "batch_size": 2, "width": 4}}


def test_experiment_runs_resumes_after_a_kill_and_reruns_for_free(blob_dataset: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "smoke.json"
    path.write_text(json.dumps(_config(blob_dataset)))
    out = tmp_path / "out"
    logs: list[str] = []

    kill_after_state_write(monkeypatch, 3, lambda: exp.run(path, out, log=logs.append))
    assert len(logs) == 3  # three units finished before the kill
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


# --- the zero-shot lines (text-prompted CLIPSeg and Grounded SAM), on tiny random-init checkpoints ---------------

# the tiny checkpoints of the backend tests, reused (not copied): imported fixtures register under these names
from test_clipseg_backend import checkpoint as clipseg_checkpoint  # noqa: E402,F401
from test_grounded_sam_backend import root as grounded_sam_root  # noqa: E402,F401

from promptopt.backends.base import TextPrompt  # noqa: E402
from promptopt.oracle import ValidationOracle  # noqa: E402


def test_zero_shot_lines_run_end_to_end_on_tiny_models(clipseg_checkpoint, grounded_sam_root, tmp_path: Path) -> None:
    """The test config (configs/smoke_zero_shot.json) on tiny random CLIPSeg and Grounded SAM checkpoints, named by
    paths relative to the config file: each zero-shot line's text is the candidate that scores best on the labelled
    validation images, its test mIoU is that text's on the shared test images, and table and summary carry both
    lines beside the few-shot line and the U-Net point. Random weights: this proves the pipeline, not accuracy."""
    import os

    src = ROOT / "experiments" / "configs" / "smoke_zero_shot.json"
    cfg = json.loads(src.read_text())
    cfg["data"] = str((src.parent / cfg["data"]).resolve())
    for label, ckpt in (("clipseg", clipseg_checkpoint), ("grounded-sam", grounded_sam_root)):
        rel = os.path.relpath(ckpt, tmp_path)
        assert rel.startswith("../")
        cfg["zero_shot"][label]["checkpoint"] = rel  # resolved against the config's folder, like "data"
    path = tmp_path / "smoke_zero_shot.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "out"
    summary = exp.run(path, out, log=lambda m: None)
    units = read_json(out / "results.json")["units"]
    assert set(units) == {"dog/few-shot/random", "dog/zero-shot/clipseg", "dog/zero-shot/grounded-sam",
                          "dog/unet/n=2/seed=0"}
    winners = {label: units[f"dog/zero-shot/{label}"]["text"] for label in ("clipseg", "grounded-sam")}
    # the winners are not the first candidates here, so a line that kept its first guess would fail below
    assert all(w != [cfg["zero_shot"][k]["texts"]["dog"][0]] for k, w in winners.items())
    cfg_read, data_root, ds = exp.load_config(path)
    _, task = exp.category_task(ds, "dog", cfg_read, data_root)
    for label in ("clipseg", "grounded-sam"):
        entry, unit = cfg["zero_shot"][label], units[f"dog/zero-shot/{label}"]
        be = exp.make_backend(cfg, entry, tmp_path)
        assert be.name == label and be.config()["options"].get("box_threshold", 0.2) == 0.2
        candidates = entry["texts"]["dog"]

        def plain(samples, text):
            return ValidationOracle(be, samples, 2, cache=False).score([TextPrompt(text)]).miou

        val = {t: plain(task.split.val, t) for t in candidates}
        best = max(candidates, key=lambda t: val[t])  # the first of equals, as the strategy
        assert unit["text"] == [best] and unit["val_miou"] == pytest.approx(val[best], abs=1e-9)
        assert unit["test_miou"] == pytest.approx(plain(task.split.test, best), abs=1e-9)
        assert unit["labels_used"] == len(task.split.val) and unit["evaluations"] == len(candidates)
        assert set(unit["baselines_test_miou"]) == {"first candidate", "category name"}
    assert summary["zero_shot"] == {k: units[f"dog/zero-shot/{k}"]["test_miou"] for k in ("clipseg", "grounded-sam")}
    assert set(summary["few_shot"]) == {"random"} and set(summary["unet"]) == {"2"}
    table = (out / "table.md").read_text()
    assert "zero-shot clipseg" in table and "zero-shot grounded-sam" in table and "few-shot random" in table
    assert (out / "mIoU_vs_n.png").is_file()


def test_zero_shot_lines_are_dotted_few_shot_dashed() -> None:
    """The figure tells the kinds apart: U-Net solid curve, few-shot dashed, zero-shot dotted horizontal lines."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    exp.draw(ax, {1: 0.3, 2: 0.5}, {"few-shot": {"forward": 0.6}, "zero-shot": {"clipseg": 0.4, "grounded-sam": 0.2}})
    styles = {line.get_label(): line.get_linestyle() for line in ax.get_lines()}
    plt.close(fig)
    assert styles == {"U-Net from scratch (n labelled)": "-", "few-shot: forward": "--",
                      "zero-shot: clipseg (best text on val)": ":", "zero-shot: grounded-sam (best text on val)": ":"}


def test_line_backends_and_checkpoint_paths(tmp_path: Path) -> None:
    """A line naming its own backend takes only its own options; ./ and ../ checkpoints are relative to the config."""
    assert exp.resolve_checkpoint("../ckpt", tmp_path / "configs") == str((tmp_path / "ckpt").resolve())
    assert exp.resolve_checkpoint("CIDAS/clipseg-rd64-refined", tmp_path) == "CIDAS/clipseg-rd64-refined"
    assert exp.resolve_checkpoint("/abs/dir", tmp_path) == "/abs/dir"
    cfg = {"backend": "features", "backend_options": {"max_side": 48}}
    assert exp.make_backend(cfg, {"backend_options": {"pixels_per_prompt": 64}}).config()["options"]["max_side"] == 48
    from promptopt.errors import ConfigError

    with pytest.raises(ConfigError, match="needs a checkpoint"):  # the config's features options do not leak into it
        exp.make_backend(cfg, {"backend": "clipseg"})


@pytest.mark.parametrize("name", ["davis_blog.json", "smoke_zero_shot.json"])
def test_zero_shot_configs_name_registered_strategies_backends_and_options(name: str) -> None:
    """The configs with zero-shot lines (the GPU one cannot run here) name only registered backends and strategies,
    options those take, and candidates for their own categories; checkpoints resolve under the repository."""
    from promptopt.backends.base import available_backends
    from promptopt.strategies import strategy_options

    path = ROOT / "experiments" / "configs" / name
    cfg = json.loads(path.read_text())
    lines = [(e.get("strategy"), e) for e in cfg.get("few_shot", {}).values()] + \
            [("text", e) for e in cfg["zero_shot"].values()]
    for strategy, entry in lines:
        assert entry.get("backend", cfg.get("backend", "features")) in available_backends()
        own = set(entry) - set(exp.BACKEND_KEYS) - {"strategy", "texts"}
        assert own <= set(strategy_options(strategy)), (strategy, own)
        ckpt = exp.resolve_checkpoint(entry.get("checkpoint"), path.parent)
        assert ckpt is None or Path(ckpt).is_relative_to(ROOT)
        for cat, candidates in entry.get("texts", {}).items():
            assert cat in cfg["categories"] and candidates and all(c.strip() for c in candidates)
