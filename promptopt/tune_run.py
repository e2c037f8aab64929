"""A whole context-tuning run behind ``promptopt tune``: tune, score on val and test, write the run folder.

The run folder gets what ``select`` writes — ``result.json`` (val and test mIoU
of the untuned start and of the tuned result, split ids, wall time),
``prompt.json`` of kind ``tuned`` with the learned tensors in
``context.safetensors`` beside it, and ``report.md`` / ``report.html`` with the
loss and val-mIoU curves and the learned prompt shown as an image — plus
``tuning_state.pt``, from which the same command resumes an interrupted run.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import matplotlib.pyplot as plt

from .artifacts import atomic_write_bytes, atomic_write_json, check_run_dir, load_prompt
from .backends.base import Backend, Context
from .data import Sample
from .errors import ConfigError
from .memory import format_bytes
from .oracle import prediction_to_labels
from .report import figures_and_command, fmt, markdown_table, mask_overlay, plot_curves, plot_predictions, write_report
from .strategies.base import ProgressFn
from .strategies.tuning import ContextTuner, context_to_sample, score_contexts
from .task import Task



def resolve_init(task: Task, init: str | Path | None, shots: int | None, seed: int,
                 out_dir: Path) -> tuple[list[Sample] | None, str]:
    """Starting examples (None for noise) and a description: a prompt.json's examples, K drawn pool shots, or noise."""
    if init is not None and shots is not None:
        raise ConfigError("give at most one of --init PROMPT_JSON|noise and --shots K")
    if shots is not None:
        samples = task.draw_prompts(shots, seed)
        return samples, f"{shots} pool example(s) drawn with seed {seed}"
    if init is None or str(init) == "noise":
        return None, "noise"
    art = load_prompt(init)
    if art.path.parent.resolve() == Path(out_dir).resolve():
        raise ConfigError(f"--out {out_dir} is the folder of --init {art.path}; write the tuned run elsewhere")
    if art.num_classes != task.num_classes:
        raise ConfigError(f"{art.path}: prompt has {art.num_classes} classes, category {task.category!r} has "
                          f"{task.num_classes}")
    held_out = {s.id: part for part, ids in (("val", task.split.val), ("test", task.split.test)) for s in ids}
    leaked = [f"{i} ({held_out[i]})" for i in art.ids if i in held_out]
    if leaked:
        raise ConfigError(f"{art.path}: init examples {', '.join(leaked[:5])} are held-out images of this split "
                          f"(--split-seed {task.split_seed}); use the split the prompt was selected on")
    return art.samples(), f"examples of {art.path}"


