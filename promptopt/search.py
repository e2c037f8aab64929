"""Optuna search over prompt strategies and their knobs, scored by the validation oracle.

Each Optuna trial picks a strategy (forward selection, random search, and any
strategy registered with :func:`register_search_strategy`, such as retrieval
and context tuning), that strategy's knobs (k, diversity, learning rate, ...)
and the backend's own options (``features``: pixel sampling, scales, kernel
temperature; ``persam``: PerSAM vs PerSAM-F, k-shot combination, cascaded
refinement; ``seggpt``: feature vs output ensemble, embedding type), fits the strategy on the prompt pool and
returns its validation mIoU. Forward selection reports its val mIoU after every
step as an intermediate value, so Optuna's pruner can stop hopeless trials.

Storage
    By default the study lives in ``<run_dir>/study.log``, an Optuna journal
    file (safe for several processes on one machine). Any Optuna storage URL
    (``sqlite:///...`` for one process, ``postgresql://...`` for several
    machines) or another journal file path is accepted. ``n_trials`` is the
    number of *finished* trials the study should hold: rerunning the same
    command with a larger number adds the missing trials, and several workers
    started with the same command share the work (each stops when the study has
    enough; at most one extra trial per worker can finish).

Artifacts
    Every finished trial writes its prompt artifact to
    ``<run_dir>/trials/<number>/prompt.json`` (atomically), so the best prompt
    never has to be recomputed. When the search ends, the best trial's artifact
    is copied to ``<run_dir>/best/``, scored on the held-out test split, and
    ``result.json`` and ``report.md``/``report.html`` (optimisation history,
    parameter importances, the best prompts and predictions) are written.

The test split is scored only once, for the best trial: it never steers the search.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import optuna

from .artifacts import atomic_write_json, check_run_dir, fingerprint, load_prompt
from .backends.base import Backend, create_backend
from .data import Sample
from .errors import BudgetError, ConfigError
from .metrics import IoUAccumulator
from .oracle import ValidationOracle
from .strategies import ForwardSelector, RandomSearch
from .strategies.base import ProgressFn, PromptStrategy
from .task import Task

optuna.logging.set_verbosity(optuna.logging.WARNING)

_FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


@dataclass
class SearchContext:
    """What a search strategy needs to run one trial: the task, the scoring oracle and a place for files."""

    task: Task
    oracle: ValidationOracle
    backend: Backend
    max_k: int
    trial_dir: Path
    progress: ProgressFn | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrialOutcome:
    """The result of one trial: its val mIoU and the prompt artifact it wrote (``prompt.json``)."""

    val_miou: float
    prompt_path: Path
    selected: list[str]
    info: dict[str, Any] = field(default_factory=dict)


SearchStrategy = Callable[[optuna.Trial, SearchContext], TrialOutcome]
BackendSpace = Callable[[optuna.Trial], dict[str, Any]]

_STRATEGIES: dict[str, SearchStrategy] = {}
_BACKEND_SPACES: dict[str, BackendSpace] = {}


def register_search_strategy(name: str, fn: SearchStrategy) -> None:
    """Make a strategy searchable: ``fn(trial, ctx)`` suggests its knobs, fits it and saves its prompt."""
    _STRATEGIES[name] = fn


def register_backend_space(backend: str, fn: BackendSpace) -> None:
    """Knobs of a backend that the search may tune: ``fn(trial)`` returns backend options."""
    _BACKEND_SPACES[backend] = fn


def search_strategies() -> list[str]:
    """Names usable in ``strategies=`` (importing the optional strategy modules registers theirs)."""
    _load_optional()
    return list(_STRATEGIES)


def _load_optional() -> None:
    import importlib

    for mod in ("promptopt.strategies.retrieval", "promptopt.strategies.tuning"):
        try:
            module = importlib.import_module(mod)
        except ImportError:
            continue
        hook = getattr(module, "register_search", None)  # modules imported before this one register here
        if callable(hook):
            hook()


# --- built-in strategies --------------------------------------------------------------------------
def _save(ctx: SearchContext, strategy: PromptStrategy) -> Path:
    return strategy.save_prompt(ctx.trial_dir, ctx.backend.config(), ctx.task.num_classes, ctx.task.category,
                                extra={"strategy": strategy.name, "val_miou": strategy.score_})  # type: ignore[attr-defined]


def _forward(trial: optuna.Trial, ctx: SearchContext) -> TrialOutcome:
    k = trial.suggest_int("forward.max_prompts", 1, ctx.max_k)
    patience = trial.suggest_int("forward.patience", 1, 2)

    def report(step: dict[str, Any]) -> None:
        score = step["score"]
        if score is not None and not np.isnan(score):
            trial.report(float(score), step["step"])
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned after step {step['step']} (val mIoU {score:.4f})")

    sel = ForwardSelector(ctx.oracle, memory_budget=ctx.extras.get("memory_budget"), max_prompts=k,
                          patience=patience, progress=ctx.progress, on_step=report).fit(ctx.task.pool)
    path = _save(ctx, sel)
    return TrialOutcome(sel.score_, path, sel.selected_ids_, {"stop_reason": sel.stop_reason_})


def _random_search(trial: optuna.Trial, ctx: SearchContext) -> TrialOutcome:
    k = trial.suggest_int("random-search.k", 1, ctx.max_k)
    n = trial.suggest_categorical("random-search.n_trials", [10, 30])
    sel = RandomSearch(ctx.oracle, min(k, len(ctx.task.pool)), n_trials=n, seed=trial.number,
                       progress=ctx.progress).fit(ctx.task.pool)
    path = _save(ctx, sel)
    return TrialOutcome(sel.score_, path, sel.selected_ids_)


register_search_strategy("forward", _forward)
register_search_strategy("random-search", _random_search)


def _features_space(trial: optuna.Trial) -> dict[str, Any]:
    scales = trial.suggest_categorical("features.scales", ["1,2,4,8", "1,2,4", "2,4,8,16"])
    return {
        "pixels_per_prompt": trial.suggest_categorical("features.pixels_per_prompt", [512, 1024, 2048]),
        "temperature": trial.suggest_categorical("features.temperature", [0.15, 0.25, 0.4]),
        "scales": [float(x) for x in scales.split(",")],
    }


def _persam_space(trial: optuna.Trial) -> dict[str, Any]:
    return {
        "variant": trial.suggest_categorical("persam.variant", ["persam", "persam-f"]),
        "kshot": trial.suggest_categorical("persam.kshot", ["output", "mean", "max"]),
        "refine": trial.suggest_categorical("persam.refine", [True, False]),
    }


def _seggpt_space(trial: optuna.Trial) -> dict[str, Any]:
    return {
        "ensemble": trial.suggest_categorical("seggpt.ensemble", ["feature", "output"]),
        "embedding_type": trial.suggest_categorical("seggpt.embedding_type", ["instance", "semantic"]),
    }


register_backend_space("features", _features_space)
register_backend_space("persam", _persam_space)
register_backend_space("seggpt", _seggpt_space)


# --- the search -----------------------------------------------------------------------------------
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
        Registry name of the backend (each trial builds it with the options the trial suggests).
    strategies:
        Strategy names to search over (see :func:`search_strategies`).
    n_trials:
        Finished trials (complete or pruned) the study should hold after ``fit``.
    storage, study_name:
        Where the study lives (see the module docstring); by default a journal file in ``run_dir``.
    tune_backend:
        Let trials choose the backend's options (when a search space is registered for it).

    Attributes after ``fit``: ``study_``, ``best_params_``, ``best_value_`` (val mIoU),
    ``best_trial_``, ``best_prompt_`` (path of the best trial's prompt.json), ``trials_run_``
    (numbers of the trials this call ran).
    """

    def __init__(self, task: Task, run_dir: str | Path, backend: str = "features", checkpoint: str | None = None,
                 backend_options: Mapping[str, Any] | None = None, strategies: Sequence[str] = ("forward", "random-search"),
                 n_trials: int = 20, max_k: int = 8, storage: str | None = None, study_name: str | None = None,
                 seed: int | None = 0, tune_backend: bool = True, memory_budget: str | int | None = None,
                 pruner: optuna.pruners.BasePruner | None = None, progress: ProgressFn | None = None) -> None:
        known = search_strategies()
        unknown = [s for s in strategies if s not in known]
        if unknown:
            raise ConfigError(f"unknown search strategy {unknown[0]!r}; available: {', '.join(known)}")
        if not strategies:
            raise ConfigError("give at least one strategy to search over")
        if n_trials < 1 or max_k < 1:
            raise ConfigError("n_trials and max_k must be at least 1")
        self.task = task
        self.run_dir = check_run_dir(run_dir)
        self.backend_name = backend
        self.checkpoint = checkpoint
        self.backend_options = dict(backend_options or {})
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

    # a trial's backend (and its oracle, with its pair cache) is reused by later trials with the same options
    def _backend(self, options: dict[str, Any]) -> tuple[Backend, ValidationOracle]:
        key = fingerprint(options)
        if key not in self._backends:
            if len(self._backends) >= 3:
                self._backends.pop(next(iter(self._backends)))
            be = create_backend(self.backend_name, self.checkpoint, options)
            self._backends[key] = (be, ValidationOracle(be, self.task.split.val, self.task.num_classes))
        return self._backends[key]

    def _task_fingerprint(self) -> str:
        return fingerprint({"task": self.task.describe(), "backend": self.backend_name, "checkpoint": self.checkpoint,
                            "options": self.backend_options, "strategies": self.strategies, "max_k": self.max_k})

    def objective(self, trial: optuna.Trial) -> float:
        """Val mIoU of the strategy and knobs this trial suggests (Optuna's objective)."""
        t0 = time.perf_counter()
        strategy = trial.suggest_categorical("strategy", self.strategies)
        options = dict(self.backend_options)
        if self.tune_backend and self.backend_name in _BACKEND_SPACES:
            options.update(_BACKEND_SPACES[self.backend_name](trial))
        backend, oracle = self._backend(options)
        forwards0 = oracle.forwards
        ctx = SearchContext(self.task, oracle, backend, self.max_k, self.run_dir / "trials" / f"{trial.number:04d}",
                            self.progress, {"memory_budget": self.memory_budget, "backend_options": options})
        try:
            outcome = _STRATEGIES[strategy](trial, ctx)
        except BudgetError as exc:
            raise optuna.TrialPruned(f"does not fit the memory budget: {exc}") from None
        trial.set_user_attr("prompt", str(outcome.prompt_path.relative_to(self.run_dir)))
        trial.set_user_attr("selected", outcome.selected)
        trial.set_user_attr("worker", f"{os.uname().nodename}:{os.getpid()}")
        trial.set_user_attr("forwards", oracle.forwards - forwards0)
        trial.set_user_attr("wall_s", round(time.perf_counter() - t0, 3))
        for k, v in outcome.info.items():
            trial.set_user_attr(k, v)
        return float(outcome.val_miou)

    def fit(self) -> "PromptSearch":
        store = open_storage(self.storage, self.run_dir)
        sampler = optuna.samplers.TPESampler(seed=self.seed)
        study = optuna.create_study(study_name=self.study_name, storage=store, direction="maximize",
                                    sampler=sampler, pruner=self.pruner, load_if_exists=True)
        fp = self._task_fingerprint()
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
    for s in samples:
        acc.add(predict_labels(art, [s], backend)[0], s.mask, s.id)
    res = acc.result()
    return {"miou": res.miou, "per_image_iou": res.per_image_iou}


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


