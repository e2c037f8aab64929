"""SegGPT (``BAAI/seggpt-vit-large``) as an in-context segmenter, over transformers' ``SegGptForImageSegmentation``.

Why it exists: SegGPT is the model the prompt-selection literature optimises
for, and its several-prompt mode (the *feature ensemble*) is where a prompt set
is more than the sum of its pairs. This module wraps it with what the rest of
promptopt needs: preprocessing and decoding (:mod:`.seggpt_codec`), the network
forward with grouped prompt sets, the official merge rule, SDPA attention and
per-call checkpointing (:mod:`.seggpt_encoder`), caches, and a memory figure per
prompt count.

Two references (``reference``)
    ``"official"`` (the default) follows the authors' code, Painter's
    ``SegGPT/SegGPT_inference``: PIL resizing to uint8, the merge-layer rule of
    its feature ensemble, row 0 of the ensemble's output, and the binary mask
    rule ``channel mean > 128``. ``"transformers"`` follows transformers'
    ``SegGptImageProcessor`` → ``SegGptForImageSegmentation`` →
    ``post_process_semantic_segmentation`` (its 1-prompt answers equal that
    pipeline's), averaging the ensemble's rows. Where they differ and why:
    :mod:`.seggpt_codec` (pixels) and :mod:`.seggpt_encoder` (merge layer).
    Contexts being tuned (tensors that require grad) take a differentiable float
    path in both modes; everything else — prediction, selection, evaluation —
    the uint8 path of its reference.

Several prompts (``ensemble``)
    ``"feature"`` — SegGPT's own, and what the paper (Wang et al., "SegGPT:
    Segmenting Everything In Context", ICCV 2023) uses for few-shot: the query is
    repeated N times next to the N (prompt, mask) pairs and the query half of
    every encoder layer's attention output is averaged over those N rows (only
    when N > 1). Averaging makes the query-half *tokens* identical in all N rows;
    the N painted outputs still differ, but only in the first pixel row of the
    query half, which the decoder's 3×3 convolution computes across the seam
    from the row's own prompt mask. The official code takes row 0
    (``reference="official"``); ``"transformers"`` averages the N rows (which
    changes only that pixel row). Prompts interact, so this mode declares
    ``combines = "model"``: every prompt set costs N rows of forward and the
    oracle can only memoise whole sets. Several sets (each with its own query)
    share one model call through :meth:`SegGPTBackend.predict_sets`, the
    averages taken within each set's rows, so a set's answer does not depend on
    its batch neighbours.

    ``"output"`` — each (prompt, query) pair is run alone and the decoded
    probabilities are averaged. ``combines = "output"``: the oracle caches each
    pair (sum of probabilities, count) and scores any set by arithmetic; memory is
    that of ``batch_size`` rows whatever N is. Usually weaker than the feature
    ensemble, much cheaper to search over.

    In both modes :meth:`SegGPTBackend.pair_stats` is implemented; in feature mode
    it is only the cheap shortlist proxy of forward selection, never the score.

Rows per model call (``batch_size``)
    Independent rows (output mode, one-prompt predictions) and whole prompt
    sets in :meth:`~SegGPTBackend.predict_sets` are packed into calls of at most
    ``max(batch_size, largest set)`` rows; a set is never split. A plain
    :meth:`~SegGPTBackend.predict` with N > 1 prompts in feature mode runs one
    call of N rows per query (what ``memory_bytes(N)`` describes).

Speed (``attention``, ``compile``)
    ``attention="sdpa"`` (default) computes transformers' attention through
    ``F.scaled_dot_product_attention`` (same function; float32 within 1e-5 of
    eager on the tests' tiny models); ``"eager"`` runs transformers' own module.
    ``compile=True`` compiles the two pieces of an encoder layer with
    ``torch.compile`` (off by default everywhere: no GPU measurement has been
    made with this code yet). ``dtype="bfloat16"`` halves memory at an accuracy
    cost measured on the tiny test models: painted outputs within 4 % (eager) /
    6 % (SDPA) of their range of float32's, and on real DAVIS frames ≥ 99 % of
    pixel labels equal to float32's, probabilities near the decision boundary
    moving by up to 0.25 (tests/test_seggpt_encoder.py,
    tests/test_seggpt_reference.py).

Context tuning
    Prompt images and masks may be tensors with ``requires_grad``. The model is
    frozen (eval mode, ``requires_grad=False``).
    :meth:`SegGPTBackend.tuning_loss` is the model's own training loss (smooth-L1
    on the masked patches, i.e. the query's mask), averaged over every row of the
    call: transformers' ``SegGptLoss`` divides the masked sum over the batch by
    the number of masked entries, so with one masked row per prompt the loss is a
    mean over prompts. ``checkpointing=True`` recomputes each encoder layer in
    the backward pass (``torch.utils.checkpoint``, applied per call while
    gradients are recorded).

The model is never changed behind another holder's back
    A model passed in that is already on the backend's device and dtype, in
    eval mode and frozen is used as is (and may be shared by several backends
    with different settings: nothing is installed on it). Any other model is
    copied first. :meth:`SegGPTBackend.from_pretrained` prepares the model it
    loads, so it is never copied.

Memory (:meth:`SegGPTBackend.memory_bytes`)
    On CUDA, peaks are profiled at 1 and 2 rows and extrapolated linearly
    (cached per device, dtype, input size and mode; ``memory_kind ==
    "profiled"``). Elsewhere an analytic estimate (weights + the largest live
    activations of one *eager* encoder layer, intermediate features and decoder)
    is returned; it is an estimate, not a measurement. The attention in use is
    the public attribute ``attention``.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..data import Sample
from ..errors import CheckpointError, ConfigError
from ..space import Choice
from .base import Backend, Context, Prompt, Stats, infer_num_classes, one_hot_mask
from .cache import TensorLRU
from .seggpt_codec import SegGptCodec, seggpt_palette
from .seggpt_encoder import SegGptOutput, SegGptRunner, check_attention

RELEASED_CHECKPOINT = "BAAI/seggpt-vit-large"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_ENSEMBLES = ("feature", "output")
_EMBEDDINGS = ("instance", "semantic")

#: a prompt set and the query it is predicted for
PromptSet = tuple[Sequence[Prompt], Sample, int]


def _check_compile(value: Any) -> bool | str:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        names = set(torch._dynamo.list_backends(exclude_tags=())) | {"inductor"}
        if value in names:
            return value
        raise ConfigError(f"seggpt backend: compile must be true, false or a torch.compile backend "
                          f"({', '.join(sorted(names))}); got {value!r}")
    raise ConfigError(f"seggpt backend: compile must be true or false, got {value!r}")


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _is_prepared(model: Any, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a model is already frozen, in eval mode and on (device, dtype): then it is used without a copy."""
    params = list(model.parameters())
    return (all(_same_device(p.device, device) and p.dtype == dtype and not p.requires_grad for p in params)
            and not any(m.training for m in model.modules()))


