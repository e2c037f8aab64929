"""Write notebooks/*.ipynb from the cell sources below (outputs are never committed).

Keeping the sources here makes notebook changes reviewable as plain Python;
``tests/test_notebooks.py`` executes every notebook top to bottom on the bundled sample.

    python scripts/make_notebooks.py
"""

from __future__ import annotations

from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]


def md(text: str):
    return nbformat.v4.new_markdown_cell(text.strip())


def code(text: str):
    return nbformat.v4.new_code_cell(text.strip())


QUICKSTART = [
    md("""
# promptopt quickstart — the Python API end to end

promptopt optimises the *prompt* of an in-context segmenter, not its weights. This notebook runs on the small
DAVIS sample bundled with the package and the weight-free `features` backend, so it needs no GPU and no checkpoint.

Flow: **dataset → backend (segmenter) → oracle (val mIoU) → strategy → artifact**.
"""),
    code("""
%matplotlib inline
import matplotlib.pyplot as plt
from promptopt.data import bundled_sample_root, load_dataset
from promptopt.task import Task
from promptopt.backends import create_backend

ds = load_dataset(bundled_sample_root())
print(ds.categories)
task = Task.from_dataset(ds, "camel", pool=0.5, val=0.25, seed=0)   # deterministic pool / val / test split
print({k: len(v) for k, v in task.split.ids().items()})
"""),
    md("## A backend and the validation oracle\nThe oracle scores a prompt set by dataset-level mIoU (foreground IoU for binary tasks) and caches every (prompt, image) result."),
    code("""
backend = create_backend("features")
val_oracle, test_oracle = task.oracles(backend)
two = task.draw_prompts(2, seed=0)
val_score, test_score = val_oracle.score(two), test_oracle.score(two)
print(f"random 2 prompts {[s.id for s in two]}: val mIoU {val_score.miou:.3f}, test mIoU {test_score.miou:.3f}")
assert set(val_score.per_image_iou) == {s.id for s in task.split.val}
"""),
    md("## Forward selection\nGrow the prompt set one example at a time, keeping the example that raises val mIoU most (scikit-learn style: `fit` returns self, results in attributes ending in `_`)."),
    code("""
from promptopt.strategies import ForwardSelector

fwd = ForwardSelector(val_oracle, max_prompts=4).fit(task.pool)
print("selected:", fwd.selected_ids_, "stop:", fwd.stop_reason_)
print(f"val mIoU {fwd.score_:.3f}   test mIoU {fwd.evaluate(test_oracle).miou:.3f}")
print("oracle:", val_oracle.stats)
assert fwd.score_ == val_oracle.score(fwd.selected_).miou and 1 <= len(fwd.selected_) <= 4
"""),
    code("""
from promptopt.plots import mask_overlay, error_overlay
from promptopt.oracle import prediction_to_labels

fig, axes = plt.subplots(1, len(fwd.selected_), figsize=(3 * len(fwd.selected_), 2.2), squeeze=False)
for ax, s in zip(axes[0], fwd.selected_):
    ax.imshow(mask_overlay(s.image, s.mask)); ax.set_title(f"prompt {s.id}"); ax.axis("off")
plt.show()

shown = task.split.test[:4]
probs = backend.predict(fwd.selected_, shown, task.num_classes)
fig, axes = plt.subplots(1, len(shown), figsize=(3 * len(shown), 2.2), squeeze=False)
for ax, s, p in zip(axes[0], shown, probs):
    ax.imshow(error_overlay(s.image, prediction_to_labels(p).numpy(), s.mask)); ax.set_title(s.id); ax.axis("off")
plt.suptitle("green: correct, red: false positive, blue: missed", fontsize=8)
plt.show()
"""),
    md("## Save the prompt and segment new images\nA prompt artifact is a `prompt.json` plus copies of the prompt files; `promptopt predict` uses the same function.\n\nThe whole pipeline with baselines, resume and a report is one call: `promptopt.run.run_strategy(task, backend, out_dir, \"forward\", {\"max_prompts\": 4})` (what `promptopt select` runs)."),
    code("""
import tempfile
from pathlib import Path
from promptopt.predict import image_samples, predict_labels

run = Path(tempfile.mkdtemp())
path = fwd.save_prompt(run, category=task.category)
new_images = image_samples([s.path for s in task.split.test[:3]])
labels = predict_labels(path, new_images)
print(path, [l.shape for l in labels], [int(l.sum()) for l in labels])
direct = [prediction_to_labels(p).numpy() for p in backend.predict(fwd.selected_, new_images, task.num_classes)]
assert all((a == b).all() for a, b in zip(labels, direct)), "the saved prompt predicts what the selector chose"
"""),
]


