"""Several `promptopt search` processes on one study, over each storage: exactly --n-trials finished trials,
a worker SIGKILLed mid-trial has its trial retried by a survivor, a killed single-worker search resumes to the
uninterrupted answer, Ctrl-C leaves no traceback and queues the interrupted trial."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from promptopt.artifacts import read_json
from promptopt.cli import app
from promptopt.search.storage import open_storage
from promptopt.search.workers import FINISHED, void_trials

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

#: a `promptopt search` process that looks like a worker on another machine (so that only its heartbeat can
#: tell that it died) and hangs in the first trial it evaluates, after writing the trial's number to argv[1]
HANGING_WORKER = """
import sys, time
from pathlib import Path
import promptopt.search as search
import promptopt.search.workers as workers
from promptopt.cli import app

marker = Path(sys.argv[1])
if sys.argv[2] == "remote":
    workers.this_process = lambda: {"boot": "another-machine", "pidns": 1, "pid": 1, "start": "1"}

def hang(self, trial):
    marker.write_text(str(trial.number))
    time.sleep(600)

search.PromptSearch._evaluate = hang
app(sys.argv[3:], prog_name="promptopt")
"""

#: a `promptopt search` process that SIGKILLs itself in the middle of its argv[1]-th evaluation
DYING_WORKER = """
import os, signal, sys
import promptopt.search as search
from promptopt.cli import app

kill_at, seen = int(sys.argv[1]), []
evaluate = search.PromptSearch._evaluate

def dying(self, trial):
    seen.append(trial.number)
    if len(seen) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return evaluate(self, trial)

