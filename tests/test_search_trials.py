"""One worker's trials: failures are recorded and the search goes on, repeats are reused, seeds give fresh settings
on every extension and equal values for equal settings, samplers are chosen by name, bad storages and foreign
studies are one clear line with nothing written, and a worker on "another machine" refits the best prompt."""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState
from PIL import Image
from typer.testing import CliRunner

from promptopt.artifacts import read_json
from promptopt.backends.features import FeaturesBackend
from promptopt.cli import app
from promptopt.errors import ConfigError
from promptopt.search import SAMPLERS, PromptSearch, SearchError, params_seed, run_search
from promptopt.search.workers import FINISHED, is_surplus, sampler_seed
from promptopt.strategies.registry import make_strategy
from promptopt.task import Task

SMALL = dict(max_k=2, heartbeat_interval=1)


def _task(root: Path, seed: int = 0) -> Task:
    return Task.from_folder(root, "blob", pool=6, val=3, test=3, seed=seed)


# --- failures ------------------------------------------------------------------------------------------------
def test_a_trial_that_raises_is_failed_with_its_message_and_the_search_goes_on(cluttered_dataset: Path, tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA out-of-memory error in the settings that need the most memory: those trials fail with the message,
    the worker goes on to finish --n-trials trials, and result.json and the report list the failures."""
    prepare = FeaturesBackend.prepare

    def out_of_memory(self: FeaturesBackend, samples) -> None:
        if self.pixels_per_prompt == 2048:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        prepare(self, samples)

    monkeypatch.setattr(FeaturesBackend, "prepare", out_of_memory)
    task, storage, notes = _task(cluttered_dataset), str(tmp_path / "study.log"), []
    kwargs = dict(storage=storage, strategies=["forward"], n_trials=4, sampler="random", log=notes.append, **SMALL)
    PromptSearch(task, tmp_path / "run", **kwargs).open_study().enqueue_trial({"features.pixels_per_prompt": 2048})
    res = run_search(task, tmp_path / "run", **kwargs)

    trials = PromptSearch(task, tmp_path / "run", **kwargs).open_study().trials
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert failed and trials[0] in failed
    assert all(t.params["features.pixels_per_prompt"] == 2048 for t in failed)
    assert all(t.params["features.pixels_per_prompt"] != 2048 for t in trials if t.state in FINISHED)
    assert sum(t.state in FINISHED for t in trials) == 4
    message = "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert all(t.user_attrs["error"] == message for t in failed)
    assert f"trial 0 failed: {message}" in notes
    assert [f["error"] for f in res["failed_trials"]] == [message] * len(failed)
    assert res["trials"]["failed"] == len(failed) and res["trials"]["total"] == 4 + len(failed)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Failed trials" in report and message in report


def test_trials_that_keep_failing_stop_the_search_with_the_last_error(cluttered_dataset: Path, tmp_path: Path) -> None:
    """A validation image corrupted after the dataset was scanned: every trial fails reading it, and after
    max_failures failures in a row the search stops with one error naming the file."""
    task = _task(cluttered_dataset)
    bad = task.split.val[0].path
    bad.write_bytes(bad.read_bytes()[:60])  # the header (and size) survive, the pixels do not
    expected = rf"2 trials in a row failed; the last, trial 1: DataError: {re.escape(str(bad))}: unreadable image"
    with pytest.raises(SearchError, match=expected):
        PromptSearch(task, tmp_path / "run", n_trials=3, max_failures=2, **SMALL).fit()


def test_a_running_trial_no_worker_ever_claimed_is_failed_after_the_grace_period_and_run_again(
        blob_dataset: Path, tmp_path: Path) -> None:
    """A trial left RUNNING without heartbeat or worker (killed right after its creation, or by an older promptopt)
    no longer holds its slot forever: after the grace period it is failed and queued again."""
    kwargs = dict(n_trials=2, tune_backend=False, **SMALL)
    study = PromptSearch(_task(blob_dataset), tmp_path / "run", **kwargs).open_study()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        orphan = study.ask()
    PromptSearch(_task(blob_dataset), tmp_path / "run", **kwargs).fit()
    trials = study.trials
    assert trials[orphan.number].state == TrialState.FAIL
    assert trials[orphan.number].user_attrs["error"] == "worker lost: no worker claimed it for 2 s"
    assert [t.system_attrs.get("retry_history") for t in trials if t.state in FINISHED] == [None, [orphan.number]]


# --- no repeated work, seeds -----------------------------------------------------------------------------------
def test_a_configuration_already_evaluated_is_not_run_again(blob_dataset: Path, tmp_path: Path) -> None:
    """best-single has no knobs: every trial asks for the same configuration; only the first evaluates it, the
    others take its value and prompt (no model forward)."""
    res = run_search(_task(blob_dataset), tmp_path / "run", strategies=["best-single"], tune_backend=False, n_trials=3,
                     **SMALL)
    study = PromptSearch(_task(blob_dataset), tmp_path / "run", strategies=["best-single"], tune_backend=False,
                         **SMALL).open_study()
    first, *others = study.trials
    assert first.user_attrs["forwards"] > 0 and "duplicate_of" not in first.user_attrs
    for t in others:
        assert t.user_attrs["duplicate_of"] == 0 and t.value == first.value and "forwards" not in t.user_attrs
        assert t.user_attrs["prompt"] == first.user_attrs["prompt"] and t.user_attrs["selected"] == res["selected"]
    assert read_json(tmp_path / "run" / "cost.json")["duplicates"] == {"1": 0, "2": 0}


def test_extending_a_study_draws_fresh_settings(cluttered_dataset: Path, tmp_path: Path) -> None:
    """--n-trials 3, then 6 in a new process-like call with the same seed: the new trials are not the first
    three again (the sampler's seed follows the trial's position, not the call)."""
    task = _task(cluttered_dataset)
    kwargs = dict(sampler="random", n_trials=3, **SMALL)
    PromptSearch(task, tmp_path / "run", **kwargs).fit()
    study = PromptSearch(task, tmp_path / "run", **{**kwargs, "n_trials": 6}).fit().study_
    params = [t.params for t in study.trials]
    assert len(params) == 6 and all(params[i] != params[i - 3] for i in range(3, 6))


def test_sampler_seeds_differ_by_position_and_by_concurrent_worker() -> None:
    """Each trial's sampler seed depends on the study seed, the trial's position and (while others run) the worker."""
    seeds = {sampler_seed(0, k) for k in range(50)} | {sampler_seed(0, 7, w) for w in ("a", "b")} | {sampler_seed(1, 7)}
    assert len(seeds) == 53
    assert sampler_seed(0, 7) == sampler_seed(0, 7) and sampler_seed(None, 7) != sampler_seed(None, 7)


def test_equal_settings_give_equal_values_at_any_trial_number(cluttered_dataset: Path, tmp_path: Path) -> None:
    """random-search's inner seed derives from the trial's parameters: the same configuration scores the same as
    trial 0 of one study and trial 1 of another (searched with another sampler seed), and that seed matters."""
    task = _task(cluttered_dataset)
    config = {"strategy": "random-search", "random-search.k": 2, "random-search.n_trials": 10}
    kwargs = dict(strategies=["random-search"], tune_backend=False, **SMALL)
    a = PromptSearch(task, tmp_path / "a", n_trials=1, **kwargs)
    a.open_study().enqueue_trial(config)
    b = PromptSearch(task, tmp_path / "b", n_trials=2, seed=5, **kwargs)
    b.open_study().enqueue_trial({**config, "random-search.k": 1})
    b.open_study().enqueue_trial(config)
    va, vb = a.fit().study_.trials[0], b.fit().study_.trials[1]
    assert va.params == vb.params == config and va.value == vb.value
    oracle = a._backend({})[1]
    other_seed = make_strategy("random-search", oracle, k=2, n_trials=10, seed=params_seed(config) + 1).fit(task.pool)
    assert other_seed.score_ != va.value


@pytest.mark.parametrize("sampler", ["tpe", "random", "gp"])
def test_each_sampler_runs_a_search(blob_dataset: Path, tmp_path: Path, sampler: str) -> None:
    res = run_search(_task(blob_dataset), tmp_path / "run", sampler=sampler, tune_backend=False, n_trials=3, **SMALL)
    assert res["sampler"] == sampler and res["trials"]["total"] == 3


def test_sampler_choice_errors_are_clear(blob_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--sampler 'nope': choose one of tpe, random, gp, cmaes"):
        PromptSearch(_task(blob_dataset), tmp_path / "run", sampler="nope")
    assert SAMPLERS == ("tpe", "random", "gp", "cmaes")
    try:
        import cmaes  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"--sampler cmaes needs the cmaes package \(pip install cmaes\)"):
            PromptSearch(_task(blob_dataset), tmp_path / "run", sampler="cmaes")
    else:
        res = run_search(_task(blob_dataset), tmp_path / "run", sampler="cmaes", n_trials=2, **SMALL)
        assert res["sampler"] == "cmaes"
    r = CliRunner().invoke(app, ["search", "--data", str(blob_dataset), "--out", str(tmp_path / "cli"),
                                 "--sampler", "nope"])
    assert r.exit_code == 2 and "--sampler 'nope'" in r.output and not (tmp_path / "cli").exists()


def test_the_slot_rule_counts_finished_and_lower_numbered_held_trials() -> None:
    """A trial may run while fewer than n trials are finished or held (running, waiting) by a lower number."""
    states = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING)
    trials = [optuna.trial.FrozenTrial(number=i, state=s, value=None, datetime_start=None, datetime_complete=None,
                                       params={}, distributions={}, user_attrs={}, system_attrs={},
                                       intermediate_values={}, trial_id=i) for i, s in enumerate(states)]
    assert not is_surplus(trials, 3, 3)  # finished: 0; held below 3: 1 → 2 < 3
    assert is_surplus(trials, 4, 3)  # finished: 0; held below 4: 1 and 3 → 3
    assert is_surplus(trials, 3, 2) and not is_surplus(trials, 1, 2)  # the failed trial 2 holds nothing


# --- storages: bad input, foreign studies, another machine -------------------------------------------------
@pytest.mark.parametrize("url, why", [
    ("postgresql://promptopt:s3cret@127.0.0.1:1/db", r"connection failed.*refused|Connection refused"),
    ("postgresql://promptopt:s3cret@127.0.0.1:port/db", r"port"),
    ("nosuch://promptopt:s3cret@localhost/db", r"nosuch"),
])
def test_an_unreachable_or_malformed_storage_is_one_line_and_nothing_is_written(blob_dataset: Path, tmp_path: Path,
                                                                                url: str, why: str) -> None:
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        run_search(_task(blob_dataset), out, storage=url, n_trials=1, **SMALL)
    message = str(err.value)
    assert message.startswith("--storage ") and "***" in message and "s3cret" not in message
    assert "\n" not in message and re.search(why, message), message
    assert not out.exists()
    r = CliRunner().invoke(app, ["search", "--data", str(blob_dataset), "--out", str(out), "--storage", url])
    assert r.exit_code == 2 and r.output.strip().startswith("error: --storage") and "s3cret" not in r.output
    assert not out.exists()


@pytest.mark.postgres
def test_wrong_credentials_are_one_line_and_nothing_is_written(blob_dataset: Path, tmp_path: Path,
                                                               postgres_server) -> None:
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="password authentication failed") as err:
        run_search(_task(blob_dataset), out, storage=postgres_server.url(password="n0t-it"), n_trials=1, **SMALL)
    assert "n0t-it" not in str(err.value) and not out.exists()


def test_a_study_made_for_another_task_is_refused_and_nothing_is_written(blob_dataset: Path, tmp_path: Path,
                                                                         study_storage: tuple[str, str]) -> None:
    _, url = study_storage
    run_search(_task(blob_dataset), tmp_path / "a", storage=url, strategies=["forward"], n_trials=1, **SMALL)
    other = tmp_path / "b"
    with pytest.raises(ConfigError, match="study 'promptopt-blob' in .* was made for another task") as err:
        run_search(_task(blob_dataset, seed=1), other, storage=url, strategies=["forward"], n_trials=2, **SMALL)
    assert "pw-for-tests" not in str(err.value) and not other.exists()
    study = PromptSearch(_task(blob_dataset), tmp_path / "a", storage=url, strategies=["forward"], **SMALL).open_study()
    assert len(study.trials) == 1


def test_a_worker_in_another_folder_refits_the_best_prompt_and_checks_it(cluttered_dataset: Path,
                                                                         tmp_path: Path) -> None:
    """Two "machines" share an SQLite study but not their run folders: the second finds the study complete, refits
    the best configuration (its seed derives from its parameters) and publishes the same prompt and scores. A third
    whose images differ under the same names gets another val mIoU for that configuration: an error, not a prompt."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    kwargs = dict(storage=url, n_trials=3, **SMALL)
    a = run_search(_task(cluttered_dataset), tmp_path / "m1", **kwargs)
    b = run_search(_task(cluttered_dataset), tmp_path / "m2", **kwargs)
    assert read_json(tmp_path / "m2" / "cost.json")["trials_run_by_this_call"] == []
    assert b == a
    best = read_json(tmp_path / "m1" / "cost.json")["best_trial_number"]
    assert [p.name for p in (tmp_path / "m2" / "trials").iterdir()] == [f"{best:04d}"]  # only the best was refitted
    p1, p2 = (read_json(tmp_path / m / "best" / "prompt.json") for m in ("m1", "m2"))
    assert p2["examples"] == p1["examples"] and p2["extra"]["val_miou"] == p1["extra"]["val_miou"]

    changed = tmp_path / "changed"
    shutil.copytree(cluttered_dataset, changed)
    task = _task(changed)
    for s in task.split.val:
        Image.fromarray(np.ascontiguousarray(np.asarray(Image.open(s.path))[::-1])).save(s.path)
    with pytest.raises(SearchError, match="the data or the software differ between workers"):
        run_search(_task(changed), tmp_path / "m3", **kwargs)
