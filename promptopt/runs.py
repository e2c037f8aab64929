"""Whole runs behind the CLI: select prompts for a task, compare with baselines, write artifacts.

The CLI is a few lines over these functions, and notebooks call them directly.
A run folder gets ``result.json``, ``prompt.json`` (+ ``prompts/``),
``report.md`` / ``report.html`` with plots, and ``state.json`` /
``baselines.json`` so that an interrupted run, started again with the same
command, resumes after its last finished step.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .artifacts import RunState, atomic_write_json, check_run_dir, fingerprint
from .backends.base import Backend
from .errors import ConfigError
from .memory import format_bytes
from .oracle import ValidationOracle, prediction_to_labels
from .report import (figures_and_command, fmt, markdown_table, plot_predictions, plot_prompts,
                     plot_steps, plot_strategy_scores, write_report)
from .strategies import (SELECTION_STRATEGIES, BestSingle, ForwardSelector, PromptStrategy, RandomK, RandomSearch,
                         WorstCaseGreedy)
from .strategies.base import ProgressFn
from .task import Task

DEFAULT_BASELINES = ("random", "best-single", "random-search", "worst-case")
#: retrieval is compared with forward selection and random-k at the same k (random search at one oracle call is moot)
RETRIEVAL_BASELINES = ("forward", "random", "best-single")


def make_strategy(name: str, oracle: ValidationOracle, *, max_prompts: int | None = None,
                  memory_budget: str | int | None = None, min_gain: float = 0.0, patience: int = 1,
                  shortlist: int | None = None, k: int | None = None, n_trials: int | None = None,
                  seeds: int = 10, seed: int = 0, checkpoint: Path | None = None,
                  progress: ProgressFn | None = None, index: Any = None, diversity: float = 0.0) -> PromptStrategy:
    """Build a selection strategy by its CLI name."""
    k_eff = k or max_prompts or 4
    if name == "forward":
        return ForwardSelector(oracle, memory_budget=memory_budget, max_prompts=max_prompts, min_gain=min_gain,
                               patience=patience, shortlist=shortlist, checkpoint=checkpoint, progress=progress)
    if name == "random":
        return RandomK(oracle, k_eff, seeds=seeds, progress=progress)
    if name == "best-single":
        return BestSingle(oracle, progress=progress)
    if name == "random-search":
        return RandomSearch(oracle, k_eff, n_trials=n_trials or 50, seed=seed, progress=progress)
    if name == "worst-case":
        return WorstCaseGreedy(oracle, k_eff, progress=progress)
    if name == "retrieval":
        from .strategies.retrieval import RetrievalSelector

        if index is None:
            raise ConfigError("strategy 'retrieval' needs an index (--index indexes/NAME; see `promptopt index build`)")
        return RetrievalSelector(oracle, index, k=k or 4, diversity=diversity, progress=progress)
    raise ConfigError(f"unknown strategy {name!r}; choose one of {', '.join(SELECTION_STRATEGIES)}")


def _test_score(test: ValidationOracle | None, prompts) -> float | None:
    return test.score(prompts).miou if test is not None and prompts else None


def run_selection(
    task: Task,
    backend: Backend,
    out_dir: str | Path,
    strategy: str = "forward",
    max_prompts: int | None = None,
    memory_budget: str | int | None = None,
    min_gain: float = 0.0,
    patience: int = 1,
    shortlist: int | None = None,
    baselines: Sequence[str] = DEFAULT_BASELINES,
    random_seeds: int = 10,
    progress: ProgressFn | None = None,
    command: str | None = None,
    log: Callable[[str], None] | None = None,
    index: Any = None,
    k: int | None = None,
    diversity: float = 0.0,
) -> dict[str, Any]:
    """Run one selection strategy and its baselines on one task; write the run folder; return result.json's data."""
    out = check_run_dir(out_dir)
    t0 = time.perf_counter()
    val_oracle, test_oracle = task.oracles(backend)
    main = make_strategy(strategy, val_oracle, max_prompts=max_prompts, memory_budget=memory_budget,
                         min_gain=min_gain, patience=patience, shortlist=shortlist, seeds=random_seeds,
                         checkpoint=out / "state.json", progress=progress, index=index, k=k, diversity=diversity)
    main.fit(task.pool)
    main_calls = val_oracle.calls
    per_query = main.per_query  # each image has its own prompts: baselines at its k per image
    k = main.k if per_query else len(main.selected_)  # type: ignore[attr-defined]
    if per_query and tuple(baselines) == DEFAULT_BASELINES:
        baselines = RETRIEVAL_BASELINES
    if log and getattr(main, "resumed_steps_", 0):
        log(f"resumed after {main.resumed_steps_} finished step(s) from {out / 'state.json'}")

    rows = [{"name": strategy, "selected": main.selected_ids_, "val_miou": main.score_,
             "test_miou": main.evaluate(test_oracle).miou if test_oracle is not None else None}]
    if strategy == "random":
        tests = [_test_score(test_oracle, d["selected"]) for d in main.draws_]  # type: ignore[attr-defined]
        rows[0]["test_miou_mean"] = float(np.nanmean([t for t in tests if t is not None])) if test_oracle else None
        rows[0]["test_miou_std"] = float(np.nanstd([t for t in tests if t is not None])) if test_oracle else None

    # Baselines at the same k and (for random search) the same number of oracle evaluations.
    base_state = RunState(out, fingerprint({"task": task.describe(), "backend": backend.config(), "k": k,
                                            "calls": main_calls, "seeds": random_seeds}), "baselines.json")
    done: dict[str, Any] = base_state.load() or {}
    baseline_results: dict[str, Any] = {}
    for name in baselines:
        if name == strategy:
            continue
        if name in done:
            baseline_results[name] = done[name]
            continue
        b = make_strategy(name, val_oracle, k=k, max_prompts=k, n_trials=max(1, main_calls), seeds=random_seeds,
                          progress=progress)
        b.fit(task.pool)
        entry: dict[str, Any] = {"selected": b.selected_ids_, "val_miou": b.score_,
                                 "test_miou": _test_score(test_oracle, b.selected_)}
        if name == "random":
            draws = b.draws_  # type: ignore[attr-defined]
            tests = [_test_score(test_oracle, d["selected"]) for d in draws]
            entry["k"] = k
            entry["val_miou_mean"] = b.score_mean_  # type: ignore[attr-defined]
            entry["val_miou_std"] = b.score_std_  # type: ignore[attr-defined]
            entry["test_miou_mean"] = float(np.mean(tests)) if test_oracle else None
            entry["test_miou_std"] = float(np.std(tests)) if test_oracle else None
            entry["draws"] = [{"seed": d["seed"], "selected": [s.id for s in d["selected"]], "val_miou": d["val_miou"],
                               "test_miou": t} for d, t in zip(draws, tests)]
            entry["test_miou"] = entry["test_miou_mean"]
        if name == "random-search":
            entry["n_trials"] = b.n_trials  # type: ignore[attr-defined]
        baseline_results[name] = entry
        done[name] = entry
        base_state.save(done)

    est_peak = backend.memory_bytes(max(k, 1), max((s.size for s in task.split.val), key=lambda hw: hw[0] * hw[1]))
    result: dict[str, Any] = {
        "strategy": strategy,
        "backend": backend.name,
        "backend_config": backend.config(),
        "category": task.category,
        "num_classes": task.num_classes,
        "data_root": str(task.data_root) if task.data_root else None,
        "selected": main.selected_ids_,
        "val_miou": main.score_,
        "test_miou": rows[0]["test_miou"],
        "summary": main.summary(),
        "history": getattr(main, "history_", []),
        "baselines": baseline_results,
        "split": task.split.ids(),
        "split_seed": task.split_seed,
        "oracle": {"calls": val_oracle.calls, "forwards": val_oracle.forwards, "strategy_calls": main_calls,
                   "val": val_oracle.stats, "test": test_oracle.stats if test_oracle else None},
        "memory": {"budget_bytes": getattr(main, "budget_bytes_", None), "estimated_peak_bytes": int(est_peak),
                   "estimate_kind": backend.memory_kind},
        "wall_s": round(time.perf_counter() - t0, 3),
        "command": command,
    }
    if strategy == "random":
        result["test_miou_mean"] = rows[0].get("test_miou_mean")
        result["test_miou_std"] = rows[0].get("test_miou_std")
    main.save_prompt(out, backend.config(), task.num_classes, task.category,
                     extra={"strategy": strategy, "val_miou": main.score_, "test_miou": rows[0]["test_miou"]})
    atomic_write_json(out / "result.json", result)
    write_selection_report(out, result, task, main, test_oracle)
    return result


