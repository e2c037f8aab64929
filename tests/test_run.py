"""Runs resume without changing an answer: killed at every state write (in process and by SIGKILL), rerun,
the result equals an uninterrupted run's; a finished run is returned untouched; another run in the folder,
a damaged state or a failed start are handled explicitly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import count_state_writes, kill_after_state_write

from promptopt.artifacts import read_json
from promptopt.backends import BackendSpec
from promptopt.errors import BudgetError, ConfigError
from promptopt.run import KILL_ENV, Run, run_strategy
from promptopt.task import Task

FAST = {"max_side": 48, "pixels_per_prompt": 128}


def _task(root: Path, seed: int = 0) -> Task:
    return Task.from_folder(root, "blob", pool=6, val=3, test=3, seed=seed)


def _select(task: Task, out: Path, **kw):
    return run_strategy(task, BackendSpec("features", None, FAST), out, "forward", {"max_prompts": 3},
                        random_seeds=2, **kw)


def _select_cv(task: Task, out: Path):
    """Forward selection scored by the cross-validated oracle, kept by the bootstrap rule."""
    return run_strategy(task, BackendSpec("features", None, FAST), out, "forward",
                        {"max_prompts": 3, "patience": 2, "rule": "bootstrap"}, oracle="cv", random_seeds=2)


def _tune(task: Task, out: Path):
    return run_strategy(task, BackendSpec("features", None, FAST), out, "tuned",
                        {"steps": 6, "eval_every": 2, "batch_size": 2, "warmup": 1, "patience": None})


def _files(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("kind", ["select", "select-cv", "tune"])
def test_killed_at_every_state_write_then_rerun_equals_uninterrupted(kind, blob_dataset: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    task = _task(blob_dataset)
    go = {"select": lambda out: _select(task, out), "select-cv": lambda out: _select_cv(task, out),
          "tune": lambda out: _tune(task, out)}[kind]
    saves, _ = count_state_writes(monkeypatch, lambda: go(tmp_path / "reference"))
    reference = read_json(tmp_path / "reference" / "result.json")
    assert saves >= 4  # steps or evaluations, each baseline, the finish: every one is a kill point below
    for n in range(1, saves):
        out = tmp_path / f"killed-{n}"
        kill_after_state_write(monkeypatch, n, lambda: go(out))
        assert not (out / "result.json").exists()
        assert go(out) == reference, f"killed after state write {n}"
        assert (out / "per_image.csv").read_bytes() == (tmp_path / "reference" / "per_image.csv").read_bytes()


def test_finished_run_does_no_model_work_and_changes_no_file(blob_dataset: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    task = _task(blob_dataset)
    first = _select(task, tmp_path / "run")
    before = _files(tmp_path / "run")

    def no_model(*_a, **_k):
        raise AssertionError("a finished run built its backend")

    monkeypatch.setattr(BackendSpec, "build", no_model)
    assert _select(task, tmp_path / "run") == first
    assert _files(tmp_path / "run") == before


def test_another_run_in_the_folder_is_refused_or_replaced_with_restart(blob_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = _select(_task(blob_dataset, seed=0), out)
    with pytest.raises(ConfigError, match=r"holds a different run \(.*split_seed: 0 → 1.*--restart"):
        _select(_task(blob_dataset, seed=1), out)
    assert read_json(out / "result.json") == first  # the refused command damaged nothing
    second = _select(_task(blob_dataset, seed=1), out, restart=True)
    assert second["split_seed"] == 1
    kept = {p.name for p in (out / "prompts").iterdir()}
    assert kept == {f"{i}{suffix}" for i in second["selected"] for suffix in (".png", "_mask.png")}  # no stale files


def test_a_failed_start_leaves_no_folder(blob_dataset: Path, tmp_path: Path) -> None:
    task = _task(blob_dataset)
    with pytest.raises(BudgetError, match="too small for one prompt"):
        _select(task, tmp_path / "budget", memory_budget="1KB")
    assert not (tmp_path / "budget").exists()
    with pytest.raises(ConfigError, match="strategy 'forward' has no option 'steps'"):
        run_strategy(task, BackendSpec("features", None, FAST), tmp_path / "option", "forward", {"steps": 3})
    assert not (tmp_path / "option").exists()


def test_a_damaged_state_is_an_error_and_restart_starts_over(blob_dataset: Path, tmp_path: Path) -> None:
    task = _task(blob_dataset)
    out = tmp_path / "run"
    first = _select(task, out)
    state = out / "state.json"
    doc = json.loads(state.read_text())
    doc["body"]["steps"]["baseline/random-search"]["val_miou"] = 0.999  # a hand edit that would change the answer
    state.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="modified outside promptopt"):
        _select(task, out)
    state.write_text(state.read_text()[:100])  # a torn file
    with pytest.raises(ConfigError, match="unreadable run state"):
        _select(task, out)
    assert _select(task, out, restart=True) == first


def test_a_folder_of_other_files_is_never_taken_over(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(ConfigError, match="holds no promptopt run"):
        Run(tmp_path / "mine", {"x": 1}, restart=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        Run(tmp_path / "file", {"x": 1})


@pytest.mark.parametrize("command", ["select", "tune"])
def test_sigkill_mid_run_then_the_same_command_gives_the_uninterrupted_result(command, blob_dataset: Path,
                                                                              tmp_path: Path) -> None:
    """A real SIGKILL of the CLI process (after its second state write), then the same command again."""
    extra = ["--max-prompts", "3", "--random-seeds", "2"] if command == "select" else \
        ["--steps", "6", "--eval-every", "2", "--batch-size", "2", "--warmup", "1", "--patience", "0"]
    args = [sys.executable, "-m", "promptopt.cli", command, "--data", str(blob_dataset), "--category", "blob",
            "--pool", "6", "--val", "3", "--test", "3", "--quiet", "--option", "max_side=48",
            "--option", "pixels_per_prompt=128", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    ref = subprocess.run(args + ["--out", str(tmp_path / "ref")], env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    killed = subprocess.run(args + ["--out", str(tmp_path / "run")], env={**env, KILL_ENV: "2"},
                            capture_output=True, text=True)
    assert killed.returncode == -9 and not (tmp_path / "run" / "result.json").exists()
    again = subprocess.run(args + ["--out", str(tmp_path / "run")], env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr

    def numbers(folder: Path) -> dict:
        doc = read_json(folder / "result.json")
        doc.pop("command")  # the command line names its own --out
        return doc

    assert numbers(tmp_path / "run") == numbers(tmp_path / "ref")


def test_a_cuda_out_of_memory_becomes_one_line_and_the_run_stays_resumable(blob_dataset: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """An OOM the estimate did not foresee (another process took the GPU) names the step and the budget; the
    finished steps are kept and the same command finishes the run with the uninterrupted answer."""
    import torch

    from promptopt.backends.features import FeaturesBackend

    task = _task(blob_dataset)
    reference = _select(task, tmp_path / "reference", memory_budget="1GiB")
    real = FeaturesBackend.pair_stats
    test_keys = {s.key for s in task.split.test}

    def flaky(self, prompt, query, num_classes):
        if query.key in test_keys:  # the first test image is scored by the first baseline, after forward selection
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, prompt, query, num_classes)

    monkeypatch.setattr(FeaturesBackend, "pair_stats", flaky)
    with pytest.raises(BudgetError, match=r"out of GPU memory during baseline .*budget 1\.0 GiB"):
        _select(task, tmp_path / "run", memory_budget="1GiB")
    assert (tmp_path / "run" / "state.json").is_file() and not (tmp_path / "run" / "result.json").exists()
    monkeypatch.setattr(FeaturesBackend, "pair_stats", real)
    assert _select(task, tmp_path / "run", memory_budget="1GiB") == reference


def test_output_files_get_the_users_umask_not_private_modes(blob_dataset: Path, tmp_path: Path) -> None:
    """Atomic writes go through mkstemp (mode 0600); results must be readable like any file the user creates."""
    old = os.umask(0o022)
    try:
        _select(_task(blob_dataset), tmp_path / "run")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert modes and set(modes.values()) == {0o644}, modes
