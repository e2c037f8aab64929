"""Few-shot prompt strategies vs a U-Net trained from scratch on n labelled images.

The blog's experiment: how many labelled images does a model trained from
scratch need before it beats in-context segmentation driven by a handful of
well-chosen prompts? For each category of a dataset, the images are split once
(seeded) into a labelled part (prompt pool + validation) and a test part. The
U-Net is trained on n labelled images for each n of the config (several seeds);
the few-shot strategies (random k, forward selection, retrieval, tuned context)
use the labelled part as the prompt toolkit's pool/val split. All are scored on
the same test images with promptopt's one metric implementation.

Run (one command, resumable — finished units are kept in results.json)::

    python experiments/fewshot_vs_supervised.py --config experiments/configs/weizmann_horse.json

Output in ``experiments/results/<name>/``: results.json (every unit), table.md,
mIoU_vs_n.png (U-Net curve, few-shot strategies as horizontal lines). The
folder is a promptopt run (``state.json``): killed and rerun, it continues after
the last finished unit. Few-shot lines are registered strategies, named in the
config's ``few_shot`` as ``{"label": {"strategy": NAME, ...its options}}``.
"""

from __future__ import annotations

import argparse
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
from promptopt.data import Sample, Split, load_dataset, split_samples  # noqa: E402
from promptopt.report import markdown_table  # noqa: E402
from promptopt.run import Run  # noqa: E402
from promptopt.strategies import make_strategy  # noqa: E402
from promptopt.task import Task  # noqa: E402


def make_backend(cfg: dict[str, Any], **extra_options: Any):
    """The config's segmenter: ``backend`` (default the weight-free ``features``), ``checkpoint``, ``backend_options``."""
    return create_backend(cfg.get("backend", "features"), cfg.get("checkpoint"),
                          {**(cfg.get("backend_options") or {}), **extra_options})


def few_shot(task: Task, cfg: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """One few-shot line: a registered strategy (``entry["strategy"]`` and its options) fitted on the labelled
    pool/val split, scored once on the shared test images."""
    options = {k: v for k, v in entry.items() if k not in ("strategy", "backend_options")}
    be = make_backend(cfg, **entry.get("backend_options", {}))
    val, test = task.oracles(be)
    sel = make_strategy(entry["strategy"], val, **options).fit(task.pool)
    scored = sel.evaluate(test)
    extra = sel.extra_scores(test)
    return {"test_miou": extra.get("mean", scored.miou), "test_miou_std": extra.get("std"), "val_miou": sel.score_,
            "k": len(sel.selected_), "selected": sel.selected_ids_,
            "labels_used": len(task.pool) + len(task.split.val)}


def _labelled_and_test(samples: list[Sample], cfg: dict[str, Any]) -> tuple[list[Sample], list[Sample]]:
    """The labelled images (count or fraction ``labelled``) and the shared test images (the rest)."""
    lab = cfg.get("labelled", 0.5)
    n_lab = min(int(lab), len(samples) - 1) if isinstance(lab, int) else int(round(float(lab) * len(samples)))
    sp = split_samples(samples, pool=n_lab, val=0, test=len(samples) - n_lab, seed=int(cfg.get("split_seed", 0)))
    return sp.pool, sp.test


def run(config_path: Path, out_dir: Path | None = None, log: Callable[[str], None] = lambda m: print(m, flush=True),
        restart: bool = False) -> dict[str, Any]:
    """Every unit of the config (resumable: finished units are kept in the run's state), then the summary."""
    cfg = json.loads(Path(config_path).read_text())
    name = cfg["name"]
    out = out_dir or HERE / "results" / name
    data_root = (Path(config_path).parent / cfg["data"]).resolve() if not Path(cfg["data"]).is_absolute() else Path(cfg["data"])
    ds = load_dataset(data_root, category=cfg.get("categories"))
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
        labelled, test = _labelled_and_test(ds.samples(cat), cfg)
        n_val = max(1, int(round(float(cfg.get("fewshot_val", 0.33)) * len(labelled))))
        inner = split_samples(labelled, pool=len(labelled) - n_val, val=n_val, test=0, seed=int(cfg.get("split_seed", 0)))
        # few-shot strategies choose from the labelled images only and are scored on the shared test images
        task = Task(category=cat, split=Split(pool=inner.pool, val=inner.val, test=test),
                    num_classes=ds.num_classes(cat), data_root=data_root)
        for label, entry in cfg.get("few_shot", {}).items():
            unit(f"{cat}/few-shot/{label}", lambda e=entry: few_shot(task, cfg, e))
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


def summarise(units: dict[str, Any], categories: list[str], out: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """Average over categories: U-Net mIoU per n (mean over seeds) and each few-shot strategy's mIoU."""
    import matplotlib.pyplot as plt

    from promptopt.plots import save_figure

    unet: dict[int, list[float]] = {}
    fs: dict[str, list[float]] = {}
    for key, u in units.items():
        cat, kind, *rest = key.split("/")
        if cat not in categories:
            continue
        if kind == "unet":
            unet.setdefault(int(u["n"]), []).append(u["test_miou"])
        else:
            fs.setdefault(rest[0], []).append(u["test_miou"])
    ns = sorted(unet)
    curve = {n: float(np.mean(unet[n])) for n in ns}
    lines = {k: float(np.mean(v)) for k, v in fs.items()}
    fig, ax = plt.subplots(figsize=(6, 3.8))
    if ns:
        ax.plot(ns, [curve[n] for n in ns], "o-", color="k", label="U-Net from scratch (n labelled)")
        ax.set_xscale("log", base=2)
    for (name, v), c in zip(sorted(lines.items()), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        ax.axhline(v, color=c, linestyle="--", label=f"few-shot: {name}")
    ax.set_xlabel("labelled training images n")
    ax.set_ylabel("test mIoU (foreground IoU)")
    ax.set_title(f"{cfg['name']}: few-shot prompts vs supervised")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "mIoU_vs_n.png", dpi=100)
    rows = [[f"U-Net n={n}", curve[n], len(unet[n])] for n in ns] + \
           [[f"few-shot {k}", v, len(fs[k])] for k, v in sorted(lines.items())]
    md = (f"# {cfg['name']}: test mIoU, mean over {len(categories)} categor{'y' if len(categories) == 1 else 'ies'}\n\n"
          + markdown_table(["method", "test mIoU", "runs"], rows) + "\n\n![mIoU vs n](mIoU_vs_n.png)\n")
    atomic_write_text(out / "table.md", md)
    return {"unet": curve, "few_shot": lines}


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
