"""PerSAM and PerSAM-F: Segment Anything personalised by reference (image, mask) pairs.

Why it exists: SAM segments whatever it is pointed at; PerSAM (Zhang et al.,
"Personalize Segment Anything Model with One Shot", 2023) decides *where* to
point from a reference mask, with no training, and PerSAM-F adds two learnable
weights. Both run on transformers' ``SamModel`` (``facebook/sam-vit-base``,
``-large``, ``-huge``), whose mask decoder accepts PerSAM's two extra inputs
(``attention_similarity`` and ``target_embedding``).

Shaped like segment-anything's predictor: :meth:`PerSAMBackend.prepare` runs
the heavy image encoder once per image (``get_image_embeddings``) and keeps the
embedding; every later prediction only runs the light prompt encoder and mask
decoder. ``encoder_calls`` counts the encoder runs.

Two references (``reference``):

``"official"`` (default)
    The authors' code (github.com/ZrrSkywalker/Personalize-SAM, ``persam.py``,
    ``persam_f.py``, ``per_segment_anything/``): its decoder semantics (double
    softmax with the similarity map; the target embedding also in the final
    token→image attention), its preprocessing (PIL bilinear resize), its
    reference-mask rule, points and boxes at the original resolution, and
    PerSAM-F's training point and resolution. Every rule is a function of
    :mod:`promptopt.backends.persam_official`, whose docstring lists them.
``"transformers"``
    What transformers' ``SamModel`` computes with PerSAM's inputs, with the
    choices promptopt made before following the official code (the steps
    below), for users who want transformers' numbers.

The algorithm, step by step (the ``transformers`` functions are below; the
official ones in :mod:`~promptopt.backends.persam_official`):

1. Target: mean of the reference's image features inside its mask.
   Official: cells whose bilinear sample of the normalised, padded 0/255 mask
   is > 0 (:func:`~promptopt.backends.persam_official.reference_cells`).
   transformers mode: cells at least ``min_cover`` covered by area
   (:func:`mask_to_grid`, :func:`target_embedding`). Either way a mask that
   selects no cell falls back to every cell it touches (the official code
   would average nothing and produce NaN). ``min_cover`` set in official mode
   replaces the official rule by the area rule.
2. :func:`location_confidence` — cosine similarity of the (location) target
   with every location of the query's features.
3. One positive point at the maximum, one negative at the minimum. Official:
   of the map upsampled like SAM's masks to the query's original size, mapped
   to the input frame by the resize ratio. transformers mode: of the map after
   one upsampling step to the resized-input frame (:func:`select_points`).
4. Target-guided attention: the standardised similarity, squashed by a
   sigmoid, enters the decoder's token→image attention; target-semantic
   prompting adds the raw mean target to the decoder tokens. Official: the
   full-resolution map standardised and stretched onto the feature grid,
   ``softmax(softmax(qk) + sim)``, target also in the final attention.
   transformers mode: :func:`attention_bias` on the grid, added to the logits.
5. Cascaded refinement (:meth:`PerSAMBackend.segment`): the best mask's logits
   go back in as the mask input, then also its bounding box (official: from the
   mask at the original resolution; transformers mode: in the input frame);
   the best-scoring of the three outputs is kept each time.

The foreground probability is the sigmoid of the final logits: official, of
SAM's post-processed logits at the query's resolution (so the class map at
probability 1/2 is exactly the official mask); transformers mode, of the
low-resolution logits, resized afterwards. The official maps are larger:
the oracle's per-pair statistics are (K, H, W) per query instead of about
(K, 256, 256·W/H).

PerSAM-F (``variant="persam-f"``) instead mixes SAM's three multi-mask outputs
with weights ``(1 - w1 - w2, w1, w2)``, trained on each reference with dice +
focal loss, AdamW (lr 1e-3, eps 1e-4) and a cosine schedule, SAM frozen
(:func:`fit_mask_weights`). SAM's output does not depend on the weights, so
the decoder runs once and only the mixing is optimised: the same optimisation
as re-running the frozen decoder every step, at a fraction of the cost.
Official: the positive point, for training on the reference and at test time
on every query, comes from the location target ``(mean + max) / 2`` of the
reference's cells; training uses SAM's logits post-processed to the
reference's full resolution against its full-resolution mask. transformers
mode: the mean target for both points, trained on SAM's 256×256 low-res grid.
No negative point, no target-guided attention in PerSAM-F. Full resolution
costs time where there is no GPU: 1000 steps on a 480×854 reference take
≈ 33 s on one CPU thread against ≈ 0.6 s on the low-res grid
(``benchmarks/bench_persam.py``, tiny SAM); each reference trains once.

The learned weights are state, not configuration: :meth:`PerSAMBackend.config`
never holds them; :meth:`PerSAMBackend.learned_state` returns them as tensors
named ``mask_weights/<reference key>#<class>`` (for a safetensors file beside
``prompt.json``) and :meth:`PerSAMBackend.load_learned_state` puts them back,
so a saved prompt predicts without retraining.

Several classes: one target per foreground class present in a reference; each
class gets its own PerSAM run, giving a foreground probability ``p_c``. The
class map is the per-pixel argmax over ``(1 - max_c p_c, p_1, …, p_K)``
(normalised to sum to 1): a pixel is background unless its best class has
probability above 1/2 of being that object. For binary tasks this is SAM's
usual threshold at logit 0.

Absent objects (Personalize-SAM issue #13): PerSAM always points somewhere,
so a query without the object gets a false positive. ``min_similarity``
(peak cosine similarity of the location prior, in [-1, 1]) and ``min_score``
(SAM's predicted IoU of the final mask) are confidence thresholds: below
either, that target's mask on that query is empty. Both default to off; they
are ordinary options (saved in the config), so a search can tune them on
validation images that include some without the object.

Several instances (Personalize-SAM issues #9/#24), ``instances=N``: after each
mask, the similarity map is suppressed inside the segmented region and the
next maximum becomes a new positive point, while it stays above
``instance_threshold`` times the first maximum (and above the confidence
thresholds); the instances' probabilities are merged by a per-pixel max. For
up to three sheep, keeping a sheep whose location prior reaches 80 % of the
best one::

    backend = PerSAMBackend.from_pretrained("facebook/sam-vit-base", instances=3,
                                            instance_threshold=0.8)
    # CLI: promptopt select ... --backend persam --option instances=3 --option instance_threshold=0.8

Several references, two ways (``kshot``):

``"output"`` (default; ``combines = "output"``)
    Each reference runs PerSAM on its own and the prediction is the average of
    their foreground probabilities (statistics: per-class probability sum and
    count). The oracle caches every (reference, query) pair, so greedy
    selection costs no decoder run per step. This is the output-combination
    variant, not the paper's.
``"mean"`` / ``"max"`` (``combines = "model"``)
    The paper's k-shot form: one PerSAM run with the mean of the references'
    targets (``"max"``: location prior from the per-location max of their
    similarity maps, semantic prompt still the mean). PerSAM-F then uses the
    mean of the references' learned weights.

Images are preprocessed by the checkpoint's ``SamProcessor`` (its PIL
backend in official mode, as the official code resizes with PIL); a folder
without one gets SAM's preprocessing built from the model config: longest
side resized to the encoder's input size (1024 for the released models),
ImageNet normalisation, zero padding to a square. Outputs are per-query
(C, H, W) probabilities at the query's resolution.

Honest limits: PerSAM is not differentiable with respect to the prompt (points
are an argmax), so context tuning does not apply. :meth:`memory_bytes` is an
analytic estimate. Without real SAM weights (none can be downloaded here) the
tests only prove the mechanics, on tiny random-init models. Deviations from
the official code that remain in official mode, because the official code has
no rule for the case: an empty reference cell set (NaN there) falls back to
touched cells; an empty mask skips the box refinement (an exception there);
ignore (255) pixels are left out of PerSAM-F's loss; a constant similarity
map gives a flat attention similarity; the multi-instance, k-shot and
absent-object options are extensions.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data import IGNORE_INDEX, Sample
from ..errors import CheckpointError, ConfigError
from ..space import Choice
from . import persam_official as official
from .base import Backend, Context, Prompt, Stats, infer_num_classes
from .cache import TensorLRU

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
VARIANTS = ("persam", "persam-f")
KSHOT_MODES = ("output", "mean", "max")
REFERENCES = ("official", "transformers")
#: prefix of PerSAM-F's learned tensors in :meth:`PerSAMBackend.learned_state`
WEIGHTS_PREFIX = "mask_weights/"


# --- the algorithm, one small function per step (transformers mode) ----------------------------------------

def mask_to_grid(mask: torch.Tensor, reshaped: tuple[int, int], input_size: int, grid: tuple[int, int]) -> torch.Tensor:
    """(H, W) {0,1} mask → (h, w) fraction of each feature cell it covers.

    The mask goes through the image's own geometry: resized to the resized
    input (``reshaped``), zero-padded to the square ``input_size``, then
    area-averaged onto the encoder's feature grid.
    """
    m = F.interpolate(mask.float()[None, None], size=reshaped, mode="bilinear", align_corners=False)
    m = F.pad(m, (0, input_size - reshaped[1], 0, input_size - reshaped[0]))
    return F.interpolate(m, size=grid, mode="area")[0, 0]


def covered_cells(cover: torch.Tensor, min_cover: float = 0.5) -> torch.Tensor:
    """Cells at least ``min_cover`` inside the mask; when none is, every cell the mask touches."""
    inside = cover >= min_cover
    return inside if bool(inside.any()) else cover > 0


def target_embedding(features: torch.Tensor, cover: torch.Tensor, min_cover: float = 0.5) -> torch.Tensor | None:
    """Mean (D,) of ``features`` (D, h, w) over the cells the mask covers (None if it covers none).

    A cell counts when at least ``min_cover`` of it is inside the mask; an
    object smaller than that falls back to every cell it touches.
    """
    inside = covered_cells(cover, min_cover)
    if not bool(inside.any()):
        return None
    return features.float()[:, inside].mean(1)


def normalise(v: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return v / v.norm(dim=dim, keepdim=True).clamp_min(1e-12)


def combine_targets(targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """k-shot target: the mean of the references' (raw) target embeddings."""
    return torch.stack([t.float() for t in targets]).mean(0)


