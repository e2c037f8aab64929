"""A catalogue of bad inputs through the CLI: each gives exit code 2 and one line naming the file or option
at fault — never a traceback — and leaves a finished run's files exactly as they were."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from promptopt.cli import app

FAST = ["--option", "max_side=48", "--option", "pixels_per_prompt=128"]
SPLIT = ["--pool", "6", "--val", "3", "--test", "3"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A small dataset, damaged copies of it, a finished run and damaged copies of its prompt."""
    from conftest import blob_image, write_pair

    root = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    data = root / "data"
    for i in range(12):
        img, mask = blob_image(rng)
        write_pair(data / "blob", f"b{i:02d}", img, mask * 255)

    def damaged(name: str, damage) -> Path:
        d = root / name
        shutil.copytree(data, d)
        damage(d / "blob")
        return d

    w = {"data": data, "root": root}
    w["mask_size"] = damaged("mask_size", lambda d: Image.fromarray(np.zeros((5, 5), np.uint8)).save(d / "masks" / "b00.png"))
    w["mask16"] = damaged("mask16", lambda d: Image.fromarray(np.array([[0, 65535], [7, 0]], np.uint16)).resize(
        (64, 48)).save(d / "masks" / "b01.png"))
    w["broken_image"] = damaged("broken_image", lambda d: (d / "images" / "b02.png").write_bytes(b"not a png"))
    w["colour_mask"] = damaged("colour_mask", lambda d: Image.fromarray(
        np.dstack([np.zeros((48, 64), np.uint8), np.full((48, 64), 200, np.uint8), np.zeros((48, 64), np.uint8)])
    ).save(d / "masks" / "b03.png"))
    (root / "bad.json").write_text("{not json")
    coco = root / "coco.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "b00.png", "height": 48, "width": 64}],
                                "annotations": [], "categories": [{"id": 1, "name": "cat"}]}))
    shutil.copytree(data / "blob" / "images", root / "images")
    run = root / "run"
    r = CliRunner().invoke(app, ["select", "--data", str(data), "--strategy", "best-single", "--no-baselines",
                                 "--out", str(run), "--quiet", *SPLIT, *FAST])
    assert r.exit_code == 0, r.output
    w["run"] = run
    for name, edit in (("prompt_classes", lambda d: d.update(num_classes="two")),
                       ("prompt_empty", lambda d: d.update(examples=[])),
                       ("prompt_backend", lambda d: d.update(backend="features"))):
        folder = root / name
        shutil.copytree(run, folder)
        doc = json.loads((folder / "prompt.json").read_text())
        edit(doc)
        (folder / "prompt.json").write_text(json.dumps(doc))
    missing = root / "prompt_missing_file"
    shutil.copytree(run, missing)
    next((missing / "prompts").glob("*_mask.png")).unlink()
    corrupt = root / "corrupt_state"
    shutil.copytree(run, corrupt)
    (corrupt / "state.json").write_text("{torn")
    (root / "a_file").write_text("x")
    (root / "empty_images").mkdir()
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    return w


def _select(data: str, *extra: str) -> list[str]:
    return ["select", "--data", data, "--quiet", *SPLIT, *FAST, *extra]


def _predict(prompt: str, images: str = "{root}/images", out: str = "{root}/masks") -> list[str]:
    return ["predict", "--prompt", prompt, "--images", images, "--out", out, "--quiet"]


