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
``eval_every`` steps the oracle scores the current contexts
(:meth:`~promptopt.oracle.ValidationOracle.score_contexts`, never cached) on
every image they were not made from (a cross-validated oracle leaves the
starting examples and the training images out). An evaluation replaces the
kept tensors only if the acceptance rule (:mod:`promptopt.strategies.acceptance`;
by default one standard error of the per-image paired differences) says its
gain over them is real — the initial contexts are the first kept ones, so
tuning never ends below its start because of validation noise — and tuning
stops after ``patience`` evaluations that are not kept. The backend's modules
are frozen during ``fit`` and restored afterwards; after every backward pass the
tuner checks that no model parameter received a gradient.

Interrupted tuning resumes: after each evaluation the tensors, the optimizer and
scheduler state and the history go to the run's checkpoint; mini-batches are a
function of (seed, step), so the resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..artifacts import atomic_write_bytes, fingerprint
from ..backends.base import Backend, Context
from ..data import IGNORE_INDEX, Sample
from ..errors import BudgetError, ConfigError, DataError
from ..memory import format_bytes
from ..oracle import OracleResult, ValidationOracle, prediction_to_labels
from ..space import Choice, Float
from .acceptance import StoredResult, confusions_to_json, make_rule
from .base import PromptStrategy
from .baselines import BestSingle

TUNE_TARGETS = ("image", "mask", "both")
CONTEXT_FILE = "context.safetensors"
_MASK_EPS = 0.01  # initial one-hot masks become (1 - eps) one-hot + eps uniform, so softmax logits are finite
_IMAGE_EPS = 0.5 / 255.0  # initial images are clamped this far inside (0, 1) before the logit


# --- model freezing ----------------------------------------------------------------------------------
def model_parameters(backend: Backend) -> list[torch.Tensor]:
    """Every parameter and buffer of the backend's declared modules (what must stay bit-identical)."""
    return [t for m in backend.modules() for t in (*m.parameters(), *m.buffers())]