TUNING = [
    md("""
# Context tuning — learn the prompt, keep the model frozen

SegGPT's authors propose to freeze the segmenter and optimise the prompt tensor itself (image and/or mask) by
gradient descent on labelled images. `ContextTuner` does this for any backend that is differentiable in its prompt;
here the weight-free `features` backend on the bundled DAVIS sample (SegGPT works the same way with a checkpoint).
"""),
    code("""
%matplotlib inline
import matplotlib.pyplot as plt
import numpy as np
from promptopt.data import bundled_sample_root
from promptopt.task import Task
from promptopt.backends import create_backend
from promptopt.strategies import BestSingle, ContextTuner

task = Task.from_folder(bundled_sample_root(), "dog", pool=0.5, val=0.25, seed=0)
backend = create_backend("features", options={"max_side": 128, "pixels_per_prompt": 512})
val_oracle, test_oracle = task.oracles(backend)
start = BestSingle(val_oracle).fit(task.pool).selected_
print("start from", [s.id for s in start], f"val mIoU {val_oracle.score(start).miou:.3f}")
"""),
    md("## Tune\nAdam with warm-up and cosine decay; the current context is scored on val every few steps, and it replaces the kept one only when its paired gain over it beats the per-image noise (`rule=\"se\"`: one standard error of the per-image IoU differences), so tuning never ends below its start because of validation noise; it stops early after `patience` evaluations that do not count. Model weights cannot change: the tuner freezes them and checks after every backward pass."),
    code("""
tuner = ContextTuner(val_oracle, init=start, steps=12, lr=0.05, batch_size=3, warmup=2, eval_every=3).fit(task.pool)
print(f"val mIoU: start {tuner.initial_score_:.3f} -> tuned {tuner.score_:.3f} (best step {tuner.best_step_})")
print(f"test mIoU: start {tuner.extra_scores(test_oracle)['start']:.3f} -> tuned {tuner.evaluate(test_oracle).miou:.3f}")
kept = [h for h in tuner.history_[1:] if h["accepted"]]  # evaluations whose gain beat the noise
assert tuner.best_step_ == (kept[-1]["step"] if kept else 0) and tuner.score_ >= tuner.initial_score_
"""),
    code("""
fig, axes = plt.subplots(1, 3, figsize=(11, 2.6))
axes[0].plot(tuner.losses_); axes[0].set_title("training loss"); axes[0].set_xlabel("step")
axes[1].plot([h["step"] for h in tuner.history_], [h["val_miou"] for h in tuner.history_], "o-")
axes[1].set_title("val mIoU"); axes[1].set_xlabel("step")
ctx = tuner.contexts_[0]
axes[2].imshow(ctx.image.detach().permute(1, 2, 0).clamp(0, 1).numpy())
axes[2].contour(ctx.mask.detach()[1].numpy(), levels=[0.5], colors="r"); axes[2].set_title("learned context (mask contour)")
axes[2].axis("off")
plt.tight_layout(); plt.show()
"""),
    md("## Save, reload, predict\nThe tuned context is stored as safetensors inside the prompt artifact; `promptopt predict` and `predict_labels` use it like any prompt."),
    code("""
import tempfile
from pathlib import Path
from promptopt.predict import predict_labels

run = Path(tempfile.mkdtemp())
path = tuner.save_prompt(run, category=task.category)   # prompt.json + context.safetensors
labels = predict_labels(path, task.split.test[:3])
direct = [p.argmax(0).numpy() for p in backend.predict(tuner.contexts_, task.split.test[:3], task.num_classes)]
same = all((a == b).all() for a, b in zip(labels, direct))
print("reloaded prediction equals the tuner's:", same)
assert same
"""),
]