def location_confidence(target: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """(h, w) cosine similarity between a (D,) target and every location of (D, h, w) features."""
    f = normalise(features.float(), dim=0)
    return torch.einsum("d,dhw->hw", normalise(target.float()), f)


def upsample_similarity(sim: torch.Tensor, input_size: int, reshaped: tuple[int, int]) -> torch.Tensor:
    """(h, w) grid similarity → (hr, wr) map over the resized image (padding cropped away)."""
    up = F.interpolate(sim[None, None].float(), size=(input_size, input_size), mode="bilinear", align_corners=False)
    return up[0, 0, : reshaped[0], : reshaped[1]]


def select_points(sim: torch.Tensor) -> tuple[tuple[float, float], tuple[float, float]]:
    """(positive (x, y), negative (x, y)): the locations of the maximum and minimum of an (h, w) map."""
    w = sim.shape[1]
    flat = sim.flatten()
    hi, lo = int(flat.argmax()), int(flat.argmin())
    return (float(hi % w), float(hi // w)), (float(lo % w), float(lo // w))


def attention_bias(sim: torch.Tensor, valid: tuple[int, int] | None = None) -> torch.Tensor:
    """Target-guided attention: sigmoid of the standardised (h, w) grid similarity, as (1, 1, 1, h*w).

    It is added to the logits of the decoder's token-to-image attention. Mean
    and standard deviation are taken over ``valid`` (the cells of the image,
    not the padding). The reference code resizes the map of the unpadded image
    onto the whole grid; this keeps it aligned with the padded embedding.
    """
    region = sim[: valid[0], : valid[1]] if valid else sim
    z = (sim - region.mean()) / region.std().clamp_min(1e-6) if region.numel() > 1 else sim - region.mean()
    return torch.sigmoid(z).reshape(1, 1, 1, -1)


def mask_to_box(mask: torch.Tensor) -> list[float] | None:
    """[x0, y0, x1, y1] bounding box of a boolean (h, w) mask (None when empty)."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if ys.numel() == 0:
        return None
    return [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]


def dice_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """1 - soft Dice of sigmoid(logits) against a {0,1} (or soft) target (PerSAM-F's loss, +1 smoothing)."""
    p = torch.sigmoid(logits)
    if valid is not None:
        p, target = p[valid], target[valid]
    return 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None,
               alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss (RetinaNet), mean over pixels, as in PerSAM-F."""
    if valid is not None:
        logits, target = logits[valid], target[valid]
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.mean()


def mix_masks(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum over the first dim of (3, h, w) multi-mask logits."""
    return (logits * weights.view(-1, 1, 1).to(logits.dtype)).sum(0)


def fit_mask_weights(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None,
                     steps: int = 1000, lr: float = 1e-3) -> tuple[torch.Tensor, list[float]]:
    """PerSAM-F: learn (1 - w1 - w2, w1, w2) mixing SAM's three (3, h, w) mask logits (frozen, no grad).

    Two parameters, initialised to 1/3, trained with dice + focal loss by
    AdamW (lr, eps 1e-4) under a cosine schedule over ``steps``. Returns the
    three weights and the loss before every step and after the last.
    """
    logits = logits.detach().float()
    target = target.float()
    w = torch.nn.Parameter(torch.full((2,), 1.0 / 3.0, device=logits.device))
    opt = torch.optim.AdamW([w], lr=lr, eps=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))

    def full() -> torch.Tensor:
        return torch.cat([(1 - w.sum()).view(1), w])

    def loss_fn() -> torch.Tensor:
        mixed = mix_masks(logits, full())
        return dice_loss(mixed, target, valid) + focal_loss(mixed, target, valid)

    losses = []
    with torch.enable_grad():
        for _ in range(steps):
            loss = loss_fn()
            losses.append(float(loss.detach()))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        losses.append(float(loss_fn().detach()))
    return full().detach(), losses


# --- the backend ------------------------------------------------------------------------------------------

@dataclass
class ImageState:
    """One image's encoder output and geometry."""

    embedding: torch.Tensor  # (1, D, h, w) in the model dtype
    original: tuple[int, int]  # (H, W)
    reshaped: tuple[int, int]  # (hr, wr): the image inside the padded square input

    @property
    def nbytes(self) -> int:
        return self.embedding.numel() * self.embedding.element_size()


@dataclass
class Target:
    """One class of one reference (or the k-shot combination of several)."""

    semantic: torch.Tensor  # (D,) raw mean feature: target-semantic prompting
    location: torch.Tensor  # (D,) the target whose cosine similarity picks the points


@dataclass
class Segmentation:
    """One cascade's result: low-res logits (4h, 4w), the location prior's peak, SAM's predicted IoU."""

    logits: torch.Tensor
    peak: float
    score: float


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def default_image_processor(image_size: int, pil: bool = False):
    """SAM's preprocessing for an encoder taking ``image_size`` px: resize the longest side, normalise, pad.

    ``pil=True`` resizes with PIL (as Personalize-SAM does) instead of torchvision.
    """
    from transformers import SamImageProcessor

    cls = SamImageProcessor
    if pil:
        try:
            from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil as cls  # type: ignore
        except ImportError:  # transformers without a PIL backend resizes with PIL anyway
            pass
    return cls(size={"longest_edge": image_size}, pad_size={"height": image_size, "width": image_size})


def _load_processor(source: str, image_size: int, pil: bool = False):
    """The checkpoint's SamProcessor image processor, or SAM's preprocessing built from the config."""
    from transformers import SamProcessor

    try:
        proc = (SamProcessor.from_pretrained(source, backend="pil") if pil
                else SamProcessor.from_pretrained(source)).image_processor
    except (OSError, ValueError, TypeError):
        return default_image_processor(image_size, pil)
    pad = getattr(proc, "pad_size", None) or {}
    pad_h = pad.get("height") if isinstance(pad, dict) else getattr(pad, "height", None)
    if pad_h is not None and int(pad_h) != image_size:
        raise CheckpointError(f"{source}: processor pads to {pad_h} px but the model's encoder takes {image_size} px")
    return proc


class PerSAMBackend(Backend):
    """PerSAM / PerSAM-F over transformers' SamModel (see the module docstring).

    Options (all saved in :meth:`config`): ``reference`` ("official" /
    "transformers"), ``variant`` ("persam" / "persam-f"), ``kshot``
    ("output" / "mean" / "max"), ``refine`` (cascaded refinement),
    ``instances`` and ``instance_threshold`` (several instances),
    ``min_similarity`` and ``min_score`` (absent object → empty mask; None =
    off), ``train_steps`` and ``lr`` (PerSAM-F), ``min_cover`` (None: the
    reference's rule for the target's feature cells; a number: area cover),
    ``dtype``. ``device`` and ``cache_bytes`` are runtime settings.
    """

    name = "persam"
    search_space = (
        Choice("variant", VARIANTS),
        Choice("kshot", KSHOT_MODES),
        Choice("refine", (True, False)),
        # absent objects: a search on images without the object (empty masks) can learn to answer "nothing"
        Choice("min_similarity", (None, 0.3, 0.5, 0.7)),
    )

    def __init__(
        self,
        model: Any = None,
        image_processor: Any = None,
        checkpoint: str | None = None,
        reference: Literal["official", "transformers"] = "official",
        variant: Literal["persam", "persam-f"] = "persam",
        kshot: Literal["output", "mean", "max"] = "output",
        refine: bool = True,
        instances: int = 1,
        instance_threshold: float = 0.8,
        min_similarity: float | None = None,
        min_score: float | None = None,
        train_steps: int = 1000,
        lr: float = 1e-3,
        min_cover: float | None = None,
        dtype: str | torch.dtype = "float32",
        device: str = "cpu",
        cache_bytes: int = 512 << 20,
    ) -> None:
        if model is None:
            raise ConfigError("backend 'persam' needs SAM weights: pass --checkpoint facebook/sam-vit-base "
                              "(or a local folder saved by transformers)")
        if reference not in REFERENCES:
            raise ConfigError(f"persam: reference must be one of {', '.join(REFERENCES)}, got {reference!r}")
        if variant not in VARIANTS:
            raise ConfigError(f"persam: variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if kshot not in KSHOT_MODES:
            raise ConfigError(f"persam: kshot must be one of {', '.join(KSHOT_MODES)}, got {kshot!r}")
        if int(instances) < 1 or int(train_steps) < 0 or lr <= 0 or (min_cover is not None and not 0 < min_cover <= 1):
            raise ConfigError("persam: instances >= 1, train_steps >= 0, lr > 0 and 0 < min_cover <= 1 are required")
        if min_similarity is not None and not -1 <= float(min_similarity) <= 1:
            raise ConfigError(f"persam: min_similarity is a cosine similarity in [-1, 1], got {min_similarity}")
        if min_score is not None and not math.isfinite(float(min_score)):
            raise ConfigError(f"persam: min_score must be a finite number (SAM's predicted IoU), got {min_score}")
        self.dtype_name = dtype if isinstance(dtype, str) else next(k for k, v in _DTYPES.items() if v == dtype)
        if self.dtype_name not in _DTYPES:
            raise ConfigError(f"persam: dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        self.dtype = _DTYPES[self.dtype_name]
        self.device = torch.device(device)
        self.model = model.to(self.device, self.dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        cfg = self.model.config
        self.input_size = int(cfg.vision_config.image_size)
        self.grid = int(cfg.prompt_encoder_config.image_embedding_size)
        self.reference = reference
        self.official = reference == "official"
        self.image_processor = image_processor if image_processor is not None \
            else default_image_processor(self.input_size, pil=self.official)
        self.checkpoint = checkpoint
        self.variant = variant
        self.kshot = kshot
        self.combines = "output" if kshot == "output" else "model"
        self.refine = bool(refine)
        self.instances = int(instances)
        self.instance_threshold = float(instance_threshold)
        self.min_similarity = None if min_similarity is None else float(min_similarity)
        self.min_score = None if min_score is None else float(min_score)
        self.train_steps = int(train_steps)
        self.lr = float(lr)
        self.min_cover = None if min_cover is None else float(min_cover)
        self.cache_bytes = int(cache_bytes)
        mean, std = getattr(self.image_processor, "image_mean", None), getattr(self.image_processor, "image_std", None)
        #: red-channel normalisation the official reference-mask rule applies to the 0/255 mask
        self._mask_norm = (float(mean[0]) if mean is not None else 0.485, float(std[0]) if std is not None else 0.229)
        #: learned PerSAM-F weights (3,) per "reference key#class" (state: see learned_state)
        self.mask_weights: dict[str, torch.Tensor] = {}
        self._images = TensorLRU(self.cache_bytes)
        self._targets: dict[tuple[str, int], dict[int, Target]] = {}
        #: image-encoder runs (cache misses), for tests and benchmarks
        self.encoder_calls = 0
        #: mask-decoder runs
        self.decoder_calls = 0
        #: PerSAM-F trainings run (references whose weights were not known)
        self.trainings = 0

    def modules(self) -> list[torch.nn.Module]:
        return [self.model]

    # --- construction ----------------------------------------------------------------------------------
    @classmethod
    def option_names(cls) -> frozenset[str]:
        """Options a config may carry (the constructor's keywords but the model objects)."""
        params = inspect.signature(cls.__init__).parameters
        return frozenset(params) - {"self", "model", "image_processor", "checkpoint"}

    @classmethod
    def from_pretrained(cls, name_or_local_dir: str | Path, device: str = "cpu", dtype: str = "float32",
                        **options: Any) -> "PerSAMBackend":
        """Load SamModel (+ SamProcessor) from a local folder or a model id; CheckpointError if it is missing."""
        from transformers import SamModel

        unknown = set(options) - cls.option_names()
        if "mask_weights" in unknown:
            raise ConfigError("persam: mask_weights is not an option: PerSAM-F's learned weights are learned state "
                              "(saved as safetensors beside prompt.json), not configuration")
        if unknown:
            raise ConfigError(f"persam: unknown option(s) {', '.join(sorted(unknown))}; "
                              f"known: {', '.join(sorted(cls.option_names()))}")
        name = str(name_or_local_dir)
        path = Path(name).expanduser()
        if path.exists():
            if not path.is_dir():
                raise CheckpointError(f"{path}: SAM checkpoint must be a folder saved by transformers, not a file")
            if not (path / "config.json").is_file():
                raise CheckpointError(f"{path}: no config.json; not a transformers SAM checkpoint folder")
            source = str(path)
        elif _looks_like_path(name):
            raise CheckpointError(f"{name}: SAM checkpoint folder not found")
        else:
            source = name
        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(source)
        except (OSError, ValueError) as exc:
            hint = " (offline: HF_HUB_OFFLINE is set and the model is not in the local cache)" \
                if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True") else ""
            raise CheckpointError(f"{name}: cannot load SAM checkpoint{hint}: {exc}".splitlines()[0]) from None
        if getattr(config, "model_type", None) != "sam":
            raise CheckpointError(f"{name}: model_type is {getattr(config, 'model_type', None)!r}, not 'sam'")
        try:
            model = SamModel.from_pretrained(source)
        except (OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{name}: cannot load SAM weights: {str(exc).splitlines()[0]}") from None
        pil = options.get("reference", "official") == "official"
        processor = _load_processor(source, int(config.vision_config.image_size), pil=pil)
        return cls(model=model, image_processor=processor, checkpoint=name, device=device, dtype=dtype, **options)

    def config(self) -> dict[str, Any]:
        """The options that rebuild this backend (fixed: predicting never changes it; no learned state)."""
        opts: dict[str, Any] = {
            "reference": self.reference, "variant": self.variant, "kshot": self.kshot, "refine": self.refine,
            "instances": self.instances, "instance_threshold": self.instance_threshold,
            "min_similarity": self.min_similarity, "min_score": self.min_score, "train_steps": self.train_steps,
            "lr": self.lr, "min_cover": self.min_cover, "dtype": self.dtype_name,
        }
        return {"name": self.name, "checkpoint": self.checkpoint, "options": opts}

    # --- learned state (PerSAM-F weights) ----------------------------------------------------------------
    def learned_state(self, prompt_keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """PerSAM-F's learned (3,) mixing weights of these references, one tensor per class.

        Named ``mask_weights/<reference key>#<class>``. Only weights already
        learned (by predicting with the reference) are returned; a reference
        never used has none, and a backend given the state trains it when it
        first meets it. Empty for ``variant="persam"``.
        """
        wanted = set(prompt_keys)
        return {WEIGHTS_PREFIX + k: v.detach().cpu().clone() for k, v in sorted(self.mask_weights.items())
                if k.rpartition("#")[0] in wanted}

    def load_learned_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Take learned PerSAM-F weights (as :meth:`learned_state` names them) instead of training them."""
        if tensors and self.variant != "persam-f":
            raise ConfigError(f"persam: variant {self.variant!r} learns nothing, but learned tensors were given "
                              f"({', '.join(sorted(tensors)[:3])}); they belong to variant='persam-f'")
        loaded = {}
        for name, value in tensors.items():
            key, _, cls = name[len(WEIGHTS_PREFIX):].rpartition("#")
            if not name.startswith(WEIGHTS_PREFIX) or not key or not cls.isdigit():
                raise ConfigError(f"persam: learned tensor {name!r} is not named "
                                  f"{WEIGHTS_PREFIX}<reference key>#<class>")
            w = torch.as_tensor(value).detach().float().cpu()
            if w.shape != (3,) or not bool(torch.isfinite(w).all()):
                raise ConfigError(f"persam: learned tensor {name!r} must hold 3 finite mixing weights, "
                                  f"got shape {tuple(w.shape)}")
            loaded[name[len(WEIGHTS_PREFIX):]] = w.clone()
        self.mask_weights.update(loaded)

    # --- image embeddings ------------------------------------------------------------------------------
    def _encode(self, image: np.ndarray) -> ImageState:
        inputs = self.image_processor(images=image, return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, self.dtype)
        if tuple(pixels.shape[-2:]) != (self.input_size, self.input_size):
            raise CheckpointError(f"{self.checkpoint}: processor gives {tuple(pixels.shape[-2:])} px inputs, "
                                  f"the encoder takes {self.input_size}")
        with torch.no_grad():
            emb = self.model.get_image_embeddings(pixels)
        self.encoder_calls += 1
        reshaped = tuple(int(x) for x in inputs["reshaped_input_sizes"][0])
        return ImageState(emb, tuple(image.shape[:2]), reshaped)  # type: ignore[arg-type]

    def image_state(self, item: Sample | Context) -> ImageState:
        """Cached encoder output of a sample (computed on first use); contexts are encoded every time."""
        if isinstance(item, Context):
            img = (item.image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
            return self._encode(img)
        st = self._images.get(item.key)
        if st is None:
            st = self._encode(item.image)
            self._images.put(item.key, st)
        return st

    def prepare(self, samples: Sequence[Sample]) -> None:
        for s in samples:
            self.image_state(s)

    def clear_cache(self) -> None:
        self._images.clear()
        self._targets.clear()

    # --- references ------------------------------------------------------------------------------------
    def _prompt_mask(self, prompt: Prompt, num_classes: int | None = None) -> torch.Tensor:
        """(H, W) class ids (255 = ignore) of a prompt."""
        if isinstance(prompt, Sample):
            return torch.as_tensor(prompt.mask, device=self.device).long()
        if num_classes is not None and prompt.mask.shape[0] != num_classes:
            raise ConfigError(f"context has {prompt.mask.shape[0]} classes, the task has {num_classes}")
        m = prompt.mask.detach().to(self.device)
        return torch.where(m.sum(0) > 0.5, m.argmax(0), torch.full_like(m[0], IGNORE_INDEX, dtype=torch.long))

    def _target_cells(self, mask: torch.Tensor, st: ImageState) -> torch.Tensor:
        """(h, w) boolean feature cells of one class's (H, W) mask (see step 1 of the module docstring)."""
        grid = (self.grid, self.grid)
        if self.official and self.min_cover is None:
            inside = official.reference_cells(mask, st.reshaped, self.input_size, grid, *self._mask_norm)
            if bool(inside.any()):
                return inside
            return mask_to_grid(mask, st.reshaped, self.input_size, grid) > 0  # no rule there: touched cells
        area = mask_to_grid(mask, st.reshaped, self.input_size, grid)
        return covered_cells(area, 0.5 if self.min_cover is None else self.min_cover)

    def targets(self, prompt: Prompt, num_classes: int) -> dict[int, Target]:
        """Targets of each foreground class present in a reference (cached per sample)."""
        ck = (prompt.key, num_classes) if isinstance(prompt, Sample) else None
        if ck is not None and ck in self._targets:
            return self._targets[ck]
        st = self.image_state(prompt)
        feats = st.embedding[0].float()
        labels = self._prompt_mask(prompt, num_classes)
        out = {}
        for c in range(1, num_classes):
            m = labels == c
            if not bool(m.any()):
                continue
            inside = self._target_cells(m, st)
            if not bool(inside.any()):
                continue
            mean = feats[:, inside].mean(1)
            mean_max = self.official and self.variant == "persam-f"
            out[c] = Target(mean, official.mean_max_target(feats, inside) if mean_max else mean)
        if ck is not None:
            self._targets[ck] = out
        return out

    # --- geometry: the frame where points, boxes and masks live -------------------------------------------
    # official: the query's original pixels; transformers mode: the resized-input frame.
    def _dense_similarity(self, sim: torch.Tensor, st: ImageState) -> torch.Tensor:
        if self.official:
            return official.similarity_map(sim, self.input_size, st.reshaped, st.original)
        return upsample_similarity(sim, self.input_size, st.reshaped)

    def _frame_logits(self, logits: torch.Tensor, st: ImageState) -> torch.Tensor:
        """(..., 4h, 4w) low-res logits → the frame (SAM's post-processing, fully or its first half)."""
        if self.official:
            return official.postprocess_logits(logits, self.input_size, st.reshaped, st.original)
        up = F.interpolate(logits.reshape(1, -1, *logits.shape[-2:]), size=(self.input_size, self.input_size),
                           mode="bilinear", align_corners=False)
        return up[0, :, : st.reshaped[0], : st.reshaped[1]].reshape(*logits.shape[:-2], *st.reshaped)

    def _to_input(self, xy: tuple[float, float], st: ImageState) -> tuple[float, float]:
        return official.to_input_frame(xy, st.original, st.reshaped) if self.official else xy

    def _points(self, pick: torch.Tensor, dense: torch.Tensor,
                st: ImageState) -> tuple[tuple[float, float], tuple[float, float]]:
        """Positive and negative point, in the input frame SAM's prompt encoder takes."""
        pos, neg = official.extreme_points(pick, dense) if self.official else select_points(pick)
        return self._to_input(pos, st), self._to_input(neg, st)

    def _attention(self, sim: torch.Tensor, dense: torch.Tensor, st: ImageState) -> torch.Tensor:
        if self.official:
            return official.attention_similarity(dense, (self.grid, self.grid))
        return attention_bias(sim, self._valid_grid(st))

    def _box(self, logits: torch.Tensor, st: ImageState) -> list[float] | None:
        """Bounding box of the mask (logits > 0 in the frame), in the input frame."""
        box = mask_to_box(self._frame_logits(logits, st) > 0)
        if box is None:
            return None
        return [*self._to_input((box[0], box[1]), st), *self._to_input((box[2], box[3]), st)]

    def _probability(self, logits: torch.Tensor, st: ImageState) -> torch.Tensor:
        """Foreground probability of one mask: official, at the query's size; transformers mode, low-res crop."""
        if self.official:
            return torch.sigmoid(self._frame_logits(logits, st))
        crop = self._low_res_crop(st)
        return torch.sigmoid(logits[: crop[0], : crop[1]])

    def _probability_shape(self, st: ImageState) -> tuple[int, int]:
        return st.original if self.official else self._low_res_crop(st)

    def _low_res_crop(self, st: ImageState) -> tuple[int, int]:
        s = 4 * self.grid / self.input_size
        return max(1, int(math.ceil(st.reshaped[0] * s))), max(1, int(math.ceil(st.reshaped[1] * s)))

    def _valid_grid(self, st: ImageState) -> tuple[int, int]:
        s = self.grid / self.input_size
        return max(1, int(math.ceil(st.reshaped[0] * s))), max(1, int(math.ceil(st.reshaped[1] * s)))

    # --- decoder ---------------------------------------------------------------------------------------
    def decode(self, embedding: torch.Tensor, points: Sequence[tuple[float, float]], labels: Sequence[int],
               box: Sequence[float] | None = None, mask_input: torch.Tensor | None = None, multimask: bool = True,
               attention_similarity: torch.Tensor | None = None,
               target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One prompt-encoder + mask-decoder run → (logits (n, 4h, 4w) float, scores (n,) float).

        Points and box are in the resized-input frame (pixels of the padded
        ``input_size`` square); ``mask_input`` is (4h, 4w) low-res logits. In
        official mode the decoder runs with Personalize-SAM's semantics
        (:func:`~promptopt.backends.persam_official.official_decoder`).
        """
        dev, dt = self.device, self.dtype
        kwargs: dict[str, Any] = {
            "image_embeddings": embedding,
            "input_points": torch.tensor([[list(points)]], dtype=dt, device=dev),
            "input_labels": torch.tensor([[list(labels)]], dtype=torch.long, device=dev),
            "multimask_output": multimask,
        }
        if box is not None:
            kwargs["input_boxes"] = torch.tensor([[list(box)]], dtype=dt, device=dev)
        if mask_input is not None:
            kwargs["input_masks"] = mask_input.to(dev, dt)[None, None]
        if attention_similarity is not None:
            kwargs["attention_similarity"] = attention_similarity.to(dev, dt)
        if target is not None:
            kwargs["target_embedding"] = target.to(dev, dt).view(1, 1, -1)
        semantics = official.official_decoder(self.model.mask_decoder) if self.official else contextlib.nullcontext()
        with torch.no_grad(), semantics:
            out = self.model(**kwargs)
        self.decoder_calls += 1
        return out.pred_masks[0, 0].float(), out.iou_scores[0, 0].float()

    def segment(self, st: ImageState, sim: torch.Tensor, target: Target, weights: torch.Tensor | None = None,
                suppress: torch.Tensor | None = None, dense: torch.Tensor | None = None) -> Segmentation:
        """PerSAM (or, with ``weights``, PerSAM-F) on one query for one target.

        ``sim`` is the (h, w) grid similarity (``dense`` its map in the frame,
        computed when not given); ``suppress`` an optional boolean region of
        the frame excluded from the positive point (multi-instance). The score
        is SAM's predicted IoU of the returned mask (PerSAM-F without
        refinement: the weights' mix of the three scores).
        """
        dense = self._dense_similarity(sim, st) if dense is None else dense
        pick = dense if suppress is None else dense.masked_fill(suppress, float("-inf"))
        pos, neg = self._points(pick, dense, st)
        peak = float(pick.max())
        emb = st.embedding
        if weights is None:  # PerSAM: location prior + target-guided attention + target-semantic prompting
            pts, lab = [pos, neg], [1, 0]
            logits, scores = self.decode(emb, pts, lab, multimask=False, target=target.semantic,
                                         attention_similarity=self._attention(sim, dense, st))
            best, score = logits[0], float(scores[0])
            if not self.refine:
                return Segmentation(best, peak, score)
            logits, scores = self.decode(emb, pts, lab, mask_input=best, multimask=True)
            i = int(scores.argmax())
            best, score = logits[i], float(scores[i])
        else:  # PerSAM-F: positive point only, weighted multi-mask output
            pts, lab = [pos], [1]
            logits, scores = self.decode(emb, pts, lab, multimask=True)
            best, score = mix_masks(logits, weights), float((scores * weights.to(scores)).sum())
            if not self.refine:
                return Segmentation(best, peak, score)
        for _ in range(2 if weights is not None else 1):  # box refinement (PerSAM-F refines twice)
            box = self._box(best, st)
            if box is None:
                break
            logits, scores = self.decode(emb, pts, lab, box=box, mask_input=best, multimask=True)
            i = int(scores.argmax())
            best, score = logits[i], float(scores[i])
        return Segmentation(best, peak, score)

    def _confident(self, seg: Segmentation) -> bool:
        """Whether a mask passes the absent-object thresholds (always, when they are off)."""
        return (self.min_similarity is None or seg.peak >= self.min_similarity) and \
            (self.min_score is None or seg.score >= self.min_score)

    def foreground(self, st: ImageState, sim: torch.Tensor, target: Target,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
        """Foreground probability of one target on one query (all instances merged; zeros when absent)."""
        dense = self._dense_similarity(sim, st)
        seg = self.segment(st, sim, target, weights, dense=dense)
        if not self._confident(seg):
            return torch.zeros(self._probability_shape(st), device=self.device)
        prob = self._probability(seg.logits, st)
        covered = self._frame_logits(seg.logits, st) > 0
        for _ in range(self.instances - 1):
            if bool(covered.all()):
                break
            nxt = float(dense.masked_fill(covered, float("-inf")).max())
            if not math.isfinite(nxt) or nxt < self.instance_threshold * seg.peak:
                break
            more = self.segment(st, sim, target, weights, suppress=covered, dense=dense)
            if not self._confident(more):
                break
            prob = torch.maximum(prob, self._probability(more.logits, st))
            covered = covered | (self._frame_logits(more.logits, st) > 0)
        return prob

    # --- PerSAM-F ----------------------------------------------------------------------------------------
    def weights_for(self, prompt: Prompt, cls: int, target: Target) -> torch.Tensor:
        """PerSAM-F mixing weights of one reference and class: learned before, or trained now on the reference."""
        wkey = f"{prompt.key}#{cls}" if prompt.key is not None else None
        if wkey is not None and wkey in self.mask_weights:
            return self.mask_weights[wkey].to(self.device)
        weights, _ = self.train_reference(prompt, cls, target)
        if wkey is not None:
            self.mask_weights[wkey] = weights.detach().float().cpu()
        return weights

    def train_reference(self, prompt: Prompt, cls: int = 1,
                        target: Target | None = None) -> tuple[torch.Tensor, list[float]]:
        """Train PerSAM-F's weights on one reference (its own positive point, its own mask) → (weights, losses).

        Official: point from the (mean + max)/2 target at the reference's
        full resolution, loss on SAM's post-processed full-resolution logits
        against the full-resolution mask. transformers mode: mean target,
        SAM's low-res grid with the mask resized onto it.
        """
        st = self.image_state(prompt)
        labels = self._prompt_mask(prompt)
        if target is None:
            k = prompt.num_classes if isinstance(prompt, Context) else cls + 1
            found = self.targets(prompt, k)
            if cls not in found:
                raise ConfigError(f"reference {prompt.key}: class {cls} is not in its mask")
            target = found[cls]
        sim = location_confidence(target.location, st.embedding[0])
        dense = self._dense_similarity(sim, st)
        pos, _ = self._points(dense, dense, st)
        logits, _ = self.decode(st.embedding, [pos], [1], multimask=True)
        gt, valid = (labels == cls).float(), labels != IGNORE_INDEX
        if self.official:
            logits = self._frame_logits(logits, st)
        else:  # ground truth on the low-res grid, through the same resize + pad geometry as the image
            crop = self._low_res_crop(st)
            logits = logits[:, : crop[0], : crop[1]]
            geo = torch.stack([gt, valid.float()])[None]
            geo = F.interpolate(geo, size=st.reshaped, mode="bilinear", align_corners=False)
            geo = F.pad(geo, (0, self.input_size - st.reshaped[1], 0, self.input_size - st.reshaped[0]))
            geo = F.interpolate(geo, size=(4 * self.grid, 4 * self.grid), mode="area")[0, :, : crop[0], : crop[1]]
            valid = geo[1] > 0.5
            gt = (geo[0] / geo[1].clamp_min(1e-6)).clamp(0, 1)
        self.trainings += 1
        return fit_mask_weights(logits, gt, valid, self.train_steps, self.lr)

    # --- per-pair statistics (output-level combination) -------------------------------------------------
    def pair_stats(self, prompt: Prompt, query: Sample, num_classes: int) -> Stats:
        """Per-class foreground probability (K, h, w) of one reference on one query, and which classes it had."""
        st = self.image_state(query)
        k = num_classes - 1
        prob = torch.zeros((k, *self._probability_shape(st)), device=self.device)
        count = torch.zeros((k,), device=self.device)
        for c, target in self.targets(prompt, num_classes).items():
            weights = self.weights_for(prompt, c, target) if self.variant == "persam-f" else None
            sim = location_confidence(target.location, st.embedding[0])
            prob[c - 1] = self.foreground(st, sim, target, weights)
            count[c - 1] = 1
        return {"sum": prob, "count": count}

    def merge_stats(self, a: Stats, b: Stats) -> Stats:
        return {"sum": a["sum"] + b["sum"], "count": a["count"] + b["count"]}

    def finalize(self, stats: Stats, query: Sample) -> torch.Tensor:
        fg = stats["sum"] / stats["count"].clamp_min(1).view(-1, 1, 1)
        return self._class_probs(fg, query.size)

    def _class_probs(self, fg: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(K, h, w) foreground probabilities → (K+1, H, W) class probabilities (see the module docstring)."""
        if fg.shape[0] == 0:
            return torch.ones((1, *size), device=fg.device)
        if tuple(fg.shape[-2:]) != tuple(size):
            fg = F.interpolate(fg[None], size=size, mode="bilinear", align_corners=False)[0]
        fg = fg.clamp(0, 1)
        bg = 1 - fg.max(0, keepdim=True).values
        probs = torch.cat([bg, fg])
        return probs / probs.sum(0, keepdim=True).clamp_min(1e-6)

    # --- prediction --------------------------------------------------------------------------------------
    def predict(self, prompts: Sequence[Prompt], queries: Sequence[Sample], num_classes: int | None = None) -> list[torch.Tensor]:
        """Per query, (C, H, W) class probabilities at the query's resolution."""
        if not prompts:
            raise ConfigError("a prediction needs at least one prompt")
        k = num_classes or infer_num_classes(prompts)
        if self.kshot == "output":
            return self.predict_from_pairs(prompts, queries, k)
        per_class: dict[int, list[tuple[Prompt, Target]]] = {}
        for p in prompts:
            for c, target in self.targets(p, k).items():
                per_class.setdefault(c, []).append((p, target))
        out = []
        for q in queries:
            st = self.image_state(q)
            fg = torch.zeros((k - 1, *self._probability_shape(st)), device=self.device)
            for c, refs in per_class.items():
                target = Target(combine_targets([t.semantic for _, t in refs]),
                                combine_targets([t.location for _, t in refs]))
                if self.kshot == "max":
                    sim = torch.stack([location_confidence(t.location, st.embedding[0]) for _, t in refs]).amax(0)
                else:
                    sim = location_confidence(target.location, st.embedding[0])
                weights = None
                if self.variant == "persam-f":
                    weights = torch.stack([self.weights_for(p, c, t) for p, t in refs]).mean(0)
                fg[c - 1] = self.foreground(st, sim, target, weights)
            out.append(self._class_probs(fg, q.size))
        return out

    # --- memory ------------------------------------------------------------------------------------------
    @property
    def memory_kind(self) -> str:
        return "profiled" if self.device.type == "cuda" else "analytic estimate"

    def memory_bytes(self, num_prompts: int, image_size: tuple[int, int] | None = None, num_classes: int = 2) -> int:
        """Peak device memory of one prediction with ``num_prompts`` references, an image being encoded.

        The embedding cache counts at its cap (``cache_bytes``), so the figure does not
        depend on what happened to be cached. On CUDA the exact call (``num_prompts``
        references and one query of ``image_size``, embeddings not cached) is profiled
        once per device, dtype, mode, size and k (:class:`~promptopt.memory.CudaPeakProfiler`);
        elsewhere the analytic :func:`~promptopt.backends.memory_models.persam_memory` (cold).
        """
        from .memory_models import persam_memory

        hw = tuple(image_size or (self.input_size, self.input_size))
        k = max(1, int(num_prompts))
        if self.device.type == "cuda":
            return self._profiled_peak(k, hw)
        return persam_memory(self.model, dtype=self.dtype, k=k, image_size_hw=hw, cached=False,
                             num_classes=num_classes, resident_bytes=self.cache_bytes).total

    def _profiled_peak(self, k: int, image_size: tuple[int, int], measure: Any = None) -> int:
        """Weights + embedding cache at its cap + the measured increment of the exact call."""
        from ..memory import CudaPeakProfiler, ProfileKey

        if getattr(self, "_profiler", None) is None or measure is not None:
            kw = {"measure": measure} if measure is not None else {}
            weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
            self._profiler = CudaPeakProfiler(resident=lambda _device: weights + self.cache_bytes, **kw)
        mode = (self.reference, self.variant, self.kshot, f"refine={self.refine}", f"instances={self.instances}")
        key = ProfileKey.of(self.device, self.dtype_name, image_size, mode, k)
        return self._profiler.peak_bytes(key, lambda: self._exact_call(k, image_size))

    def _exact_call(self, k: int, image_size: tuple[int, int]) -> None:
        """``predict`` of k references on one query of ``image_size``, none of them cached (then forgotten)."""
        h, w = image_size
        rng = np.random.default_rng(0)
        mask = np.zeros((h, w), dtype=np.int64)
        mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 1
        samples = [Sample(f"__profile_{i}", "__profile", image=rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
                          mask=mask) for i in range(k + 1)]
        counters = (self.encoder_calls, self.decoder_calls, self.trainings)
        try:
            self.predict(samples[:k], samples[k:], 2)
        finally:
            for smp in samples:
                self._images.pop(smp.key)
            self._targets = {key: v for key, v in self._targets.items() if not str(key[0]).startswith("__profile")}
            self.mask_weights = {key: v for key, v in self.mask_weights.items() if not key.startswith("__profile")}
            self.encoder_calls, self.decoder_calls, self.trainings = counters
