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
from promptopt.task import Task, evaluate_prompts
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
ev = evaluate_prompts(val_oracle, test_oracle, two)
print(f"random 2 prompts {ev.prompts}: val mIoU {ev.val_miou:.3f}, test mIoU {ev.test_miou:.3f}")
"""),
    md("## Forward selection\nGrow the prompt set one example at a time, keeping the example that raises val mIoU most (scikit-learn style: `fit` returns self, results in attributes ending in `_`)."),
    code("""
from promptopt.strategies import ForwardSelector

fwd = ForwardSelector(val_oracle, max_prompts=4).fit(task.pool)
print("selected:", fwd.selected_ids_, "stop:", fwd.stop_reason_)
print(f"val mIoU {fwd.score_:.3f}   test mIoU {test_oracle.score(fwd.selected_).miou:.3f}")
print("oracle:", val_oracle.stats)
"""),
    code("""
from promptopt.report import mask_overlay, error_overlay
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
    md("## Save the prompt and segment new images\nA prompt artifact is a `prompt.json` plus copies of the prompt files; `promptopt predict` uses the same function."),
    code("""
import tempfile
from pathlib import Path
from promptopt.artifacts import save_prompt
from promptopt.predict import image_samples, predict_labels

run = Path(tempfile.mkdtemp())
path = save_prompt(run, backend.config(), fwd.selected_, task.num_classes, task.category)
new_images = image_samples([s.path for s in task.split.test[:3]])
labels = predict_labels(path, new_images)
print(path, [l.shape for l in labels], [int(l.sum()) for l in labels])
"""),
]


def write(name: str, cells: list) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = cells
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = ROOT / "notebooks" / name
    nbformat.write(nb, path)
    return path


NOTEBOOKS = {"01_quickstart.ipynb": QUICKSTART}


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        print(write(name, cells))


if __name__ == "__main__":
    main()
