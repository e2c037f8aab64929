"""The ``promptopt`` command: parses options, calls the Python API, prints results.

No logic lives here that the API lacks. Every user error surfaces as one line
``error: ...`` naming the file or option at fault (exit code 2), never as a
traceback.
"""

from __future__ import annotations

import json
import shlex
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import ConfigError, PromptOptError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Optimise the prompt, not the weights, of in-context image segmenters.")
console = Console(stderr=True)
out_console = Console()


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(2)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn promptopt's own errors (bad files, ids, options) into a one-line message and exit code 2."""
    try:
        yield
    except PromptOptError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        console.print("interrupted: finished steps are saved; run the same command again to resume")
        raise typer.Exit(130)


def _size(text: Optional[str]) -> float | int | None:
    if text is None:
        return None
    try:
        return int(text) if text.strip().isdigit() else float(text)
    except ValueError:
        raise ConfigError(f"split size {text!r} must be a count (10) or a fraction (0.25)") from None


def _options(pairs: Optional[List[str]]) -> dict[str, Any]:
    """--option key=value (value parsed as JSON when it can be: numbers, lists, true/false)."""
    out: dict[str, Any] = {}
    for p in pairs or []:
        if "=" not in p:
            raise ConfigError(f"--option {p!r}: write key=value")
        k, v = p.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


@contextmanager
def progress_bars(enabled: bool = True):
    """A rich progress display; yields a ``progress(label, done, total)`` callback for strategies."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as prog:
        tasks: dict[str, Any] = {}

        def update(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = prog.add_task(label, total=total)
            prog.update(tasks[label], completed=done, total=total)

        yield update


def _task_and_backend(data: Path, category: Optional[str], backend: str, checkpoint: Optional[str],
                      option: Optional[List[str]], split_seed: int, pool: str, val: str, test: Optional[str],
                      num_classes: Optional[int], mask_mode: str, device: Optional[str]):
    from .backends import create_backend
    from .task import Task

    task = Task.from_folder(data, category, mask_mode=mask_mode, num_classes=num_classes, pool=_size(pool),
                            val=_size(val), test=_size(test), seed=split_seed)
    opts = _options(option)
    if device:
        opts["device"] = device
    return task, create_backend(backend, checkpoint, opts)


DataOpt = typer.Option(..., "--data", help="Dataset root: <root>/<category>/{images,masks}/ or <root>/{images,masks}/.")
CategoryOpt = typer.Option(None, "--category", help="Category (sub-folder) to use.")
BackendOpt = typer.Option("features", "--backend", help="Segmenter: features (weight-free), seggpt, persam.")
CheckpointOpt = typer.Option(None, "--checkpoint", help="Model id or local folder for seggpt/persam.")
OptionOpt = typer.Option(None, "--option", help="Backend option key=value (repeatable).")
SeedOpt = typer.Option(0, "--split-seed", help="Seed of the pool/val/test split.")
PoolOpt = typer.Option("0.5", "--pool", help="Prompt pool size: count or fraction.")
ValOpt = typer.Option("0.25", "--val", help="Validation size: count or fraction.")
TestOpt = typer.Option(None, "--test", help="Test size: count or fraction (default: the rest).")
ClassesOpt = typer.Option(None, "--num-classes", help="Classes incl. background; masks with larger ids are an error.")
MaskModeOpt = typer.Option("auto", "--mask-mode", help="auto, binary or classes (see promptopt.data).")
DeviceOpt = typer.Option(None, "--device", help="torch device for the backend, e.g. cuda.")


@app.command()
def evaluate(
    data: Path = DataOpt,
    category: Optional[str] = CategoryOpt,
    backend: str = BackendOpt,
    checkpoint: Optional[str] = CheckpointOpt,
    prompts: Optional[str] = typer.Option(None, "--prompts", help="Comma-separated pool sample ids (file stems)."),
    shots: Optional[int] = typer.Option(None, "--shots", help="Draw K pool examples with --seed."),
    seed: int = typer.Option(0, "--seed", help="Seed for --shots."),
    split_seed: int = SeedOpt,
    pool: str = PoolOpt,
    val: str = ValOpt,
    test: Optional[str] = TestOpt,
    num_classes: Optional[int] = ClassesOpt,
    mask_mode: str = MaskModeOpt,
    option: Optional[List[str]] = OptionOpt,
    device: Optional[str] = DeviceOpt,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Val and test mIoU of one prompt set."""
    with user_errors():
        from .task import evaluate_prompts

        if (prompts is None) == (shots is None):
            raise ConfigError("give exactly one of --prompts ID,ID,... or --shots K")
        task, be = _task_and_backend(data, category, backend, checkpoint, option, split_seed, pool, val, test,
                                     num_classes, mask_mode, device)
        chosen = task.split.find_pool([p.strip() for p in prompts.split(",") if p.strip()]) if prompts else \
            task.draw_prompts(shots, seed)
        if not chosen:
            raise ConfigError("--prompts names no sample id")
        val_o, test_o = task.oracles(be)
        ev = evaluate_prompts(val_o, test_o, chosen)
        if as_json:
            doc = {"category": task.category, "backend": be.config(), "num_classes": task.num_classes,
                   "split_seed": split_seed, "split": task.split.ids(), **ev.to_dict(),
                   "oracle": {"val": val_o.stats, "test": test_o.stats if test_o else None}}
            from .artifacts import _clean_floats

            out_console.print_json(json.dumps(_clean_floats(doc)))
            return
        t = Table(title=f"{task.category}: prompts {', '.join(ev.prompts)}")
        t.add_column("split")
        t.add_column("images", justify="right")
        t.add_column("mIoU", justify="right")
        t.add_row("val", str(len(task.split.val)), f"{ev.val_miou:.4f}")
        if ev.test is not None:
            t.add_row("test", str(len(task.split.test)), f"{ev.test_miou:.4f}")
        out_console.print(t)


