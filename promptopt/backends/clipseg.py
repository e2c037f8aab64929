"""CLIPSeg (``CIDAS/clipseg-rd64-refined``) as a text- and image-prompted segmenter, over transformers.

Why it exists: CLIPSeg (Lüddecke & Ecker, "Image Segmentation Using Text and
Image Prompts", CVPR 2022) is the end-to-end member of the blog's comparison:
one frozen CLIP ViT-B/16 encodes the query image, a condition vector (from a
phrase or from an example image) modulates a small decoder, and the decoder
paints a logit per pixel. It takes both prompt kinds, so the text-prompt search
and every image-prompt strategy (forward selection, retrieval, random) run on it.

Shaped like segment-anything's predictor: :meth:`CLIPSegBackend.prepare` runs
the CLIP vision encoder once per query image and keeps the activations the
decoder reads (the hidden states after ``config.extract_layers``); a (prompt,
query) pair then costs one condition vector (cached per phrase and per example
and class) and one decoder run. This split is transformers' own forward cut in
two (``get_image_features`` with the same hidden-state selection, then
``decoder``); a test checks it against ``CLIPSegForImageSegmentation(...)``.

Queries
    Preprocessed by the checkpoint's ``CLIPSegProcessor`` (352×352 for the
    released model, ImageNet normalisation); the logits come out at that size.

Text prompts (:class:`~promptopt.backends.base.TextPrompt`)
    One condition per class phrase: ``texts[c-1]`` names class c, tokenised by
    the checkpoint's CLIP tokenizer and encoded with ``get_text_features``
    exactly as ``CLIPSegForImageSegmentation`` does (phrases are used as given:
    no "a photo of a ..." template is added; writing one is a prompt choice).

Visual prompts (an example image with its mask)
    Prepared as the authors trained the released model: ``rd64-uni-refined`` in
    timojl/clipseg ``experiments/phrasecut.yaml`` uses ``mask:
    text_and_crop_blur_highlight352``, i.e. ``blend_image_segmentation(mode=
    "crop_blur_highlight352")`` (``datasets/utils.py``) →
    ``img_preprocess(blur=3, center_context=0.1, bg_fac=0.1, image_size=352)``
    (``evaluation_utils.py``). Step by step (:func:`visual_prompt`):

    1. the example is resized to the model's square input (bilinear,
       ``align_corners=True``; the mask nearest), scaled to [0, 1] and
       normalised, as ``datasets/phrasecut.py`` loads support images;
    2. a Gaussian blur (15×15 kernel, σ = 3, OpenCV's default reflect-101
       border) of the normalised image is computed;
    3. ``image * mask + 0.1 * blurred * (1 - mask)``: the object is kept, the
       background blurred and pulled to 10 % (towards the mean colour, since
       the image is normalised);
    4. the result is cropped to the mask's bounding box widened by 10 % of its
       width and height on each side, zero-padded to a square (centred) and
       resized back to the input size with nearest interpolation.

    The official ``crop_mask`` mixes up the axes' sizes for non-square images;
    it only ever sees square ones (step 1), and so does this code. An empty
    mask crops nothing (the official code's behaviour). The condition vector is
    ``get_image_features(...)`` of that image (``conditional_pixel_values``).
    Semantic tasks: one visual prompt per class present in the example's mask
    (its pixels of that class); ignored pixels (255) count as background. The
    recipe is written in torch, so a :class:`~promptopt.backends.base.Context`
    prompt is differentiable in its image and (soft) mask; its crop box is
    taken where the mask is above 1/2.

Probabilities and several prompts (``combines = "output"``)
    Each (prompt, class) gives a foreground probability ``sigmoid(logit)`` at
    the model's resolution. A prompt set averages, per class, the
    probabilities of the prompts that cover the class (pair statistics: sum and
    count, so the oracle caches every pair and scores any set by arithmetic);
    the average is resized to the query (bilinear) and turned into class
    probabilities by :func:`~promptopt.backends.foreground.class_probabilities`
    (background = 1 − max over classes, normalised; binary: sigmoid > 0.5).
    The option ``threshold`` moves that cut (a pixel is background unless its
    best class probability exceeds it; the authors report results at 0.3 and
    0.5); it acts after the cached statistics, and :meth:`CLIPSegBackend.with_options`
    shares the caches between thresholds. Text and image prompts may be mixed
    in one set; they average alike.

Honest limits: no CLIPSeg weights can be downloaded here, so this backend is
verified on tiny random-init models only (mechanics and parity with
transformers' forward, not accuracy). :meth:`CLIPSegBackend.memory_bytes` is an
analytic estimate, not a measurement.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..data import Sample
from ..errors import CheckpointError, ConfigError
from ..space import Float
from .base import Backend, Context, Prompt, Stats, TextPrompt, infer_num_classes, one_hot_mask
from .cache import TensorLRU
from .checkpoints import check_options, load_config, load_part, locate, resolve_dtype
from .foreground import class_probabilities

RELEASED_CHECKPOINT = "CIDAS/clipseg-rd64-refined"
# the released model's visual-prompt recipe (see the module docstring)
BLUR_KERNEL = 15
BLUR_SIGMA = 3.0
BACKGROUND_FACTOR = 0.1
CROP_CONTEXT = 0.1


# --- the visual-prompt recipe, one small function per step ------------------------------------------------

def gaussian_kernel(size: int = BLUR_KERNEL, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """(size,) normalised Gaussian weights, as OpenCV's ``getGaussianKernel(size, sigma)`` for sigma > 0."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return (k / k.sum()).float()