CATALOGUE = [
    # data in
    (["evaluate", "--data", "{root}/absent", "--shots", "1"], "absent: data folder not found"),
    (["evaluate", "--data", "{root}/absent.json", "--shots", "1"], "absent.json: annotations file not found"),
    (["evaluate", "--data", "{root}/bad.json", "--shots", "1"], "bad.json"),
    (["evaluate", "--data", "{root}/coco.json", "--category", "dog", "--shots", "1"], "unknown category 'dog'"),
    (["evaluate", "--data", "{mask_size}", "--shots", "1", *SPLIT], "b00.png: mask size 5x5 does not match"),
    (["evaluate", "--data", "{mask16}", "--shots", "1", *SPLIT], "b01.png"),
    (["evaluate", "--data", "{broken_image}", "--shots", "1", *SPLIT, *FAST], "b02.png"),
    (["evaluate", "--data", "{colour_mask}", "--shots", "1", *SPLIT], "b03.png"),
    (["evaluate", "--data", "{data}", "--category", "zebra", "--shots", "1"], "unknown category 'zebra'"),
    (["evaluate", "--data", "{data}", "--num-classes", "1", "--shots", "1"], "num_classes must be at least 2"),
    (["evaluate", "--data", "{data}", "--pool", "2.5", "--shots", "1"], "pool=2.5"),
    (["evaluate", "--data", "{data}", "--pool", "10", "--val", "5", "--shots", "1"], "exceed the 12 samples"),
    (["evaluate", "--data", "{data}", "--prompts", "b99", *SPLIT], "prompt id 'b99' is not in the prompt pool"),
    # backend and device
    (["evaluate", "--data", "{data}", "--backend", "nope", "--shots", "1"], "unknown backend 'nope'"),
    (["evaluate", "--data", "{data}", "--device", "cuda", "--shots", "1"], "--device cuda: CUDA is not available"),
    (["evaluate", "--data", "{data}", "--device", "tpu9", "--shots", "1"], "--device 'tpu9'"),
    (["evaluate", "--data", "{data}", "--backend", "seggpt", "--checkpoint", "{root}/no-ckpt", "--shots", "1"],
     "no-ckpt"),
    (["evaluate", "--data", "{data}", "--backend", "seggpt", "--checkpoint", "{data}", "--shots", "1"],
     "has no config.json"),
    (["evaluate", "--data", "{data}", "--option", "max_side", "--shots", "1"], "--option 'max_side': write key=value"),
    (["evaluate", "--data", "{data}", "--option", "colours=3", "--shots", "1"], "backend 'features': bad options"),
    # memory budget
    (_select("{data}", "--memory-budget", "lots", "--out", "{root}/r1"), "cannot read memory budget 'lots'"),
    (_select("{data}", "--memory-budget", "0", "--out", "{root}/r2"), "memory budget must be positive"),
    (_select("{data}", "--memory-budget", "10KB", "--out", "{root}/r3"), "too small for one prompt"),
    # run folders
    (_select("{data}", "--out", "{root}/a_file"), "a_file: exists and is not a folder"),
    (_select("{data}", "--out", "/sys/promptopt-not-writable"), "/sys/promptopt-not-writable"),
    (_select("{data}", "--out", "{run}", "--strategy", "best-single", "--no-baselines", "--split-seed", "1"),
     "holds a different run"),
    (_select("{data}", "--out", "{root}/corrupt_state", "--strategy", "best-single", "--no-baselines"),
     "unreadable run state"),
    (_select("{data}", "--out", "{root}/foreign"), "holds no promptopt run"),
    # strategies
    (_select("{data}", "--strategy", "nope", "--out", "{root}/r4"), "unknown strategy 'nope'"),
    (_select("{data}", "--strategy", "best-single", "--k", "3", "--out", "{root}/r5"),
     "strategy 'best-single' has no option 'k'"),
    (_select("{data}", "--strategy", "retrieval", "--out", "{root}/r6"), "needs an index"),
    (["tune", "--data", "{data}", "--steps", "0", "--out", "{root}/r7", "--quiet", *SPLIT, *FAST],
     "steps must be at least 1"),
    (["tune", "--data", "{data}", "--init", "{root}/absent/prompt.json", "--out", "{root}/r8", *SPLIT],
     "absent/prompt.json: file not found"),
    # prompts and predict
    (_predict("{root}/absent"), "not found"),
    (_predict("{root}/prompt_classes"), "prompt.json: field 'num_classes' must be an integer"),
    (_predict("{root}/prompt_empty"), "prompt.json: holds no prompt examples"),
    (_predict("{root}/prompt_backend"), "prompt.json: field 'backend' must be a dict"),
    (_predict("{root}/prompt_missing_file"), "refers to missing file"),
    (_predict("{run}", out="{root}/a_file"), "a_file: exists and is not a folder"),
    (_predict("{run}", images="{root}/empty_images"), "empty_images: no images"),
    (_predict("{run}", images="{broken_image}/blob/images"), "b02.png"),
    (_predict("{run}", out="/sys/promptopt-masks"), "/sys/promptopt-masks"),
    (_predict("{run}") + ["--device", "cuda"], "--device cuda: CUDA is not available"),
]


def _files(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


def test_the_catalogue_is_long_enough() -> None:
    assert len(CATALOGUE) >= 25


@pytest.mark.parametrize("args, message", CATALOGUE, ids=[f"{i:02d}" for i in range(len(CATALOGUE))])
def test_bad_input_is_one_line_exit_2_and_damages_nothing(world, args, message) -> None:
    fill = {k: str(v) for k, v in world.items()}
    args = [a.format(**fill) for a in args]
    message = message.format(**fill)
    before = _files(world["run"])
    r = CliRunner().invoke(app, args)
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert message in lines[0], lines[0]
    assert _files(world["run"]) == before
