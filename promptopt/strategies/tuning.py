"""In-context tuning: learn the prompt tensor itself while the segmenter stays frozen.

Why it exists: selecting which examples to show (forward selection) can only
pick among images that exist. SegGPT's authors propose a further step — keep
every model weight fixed and optimise the prompt image and/or prompt mask by
gradient descent on labelled training images. :class:`ContextTuner` does this
for any backend that is differentiable in its :class:`~promptopt.backends.base.Context`
prompts, through two protocol methods only: ``backend.to_context`` (the starting
tensors) and ``backend.tuning_loss`` (the backend's own loss: CE + Dice on
predicted probabilities by default, smooth-L1 on masked patches for SegGPT).

Parametrisation keeps every context valid at every step: the image is
``sigmoid(image_logits)`` (always in [0, 1]); the mask is a softmax over class
logits (always a probability vector; pixels ignored in the initial mask stay
all-zero columns). Semantic tasks (more than two classes) get either one shared
"palette" context per initial example (``per_class=False``: the mask holds every
class) or one context per foreground class (``per_class=True``: the mask is a
two-way softmax, background vs that class, placed in the class's channel).

Optimisation: Adam, linear warm-up then cosine decay to zero; every
``eval_every`` steps the current contexts are scored on the validation images
with the one metric implementation (Context prompts carry ``key=None``, so no
cache ever holds a stale answer); the best-scoring tensors are kept (the
initial contexts included, so tuning never returns something worse on val than
where it started) and tuning stops after ``patience`` evaluations without gain.
Model parameters are frozen for the duration of ``fit`` (``requires_grad``
switched off, modules in eval mode) and restored afterwards; after every
backward pass the tuner checks that no model parameter received a gradient.

Interrupted tuning resumes: after each evaluation the context tensors, the
optimizer and scheduler state, the history and the best tensors are written
atomically to ``checkpoint_dir/tuning_state.pt``; a new ``fit`` with the same
configuration, data and backend continues from there (mini-batches are a
function of (seed, step), so the resumed run equals an uninterrupted one).
"""

from __future__ import annotations

import io
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..artifacts import atomic_write_bytes, fingerprint, load_prompt
from ..backends.base import Backend, Context, one_hot_mask
from ..data import IGNORE_INDEX, Sample
from ..errors import BudgetError, CheckpointError, ConfigError, DataError
from ..memory import format_bytes, parse_bytes
from ..metrics import IoUAccumulator, SegmentationScore, confusion_matrix
from ..oracle import ValidationOracle, prediction_to_labels
from .base import ProgressFn, comparable

TUNE_TARGETS = ("image", "mask", "both")
STATE_FILE = "tuning_state.pt"
CONTEXT_FILE = "context.safetensors"
_MASK_EPS = 0.01  # initial one-hot masks become (1 - eps) one-hot + eps uniform, so softmax logits are finite
_IMAGE_EPS = 0.5 / 255.0  # initial images are clamped this far inside (0, 1) before the logit


# --- model freezing ----------------------------------------------------------------------------------
def model_modules(backend: Backend) -> list[torch.nn.Module]:
    """The torch modules a backend holds as attributes (its model weights); [] for weight-free backends."""
    mods = []
    for value in vars(backend).values():
        if isinstance(value, torch.nn.Module) and all(value is not m for m in mods):
            mods.append(value)
    return mods


def model_parameters(backend: Backend) -> list[torch.Tensor]:
    """Every parameter and buffer of the backend's modules (what must stay bit-identical)."""
    out: list[torch.Tensor] = []
    for m in model_modules(backend):
        out.extend(m.parameters())
        out.extend(m.buffers())
    return out