def gaussian_blur(x: torch.Tensor, size: int = BLUR_KERNEL, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """(C, H, W) → Gaussian-blurred (C, H, W): separable, reflect-101 border (OpenCV's ``GaussianBlur`` default).

    Images smaller than the kernel's radius use a kernel shortened to fit.
    """
    r = min((size - 1) // 2, x.shape[-2] - 1, x.shape[-1] - 1)
    if r <= 0:
        return x
    k = gaussian_kernel(size, sigma).to(x)
    k = k[(size - 1) // 2 - r:(size - 1) // 2 + r + 1]
    k = k / k.sum()
    c = x.shape[0]
    y = F.pad(x[None], (r, r, r, r), mode="reflect")  # torch "reflect" excludes the edge: OpenCV's REFLECT_101
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    y = F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return y[0]


def object_box(mask: torch.Tensor, context: float = CROP_CONTEXT) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the mask's bounding box, widened by ``context`` of its extent per side (official ``crop_mask``).

    An empty mask gives the whole image.
    """
    h, w = mask.shape
    rows, cols = mask.any(1), mask.any(0)
    if not bool(rows.any()):
        return 0, h, 0, w
    ys, xs = torch.nonzero(rows)[:, 0], torch.nonzero(cols)[:, 0]
    y0, y1 = int(ys[0]), int(ys[-1]) + 1
    x0, x1 = int(xs[0]), int(xs[-1]) + 1
    dy, dx = y1 - y0, x1 - x0
    return int(max(0, y0 - context * dy)), int(min(h, y1 + context * dy)), int(max(0, x0 - context * dx)), \
        int(min(w, x1 + context * dx))


def pad_to_square(x: torch.Tensor) -> torch.Tensor:
    """(C, h, w) → (C, s, s), s = max(h, w), zero padding split evenly (the extra pixel after), as the official code."""
    h, w = x.shape[-2:]
    if h > w:
        left = (h - w) // 2
        return F.pad(x, (left, h - w - left, 0, 0))
    if w > h:
        top = (w - h) // 2
        return F.pad(x, (0, 0, top, w - h - top))
    return x


def visual_prompt(image: torch.Tensor, mask: torch.Tensor, size: tuple[int, int], mean: torch.Tensor,
                  std: torch.Tensor) -> torch.Tensor:
    """An example (image (3, H, W) in [0, 1], mask (H, W) in [0, 1]) → (3, h, w) CLIPSeg visual prompt.

    The authors' ``crop_blur_highlight`` recipe; see the module docstring for the steps and their source.
    Differentiable in ``image`` and in ``mask``'s values (not in its crop box).
    """
    img = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=True)[0]
    m = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0]
    img = (img - mean.view(3, 1, 1)) / std.view(3, 1, 1)
    blended = img * m + BACKGROUND_FACTOR * gaussian_blur(img) * (1 - m)
    y0, y1, x0, x1 = object_box(m.detach() > 0.5)
    crop = pad_to_square(blended[:, y0:y1, x0:x1])
    return F.interpolate(crop[None], size=size, mode="nearest")[0]


# --- the backend ------------------------------------------------------------------------------------------

class CLIPSegBackend(Backend):
    """CLIPSeg over transformers (see the module docstring). Build it with :meth:`from_pretrained`."""

    name = "clipseg"
    combines = "output"
    prompt_types = frozenset({"text", "image"})
    #: a search may move the foreground cut (the authors report 0.3 and 0.5; the range brackets both)
    search_space = (Float("threshold", 0.1, 0.7),)

    def __init__(self, model: Any = None, processor: Any = None, *, checkpoint: str | None = None,
                 threshold: float = 0.5, device: str | torch.device = "cpu", dtype: str = "float32",
                 cache_bytes: int = 1 << 30) -> None:
        if model is None or processor is None:
            raise ConfigError(
                "the clipseg backend needs a checkpoint: pass --checkpoint DIR (or CLIPSegBackend.from_pretrained(DIR)), "
                f"a local copy of {RELEASED_CHECKPOINT} with its processor (nothing is downloaded here)")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
            raise ConfigError(f"clipseg: threshold must be a number in (0, 1), got {threshold!r}")
        self.threshold = float(threshold)
        self.device = torch.device(device)
        self.dtype_name, self.dtype = resolve_dtype(dtype, self.device, self.name)
        self.checkpoint = checkpoint
        self.cache_bytes = int(cache_bytes)
        self.model = model.to(self.device, self.dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.processor = processor
        ip = processor.image_processor
        size = ip.size
        h, w = getattr(size, "height", None), getattr(size, "width", None)
        if isinstance(size, dict):
            h, w = size.get("height"), size.get("width")
        if h is None or w is None or h != w:
            raise CheckpointError(f"{checkpoint}: the clipseg image processor must resize to a fixed square size "
                                  f"(CLIPSeg's decoder assumes a square patch grid); it has {size}")
        self.input_size: tuple[int, int] = (int(h), int(w))
        self._mean = torch.tensor(ip.image_mean, dtype=torch.float32, device=self.device)
        self._std = torch.tensor(ip.image_std, dtype=torch.float32, device=self.device)
        self.max_text_tokens = int(self.model.config.text_config.max_position_embeddings)
        #: per-image decoder inputs (bounded by ``cache_bytes``); condition vectors per phrase and per example
        self._activations = TensorLRU(cache_bytes)
        self._texts: dict[str, torch.Tensor] = {}
        self._visual: dict[tuple[str, int], dict[int, torch.Tensor]] = {}
        #: CLIP vision-encoder runs on queries (cache misses), decoder runs, and condition encodings (for tests)
        self.encoder_calls = 0
        self.decoder_calls = 0
        self.condition_calls = 0

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_local_dir: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: str = "float32", **options: Any) -> "CLIPSegBackend":
        """Load ``CLIPSegForImageSegmentation`` + ``CLIPSegProcessor`` from a local folder or the local cache.

        Nothing is downloaded. A missing folder or id, a folder without the
        processor's files, or one that holds another model type raises
        :class:`~promptopt.errors.CheckpointError` in one line.
        """
        from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

        check_options(cls, {**options, "device": device, "dtype": dtype}, cls.name,
                      reserved=("model", "processor", "checkpoint"))
        what = "clipseg checkpoint"
        source, ref = locate(name_or_local_dir, what, RELEASED_CHECKPOINT)
        load_config(source, what, "clipseg", RELEASED_CHECKPOINT)
        torch_dtype = resolve_dtype(dtype, torch.device(device), cls.name)[1]
        model = load_part(CLIPSegForImageSegmentation, source, what, dtype=torch_dtype)
        processor = load_part(CLIPSegProcessor, source, f"{what}'s processor (tokenizer + image processor)")
        return cls(model, processor, checkpoint=ref, device=device, dtype=dtype, **options)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "checkpoint": self.checkpoint,
                "options": {"threshold": self.threshold, "dtype": self.dtype_name}}

    def with_options(self, **changes: Any) -> "CLIPSegBackend":
        """The same model with another ``threshold``, sharing this backend's caches (a threshold search
        never re-encodes an image, phrase or example)."""
        if set(changes) - {"threshold"}:
            raise ConfigError(f"clipseg: with_options changes only the threshold, got {sorted(changes)}")
        twin = type(self)(self.model, self.processor, checkpoint=self.checkpoint,
                          threshold=changes.get("threshold", self.threshold), device=self.device,
                          dtype=self.dtype_name, cache_bytes=self.cache_bytes)
        twin._activations, twin._texts, twin._visual = self._activations, self._texts, self._visual
        return twin

    # --- queries -----------------------------------------------------------------------------------
    def query_pixels(self, query: Sample) -> torch.Tensor:
        """(1, 3, h, w) model input of a query image (the checkpoint's image processor)."""
        px = self.processor.image_processor(images=query.image, return_tensors="pt")["pixel_values"]
        return px.to(self.device, self.dtype)

    def activations(self, query: Sample) -> list[torch.Tensor]:
        """The hidden states the decoder reads, (1, T, D) after each of ``config.extract_layers`` (cached per image)."""
        hit = self._activations.get(query.key)
        if hit is not None:
            return hit
        layers = list(self.model.extract_layers)
        with torch.no_grad():
            out = self.model.clip.get_image_features(pixel_values=self.query_pixels(query),
                                                     output_hidden_states=[i + 1 for i in layers])
        acts = [out.hidden_states[i + 1] for i in layers]  # hidden_states[0] is the embedding output
        self.encoder_calls += 1
        self._activations.put(query.key, acts)
        return acts

    def prepare(self, samples: Sequence[Sample]) -> None:
        """Run the CLIP vision encoder once per image and keep the decoder's inputs."""
        for s in samples:
            self.activations(s)

    def clear_cache(self) -> None:
        self._activations.clear()
        self._texts.clear()
        self._visual.clear()

    # --- conditions --------------------------------------------------------------------------------
    def text_condition(self, phrase: str) -> torch.Tensor:
        """(P,) condition vector of a phrase (``get_text_features``; cached per phrase)."""
        hit = self._texts.get(phrase)
        if hit is not None:
            return hit
        tokens = self.processor.tokenizer([phrase], padding=True, return_tensors="pt")
        n = int(tokens["input_ids"].shape[1])
        if n > self.max_text_tokens:
            raise ConfigError(f"clipseg: the phrase {phrase[:40]!r} is {n} tokens; CLIP reads at most "
                              f"{self.max_text_tokens}")
        with torch.no_grad():
            emb = self.model.clip.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                    attention_mask=tokens["attention_mask"].to(self.device)).pooler_output
        self.condition_calls += 1
        self._texts[phrase] = emb[0]
        return emb[0]

    def _example(self, prompt: Sample | Context, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image (3, H, W) in [0, 1], masks (C, H, W)) of an image prompt on this backend's device."""
        if isinstance(prompt, Context):
            if prompt.mask.shape[0] != num_classes:
                raise ConfigError(f"context has {prompt.mask.shape[0]} classes, the task has {num_classes}")
            return prompt.image.to(self.device), prompt.mask.to(self.device)
        image = torch.from_numpy(prompt.image).to(self.device).permute(2, 0, 1).float().div_(255.0)
        return image, one_hot_mask(prompt.mask, num_classes, self.device)

    def visual_conditions(self, prompt: Sample | Context, num_classes: int) -> dict[int, torch.Tensor]:
        """Class → (P,) condition vector of the example's visual prompt for that class (the classes it shows).

        Cached per (example, class count) for labelled samples and for keyed
        contexts that do not require grad (tuned contexts are re-encoded).
        """
        frozen = not (isinstance(prompt, Context) and (prompt.image.requires_grad or prompt.mask.requires_grad))
        ck = (prompt.key, num_classes) if prompt.key is not None and frozen else None
        if ck is not None and ck in self._visual:
            return self._visual[ck]
        image, masks = self._example(prompt, num_classes)
        out: dict[int, torch.Tensor] = {}
        for c in range(1, num_classes):
            if bool((masks[c] > 0.5).any()):
                vp = visual_prompt(image, masks[c], self.input_size, self._mean, self._std)
                out[c] = self.model.clip.get_image_features(pixel_values=vp[None].to(self.dtype)).pooler_output[0]
                self.condition_calls += 1
        if ck is not None:
            self._visual[ck] = out
        return out

    def conditions(self, prompt: Prompt, num_classes: int) -> dict[int, torch.Tensor]:
        """Class → condition vector for every class the prompt speaks about."""
        if isinstance(prompt, TextPrompt):
            if prompt.num_classes != num_classes:
                raise ConfigError(f"text prompt {list(prompt.texts)!r} names {len(prompt.texts)} class(es); "
                                  f"the task has {num_classes - 1} foreground class(es): give one phrase per class")
            return {c: self.text_condition(t) for c, t in enumerate(prompt.texts, start=1)}
        return self.visual_conditions(prompt, num_classes)

    # --- decoding ----------------------------------------------------------------------------------
    def decode(self, query: Sample, conditions: torch.Tensor) -> torch.Tensor:
        """(N, P) condition vectors → (N, h, w) logits on the query (one decoder run, N rows)."""
        acts = [a.expand(conditions.shape[0], -1, -1) for a in self.activations(query)]
        logits = self.model.decoder(acts, conditions.to(self.dtype)).logits
        self.decoder_calls += 1
        return logits.view(conditions.shape[0], *logits.shape[-2:]).float()

    # --- output-level statistics -------------------------------------------------------------------
    def pair_stats(self, prompt: Prompt, query: Sample, num_classes: int) -> Stats:
        """Per-class foreground probability sum (K, h, w) at the model's resolution, and a count per class."""
        conds = self.conditions(prompt, num_classes)
        k = num_classes - 1
        count = torch.zeros((k,), device=self.device)
        if not conds:
            h, w = self._output_size()
            return {"sum": torch.zeros((k, h, w), device=self.device), "count": count}
        classes = sorted(conds)
        probs = torch.sigmoid(self.decode(query, torch.stack([conds[c] for c in classes])))
        fg = probs.new_zeros((k, *probs.shape[-2:]))
        idx = torch.tensor([c - 1 for c in classes], device=self.device)
        fg = fg.index_add(0, idx, probs)
        count[idx] = 1
        return {"sum": fg, "count": count}

    def _output_size(self) -> tuple[int, int]:
        """(h, w) of the decoder's logits: the patch grid times the transposed convolutions' upsampling."""
        cfg = self.model.config
        p = int(cfg.vision_config.patch_size)
        up = (p // 4) ** 2 if cfg.use_complex_transposed_convolution else p
        return self.input_size[0] // p * up, self.input_size[1] // p * up

    def merge_stats(self, a: Stats, b: Stats) -> Stats:
        return {"sum": a["sum"] + b["sum"], "count": a["count"] + b["count"]}

    def finalize(self, stats: Stats, query: Sample) -> torch.Tensor:
        fg = stats["sum"] / stats["count"].clamp_min(1).view(-1, 1, 1)
        return class_probabilities(fg, query.size, self.threshold)

    def predict(self, prompts: Sequence[Prompt], queries: Sequence[Sample], num_classes: int | None = None) -> list[torch.Tensor]:
        """Per query, (C, H, W) class probabilities at its resolution: the merge of the pairs' statistics."""
        return self.predict_from_pairs(prompts, queries, num_classes or infer_num_classes(prompts))

    # --- memory ------------------------------------------------------------------------------------
    def memory_bytes(self, num_prompts: int, image_size: tuple[int, int] | None = None, num_classes: int = 2) -> int:
        """Analytic estimate (not a measurement) of one prediction's peak device memory.

        Weights; one CLIP vision pass at the input size (every head's T×T
        attention scores and softmax, qkv, MLP and residual activations of one
        layer, the kept hidden states); the text encoder at its longest input;
        the decoder's rows for the task's classes (its layers at the reduced
        width and the transposed-convolution maps); the statistics of every
        prompt held before they are merged; and the output probabilities at
        ``image_size``. ``num_classes`` is the task's (background included).
        """
        cfg = self.model.config
        vc, tc = cfg.vision_config, cfg.text_config
        elt = torch.finfo(self.dtype).bits // 8
        k = max(1, int(num_classes) - 1)
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        p = int(vc.patch_size)
        tokens = (self.input_size[0] // p) * (self.input_size[1] // p) + 1
        d, heads, mlp = int(vc.hidden_size), int(vc.num_attention_heads), int(vc.intermediate_size)
        vision = tokens * d * (8 + len(cfg.extract_layers)) * elt + tokens * mlp * 2 * elt \
            + heads * tokens * tokens * (2 * elt + 4)
        lt, dt = self.max_text_tokens, int(tc.hidden_size)
        text = lt * dt * 8 * elt + lt * int(tc.intermediate_size) * 2 * elt \
            + int(tc.num_attention_heads) * lt * lt * (2 * elt + 4)
        r = int(cfg.reduce_dim)
        dec_heads = int(cfg.decoder_num_attention_heads)
        oh, ow = self._output_size()
        grid = tokens - 1
        decoder = k * (tokens * (r * 8 + int(cfg.decoder_intermediate_size) * 2) * elt
                       + dec_heads * tokens * tokens * (2 * elt + 4)
                       + (grid * r * 2 + (oh * ow // 4) * r + oh * ow * 2) * elt)
        stats = max(1, int(num_prompts)) * k * oh * ow * 4 + k * oh * ow * 4 * 2
        H, W = image_size or self.input_size
        out = 4 * (k + 1) * H * W * 3
        return int(weights + max(vision, text) + decoder + stats + out)


def tiny_config(**overrides: Any):
    """A small random-init ``CLIPSegConfig`` for tests: vision 48 px / patch 16 (run at 64 px, so the
    position embeddings are interpolated as the released model's are at 352 px), text vocabulary of 56."""
    from transformers import CLIPSegConfig

    kw: dict[str, Any] = dict(
        text_config=dict(vocab_size=56, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                           image_size=48, patch_size=16),
        projection_dim=16, extract_layers=[0, 1, 2], reduce_dim=16, decoder_num_attention_heads=2,
        decoder_intermediate_size=32, use_complex_transposed_convolution=True)
    kw.update(overrides)
    return CLIPSegConfig(**kw)


__all__ = ["CLIPSegBackend", "RELEASED_CHECKPOINT", "gaussian_blur", "gaussian_kernel", "object_box",
           "pad_to_square", "tiny_config", "visual_prompt"]
