"""The ``promptopt`` command: parses options, calls the Python API, prints results.

No logic lives here that the API lacks: every command is a few lines over
:mod:`promptopt.run`, :mod:`promptopt.search`, :mod:`promptopt.predict` and
:mod:`promptopt.index`. Option blocks shared by several commands (the task,
the backend, the run folder) are declared once as dataclasses and added to each
command's signature by :func:`takes`. Every user error surfaces as one line
``error: ...`` naming the file or option at fault (exit code 2), never as a
traceback.
"""

import dataclasses
import functools
import inspect
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence

import typer
from rich.console import Console
from rich.table import Table

from .errors import ConfigError, PromptOptError
from .progress import progress_reporter
from .strategies.registry import available_strategies


class _FlagHelp:
    """``--help`` shows no ``<bool>`` value: a flag takes none (typer labels it like an option that does)."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
        return option


class _Command(_FlagHelp, typer.core.TyperCommand):
    """A command that turns promptopt's own errors and environment problems into one line and exit code 2."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except PromptOptError as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        except OSError as exc:  # a folder that is not writable, a path that is a file, a full disk, ...
            message = f"{exc.filename or 'output'}: {exc.strerror or exc}"
        except KeyboardInterrupt:
            console.print("interrupted: finished steps are saved; run the same command again to resume")
            raise typer.Exit(130)
        console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True, soft_wrap=True)
        raise typer.Exit(2)


class _Group(_FlagHelp, typer.core.TyperGroup):
    pass


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=_Group,
                  help="Optimise the prompt, not the weights, of in-context image segmenters.")
console = Console(stderr=True)
out_console = Console()


def _command_line() -> str:
    return "promptopt " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _size(text: Optional[str]) -> float | int | None:
    if text is None:
        return None
    try:
        return int(text) if text.strip().isdigit() else float(text)
    except ValueError:
        raise ConfigError(f"split size {text!r} must be a count (10) or a fraction (0.25)") from None


def _options(pairs: Optional[List[str]], flag: str = "--option") -> dict[str, Any]:
    """key=value pairs (value parsed as JSON when it can be: numbers, lists, true/false)."""
    out: dict[str, Any] = {}
    for p in pairs or []:
        if "=" not in p:
            raise ConfigError(f"{flag} {p!r}: write key=value")
        k, v = p.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def _flag(*decls: str, help: str) -> Any:
    """A boolean flag (``--x``, or ``--x/--no-x``); its help shows no ``<bool>`` value: a flag takes none."""
    return typer.Option(False, *decls, help=help, metavar="")


def _opt(default: Any, *decls: str, help: str) -> Any:
    option = _flag(*decls, help=help) if default is False else typer.Option(default, *decls, help=help)
    return dataclasses.field(default=option)


def _defaults(block: type, **values: Any) -> Any:
    """An option block holding its options' defaults but ``values`` (for a command that fixes the options)."""
    return block(**{**{f.name: f.default.default for f in dataclasses.fields(block)}, **values})


QUIET = _flag("--quiet", help="No progress bars or progress lines.")
AS_JSON = _flag("--json/--table", help="Machine-readable output (default: a table).")


# --- option blocks, declared once ---------------------------------------------------------------------
@dataclasses.dataclass
class TaskArgs:
    """Which labelled images, split how."""

    data: Path = _opt(..., "--data", help="Dataset: <root>/<category>/{images,masks}/, <root>/{images,masks}/, or a "
                                          "COCO instances .json (or a folder holding one).")
    category: Optional[str] = _opt(None, "--category", help="Category (sub-folder) to use; default: every category.")
    split_seed: int = _opt(0, "--split-seed", help="Seed of the pool/val/test split.")
    pool: str = _opt("0.5", "--pool", help="Prompt pool size: count or fraction.")
    val: str = _opt("0.25", "--val", help="Validation size: count or fraction.")
    test: Optional[str] = _opt(None, "--test", help="Test size: count or fraction (default: the rest).")
    num_classes: Optional[int] = _opt(None, "--num-classes", help="Classes incl. background; larger mask ids are an error.")
    mask_mode: str = _opt("auto", "--mask-mode", help="auto, binary or classes (see the README's mask table).")
    images: Optional[Path] = _opt(None, "--images", help="COCO: the folder its file_name entries are relative to.")
    keep_empty: bool = _opt(False, "--keep-empty", help="COCO: keep images without the object (as negatives).")

    def dataset(self):
        from .data import load_dataset

        return load_dataset(self.data, category=self.category, mask_mode=self.mask_mode, num_classes=self.num_classes,
                            images=self.images, keep_empty=True if self.keep_empty else None)

    def task(self, dataset, category: str):
        from .task import Task

        return Task.from_dataset(dataset, category, pool=_size(self.pool), val=_size(self.val), test=_size(self.test),
                                 seed=self.split_seed)