search.PromptSearch._evaluate = dying
app(sys.argv[2:], prog_name="promptopt")
"""


def search_args(data: Path, out: Path, storage: str | None, n_trials: int, heartbeat: int = 1) -> list[str]:
    args = ["search", "--data", str(data), "--category", "blob", "--out", str(out), "--n-trials", str(n_trials),
            "--max-k", "3", "--pool", "6", "--val", "3", "--test", "3", "--heartbeat", str(heartbeat), "--quiet"]
    return args + (["--storage", storage] if storage else [])


def start(script: str | None, *args: str) -> subprocess.Popen:
    head = [sys.executable, "-c", script] if script else [sys.executable, "-m", "promptopt.cli"]
    return subprocess.Popen([*head, *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def load(storage: str | None, out: Path) -> optuna.Study:
    return optuna.load_study(study_name="promptopt-blob", storage=open_storage(storage, out))


def wait_for(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def assert_exact_and_without_repeats(trials: list[optuna.trial.FrozenTrial], n_trials: int) -> None:
    """Exactly n finished trials; every other trial failed as lost or surplus (void); no configuration
    evaluated twice (a repeat takes its twin's outcome: duplicate_of)."""
    finished = [t for t in trials if t.state in FINISHED]
    assert len(finished) == n_trials
    assert [t.number for t in trials] == list(range(len(trials)))
    void = void_trials(trials)
    assert all(t.state == TrialState.FAIL and t.number in void for t in trials if t.state not in FINISHED)
    evaluated = [json.dumps(t.params, sort_keys=True) for t in finished if "duplicate_of" not in t.user_attrs]
    assert len(evaluated) == len(set(evaluated))
    for t in finished:
        if "duplicate_of" in t.user_attrs:
            twin = trials[t.user_attrs["duplicate_of"]]
            assert twin.params == t.params and twin.state == t.state and twin.value == t.value


@pytest.mark.timeout(300)
def test_three_workers_finish_exactly_n_trials_and_a_killed_workers_trial_is_retried(
        cluttered_dataset: Path, tmp_path: Path, study_storage: tuple[str, str]) -> None:
    """Three `promptopt search` processes on one study; one (posing as another machine) is SIGKILLed in the middle
    of a trial. Its heartbeat stops, a survivor fails the trial and runs its parameters again, and the study ends
    with exactly --n-trials finished trials, none evaluated twice. On one machine the three share a run folder and
    best/ is published once; with PostgreSQL each worker has its own folder (as on separate machines) and each
    publishes the same answer."""
    kind, url = study_storage
    n_trials = 6
    shared = kind != "postgresql"  # a journal or SQLite file: workers on one machine, sharing the run folder
    outs = [tmp_path / ("run" if shared else f"machine{i}") for i in range(3)]
    marker = tmp_path / "victim.trial"
    victim = start(HANGING_WORKER, str(marker), "remote", *search_args(cluttered_dataset, outs[0], url, n_trials))
    wait_for(lambda: marker.exists() or victim.poll() is not None, "the victim to start a trial")
    assert victim.poll() is None, victim.communicate()[1]
    survivors = [start(None, *search_args(cluttered_dataset, out, url, n_trials)) for out in outs[1:]]
    # the survivors are at work beside the victim's running trial; then the victim dies without a word
    study = load(url, outs[0])
    wait_for(lambda: any(t.state in FINISHED for t in study.get_trials(deepcopy=False))
             or any(p.poll() is not None for p in survivors), "a survivor to finish a trial")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    errs = []
    for p in survivors:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
        errs.append(err)

    trials = load(url, outs[0]).get_trials(deepcopy=False)
    assert_exact_and_without_repeats(trials, n_trials)
    lost = trials[int(marker.read_text())]
    assert lost.state == TrialState.FAIL and "error" not in lost.user_attrs  # failed by the heartbeat, not by itself
    retry = [t for t in trials if t.system_attrs.get("retry_history") == [lost.number]]
    assert len(retry) == 1 and retry[0].params == lost.params and retry[0].state in FINISHED
    assert retry[0].user_attrs["worker"] != lost.user_attrs["worker"]

    results = [read_json(out / "result.json") for out in dict.fromkeys(outs[1:])]
    published = [err.count("published best/") for err in errs]
    if shared:
        assert sum(published) == 1  # one survivor published; the other found the run finished
    else:
        assert published == [1, 1]
        keys = ("best_params", "val_miou", "test_miou", "best_trial", "selected", "trials", "top_trials")
        assert {json.dumps({k: r[k] for k in keys}, sort_keys=True) for r in results} == {
            json.dumps({k: results[0][k] for k in keys}, sort_keys=True)}
    for out, result in zip(dict.fromkeys(outs[1:]), results):
        assert result["n_trials"] == n_trials and result["trials"] == {"total": n_trials, **{
            s: sum(t.state.name.lower() == s for t in trials if t.number not in void_trials(trials))
            for s in ("complete", "pruned") if any(t.state.name.lower() == s for t in trials)}}
        assert read_json(out / "best" / "prompt.json")["extra"]["val_miou"] == pytest.approx(result["val_miou"],
                                                                                               abs=1e-12)
        assert not list(out.glob(".best*"))  # no half-published copy left behind


@pytest.mark.timeout(300)
def test_a_search_killed_mid_trial_resumes_to_the_uninterrupted_answer(cluttered_dataset: Path,
                                                                        tmp_path: Path) -> None:
    """One worker, SIGKILLed in the middle of its third evaluation, then rerun at once: the rerun sees that the
    trial's process (on this machine) has ended, retries its parameters first, and draws every later trial as the
    uninterrupted search did, so result.json (best configuration, val and test scores, trial counts) is the same.
    The heartbeat is slow here (a 60 s grace period): only the dead process can tell the rerun to go on at once."""
    n_trials = 6
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    plain = start(None, *search_args(cluttered_dataset, whole, None, n_trials, heartbeat=30))
    dying = start(DYING_WORKER, "3", *search_args(cluttered_dataset, killed, None, n_trials, heartbeat=30))
    assert plain.communicate(timeout=240)[0] is not None and plain.returncode == 0
    dying.communicate(timeout=240)
    assert dying.returncode == -signal.SIGKILL
    held = [t for t in load(None, killed).get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    assert len(held) == 1  # the trial the kill interrupted, left RUNNING
    rerun = start(None, *search_args(cluttered_dataset, killed, None, n_trials, heartbeat=30))
    _, err = rerun.communicate(timeout=240)
    assert rerun.returncode == 0, err

    trials = load(None, killed).get_trials(deepcopy=False)
    assert_exact_and_without_repeats(trials, n_trials)
    lost = trials[held[0].number]
    assert lost.state == TrialState.FAIL and lost.user_attrs["error"].startswith("worker lost: its worker")
    assert trials[lost.number + 1].system_attrs["retry_history"] == [lost.number]
    assert trials[lost.number + 1].params == lost.params
    a, b = read_json(whole / "result.json"), read_json(killed / "result.json")
    for r in (a, b):
        r.pop("storage"), r.pop("command")
    assert b == a
    assert read_json(killed / "cost.json")["void_trials"][0]["number"] == lost.number
    assert read_json(whole / "cost.json")["void_trials"] == []


@pytest.mark.timeout(240)
def test_ctrl_c_interrupts_without_a_traceback_and_the_rerun_evaluates_the_interrupted_trial(
        cluttered_dataset: Path, tmp_path: Path) -> None:
    """SIGINT in the middle of a trial: exit code 130, one line and no Optuna traceback; the trial is failed and
    its parameters queued, and the same command then finishes the study, evaluating them first."""
    out, marker = tmp_path / "run", tmp_path / "trial"
    args = search_args(cluttered_dataset, out, None, 3)
    p = start(HANGING_WORKER, str(marker), "local", *args)
    wait_for(lambda: marker.exists() or p.poll() is not None, "a trial to start")
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    trials = load(None, out).get_trials(deepcopy=False)
    stopped = trials[int(marker.read_text())]
    assert stopped.state == TrialState.FAIL and stopped.user_attrs["interrupted"] == "Ctrl-C"
    queued = [t for t in trials if t.state == TrialState.WAITING]
    assert len(queued) == 1 and queued[0].params == stopped.params

    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    trials = load(None, out).get_trials(deepcopy=False)
    assert_exact_and_without_repeats(trials, 3)
    assert trials[queued[0].number].state in FINISHED
    assert read_json(out / "cost.json")["void_trials"][0]["why"].startswith("interrupted (Ctrl-C); run again as trial")


@pytest.mark.timeout(600)
def test_a_search_killed_at_each_point_in_turn_resumes_to_the_uninterrupted_answer(cluttered_dataset: Path,
                                                                                   tmp_path: Path) -> None:
    """Every kill point of a single-worker search in turn — SIGKILL in the middle of each evaluation, and right
    after each write of the run's state (before the first trial; after the result is published) — then the same
    command again: result.json equals the uninterrupted search's in every number (best configuration, val and
    test scores, trial counts), and the rerun of a finished search changes no file."""
    n_trials = 3
    whole = tmp_path / "whole"
    plain = start(None, *search_args(cluttered_dataset, whole, None, n_trials, heartbeat=30))
    assert plain.communicate(timeout=240)[0] is not None and plain.returncode == 0
    trials = load(None, whole).get_trials(deepcopy=False)
    evaluations = sum(1 for t in trials if t.state in FINISHED and "duplicate_of" not in t.user_attrs)
    assert evaluations >= 2
    reference = read_json(whole / "result.json")
    reference.pop("storage"), reference.pop("command")

    points = [("evaluation", n) for n in range(1, evaluations + 1)] + [("state write", 1), ("state write", 2)]
    for kind, n in points:
        out = tmp_path / f"killed-{kind.replace(' ', '-')}-{n}"
        args = search_args(cluttered_dataset, out, None, n_trials, heartbeat=30)
        if kind == "evaluation":
            dying = start(DYING_WORKER, str(n), *args)
        else:
            dying = subprocess.Popen([sys.executable, "-m", "promptopt.cli", *args],
                                     env={**ENV, "PROMPTOPT_KILL_AFTER_SAVES": str(n)},
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        dying.communicate(timeout=240)
        assert dying.returncode == -signal.SIGKILL, f"{kind} {n}: the kill point was never reached"
        rerun = start(None, *args)
        _, err = rerun.communicate(timeout=240)
        assert rerun.returncode == 0, f"{kind} {n}: {err}"
        got = read_json(out / "result.json")
        got.pop("storage"), got.pop("command")
        assert got == reference, f"killed at {kind} {n}"
        assert_exact_and_without_repeats(load(None, out).get_trials(deepcopy=False), n_trials)

    finished = {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in whole.rglob("*") if p.is_file()}
    again = start(None, *search_args(cluttered_dataset, whole, None, n_trials, heartbeat=30))
    assert again.communicate(timeout=240)[0] is not None and again.returncode == 0
    assert {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in whole.rglob("*") if p.is_file()} == finished