def run_search(task: Task, out_dir: str | Path, command: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """Run (or resume, or join) the study for one task; write best/, result.json and the report."""
    t0 = time.perf_counter()
    search = PromptSearch(task, out_dir, **kwargs).fit()
    out = search.run_dir
    _publish(search.best_prompt_.parent, out / "best")
    # scored from the trial's own folder, which no other worker ever rewrites
    test = score_artifact(search.best_prompt_, task.split.test, task.num_classes) if task.split.test else None
    trials = search.study_.get_trials(deepcopy=False)
    states = {s.name.lower(): sum(t.state == s for t in trials) for s in optuna.trial.TrialState}
    top = sorted((t for t in trials if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: -t.value)[:10]
    result = {
        "kind": "search",
        "category": task.category,
        "backend": search.backend_name,
        "study_name": search.study_name,
        "storage": search.storage or str(out / "study.log"),
        "strategies": search.strategies,
        "best_trial": search.best_trial_.number,
        "best_params": search.best_params_,
        "val_miou": search.best_value_,
        "test_miou": test["miou"] if test else None,
        "test_per_image_iou": test["per_image_iou"] if test else None,
        "selected": search.best_trial_.user_attrs.get("selected", []),
        "prompt": "best/prompt.json",
        "trials": {"total": len(trials), **{k: v for k, v in states.items() if v}, "run_by_this_call": search.trials_run_},
        "top_trials": [{"number": t.number, "value": t.value, "params": t.params} for t in top],
        "split": task.split.ids(),
        "split_seed": task.split_seed,
        "wall_s": round(time.perf_counter() - t0, 3),
        "command": command,
    }
    atomic_write_json(out / "result.json", result)
    write_search_report(out, result, search.study_, task, search.best_prompt_)
    return result


def write_search_report(out: Path, result: dict[str, Any], study: optuna.Study, task: Task,
                        best_prompt: Path | None = None) -> Path:
    """report.md/.html: best configuration, Optuna's history and importance plots, best prompts and predictions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

    from .report import fmt, markdown_table, plot_predictions, plot_prompts, write_report

    figs: list[tuple[str, str]] = []

    def save(ax_or_fig: Any, name: str) -> str:
        fig = ax_or_fig.figure if hasattr(ax_or_fig, "figure") and not hasattr(ax_or_fig, "savefig") else ax_or_fig
        fig.set_size_inches(6.5, 3.8)
        fig.tight_layout()
        path = out / name
        tmp = path.with_name(f".{name}.{os.getpid()}.png")
        fig.savefig(tmp, dpi=90)
        plt.close(fig)
        os.replace(tmp, path)
        return name

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        figs.append(("Optimisation history (val mIoU per trial)", save(ovm.plot_optimization_history(study), "history.png")))
        try:
            figs.append(("Parameter importances (fANOVA on val mIoU)",
                         save(ovm.plot_param_importances(study), "importances.png")))
        except (ValueError, RuntimeError) as exc:  # too few trials or a degenerate search space
            figs.append((f"Parameter importances not available: {exc}", ""))
    art = load_prompt(best_prompt or out / "best" / "prompt.json")
    prompts = art.samples()
    if prompts:
        figs.append(("Prompts of the best trial", plot_prompts(prompts, out / "prompts.png").name))
    if task.split.test:
        from .predict import predict_labels

        shown = task.split.test[:6]
        labels = predict_labels(art, shown)
        ious = [result["test_per_image_iou"].get(s.id, float("nan")) for s in shown]
        figs.append(("Best configuration on test images", plot_predictions(shown, labels, out / "predictions.png", ious).name))
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
        f"({', '.join(f'{k} {v}' for k, v in tr.items() if k not in ('total', 'run_by_this_call'))})",
        f"- Backend `{result['backend']}`; strategies searched: {', '.join(result['strategies'])}",
        f"- Best trial {result['best_trial']}: val mIoU (optimised) **{fmt(result['val_miou'])}**, "
        f"test mIoU (held out, scored once) **{fmt(result['test_miou'])}**",
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
    for caption, name in figs:
        md += [f"### {caption}", ""] + ([f"![{caption}]({name})", ""] if name else [])
    if result.get("command"):
        md += ["## Command", "", "```", result["command"], "```", ""]
    write_report(out, "\n".join(md))
    return out / "report.md"
