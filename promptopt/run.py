"""One run folder for select, tune and search: fingerprinted state, resume, atomic artifacts.

A :class:`Run` is a folder plus a *spec* — everything that determines the run's
answer (data split, backend config, strategy and its options, baselines,
seeds, budget). Its ``state.json`` holds the spec's fingerprint and every
finished piece of work: named *steps* (a baseline's scores, the trial budget it
used) and *checkpoints* (a strategy's progress, tensors in versioned files under
``checkpoints/``). Killing the process at any moment and running the same
command again reproduces the uninterrupted answer, because every number that
depends on the past (an oracle budget, a seed, a finished step) is read back
from the state, never from counters of the running process.

The rules a user can rely on:

* a folder holding a *different* run (other arguments) is never silently
  replaced: the error names what differs; ``restart=True`` (``--restart``)
  removes the old run's files first;
* a corrupt or hand-edited ``state.json`` is an error (``--restart`` starts over);
* nothing is written before the first piece of work is finished, so a run that
  fails to start (a bad budget, a bad option) leaves no folder behind;
* a finished run (``result.json`` written, state marked finished) is returned
  as it is: no model is built, no file is touched;
* answers (``result.json``) hold no timings: wall time and model-forward counts
  depend on where a run was interrupted and live in ``cost.json``.

:func:`run_strategy` is the pipeline behind ``promptopt select`` and ``promptopt
tune``: fit one strategy, score its baselines at the same k and budget, score
everything on the test split once, write the prompt artifact, per-image CSV,
figures and report. :func:`run_categories` applies a run function to several
categories and writes a summary. ``promptopt search`` uses the same Run.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .artifacts import (atomic_write_bytes, atomic_write_csv, atomic_write_json, fingerprint, jsonable, load_prompt,
                        read_json)
from .backends.base import Backend, BackendSpec
from .data import Sample
from .errors import ConfigError
from .memory import out_of_memory_as_budget_error, parse_bytes
from .oracle import ValidationOracle, prediction_to_labels
from .report import metric_definition, one_line, strategy_rows, write_strategy_report, write_summary
from .strategies.acceptance import make_rule
from .strategies.base import ProgressFn, PromptStrategy
from .strategies.registry import make_strategy, strategy_class
from .task import ORACLE_MODES, Task

#: what `select` and `tune` score selection on unless told otherwise: the cross-validated oracle gave the higher test
#: mIoU in every configuration of benchmarks/bench_selection.py (forward 0.741 vs 0.732, best single 0.617 vs 0.595)
DEFAULT_ORACLE = "cv"

STATE_FILE = "state.json"
STATE_FORMAT = "promptopt-run"
STATE_VERSION = 1
#: set to N (an integer) to SIGKILL the process right after its N-th state write (tests of resume)
KILL_ENV = "PROMPTOPT_KILL_AFTER_SAVES"
#: in-process test hook: called with the save count after every state write (may raise to simulate a kill)
fault_hook: Callable[[int], None] | None = None
_saves = 0


def _checksum(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def spec_differences(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 4) -> str:
    """Human-readable list of what differs between two specs ("task.split_seed: 0 → 1, ...")."""
    a, b = _flatten(dict(old)), _flatten(dict(new))
    diffs = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            short = lambda v: (json.dumps(v) if len(json.dumps(v)) <= 40 else "…")  # noqa: E731
            diffs.append(f"{key}: {short(a.get(key))} → {short(b.get(key))}")
    more = f" and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return ", ".join(diffs[:limit]) + more


class Run:
    """A run folder with fingerprinted, resumable state (see the module docstring).

    ``Run(folder, spec)`` only reads: it checks what the folder holds against
    ``spec`` and raises :class:`ConfigError` for another run or a damaged state.
    """

    def __init__(self, folder: str | Path, spec: Mapping[str, Any], *, restart: bool = False) -> None:
        self.folder = Path(folder)
        self.spec = json.loads(json.dumps(dict(spec), sort_keys=True, default=str))
        self.fingerprint = fingerprint(self.spec)
        self._t0 = time.perf_counter()
        self._state = self._open(restart)

    # --- opening --------------------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.folder / STATE_FILE

    def _fresh(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "fingerprint": self.fingerprint,
                "spec": self.spec, "steps": {}, "checkpoints": {}, "finished": False, "elapsed_s": 0.0}

    def _open(self, restart: bool) -> dict[str, Any]:
        if self.folder.exists() and not self.folder.is_dir():
            raise ConfigError(f"{self.folder}: exists and is not a folder; give --out a folder path")
        if not self.folder.is_dir():
            return self._fresh()
        if not self.state_path.is_file():
            visible = [p.name for p in self.folder.iterdir() if not p.name.startswith(".")]
            if visible:
                raise ConfigError(f"{self.folder}: not empty and holds no promptopt run (no {STATE_FILE}); "
                                  "choose a new or empty folder")
            return self._fresh()
        if restart:  # whatever the folder's run state says, even when it is damaged
            self._clear()
            return self._fresh()
        state = self._read_state()
        if state["fingerprint"] != self.fingerprint:
            differs = spec_differences(state.get("spec", {}), self.spec)
            raise ConfigError(f"{self.folder} holds a different run ({differs}); use --restart to replace it, "
                              "or choose another --out")
        return state

    def _read_state(self) -> dict[str, Any]:
        hint = "rerun with --restart to start the run over"
        try:
            doc = json.loads(self.state_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{self.state_path}: unreadable run state ({exc}); {hint}") from None
        if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT or not isinstance(doc.get("body"), dict):
            raise ConfigError(f"{self.state_path}: not a promptopt run state; {hint}")
        body = doc["body"]
        if doc.get("checksum") != _checksum(body):
            raise ConfigError(f"{self.state_path}: run state was modified outside promptopt (checksum mismatch); {hint}")
        if body.get("version") != STATE_VERSION:
            raise ConfigError(f"{self.state_path}: run state of another promptopt version; {hint}")
        return body

    def _clear(self) -> None:
        """Remove everything in the folder (only ever called on a folder that holds a run)."""
        for p in self.folder.iterdir():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()

    # --- state ------------------------------------------------------------------------------------------
    def _save(self) -> None:
        global _saves
        now = time.perf_counter()
        self._state["elapsed_s"] = round(self._state["elapsed_s"] + now - self._t0, 3)
        self._t0 = now
        body = self._state
        atomic_write_json(self.state_path, {"format": STATE_FORMAT, "checksum": _checksum(body), "body": body})
        _saves += 1
        if os.environ.get(KILL_ENV) == str(_saves):
            os.kill(os.getpid(), signal.SIGKILL)
        if fault_hook is not None:
            fault_hook(_saves)

    def begin(self) -> None:
        """Write the state now (for work that creates files of its own before its first step, like a search)."""
        if not self.state_path.is_file():
            self._save()

    @property
    def finished(self) -> bool:
        """A finished run: its state says so and its result is on disk."""
        return bool(self._state["finished"]) and (self.folder / "result.json").is_file()

    def result(self) -> dict[str, Any]:
        """``result.json`` of the run (a DataError when it is not there)."""
        return read_json(self.folder / "result.json")

    def step(self, name: str, compute: Callable[[], Any]) -> Any:
        """The JSON-able value of a named piece of work: computed once, then read back from the state."""
        if name not in self._state["steps"]:
            value = jsonable(compute())
            self._state["steps"][name] = value
            self._save()
        return self._state["steps"][name]

    def checkpoint(self, name: str) -> "RunCheckpoint":
        """A :class:`~promptopt.strategies.base.Checkpoint` stored in this run."""
        return RunCheckpoint(self, name)

    def finish(self, result: Mapping[str, Any], cost: Mapping[str, Any]) -> dict[str, Any]:
        """Write ``result.json`` and ``cost.json`` and mark the run finished (the last write of a run)."""
        atomic_write_json(self.folder / "cost.json", {**cost, "wall_s_total": round(
            self._state["elapsed_s"] + time.perf_counter() - self._t0, 3)})
        atomic_write_json(self.folder / "result.json", result)
        self._state["finished"] = True
        self._save()
        return self.result()


class RunCheckpoint:
    """A strategy's progress inside a run: JSON data in ``state.json``, an optional torch blob in
    ``checkpoints/<name>.<n>.pt`` (a new file each time, so the state never points at a torn blob)."""

    def __init__(self, run: Run, name: str) -> None:
        self.run, self.name = run, name

    def load(self, fingerprint_: str) -> tuple[dict[str, Any], Any] | None:
        entry = self.run._state["checkpoints"].get(self.name)
        if entry is None:
            return None
        if entry["fingerprint"] != fingerprint_:
            raise ConfigError(f"{self.run.state_path}: checkpoint {self.name!r} was made by another configuration "
                              "of this strategy; rerun with --restart to start over")
        blob = None
        if entry.get("blob"):
            path = self.run.folder / entry["blob"]
            try:
                blob = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
            except Exception as exc:  # a missing or foreign file: say so rather than resume from garbage
                raise ConfigError(f"{path}: cannot read the checkpoint ({exc}); rerun with --restart") from None
        return json.loads(json.dumps(entry["data"])), blob

    def save(self, fingerprint_: str, data: dict[str, Any], blob: Any = None) -> None:
        old = self.run._state["checkpoints"].get(self.name, {}).get("blob")
        rel = None
        if blob is not None:
            n = int(old.rsplit(".", 2)[-2]) + 1 if old else 1
            rel = f"checkpoints/{self.name}.{n}.pt"
            buf = io.BytesIO()
            torch.save(blob, buf)
            atomic_write_bytes(self.run.folder / rel, buf.getvalue())
        self.run._state["checkpoints"][self.name] = {
            "fingerprint": fingerprint_, "blob": rel,
            "data": jsonable(data)}
        self.run._save()
        if old and old != rel:
            (self.run.folder / old).unlink(missing_ok=True)


# --- describing inputs for a spec --------------------------------------------------------------------
def describe(value: Any) -> Any:
    """A JSON-able description of an option value for a run's spec (samples by key, indexes by content)."""
    if isinstance(value, Sample):
        return value.key
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): describe(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "manifest_fingerprint"):
        return {"index": value.manifest_fingerprint()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ConfigError(f"option value {value!r} cannot be part of a run's spec")


def backend_config(backend: Backend | BackendSpec) -> dict[str, Any]:
    """What identifies a backend in a spec (``device`` excluded: where a run computes is not what it is)."""
    cfg = backend.config()
    return {**cfg, "options": {k: v for k, v in (cfg.get("options") or {}).items() if k != "device"}}


def build_backend(backend: Backend | BackendSpec) -> Backend:
    return backend.build() if isinstance(backend, BackendSpec) else backend


# --- the strategy pipeline ---------------------------------------------------------------------------
def _entry(strategy: PromptStrategy, val: ValidationOracle, test: ValidationOracle | None) -> dict[str, Any]:
    """Scores of a fitted strategy: val (optimised), test (held out, per image too), extra named scores."""
    scored = strategy.evaluate(test) if test is not None else None
    return {
        "selected": strategy.selected_ids_, "val_miou": strategy.score_, "evaluations": strategy.n_evaluations_,
        "test_miou": scored.miou if scored else None,
        "test_fb_iou": scored.score.summary.get("fb_iou") if scored else None,
        "test_per_image_iou": scored.per_image_iou if scored else None,
        "extra": {"val": strategy.extra_scores(val), "test": strategy.extra_scores(test) if test else {}},
    }


def run_strategy(
    task: Task,
    backend: Backend | BackendSpec,
    out: str | Path,
    strategy: str = "forward",
    options: Mapping[str, Any] | None = None,
    *,
    oracle: str | None = None,
    baselines: Sequence[str] | None = None,
    random_seeds: int = 10,
    memory_budget: str | int | None = None,
    restart: bool = False,
    progress: ProgressFn | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Fit ``strategy`` on ``task``, compare it with its baselines, write the run folder; return result.json.

    ``options`` are the strategy's own knobs (see :func:`~promptopt.strategies.strategy_options`),
    the acceptance rule (``rule``, ``noise_z``) among them. ``oracle`` is what selection is scored on:
    ``"holdout"`` (the val split) or ``"cv"`` (pool ∪ val, each set without its own prompts; see
    :mod:`promptopt.oracle`); None: :data:`DEFAULT_ORACLE`. Both, and the rule as resolved (its defaults included), are part of the
    run's spec, so a resumed run never mixes them. Baselines (default: the strategy's declared ones)
    use the same oracle and rule, run at the chosen k under the same memory budget; random search
    gets the same number of oracle evaluations as the strategy used, over sets of up to
    ``max_prompts`` prompts (or the largest set the strategy scored). Resumable (see :class:`Run`).
    """
    options = dict(options or {})
    cls = strategy_class(strategy)
    baselines = tuple(b for b in (cls.baselines if baselines is None else baselines) if b != strategy)
    budget = parse_bytes(memory_budget)
    oracle = oracle or DEFAULT_ORACLE
    selection = selection_settings(strategy, options, oracle)
    spec = {"kind": "strategy", "task": task.describe(), "backend": backend_config(backend), "strategy": strategy,
            "options": describe(options), "selection": selection, "baselines": list(baselines),
            "random_seeds": int(random_seeds), "memory_budget": budget}
    run = Run(out, spec, restart=restart)
    if run.finished:
        return run.result()
    t0 = time.perf_counter()
    be = build_backend(backend)
    val, test = task.oracles(be, mode=oracle)
    rule = {key: v for key, v in selection.items() if key in ("rule", "noise_z")}
    main = make_strategy(strategy, val, memory_budget=budget, checkpoint=run.checkpoint("strategy"),
                         progress=progress, **{**options, **rule})
    with out_of_memory_as_budget_error(f"strategy {strategy!r}", main.memory_for(1), budget):
        main.fit(task.pool)
    k = main.k_ if main.per_query else len(main.selected_)  # type: ignore[attr-defined]
    budget_calls = max(1, main.n_evaluations_)
    search_k = max(k, int(options.get("max_prompts") or getattr(main, "largest_scored_", k)))

    def fit_baseline(name: str) -> dict[str, Any]:
        kk = search_k if strategy_class(name).searches_sizes else k
        b = make_strategy(name, val, strict=False, k=kk, n_trials=budget_calls, seeds=random_seeds,
                          memory_budget=budget, progress=progress, **rule)
        with out_of_memory_as_budget_error(f"baseline {name!r} (k={kk})", b.memory_for(kk), budget):
            return {**_entry(b.fit(task.pool), val, test), "k": k}

    results = {name: run.step(f"baseline/{name}", lambda name=name: fit_baseline(name)) for name in baselines}
    with out_of_memory_as_budget_error("scoring on the test split", main.memory_for(k), budget):
        entry = _entry(main, val, test)
    summary = main.summary()
    result = {
        "kind": "strategy",
        "strategy": strategy,
        "options": describe(options),
        "selection": selection,
        "backend": be.name,
        "backend_config": be.config(),
        **task.describe(),
        **entry,
        "summary": summary,
        "history": getattr(main, "history_", []),
        "baselines": results,
        "memory": {"budget_bytes": budget, "estimated_peak_bytes": getattr(main, "memory_bytes_", main.memory_for(k)),
                   "estimate_kind": be.memory_kind},
        "metric": metric_definition(task.num_classes),
        "command": command,
    }
    main.save_prompt(run.folder, category=task.category, extra={"test_miou": entry["test_miou"]})
    write_per_image_csv(run.folder / "per_image.csv", {"cv" if val.cross_validate else "val":
                                                        main.evaluate(val).per_image_iou,
                                                        "test": entry["test_per_image_iou"] or {}})
    figures = strategy_figures(run.folder, main, results, entry, task, test)
    cost = {"wall_s_session": round(time.perf_counter() - t0, 3), "oracle": {"val": val.stats, "test": test.stats if test else None},
            "seconds_per_step": getattr(main, "seconds_per_step_", None)}
    write_strategy_report(run.folder, result, figures, cost)
    return run.finish(result, cost)


def selection_settings(strategy: str, options: Mapping[str, Any], oracle: str) -> dict[str, Any]:
    """What scores and judges selection, defaults resolved: the oracle mode and, for strategies with an
    acceptance rule, the rule and its strictness (part of a run's spec and its report)."""
    if oracle not in ORACLE_MODES:
        raise ConfigError(f"--oracle must be one of {', '.join(ORACLE_MODES)}, got {oracle!r}")
    params = inspect.signature(strategy_class(strategy).__init__).parameters
    out: dict[str, Any] = {"oracle": oracle}
    for name in ("rule", "noise_z"):
        if name in params:
            out[name] = options.get(name, params[name].default)
    if "rule" in out:
        make_rule(out["rule"], out.get("noise_z", 1.0))  # a bad rule fails before the run folder exists
    return out


def write_per_image_csv(path: Path, parts: Mapping[str, Mapping[str, float | None]]) -> Path:
    """``split,image,iou`` rows (IoU of each image under the run's prompt), atomically."""
    return atomic_write_csv(path, ["split", "image", "iou"], (
        [split, image, "" if iou is None or iou != iou else f"{iou:.6f}"]
        for split, per in parts.items() for image, iou in per.items()))


def strategy_figures(folder: Path, main: PromptStrategy, baselines: Mapping[str, Any], entry: Mapping[str, Any],
                     task: Task, test: ValidationOracle | None) -> list[tuple[str, str]]:
    """The report's figures: the strategy's own, strategies compared, prompts, test predictions (worst first)."""
    from .plots import plot_prompts, plot_strategy_scores, plot_worst

    figs = list(main.figures(folder))
    rows = strategy_rows({"strategy": main.name, **entry, "baselines": baselines})
    figs.append(("Test mIoU of each strategy (mean ± std over seeds where a strategy has seeds)",
                 plot_strategy_scores(rows, folder / "strategies.png").name))
    if main.selected_:  # type: ignore[attr-defined]
        figs.append(("Chosen prompts with their masks", plot_prompts(main.selected_, folder / "prompts.png").name))  # type: ignore[attr-defined]
    if test is not None:
        figs.append(("The worst test images under the chosen prompts (lowest IoU first)", plot_worst(
            test.samples, entry["test_per_image_iou"] or {},
            lambda worst: [prediction_to_labels(p).cpu().numpy() for p in main.predict(worst)],
            folder / "predictions.png").name))
    return figs


# --- context tuning's starting point -------------------------------------------------------------------
def tuning_init(task: Task, init: str | Path | None, shots: int | None = None, seed: int = 0) -> list[Sample] | str:
    """What ``promptopt tune`` starts from: K drawn pool examples, a prompt.json's examples,
    ``"noise"`` or ``"best-single"`` (the default)."""
    if init is not None and shots is not None:
        raise ConfigError("give at most one of --init PROMPT_JSON|noise|best-single and --shots K")
    if shots is not None:
        return task.draw_prompts(shots, seed)
    if init is None or str(init) in ("noise", "best-single"):
        return str(init or "best-single")
    art = load_prompt(init)
    if art.num_classes != task.num_classes:
        raise ConfigError(f"{art.path}: prompt has {art.num_classes} classes, category {task.category!r} has "
                          f"{task.num_classes}")
    held_out = {s.id: part for part, ids in (("val", task.split.val), ("test", task.split.test)) for s in ids}
    leaked = [f"{i} ({held_out[i]})" for i in art.ids if i in held_out]
    if leaked:
        raise ConfigError(f"{art.path}: init examples {', '.join(leaked[:5])} are held-out images of this split "
                          f"(--split-seed {task.split_seed}); use the split the prompt was selected on")
    if not art.examples:
        raise ConfigError(f"{art.path}: holds no examples to start tuning from")
    pool = {s.id: s for s in task.pool}
    return [pool.get(s.id, s) for s in art.samples()]


# --- several categories ------------------------------------------------------------------------------
def run_categories(run_one: Callable[[str, Path], dict[str, Any]], categories: Sequence[str], out: str | Path,
                   log: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
    """``run_one(category, folder)`` for each category (one folder each under ``out`` when there are
    several, ``out`` itself for one), then ``summary.json``/``summary.md`` over them."""
    out = Path(out)
    if len(categories) == 1:
        return {categories[0]: run_one(categories[0], out)}
    results = {}
    for cat in categories:
        results[cat] = run_one(cat, out / cat)
        if log:
            log(one_line(results[cat]))
    write_summary(out, results)
    return results


__all__ = ["Run", "RunCheckpoint", "run_strategy", "run_categories", "tuning_init", "spec_differences"]