def _select_categories(data: Path, category: Optional[str], mask_mode: str, num_classes: Optional[int]) -> list[str]:
    from .data import load_dataset

    ds = load_dataset(data, category=category, mask_mode=mask_mode, num_classes=num_classes)
    return ds.categories


@app.command()
def select(
    data: Path = DataOpt,
    out: Path = typer.Option(..., "--out", help="Run folder (created; rerun the same command to resume)."),
    category: Optional[str] = CategoryOpt,
    backend: str = BackendOpt,
    checkpoint: Optional[str] = CheckpointOpt,
    strategy: str = typer.Option("forward", "--strategy",
                                 help="forward | random | best-single | random-search | worst-case | retrieval"),
    max_prompts: Optional[int] = typer.Option(None, "--max-prompts", help="At most K prompts (k of the baselines)."),
    memory_budget: Optional[str] = typer.Option(None, "--memory-budget", help="e.g. 8GiB, 512MB or bytes."),
    min_gain: float = typer.Option(0.0, "--min-gain", help="Smallest val-mIoU gain that counts as progress."),
    patience: int = typer.Option(1, "--patience", help="Steps without gain before forward selection stops."),
    shortlist: Optional[int] = typer.Option(None, "--shortlist", help="Model-combining backends: exact-score only the top M."),
    seeds: int = typer.Option(10, "--random-seeds", help="Seeds of the random-k baseline."),
    no_baselines: bool = typer.Option(False, "--no-baselines", help="Skip the baselines."),
    split_seed: int = SeedOpt,
    pool: str = PoolOpt,
    val: str = ValOpt,
    test: Optional[str] = TestOpt,
    num_classes: Optional[int] = ClassesOpt,
    mask_mode: str = MaskModeOpt,
    option: Optional[List[str]] = OptionOpt,
    device: Optional[str] = DeviceOpt,
    index: Optional[Path] = typer.Option(None, "--index", help="retrieval: index folder (promptopt index build)."),
    k: Optional[int] = typer.Option(None, "--k", help="retrieval: prompts per query (default --max-prompts or 4)."),
    diversity: float = typer.Option(0.0, "--diversity", help="retrieval: MMR diversity in [0, 1] (0 = plain top-k)."),
) -> None:
    """Choose the prompt set that maximises val mIoU; compare with baselines; write RUN_DIR."""
    with user_errors():
        from .runs import DEFAULT_BASELINES, run_selection, write_summary
        from .strategies import SELECTION_STRATEGIES

        if strategy not in SELECTION_STRATEGIES:
            raise ConfigError(f"unknown strategy {strategy!r}; choose one of {', '.join(SELECTION_STRATEGIES)}")
        cats = _select_categories(data, category, mask_mode, num_classes)
        command = "promptopt " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        results = {}
        for cat in cats:
            task, be = _task_and_backend(data, cat, backend, checkpoint, option, split_seed, pool, val, test,
                                         num_classes, mask_mode, device)
            run_dir = out if len(cats) == 1 else out / cat
            with progress_bars() as prog:
                res = run_selection(task, be, run_dir, strategy=strategy, max_prompts=max_prompts,
                                    memory_budget=memory_budget, min_gain=min_gain, patience=patience,
                                    shortlist=shortlist, baselines=() if no_baselines else DEFAULT_BASELINES,
                                    random_seeds=seeds, progress=prog, command=command, log=console.print,
                                    index=index, k=k or max_prompts, diversity=diversity)
            results[cat] = res
            out_console.print(f"{cat}: selected {', '.join(res['selected'])}  val mIoU {res['val_miou']:.4f}  "
                              f"test mIoU {res['test_miou'] if res['test_miou'] is None else round(res['test_miou'], 4)}"
                              f"  ({res['oracle']['forwards']} forwards, {res['wall_s']:.1f} s)")
        if len(cats) > 1:
            path = write_summary(out, results)
            out_console.print(f"summary: {path}")
        else:
            out_console.print(f"report: {out / 'report.md'}")


