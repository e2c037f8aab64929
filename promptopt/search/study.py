"""Optuna search over registered strategies and their declared knobs, scored by the validation oracle.

Each Optuna trial picks a strategy among those asked for, then the knobs that
strategy declares (``search_space``, see :mod:`promptopt.space`) and the knobs
the backend declares, each turned into one ``trial.suggest_*`` call here. The
trial builds the strategy through the registry, fits it on the prompt pool and
returns its validation mIoU; strategies with intermediate values (forward
selection's steps, tuning's evaluations) report them, so Optuna's pruner can
stop hopeless trials. A trial that does not fit the memory budget is pruned
with the reason; a trial that raises (a CUDA out-of-memory error, a corrupt
image met mid-trial) is a failed trial with its message, and the search goes on.

A trial's inner randomness (a strategy's ``seed``) derives from its parameters,
so equal settings give equal values, wherever and whenever they run; an
already evaluated configuration is not run again (its outcome is reused).

Storage and workers
    By default the study lives in ``<run_dir>/study.log``, an Optuna journal
    file; ``storage`` takes a journal file path or a database URL (see
    :mod:`promptopt.search.storage`). ``n_trials`` is the number of *finished*
    (complete or pruned) trials the study should hold: rerunning with a larger
    number adds the missing ones, and workers started with the same command
    share them. :mod:`promptopt.search.workers` has the rules, dead workers'
    trials and the per-trial sampler seeds included.

Artifacts
    Every finished trial writes its prompt artifact to
    ``<run_dir>/trials/<number>/prompt.json`` (atomically). When the search
    ends, the best trial's artifact is published to ``<run_dir>/best/`` (once,
    under a lock, by one of the workers sharing the folder; a worker on another
    machine refits the best configuration — deterministic, see above — when its
    folder lacks it), scored on the held-out test split, and ``result.json`` and
    ``report.md``/``report.html`` are written. ``result.json`` holds no timings
    and no bookkeeping that depends on interruptions (trial numbers, lost or
    surplus trials): those are in ``cost.json``.

The test split is scored only once, for the best trial: it never steers the search.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import shutil
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..artifacts import PromptArtifact, fingerprint, load_prompt, read_json
from ..backends.base import Backend, BackendSpec, backend_class
from ..data import Sample
from ..errors import BudgetError, ConfigError
from ..metrics import IoUAccumulator
from ..oracle import ValidationOracle
from ..report import metric_definition, write_search_report
from ..run import Run, backend_config, describe
from .storage import describe_storage, open_storage, quiet_optuna_warnings
from .workers import SearchError, ordinals, run_worker, void_trials, worker_name
from ..space import MAX_K, Float, Int, SearchSpace
from ..strategies.base import ProgressFn, PromptStrategy
from ..strategies.registry import available_strategies, make_strategy, strategy_class
from ..task import Task

optuna.logging.set_verbosity(optuna.logging.WARNING)

#: ``--sampler`` choices: Optuna's samplers for this mixed, conditional space (TPE handles it best)
SAMPLERS = ("tpe", "random", "gp", "cmaes")


def suggest(trial: optuna.Trial, space: SearchSpace, prefix: str, max_k: int) -> dict[str, Any]:
    """One ``trial.suggest_*`` call per declared knob; parameters are named ``prefix.knob``."""
    out: dict[str, Any] = {}
    for p in space:
        name = f"{prefix}.{p.name}"
        if isinstance(p, Int):
            high = max_k if p.high == MAX_K else int(p.high)
            out[p.name] = trial.suggest_int(name, p.low, max(p.low, high), log=p.log)
        elif isinstance(p, Float):
            out[p.name] = trial.suggest_float(name, p.low, p.high, log=p.log)
        else:  # Choice: the three kinds are the whole vocabulary
            out[p.name] = trial.suggest_categorical(name, list(p.choices))
    return out


def check_sampler(name: str) -> str:
    """``name`` if it is a sampler this machine can build, else a ConfigError naming ``--sampler``."""
    if name not in SAMPLERS:
        raise ConfigError(f"--sampler {name!r}: choose one of {', '.join(SAMPLERS)}")
    if name == "cmaes" and importlib.util.find_spec("cmaes") is None:
        raise ConfigError("--sampler cmaes needs the cmaes package (pip install cmaes)")
    return name


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """A fresh Optuna sampler of kind ``name`` seeded with ``seed`` (one per trial, see the module docstring).

    TPE is multivariate with grouped subspaces (the knobs depend on the strategy) and treats running
    trials as bad results (``constant_liar``), so parallel workers spread out; GP knows the objective is
    deterministic. Knobs outside a sampler's joint space are drawn independently without warnings.
    """
    samplers = optuna.samplers
    cls, kwargs = {
        "tpe": (samplers.TPESampler, {"multivariate": True, "group": True, "constant_liar": True}),
        "random": (samplers.RandomSampler, {}),
        "gp": (samplers.GPSampler, {"deterministic_objective": True}),
        "cmaes": (samplers.CmaEsSampler, {"consider_pruned_trials": True}),
    }[check_sampler(name)]
    accepted = inspect.signature(cls).parameters
    kwargs = {**kwargs, "seed": seed, "warn_independent_sampling": False}
    with quiet_optuna_warnings():
        return cls(**{k: v for k, v in kwargs.items() if k in accepted})


def params_seed(params: dict[str, Any]) -> int:
    """The inner seed of a trial: a function of its parameters only, so equal settings give equal values."""
    return int(fingerprint({"trial_params": params}), 16) & 0x7FFFFFFF


class PromptSearch:
    """Optuna study over strategies and knobs for one task (scikit-learn style: ``fit`` returns self).

    Parameters
    ----------
    backend:
        The backend to search with: a :class:`BackendSpec` (or a registry name); each trial builds it
        with the options it suggests on top of the spec's.
    strategies:
        Strategy names to search over (those that declare a search space: ``available_strategies(searchable=True)``).
    n_trials:
        Finished trials (complete or pruned) the study should hold after ``fit``, between all workers.
    storage, study_name:
        Where the study lives (see :mod:`promptopt.search.storage`); by default a journal file in ``run_dir``.
    seed, sampler:
        The study's sampler (one of :data:`SAMPLERS`) and its seed; each trial's sampler gets a seed derived
        from it (None: fresh randomness).
    heartbeat_interval, grace_period:
        Seconds between a running trial's heartbeats, and the silence (default twice the interval) after
        which the trial counts as lost and is run again.
    max_failures:
        Trials in a row that may fail (raise) in this worker before the search stops with the last error.
    tune_backend:
        Let trials choose the backend's declared options.
    log:
        Where messages about failed or lost trials go (one line each).

    Attributes after ``fit``: ``study_``, ``best_params_``, ``best_value_`` (val mIoU),
    ``best_trial_``, ``best_prompt_`` (path of the best trial's prompt.json), ``trials_run_``
    (numbers of the trials this call ran).
    """

    def __init__(self, task: Task, run_dir: str | Path, backend: BackendSpec | str = "features", *,
                 strategies: Sequence[str] = ("forward", "random-search"), n_trials: int = 20, max_k: int = 8,
                 storage: str | None = None, study_name: str | None = None, seed: int | None = 0,
                 sampler: str = "tpe", tune_backend: bool = True, memory_budget: str | int | None = None,
                 pruner: optuna.pruners.BasePruner | None = None, heartbeat_interval: int = 60,
                 grace_period: int | None = None, max_failures: int = 5, progress: ProgressFn | None = None,
                 log: Callable[[str], None] | None = None,
                 strategy_options: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        known = available_strategies(searchable=True)
        unknown = [s for s in strategies if s not in known]
        if unknown:
            raise ConfigError(f"unknown search strategy {unknown[0]!r}; available: {', '.join(known)}")
        if not strategies:
            raise ConfigError("give at least one strategy to search over")
        if n_trials < 1 or max_k < 1:
            raise ConfigError("n_trials and max_k must be at least 1")
        if max_failures < 1:
            raise ConfigError("max_failures must be at least 1")
        self.task = task
        self.run_dir = Path(run_dir)
        self.backend = BackendSpec(backend) if isinstance(backend, str) else backend
        self.strategies = list(strategies)
        self.n_trials = int(n_trials)
        self.max_k = min(int(max_k), len(task.pool))
        self.storage = storage
        self.study_name = study_name or f"promptopt-{task.category}"
        self.seed = seed
        self.sampler = check_sampler(sampler)
        self.tune_backend = tune_backend
        self.memory_budget = memory_budget
        self.pruner = pruner or optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
        self.heartbeat_interval = int(heartbeat_interval)
        self.grace_period = grace_period
        self.max_failures = int(max_failures)
        self.progress = progress
        self.log = log
        #: options the user fixed per strategy (e.g. the text strategy's candidate phrases): every trial gets them
        self.strategy_options = {name: dict(opts) for name, opts in (strategy_options or {}).items()}
        unused = sorted(set(self.strategy_options) - set(self.strategies))
        if unused:
            raise ConfigError(f"options given for strategy {unused[0]!r}, which is not among --strategies")
        self._backends: dict[str, tuple[Backend, ValidationOracle]] = {}
        self._base: Backend | None = None
        self._study: optuna.Study | None = None

    @property
    def where(self) -> str:
        """The study's storage as messages and reports show it (password hidden)."""
        return describe_storage(self.storage, self.run_dir)

    # a trial's backend (and its oracle, with its pair cache) is reused by later trials with the same options
    # a backend that can change an option over the same model and caches (``with_options``) is derived from one
    # built backend, so a threshold search never loads a model or encodes an image twice
    def _backend(self, options: dict[str, Any]) -> tuple[Backend, ValidationOracle]:
        key = fingerprint(options)
        if key not in self._backends:
            if len(self._backends) >= 3:
                self._backends.pop(next(iter(self._backends)))
            be = None
            if options and hasattr(self._base, "with_options"):
                with suppress(ConfigError):  # an option that needs another model: build it
                    be = self._base.with_options(**options)  # type: ignore[union-attr]
            if be is None:
                be = self.backend.build(**options)
                self._base = self._base or be
            self._backends[key] = (be, ValidationOracle(be, self.task.split.val, self.task.num_classes))
        return self._backends[key]

    def space(self, strategy: str) -> SearchSpace:
        """The knobs a trial suggests for ``strategy``: its declared space, resolved against the options the
        user fixed when the strategy derives choices from them (``resolve_search_space``)."""
        cls = strategy_class(strategy)
        resolve = getattr(cls, "resolve_search_space", None)
        if callable(resolve) and self.strategy_options.get(strategy):
            return tuple(resolve(self.strategy_options[strategy], self.task.num_classes))
        return tuple(cls.search_space or ())

    def study_identity(self) -> dict[str, Any]:
        """What a study's trials depend on, wherever its workers run (so not the data folder's path)."""
        task = {k: v for k, v in self.task.describe().items() if k != "data_root"}
        return {"kind": "search", "task": task, "backend": backend_config(self.backend), "strategies": self.strategies,
                "max_k": self.max_k, "tune_backend": self.tune_backend, "memory_budget": self.memory_budget,
                **({"strategy_options": describe(self.strategy_options)} if self.strategy_options else {})}

    def spec(self) -> dict[str, Any]:
        """What identifies the run folder's search (``n_trials`` excluded: a study can be extended)."""
        return {**self.study_identity(), "task": self.task.describe(), "study_name": self.study_name,
                "sampler": self.sampler, "storage": None if self.storage is None else self.where}

    def open_study(self) -> optuna.Study:
        """Create or load the study, refusing one made for another task (a ConfigError; nothing is written)."""
        if self._study is not None:
            return self._study
        store = open_storage(self.storage, self.run_dir, heartbeat_interval=self.heartbeat_interval,
                             grace_period=self.grace_period)
        try:
            with quiet_optuna_warnings():
                study = optuna.create_study(study_name=self.study_name, storage=store, direction="maximize",
                                            pruner=self.pruner, load_if_exists=True)
        except ValueError as exc:  # e.g. a study of that name that minimises
            raise ConfigError(f"study {self.study_name!r} in {self.where}: {exc}") from None
        identity = self.study_identity()
        fp = fingerprint(identity)
        have = study.user_attrs.get("task_fingerprint")
        if have is None:
            if study.get_trials(deepcopy=False):
                raise ConfigError(f"study {self.study_name!r} in {self.where} holds trials promptopt did not make; "
                                  "use another --study-name")
            study.set_user_attr("task_fingerprint", fp)
            study.set_user_attr("task", identity["task"])
            have = study.user_attrs.get("task_fingerprint")  # a worker racing to create it may have won
        if have != fp:
            raise ConfigError(f"study {self.study_name!r} in {self.where} was made for another task, backend or "
                              "search space; use a new --study-name (or a new --out with the default storage)")
        self._study = study
        return study

    # --- one configuration ------------------------------------------------------------------------------------
    def _suggest(self, trial: optuna.Trial) -> None:
        strategy = trial.suggest_categorical("strategy", self.strategies)
        suggest(trial, self.space(strategy), strategy, self.max_k)
        if self.tune_backend:
            suggest(trial, backend_class(self.backend.name).search_space, self.backend.name, self.max_k)

    def fit_configuration(self, params: dict[str, Any],
                          on_step: Callable[[int, float], None] | None = None) -> tuple[PromptStrategy, int]:
        """The strategy a trial's parameters describe, fitted on the pool, and the model forwards it took."""
        strategy = params["strategy"]

        def under(prefix: str) -> dict[str, Any]:  # the knobs suggested as ``prefix.knob``
            return {k[len(prefix) + 1:]: v for k, v in params.items() if k.startswith(prefix + ".")}

        options = under(strategy)
        _, oracle = self._backend(under(self.backend.name))
        forwards0 = oracle.forwards
        try:
            sel = make_strategy(strategy, oracle, strict=False, memory_budget=self.memory_budget,
                                progress=self.progress, on_step=on_step, seed=params_seed(params),
                                **{**self.strategy_options.get(strategy, {}), **options}).fit(self.task.pool)
        except BudgetError as exc:
            raise optuna.TrialPruned(f"does not fit the memory budget: {exc}") from None
        return sel, oracle.forwards - forwards0

    def _trial_folder(self, number: int) -> Path:
        return self.run_dir / "trials" / f"{number:04d}"

    def _evaluate(self, trial: optuna.Trial) -> float:
        """Val mIoU of the trial's configuration; its prompt artifact goes to ``trials/<number>/``."""

        def report(step: int, value: float) -> None:
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after step {step} (val mIoU {value:.4f})")

        sel, forwards = self.fit_configuration(trial.params, report)
        path = sel.save_prompt(self._trial_folder(trial.number), category=self.task.category)
        trial.set_user_attr("prompt", str(path.relative_to(self.run_dir)))
        trial.set_user_attr("selected", sel.selected_ids_)
        trial.set_user_attr("forwards", forwards)
        return float(sel.score_)

    def artifact(self, trial: FrozenTrial) -> Path:
        """The prompt.json of a complete trial in this run folder, refitted here when the trial ran in
        another folder (another machine): its inner seed derives from its parameters, so the refit is the
        same prompt, and its val mIoU must equal the trial's value."""
        rel = trial.user_attrs.get("prompt")
        path = self.run_dir / rel if rel else None
        if path is not None and path.is_file():
            stored = read_json(path).get("extra", {}).get("val_miou")
            if stored is not None and abs(float(stored) - float(trial.value)) <= 1e-9:
                return path
        sel, _ = self.fit_configuration(trial.params)
        if abs(float(sel.score_) - float(trial.value)) > 1e-6:
            raise SearchError(f"trial {trial.number} of study {self.study_name!r} scored val mIoU {trial.value:.6f} "
                              f"where it ran, {sel.score_:.6f} here: the data or the software differ between workers")
        return sel.save_prompt(self._trial_folder(trial.number), category=self.task.category)

    # --- the search -------------------------------------------------------------------------------------------
    def fit(self) -> "PromptSearch":
        study = self.open_study()

        def record(trial: FrozenTrial, finished: int) -> None:
            if self.progress:
                self.progress("trials", min(finished, self.n_trials), self.n_trials)

        self.trials_run_ = run_worker(
            study, self.n_trials, self._suggest, self._evaluate,
            sampler_for=lambda s: make_sampler(self.sampler, s), seed=self.seed,
            grace_period=self.grace_period or 2 * self.heartbeat_interval,
            poll=min(1.0, self.heartbeat_interval / 2), max_failures=self.max_failures,
            reused_attrs=("prompt", "selected"), log=self.log, on_trial=record)
        self.study_ = study
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            raise ConfigError(f"study {self.study_name!r}: no trial completed (all pruned or failed)")
        # ties go to the earliest trial, whatever order a database returns them in
        self.best_trial_ = max(complete, key=lambda t: (t.value, -t.number))
        self.best_params_ = dict(self.best_trial_.params)
        self.best_value_ = float(self.best_trial_.value)
        self.best_prompt_ = self.artifact(self.best_trial_)
        return self


def score_artifact(prompt: PromptArtifact | str | Path, samples: Sequence[Sample], num_classes: int,
                   backend: Backend | None = None) -> dict[str, Any]:
    """Dataset-level mIoU of a saved prompt artifact (any kind: fixed, per-query, learned) on labelled samples,
    with ``backend`` when the caller has already rebuilt the artifact's."""
    from ..predict import predict_labels

    acc = IoUAccumulator(num_classes)
    for s, labels in zip(samples, predict_labels(prompt, samples, backend)):
        acc.add(labels, s.mask, s.id)
    res = acc.result()
    return {"miou": res.miou, "fb_iou": res.summary.get("fb_iou"), "per_image_iou": res.per_image_iou}


@contextmanager
def publication_lock(run_dir: Path) -> Iterator[None]:
    """One worker at a time publishes into a run folder (an advisory lock on ``.publish.lock``; POSIX only,
    as the workers are: :func:`~promptopt.search.workers.worker_name` needs ``os.uname``)."""
    import fcntl

    with open(run_dir / ".publish.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file closes
        yield


def _publish(src: Path, dest: Path) -> None:
    """Copy a finished trial's folder to ``dest`` so that readers never see a half-written copy
    (a private copy renamed into place; called under :func:`publication_lock`)."""
    pid = os.getpid()
    tmp, old = dest.with_name(f".{dest.name}.{pid}"), dest.with_name(f".{dest.name}.old.{pid}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    with suppress(FileNotFoundError):
        os.rename(dest, old)
    os.rename(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


#: why a trial failed when Optuna's heartbeat check failed it (it records no reason)
_LOST = "worker lost: no heartbeat for the grace period"
_STATE_NAMES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}


def _why_void(trial: FrozenTrial, trials: Sequence[FrozenTrial]) -> str:
    if "surplus" in trial.user_attrs:
        return "surplus: " + str(trial.user_attrs["surplus"])
    retry = next((t.number for t in trials if t.system_attrs.get("retry_history", [])[-1:] == [trial.number]), None)
    why = "interrupted (Ctrl-C)" if "interrupted" in trial.user_attrs else trial.user_attrs.get("error", _LOST)
    return f"{why}; run again as trial {retry}" if retry is not None else why


def search_result(search: PromptSearch, test: dict[str, Any] | None, command: str | None) -> tuple[dict, dict]:
    """(result.json, cost.json) of a finished search: the answer, and what depends on how it ran."""
    trials = search.study_.get_trials(deepcopy=False)
    order = ordinals(trials)
    void = void_trials(trials)
    counted = [t for t in trials if t.number not in void and t.state.is_finished()]
    by_state = {s: [t for t in counted if t.state == s] for s in _STATE_NAMES}
    top = sorted(by_state[TrialState.COMPLETE], key=lambda t: (-t.value, t.number))[:10]
    best = search.best_trial_
    result = {
        "kind": "search",
        **search.task.describe(),
        "backend": search.backend.name,
        "backend_config": backend_config(search.backend),
        "study_name": search.study_name,
        "storage": search.where,
        "sampler": search.sampler,
        "strategies": search.strategies,
        "n_trials": search.n_trials,
        "best_trial": order[best.number],
        "best_params": search.best_params_,
        "strategy": search.best_params_.get("strategy"),
        "val_miou": search.best_value_,
        **{f"test_{k}": test[k] if test else None for k in ("miou", "fb_iou", "per_image_iou")},
        "selected": best.user_attrs.get("selected", []),
        "prompt": "best/prompt.json",
        "trials": {"total": len(counted), **{name: len(by_state[s]) for s, name in _STATE_NAMES.items()
                                             if by_state[s]}},
        "top_trials": [{"trial": order[t.number], "value": t.value, "params": t.params} for t in top],
        "failed_trials": [{"trial": order[t.number], "params": t.params, "error": t.user_attrs.get("error", _LOST)}
                          for t in by_state[TrialState.FAIL]],
        "metric": metric_definition(search.task.num_classes),
        "command": command,
    }
    cost = {
        "trials_run_by_this_call": search.trials_run_,
        "best_trial_number": best.number,
        "trial_numbers": {str(k): n for n, k in order.items()},
        "states": {s.name.lower(): n for s in TrialState if (n := sum(t.state == s for t in trials))},
        "void_trials": [{"number": t.number, "why": _why_void(t, trials)} for t in trials if t.number in void],
        "duplicates": {str(t.number): t.user_attrs["duplicate_of"] for t in trials if "duplicate_of" in t.user_attrs},
        "published_by": worker_name(),
    }
    return result, cost


def run_search(task: Task, out: str | Path, backend: BackendSpec | str = "features", *, restart: bool = False,
               command: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """Run (or resume, or join, or extend) the study for one task; publish best/, result.json and the report.

    The run folder is a :class:`~promptopt.run.Run`: a finished search with at least ``n_trials`` trials
    is returned as it is. Several workers may share the folder: the first to finish publishes, the
    others return its result.
    """
    search = PromptSearch(task, out, backend, **kwargs)
    run = Run(out, search.spec(), restart=restart)
    if run.finished and run.result().get("n_trials", 0) >= search.n_trials:
        return run.result()
    t0 = time.perf_counter()
    if search.storage is not None:
        search.open_study()  # a storage outside the run folder is checked before anything is written
    run.begin()  # the study and the trial folders live in the run folder: it must be a run before they exist
    search.fit()
    with publication_lock(search.run_dir):
        now = Run(out, search.spec())  # read again: a worker sharing this folder may have published meanwhile
        if now.finished and now.result().get("n_trials", 0) >= search.n_trials:
            return now.result()
        _publish(search.best_prompt_.parent, search.run_dir / "best")
        # scored from the trial's own folder, which no other worker ever rewrites
        art = load_prompt(search.best_prompt_)
        backend = art.build_backend()  # once, for the test scores and the figures
        test = score_artifact(art, task.split.test, task.num_classes, backend) if task.split.test else None
        result, cost = search_result(search, test, command)
        cost = {"wall_s_session": round(time.perf_counter() - t0, 3), **cost}
        write_search_report(search.run_dir, result, cost, search_figures(
            search.run_dir, search.study_, task, art, backend, result["test_per_image_iou"]))
        finished = run.finish(result, cost)
    if search.log:
        search.log(f"published best/ in {search.run_dir}: trial {result['best_trial']} "
                   f"(study trial #{cost['best_trial_number']}), val mIoU {result['val_miou']:.4f}")
    return finished


def search_figures(out: Path, study: optuna.Study, task: Task, art: PromptArtifact, backend: Backend,
                   test_per_image_iou: Mapping[str, float | None] | None) -> list[tuple[str, str]]:
    """The search report's figures: Optuna's history and parameter importances, the best trial's prompts
    (``art``, with its rebuilt ``backend``) and its worst test images."""
    import warnings

    import optuna.visualization.matplotlib as ovm

    from ..plots import plot_prompts, plot_worst, save_figure
    from ..predict import predict_labels

    def save(ax: Any, name: str) -> str:
        fig = ax.figure if hasattr(ax, "figure") and not hasattr(ax, "savefig") else ax
        fig.set_size_inches(6.5, 3.8)
        fig.tight_layout()
        return save_figure(fig, out / name, dpi=90).name

    figs: list[tuple[str, str]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        figs.append(("Optimisation history (val mIoU per trial)",
                     save(ovm.plot_optimization_history(study), "history.png")))
        with suppress(ValueError, RuntimeError):  # too few trials or a degenerate search space
            figs.append(("Parameter importances (fANOVA on val mIoU)",
                         save(ovm.plot_param_importances(study), "importances.png")))
    if art.examples:
        figs.append(("Prompts of the best trial", plot_prompts(art.samples(), out / "prompts.png").name))
    if task.split.test:
        figs.append(("The worst test images under the best configuration (lowest IoU first)", plot_worst(
            task.split.test, test_per_image_iou or {}, lambda worst: predict_labels(art, worst, backend),
            out / "predictions.png").name))
    return figs


__all__ = ["PromptSearch", "run_search", "score_artifact", "open_storage", "suggest", "make_sampler", "check_sampler",
           "params_seed", "SAMPLERS", "SearchError"]
