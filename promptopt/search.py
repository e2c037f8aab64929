"""Optuna search over registered strategies and their declared knobs, scored by the validation oracle.

Each Optuna trial picks a strategy among those asked for, then the knobs that
strategy declares (``search_space``, see :mod:`promptopt.space`) and the knobs
the backend declares, each turned into one ``trial.suggest_*`` call here — the
only module that speaks Optuna. The trial builds the strategy through the
registry, fits it on the prompt pool and returns its validation mIoU; strategies
with intermediate values (forward selection's steps, tuning's evaluations)
report them, so Optuna's pruner can stop hopeless trials. A trial that does not
fit the memory budget is pruned with the reason.

Storage
    By default the study lives in ``<run_dir>/study.log``, an Optuna journal
    file (safe for several processes on one machine). Any Optuna storage URL
    (``sqlite:///...`` for one process, ``postgresql://...`` for several
    machines) or another journal file path is accepted. ``n_trials`` is the
    number of *finished* trials the study should hold: rerunning the same
    command with a larger number adds the missing trials, and several workers
    started with the same command share the work.

Artifacts
    Every finished trial writes its prompt artifact to
    ``<run_dir>/trials/<number>/prompt.json`` (atomically), so the best prompt
    never has to be recomputed. When the search ends, the best trial's artifact
    is published to ``<run_dir>/best/``, scored on the held-out test split, and
    ``result.json`` and ``report.md``/``report.html`` (optimisation history,
    parameter importances, the best prompts and predictions) are written.

The test split is scored only once, for the best trial: it never steers the search.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import optuna

from .artifacts import fingerprint, load_prompt
from .backends.base import Backend, BackendSpec, backend_class
from .data import Sample
from .errors import BudgetError, ConfigError
from .metrics import IoUAccumulator
from .oracle import ValidationOracle
from .run import Run, backend_config, metric_definition
from .space import MAX_K, Choice, Float, Int, SearchSpace
from .strategies.base import ProgressFn
from .strategies.registry import available_strategies, make_strategy, strategy_class
from .task import Task

optuna.logging.set_verbosity(optuna.logging.WARNING)

_FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


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
        elif isinstance(p, Choice):
            out[p.name] = trial.suggest_categorical(name, list(p.choices))
        else:  # pragma: no cover - the three kinds above are the whole vocabulary
            raise TypeError(f"unknown search-space entry {p!r}")
    return out


def searchable_strategies() -> list[str]:
    """Strategy names usable in ``strategies=`` (those that declare a search space)."""
    return available_strategies(searchable=True)


def open_storage(storage: str | None, run_dir: Path) -> Any:
    """An Optuna storage: default journal file in the run folder; a URL; or a journal file path."""
    if storage is None:
        storage = str(run_dir / "study.log")
    if "://" in storage:
        return storage  # Optuna builds RDB storages from URLs (sqlite:///..., postgresql://...)
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    path = Path(storage)
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


class PromptSearch:
    """Optuna study over strategies and knobs for one task (scikit-learn style: ``fit`` returns self).

    Parameters
    ----------
    backend:
        The backend to search with: a :class:`BackendSpec` (or a registry name); each trial builds it
        with the options it suggests on top of the spec's.
    strategies:
        Strategy names to search over (see :func:`searchable_strategies`).
    n_trials:
        Finished trials (complete or pruned) the study should hold after ``fit``.
    storage, study_name:
        Where the study lives (see the module docstring); by default a journal file in ``run_dir``.
    tune_backend:
        Let trials choose the backend's declared options.

    Attributes after ``fit``: ``study_``, ``best_params_``, ``best_value_`` (val mIoU),
    ``best_trial_``, ``best_prompt_`` (path of the best trial's prompt.json), ``trials_run_``
    (numbers of the trials this call ran).
    """

    def __init__(self, task: Task, run_dir: str | Path, backend: BackendSpec | str = "features", *,
                 strategies: Sequence[str] = ("forward", "random-search"), n_trials: int = 20, max_k: int = 8,
                 storage: str | None = None, study_name: str | None = None, seed: int | None = 0,
                 tune_backend: bool = True, memory_budget: str | int | None = None,
                 pruner: optuna.pruners.BasePruner | None = None, progress: ProgressFn | None = None) -> None:
        known = searchable_strategies()
        unknown = [s for s in strategies if s not in known]
        if unknown:
            raise ConfigError(f"unknown search strategy {unknown[0]!r}; available: {', '.join(known)}")
        if not strategies:
            raise ConfigError("give at least one strategy to search over")
        if n_trials < 1 or max_k < 1:
            raise ConfigError("n_trials and max_k must be at least 1")
        self.task = task
        self.run_dir = Path(run_dir)
        self.backend = BackendSpec(backend) if isinstance(backend, str) else backend
        self.strategies = list(strategies)
        self.n_trials = int(n_trials)
        self.max_k = min(int(max_k), len(task.pool))
        self.storage = storage
        self.study_name = study_name or f"promptopt-{task.category}"
        self.seed = seed
        self.tune_backend = tune_backend
        self.memory_budget = memory_budget
        self.pruner = pruner or optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
        self.progress = progress
        self._backends: dict[str, tuple[Backend, ValidationOracle]] = {}

    @property
    def backend_space(self) -> SearchSpace:
        return tuple(backend_class(self.backend.name).search_space) if self.tune_backend else ()

    # a trial's backend (and its oracle, with its pair cache) is reused by later trials with the same options
    def _backend(self, options: dict[str, Any]) -> tuple[Backend, ValidationOracle]:
        key = fingerprint(options)
        if key not in self._backends:
            if len(self._backends) >= 3:
                self._backends.pop(next(iter(self._backends)))
            be = self.backend.build(**options)
            self._backends[key] = (be, ValidationOracle(be, self.task.split.val, self.task.num_classes))
        return self._backends[key]

    def spec(self) -> dict[str, Any]:
        """What identifies the study's search (``n_trials`` excluded: a study can be extended)."""
        return {"kind": "search", "task": self.task.describe(), "backend": backend_config(self.backend),
                "strategies": self.strategies, "max_k": self.max_k, "tune_backend": self.tune_backend,
                "memory_budget": self.memory_budget, "study_name": self.study_name}

    def objective(self, trial: optuna.Trial) -> float:
        """Val mIoU of the strategy and knobs this trial suggests (Optuna's objective)."""
        t0 = time.perf_counter()
        strategy = trial.suggest_categorical("strategy", self.strategies)
        options = suggest(trial, strategy_class(strategy).search_space or (), strategy, self.max_k)
        backend_options = suggest(trial, self.backend_space, self.backend.name, self.max_k)
        backend, oracle = self._backend(backend_options)
        forwards0 = oracle.forwards

        def report(step: int, value: float) -> None:
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after step {step} (val mIoU {value:.4f})")

        try:
            sel = make_strategy(strategy, oracle, strict=False, memory_budget=self.memory_budget,
                                progress=self.progress, on_step=report, seed=trial.number, **options).fit(self.task.pool)
        except BudgetError as exc:
            trial.set_user_attr("pruned_reason", f"does not fit the memory budget: {exc}")
            raise optuna.TrialPruned(f"does not fit the memory budget: {exc}") from None
        folder = self.run_dir / "trials" / f"{trial.number:04d}"
        path = sel.save_prompt(folder, category=self.task.category)
        trial.set_user_attr("prompt", str(path.relative_to(self.run_dir)))
        trial.set_user_attr("selected", sel.selected_ids_)
        trial.set_user_attr("worker", f"{os.uname().nodename}:{os.getpid()}")
        trial.set_user_attr("forwards", oracle.forwards - forwards0)
        trial.set_user_attr("wall_s", round(time.perf_counter() - t0, 3))
        return float(sel.score_)

    def fit(self) -> "PromptSearch":
        store = open_storage(self.storage, self.run_dir)
        sampler = optuna.samplers.TPESampler(seed=self.seed)
        study = optuna.create_study(study_name=self.study_name, storage=store, direction="maximize",
                                    sampler=sampler, pruner=self.pruner, load_if_exists=True)
        fp = fingerprint(self.spec())
        have = study.user_attrs.get("task_fingerprint")
        if have is None:
            study.set_user_attr("task_fingerprint", fp)
            study.set_user_attr("task", self.task.describe())
        elif have != fp:
            raise ConfigError(f"study {self.study_name!r} in {self.storage or self.run_dir / 'study.log'} was made "
                              "for another task, backend or search space; use a new --out or --study-name")
        done = len(study.get_trials(deepcopy=False, states=_FINISHED))
        self.trials_run_: list[int] = []
        remaining = self.n_trials - done
        if remaining > 0:
            cap = optuna.study.MaxTrialsCallback(self.n_trials, states=_FINISHED)

            def record(st: optuna.Study, tr: optuna.trial.FrozenTrial) -> None:
                self.trials_run_.append(tr.number)
                if self.progress:
                    self.progress("trials", len(st.get_trials(deepcopy=False, states=_FINISHED)), self.n_trials)

            study.optimize(self.objective, n_trials=remaining, callbacks=[record, cap], gc_after_trial=False)
        self.study_ = study
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if not complete:
            raise ConfigError(f"study {self.study_name!r}: no trial completed (all pruned or failed)")
        self.best_trial_ = study.best_trial
        self.best_params_ = dict(self.best_trial_.params)
        self.best_value_ = float(self.best_trial_.value)
        self.best_prompt_ = self.run_dir / self.best_trial_.user_attrs["prompt"]
        return self


def score_artifact(prompt_path: str | Path, samples: Sequence[Sample], num_classes: int) -> dict[str, Any]:
    """Dataset-level mIoU of a saved prompt artifact (any kind: fixed, per-query, learned) on labelled samples."""
    from .predict import predict_labels

    art = load_prompt(prompt_path)
    backend = art.build_backend()
    acc = IoUAccumulator(num_classes)
    for s, labels in zip(samples, predict_labels(art, samples, backend)):
        acc.add(labels, s.mask, s.id)
    res = acc.result()
    return {"miou": res.miou, "fb_iou": res.summary.get("fb_iou"), "per_image_iou": res.per_image_iou}


def _publish(src: Path, dest: Path) -> None:
    """Copy a finished trial's folder to ``dest`` so that readers never see a half-written copy.

    Several workers may finish at once: each copies to a private temporary folder and renames it into
    place; if another worker's rename wins the race, that copy (of a trial at least as good) is kept.
    """
    pid = os.getpid()
    tmp, old = dest.with_name(f".{dest.name}.{pid}"), dest.with_name(f".{dest.name}.old.{pid}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    try:
        os.rename(dest, old)
    except FileNotFoundError:
        pass
    try:
        os.rename(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def run_search(task: Task, out: str | Path, backend: BackendSpec | str = "features", *, restart: bool = False,
               command: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """Run (or resume, or join, or extend) the study for one task; write best/, result.json and the report.

    The run folder is a :class:`~promptopt.run.Run`: a finished search with at least ``n_trials`` trials
    is returned as it is.
    """
    search = PromptSearch(task, out, backend, **kwargs)
    run = Run(out, search.spec(), restart=restart)
    if run.finished and run.result().get("n_trials", 0) >= search.n_trials:
        return run.result()
    t0 = time.perf_counter()
    run.begin()  # the study and the trial folders live in the run folder: it must be a run before they exist
    search.fit()
    out = search.run_dir
    _publish(search.best_prompt_.parent, out / "best")
    # scored from the trial's own folder, which no other worker ever rewrites
    test = score_artifact(search.best_prompt_, task.split.test, task.num_classes) if task.split.test else None
    trials = search.study_.get_trials(deepcopy=False)
    states = {s.name.lower(): sum(t.state == s for t in trials) for s in optuna.trial.TrialState}
    top = sorted((t for t in trials if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: -t.value)[:10]
    result = {
        "kind": "search",
        **task.describe(),
        "backend": search.backend.name,
        "backend_config": backend_config(search.backend),
        "study_name": search.study_name,
        "storage": search.storage or str(out / "study.log"),
        "strategies": search.strategies,
        "n_trials": search.n_trials,
        "best_trial": search.best_trial_.number,
        "best_params": search.best_params_,
        "strategy": search.best_params_.get("strategy"),
        "val_miou": search.best_value_,
        "test_miou": test["miou"] if test else None,
        "test_fb_iou": test["fb_iou"] if test else None,
        "test_per_image_iou": test["per_image_iou"] if test else None,
        "selected": search.best_trial_.user_attrs.get("selected", []),
        "prompt": "best/prompt.json",
        "trials": {"total": len(trials), **{k: v for k, v in states.items() if v}},
        "top_trials": [{"number": t.number, "value": t.value, "params": t.params} for t in top],
        "metric": metric_definition(task.num_classes),
        "command": command,
    }
    cost = {"wall_s_session": round(time.perf_counter() - t0, 3), "trials_run_by_this_call": search.trials_run_}
    write_search_report(out, result, search.study_, task, search.best_prompt_)
    return run.finish(result, cost)


def write_search_report(out: Path, result: dict[str, Any], study: optuna.Study, task: Task,
                        best_prompt: Path) -> Path:
    """report.md/.html: best configuration, Optuna's history and importance plots, best prompts and predictions."""
    import warnings

    import optuna.visualization.matplotlib as ovm

    from .plots import plot_predictions, plot_prompts, save_figure
    from .predict import predict_labels
    from .report import figures_and_command, fmt, markdown_table, write_report

    def save(ax: Any, name: str) -> str:
        fig = ax.figure if hasattr(ax, "figure") and not hasattr(ax, "savefig") else ax
        fig.set_size_inches(6.5, 3.8)
        fig.tight_layout()
        return save_figure(fig, out / name, dpi=90).name

    figs: list[tuple[str, str]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        figs.append(("Optimisation history (val mIoU per trial)", save(ovm.plot_optimization_history(study), "history.png")))
        try:
            figs.append(("Parameter importances (fANOVA on val mIoU)",
                         save(ovm.plot_param_importances(study), "importances.png")))
        except (ValueError, RuntimeError):  # too few trials or a degenerate search space
            pass
    art = load_prompt(best_prompt)
    prompts = art.samples()
    if prompts:
        figs.append(("Prompts of the best trial", plot_prompts(prompts, out / "prompts.png").name))
    if task.split.test:
        per = result["test_per_image_iou"] or {}
        worst = sorted(task.split.test, key=lambda s: per.get(s.id) if per.get(s.id) is not None else -1.0)[:6]
        figs.append(("The worst test images under the best configuration (lowest IoU first)",
                     plot_predictions(worst, predict_labels(art, worst), out / "predictions.png",
                                      [per.get(s.id, float("nan")) for s in worst]).name))
    params = markdown_table(["parameter", "value"], [[k, v] for k, v in sorted(result["best_params"].items())])
    top = markdown_table(["trial", "val mIoU", "strategy", "parameters"],
                         [[t["number"], t["value"], t["params"].get("strategy"),
                           ", ".join(f"{k}={v}" for k, v in sorted(t["params"].items()) if k != "strategy")]
                          for t in result["top_trials"]])
    tr = result["trials"]
    md = [
        f"# promptopt search — {result['category']}",
        "",
        f"- Study `{result['study_name']}` in `{result['storage']}`: {tr['total']} trials "
        f"({', '.join(f'{k} {v}' for k, v in tr.items() if k != 'total')})",
        f"- Backend `{result['backend']}`; strategies searched: {', '.join(result['strategies'])}",
        f"- Best trial {result['best_trial']}: val mIoU (optimised) **{fmt(result['val_miou'])}**, "
        f"test mIoU (held out, scored once) **{fmt(result['test_miou'])}** (FB-IoU {fmt(result['test_fb_iou'])})",
        f"- Metric: {result['metric']}",
        f"- Best prompt: `best/prompt.json` ({', '.join(result['selected']) or 'learned context'})",
        "",
        "## Best configuration",
        "",
        params,
        "",
        "## Top trials",
        "",
        top,
        "",
    ]
    md += figures_and_command(figs, result.get("command"))
    write_report(out, "\n".join(md))
    return out / "report.md"


__all__ = ["PromptSearch", "run_search", "score_artifact", "open_storage", "suggest", "searchable_strategies"]