def _plot_contexts(start: Sequence[Context], tuned: Sequence[Context], path: Path, max_items: int = 6) -> Path:
    """Per context: start and tuned image with mask overlay, and the tuned image alone (the learned prompt)."""
    n = max(1, min(len(tuned), max_items))
    fig, axes = plt.subplots(n, 3, figsize=(8.0, 2.5 * n), squeeze=False)
    for i in range(n):
        s0, s1 = context_to_sample(start[i], f"start {i}"), context_to_sample(tuned[i], f"tuned {i}")
        for ax, img, title in ((axes[i][0], mask_overlay(s0.image, s0.mask), f"start {i} (mask overlaid)"),
                               (axes[i][1], mask_overlay(s1.image, s1.mask), f"tuned {i} (mask overlaid)"),
                               (axes[i][2], s1.image, f"tuned {i} image")):
            ax.imshow(img)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def run_tuning(
    task: Task,
    backend: Backend,
    out_dir: str | Path,
    init: str | Path | None = None,
    shots: int | None = None,
    seed: int = 0,
    steps: int = 100,
    lr: float = 0.05,
    batch_size: int = 4,
    warmup: int = 10,
    tune: str = "both",
    per_class: bool = False,
    eval_every: int = 10,
    patience: int | None = 5,
    context_side: int | None = None,
    memory_budget: str | int | None = None,
    progress: ProgressFn | None = None,
    command: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Tune contexts for one task; write the run folder; return result.json's data.

    The training images (the loss) are the prompt pool without the starting
    examples (all of the pool when nothing else is left); early stopping and
    the kept tensor use the val split; test is only scored.
    """
    out = check_run_dir(out_dir)
    t0 = time.perf_counter()
    init_samples, init_desc = resolve_init(task, init, shots, seed, out)
    init_ids = {s.id for s in init_samples or []}
    train = [s for s in task.pool if s.id not in init_ids] or list(task.pool)
    val_oracle, test_oracle = task.oracles(backend)
    tuner = ContextTuner(backend, init=init_samples if init_samples is not None else "noise", steps=steps, lr=lr,
                         batch_size=batch_size, warmup=warmup, tune=tune, per_class=per_class,
                         eval_every=eval_every, patience=patience, seed=seed, context_side=context_side,
                         memory_budget=memory_budget, checkpoint_dir=out, progress=progress)
    tuner.fit(train, val_oracle)
    if log and tuner.resumed_step_:
        log(f"resumed after step {tuner.resumed_step_} from {out / 'tuning_state.pt'}")
    if log and tuner.discarded_checkpoint_:
        log(f"{out / 'tuning_state.pt'} belongs to a different configuration; started over")
    test_samples = test_oracle.samples if test_oracle else []
    start_test = score_contexts(backend, tuner.initial_contexts_, test_samples, task.num_classes).miou \
        if test_oracle else None
    tuned_test_score = score_contexts(backend, tuner.contexts_, test_samples, task.num_classes) if test_oracle else None
    examples = None
    if init_samples:
        examples = {"ids": [s.id for s in init_samples], "val_miou": val_oracle.score(init_samples).miou,
                    "test_miou": test_oracle.score(init_samples).miou if test_oracle else None}
    result: dict[str, Any] = {
        "strategy": "tuning",
        "backend": backend.name,
        "backend_config": backend.config(),
        "category": task.category,
        "num_classes": task.num_classes,
        "data_root": str(task.data_root) if task.data_root else None,
        "init": init_desc,
        "init_examples": examples,
        "start": {"val_miou": tuner.initial_score_, "test_miou": start_test},
        "tuned": {"val_miou": tuner.score_, "test_miou": tuned_test_score.miou if tuned_test_score else None},
        "val_miou": tuner.score_,
        "test_miou": tuned_test_score.miou if tuned_test_score else None,
        "summary": tuner.summary(),
        "options": {"steps": steps, "lr": lr, "batch_size": batch_size, "warmup": warmup, "tune": tune,
                    "per_class": per_class, "eval_every": eval_every, "patience": patience, "seed": seed,
                    "context_side": context_side},
        "history": tuner.history_,
        "losses": tuner.losses_,
        "train": [s.id for s in train],
        "split": task.split.ids(),
        "split_seed": task.split_seed,
        "memory": {"budget_bytes": tuner.budget_bytes_, "estimated_peak_bytes": tuner.memory_bytes_,
                   "estimate_kind": backend.memory_kind},
        "seconds_per_step": tuner.seconds_per_step_,
        "tuning_s": round(tuner.elapsed_s_, 3),
        "wall_s": round(time.perf_counter() - t0, 3),
        "command": command,
    }
    tuner.save_prompt(out, backend.config(), task.category, extra={"test_miou": result["test_miou"]})
    atomic_write_json(out / "result.json", result)
    write_tuning_report(out, result, tuner, test_samples, tuned_test_score)
    return result


def write_tuning_report(out: Path, result: dict[str, Any], tuner: ContextTuner, test_samples: Sequence[Sample],
                        tuned_test_score) -> Path:
    """report.md / report.html of a tuning run (plots written beside them)."""
    figs = []
    if tuner.losses_:
        figs.append(("Training loss per step", plot_curves({"loss": tuner.losses_}, out / "loss.png", "step",
                                                             "loss", "Context tuning: training loss").name))
    figs.append((f"Val mIoU per evaluation (every {tuner.eval_every} steps; point 1 is the start)",
                 plot_curves({"val mIoU": [h["val_miou"] for h in tuner.history_]}, out / "val_miou.png",
                             "evaluation", "val mIoU", "Context tuning: validation mIoU").name))
    figs.append(("The learned prompt: start vs tuned context", _plot_contexts(tuner.initial_contexts_, tuner.contexts_,
                                                                             out / "contexts.png").name))
    if test_samples:
        shown = list(test_samples)[:6]
        labels = [prediction_to_labels(tuner.backend.predict(tuner.contexts_, [q], result["num_classes"])[0]).cpu().numpy()
                  for q in shown]
        per = tuned_test_score.per_image_iou if tuned_test_score else {}
        figs.append(("Predictions of the tuned context on test images",
                     plot_predictions(shown, labels, out / "predictions.png",
                                      [per.get(s.id, float("nan")) for s in shown]).name))
    s = result["summary"]
    rows = [["start (untuned)", result["start"]["val_miou"], result["start"]["test_miou"]],
            ["tuned", result["tuned"]["val_miou"], result["tuned"]["test_miou"]]]
    if result.get("init_examples"):
        rows.insert(0, ["init examples as plain prompts", result["init_examples"]["val_miou"],
                        result["init_examples"]["test_miou"]])
    mem = result["memory"]
    md = [
        f"# promptopt report — {result['category']} (context tuning)",
        "",
        f"- Data: `{result['data_root']}`, category `{result['category']}`, {result['num_classes']} classes",
        f"- Split (seed {result['split_seed']}): pool {len(result['split']['pool'])} "
        f"(training images {len(result['train'])}), val {len(result['split']['val'])}, "
        f"test {len(result['split']['test'])}",
        f"- Backend: `{result['backend']}` {result['backend_config'].get('checkpoint') or ''} (frozen)",
        f"- Start: {result['init']}; {s['num_contexts']} context(s), tuning {s['tune']}"
        f"{', one per class' if s['per_class'] else ''}",
        f"- Steps run: {s['steps_run']} (stopped: {s['stop_reason']}); best val at step {s['best_step']}; "
        f"{fmt(result['seconds_per_step'])} s per step; wall time {result['wall_s']:.1f} s",
        f"- Val mIoU (optimised): start {fmt(result['start']['val_miou'])} → **{fmt(result['tuned']['val_miou'])}**; "
        f"test mIoU (held out — trust this one): start {fmt(result['start']['test_miou'])} → "
        f"**{fmt(result['tuned']['test_miou'])}**",
        f"- Memory: estimated peak per step {format_bytes(mem['estimated_peak_bytes'])} ({mem['estimate_kind']}), "
        f"budget {format_bytes(mem['budget_bytes'])}",
        "",
        "## Start vs tuned",
        "",
        markdown_table(["prompt", "val mIoU", "test mIoU"], rows),
        "",
        "The start row is the initial context as tensors (what tuning starts from and is compared with). It can "
        "differ from the examples used as plain prompts: the parametrisation softens masks slightly, and a backend "
        "may treat tensor prompts differently (`features` samples context pixels with a seed taken from the "
        "prompt's id, which tensor prompts lack).",
        "",
    ]
    md += figures_and_command(figs, result.get("command"))
    write_report(out, "\n".join(md))
    return out / "report.md"