def _prepare(model: Any, device: torch.device, dtype: torch.dtype) -> Any:
    model = model.to(device=device, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class SegGPTBackend(Backend):
    """SegGPT over transformers (see the module docstring). Build it with :meth:`from_pretrained`."""

    name = "seggpt"
    differentiable = True
    search_space = (Choice("ensemble", _ENSEMBLES), Choice("embedding_type", _EMBEDDINGS))

    def __init__(
        self,
        model: Any = None,
        *,
        checkpoint: str | None = None,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
        ensemble: str = "feature",
        embedding_type: str = "instance",
        checkpointing: bool = False,
        temperature: float = 0.05,
        batch_size: int = 4,
        cache_bytes: int = 256 << 20,
        reference: str = "official",
        attention: str = "sdpa",
        compile: bool | str = False,
    ) -> None:
        if model is None:
            raise ConfigError(
                "the seggpt backend needs a checkpoint: pass --checkpoint DIR (or SegGPTBackend.from_pretrained(DIR)), "
                f"where DIR is a local copy of {RELEASED_CHECKPOINT} downloaded on a machine with network access "
                f"(`huggingface-cli download {RELEASED_CHECKPOINT} --local-dir DIR`)"
            )
        if ensemble not in _ENSEMBLES:
            raise ConfigError(f"seggpt backend: ensemble must be one of {_ENSEMBLES}, got {ensemble!r}")
        if embedding_type not in _EMBEDDINGS:
            raise ConfigError(f"seggpt backend: embedding_type must be one of {_EMBEDDINGS}, got {embedding_type!r}")
        check_attention(attention)
        if batch_size < 1:
            raise ConfigError(f"seggpt backend: batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.dtype_name, self.dtype = self._resolve_dtype(dtype, self.device)
        self.checkpoint = checkpoint
        self.ensemble = ensemble
        self.combines = "model" if ensemble == "feature" else "output"
        self.embedding_type = embedding_type
        self.checkpointing = bool(checkpointing)
        self.temperature = float(temperature)
        self.batch_size = int(batch_size)
        self.cache_bytes = int(cache_bytes)
        self.reference = reference
        #: "sdpa" or "eager": the attention this backend's forward runs (memory models may depend on it)
        self.attention = attention
        self.compile = _check_compile(compile)
        cfg = model.config
        total = cfg.image_size if isinstance(cfg.image_size, (list, tuple)) else (cfg.image_size, cfg.image_size)
        self.input_size: tuple[int, int] = (int(total[0]) // 2, int(total[1]))  # one image: half the stacked pair
        self.patch_size = int(cfg.patch_size if not isinstance(cfg.patch_size, (list, tuple)) else cfg.patch_size[0])
        self.codec = SegGptCodec(reference, self.input_size, self.temperature, self.device)  # checks both

        self.model = model if _is_prepared(model, self.device, self.dtype) else _prepare(copy.deepcopy(model),
                                                                                          self.device, self.dtype)
        self.runner = SegGptRunner(self.model, reference=reference, attention=attention,
                                   checkpointing=self.checkpointing, compile=self.compile)
        #: preprocessed inputs, one byte budget: ("query", key) → image; ("prompt", key, classes) → (image, mask)
        self._inputs = TensorLRU(self.cache_bytes)
        self._profiler = None
        #: model calls and rows pushed through the model (for tests and benchmarks)
        self.model_calls = 0
        self.model_rows = 0

    def modules(self) -> list[torch.nn.Module]:
        return [self.model]

    # --- construction ------------------------------------------------------------------------------
    @staticmethod
    def _resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> tuple[str, torch.dtype]:
        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).replace("torch.", "")
        if dtype not in _DTYPES:
            raise ConfigError(f"seggpt backend: dtype must be one of float32, bfloat16, float16; got {dtype!r}")
        t = _DTYPES[dtype]
        if t == torch.float16 and device.type == "cpu":
            warnings.warn("seggpt backend: float16 is not supported on CPU; using float32", stacklevel=3)
            t = torch.float32
        return {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[t], t

    @classmethod
    def from_pretrained(cls, name_or_local_dir: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: str = "float32", **options: Any) -> "SegGPTBackend":
        """Load a SegGPT checkpoint from a local folder (or the local Hugging Face cache) and wrap it.

        Nothing is downloaded: a hub id must already be in the cache. A missing
        folder or id raises :class:`CheckpointError` saying how to obtain it.
        """
        try:
            from transformers import SegGptForImageSegmentation
        except ImportError as exc:  # pragma: no cover - transformers is a dependency
            raise CheckpointError(f"the seggpt backend needs transformers with SegGPT support ({exc})") from None
        name = str(name_or_local_dir)
        path = Path(name).expanduser()
        how = (f"download it on a machine with network access (`huggingface-cli download {RELEASED_CHECKPOINT} "
               "--local-dir DIR`) and pass that folder")
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise CheckpointError(f"seggpt checkpoint folder {path} has no config.json; {how}")
            source, ref = str(path), str(path.resolve())
        elif path.exists():
            raise CheckpointError(f"seggpt checkpoint {path} is a file; give the folder that holds config.json")
        elif path.is_absolute() or name.startswith((".", "~")) or name.count("/") != 1:
            raise CheckpointError(f"seggpt checkpoint folder {name} not found; {how}")
        else:
            source, ref = name, name
        torch_dtype = cls._resolve_dtype(dtype, torch.device(device))[1]
        try:
            model = SegGptForImageSegmentation.from_pretrained(
                source, local_files_only=True, dtype=torch_dtype, drop_path_rate=0.0)
        except (OSError, ValueError, EnvironmentError) as exc:
            if source == name and not path.is_dir():
                raise CheckpointError(
                    f"seggpt checkpoint {name!r} is not in the local Hugging Face cache and this machine has no hub "
                    f"access (HF_HUB_OFFLINE); {how}"
                ) from None
            raise CheckpointError(f"cannot load seggpt checkpoint {source}: {exc}") from None
        if getattr(model.config, "model_type", None) != "seggpt":
            raise CheckpointError(f"{source} is a {model.config.model_type!r} checkpoint, not seggpt")
        model = _prepare(model, torch.device(device), torch_dtype)  # ours alone: no copy needed
        return cls(model, checkpoint=ref, device=device, dtype=dtype, **options)

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "checkpoint": self.checkpoint,
            "options": {
                "dtype": self.dtype_name, "ensemble": self.ensemble, "embedding_type": self.embedding_type,
                "checkpointing": self.checkpointing, "temperature": self.temperature, "batch_size": self.batch_size,
                "reference": self.reference, "attention": self.attention, "compile": self.compile,
            },
        }

    # --- preprocessing (see .seggpt_codec) ---------------------------------------------------------
    def mask_to_rgb(self, mask: torch.Tensor) -> torch.Tensor:
        """(C, H, W) class probabilities → (3, H, W) palette colour in [0, 1] (one-hot: the class colour)."""
        return self.codec.mask_to_rgb(mask)

    def query_input(self, query: Sample) -> torch.Tensor:
        """Normalised model input of a query image (uint8 path of the reference; cached by sample key)."""
        x = self._inputs.get(("query", query.key))
        if x is None:
            x = self.codec.image(query.image)
            self._inputs.put(("query", query.key), x)
        return x

    def prompt_input(self, prompt: Prompt, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised image, normalised palette mask) of a prompt; cached for labelled samples."""
        if isinstance(prompt, Context):
            if prompt.mask.shape[0] != num_classes:
                raise ConfigError(f"context has {prompt.mask.shape[0]} classes, the task has {num_classes}")
            return self.codec.image(prompt.image), self.codec.mask(prompt.mask)
        key = ("prompt", prompt.key, num_classes)
        hit = self._inputs.get(key)
        if hit is None:
            hit = (self.codec.image(prompt.image), self.codec.mask(one_hot_mask(prompt.mask, num_classes)))
            self._inputs.put(key, hit)
        return hit

    def prepare(self, samples: Sequence[Sample]) -> None:
        """Preprocess (resize, normalise) the images once; SegGPT has no per-image state beyond that."""
        with torch.no_grad():
            for s in samples:
                self.query_input(s)

    def clear_cache(self) -> None:
        self._inputs.clear()

    # --- the model call ----------------------------------------------------------------------------
    def _forward(self, queries: torch.Tensor, images: torch.Tensor, masks: torch.Tensor, sizes: Sequence[int],
                 labels: torch.Tensor | None = None) -> SegGptOutput:
        """One call of the network on stacked rows; rows of one prompt set (``sizes``) share a feature ensemble."""
        self.model_calls += 1
        self.model_rows += int(queries.shape[0])
        return self.runner(queries, images, masks, sizes, embedding_type=self.embedding_type, labels=labels)

    def query_half(self, pred_masks: torch.Tensor) -> torch.Tensor:
        """(B, 3, 2h, w) model output → (B, 3, h, w) query halves in float32 (normalised space)."""
        return pred_masks[:, :, pred_masks.shape[2] // 2:, :].float()

    def decode(self, pred: torch.Tensor, num_classes: int) -> torch.Tensor:
        """(3, h, w) normalised predicted picture → (C, h, w) probabilities (the reference's mask rule, softened)."""
        return self.codec.decode(pred, num_classes)

    def reduce_rows(self, halves: torch.Tensor) -> torch.Tensor:
        """One prompt set's (N, 3, h, w) query halves → its answer: row 0 (official) or the mean of the rows."""
        return halves[0] if self.reference == "official" else halves.mean(0)

    def _resize_probs(self, probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(probs.shape[-2:]) == tuple(size):
            return probs
        return F.interpolate(probs.unsqueeze(0), size=tuple(size), mode="nearest")[0]

    def _packed(self, sets: Sequence[PromptSet]) -> list[list[int]]:
        """Indices of ``sets`` per model call: consecutive sets, at most max(batch_size, largest set) rows a call."""
        calls: list[list[int]] = []
        rows = 0
        for i, (prompts, _, _) in enumerate(sets):
            if calls and rows + len(prompts) <= self.batch_size:
                calls[-1].append(i)
                rows += len(prompts)
            else:
                calls.append([i])
                rows = len(prompts)
        return calls

    def _set_probs(self, sets: Sequence[PromptSet], ensemble: bool) -> list[torch.Tensor]:
        """Model-resolution probabilities of (prompts, query, num_classes) sets, one map per set.

        With ``ensemble`` a set of N > 1 prompts is one feature-ensemble group of
        N rows; without it, every set must hold one prompt.
        """
        out: list[torch.Tensor] = []
        for call in self._packed(sets):
            chunk = [sets[i] for i in call]
            images, masks, queries = [], [], []
            for prompts, query, k in chunk:
                if not ensemble and len(prompts) != 1:
                    raise ValueError("independent rows take one prompt per set")
                x = self.query_input(query)
                for p in prompts:
                    image, mask = self.prompt_input(p, k)
                    images.append(image)
                    masks.append(mask)
                    queries.append(x)
            sizes = [len(prompts) for prompts, _, _ in chunk]
            res = self._forward(torch.stack(queries), torch.stack(images), torch.stack(masks), sizes)
            halves = self.query_half(res.pred_masks)
            start = 0
            for (prompts, _, k), n in zip(chunk, sizes):
                out.append(self.decode(self.reduce_rows(halves[start:start + n]), k))
                start += n
        return out

    def predict(self, prompts: Sequence[Prompt], queries: Sequence[Sample], num_classes: int | None = None) -> list[torch.Tensor]:
        """Per query, (C, H, W) probabilities at its resolution (see "Several prompts" in the module docstring)."""
        if not prompts:
            raise ConfigError("a prediction needs at least one prompt")
        k = num_classes or infer_num_classes(prompts)
        if self.ensemble == "feature" and len(prompts) > 1:  # one call of N rows per query
            return [self._resize_probs(self._set_probs([(prompts, q, k)], True)[0], q.size) for q in queries]
        probs = self._set_probs([([p], q, k) for q in queries for p in prompts], False)
        n = len(prompts)
        return [self._resize_probs(torch.stack(probs[i * n:(i + 1) * n]).mean(0), q.size)
                for i, q in enumerate(queries)]

    def predict_sets(self, prompt_sets: Sequence[Sequence[Prompt]], query: Sample,
                     num_classes: int | None = None) -> list[torch.Tensor]:
        """``predict(ps, [query])[0]`` for every prompt set, several sets per model call (feature ensemble).

        Each set is its own group of rows, its ensemble averages taken within
        the group, so every answer equals the one-set call's (up to float
        rounding of batched kernels); calls hold at most ``max(batch_size,
        largest set)`` rows.
        """
        if self.ensemble != "feature":
            return super().predict_sets(prompt_sets, query, num_classes)
        sets = []
        for ps in prompt_sets:
            if not ps:
                raise ConfigError("a prediction needs at least one prompt")
            sets.append((list(ps), query, num_classes or infer_num_classes(ps)))
        return [self._resize_probs(p, query.size) for p in self._set_probs(sets, True)]

    # --- output-level statistics -------------------------------------------------------------------
    def pair_stats(self, prompt: Prompt, query: Sample, num_classes: int) -> Stats:
        """Sum of the pair's decoded probabilities (model resolution) and a count of 1.

        Exact for ``ensemble="output"``; for ``"feature"`` a proxy that ignores the
        prompts' interaction (used by forward selection only to shortlist).
        """
        probs = self._set_probs([([prompt], query, num_classes)], False)[0]
        return {"sum": probs, "count": torch.ones((), device=self.device)}

    def merge_stats(self, a: Stats, b: Stats) -> Stats:
        return {"sum": a["sum"] + b["sum"], "count": a["count"] + b["count"]}

    def finalize(self, stats: Stats, query: Sample) -> torch.Tensor:
        return self._resize_probs(stats["sum"] / stats["count"], query.size)

    # --- context tuning ----------------------------------------------------------------------------
    def tuning_loss(self, prompts: Sequence[Context], queries: Sequence[Sample], num_classes: int) -> torch.Tensor:
        """SegGPT's smooth-L1 on the query's (masked) mask patches, averaged over prompts, then over queries.

        Each query is run with all prompts (one feature-ensemble set when that is
        the mode and N > 1; independent rows otherwise), its label given as the
        palette image of its mask (ignored pixels black) with one masked row per
        prompt, so the loss is a mean over prompts rather than a sum.
        """
        if not prompts:
            raise ConfigError("context tuning needs at least one prompt")
        ins = [self.prompt_input(p, num_classes) for p in prompts]
        images = torch.stack([i for i, _ in ins])
        masks = torch.stack([m for _, m in ins])
        n = len(prompts)
        sizes = [n] if self.ensemble == "feature" else [1] * n
        losses = []
        for q in queries:
            label = self.codec.mask(one_hot_mask(q.mask, num_classes)).unsqueeze(0).expand(n, -1, -1, -1)
            x = self.query_input(q).unsqueeze(0).expand(n, -1, -1, -1)
            res = self._forward(x, images, masks, sizes, labels=label)
            losses.append(res.loss.float())
        return torch.stack(losses).mean()

    # --- memory ------------------------------------------------------------------------------------
    def rows(self, num_prompts: int) -> int:
        """Batch rows of the largest model call made while predicting with ``num_prompts``-prompt sets.

        Feature ensemble: one set is k rows, and :meth:`predict_sets` packs several
        sets into a call of up to ``batch_size`` rows, so max(k, batch_size). Output
        ensemble: pairs are batched ``batch_size`` at a time per query, min(k, batch_size).
        """
        k = max(1, int(num_prompts))
        return max(k, self.batch_size) if self.ensemble == "feature" else min(k, self.batch_size)

    @property
    def memory_kind(self) -> str:
        return "profiled" if self.device.type == "cuda" else "analytic estimate"

    @property
    def resident_bytes(self) -> int:
        """What the backend may hold on the device besides one call: its preprocessed-input cache at its cap.

        The cap, not the current fill: an estimate must not depend on what happened to be
        cached, or a resumed run could decide differently from an uninterrupted one.
        """
        return self.cache_bytes

    def memory_bytes(self, num_prompts: int, image_size: tuple[int, int] | None = None, num_classes: int = 2) -> int:
        """Peak device memory of predicting one query with ``num_prompts``-prompt sets.

        On CUDA the exact call (:meth:`rows` rows of the model's input size, this
        ensemble, attention and reference) is profiled the first time it is asked for
        (:class:`~promptopt.memory.CudaPeakProfiler`, cached per device, dtype, input
        size, mode and rows, plus its stated margin), on top of the weights and the
        input cache at its cap. Elsewhere the analytic model
        :func:`~promptopt.backends.memory_models.seggpt_inference_memory` (calibrated on H100
        measurements; never below them in the test suite).
        """
        from .memory_models import seggpt_inference_memory

        rows = self.rows(num_prompts)
        hw = tuple(image_size or self.input_size)
        if self.device.type == "cuda":
            return self._profiled_peak(rows, hw)
        k = rows if self.ensemble == "feature" else max(1, int(num_prompts))
        return seggpt_inference_memory(self.model, dtype=self.dtype, k=k, image_size_hw=hw, ensemble=self.ensemble,
                                       batch_size=self.batch_size, num_classes=num_classes, attention=self.attention,
                                       resident_bytes=self.resident_bytes).total

    def tuning_memory_bytes(self, num_contexts: int, image_size: tuple[int, int], batch_size: int,
                            num_classes: int = 2) -> int:
        """Peak of one context-tuning step (``tuning_loss`` on ``batch_size`` images + backward):
        profiled on CUDA for exactly these contexts × images, else
        :func:`~promptopt.backends.memory_models.seggpt_tuning_memory` (with or without checkpointing)."""
        from .memory_models import seggpt_tuning_memory

        if self.device.type == "cuda":
            return self._profiled_peak((int(num_contexts), int(batch_size)), tuple(image_size), tuning=True)
        return seggpt_tuning_memory(self.model, dtype=self.dtype, contexts=num_contexts, batch_size=batch_size,
                                    checkpointing=self.checkpointing, image_size_hw=tuple(image_size),
                                    num_classes=num_classes, attention=self.attention,
                                    resident_bytes=self.resident_bytes).total

    def _profiled_peak(self, shape: int | tuple[int, int], image_size: tuple[int, int], tuning: bool = False,
                       measure: Any = None) -> int:
        """Weights + input cache at its cap + the measured increment of the exact call (see :meth:`memory_bytes`).

        ``measure`` replaces the CUDA measurement (tests run the same call on the CPU).
        """
        from ..memory import CudaPeakProfiler, ProfileKey

        if getattr(self, "_profiler", None) is None or measure is not None:
            kw = {"measure": measure} if measure is not None else {}
            self._profiler = CudaPeakProfiler(resident=lambda _device: self.weight_bytes + self.resident_bytes, **kw)
        mode = ("tuning" if tuning else "inference", self.ensemble, self.attention, self.reference,
                f"checkpointing={self.checkpointing}", f"image={image_size[0]}x{image_size[1]}")
        key = ProfileKey.of(self.device, self.dtype_name, self.input_size, mode, shape)
        calls, rows = self.model_calls, self.model_rows
        try:
            return self._profiler.peak_bytes(key, lambda: self._exact_call(shape, image_size, tuning))
        finally:
            self.model_calls, self.model_rows = calls, rows  # profiling is not work the caller asked for

    @property
    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def _exact_call(self, shape: int | tuple[int, int], image_size: tuple[int, int], tuning: bool) -> None:
        """The call a memory figure stands for, on zero inputs of the right shapes (nothing is cached)."""
        h, w = image_size
        if tuning:
            n, q = shape  # type: ignore[misc]
            ctx = [Context(torch.zeros(3, h, w, device=self.device, requires_grad=True),
                           torch.full((2, h, w), 0.5, device=self.device, requires_grad=True)) for _ in range(n)]
            queries = [Sample(f"profile-{i}", "", image=torch.zeros(h, w, 3, dtype=torch.uint8).numpy(),
                              mask=torch.zeros(h, w, dtype=torch.long).numpy()) for i in range(q)]
            try:
                self.tuning_loss(ctx, queries, 2).backward()
            finally:
                for smp in queries:
                    self._inputs.pop(("query", smp.key))
            return
        x = torch.zeros(int(shape), 3, *self.input_size, device=self.device)  # type: ignore[arg-type]
        sizes = [int(shape)] if self.ensemble == "feature" else [1] * int(shape)  # type: ignore[arg-type]
        with torch.no_grad():
            res = self._forward(x, x, x, sizes)
            probs = self.decode(self.query_half(res.pred_masks)[0], 2)
            self._resize_probs(probs, image_size)


def tiny_config(**overrides: Any):
    """A small random-init ``SegGptConfig`` (64×32 stacked input, 32×32 per image) for tests and CPU benchmarks."""
    from transformers import SegGptConfig

    kw = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=(64, 32), patch_size=8,
              pretrain_image_size=32, decoder_hidden_size=16, merge_index=1, intermediate_hidden_state_indices=(1, 3),
              mlp_dim=64, drop_path_rate=0.0)
    kw.update(overrides)
    return SegGptConfig(**kw)


def save_random_model(path: str | Path, config: Any = None, seed: int = 0) -> Path:
    """A random-init ``SegGptForImageSegmentation`` (default :func:`tiny_config`) saved with ``save_pretrained``,
    for tests and benchmarks. Its painting head is widened (weights N(0, 1.5), bias 0.5): a plain random init paints
    every pixel near black, so every mask would be empty and every prompt set would score alike."""
    from transformers import SegGptForImageSegmentation

    torch.manual_seed(seed)
    model = SegGptForImageSegmentation(config if config is not None else tiny_config())
    with torch.no_grad():
        model.decoder.decoder_pred.head.weight.normal_(0.0, 1.5)
        model.decoder.decoder_pred.head.bias.fill_(0.5)
    model.save_pretrained(path)
    return Path(path)


__all__ = ["SegGPTBackend", "save_random_model", "seggpt_palette", "tiny_config"]
