"""Every strategy that spends memory respects the budget the same way: it never scores a set whose estimate
exceeds it, and refuses with the needed figure when not even the smallest useful set fits; a search prunes
a trial that cannot fit, naming why."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from promptopt.backends.features import FeaturesBackend
from promptopt.errors import BudgetError
from promptopt.oracle import ValidationOracle
from promptopt.strategies import BestSingle, RandomK, RandomSearch, WorstCaseGreedy, make_strategy
from promptopt.task import Task

FAST = {"max_side": 48, "pixels_per_prompt": 128}


class MeteredBackend(FeaturesBackend):
    """The features backend with a memory figure of exactly 100 bytes per prompt, recording every set size
    it is asked to predict or score."""

    def __init__(self, **kw) -> None:
        super().__init__(**FAST, **kw)
        self.sizes: list[int] = []

    def memory_bytes(self, num_prompts, image_size=None, num_classes=2):
        return 100 * num_prompts

    def predict(self, prompts, queries, num_classes=None):
        self.sizes.append(len(prompts))
        return super().predict(prompts, queries, num_classes)


@pytest.fixture
def task(blob_dataset: Path) -> Task:
    return Task.from_folder(blob_dataset, "blob", pool=6, val=3, test=3, seed=0)


def _oracle(task: Task) -> ValidationOracle:
    return ValidationOracle(MeteredBackend(), task.split.val, task.num_classes, cache=False)


def test_random_search_never_scores_a_set_above_the_budget(task: Task) -> None:
    oracle = _oracle(task)
    rs = RandomSearch(oracle, k=5, n_trials=25, seed=0, memory_budget=300).fit(task.pool)
    sizes = {len(h["selected"]) for h in rs.history_}
    assert max(sizes) == 3 and max(oracle.backend.sizes) == 3  # 4 and 5 prompts would need 400 and 500 bytes
    assert max(len(h["selected"]) for h in RandomSearch(_oracle(task), k=5, n_trials=25, seed=0).fit(
        task.pool).history_) > 3  # without the budget larger sets are drawn


def test_worst_case_greedy_stops_at_the_budget(task: Task) -> None:
    wc = WorstCaseGreedy(_oracle(task), max_prompts=5, memory_budget=200).fit(task.pool)
    assert len(wc.selected_) <= 2


@pytest.mark.parametrize("make", [
    lambda o: RandomK(o, k=3, memory_budget=250),
    lambda o: BestSingle(o, memory_budget=50),
    lambda o: RandomSearch(o, k=3, n_trials=3, memory_budget=50),
    lambda o: make_strategy("retrieval", o, encoder="features", k=4, memory_budget=350),
    lambda o: make_strategy("tuned", o, steps=2, memory_budget=50),
])
def test_a_budget_too_small_is_refused_with_the_needed_figure(task: Task, make) -> None:
    oracle = _oracle(task)
    with pytest.raises(BudgetError, match=r"memory budget .* is too small .*needs about"):
        make(oracle).fit(task.pool)
    assert oracle.backend.sizes == []  # refused before any model work


def test_a_search_trial_that_cannot_fit_is_pruned_with_the_reason(task: Task, tmp_path: Path) -> None:
    from promptopt.search import PromptSearch, open_storage

    search = PromptSearch(task, tmp_path / "s", strategies=["forward"], n_trials=2, max_k=2, tune_backend=False,
                          memory_budget="10B")
    with pytest.raises(Exception, match="no trial completed"):
        search.fit()
    study = optuna.load_study(study_name="promptopt-blob", storage=open_storage(None, tmp_path / "s"))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.PRUNED] * 2
    assert "too small for one prompt" in study.trials[0].user_attrs["pruned"]
    assert all("too small for one prompt" in t.user_attrs["pruned"] or "duplicate_of" in t.user_attrs
               for t in study.trials)
