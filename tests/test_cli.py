"""The promptopt command end to end on the bundled sample (through Typer's runner, in-process)."""

import base64
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from promptopt.cli import app
from promptopt.data import load_dataset, split_samples

runner = CliRunner()
FAST = ["--option", "max_side=96", "--option", "pixels_per_prompt=256"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_evaluate_json(sample_root):
    r = run("evaluate", "--data", sample_root, "--category", "dog", "--shots", "2", "--json", *FAST)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert 0.0 <= doc["val"]["miou"] <= 1.0 and 0.0 <= doc["test"]["miou"] <= 1.0
    assert set(doc["split"]) == {"pool", "val", "test"}
    assert len(doc["prompts"]) == 2 and set(doc["prompts"]) <= set(doc["split"]["pool"])
    assert set(doc["val"]["per_image_iou"]) == set(doc["split"]["val"])
    assert set(doc["test"]["per_image_iou"]) == set(doc["split"]["test"])


def test_evaluate_named_prompts_table(sample_root):
    pool = split_samples(load_dataset(sample_root, category="dog").samples(), seed=0).pool
    r = run("evaluate", "--data", sample_root, "--category", "dog", "--prompts", f"{pool[0].id},{pool[1].id}", *FAST)
    assert r.exit_code == 0, r.output
    assert "val" in r.stdout and "test" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--backend", "nope", "--shots", "1"], "unknown backend 'nope'"),
    (["--prompts", "99999", ], "prompt id '99999' is not in the prompt pool"),
    (["--shots", "1", "--category", "zebra"], "unknown category 'zebra'"),
    (["--shots", "1", "--num-classes", "1"], "num_classes must be at least 2"),
    ([], "give exactly one of --prompts"),
])
def test_evaluate_errors(sample_root, args, message):
    base = ["evaluate", "--data", sample_root]
    if "--category" not in args:
        base += ["--category", "dog"]
    r = run(*base, *args)
    assert r.exit_code == 2
    assert message in r.output
    assert "Traceback" not in r.output


def test_missing_data_dir(tmp_path):
    r = run("evaluate", "--data", tmp_path / "absent", "--shots", "1")
    assert r.exit_code == 2 and "data folder not found" in r.output


def test_mask_size_error_via_cli(tmp_path, sample_root):
    root = tmp_path / "d"
    shutil.copytree(sample_root / "dog", root / "dog")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "dog" / "masks" / "00000.png")
    r = run("evaluate", "--data", root, "--shots", "1")
    assert r.exit_code == 2 and "00000.png: mask size 5x5 does not match" in r.output


def test_select_predict_roundtrip(sample_root, tmp_path):
    out = tmp_path / "run"
    r = run("select", "--data", sample_root, "--category", "camel", "--strategy", "forward", "--max-prompts", "2",
            "--random-seeds", "3", "--memory-budget", "2GiB", "--out", out, *FAST)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "result.json").read_text())
    for key in ("strategy", "backend", "category", "selected", "val_miou", "test_miou", "test_per_image_iou",
                "baselines", "split", "memory", "evaluations", "metric"):
        assert key in res
    assert res["strategy"] == "forward" and res["backend"] == "features" and res["category"] == "camel"
    assert 1 <= len(res["selected"]) <= 2
    assert set(res["baselines"]) == {"random", "best-single", "random-search", "worst-case"}
    assert set(res["baselines"]["random"]["extra"]["test"]) == {"mean", "std"}
    assert set(res["baselines"]["random"]["extra"]["val"]) == {"mean", "std"}
    assert res["baselines"]["random-search"]["evaluations"] == res["evaluations"]  # same oracle budget
    assert res["memory"]["budget_bytes"] == 2 * 1024**3 and res["memory"]["estimated_peak_bytes"] > 0
    assert set(res["split"]) == {"pool", "val", "test"}
    assert set(res["test_per_image_iou"]) == set(res["split"]["test"])
    for f in ("prompt.json", "report.md", "report.html", "steps.png", "strategies.png", "prompts.png",
              "predictions.png", "per_image.csv", "cost.json"):
        assert (out / f).is_file(), f
    report = (out / "report.md").read_text()
    assert "![" in report and "foreground IoU" in report and "Worst test images" in report
    # report.html stands alone: Markdown rendered (tables, bold), every figure embedded as the PNG's own bytes
    page = (out / "report.html").read_text()
    assert "<table>" in page and "<strong>" in page and "**" not in page and "](" not in page
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(embedded) == len(figures) >= 4
    assert [base64.b64decode(e) for e in embedded] == [(out / f).read_bytes() for f in figures]
    # the random baseline's row pairs like with like: val and test are both means over its seeds, with the test std
    rnd = res["baselines"]["random"]
    assert (f"| random | {len(rnd['selected'])} | {rnd['extra']['val']['mean']:.3f} | {rnd['extra']['test']['mean']:.3f} "
            f"| {rnd['extra']['test']['std']:.3f} |") in report
    # predict with the saved prompt, from its own copies of the prompt files
    images = tmp_path / "new"
    images.mkdir()
    test_ids = res["split"]["test"][:2]
    for i in test_ids:
        shutil.copy(sample_root / "camel" / "images" / f"{i}.jpg", images / f"{i}.jpg")
    r = run("predict", "--prompt", out / "prompt.json", "--images", images, "--out", tmp_path / "masks")
    assert r.exit_code == 0, r.output
    for i in test_ids:
        m = np.asarray(Image.open(tmp_path / "masks" / f"{i}.png"))
        assert m.shape == (180, 320) and set(np.unique(m)) <= {0, 255}