@dataclasses.dataclass
class BackendArgs:
    """Which segmenter."""

    backend: str = _opt("features", "--backend", help="Segmenter: features (weight-free), seggpt, persam, clipseg, "
                                                      "grounded-sam.")
    checkpoint: Optional[str] = _opt(None, "--checkpoint", help="Model id or local folder for seggpt/persam.")
    option: Optional[List[str]] = _opt(None, "--option", help="Backend option key=value (repeatable).")
    device: Optional[str] = _opt(None, "--device", help="torch device for the backend, e.g. cuda or cuda:1.")

    def spec(self):
        from .backends import BackendSpec

        opts = _options(self.option)
        if self.device:
            opts["device"] = check_device(self.device)
        return BackendSpec(self.backend, self.checkpoint, opts)


@dataclasses.dataclass
class RunArgs:
    """Where a run goes and how it resumes."""

    out: Path = _opt(..., "--out", help="Run folder (created; rerun the same command to resume).")
    restart: bool = _opt(False, "--restart", help="Replace a different or damaged run in --out instead of refusing.")
    memory_budget: Optional[str] = _opt(None, "--memory-budget", help="Peak device memory allowed, e.g. 8GiB, 512MB.")
    quiet: bool = dataclasses.field(default=QUIET)


@dataclasses.dataclass
class SelectionArgs:
    """What scores a selection and when a gain counts (select, tune)."""

    oracle: Optional[str] = _opt(None, "--oracle", help="What selection is scored on: holdout (the val split) or cv "
                                                        "(pool and val, each prompt set without its own prompts); "
                                                        "default cv (promptopt.run.DEFAULT_ORACLE).")
    rule: Optional[str] = _opt(None, "--rule", help="When a step's gain counts: none (any paired gain; select's "
                                                    "default), se (above --noise-z standard errors of the "
                                                    "per-image differences; tune's default) or bootstrap.")
    noise_z: Optional[float] = _opt(None, "--noise-z", help="Strictness of --rule se/bootstrap (default 1).")

    def rule_options(self) -> dict[str, Any]:
        return {"rule": self.rule, "noise_z": self.noise_z}


def takes(**blocks: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add the fields of option-block dataclasses to a command's signature; pass each block as one object."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn)
        params = [p for p in sig.parameters.values() if p.name not in blocks]
        params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
                   for cls in blocks.values() for f in dataclasses.fields(cls)]

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            for name, cls in blocks.items():
                kwargs[name] = cls(**{f.name: kwargs.pop(f.name) for f in dataclasses.fields(cls)})
            return fn(**kwargs)

        wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        del wrapper.__wrapped__  # typer must read the new signature, not the wrapped function's
        return wrapper

    return deco