@app.command()
def predict(
    prompt: Path = typer.Option(..., "--prompt", help="prompt.json of a run (or the run folder)."),
    images: Path = typer.Option(..., "--images", help="Folder of images (or one image)."),
    out: Path = typer.Option(..., "--out", help="Folder for the PNG masks."),
    device: Optional[str] = DeviceOpt,
) -> None:
    """Write PNG masks for new images with a saved prompt."""
    with user_errors():
        from .predict import predict_folder

        overrides = {"device": device} if device else {}
        with progress_bars() as prog:
            cb = (lambda done, total: prog("images", done, total)) if prog else None
            written = predict_folder(prompt, images, out, progress=cb, **overrides)
        out_console.print(f"wrote {len(written)} mask(s) to {out}")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Where the demo run goes."),
    max_prompts: int = typer.Option(4, "--max-prompts"),
    category: Optional[List[str]] = typer.Option(None, "--category", help="Only these objects (default: all four)."),
) -> None:
    """The main job on the bundled DAVIS sample: forward selection vs baselines, with a report."""
    with user_errors():
        from .backends import create_backend
        from .data import bundled_sample_root, load_dataset
        from .runs import run_selection, write_summary
        from .task import Task

        root = bundled_sample_root()
        ds = load_dataset(root, category=category or None)
        results = {}
        for cat in ds.categories:
            task = Task.from_dataset(ds, cat, seed=0)
            with progress_bars() as prog:
                res = run_selection(task, create_backend("features"), out / cat, strategy="forward",
                                    max_prompts=max_prompts, progress=prog,
                                    command=f"promptopt demo --out {out} --max-prompts {max_prompts}")
            results[cat] = res
            rnd = res["baselines"]["random"]
            out_console.print(
                f"{cat:15s} forward selection {len(res['selected'])} prompts: test mIoU {res['test_miou']:.3f}  "
                f"(random {rnd['k']}-shot {rnd['test_miou_mean']:.3f} ± {rnd['test_miou_std']:.3f}, "
                f"best single {res['baselines']['best-single']['test_miou']:.3f})")
        summary = write_summary(out, results)
        out_console.print(f"\nsummary: {summary}\nreports: {out}/<object>/report.md (and report.html)")