def test_select_budget_too_small(sample_root, tmp_path):
    r = run("select", "--data", sample_root, "--category", "dog", "--memory-budget", "10KB", "--out", tmp_path / "r", *FAST)
    assert r.exit_code == 2 and "too small for one prompt" in r.output
    assert not (tmp_path / "r").exists()  # a failed start leaves no folder behind


def test_select_all_categories_writes_summary(sample_root, tmp_path):
    root = tmp_path / "two"
    for c in ("blackswan", "dog"):
        shutil.copytree(sample_root / c, root / c)
    r = run("select", "--data", root, "--strategy", "best-single", "--no-baselines", "--out", tmp_path / "r", *FAST)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "r" / "blackswan" / "result.json").is_file()
    assert (tmp_path / "r" / "dog" / "result.json").is_file()
    assert "| blackswan |" in (tmp_path / "r" / "summary.md").read_text()


def test_predict_unreadable_image(sample_root, tmp_path):
    out = tmp_path / "run"
    r = run("select", "--data", sample_root, "--category", "dog", "--strategy", "best-single", "--no-baselines",
            "--out", out, *FAST)
    assert r.exit_code == 0, r.output
    bad = tmp_path / "imgs"
    bad.mkdir()
    (bad / "broken.jpg").write_bytes(b"not a jpeg")
    r = run("predict", "--prompt", out, "--images", bad, "--out", tmp_path / "m")
    assert r.exit_code == 2 and "broken.jpg: unreadable image" in r.output


def test_demo_one_object(tmp_path):
    r = run("demo", "--out", tmp_path / "demo", "--max-prompts", "2", "--category", "dog", "--quiet")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "demo" / "report.md").is_file() and (tmp_path / "demo" / "result.json").is_file()
    assert "report:" in r.stdout and "dog: forward" in r.stdout


def test_progress_is_plain_periodic_lines_off_a_terminal_and_quiet_silences_it(tmp_path):
    """A job log gets a line per label at most every interval (with elapsed time and ETA) and at completion."""
    import io

    from promptopt.progress import LogLines

    now = [0.0]
    stream = io.StringIO()
    log = LogLines(stream, interval=10.0, clock=lambda: now[0])
    for step in range(0, 101):
        now[0] = step * 1.0  # one second a step
        log("tuning step", step, 100)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "tuning step 0/100  elapsed 0:00  eta -"
    assert lines[1] == "tuning step 10/100  elapsed 0:10  eta 1:30"
    assert lines[-1] == "tuning step 100/100  elapsed 1:40" and len(lines) == 11
    args = ["evaluate", "--data", str(tmp_path / "none"), "--shots", "1"]
    assert "elapsed" not in run(*args).output
    quiet_run = run("select", "--data", bundled_root(), "--category", "dog", "--strategy", "best-single",
                    "--no-baselines", "--out", tmp_path / "q", "--quiet", *FAST)
    loud_run = run("select", "--data", bundled_root(), "--category", "dog", "--strategy", "best-single",
                   "--no-baselines", "--out", tmp_path / "l", *FAST)
    assert quiet_run.exit_code == loud_run.exit_code == 0
    assert "elapsed" not in quiet_run.output and "candidates 10/10  elapsed" in loud_run.output


def bundled_root():
    from promptopt.data import bundled_sample_root

    return bundled_sample_root()


@pytest.mark.parametrize("command", [[], ["evaluate"], ["select"], ["tune"], ["predict"], ["search"], ["demo"],
                                     ["index"], ["index", "build"], ["index", "query"]])
def test_help_shows_no_value_on_flags(command) -> None:
    """A flag takes no value (``--json true`` is an error), so the help must not show ``<bool>`` beside any flag —
    ``--help`` itself included, which typer labels so by default."""
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "--help" in result.output
    assert "<bool>" not in result.output
