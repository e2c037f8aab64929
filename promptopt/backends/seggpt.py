"""SegGPT (``BAAI/seggpt-vit-large``) as an in-context segmenter, over transformers' ``SegGptForImageSegmentation``.

Why it exists: SegGPT is the model the prompt-selection literature optimises
for, and its several-prompt mode (the *feature ensemble*) is where a prompt set
is more than the sum of its pairs. This module wraps it with the three things
the rest of promptopt needs: preprocessing in torch (so context tuning can
differentiate through it), decoding into class probabilities, and a memory
figure per prompt count.

Preprocessing (equivalent to ``SegGptImageProcessor``)
    Every prompt image, prompt mask and query is resized to the checkpoint's
    per-image input size — half the height of ``config.image_size``, 448×448 for
    the released model — images bicubic with antialiasing and clamped to
    [0, 1] (the processor rounds to uint8; we do not, to stay differentiable),
    masks nearest (PIL's rule, torch's "nearest-exact"). Masks become RGB through SegGPT's palette
    (:func:`seggpt_palette`, the same colours as transformers' ``build_palette``):
    class 0 is black, class c the c-th palette colour, a binary mask is class 1
    of a one-label palette (white); a soft mask (:class:`Context`) is the
    probability-weighted mix of colours, and ignored pixels (all-zero columns)
    are black. Both are then normalised with the ImageNet mean and std.

Decoding
    The query half of the predicted image is un-normalised and clipped to
    [0, 255] as in ``post_process_semantic_segmentation``; per pixel, the class
    probabilities are ``softmax(-d_c / temperature)`` where ``d_c`` is the squared
    distance (RGB scaled to [0, 1]) to the palette colour of class c. Its argmax is
    the nearest palette colour, exactly transformers' decoding; the softness only
    matters when probabilities are averaged (``ensemble="output"``) or
    differentiated. Probabilities are resized to the query's size with torch's
    "nearest" interpolation (as transformers resizes the predicted image).

Several prompts (``ensemble``)
    ``"feature"`` — SegGPT's own, and what the paper (Wang et al., "SegGPT:
    Segmenting Everything In Context", ICCV 2023) uses for few-shot: the query is
    repeated N times next to the N (prompt, mask) pairs in one batch and the
    model is called with ``feature_ensemble=True``, which averages the query
    tokens across prompts inside the encoder. Only when N > 1: with N = 1 the flag
    is not passed at all. The N output rows still differ (the prompt halves
    attend differently), so we average the N query halves ourselves rather than
    taking row 0 as the reference inference code does. Prompts interact, so this
    mode declares ``combines = "model"``: every prompt set costs N rows of
    forward, memory grows about linearly with N, and the oracle can only memoise
    whole sets. Queries are never batched together here (the ensemble mean runs
    over the whole batch).

    ``"output"`` — each (prompt, query) pair is run alone and the decoded
    probabilities are averaged. ``combines = "output"``: the oracle caches each
    pair (sum of probabilities, count) and scores any set by arithmetic; memory is
    that of ``batch_size`` rows whatever N is. Usually weaker than the feature
    ensemble, much cheaper to search over.

    In both modes :meth:`SegGPTBackend.pair_stats` is implemented; in feature mode
    it is only the cheap shortlist proxy of forward selection, never the score.

Context tuning
    Prompt images and masks may be tensors with ``requires_grad``. The model is
    frozen (eval mode, ``requires_grad=False``, drop-path rate 0).
    :meth:`SegGPTBackend.tuning_loss` is the model's own training loss (smooth-L1
    on the masked patches, i.e. the query's mask) with ``bool_masked_pos`` given
    one row per prompt: transformers' ``SegGptLoss`` divides the masked sum over
    the whole batch by ``mask.sum()`` of ``bool_masked_pos``, so its default single
    row would *sum* over prompts instead of averaging. ``checkpointing=True``
    recomputes each encoder layer in the backward pass
    (``torch.utils.checkpoint``; transformers' own gradient checkpointing is
    active only in training mode, which would switch drop-path back on).

Memory (:meth:`SegGPTBackend.memory_bytes`)
    On CUDA, peaks are profiled at 1 and 2 rows and extrapolated linearly
    (cached per device, dtype, input size and mode; ``memory_kind ==
    "profiled"``). Elsewhere an analytic estimate (weights + the largest live
    activations of one encoder layer, intermediate features and decoder) is
    returned; it is an estimate, not a measurement.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..data import Sample
from ..errors import CheckpointError, ConfigError
from ..memory import cuda_peak_bytes
from ..space import Choice
from .base import Backend, Context, Prompt, Stats, infer_num_classes, one_hot_mask

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RELEASED_CHECKPOINT = "BAAI/seggpt-vit-large"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_ENSEMBLES = ("feature", "output")
_EMBEDDINGS = ("instance", "semantic")


def seggpt_palette(num_classes: int) -> torch.Tensor:
    """(num_classes, 3) float RGB in [0, 255]: class 0 black, then SegGPT's palette for ``num_classes - 1`` labels.

    The colours are those of transformers' ``build_palette(num_labels)`` (from
    Painter's COCO palette): a grid with ``int(L ** (1/3)) + 1`` levels per
    channel counted down from 255.
    """
    if num_classes < 2:
        raise ConfigError(f"a segmentation task needs at least 2 classes, got {num_classes}")
    labels = num_classes - 1
    base = int(labels ** (1 / 3)) + 1
    margin = 256 // base
    colours = [(0, 0, 0)]
    for loc in range(labels):
        r, g, b = loc // base**2, (loc % base**2) // base, loc % base
        colours.append((255 - r * margin, 255 - g * margin, 255 - b * margin))
    return torch.tensor(colours, dtype=torch.float32)


def _checkpointed(forward, *args, **kwargs):
    """Run an encoder layer under activation checkpointing when gradients are being recorded."""
    if torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


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
        cache_bytes: int = 1 << 30,
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
        if temperature <= 0:
            raise ConfigError(f"seggpt backend: temperature must be > 0, got {temperature}")
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

        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        for module in self.model.modules():  # drop-path is inactive in eval mode; make it inert anyway
            if hasattr(module, "drop_prob"):
                module.drop_prob = 0.0
        if self.checkpointing:
            for layer in self.model.model.encoder.layers:
                if not isinstance(layer.forward, functools.partial):  # a model shared by two backends: wrap once
                    layer.forward = functools.partial(_checkpointed, layer.forward)

        cfg = self.model.config
        total = cfg.image_size if isinstance(cfg.image_size, (list, tuple)) else (cfg.image_size, cfg.image_size)
        self.input_size: tuple[int, int] = (int(total[0]) // 2, int(total[1]))  # one image: half the stacked pair
        self.patch_size = int(cfg.patch_size if not isinstance(cfg.patch_size, (list, tuple)) else cfg.patch_size[0])
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(3, 1, 1)
        self._queries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._prompts: OrderedDict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._cached_bytes = 0
        self._profile: dict[tuple, tuple[float, float]] = {}
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
        return cls(model, checkpoint=ref, device=device, dtype=dtype, **options)

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "checkpoint": self.checkpoint,
            "options": {
                "dtype": self.dtype_name, "ensemble": self.ensemble, "embedding_type": self.embedding_type,
                "checkpointing": self.checkpointing, "temperature": self.temperature, "batch_size": self.batch_size,
            },
        }

    # --- preprocessing -----------------------------------------------------------------------------
    def _normalise(self, x01: torch.Tensor) -> torch.Tensor:
        return (x01 - self._mean) / self._std

    def preprocess_image(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) RGB in [0, 1] → (3, h, w) normalised model input (bicubic, antialiased; differentiable)."""
        x = image.to(self.device, torch.float32)
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x.unsqueeze(0), size=self.input_size, mode="bicubic", align_corners=False,
                              antialias=True)[0].clamp(0.0, 1.0)
        return self._normalise(x)

    def mask_to_rgb(self, mask: torch.Tensor) -> torch.Tensor:
        """(C, H, W) class probabilities → (3, H, W) palette colour in [0, 1] (one-hot: the class colour)."""
        palette = seggpt_palette(mask.shape[0]).to(self.device) / 255.0
        return torch.einsum("chw,cd->dhw", mask.to(self.device, torch.float32), palette)

    def preprocess_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """(C, H, W) class probabilities → (3, h, w) normalised palette image (nearest resize; differentiable)."""
        rgb = self.mask_to_rgb(mask)
        if tuple(rgb.shape[-2:]) != self.input_size:
            # "nearest-exact" is PIL's NEAREST, which the processor maps masks to
            rgb = F.interpolate(rgb.unsqueeze(0), size=self.input_size, mode="nearest-exact")[0]
        return self._normalise(rgb)

    def _remember(self, cache: OrderedDict, key: Any, value: Any) -> None:
        cache[key] = value
        tensors = value if isinstance(value, tuple) else (value,)
        self._cached_bytes += sum(t.numel() * t.element_size() for t in tensors)
        while self._cached_bytes > self.cache_bytes and len(cache) > 1:
            _, old = cache.popitem(last=False)
            olds = old if isinstance(old, tuple) else (old,)
            self._cached_bytes -= sum(t.numel() * t.element_size() for t in olds)

    def query_input(self, query: Sample) -> torch.Tensor:
        """Normalised model input of a query image (cached by sample key)."""
        x = self._queries.get(query.key)
        if x is None:
            image = torch.from_numpy(query.image).permute(2, 0, 1).float().div_(255.0)
            x = self.preprocess_image(image)
            self._remember(self._queries, query.key, x)
        else:
            self._queries.move_to_end(query.key)
        return x

    def prompt_input(self, prompt: Prompt, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised image, normalised palette mask) of a prompt; cached for labelled samples."""
        if isinstance(prompt, Context):
            if prompt.mask.shape[0] != num_classes:
                raise ConfigError(f"context has {prompt.mask.shape[0]} classes, the task has {num_classes}")
            return self.preprocess_image(prompt.image), self.preprocess_mask(prompt.mask)
        key = (prompt.key, num_classes)
        hit = self._prompts.get(key)
        if hit is not None:
            self._prompts.move_to_end(key)
            return hit
        image = torch.from_numpy(prompt.image).permute(2, 0, 1).float().div_(255.0)
        out = (self.preprocess_image(image), self.preprocess_mask(one_hot_mask(prompt.mask, num_classes, self.device)))
        self._remember(self._prompts, key, out)
        return out

    def prepare(self, samples: Sequence[Sample]) -> None:
        """Preprocess (resize, normalise) the images once; SegGPT has no per-image state beyond that."""
        with torch.no_grad():
            for s in samples:
                self.query_input(s)

    def clear_cache(self) -> None:
        self._queries.clear()
        self._prompts.clear()
        self._cached_bytes = 0

    # --- the model call ----------------------------------------------------------------------------
    def _forward(self, queries: torch.Tensor, images: torch.Tensor, masks: torch.Tensor, feature_ensemble: bool,
                 labels: torch.Tensor | None = None) -> Any:
        """One call of the network on stacked rows; returns transformers' output."""
        kwargs: dict[str, Any] = {}
        if feature_ensemble:
            kwargs["feature_ensemble"] = True
        if labels is not None:
            n_patches = self.model.model.embeddings.patch_embeddings.num_patches
            bmp = torch.zeros(queries.shape[0], n_patches, dtype=torch.bool, device=self.device)
            bmp[:, n_patches // 2:] = True  # the query's mask: what the model paints and the loss scores
            kwargs["bool_masked_pos"] = bmp
            kwargs["labels"] = labels.to(self.dtype)
        self.model_calls += 1
        self.model_rows += int(queries.shape[0])
        return self.model(pixel_values=queries.to(self.dtype), prompt_pixel_values=images.to(self.dtype),
                          prompt_masks=masks.to(self.dtype), embedding_type=self.embedding_type, **kwargs)

    def query_half(self, pred_masks: torch.Tensor) -> torch.Tensor:
        """(B, 3, 2h, w) model output → (B, 3, h, w) query halves in float32 (normalised space)."""
        return pred_masks[:, :, pred_masks.shape[2] // 2:, :].float()

    def decode(self, pred: torch.Tensor, num_classes: int) -> torch.Tensor:
        """(3, h, w) normalised predicted image → (C, h, w) probabilities (softmax over -distance to the palette)."""
        rgb = (pred * self._std + self._mean).mul(255.0).clamp(0.0, 255.0) / 255.0
        palette = seggpt_palette(num_classes).to(pred.device) / 255.0
        d = ((rgb.unsqueeze(0) - palette.view(-1, 3, 1, 1)) ** 2).sum(1)  # (C, h, w)
        return torch.softmax(-d / self.temperature, dim=0)

    def _resize_probs(self, probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(probs.shape[-2:]) == tuple(size):
            return probs
        return F.interpolate(probs.unsqueeze(0), size=tuple(size), mode="nearest")[0]

    def _pair_probs(self, pairs: Sequence[tuple[Prompt, Sample]], num_classes: int) -> list[torch.Tensor]:
        """Model-resolution probabilities of independent (prompt, query) pairs, ``batch_size`` rows per call."""
        out: list[torch.Tensor] = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            ins = [self.prompt_input(p, num_classes) for p, _ in chunk]
            q = torch.stack([self.query_input(s) for _, s in chunk])
            res = self._forward(q, torch.stack([i for i, _ in ins]), torch.stack([m for _, m in ins]), False)
            out.extend(self.decode(row, num_classes) for row in self.query_half(res.pred_masks))
        return out

    def _ensemble_probs(self, prompts: Sequence[Prompt], query: Sample, num_classes: int) -> torch.Tensor:
        """Model-resolution probabilities of a query under SegGPT's feature ensemble of all prompts."""
        ins = [self.prompt_input(p, num_classes) for p in prompts]
        n = len(prompts)
        q = self.query_input(query).unsqueeze(0).expand(n, -1, -1, -1)
        res = self._forward(q, torch.stack([i for i, _ in ins]), torch.stack([m for _, m in ins]), n > 1)
        return self.decode(self.query_half(res.pred_masks).mean(0), num_classes)  # all N rows, not row 0

    def predict(self, prompts: Sequence[Prompt], queries: Sequence[Sample], num_classes: int | None = None) -> list[torch.Tensor]:
        """Per query, (C, H, W) probabilities at its resolution (see "Several prompts" in the module docstring)."""
        if not prompts:
            raise ConfigError("a prediction needs at least one prompt")
        k = num_classes or infer_num_classes(prompts)
        if self.ensemble == "feature" and len(prompts) > 1:
            return [self._resize_probs(self._ensemble_probs(prompts, q, k), q.size) for q in queries]
        pairs = [(p, q) for q in queries for p in prompts]
        probs = self._pair_probs(pairs, k)
        n = len(prompts)
        return [self._resize_probs(torch.stack(probs[i * n:(i + 1) * n]).mean(0), q.size)
                for i, q in enumerate(queries)]

    # --- output-level statistics -------------------------------------------------------------------
    def pair_stats(self, prompt: Prompt, query: Sample, num_classes: int) -> Stats:
        """Sum of the pair's decoded probabilities (model resolution) and a count of 1.

        Exact for ``ensemble="output"``; for ``"feature"`` a proxy that ignores the
        prompts' interaction (used by forward selection only to shortlist).
        """
        return {"sum": self._pair_probs([(prompt, query)], num_classes)[0], "count": torch.ones((), device=self.device)}

    def merge_stats(self, a: Stats, b: Stats) -> Stats:
        return {"sum": a["sum"] + b["sum"], "count": a["count"] + b["count"]}

    def finalize(self, stats: Stats, query: Sample) -> torch.Tensor:
        return self._resize_probs(stats["sum"] / stats["count"], query.size)

    # --- context tuning ----------------------------------------------------------------------------
    def tuning_loss(self, prompts: Sequence[Context], queries: Sequence[Sample], num_classes: int) -> torch.Tensor:
        """SegGPT's smooth-L1 on the query's (masked) mask patches, averaged over prompts, then over queries.

        Each query is run with all prompts (feature ensemble when that is the mode
        and N > 1; independent rows otherwise), its label given as the palette
        image of its mask (ignored pixels black) and ``bool_masked_pos`` one row
        per prompt, so the loss is a mean over prompts rather than a sum.
        """
        if not prompts:
            raise ConfigError("context tuning needs at least one prompt")
        ins = [self.prompt_input(p, num_classes) for p in prompts]
        images = torch.stack([i for i, _ in ins])
        masks = torch.stack([m for _, m in ins])
        n = len(prompts)
        losses = []
        for q in queries:
            label = self.preprocess_mask(one_hot_mask(q.mask, num_classes, self.device)).unsqueeze(0).expand(n, -1, -1, -1)
            x = self.query_input(q).unsqueeze(0).expand(n, -1, -1, -1)
            res = self._forward(x, images, masks, self.ensemble == "feature" and n > 1, labels=label)
            losses.append(res.loss.float())
        return torch.stack(losses).mean()

    # --- memory ------------------------------------------------------------------------------------
    def rows(self, num_prompts: int) -> int:
        """Batch rows of the largest model call when one query is predicted with ``num_prompts`` prompts.

        (Predicting many queries with one prompt, or in output mode, batches up
        to ``batch_size`` rows across queries.)
        """
        k = max(1, int(num_prompts))
        return k if self.ensemble == "feature" else min(k, self.batch_size)

    @property
    def memory_kind(self) -> str:
        return "profiled" if self.device.type == "cuda" else "analytic estimate"

    def _profile_key(self) -> tuple:
        return (str(self.device), self.dtype_name, self.input_size, self.ensemble)

    def profile_memory(self) -> tuple[float, float]:
        """(intercept, bytes per row) of the CUDA peak, measured at 1 and 2 rows (cached)."""
        key = self._profile_key()
        if key not in self._profile:
            calls, rows, peaks = self.model_calls, self.model_rows, []
            for r in (1, 2):
                x = torch.zeros(r, 3, *self.input_size, device=self.device)
                fe = self.ensemble == "feature" and r > 1
                with torch.no_grad():
                    peaks.append(cuda_peak_bytes(lambda: self._forward(x, x, x, fe), self.device))
            self.model_calls, self.model_rows = calls, rows
            self._profile[key] = (2 * peaks[0] - peaks[1], peaks[1] - peaks[0])
        return self._profile[key]

    def estimate_bytes(self, rows: int, image_size: tuple[int, int] | None = None) -> int:
        """Analytic peak-memory estimate of one inference call with ``rows`` batch rows (no_grad).

        Weights, plus per row: the two streams (image, mask) of the widest encoder
        layer before the merge — attention scores and their softmax for every head
        (T² per head; softmax in float32), qkv / MLP / residual activations — the
        stored intermediate features, and the decoder's full-resolution maps; plus
        the output probabilities at ``image_size``. Not a measurement.
        """
        cfg = self.model.config
        b = torch.finfo(self.dtype).bits // 8
        h, w = self.input_size
        tokens = (2 * h // self.patch_size) * (w // self.patch_size)
        d, heads = int(cfg.hidden_size), int(cfg.num_attention_heads)
        mlp = int(cfg.mlp_dim or 4 * d)
        weights = sum(p.numel() for p in self.model.parameters()) * b
        attn = heads * tokens * tokens * (2 * b + 4 + (4 if b != 4 else 0))
        layer = tokens * (6 * d + 3 * d + mlp) * b
        per_stream = attn + layer
        inter = tokens * d * len(cfg.intermediate_hidden_state_indices) * b * 2
        pixels = 2 * h * w
        decoder = pixels * (2 * int(cfg.decoder_hidden_size) + 3) * b + tokens * self.patch_size**2 * cfg.decoder_hidden_size * b
        per_row = 2 * per_stream + inter + decoder + 4 * 3 * pixels * 2
        H, W = image_size or self.input_size
        out = 4 * 2 * H * W * 2
        return int(weights + rows * per_row + out)

    def memory_bytes(self, num_prompts: int, image_size: tuple[int, int] | None = None) -> int:
        """Peak device memory of one prediction with ``num_prompts`` prompts: profiled on CUDA, else estimated."""
        r = self.rows(num_prompts)
        if self.device.type == "cuda":
            a, per_row = self.profile_memory()
            H, W = image_size or self.input_size
            return int(a + per_row * r + 4 * 2 * H * W * 2)
        return self.estimate_bytes(r, image_size)


def tiny_config(**overrides: Any):
    """A small random-init ``SegGptConfig`` (64×32 stacked input, 32×32 per image) for tests and CPU benchmarks."""
    from transformers import SegGptConfig

    kw = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=(64, 32), patch_size=8,
              pretrain_image_size=32, decoder_hidden_size=16, merge_index=1, intermediate_hidden_state_indices=(1, 3),
              mlp_dim=64, drop_path_rate=0.0)
    kw.update(overrides)
    return SegGptConfig(**kw)


__all__ = ["SegGPTBackend", "seggpt_palette", "tiny_config"]