def write_selection_report(out: Path, result: dict[str, Any], task: Task, main: PromptStrategy,
                           test_oracle: ValidationOracle | None) -> Path:
    """report.md / report.html for one selection run (plots written beside them)."""
    rows = [{"name": result["strategy"] + " (this run)", "val_miou": result["val_miou"],
             "test_miou": result["test_miou"], "test_std": result.get("test_miou_std")}]
    for name, b in result["baselines"].items():
        rows.append({"name": name, "val_miou": b.get("val_miou_mean", b["val_miou"]), "test_miou": b["test_miou"],
                     "test_std": b.get("test_miou_std")})
    figs = []
    history = result.get("history") or []
    if result["strategy"] == "forward" and history:
        figs.append(("Val mIoU per forward-selection step (hollow: step not kept)",
                     plot_steps(history, out / "steps.png").name))
    figs.append(("Test mIoU of each strategy (random: mean ± std over seeds)",
                 plot_strategy_scores(rows, out / "strategies.png").name))
    figs.append(("Chosen prompts with their masks", plot_prompts(main.selected_, out / "prompts.png").name))
    if test_oracle is not None and main.selected_ and not main.per_query:  # per-query prompts: no one set to show
        shown = test_oracle.samples[:6]
        probs = test_oracle.predict(main.selected_)[: len(shown)]
        labels = [prediction_to_labels(p).cpu().numpy() for p in probs]
        per = test_oracle.score(main.selected_).per_image_iou
        figs.append(("Predictions of the chosen prompts on test images",
                     plot_predictions(shown, labels, out / "predictions.png", [per.get(s.id, float("nan")) for s in shown]).name))
    table_rows = [[r["name"], r["val_miou"], r["test_miou"], r.get("test_std")] for r in rows]
    sel = ", ".join(result["selected"]) or "(none)"
    mem = result["memory"]
    md = [
        f"# promptopt report — {result['category']} ({result['strategy']})",
        "",
        f"- Data: `{result['data_root']}`, category `{result['category']}`, {result['num_classes']} classes",
        f"- Split (seed {result['split_seed']}): pool {len(result['split']['pool'])}, "
        f"val {len(result['split']['val'])}, test {len(result['split']['test'])}",
        f"- Backend: `{result['backend']}` {result['backend_config'].get('checkpoint') or ''}",
        f"- Selected ({len(result['selected'])}): {sel}",
        f"- Val mIoU (optimised): **{fmt(result['val_miou'])}**; test mIoU (held out — trust this one): "
        f"**{fmt(result['test_miou'])}**",
        f"- Oracle: {result['oracle']['calls']} prompt-set evaluations, {result['oracle']['forwards']} model forwards "
        f"((prompt, image) pairs); wall time {result['wall_s']:.1f} s",
        f"- Memory: estimated peak {format_bytes(mem['estimated_peak_bytes'])} ({mem['estimate_kind']}), "
        f"budget {format_bytes(mem['budget_bytes'])}",
    ]
    if result["summary"].get("stop_reason"):
        md.append(f"- Stopped because: {result['summary']['stop_reason']}")
    md += ["", "## Strategies compared", "",
           markdown_table(["strategy", "val mIoU", "test mIoU", "test std"], table_rows), ""]
    md += figures_and_command(figs, result.get("command"))
    write_report(out, "\n".join(md))
    return out / "report.md"


def write_summary(out_dir: str | Path, results: dict[str, dict[str, Any]]) -> Path:
    """Table over categories (several categories optimised separately): summary.json and summary.md."""
    out = Path(out_dir)
    names = sorted({n for r in results.values() for n in r["baselines"]})
    header = ["category", "selected", "val mIoU", "test mIoU"] + [f"{n} test" for n in names]
    rows = []
    for cat, r in results.items():
        rows.append([cat, len(r["selected"]), r["val_miou"], r["test_miou"]]
                    + [r["baselines"].get(n, {}).get("test_miou") for n in names])
    mean = ["**mean**", "", float(np.nanmean([r[2] for r in rows])),
            float(np.nanmean([r[3] if r[3] is not None else np.nan for r in rows]))]
    for j in range(len(names)):
        vals = [r[4 + j] for r in rows if r[4 + j] is not None]
        mean.append(float(np.mean(vals)) if vals else None)
    rows.append(mean)
    md = "# promptopt summary\n\n" + markdown_table(header, rows) + "\n"
    atomic_write_json(out / "summary.json", {"categories": results})
    write_report(out, md, name="summary")
    return out / "summary.md"