@contextmanager
def frozen(backend: Backend) -> Iterator[list[torch.nn.Parameter]]:
    """Switch off ``requires_grad`` and training mode of every backend module; restore both afterwards."""
    mods = model_modules(backend)
    params = [p for m in mods for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    modes = [m.training for m in mods]
    try:
        for p in params:
            p.requires_grad_(False)
        for m in mods:
            m.eval()
        yield params
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        for m, t in zip(mods, modes):
            m.train(t)


# --- scoring and files ---------------------------------------------------------------------------------
def score_contexts(backend: Backend, contexts: Sequence[Context], samples: Sequence[Sample],
                   num_classes: int, chunk: int = 8) -> SegmentationScore:
    """Dataset-level mIoU of a set of context prompts on labelled samples (no cache: contexts change).

    Queries go to the backend ``chunk`` at a time, so a backend can prepare the contexts once per chunk."""
    acc = IoUAccumulator(num_classes, IGNORE_INDEX)
    samples = list(samples)
    with torch.no_grad():
        for start in range(0, len(samples), chunk):
            part = samples[start:start + chunk]
            for q, probs in zip(part, backend.predict(list(contexts), part, num_classes)):
                acc.add_confusion(confusion_matrix(prediction_to_labels(probs), q.mask, num_classes, IGNORE_INDEX),
                                  q.id)
    return acc.result()


def save_contexts(path: str | Path, contexts: Sequence[Context], metadata: dict[str, str] | None = None) -> Path:
    """Write contexts as safetensors (``context.{i}.image`` (3,H,W), ``context.{i}.mask`` (C,H,W)), atomically."""
    from safetensors.torch import save

    tensors = {}
    for i, c in enumerate(contexts):
        tensors[f"context.{i}.image"] = c.image.detach().float().cpu().contiguous()
        tensors[f"context.{i}.mask"] = c.mask.detach().float().cpu().contiguous()
    meta = {"num_contexts": str(len(contexts)), **(metadata or {})}
    return atomic_write_bytes(path, save(tensors, metadata=meta))


def load_contexts(path: str | Path, device: torch.device | str = "cpu") -> list[Context]:
    """Contexts written by :func:`save_contexts` (``key=None``, as during tuning)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    try:
        tensors = load(path.read_bytes())
    except FileNotFoundError:
        raise DataError(f"{path}: learned context file not found") from None
    except (SafetensorError, ValueError) as exc:
        raise DataError(f"{path}: not a readable safetensors file ({exc})") from None
    n = len([k for k in tensors if k.endswith(".image")])
    out = []
    for i in range(n):
        try:
            image, mask = tensors[f"context.{i}.image"], tensors[f"context.{i}.mask"]
        except KeyError as exc:
            raise DataError(f"{path}: context {i} lacks tensor {exc}") from None
        if image.ndim != 3 or image.shape[0] != 3 or mask.ndim != 3 or mask.shape[1:] != image.shape[1:]:
            raise DataError(f"{path}: context {i} has image {tuple(image.shape)} and mask {tuple(mask.shape)}; "
                            "expected (3, H, W) and (C, H, W)")
        out.append(Context(image=image.to(device), mask=mask.to(device), key=None))
    if not out:
        raise DataError(f"{path}: holds no context tensors")
    return out


# --- the learnable parametrisation ---------------------------------------------------------------------
class _ContextParams:
    """One learnable context: image logits (3,H,W), mask logits (K,H,W) placed into class channels."""

    def __init__(self, image: torch.Tensor, mask_probs: torch.Tensor, valid: torch.Tensor, channels: list[int],
                 num_classes: int) -> None:
        self.image_logits = torch.logit(image.float().clamp(_IMAGE_EPS, 1 - _IMAGE_EPS)).contiguous()
        k = len(channels)
        soft = (1 - _MASK_EPS) * mask_probs.float() + _MASK_EPS / k
        self.mask_logits = torch.log(soft).contiguous()
        self.valid = valid.float().unsqueeze(0)
        embed = torch.zeros(num_classes, k, device=image.device)
        embed[channels, torch.arange(k)] = 1.0
        self.embed = embed
        self.channels = list(channels)

    def context(self) -> Context:
        probs = torch.softmax(self.mask_logits, 0) * self.valid
        mask = torch.einsum("ck,khw->chw", self.embed, probs)
        return Context(image=torch.sigmoid(self.image_logits), mask=mask, key=None)


def _resize_to(x: torch.Tensor, side: int | None, mode: str) -> torch.Tensor:
    if side is None or max(x.shape[-2:]) <= side:
        return x
    h, w = x.shape[-2:]
    s = side / max(h, w)
    size = (max(1, round(h * s)), max(1, round(w * s)))
    kw = {"align_corners": False, "antialias": True} if mode == "bilinear" else {}
    return F.interpolate(x.unsqueeze(0), size=size, mode=mode, **kw)[0]


class ContextTuner:
    """Learn context tensors (prompt image and/or mask) with a frozen backend.

    Parameters
    ----------
    backend:
        Any backend differentiable in its Context prompts.
    init:
        Starting point: labelled samples (one context each, or per class), a
        ``prompt.json`` path whose examples are used, or ``"noise"``.
    steps, lr, batch_size, warmup:
        Adam steps, peak learning rate (in logit space), training images per
        step, linear warm-up steps (then cosine decay to zero).
    tune:
        "image", "mask" or "both" — which tensors learn.
    per_class:
        Semantic tasks: one context per foreground class instead of shared palette contexts.
    eval_every, patience:
        Validation mIoU every ``eval_every`` steps; stop after ``patience``
        evaluations without improvement (None: never stop early).
    num_contexts, noise_size:
        For ``init="noise"``: how many contexts and their (H, W) (default: the first training image's size).
    context_side:
        Downscale the learnable tensors so their long side is at most this (fewer parameters; None keeps the size).
    memory_budget:
        "8GiB" etc.; a budget below the estimated tuning peak raises :class:`BudgetError`.
    checkpoint_dir:
        Where ``tuning_state.pt`` is written and resumed from (None: no checkpoints).

    Attributes after ``fit``: ``contexts_`` (best contexts), ``score_`` (their
    val mIoU), ``initial_score_`` (val mIoU of the starting contexts),
    ``history_`` (one dict per evaluation: step, mean training loss since the
    previous evaluation, val mIoU, learning rate), ``losses_`` (training loss
    per step), ``best_step_``, ``steps_run_``, ``stop_reason_``,
    ``resumed_step_``, ``initial_contexts_``, ``memory_bytes_``, ``seconds_per_step_`` (mean time of
    a tuning step — loss, backward, update — without the validation evaluations).

    Model weights are found as the ``torch.nn.Module`` attributes of the backend
    (:func:`model_modules`); a backend can give its own tuning memory estimate as
    ``tuning_memory_bytes(num_contexts, image_size, batch_size)``.
    """

    name = "tuning"

    def __init__(
        self,
        backend: Backend,
        init: Sequence[Sample] | str | Path = "noise",
        steps: int = 100,
        lr: float = 0.05,
        batch_size: int = 4,
        warmup: int = 10,
        tune: str = "both",
        per_class: bool = False,
        eval_every: int = 10,
        patience: int | None = 5,
        seed: int = 0,
        num_classes: int | None = None,
        num_contexts: int = 1,
        noise_size: tuple[int, int] | None = None,
        context_side: int | None = None,
        memory_budget: str | int | None = None,
        checkpoint_dir: str | Path | None = None,
        progress: ProgressFn | None = None,
    ) -> None:
        if steps < 1:
            raise ConfigError(f"tuning: steps must be at least 1, got {steps}")
        if not lr > 0:
            raise ConfigError(f"tuning: lr must be positive, got {lr}")
        if batch_size < 1:
            raise ConfigError(f"tuning: batch_size must be at least 1, got {batch_size}")
        if warmup < 0:
            raise ConfigError(f"tuning: warmup must be >= 0, got {warmup}")
        if tune not in TUNE_TARGETS:
            raise ConfigError(f"tuning: tune must be one of {', '.join(TUNE_TARGETS)}, got {tune!r}")
        if eval_every < 1:
            raise ConfigError(f"tuning: eval_every must be at least 1, got {eval_every}")
        if patience is not None and patience < 1:
            raise ConfigError(f"tuning: patience must be at least 1 (or None), got {patience}")
        if num_contexts < 1:
            raise ConfigError(f"tuning: num_contexts must be at least 1, got {num_contexts}")
        if isinstance(init, str) and init != "noise" and not init.endswith(".json") and not Path(init).is_dir():
            raise ConfigError(f"tuning: init must be samples, a prompt.json path or 'noise', got {init!r}")
        self.backend = backend
        self.init = init
        self.steps, self.lr, self.batch_size, self.warmup = int(steps), float(lr), int(batch_size), int(warmup)
        self.tune, self.per_class = tune, bool(per_class)
        self.eval_every, self.patience, self.seed = int(eval_every), patience, int(seed)
        self.num_classes = num_classes
        self.num_contexts = int(num_contexts)
        self.noise_size = tuple(noise_size) if noise_size is not None else None
        self.context_side = context_side
        self.memory_budget = memory_budget
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.progress = progress

    # --- setup -------------------------------------------------------------------------------------
    def _init_samples(self) -> list[Sample] | None:
        if isinstance(self.init, (str, Path)):
            if str(self.init) == "noise":
                return None
            return load_prompt(self.init).samples()
        samples = list(self.init)
        if not samples:
            raise ConfigError("tuning: init holds no examples (give samples, a prompt.json or 'noise')")
        return samples

    def init_description(self) -> dict[str, Any]:
        """JSON-able description of the starting point (part of the resume fingerprint)."""
        samples = self._init_samples()
        if samples is None:
            return {"init": "noise", "num_contexts": self.num_contexts, "noise_size": self.noise_size}
        return {"init": "examples", "examples": [s.key for s in samples]}

    def _device(self) -> torch.device:
        return torch.device(getattr(self.backend, "device", "cpu"))

    def _build_params(self, init_samples: list[Sample] | None, train: list[Sample], c: int) -> list[_ContextParams]:
        dev = self._device()
        gen = torch.Generator().manual_seed(self.seed)
        if init_samples is None:
            h, w = self.noise_size or train[0].size
            out = []
            groups = [[k] for k in range(1, c)] if self.per_class and c > 2 else [None] * self.num_contexts
            for group in groups:
                channels = [0, group[0]] if group else list(range(c))
                image = torch.sigmoid(torch.randn(3, h, w, generator=gen)).to(dev)
                probs = torch.softmax(torch.randn(len(channels), h, w, generator=gen), 0).to(dev)
                image, probs = _resize_to(image, self.context_side, "bilinear"), _resize_to(probs, self.context_side, "area")
                out.append(_ContextParams(image, probs, torch.ones(probs.shape[1:], device=dev), channels, c))
            return out
        ctxs = [self.backend.to_context(s, c) for s in init_samples]
        if not (self.per_class and c > 2):
            out = []
            for ctx in ctxs:
                image = _resize_to(ctx.image.detach().to(dev), self.context_side, "bilinear")
                mask = _resize_to(ctx.mask.detach().to(dev).float(), self.context_side, "area")
                valid = mask.sum(0) > 0.5
                out.append(_ContextParams(image, mask, valid, list(range(c)), c))
            return out
        out = []
        for k in range(1, c):
            counts = [float(ctx.mask[k].sum()) for ctx in ctxs]
            best = int(np.argmax(counts))
            if counts[best] <= 0:
                raise ConfigError(f"tuning: per-class init needs an example showing class {k}; none of "
                                  f"{[s.id for s in init_samples]} does (use init='noise' or add one)")
            ctx = ctxs[best]
            image = _resize_to(ctx.image.detach().to(dev), self.context_side, "bilinear")
            full = _resize_to(ctx.mask.detach().to(dev).float(), self.context_side, "area")
            fg = full[k]
            bg = full.sum(0) - fg
            out.append(_ContextParams(image, torch.stack([bg, fg]), full.sum(0) > 0.5, [0, k], c))
        return out

    def _learnable(self, params: list[_ContextParams]) -> list[torch.Tensor]:
        out = []
        for p in params:
            if self.tune in ("image", "both"):
                out.append(p.image_logits)
            if self.tune in ("mask", "both"):
                out.append(p.mask_logits)
        return out

    def _lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` at optimizer step ``step`` (0-based): linear warm-up, then cosine to zero."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.steps - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - self.warmup) / span)))

    def _batch(self, train: list[Sample], step: int) -> list[Sample]:
        rng = np.random.default_rng([self.seed, step])
        idx = rng.choice(len(train), size=min(self.batch_size, len(train)), replace=False)
        return [train[i] for i in sorted(idx)]

    def tuning_memory_bytes(self, num_contexts: int, image_size: tuple[int, int], context_numel: int) -> int:
        """Estimated peak of one tuning step: the backend's own figure when it has one
        (``backend.tuning_memory_bytes(num_contexts, image_size, batch_size)``), else a forward per
        training image kept for backward plus the context's parameter, gradient and two Adam moments."""
        own = getattr(self.backend, "tuning_memory_bytes", None)
        if callable(own):
            return int(own(num_contexts, image_size, self.batch_size))
        return int(self.batch_size * self.backend.memory_bytes(num_contexts, image_size) + 4 * 4 * context_numel)

    def _fingerprint(self, train: list[Sample], val: list[Sample], c: int) -> str:
        return fingerprint({
            "tuner": self.name, "train": [s.key for s in train], "val": [s.key for s in val], "num_classes": c,
            "backend": self.backend.config(), "init": self.init_description(), "steps": self.steps, "lr": self.lr,
            "batch_size": self.batch_size, "warmup": self.warmup, "tune": self.tune, "per_class": self.per_class,
            "eval_every": self.eval_every, "patience": self.patience, "seed": self.seed,
            "context_side": self.context_side,
        })

    def _tick(self, done: int) -> None:
        if self.progress:
            self.progress("tuning step", done, self.steps)

    # --- checkpoints ---------------------------------------------------------------------------------
    def _state_path(self) -> Path | None:
        return self.checkpoint_dir / STATE_FILE if self.checkpoint_dir is not None else None

    def _load_state(self, fp: str) -> dict[str, Any] | None:
        path = self._state_path()
        if path is None or not path.is_file():
            return None
        try:
            state = torch.load(path, map_location=self._device(), weights_only=True)
        except Exception as exc:  # a torn or foreign file: say so rather than resume from garbage
            raise CheckpointError(f"{path}: cannot read the tuning checkpoint ({exc}); delete it to start over") from None
        if not isinstance(state, dict) or state.get("fingerprint") != fp:
            self.discarded_checkpoint_ = True
            return None
        return state

    def _save_state(self, state: dict[str, Any]) -> None:
        path = self._state_path()
        if path is None:
            return
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(path, buf.getvalue())

    # --- fitting ----------------------------------------------------------------------------------------
    def fit(self, train: Sequence[Sample], val: ValidationOracle | Sequence[Sample]) -> "ContextTuner":
        """Learn contexts on ``train`` (the loss) with early stopping on ``val`` (an oracle or labelled samples)."""
        train = list(train)
        if not train:
            raise ConfigError("tuning: no training images (the loss needs labelled samples)")
        if isinstance(val, ValidationOracle):
            if val.backend is not self.backend:
                raise ConfigError("tuning: the validation oracle uses a different backend object than the tuner")
            val_samples, c = list(val.samples), val.num_classes
        else:
            val_samples = list(val)
            if not val_samples:
                raise ConfigError("tuning: no validation images (early stopping and the kept tensor need them)")
            c = self.num_classes or max(2, 1 + max(int(m[m != IGNORE_INDEX].max(initial=0))
                                                   for m in (s.mask for s in [*train, *val_samples])))
        if self.num_classes is not None and self.num_classes != c:
            raise ConfigError(f"tuning: num_classes={self.num_classes} but the validation oracle has {c}")
        val_keys = {s.key for s in val_samples}
        leaked = [s.id for s in train if s.key in val_keys]
        if leaked:
            raise ConfigError(f"tuning: training images {leaked[:5]} are also validation images")
        for s in train:
            if not s.has_mask:
                raise DataError(f"tuning: training image {s.key} has no mask")
        self.num_classes_ = c
        self.backend.prepare(train + val_samples)

        init_samples = self._init_samples()
        params = self._build_params(init_samples, train, c)
        learnable = self._learnable(params)
        numel = sum(p.image_logits.numel() + p.mask_logits.numel() for p in params)
        image_size = max((s.size for s in train + val_samples), key=lambda hw: hw[0] * hw[1])
        self.memory_bytes_ = self.tuning_memory_bytes(len(params), image_size, numel)
        self.budget_bytes_ = parse_bytes(self.memory_budget)
        if self.budget_bytes_ is not None and self.memory_bytes_ > self.budget_bytes_:
            raise BudgetError(
                f"memory budget {format_bytes(self.budget_bytes_)} is too small for context tuning: backend "
                f"{self.backend.name!r} needs about {format_bytes(self.memory_bytes_)} for {len(params)} context(s) "
                f"and {self.batch_size} training image(s) per step at {image_size[1]}x{image_size[0]} "
                f"(lower --batch-size or raise the budget)"
            )
        with torch.no_grad():
            self.initial_contexts_ = [p.context() for p in params]
        for t in learnable:
            t.requires_grad_(True)
        opt = torch.optim.Adam(learnable, lr=self.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self._lr_factor)

        fp = self._fingerprint(train, val_samples, c)
        self.discarded_checkpoint_ = False
        state = self._load_state(fp)
        with frozen(self.backend) as model_params:
            grads_before = [p.grad for p in model_params]  # whatever the caller left there must stay untouched
            if state is not None:
                with torch.no_grad():
                    for t, saved in zip(learnable, state["params"]):
                        t.copy_(saved)
                opt.load_state_dict(state["optimizer"])
                sched.load_state_dict(state["scheduler"])
                step, history, losses = int(state["step"]), list(state["history"]), list(state["losses"])
                best_score, best_step, stale = float(state["best_score"]), int(state["best_step"]), int(state["stale"])
                best = [Context(i.clone(), m.clone()) for i, m in zip(state["best_images"], state["best_masks"])]
                stop = state["stop_reason"] or None
                initial = float(state["initial_score"])
                elapsed = float(state.get("elapsed_s", 0.0))
                train_s = float(state.get("train_s", 0.0))
            else:
                step, losses, stale, stop, elapsed, train_s = 0, [], 0, None, 0.0, 0.0
                initial = score_contexts(self.backend, self.initial_contexts_, val_samples, c).miou
                history = [{"step": 0, "loss": None, "val_miou": initial, "lr": 0.0}]
                best_score, best_step = initial, 0
                best = [Context(x.image.clone(), x.mask.clone()) for x in self.initial_contexts_]
            self.resumed_step_ = step
            self._tick(step)
            since_eval: list[float] = []
            t_start = time.perf_counter()
            while stop is None and step < self.steps:
                t_step = time.perf_counter()
                batch = self._batch(train, step)
                opt.zero_grad(set_to_none=True)
                contexts = [p.context() for p in params]
                loss = self.backend.tuning_loss(contexts, batch, c)
                if not loss.requires_grad:
                    raise ConfigError(f"backend {self.backend.name!r}: its tuning loss does not depend on the "
                                      "context tensors (not differentiable in the prompt)")
                loss.backward()
                leaked_grads = [p for p, g in zip(model_params, grads_before) if p.grad is not g]
                if leaked_grads:
                    raise RuntimeError(f"context tuning: {len(leaked_grads)} model parameter(s) received gradients")
                opt.step()
                sched.step()
                step += 1
                losses.append(float(loss.detach()))
                train_s += time.perf_counter() - t_step
                since_eval.append(losses[-1])
                if step % self.eval_every == 0 or step == self.steps:
                    with torch.no_grad():
                        current = [p.context() for p in params]
                    score = score_contexts(self.backend, current, val_samples, c).miou
                    history.append({"step": step, "loss": float(np.mean(since_eval)) if since_eval else None,
                                    "val_miou": score, "lr": float(opt.param_groups[0]["lr"])})
                    since_eval = []
                    if comparable(score) > comparable(best_score):
                        best_score, best_step, stale = score, step, 0
                        best = [Context(x.image.detach().clone(), x.mask.detach().clone()) for x in current]
                    else:
                        stale += 1
                    if self.patience is not None and stale >= self.patience:
                        stop = "no_gain"
                    elif step >= self.steps:
                        stop = "steps"
                    self._save_state({
                        "fingerprint": fp, "step": step, "params": [t.detach().clone() for t in learnable],
                        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "history": history,
                        "losses": losses, "best_score": best_score, "best_step": best_step, "stale": stale,
                        "best_images": [b.image for b in best], "best_masks": [b.mask for b in best],
                        "stop_reason": stop or "", "initial_score": initial,
                        "elapsed_s": elapsed + time.perf_counter() - t_start, "train_s": train_s,
                    })
                self._tick(step)
            run_s = time.perf_counter() - t_start
        for t in learnable:
            t.requires_grad_(False)
        self.params_ = params
        self.contexts_ = best
        self.score_ = float(best_score)
        self.initial_score_ = float(initial)
        self.history_ = history
        self.losses_ = losses
        self.best_step_ = best_step
        self.steps_run_ = step
        self.stop_reason_ = stop or "steps"
        self.seconds_per_step_ = train_s / step if step else None
        self.elapsed_s_ = elapsed + run_s
        return self

    def save_prompt(self, run_dir: str | Path, backend_config: dict[str, Any], category: str,
                    extra: dict[str, Any] | None = None) -> Path:
        """``prompt.json`` of kind ``tuned``: the learned contexts as safetensors beside copies of the start examples."""
        from ..artifacts import save_prompt

        save_contexts(Path(run_dir) / CONTEXT_FILE, self.contexts_, {"category": category})
        return save_prompt(run_dir, backend_config, self._init_samples() or [], self.num_classes_, category,
                           kind="tuned", context_file=CONTEXT_FILE,
                           extra={"strategy": "tuned", "val_miou": self.score_, "tuning": self.summary(),
                                  **(extra or {})})

    def summary(self) -> dict[str, Any]:
        """JSON-able description of the fitted result."""
        return {"strategy": self.name, "val_miou": self.score_, "initial_val_miou": self.initial_score_,
                "best_step": self.best_step_, "steps_run": self.steps_run_, "stop_reason": self.stop_reason_,
                "num_contexts": len(self.contexts_), "tune": self.tune, "per_class": self.per_class,
                "context_shapes": [list(c.image.shape[1:]) for c in self.contexts_], **self.init_description()}


def context_to_sample(context: Context, id: str) -> Sample:
    """A context as a viewable sample: uint8 image and argmax mask (all-zero columns → ignore)."""
    image = (context.image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    mask = context.mask.detach().float().cpu()
    labels = prediction_to_labels(mask).numpy()
    labels[mask.sum(0).numpy() < 0.5] = IGNORE_INDEX
    return Sample(id, "context", image=image, mask=labels)


def _search_tuned(trial, ctx):
    """Optuna search strategy "tuned": best single pool example, then context tuning with searched knobs."""
    from ..search import TrialOutcome
    from .baselines import BestSingle

    steps = trial.suggest_categorical("tuned.steps", [10, 30])
    lr = trial.suggest_float("tuned.lr", 0.01, 0.2, log=True)
    tune = trial.suggest_categorical("tuned.tune", list(TUNE_TARGETS))
    init = BestSingle(ctx.oracle).fit(ctx.task.pool).selected_
    train = [s for s in ctx.task.pool if s.id != init[0].id] or list(ctx.task.pool)
    tuner = ContextTuner(ctx.backend, init=init, steps=steps, lr=lr, tune=tune, warmup=max(1, steps // 10),
                         eval_every=max(1, steps // 3), patience=None,
                         memory_budget=ctx.extras.get("memory_budget"), progress=ctx.progress).fit(train, ctx.oracle)
    path = tuner.save_prompt(ctx.trial_dir, ctx.backend.config(), ctx.task.category)
    return TrialOutcome(tuner.score_, path, [s.id for s in init],
                        {"initial_val_miou": tuner.initial_score_, "best_step": tuner.best_step_})


def register_search() -> None:
    """Make "tuned" available to :mod:`promptopt.search` (called by its loader of optional strategies)."""
    from ..search import register_search_strategy

    register_search_strategy("tuned", _search_tuned)


__all__ = ["ContextTuner", "score_contexts", "save_contexts", "load_contexts", "frozen", "model_modules",
           "model_parameters", "context_to_sample", "one_hot_mask", "TUNE_TARGETS"]
