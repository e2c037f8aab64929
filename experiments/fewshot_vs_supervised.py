"""Few-shot prompt strategies and zero-shot text prompts vs a U-Net trained from scratch on n labelled images.

The blog's experiment: how many labelled images does a model trained from
scratch need before it beats in-context segmentation driven by a handful of
well-chosen prompts, or a text-prompted model that needs no example at all?
For each category of a dataset, the images are split once (seeded) into a
labelled part (prompt pool + validation) and a test part. The U-Net is trained
on n labelled images for each n of the config (several seeds); the few-shot
strategies (random k, forward selection, retrieval, tuned context) use the
labelled part as the prompt toolkit's pool/val split; the zero-shot lines
(text-prompted CLIPSeg, Grounded SAM) choose their phrase among the config's
candidates on the same validation images (the ``text`` strategy) and see no
pool example. All are scored on the same test images with promptopt's one
metric implementation.

Run (one command, resumable — finished units are kept in the run's state.json)::

    python experiments/fewshot_vs_supervised.py --config experiments/configs/weizmann_horse.json

Output in ``experiments/results/<name>/``: results.json (every unit), table.md,
mIoU_vs_n.png (U-Net curve; few-shot strategies as dashed, zero-shot methods as
dotted horizontal lines). The folder is a promptopt run (``state.json``): killed
and rerun, it continues after the last finished unit.

Config
    Few-shot lines are registered strategies, named in ``few_shot`` as
    ``{"label": {"strategy": NAME, ...its options}}``; zero-shot lines in
    ``zero_shot`` as ``{"label": {"backend": "clipseg", "checkpoint": DIR,
    "texts": {"<category>": [candidate phrases]}}}`` (a category without
    candidates uses its own name). Every line uses the config's ``backend``,
    ``checkpoint`` and ``backend_options`` unless it names a ``backend`` of
    its own (then only its own ``checkpoint`` and ``backend_options``
    apply). A checkpoint starting with ``./`` or ``../`` is relative to the
    config file, like ``data``; anything else is a folder or model id as given.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from supervised_unet import TrainConfig, evaluate_unet, train_unet  # noqa: E402

from promptopt.artifacts import atomic_write_json, atomic_write_text  # noqa: E402
from promptopt.backends import create_backend  # noqa: E402
from promptopt.data import Dataset, Sample, Split, load_dataset, split_samples  # noqa: E402
from promptopt.report import markdown_table  # noqa: E402
from promptopt.run import Run  # noqa: E402
from promptopt.strategies import make_strategy  # noqa: E402
from promptopt.task import Task  # noqa: E402


#: keys of a line's entry that choose its segmenter (the rest are the strategy's options)
BACKEND_KEYS = ("backend", "checkpoint", "backend_options")


def resolve_checkpoint(checkpoint: str | None, config_dir: Path) -> str | None:
    """A checkpoint of the config: ``./`` and ``../`` paths are relative to the config file, anything else as given."""
    if checkpoint is not None and checkpoint.startswith(("./", "../")):
        return str((config_dir / checkpoint).resolve())
    return checkpoint


def make_backend(cfg: dict[str, Any], entry: dict[str, Any] | None = None, config_dir: Path = HERE):
    """A line's segmenter: its own ``backend`` (with its ``checkpoint`` and ``backend_options``), else the
    config's (default the weight-free ``features``), with the line's ``backend_options`` on top."""
    entry = entry or {}
    if "backend" in entry:
        name, checkpoint, options = entry["backend"], entry.get("checkpoint"), dict(entry.get("backend_options") or {})
    else:
        name, checkpoint = cfg.get("backend", "features"), cfg.get("checkpoint")
        options = {**(cfg.get("backend_options") or {}), **(entry.get("backend_options") or {})}
    return create_backend(name, resolve_checkpoint(checkpoint, config_dir), options)


def few_shot(task: Task, cfg: dict[str, Any], entry: dict[str, Any], config_dir: Path = HERE) -> dict[str, Any]:
    """One few-shot line: a registered strategy (``entry["strategy"]`` and its options) fitted on the labelled
    pool/val split, scored once on the shared test images."""
    options = {k: v for k, v in entry.items() if k not in ("strategy", *BACKEND_KEYS)}
    val, test = task.oracles(make_backend(cfg, entry, config_dir))
    sel = make_strategy(entry["strategy"], val, **options).fit(task.pool)
    scored = sel.evaluate(test)
    extra = sel.extra_scores(test)
    return {"test_miou": extra.get("mean", scored.miou), "test_miou_std": extra.get("std"), "val_miou": sel.score_,
            "k": len(sel.selected_), "selected": sel.selected_ids_,
            "labels_used": len(task.pool) + len(task.split.val)}


def zero_shot(task: Task, cfg: dict[str, Any], entry: dict[str, Any], config_dir: Path = HERE) -> dict[str, Any]:
    """One zero-shot line: a text-prompted backend whose phrase the ``text`` strategy picks among the entry's
    candidates for this category (``texts``; default: the category's name) on the labelled validation images,
    scored once on the shared test images. It sees no pool example: only the validation labels are used."""
    options = {k: v for k, v in entry.items() if k not in ("texts", *BACKEND_KEYS)}
    val, test = task.oracles(make_backend(cfg, entry, config_dir))
    sel = make_strategy("text", val, candidates=(entry.get("texts") or {}).get(task.category), **options).fit([])
    baselines = sel.extra_scores(test)
    return {"test_miou": sel.evaluate(test).miou, "val_miou": sel.score_, "text": list(sel.texts_),
            "candidates": {str(c): list(v) for c, v in sel.candidates.items()},
            "baselines_test_miou": baselines, "evaluations": sel.n_evaluations_, "labels_used": len(task.split.val)}


def _labelled_and_test(samples: list[Sample], cfg: dict[str, Any]) -> tuple[list[Sample], list[Sample]]:
    """The labelled images (count or fraction ``labelled``) and the shared test images (the rest)."""
    lab = cfg.get("labelled", 0.5)
    n_lab = min(int(lab), len(samples) - 1) if isinstance(lab, int) else int(round(float(lab) * len(samples)))
    sp = split_samples(samples, pool=n_lab, val=0, test=len(samples) - n_lab, seed=int(cfg.get("split_seed", 0)))
    return sp.pool, sp.test


def category_task(ds: Dataset, cat: str, cfg: dict[str, Any],
                  data_root: Path | None = None) -> tuple[list[Sample], Task]:
    """A category's labelled images and its task: pool / val from the labelled part, the shared test images."""
    labelled, test = _labelled_and_test(ds.samples(cat), cfg)
    n_val = max(1, int(round(float(cfg.get("fewshot_val", 0.33)) * len(labelled))))
    inner = split_samples(labelled, pool=len(labelled) - n_val, val=n_val, test=0, seed=int(cfg.get("split_seed", 0)))
    # few-shot strategies choose from the labelled images only and are scored on the shared test images
    return labelled, Task(category=cat, split=Split(pool=inner.pool, val=inner.val, test=test),
                          num_classes=ds.num_classes(cat), data_root=data_root)


def load_config(config_path: Path) -> tuple[dict[str, Any], Path, Dataset]:
    """The config, its data root (``data``, relative to the config file unless absolute) and the dataset."""
    cfg = json.loads(Path(config_path).read_text())
    data = Path(cfg["data"])
    data_root = data if data.is_absolute() else (Path(config_path).parent / data).resolve()
    return cfg, data_root, load_dataset(data_root, category=cfg.get("categories"))


def run(config_path: Path, out_dir: Path | None = None, log: Callable[[str], None] = lambda m: print(m, flush=True),
        restart: bool = False) -> dict[str, Any]:
    """Every unit of the config (resumable: finished units are kept in the run's state), then the summary."""
    cfg, data_root, ds = load_config(config_path)
    name = cfg["name"]
    out = out_dir or HERE / "results" / name
    config_dir = Path(config_path).resolve().parent
    run = Run(out, {"kind": "experiment", "config": cfg, "data_root": str(data_root)}, restart=restart)
    if run.finished:
        return run.result()
    done: dict[str, Any] = {}

    def unit(key: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        def timed() -> dict[str, Any]:
            t0 = time.perf_counter()
            res = fn()
            log(f"{key}: test mIoU {res['test_miou']:.4f} ({time.perf_counter() - t0:.1f} s)")
            return res

        done[key] = run.step(key, timed)
        return done[key]

    for cat in ds.categories:
        labelled, task = category_task(ds, cat, cfg, data_root)
        test = task.split.test
        for label, entry in cfg.get("few_shot", {}).items():
            unit(f"{cat}/few-shot/{label}", lambda e=entry: few_shot(task, cfg, e, config_dir))
        for label, entry in cfg.get("zero_shot", {}).items():
            unit(f"{cat}/zero-shot/{label}", lambda e=entry: zero_shot(task, cfg, e, config_dir))
        tc = TrainConfig(**{**cfg.get("unet", {}), "size": tuple(cfg.get("unet", {}).get("size", (128, 128)))})
        for n in cfg["n_values"]:
            if n > len(labelled):
                continue
            for seed in range(int(cfg.get("unet_seeds", 2))):
                def train(n=n, seed=seed) -> dict[str, Any]:
                    rng = np.random.default_rng(seed)
                    idx = rng.choice(len(labelled), size=n, replace=False)
                    model = train_unet([labelled[i] for i in idx], ds.num_classes(cat),
                                       TrainConfig(**{**tc.__dict__, "seed": seed}))
                    return {"test_miou": evaluate_unet(model, test, ds.num_classes(cat), tc.size), "n": n, "seed": seed}
                unit(f"{cat}/unet/n={n}/seed={seed}", train)
    atomic_write_json(out / "results.json", {"config": cfg, "units": done})
    return run.finish(summarise(done, ds.categories, out, cfg), {})


#: line style of each kind of horizontal line (the U-Net is the solid curve)
LINE_STYLES = {"few-shot": "--", "zero-shot": ":"}


def draw(ax: Any, curve: dict[int, float], lines: dict[str, dict[str, float]]) -> None:
    """The figure's content: the U-Net curve, then one horizontal line per method, styled by its kind
    (few-shot dashed, zero-shot dotted), colours cycling over all lines."""
    import matplotlib.pyplot as plt

    ns = sorted(curve)
    if ns:
        ax.plot(ns, [curve[n] for n in ns], "o-", color="k", label="U-Net from scratch (n labelled)")
        ax.set_xscale("log", base=2)
    colours = itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    for kind, style in LINE_STYLES.items():
        for name, v in sorted(lines.get(kind, {}).items()):
            what = " (best text on val)" if kind == "zero-shot" else ""
            ax.axhline(v, color=next(colours), linestyle=style, label=f"{kind}: {name}{what}")


def summarise(units: dict[str, Any], categories: list[str], out: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """Average over categories: U-Net mIoU per n (mean over seeds), each few-shot strategy's and zero-shot method's."""
    import matplotlib.pyplot as plt

    from promptopt.plots import save_figure

    unet: dict[int, list[float]] = {}
    per_line: dict[str, dict[str, list[float]]] = {kind: {} for kind in LINE_STYLES}
    for key, u in units.items():
        cat, kind, *rest = key.split("/")
        if cat not in categories:
            continue
        if kind == "unet":
            unet.setdefault(int(u["n"]), []).append(u["test_miou"])
        else:
            per_line[kind].setdefault(rest[0], []).append(u["test_miou"])
    ns = sorted(unet)
    curve = {n: float(np.mean(unet[n])) for n in ns}
    lines = {kind: {k: float(np.mean(v)) for k, v in got.items()} for kind, got in per_line.items()}
    fig, ax = plt.subplots(figsize=(6, 3.8))
    draw(ax, curve, lines)
    ax.set_xlabel("labelled training images n")
    ax.set_ylabel("test mIoU (foreground IoU)")
    ax.set_title(f"{cfg['name']}: zero- and few-shot prompts vs supervised" if lines["zero-shot"]
                 else f"{cfg['name']}: few-shot prompts vs supervised")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "mIoU_vs_n.png", dpi=100)
    rows = [[f"U-Net n={n}", curve[n], len(unet[n])] for n in ns] + \
           [[f"{kind} {k}", v, len(per_line[kind][k])] for kind in LINE_STYLES for k, v in sorted(lines[kind].items())]
    md = (f"# {cfg['name']}: test mIoU, mean over {len(categories)} categor{'y' if len(categories) == 1 else 'ies'}\n\n"
          + markdown_table(["method", "test mIoU", "runs"], rows) + "\n\n![mIoU vs n](mIoU_vs_n.png)\n")
    atomic_write_text(out / "table.md", md)
    return {"unet": curve, "few_shot": lines["few-shot"], "zero_shot": lines["zero-shot"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--restart", action="store_true", help="replace a run of another config in --out")
    args = ap.parse_args()
    summary = run(args.config, args.out, restart=args.restart)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