def check_device(device: str) -> str:
    """A torch device string that exists here, or a ConfigError naming --device."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {device!r}: not a torch device (use cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {device}: MPS is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {device!r}: promptopt runs on cpu, cuda or mps")
    return device


def _show(data: Any, as_json: bool, title: str, columns: Sequence[str], left: str, rows: list[list[str]]) -> None:
    """``data`` as JSON, or ``rows`` as a table (column ``left`` aligned left, the others right)."""
    if as_json:
        out_console.print_json(json.dumps(data))
        return
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col == left else "right")
    for row in rows:
        table.add_row(*row)
    out_console.print(table)


# --- commands --------------------------------------------------------------------------------------------
@app.command(cls=_Command)
@takes(t=TaskArgs, b=BackendArgs)
def evaluate(
    t: TaskArgs,
    b: BackendArgs,
    prompts: Optional[str] = typer.Option(None, "--prompts", help="Comma-separated pool sample ids (file stems)."),
    shots: Optional[int] = typer.Option(None, "--shots", help="Draw K pool examples with --seed."),
    seed: int = typer.Option(0, "--seed", help="Seed for --shots."),
    as_json: bool = AS_JSON,
) -> None:
    """Val and test mIoU of one prompt set."""
    from .artifacts import jsonable
    from .task import evaluate_task

    ds = t.dataset()
    ev = evaluate_task(t.task(ds, ds.resolve_category(t.category)), b.spec().build(),
                       prompts=[p.strip() for p in prompts.split(",") if p.strip()] if prompts is not None else None,
                       shots=shots, seed=seed)
    _show(jsonable(ev), as_json, f"{ev['category']}: prompts {', '.join(ev['prompts'])}", ("split", "images", "mIoU"),
          "split", [[part, str(len(ev["split"][part])), f"{ev[part]['miou']:.4f}"]
                    for part in ("val", "test") if ev[part] is not None])


@app.command(cls=_Command)
@takes(t=TaskArgs, b=BackendArgs, r=RunArgs, s=SelectionArgs)
def select(
    t: TaskArgs,
    b: BackendArgs,
    r: RunArgs,
    s: SelectionArgs,
    strategy: str = typer.Option("forward", "--strategy", help=" | ".join(available_strategies())),
    max_prompts: Optional[int] = typer.Option(None, "--max-prompts", help="At most K prompts (the k of the baselines)."),
    k: Optional[int] = typer.Option(None, "--k", help="Exactly K prompts (random, random-search, retrieval)."),
    min_gain: Optional[float] = typer.Option(None, "--min-gain", help="forward: smallest val-mIoU gain that counts."),
    patience: Optional[int] = typer.Option(None, "--patience", help="forward: steps without gain before stopping."),
    shortlist: Optional[int] = typer.Option(None, "--shortlist", help="forward, model-combining backends: exact-score only the top M."),
    index: Optional[Path] = typer.Option(None, "--index", help="retrieval: index folder (promptopt index build)."),
    diversity: Optional[float] = typer.Option(None, "--diversity", help="retrieval: MMR diversity in [0, 1]."),
    text: Optional[List[str]] = typer.Option(None, "--text", help="text: a candidate phrase (repeatable); semantic "
                                                                  "tasks name the class, --text '1:car lamp'."),
    strategy_option: Optional[List[str]] = typer.Option(None, "--strategy-option", help="Other strategy option key=value."),
    seeds: int = typer.Option(10, "--random-seeds", help="Seeds of the random-k baseline."),
    no_baselines: bool = _flag("--no-baselines", help="Skip the baselines."),
) -> None:
    """Choose the prompt set that maximises val mIoU; compare with baselines; write RUN_DIR."""
    if text and strategy != "text":
        raise ConfigError(f"--text gives candidate phrases to --strategy text, not to --strategy {strategy}")
    options = {"max_prompts": max_prompts, "k": k, "min_gain": min_gain, "patience": patience,
               "shortlist": shortlist, "index": index, "diversity": diversity, "candidates": text or None,
               **s.rule_options(), **_options(strategy_option, "--strategy-option")}
    _run_strategy(t, b, r, s, strategy, lambda task: options, baselines=() if no_baselines else None,
                  random_seeds=seeds)


def _run_strategy(t: TaskArgs, b: BackendArgs, r: RunArgs, s: SelectionArgs, strategy: str,
                  options: Callable[[Any], dict[str, Any]], **kwargs: Any) -> None:
    """Run ``strategy`` with ``options(task)`` (None values left out) on each category (select, tune, demo)."""
    from .run import run_strategy

    _run_each(t, r, lambda task, folder, prog: run_strategy(
        task, b.spec(), folder, strategy, {k: v for k, v in options(task).items() if v is not None},
        oracle=s.oracle, memory_budget=r.memory_budget, restart=r.restart, progress=prog, command=_command_line(),
        **kwargs))


def _run_each(t: TaskArgs, r: RunArgs, run_one: Callable[..., dict[str, Any]]) -> None:
    """Run a command on each category of the data (one folder each), printing one line per category."""
    from .run import one_line, run_categories

    ds = t.dataset()
    cats = [ds.resolve_category(t.category)] if t.category else ds.categories
    with progress_reporter(quiet=r.quiet) as prog:
        results = run_categories(lambda cat, folder: run_one(t.task(ds, cat), folder, prog), cats, r.out,
                                 log=out_console.print)
    if len(results) == 1:
        out_console.print(one_line(next(iter(results.values()))))
        out_console.print(f"report: {r.out / 'report.md'} (and report.html)")
    else:
        out_console.print(f"summary: {r.out / 'summary.md'}; reports: {r.out}/<category>/report.md")


@app.command(cls=_Command)
@takes(t=TaskArgs, b=BackendArgs, r=RunArgs, s=SelectionArgs)
def tune(
    t: TaskArgs,
    b: BackendArgs,
    r: RunArgs,
    s: SelectionArgs,
    init: Optional[str] = typer.Option(None, "--init", help="RUN_DIR/prompt.json whose examples start the tuning, "
                                                            "'noise', or 'best-single' (default)."),
    shots: Optional[int] = typer.Option(None, "--shots", help="Start from K pool examples drawn with --seed."),
    steps: int = typer.Option(100, "--steps", help="Optimizer steps."),
    lr: float = typer.Option(0.05, "--lr", help="Peak learning rate (Adam, logit space)."),
    batch_size: int = typer.Option(4, "--batch-size", help="Training images per step."),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="Linear warm-up steps (default steps/10, at most 10)."),
    tune_what: str = typer.Option("both", "--tune", help="image | mask | both."),
    per_class: bool = _flag("--per-class", help="Semantic tasks: one context per class."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Val mIoU every N steps (default steps/3, at most 10)."),
    patience: int = typer.Option(5, "--patience", help="Evaluations without gain before stopping (0: never)."),
    context_side: Optional[int] = typer.Option(None, "--context-side", help="Long side of the learned tensors."),
    seed: int = typer.Option(0, "--seed", help="Seed of --shots, noise init and mini-batches."),
) -> None:
    """Learn the prompt tensor (image and/or mask) with the model frozen; write RUN_DIR."""
    from .run import tuning_init

    _run_strategy(t, b, r, s, "tuned", lambda task: {
        "init": tuning_init(task, init, shots, seed), "steps": steps, "lr": lr, "batch_size": batch_size,
        "warmup": warmup, "tune": tune_what, "per_class": per_class, "eval_every": eval_every,
        "patience": patience or None, "context_side": context_side, "seed": seed, **s.rule_options()})


@app.command(cls=_Command)
@takes(t=TaskArgs, b=BackendArgs, r=RunArgs)
def search(
    t: TaskArgs,
    b: BackendArgs,
    r: RunArgs,
    strategies: str = typer.Option("forward,random-search", "--strategies",
                                   help="Comma-separated strategies to search over "
                                        f"({', '.join(available_strategies(searchable=True))})."),
    n_trials: int = typer.Option(20, "--n-trials", help="Finished trials the study should hold, between all workers "
                                                        "(rerun with more to extend)."),
    max_k: int = typer.Option(8, "--max-k", help="Largest number of prompts a trial may use."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Where the study lives: a journal file (default "
                                          "RUN_DIR/study.log), sqlite:///FILE, or postgresql://USER:PASSWORD@HOST/DB "
                                          "for workers on several machines."),
    study_name: Optional[str] = typer.Option(None, "--study-name", help="Study name (default promptopt-<category>)."),
    sampler: str = typer.Option("tpe", "--sampler", help="Optuna sampler: tpe, random, gp or cmaes."),
    seed: Optional[int] = typer.Option(0, "--seed", help="Seed of the study's sampler; each trial derives its own "
                                                         "from it, so workers can share the same command."),
    heartbeat: int = typer.Option(60, "--heartbeat", help="Seconds between a running trial's heartbeats; a trial "
                                                          "silent for twice as long is taken as lost and run again."),
    fixed_backend: bool = _flag("--fixed-backend", help="Do not search the backend's options."),
    text: Optional[List[str]] = typer.Option(None, "--text", help="text strategy: a candidate phrase (repeatable); "
                                                                  "semantic tasks name the class, --text '1:car lamp'."),
) -> None:
    """Optuna search over strategies and their knobs; best prompt, val/test mIoU and plots in RUN_DIR.

    Start the same command on several machines (same --storage database and --study-name) to share the trials.
    """
    from .search import run_search
    from .search import redact

    names = [s.strip() for s in strategies.split(",") if s.strip()]
    _run_each(t, r, lambda task, folder, prog: run_search(
        task, folder, b.spec(), strategies=names, n_trials=n_trials, max_k=max_k, storage=storage,
        study_name=f"{study_name}-{task.category}" if study_name and not t.category else study_name, seed=seed,
        sampler=sampler, heartbeat_interval=heartbeat, tune_backend=not fixed_backend,
        memory_budget=r.memory_budget, restart=r.restart, progress=prog,
        log=functools.partial(console.print, highlight=False, markup=False, soft_wrap=True),  # failed or lost trials
        strategy_options={"text": {"candidates": text}} if text else None, command=redact(_command_line())))


@app.command(cls=_Command)
def predict(
    prompt: Path = typer.Option(..., "--prompt", help="prompt.json of a run (or the run folder)."),
    images: Path = typer.Option(..., "--images", help="Folder of images (or one image)."),
    out: Path = typer.Option(..., "--out", help="Folder for the PNG masks (and predictions.csv)."),
    masks: Optional[Path] = typer.Option(None, "--masks", help="Ground-truth masks (same stems): IoU per image in the CSV."),
    overlays: bool = _flag("--overlays", help="Also write the images with the prediction drawn over them."),
    device: Optional[str] = typer.Option(None, "--device", help="torch device for the backend, e.g. cuda."),
    quiet: bool = QUIET,
) -> None:
    """Write PNG masks (+ predictions.csv, overlays) for new images with a saved prompt."""
    from .predict import predict_folder

    overrides = {"device": check_device(device)} if device else {}
    with progress_reporter(quiet=quiet) as prog:
        written = predict_folder(prompt, images, out, masks=masks, overlays=overlays, progress=prog, **overrides)
    out_console.print(f"wrote {len(written)} mask(s) and predictions.csv to {out}")


@app.command(cls=_Command)
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Where the demo run goes."),
    max_prompts: int = typer.Option(4, "--max-prompts"),
    category: Optional[str] = typer.Option(None, "--category", help="Only this object (default: all four)."),
    quiet: bool = QUIET,
) -> None:
    """The main job on the bundled DAVIS sample: forward selection vs baselines, with a report."""
    from .data import bundled_sample_root

    _run_strategy(_defaults(TaskArgs, data=bundled_sample_root(), category=category), _defaults(BackendArgs),
                  _defaults(RunArgs, out=out, quiet=quiet), _defaults(SelectionArgs), "forward",
                  lambda task: {"max_prompts": max_prompts})


# --- embedding indexes (retrieval) ------------------------------------------------------------------
index_app = typer.Typer(no_args_is_help=True, cls=_Group, help="Build and query embedding indexes for retrieval-style prompts.")
app.add_typer(index_app, name="index")


@index_app.command("build", cls=_Command)
def index_build(
    data: Path = typer.Option(..., "--data", help="Dataset root (as for select)."),
    out: Path = typer.Option(..., "--out", help="Index folder, e.g. indexes/NAME (index.faiss + manifest.json)."),
    category: Optional[str] = typer.Option(None, "--category", help="Only this category."),
    encoder: str = typer.Option("features", "--encoder",
                                help="features (weight-free) | clip[:MODEL] | hf:<name_or_dir> | backend[:NAME]"),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="clip: pretrained tag or file; backend: its checkpoint."),
    option: Optional[List[str]] = typer.Option(None, "--option", help="Encoder option key=value (repeatable)."),
    index_type: str = typer.Option("auto", "--index-type", help="auto | flat | hnsw | ivf"),
    masked: bool = _flag("--masked", help="Mask-aware embeddings (features pooled on the object)."),
    batch_size: int = typer.Option(16, "--batch-size"),
    mask_mode: str = typer.Option("auto", "--mask-mode", help="auto, binary or classes."),
    quiet: bool = QUIET,
) -> None:
    """Embed every image of a dataset (or one category) and save a FAISS index with its manifest."""
    from .index import build_dataset_index

    with progress_reporter(quiet=quiet) as prog:
        idx = build_dataset_index(data, out, category=category, encoder=encoder, checkpoint=checkpoint,
                                  options=_options(option), kind=index_type, masked=masked,
                                  batch_size=batch_size, mask_mode=mask_mode, progress=prog)
    out_console.print(f"indexed {len(idx)} image(s) with {idx.encoder['name']} (dim {idx.dim}, {idx.kind}) into {out}")


@index_app.command("query", cls=_Command)
def index_query(
    index: Path = typer.Option(..., "--index", help="Index folder."),
    image: Path = typer.Option(..., "--image", help="Query image file."),
    k: int = typer.Option(5, "--k", help="Neighbours to list."),
    as_json: bool = AS_JSON,
) -> None:
    """List the k indexed images most similar to IMAGE (cosine similarity)."""
    from .index import query_index

    hits = query_index(index, image, k)
    _show([{"key": key, "similarity": sim} for key, sim in hits], as_json, f"{image.name}: {len(hits)} nearest in "
          f"{index}", ("rank", "sample", "similarity"), "sample",
          [[str(i), key, f"{sim:.4f}"] for i, (key, sim) in enumerate(hits, 1)])


if __name__ == "__main__":  # pragma: no cover
    app()