@contextmanager
def frozen(backend: Backend) -> Iterator[list[torch.nn.Parameter]]:
    """Switch off ``requires_grad`` and training mode of every backend module; restore both afterwards."""
    mods = backend.modules()
    params = [p for m in mods for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    modes = [m.training for m in mods]
    try:
        for m in mods:
            m.requires_grad_(False).eval()
        yield params
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        for m, t in zip(mods, modes):
            m.train(t)


# --- files ---------------------------------------------------------------------------------------------
def save_contexts(path: str | Path, contexts: Sequence[Context]) -> Path:
    """Write contexts as safetensors (``context.{i}.image`` (3,H,W), ``context.{i}.mask`` (C,H,W)), atomically."""
    from safetensors.torch import save

    tensors = {f"context.{i}.{part}": getattr(c, part).detach().float().cpu().contiguous()
               for i, c in enumerate(contexts) for part in ("image", "mask")}
    return atomic_write_bytes(path, save(tensors, metadata={"num_contexts": str(len(contexts))}))


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
    n = sum(k.endswith(".image") for k in tensors)
    if not n:
        raise DataError(f"{path}: holds no context tensors")
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
        self.embed = torch.zeros(num_classes, k, device=image.device)
        self.embed[channels, torch.arange(k)] = 1.0

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


class ContextTuner(PromptStrategy):
    """Learn context tensors (prompt image and/or mask) with a frozen backend.

    Parameters
    ----------
    oracle:
        The validation oracle: scores the contexts (early stopping, the kept tensors); its
        backend must be differentiable in its Context prompts.
    init:
        Starting point: ``"best-single"`` (the pool example with the best val mIoU),
        labelled samples (one context each, or per class), or ``"noise"``.
    steps, lr, batch_size, warmup:
        Adam steps, peak learning rate (in logit space), training images per
        step, linear warm-up steps (then cosine decay to zero; default steps/10, at most 10).
    tune:
        "image", "mask" or "both" — which tensors learn.
    per_class:
        Semantic tasks: one context per foreground class instead of shared palette contexts.
    eval_every, patience:
        Val mIoU every ``eval_every`` steps (default steps/3, at most 10); stop after
        ``patience`` evaluations without improvement (None: never stop early).
    rule, noise_z:
        When an evaluation counts as an improvement: "none" (any gain), "se" or "bootstrap"
        (the gain must beat the per-image paired noise; see :mod:`promptopt.strategies.acceptance`).
    num_contexts, noise_size:
        For ``init="noise"``: how many contexts and their (H, W) (default: the first training image's size).
    context_side:
        Downscale the learnable tensors so their long side is at most this (fewer parameters; None keeps the size).

    ``fit(pool)`` trains on the pool without the starting examples (all of it when nothing else is left).
    Attributes after ``fit``: ``contexts_`` (best contexts), ``score_`` (their val mIoU),
    ``initial_score_`` (val mIoU of the starting contexts), ``selected_`` (the starting examples),
    ``train_`` (training images), ``history_`` (one dict per evaluation: step, mean training loss
    since the previous evaluation, val mIoU, learning rate), ``losses_`` (training loss per step),
    ``best_step_``, ``steps_run_``, ``stop_reason_``, ``initial_contexts_``,
    ``memory_bytes_``, ``seconds_per_step_`` (mean time of a tuning step without the evaluations).
    """

    name = "tuned"
    artifact_kind = "tuned"
    baselines = ()
    search_space = (Choice("steps", (10, 30)), Float("lr", 0.01, 0.2, log=True), Choice("tune", TUNE_TARGETS))

    # rule "se": benchmarks/bench_selection.py tuning never ended below its start with it (21 of 21)
    def __init__(self, oracle: ValidationOracle, *, init: Sequence[Sample] | str = "best-single", steps: int = 100,
                 lr: float = 0.05, batch_size: int = 4, warmup: int | None = None, tune: str = "both",
                 per_class: bool = False, eval_every: int | None = None, patience: int | None = 5, rule: str = "se",
                 noise_z: float = 1.0, seed: int = 0, num_contexts: int = 1, noise_size: tuple[int, int] | None = None,
                 context_side: int | None = None, **common: Any) -> None:
        super().__init__(oracle, **common)
        warmup = min(10, max(1, steps // 10)) if warmup is None else warmup
        eval_every = max(1, min(10, steps // 3)) if eval_every is None else eval_every
        for ok, msg in ((steps >= 1, f"steps must be at least 1, got {steps}"), (lr > 0, f"lr must be positive, got {lr}"),
                        (batch_size >= 1, f"batch_size must be at least 1, got {batch_size}"),
                        (warmup >= 0, f"warmup must be >= 0, got {warmup}"),
                        (tune in TUNE_TARGETS, f"tune must be one of {', '.join(TUNE_TARGETS)}, got {tune!r}"),
                        (eval_every >= 1, f"eval_every must be at least 1, got {eval_every}"),
                        (patience is None or patience >= 1, f"patience must be at least 1 (or None), got {patience}"),
                        (num_contexts >= 1, f"num_contexts must be at least 1, got {num_contexts}"),
                        (not isinstance(init, str) or init in ("best-single", "noise"),
                         f"init must be 'best-single', 'noise' or examples, got {init!r}")):
            if not ok:
                raise ConfigError(f"tuning: {msg}")
        if not isinstance(init, str) and not list(init):
            raise ConfigError("tuning: init holds no examples (give samples, 'best-single' or 'noise')")
        if not oracle.backend.differentiable:
            from ..backends import available_backends, backend_class

            able = [n for n in available_backends() if getattr(backend_class(n), "differentiable", False)]
            raise ConfigError(f"tuning: backend {oracle.backend.name!r} is not differentiable in its prompt; "
                              f"context tuning applies to {', '.join(able)}")
        self.init = init if isinstance(init, str) else list(init)
        self.steps, self.lr, self.batch_size, self.warmup = int(steps), float(lr), int(batch_size), int(warmup)
        self.tune, self.per_class = tune, bool(per_class)
        self.eval_every, self.patience, self.seed = int(eval_every), patience, int(seed)
        self.rule = make_rule(rule, noise_z)
        self.num_contexts = int(num_contexts)
        self.noise_size = tuple(noise_size) if noise_size is not None else None
        self.context_side = context_side

    @property
    def backend(self) -> Backend:
        return self.oracle.backend

    # --- setup -------------------------------------------------------------------------------------
    def init_description(self) -> dict[str, Any]:
        """JSON-able description of the starting point (part of the resume fingerprint)."""
        if self.init == "noise":
            return {"init": "noise", "num_contexts": self.num_contexts, "noise_size": self.noise_size}
        if self.init == "best-single":
            return {"init": "best-single"}
        return {"init": "examples", "examples": [s.key for s in self.init]}

    def _resized(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A starting image and mask on the backend's device, their long side at most ``context_side``."""
        dev = self.backend.device
        return (_resize_to(image.detach().to(dev), self.context_side, "bilinear"),
                _resize_to(mask.detach().to(dev).float(), self.context_side, "area"))

    def _build_params(self, init_samples: list[Sample] | None, train: list[Sample], c: int) -> list[_ContextParams]:
        per_class = self.per_class and c > 2
        if init_samples is None:
            gen = torch.Generator().manual_seed(self.seed)
            h, w = self.noise_size or train[0].size
            out = []
            for channels in [[0, k] for k in range(1, c)] if per_class else [list(range(c))] * self.num_contexts:
                image, probs = self._resized(torch.sigmoid(torch.randn(3, h, w, generator=gen)),
                                             torch.softmax(torch.randn(len(channels), h, w, generator=gen), 0))
                out.append(_ContextParams(image, probs, torch.ones(probs.shape[1:], device=probs.device), channels, c))
            return out
        ctxs = [self.backend.to_context(s, c) for s in init_samples]
        if not per_class:
            return [_ContextParams(image, mask, mask.sum(0) > 0.5, list(range(c)), c)
                    for image, mask in (self._resized(x.image, x.mask) for x in ctxs)]
        out = []
        for k in range(1, c):
            counts = [float(ctx.mask[k].sum()) for ctx in ctxs]
            best = int(np.argmax(counts))
            if counts[best] <= 0:
                raise ConfigError(f"tuning: per-class init needs an example showing class {k}; none of "
                                  f"{[s.id for s in init_samples]} does (use init='noise' or add one)")
            image, full = self._resized(ctxs[best].image, ctxs[best].mask)
            bg_fg = torch.stack([full.sum(0) - full[k], full[k]])
            out.append(_ContextParams(image, bg_fg, full.sum(0) > 0.5, [0, k], c))
        return out

    def _learnable(self, params: list[_ContextParams]) -> list[torch.Tensor]:
        return [t for p in params for t, part in ((p.image_logits, "image"), (p.mask_logits, "mask"))
                if self.tune in (part, "both")]

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

    def _check_budget(self, c: int, image_size: tuple[int, int]) -> None:
        """Refuse a budget below one tuning step with the needed figure: the backend's estimate for ``batch_size``
        images plus the contexts' (at most image-sized) parameter, gradient and two Adam moments (float32)."""
        if self.per_class and c > 2:
            n = c - 1
        elif isinstance(self.init, str):
            n = self.num_contexts if self.init == "noise" else 1
        else:
            n = len(self.init)
        side = self.context_side or max(image_size)
        numel = n * (3 + c) * min(image_size[0], side) * min(image_size[1], side)
        self.memory_bytes_ = int(self.backend.tuning_memory_bytes(n, image_size, self.batch_size, c) + 4 * 4 * numel)
        if self.budget_bytes_ is not None and self.memory_bytes_ > self.budget_bytes_:
            raise BudgetError(
                f"memory budget {format_bytes(self.budget_bytes_)} is too small for context tuning: backend "
                f"{self.backend.name!r} needs about {format_bytes(self.memory_bytes_)} ({self.backend.memory_kind}) "
                f"for {n} context(s) and {self.batch_size} training image(s) per step at "
                f"{image_size[1]}x{image_size[0]} (lower --batch-size or raise the budget)")

    def _fingerprint(self, train: list[Sample], init: list[Sample] | None, c: int) -> str:
        return fingerprint({
            "tuner": self.name, "train": [s.key for s in train], "val": [s.key for s in self.oracle.samples],
            "num_classes": c, "backend": self.backend.config(), "init": [s.key for s in init] if init else None,
            "init_kind": self.init_description(), "steps": self.steps, "lr": self.lr, "batch_size": self.batch_size,
            "warmup": self.warmup, "tune": self.tune, "per_class": self.per_class, "eval_every": self.eval_every,
            "patience": self.patience, "seed": self.seed, "context_side": self.context_side,
            "oracle": self.oracle.mode, "rule": self.rule.describe(),
        })

    # --- fitting ----------------------------------------------------------------------------------------
    def _start(self, pool: list[Sample]) -> tuple[list[Sample] | None, int]:
        """The starting examples (None for noise) and the oracle evaluations spent choosing them."""
        if self.init == "noise":
            return None, 0
        if self.init == "best-single":
            first = BestSingle(self.oracle).fit(pool)
            return list(first.selected_), first.n_evaluations_
        # a cross-validated oracle never scores the images the contexts are made from (see score_contexts)
        val_keys = set() if self.oracle.cross_validate else {s.key for s in self.oracle.samples}
        leaked = [s.id for s in self.init if s.key in val_keys]
        if leaked:
            raise ConfigError(f"tuning: init examples {leaked[:5]} are validation images")
        return list(self.init), 0

    def fit(self, pool: Sequence[Sample]) -> "ContextTuner":
        """Learn contexts on the pool without the starting examples; keep the best on the oracle's images."""
        pool = self._check_pool(pool)
        c = self.oracle.num_classes
        # before any model work, the starting point's choice included
        self._check_budget(c, max((s.size for s in pool + self.oracle.samples), key=lambda hw: hw[0] * hw[1]))
        init, spent = self._start(pool)
        init_keys = {s.key for s in init or []}
        train = [s for s in pool if s.key not in init_keys] or list(pool)
        self._made_from = sorted(init_keys | {s.key for s in train})
        for s in train:
            if not s.has_mask:
                raise DataError(f"tuning: training image {s.key} has no mask")
        self.backend.prepare(train)
        params = self._build_params(init, train, c)
        learnable = self._learnable(params)
        with torch.no_grad():
            self.initial_contexts_ = [p.context() for p in params]
        for t in learnable:
            t.requires_grad_(True)
        opt = torch.optim.Adam(learnable, lr=self.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self._lr_factor)
        fp = self._fingerprint(train, init, c)
        saved = self.checkpoint.load(fp) if self.checkpoint else None
        with frozen(self.backend) as model_params:
            grads_before = [p.grad for p in model_params]  # whatever the caller left there must stay untouched
            if saved is not None:
                st, blob = saved
                with torch.no_grad():
                    for t, value in zip(learnable, blob["params"]):
                        t.copy_(value)
                opt.load_state_dict(blob["optimizer"])
                sched.load_state_dict(blob["scheduler"])
                best = [Context(i.clone(), m.clone()) for i, m in zip(blob["best_images"], blob["best_masks"])]
            else:
                first = self.oracle.score_contexts(self.initial_contexts_, exclude=self._made_from)
                initial = first.miou
                st = {"step": 0, "history": [{"step": 0, "loss": None, "val_miou": initial, "lr": 0.0}], "losses": [],
                      "best_score": initial, "best_step": 0, "stale": 0, "stop_reason": None, "initial_score": initial,
                      "train_s": 0.0, "best_confusions": confusions_to_json(first)}
                best = [Context(x.image.clone(), x.mask.clone()) for x in self.initial_contexts_]
            self._tick("tuning step", st["step"], self.steps)
            while st["stop_reason"] is None and st["step"] < self.steps:
                t_step = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss = self.backend.tuning_loss([p.context() for p in params], self._batch(train, st["step"]), c)
                if not loss.requires_grad:
                    raise ConfigError(f"backend {self.backend.name!r}: its tuning loss does not depend on the "
                                      "context tensors (not differentiable in the prompt)")
                loss.backward()
                if any(p.grad is not g for p, g in zip(model_params, grads_before)):
                    raise RuntimeError("context tuning: a model parameter received a gradient")
                opt.step()
                sched.step()
                st["step"] += 1
                st["losses"].append(float(loss.detach()))
                st["train_s"] += time.perf_counter() - t_step
                if st["step"] % self.eval_every == 0 or st["step"] == self.steps:
                    best = self._evaluate_step(st, params, best, opt)
                    if self.checkpoint:
                        self.checkpoint.save(fp, st, {
                            "params": [t.detach().clone() for t in learnable], "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "best_images": [b.image for b in best],
                            "best_masks": [b.mask for b in best]})
                    self._report_step(st["step"], st["history"][-1]["val_miou"])
                self._tick("tuning step", st["step"], self.steps)
        for t in learnable:
            t.requires_grad_(False)
        self.params_ = params
        self.selected_ = list(init or [])
        self.train_ = train
        self.contexts_ = best
        self.score_ = float(st["best_score"]) if st["best_score"] is not None else float("nan")
        self.initial_score_ = float(st["initial_score"]) if st["initial_score"] is not None else float("nan")
        self.history_ = st["history"]
        self.losses_ = st["losses"]
        self.best_step_ = st["best_step"]
        self.steps_run_ = st["step"]
        self.stop_reason_ = st["stop_reason"] or "steps"
        self.seconds_per_step_ = st["train_s"] / st["step"] if st["step"] else None
        self.n_evaluations_ = spent + len(self.history_)
        return self

    def _evaluate_step(self, st: dict[str, Any], params: list[_ContextParams], best: list[Context],
                       opt: torch.optim.Optimizer) -> list[Context]:
        """Score the current contexts on the oracle, keep them if best, decide whether to stop."""
        with torch.no_grad():
            current = [p.context() for p in params]
        result = self.oracle.score_contexts(current, exclude=self._made_from)
        score = result.miou
        verdict = self.rule.judge(result, StoredResult.from_confusions(st["best_confusions"], st["best_score"]))
        since_eval = st["losses"][st["history"][-1]["step"]:]  # the losses of the steps since the last evaluation
        st["history"].append({"step": st["step"], "loss": float(np.mean(since_eval)) if since_eval else None,
                              "val_miou": score, "lr": float(opt.param_groups[0]["lr"]), **verdict.to_dict()})
        if verdict.accepted:
            st.update(best_score=score, best_step=st["step"], stale=0, best_confusions=confusions_to_json(result))
            best = [Context(x.image.detach().clone(), x.mask.detach().clone()) for x in current]
        else:
            st["stale"] += 1
        if self.patience is not None and st["stale"] >= self.patience:
            st["stop_reason"] = "no_gain"
        elif st["step"] >= self.steps:
            st["stop_reason"] = "steps"
        return best

    # --- what the fitted tuner offers -------------------------------------------------------------
    def evaluate(self, oracle: ValidationOracle) -> OracleResult:
        """The tuned contexts on an oracle's images, those they were made from left out."""
        return oracle.score_contexts(self.contexts_, exclude=self._made_from)

    def extra_scores(self, oracle: ValidationOracle) -> dict[str, float]:
        """The untuned start as tensors and, when tuning started from examples, those examples as plain prompts."""
        out = {"start": oracle.score_contexts(self.initial_contexts_, exclude=self._made_from).miou}
        if self.selected_:
            out["init_examples"] = oracle.score(self.selected_).miou
        return out

    def prompts_for(self, queries: Sequence[Sample]) -> list[list[Any]]:
        return [list(self.contexts_) for _ in queries]

    def artifact_extra(self, folder: str | Path) -> dict[str, Any]:
        save_contexts(Path(folder) / CONTEXT_FILE, self.contexts_)
        return {"context_file": CONTEXT_FILE, "tuning": self.summary()}

    def figures(self, folder: Path) -> list[tuple[str, str]]:
        from ..plots import plot_contexts, plot_curves

        figs = []
        if self.losses_:
            figs.append(("Training loss per step", plot_curves({"loss": self.losses_}, folder / "loss.png", "step",
                                                                "loss", "Context tuning: training loss").name))
        figs.append((f"Val mIoU per evaluation (every {self.eval_every} steps; point 1 is the start)",
                     plot_curves({"val mIoU": [h["val_miou"] for h in self.history_]}, folder / "val_miou.png",
                                 "evaluation", "val mIoU", "Context tuning: validation mIoU").name))
        figs.append(("The learned prompt: start vs tuned context",
                     plot_contexts([context_to_sample(x, f"start {i}") for i, x in enumerate(self.initial_contexts_)],
                                   [context_to_sample(x, f"tuned {i}") for i, x in enumerate(self.contexts_)],
                                   folder / "contexts.png").name))
        return figs

    def summary(self) -> dict[str, Any]:
        """JSON-able description of the fitted result."""
        return {**super().summary(), "initial_val_miou": self.initial_score_, "best_step": self.best_step_,
                "steps_run": self.steps_run_, "stop_reason": self.stop_reason_, "num_contexts": len(self.contexts_),
                "tune": self.tune, "per_class": self.per_class, "train": [s.id for s in self.train_],
                "context_shapes": [list(c.image.shape[1:]) for c in self.contexts_], **self.init_description(),
                "oracle": self.oracle.mode, **self.rule.describe()}


def context_to_sample(context: Context, id: str) -> Sample:
    """A context as a viewable sample: uint8 image and argmax mask (all-zero columns → ignore)."""
    image = (context.image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    mask = context.mask.detach().float().cpu()
    labels = prediction_to_labels(mask).numpy()
    labels[mask.sum(0).numpy() < 0.5] = IGNORE_INDEX
    return Sample(id, "context", image=image, mask=labels)


__all__ = ["ContextTuner", "save_contexts", "load_contexts", "frozen", "model_parameters", "context_to_sample",
           "TUNE_TARGETS", "CONTEXT_FILE"]