@app.command()
def search(
    data: Path = DataOpt,
    out: Path = typer.Option(..., "--out", help="Run folder; the study is a journal file in it unless --storage."),
    category: Optional[str] = CategoryOpt,
    backend: str = BackendOpt,
    checkpoint: Optional[str] = CheckpointOpt,
    strategies: str = typer.Option("forward,random-search", "--strategies",
                                   help="Comma-separated strategies to search over (forward, random-search, retrieval, tuned)."),
    n_trials: int = typer.Option(20, "--n-trials", help="Finished trials the study should hold (rerun with more to extend)."),
    max_k: int = typer.Option(8, "--max-k", help="Largest number of prompts a trial may use."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage URL (sqlite:///, postgresql://) or journal file."),
    study_name: Optional[str] = typer.Option(None, "--study-name", help="Study name (default promptopt-<category>)."),
    seed: Optional[int] = typer.Option(0, "--seed", help="Sampler seed (give each parallel worker its own)."),
    fixed_backend: bool = typer.Option(False, "--fixed-backend", help="Do not search the backend's options."),
    memory_budget: Optional[str] = typer.Option(None, "--memory-budget", help="e.g. 8GiB; trials that do not fit are pruned."),
    split_seed: int = SeedOpt,
    pool: str = PoolOpt,
    val: str = ValOpt,
    test: Optional[str] = TestOpt,
    num_classes: Optional[int] = ClassesOpt,
    mask_mode: str = MaskModeOpt,
    option: Optional[List[str]] = OptionOpt,
    device: Optional[str] = DeviceOpt,
) -> None:
    """Optuna search over strategies and their knobs; best prompt, val/test mIoU and plots in RUN_DIR."""
    with user_errors():
        from .search import run_search
        from .task import Task

        cats = _select_categories(data, category, mask_mode, num_classes)
        command = "promptopt " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        opts = _options(option)
        if device:
            opts["device"] = device
        for cat in cats:
            task = Task.from_folder(data, cat, mask_mode=mask_mode, num_classes=num_classes, pool=_size(pool),
                                    val=_size(val), test=_size(test), seed=split_seed)
            run_dir = out if len(cats) == 1 else out / cat
            with progress_bars() as prog:
                res = run_search(task, run_dir, command=command, backend=backend, checkpoint=checkpoint,
                                 backend_options=opts, strategies=[s.strip() for s in strategies.split(",") if s.strip()],
                                 n_trials=n_trials, max_k=max_k, storage=storage,
                                 study_name=study_name if len(cats) == 1 or not study_name else f"{study_name}-{cat}",
                                 seed=seed, tune_backend=not fixed_backend, memory_budget=memory_budget, progress=prog)
            tm = res["test_miou"]
            out_console.print(f"{cat}: best trial {res['best_trial']} ({res['best_params'].get('strategy')}) val mIoU "
                              f"{res['val_miou']:.4f}  test mIoU {'–' if tm is None else f'{tm:.4f}'}  "
                              f"({res['trials']['total']} trials)  report: {run_dir / 'report.md'}")


@app.command()
def tune(
    data: Path = DataOpt,
    out: Path = typer.Option(..., "--out", help="Run folder (created; rerun the same command to resume)."),
    category: Optional[str] = CategoryOpt,
    backend: str = BackendOpt,
    checkpoint: Optional[str] = CheckpointOpt,
    init: Optional[str] = typer.Option(None, "--init", help="RUN_DIR/prompt.json whose examples start the tuning, or 'noise'."),
    shots: Optional[int] = typer.Option(None, "--shots", help="Start from K pool examples drawn with --seed."),
    steps: int = typer.Option(100, "--steps", help="Optimizer steps."),
    lr: float = typer.Option(0.05, "--lr", help="Peak learning rate (Adam, logit space)."),
    batch_size: int = typer.Option(4, "--batch-size", help="Training images per step."),
    warmup: int = typer.Option(10, "--warmup", help="Linear warm-up steps (then cosine decay)."),
    tune_what: str = typer.Option("both", "--tune", help="image | mask | both."),
    per_class: bool = typer.Option(False, "--per-class", help="Semantic tasks: one context per class."),
    eval_every: int = typer.Option(10, "--eval-every", help="Val mIoU every N steps."),
    patience: int = typer.Option(5, "--patience", help="Evaluations without gain before stopping (0: never)."),
    context_side: Optional[int] = typer.Option(None, "--context-side", help="Long side of the learned tensors."),
    memory_budget: Optional[str] = typer.Option(None, "--memory-budget", help="e.g. 8GiB, 512MB or bytes."),
    seed: int = typer.Option(0, "--seed", help="Seed of --shots, noise init and mini-batches."),
    split_seed: int = SeedOpt,
    pool: str = PoolOpt,
    val: str = ValOpt,
    test: Optional[str] = TestOpt,
    num_classes: Optional[int] = ClassesOpt,
    mask_mode: str = MaskModeOpt,
    option: Optional[List[str]] = OptionOpt,
    device: Optional[str] = DeviceOpt,
) -> None:
    """Learn the prompt tensor (image and/or mask) with the model frozen; write RUN_DIR."""
    with user_errors():
        from .tune_run import run_tuning

        if init is None and shots is None:
            raise ConfigError("give --init RUN_DIR/prompt.json (or --init noise) or --shots K")
        task, be = _task_and_backend(data, category, backend, checkpoint, option, split_seed, pool, val, test,
                                     num_classes, mask_mode, device)
        command = "promptopt " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        with progress_bars() as prog:
            res = run_tuning(task, be, out, init=init, shots=shots, seed=seed, steps=steps, lr=lr,
                             batch_size=batch_size, warmup=warmup, tune=tune_what, per_class=per_class,
                             eval_every=eval_every, patience=patience or None, context_side=context_side,
                             memory_budget=memory_budget, progress=prog, command=command, log=console.print)
        r4 = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
        out_console.print(f"{task.category}: val mIoU {r4(res['start']['val_miou'])} -> {r4(res['tuned']['val_miou'])}  "
                          f"test mIoU {r4(res['start']['test_miou'])} -> {r4(res['tuned']['test_miou'])}  "
                          f"({res['summary']['steps_run']} steps, {res['wall_s']:.1f} s)")
        out_console.print(f"report: {out / 'report.md'}")


# --- embedding indexes (retrieval) ------------------------------------------------------------------
index_app = typer.Typer(no_args_is_help=True, help="Build and query embedding indexes for retrieval-style prompts.")
app.add_typer(index_app, name="index")


@index_app.command("build")
def index_build(
    data: Path = DataOpt,
    out: Path = typer.Option(..., "--out", help="Index folder, e.g. indexes/NAME (index.faiss + manifest.json)."),
    category: Optional[str] = CategoryOpt,
    encoder: str = typer.Option("features", "--encoder",
                                help="features (weight-free) | clip[:MODEL] | hf:<name_or_dir> | backend[:NAME]"),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="clip: pretrained tag or file; backend: its checkpoint."),
    option: Optional[List[str]] = typer.Option(None, "--option", help="Encoder option key=value (repeatable)."),
    index_type: str = typer.Option("auto", "--index-type", help="auto | flat | hnsw | ivf"),
    masked: bool = typer.Option(False, "--masked", help="Mask-aware embeddings (features pooled on the object)."),
    batch_size: int = typer.Option(16, "--batch-size"),
    mask_mode: str = MaskModeOpt,
) -> None:
    """Embed every image of a dataset (or one category) and save a FAISS index with its manifest."""
    with user_errors():
        from .data import load_dataset
        from .embeddings import create_encoder
        from .index import build_index

        ds = load_dataset(data, category=category, mask_mode=mask_mode)
        samples = [s for cat in ds.categories for s in ds.samples(cat)]
        enc = create_encoder(encoder, checkpoint, _options(option))
        with progress_bars() as prog:
            cb = (lambda done, total: prog("images", done, total)) if prog else None
            idx = build_index(samples, enc, kind=index_type, masked=masked, batch_size=batch_size, progress=cb)
        idx.save(out, dataset_root=data)
        out_console.print(f"indexed {len(idx)} image(s) with {enc.name} (dim {idx.dim}, {idx.kind}) into {out}")


@index_app.command("query")
def index_query(
    index: Path = typer.Option(..., "--index", help="Index folder."),
    image: Path = typer.Option(..., "--image", help="Query image file."),
    k: int = typer.Option(5, "--k", help="Neighbours to list."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """List the k indexed images most similar to IMAGE (cosine similarity)."""
    with user_errors():
        from .index import EmbeddingIndex
        from .predict import image_samples

        idx = EmbeddingIndex.load(index)
        enc = idx.make_encoder()
        hits = idx.search(enc.encode(image_samples([image])), k)[0]
        if as_json:
            out_console.print_json(json.dumps([{"key": key, "similarity": sim} for key, sim in hits]))
            return
        t = Table(title=f"{image.name}: {len(hits)} nearest in {index}")
        t.add_column("rank", justify="right")
        t.add_column("sample")
        t.add_column("similarity", justify="right")
        for i, (key, sim) in enumerate(hits, 1):
            t.add_row(str(i), key, f"{sim:.4f}")
        out_console.print(t)


def main() -> None:  # pragma: no cover - console-script entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