STRATEGIES = [
    md("""
# Every strategy side by side

One task (the bundled `blackswan` object, weight-free `features` backend), one validation oracle, every strategy:
random k, best single example, random search, worst-case greedy, forward selection, retrieval (each image gets its
nearest pool examples from a FAISS index) and a tuned context. Val mIoU is what each optimises; **test mIoU** is held
out and is the number to trust.
"""),
    code("""
%matplotlib inline
import matplotlib.pyplot as plt
import numpy as np
from promptopt.data import bundled_sample_root
from promptopt.task import Task
from promptopt.backends import create_backend
from promptopt.strategies import BestSingle, ForwardSelector, RandomK, RandomSearch, WorstCaseGreedy

task = Task.from_folder(bundled_sample_root(), "car-roundabout", pool=0.5, val=0.25, seed=0)
backend = create_backend("features")
val, test = task.oracles(backend)
K = 3
rows = {}
fwd = ForwardSelector(val, max_prompts=K).fit(task.pool)
rows["forward"] = (fwd.score_, fwd.evaluate(test).miou)
k = len(fwd.selected_)
rnd = RandomK(val, k=k, seeds=5).fit(task.pool)
rows["random-k (mean)"] = (rnd.extra_scores(val)["mean"], rnd.extra_scores(test)["mean"])
for name, strat in {"best single": BestSingle(val),
                    "random search": RandomSearch(val, k=k, n_trials=fwd.n_evaluations_),  # the same oracle budget
                    "worst-case greedy": WorstCaseGreedy(val, max_prompts=k)}.items():
    strat.fit(task.pool)
    rows[name] = (strat.score_, strat.evaluate(test).miou)
print("forward selected", fwd.selected_ids_)
assert rows["best single"][0] <= rows["forward"][0]  # forward's first step is the best single example
"""),
    md("## Retrieval: a prompt per image\nThe pool is embedded once with the weight-free encoder and indexed with FAISS; each image's k nearest pool examples are its prompt."),
    code("""
from promptopt.embeddings import create_encoder
from promptopt.index import build_index
from promptopt.strategies.retrieval import RetrievalSelector

index = build_index(list(task.pool), create_encoder("features"), kind="flat")
ret = RetrievalSelector(val, index=index, k=K).fit(task.pool)
rows["retrieval"] = (ret.score_, ret.evaluate(test).miou)
print({q: p for q, p in list(ret.assignment_.items())[:3]})
"""),
    md("## Tuned context\nStart from the best single example and learn its image and mask with the model frozen."),
    code("""
from promptopt.strategies import ContextTuner

tuner = ContextTuner(val, init="best-single", steps=8, lr=0.05, batch_size=3, warmup=1, eval_every=4).fit(task.pool)
rows["tuned context"] = (tuner.score_, tuner.evaluate(test).miou)
"""),
    code("""
names = list(rows)
v = [rows[n][0] for n in names]; t = [rows[n][1] for n in names]
x = np.arange(len(names))
plt.figure(figsize=(8, 3))
plt.bar(x - 0.2, v, 0.4, label="val (optimised)"); plt.bar(x + 0.2, t, 0.4, label="test (held out)")
plt.xticks(x, names, rotation=20, fontsize=8); plt.ylim(min(v + t) - 0.1, 1); plt.ylabel("mIoU"); plt.legend(fontsize=8)
plt.title(f"{task.category}: strategies compared"); plt.tight_layout(); plt.show()
for n in names:
    print(f"{n:20s} val {rows[n][0]:.3f}   test {rows[n][1]:.3f}")
"""),
    md("## What the predictions look like\nGreen: correct foreground, red: false positive, blue: missed."),
    code("""
from promptopt.oracle import prediction_to_labels
from promptopt.plots import error_overlay

shown = task.split.test[:3]
preds = {"forward": backend.predict(fwd.selected_, shown, task.num_classes),
         "random-k (seed 0)": backend.predict(rnd.draws_[0], shown, task.num_classes),
         "tuned context": backend.predict(tuner.contexts_, shown, task.num_classes)}
fig, axes = plt.subplots(len(preds), len(shown), figsize=(3 * len(shown), 2 * len(preds)), squeeze=False)
for r, (name, probs) in enumerate(preds.items()):
    for c, (s, p) in enumerate(zip(shown, probs)):
        axes[r][c].imshow(error_overlay(s.image, prediction_to_labels(p).numpy(), s.mask)); axes[r][c].axis("off")
        axes[r][c].set_title(f"{name}: {s.id}", fontsize=8)
plt.tight_layout(); plt.show()
"""),
]


def write(name: str, cells: list) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = cells
    for i, cell in enumerate(nb.cells):  # stable ids: regenerating a notebook changes only what changed
        cell.id = f"cell-{i:02d}"
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = ROOT / "notebooks" / name
    nbformat.write(nb, path)
    return path


NOTEBOOKS = {"01_quickstart.ipynb": QUICKSTART, "02_strategies_compared.ipynb": STRATEGIES,
             "03_context_tuning.ipynb": TUNING}


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        print(write(name, cells))


if __name__ == "__main__":
    main()
