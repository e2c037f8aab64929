"""Grounded SAM: Grounding DINO finds boxes for a text prompt, SAM turns the boxes into masks.

Why it exists: "Lang SAM" / Grounded-Segment-Anything (IDEA-Research) is the
blog's text-driven family — SAM cannot read text, so an open-vocabulary
detector (Grounding DINO, ``IDEA-Research/grounding-dino-tiny``) proposes the
boxes and SAM (``facebook/sam-vit-base``, ``-large``, ``-huge``) segments inside
each. Both run through transformers (``GroundingDinoForObjectDetection``,
``SamModel``). It takes text prompts only (``prompt_types = {"text"}``).

The pipeline for one (text prompt, image) pair, following
``grounded_sam_demo.py`` of Grounded-Segment-Anything:

1. The caption: the phrases lower-cased and stripped, joined with " . " and
   ending with " ." — ``"car . lamp ."``; Grounding DINO separates phrases at
   "." (its text self-attention is blocked across them), so a phrase may not
   contain "." or "?" (the model's other separator).
2. Detection (:meth:`GroundedSAMBackend.detect`, cached per (image, caption)):
   the checkpoint's ``GroundingDinoProcessor`` prepares image and caption;
   per query box, the token probabilities are ``sigmoid(logits)``. As in
   GroundingDINO's ``predict``, a box is kept when its best token probability
   exceeds ``box_threshold``. Its class is the phrase holding its most probable
   phrase token (the segment of the caption between separators, as
   transformers' label maps and GroundingDINO's ``remove_combined`` define it),
   and that probability must exceed ``text_threshold`` — a box whose phrase
   tokens are all below it has no phrase and is dropped (the demo would still
   draw it, unlabelled; a semantic map cannot). Boxes are converted from
   normalised (cx, cy, w, h) to pixels as the demo does. The defaults
   ``box_threshold=0.3``, ``text_threshold=0.25`` are the demo's. The cache
   holds the raw probabilities, so changing thresholds never re-runs the detector.
3. Masks (:meth:`GroundedSAMBackend.box_masks`): SAM's image embedding is
   computed once per image and cached (segment-anything's ``set_image``); each
   box, rescaled into SAM's resized-input frame, is one box prompt with
   ``multimask_output=False`` (as the demo); the low-resolution logits are
   post-processed by ``SamProcessor.post_process_masks`` (upscale, crop the
   padding, resize to the image) and turned into ``sigmoid`` probabilities.
4. Union: per class, the per-pixel maximum over its boxes — at 0.5 exactly the
   union of SAM's masks. No box → probability 0 (background). With
   ``clip_to_boxes=True`` each box's mask is cut to its box (the demo does not;
   it removes SAM's leakage beyond the detection).

Class probabilities follow :func:`~promptopt.backends.foreground.class_probabilities`
(background = 1 − max over classes, normalised; binary: the union mask).
Several text prompts in one set average their per-class probabilities
(``combines = "output"``: the oracle caches each (text prompt, image) pair);
that is a vote, not a union.

Checkpoints (decided here): ``GroundedSAMBackend.from_pretrained(DIR)`` reads
one folder with two sub-folders, ``DIR/detector`` (a Grounding DINO checkpoint
with its processor) and ``DIR/sam`` (a SAM checkpoint; its ``SamProcessor`` is
used when present, else SAM's standard preprocessing built from the config).
``from_pretrained(detector=..., sam=...)`` or the constructor with
``detector=`` / ``sam=`` (model ids in the local cache or folders; loaded
models also work) pick the parts separately; either override also applies on
top of ``DIR``. So the registry builds it either way:
``create_backend("grounded-sam", DIR, options)`` or
``create_backend("grounded-sam", None, {"detector": ..., "sam": ...})``.
Nothing is downloaded.

Honest limits: no Grounding DINO or SAM weights can be downloaded here, so
the backend is verified on tiny random-init models only (mechanics: parity of
each step with direct transformers calls, not accuracy). It is not
differentiable (boxes are thresholded), so context tuning does not apply.
:meth:`GroundedSAMBackend.memory_bytes` is an analytic estimate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..data import Sample
from ..errors import CheckpointError, ConfigError
from ..space import Float
from .base import Backend, Prompt, Stats, TextPrompt, infer_num_classes
from .cache import TensorLRU
from .checkpoints import check_options, load_config, load_part, locate, resolve_dtype
from .foreground import class_probabilities

RELEASED_DETECTOR = "IDEA-Research/grounding-dino-tiny"
RELEASED_SAM = "facebook/sam-vit-base"
# Grounding DINO's phrase separators: bert-base-uncased ids of [CLS], [SEP], "." and "?" (the model's SPECIAL_TOKENS)
_SEPARATOR_IDS = (101, 102, 1012, 1029)


def caption(texts: Sequence[str]) -> str:
    """The detector's caption for per-class phrases: lower-case, joined by " . ", ending with " ." """
    for t in texts:
        if "." in t or "?" in t:
            raise ConfigError(f"grounded-sam: phrase {t!r} contains '.' or '?', which Grounding DINO reads as a "
                              "separator between classes; write the phrase without it")
    return " . ".join(t.strip().lower() for t in texts) + " ."


def phrase_ids(input_ids: torch.Tensor, separators: torch.Tensor) -> torch.Tensor:
    """(T,) phrase number of each token (1 = first phrase), 0 for separators and padding.

    A phrase is a run of tokens between separators, as Grounding DINO's text
    attention masks and transformers' label maps split the caption.
    """
    sep = torch.isin(input_ids, separators) | (input_ids == 0)
    return torch.where(sep, torch.zeros_like(input_ids), torch.cumsum(sep.long(), 0))


@dataclass
class Detection:
    """Threshold-free detector output on one image for one caption (kept in the cache)."""

    scores: torch.Tensor  # (Q,) best token probability of each query box
    class_scores: torch.Tensor  # (Q, K) best token probability within each class's phrase
    boxes: torch.Tensor  # (Q, 4) x0, y0, x1, y1 in image pixels

    def select(self, box_threshold: float, text_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(boxes (n, 4), classes (n,) in 1..K) of the boxes kept (see step 2 of the module docstring)."""
        best, cls = self.class_scores.max(1)
        keep = (self.scores > box_threshold) & (best > text_threshold)
        return self.boxes[keep], cls[keep] + 1


class GroundedSAMBackend(Backend):
    """Grounding DINO boxes → SAM masks (see the module docstring)."""

    name = "grounded-sam"
    combines = "output"
    prompt_types = frozenset({"text"})
    #: a search may move both detection thresholds around the demo's 0.3 / 0.25 (a backend made by
    #: :meth:`with_options` shares the raw detections, so moving a threshold there runs no model)
    search_space = (Float("box_threshold", 0.1, 0.6), Float("text_threshold", 0.1, 0.6))

    def __init__(
        self,
        detector: Any = None,
        sam: Any = None,
        *,
        detector_processor: Any = None,
        sam_processor: Any = None,
        checkpoint: str | None = None,
        box_threshold: float = 0.3,
        text_threshold: float = 0.25,
        clip_to_boxes: bool = False,
        box_batch: int = 16,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
        cache_bytes: int = 2 << 30,
    ) -> None:
        if detector is None or sam is None:
            raise ConfigError(
                "the grounded-sam backend needs two checkpoints: --checkpoint DIR (with DIR/detector and DIR/sam) or "
                f"--option detector=... --option sam=... (local copies of {RELEASED_DETECTOR} and {RELEASED_SAM}; "
                "nothing is downloaded here)")
        for name, v in (("box_threshold", box_threshold), ("text_threshold", text_threshold)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) < 1.0:
                raise ConfigError(f"grounded-sam: {name} must be a number in [0, 1), got {v!r}")
        if not isinstance(clip_to_boxes, bool):
            raise ConfigError(f"grounded-sam: clip_to_boxes must be true or false, got {clip_to_boxes!r}")
        if isinstance(box_batch, bool) or not isinstance(box_batch, int) or box_batch < 1:
            raise ConfigError(f"grounded-sam: box_batch must be an integer >= 1, got {box_batch!r}")
        self.device = torch.device(device)
        self.dtype_name, self.dtype = resolve_dtype(dtype, self.device, self.name)
        self.checkpoint = checkpoint
        if isinstance(detector, (str, os.PathLike)):
            self.detector_ref, detector, detector_processor = self._load_detector(detector, detector_processor)
        else:
            self.detector_ref = getattr(detector, "name_or_path", None)
        if isinstance(sam, (str, os.PathLike)):
            self.sam_ref, sam, sam_processor = self._load_sam(sam, sam_processor)
        else:
            self.sam_ref = getattr(sam, "name_or_path", None)
        if detector_processor is None:
            raise CheckpointError("grounded-sam: the detector needs its GroundingDinoProcessor (tokenizer + image "
                                  "processor); save it next to the model")
        self.detector = detector.to(self.device, self.dtype).eval()
        self.sam = sam.to(self.device, self.dtype).eval()
        for p in (*self.detector.parameters(), *self.sam.parameters()):
            p.requires_grad_(False)
        self.detector_processor = detector_processor
        self.sam_input_size = int(self.sam.config.vision_config.image_size)
        self.sam_processor = sam_processor if sam_processor is not None else default_sam_processor(self.sam_input_size)
        self.box_threshold = float(box_threshold)
        self.text_threshold = float(text_threshold)
        self.clip_to_boxes = bool(clip_to_boxes)
        self.box_batch = int(box_batch)
        self.cache_bytes = int(cache_bytes)
        special = getattr(getattr(self.detector, "model", None), "special_tokens", None)
        self._separators = (special.to(self.device) if isinstance(special, torch.Tensor)
                            else torch.tensor(_SEPARATOR_IDS, device=self.device))
        #: SAM embeddings per image (bounded by ``cache_bytes``) and raw detections per (image, caption);
        #: shared with the backends :meth:`with_options` makes
        self._embeddings = TensorLRU(cache_bytes)
        self._detections: dict[tuple[str, str], Detection] = {}
        #: model runs (cache misses), for tests and benchmarks
        self.detector_calls = 0
        self.encoder_calls = 0
        self.decoder_calls = 0

    # --- construction ------------------------------------------------------------------------------
    def _load_detector(self, name: str | os.PathLike, processor: Any) -> tuple[str, Any, Any]:
        from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor

        what = "grounded-sam detector checkpoint"
        source, ref = locate(name, what, RELEASED_DETECTOR)
        load_config(source, what, "grounding-dino", RELEASED_DETECTOR)
        model = load_part(GroundingDinoForObjectDetection, source, what, dtype=self.dtype)
        if processor is None:
            processor = load_part(GroundingDinoProcessor, source, f"{what}'s processor (tokenizer + image processor)")
        return ref, model, processor

    def _load_sam(self, name: str | os.PathLike, processor: Any) -> tuple[str, Any, Any]:
        from transformers import SamModel, SamProcessor

        what = "grounded-sam SAM checkpoint"
        source, ref = locate(name, what, RELEASED_SAM)
        config = load_config(source, what, "sam", RELEASED_SAM)
        model = load_part(SamModel, source, what, dtype=self.dtype)
        if processor is None:
            try:
                processor = SamProcessor.from_pretrained(source, local_files_only=True)
            except (OSError, ValueError, TypeError):
                processor = None  # SAM's standard preprocessing (built in __init__)
        size = int(config.vision_config.image_size)
        pad = getattr(getattr(processor, "image_processor", None), "pad_size", None)
        if pad is not None and int(pad["height"]) != size:
            raise CheckpointError(f"{what} {source}: its processor pads to {pad['height']} px, the encoder takes {size}")
        return ref, model, processor

    @classmethod
    def from_pretrained(cls, name_or_local_dir: str | os.PathLike | None = None, *, detector: Any = None,
                        sam: Any = None, **options: Any) -> "GroundedSAMBackend":
        """Load both parts: ``DIR/detector`` and ``DIR/sam``, or ``detector=`` / ``sam=`` (which override ``DIR``'s)."""
        check_options(cls, options, cls.name,
                      reserved=("detector", "sam", "detector_processor", "sam_processor", "checkpoint"))
        ref = None
        if name_or_local_dir is not None:
            root = Path(name_or_local_dir).expanduser()
            if not root.is_dir():
                raise CheckpointError(f"grounded-sam checkpoint folder {root} not found; it must hold detector/ "
                                      f"(a copy of {RELEASED_DETECTOR}) and sam/ (a copy of {RELEASED_SAM})")
            for part, given in (("detector", detector), ("sam", sam)):
                if given is None and not (root / part).is_dir():
                    raise CheckpointError(f"grounded-sam checkpoint folder {root} has no {part}/ sub-folder "
                                          f"(expected {root / part}); or pass --option {part}=...")
            detector = detector if detector is not None else root / "detector"
            sam = sam if sam is not None else root / "sam"
            ref = str(root.resolve())
        return cls(detector, sam, checkpoint=ref, **options)

    def options(self) -> dict[str, Any]:
        """The options :meth:`config` records (thresholds, mask clipping, dtype)."""
        return {"box_threshold": self.box_threshold, "text_threshold": self.text_threshold,
                "clip_to_boxes": self.clip_to_boxes, "box_batch": self.box_batch, "dtype": self.dtype_name}

    def config(self) -> dict[str, Any]:
        opts = self.options()
        if self.checkpoint is None:
            opts.update(detector=self.detector_ref, sam=self.sam_ref)
        return {"name": self.name, "checkpoint": self.checkpoint, "options": opts}

    def with_options(self, **changes: Any) -> "GroundedSAMBackend":
        """The same models with other thresholds / clipping / box batch, sharing this backend's caches.

        SAM embeddings and detections do not depend on these options, so a
        threshold search pays for each image and caption once. Device and
        dtype cannot change here: that would move models this backend holds.
        """
        allowed = {"box_threshold", "text_threshold", "clip_to_boxes", "box_batch"}
        if set(changes) - allowed:
            raise ConfigError(f"grounded-sam: with_options changes only {sorted(allowed)}, got {sorted(changes)}")
        opts = {**self.options(), **changes}
        twin = type(self)(self.detector, self.sam, detector_processor=self.detector_processor,
                          sam_processor=self.sam_processor, checkpoint=self.checkpoint, device=self.device,
                          cache_bytes=self.cache_bytes, **opts)
        twin.detector_ref, twin.sam_ref = self.detector_ref, self.sam_ref
        twin._embeddings, twin._detections = self._embeddings, self._detections
        return twin

    # --- SAM image embeddings ----------------------------------------------------------------------
    def embedding(self, image: Sample) -> tuple[torch.Tensor, tuple[int, int]]:
        """(SAM image embedding (1, D, h, w), reshaped input size) of an image, computed once per image key."""
        hit = self._embeddings.get(image.key)
        if hit is not None:
            return hit
        inputs = self.sam_processor(images=image.image, return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, self.dtype)
        with torch.no_grad():
            emb = self.sam.get_image_embeddings(pixels)
        self.encoder_calls += 1
        entry = (emb, tuple(int(x) for x in inputs["reshaped_input_sizes"][0]))
        self._embeddings.put(image.key, entry)
        return entry  # type: ignore[return-value]

    def prepare(self, samples: Sequence[Sample]) -> None:
        """Compute SAM's image embedding of every image once (the detector runs per caption, on first use)."""
        for s in samples:
            self.embedding(s)

    def clear_cache(self) -> None:
        self._embeddings.clear()
        self._detections.clear()

    # --- detection ---------------------------------------------------------------------------------
    def detect(self, image: Sample, prompt: TextPrompt) -> Detection:
        """Grounding DINO's threshold-free output for the prompt's caption on an image (cached)."""
        text = caption(prompt.texts)
        key = (image.key, text)
        hit = self._detections.get(key)
        if hit is not None:
            return hit
        inputs = self.detector_processor(images=image.image, text=text, return_tensors="pt")
        ids = inputs["input_ids"][0].to(self.device)
        max_len = int(self.detector.config.max_text_len)
        if ids.shape[0] > max_len:
            raise ConfigError(f"grounded-sam: the caption {text[:60]!r} is {ids.shape[0]} tokens; Grounding DINO "
                              f"reads at most {max_len}")
        phrases = phrase_ids(ids, self._separators)
        k = len(prompt.texts)
        if int(phrases.max()) != k or len(set(phrases[phrases > 0].tolist())) != k:
            raise ConfigError(f"grounded-sam: the caption {text!r} does not split into {k} phrase(s) for the "
                              "detector's tokenizer (a phrase made only of punctuation?)")
        inputs = {n: (t.to(self.device, self.dtype) if t.is_floating_point() else t.to(self.device))
                  for n, t in inputs.items()}
        with torch.no_grad():
            out = self.detector(**inputs)
        self.detector_calls += 1
        probs = torch.sigmoid(out.logits[0].float())[:, : ids.shape[0]]  # (Q, T); -inf padding → 0
        class_scores = torch.stack([probs[:, phrases == c].max(1).values for c in range(1, k + 1)], 1)
        h, w = image.size
        cx, cy, bw, bh = out.pred_boxes[0].float().unbind(-1)
        boxes = torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], -1)
        det = Detection(scores=probs.max(1).values, class_scores=class_scores, boxes=boxes)
        self._detections[key] = det
        return det

    # --- masks -------------------------------------------------------------------------------------
    def box_masks(self, image: Sample, boxes: torch.Tensor) -> torch.Tensor:
        """(n, H, W) SAM foreground probabilities of box prompts (x0, y0, x1, y1 in image pixels) on an image."""
        emb, reshaped = self.embedding(image)
        h, w = image.size
        scale = torch.tensor([reshaped[1] / w, reshaped[0] / h] * 2, device=self.device)
        out = []
        for start in range(0, boxes.shape[0], self.box_batch):
            chunk = boxes[start:start + self.box_batch].to(self.device).float()
            with torch.no_grad():
                res = self.sam(image_embeddings=emb, input_boxes=(chunk * scale)[None].to(self.dtype),
                               multimask_output=False)
            self.decoder_calls += 1
            logits = self.sam_processor.post_process_masks(
                [res.pred_masks[0].float()], [(h, w)], [reshaped], binarize=False)[0][:, 0]
            probs = torch.sigmoid(logits.to(self.device))
            if self.clip_to_boxes:
                probs = probs * box_indicator(chunk, (h, w))
            out.append(probs)
        return torch.cat(out) if out else torch.zeros((0, h, w), device=self.device)

    def foreground(self, prompt: TextPrompt, image: Sample) -> torch.Tensor:
        """(K, H, W) per-class foreground probability: the union (max) of the class's box masks; 0 without boxes."""
        boxes, classes = self.detect(image, prompt).select(self.box_threshold, self.text_threshold)
        k = len(prompt.texts)
        fg = torch.zeros((k, *image.size), device=self.device)
        if boxes.shape[0]:
            masks = self.box_masks(image, boxes)
            for c in range(1, k + 1):
                sel = classes == c
                if bool(sel.any()):
                    fg[c - 1] = masks[sel].amax(0)
        return fg

    # --- output-level statistics -------------------------------------------------------------------
    def pair_stats(self, prompt: Prompt, query: Sample, num_classes: int) -> Stats:
        """Per-class foreground probability (K, H, W) at the image's resolution, and a count per class."""
        # only text prompts get here: check_prompts runs first (see Backend.__init_subclass__)
        if prompt.num_classes != num_classes:
            raise ConfigError(f"text prompt {list(prompt.texts)!r} names {len(prompt.texts)} class(es); the task has "
                              f"{num_classes - 1} foreground class(es): give one phrase per class")
        return {"sum": self.foreground(prompt, query), "count": torch.ones((num_classes - 1,), device=self.device)}

    def merge_stats(self, a: Stats, b: Stats) -> Stats:
        return {"sum": a["sum"] + b["sum"], "count": a["count"] + b["count"]}

    def finalize(self, stats: Stats, query: Sample) -> torch.Tensor:
        return class_probabilities(stats["sum"] / stats["count"].clamp_min(1).view(-1, 1, 1), query.size)

    def predict(self, prompts: Sequence[Prompt], queries: Sequence[Sample], num_classes: int | None = None) -> list[torch.Tensor]:
        """Per query, (C, H, W) class probabilities at its resolution (the merge of the pairs' statistics)."""
        return self.predict_from_pairs(prompts, queries, num_classes or infer_num_classes(prompts))

    # --- memory ------------------------------------------------------------------------------------
    def _detector_input(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(h, w) the detector's processor resizes an image of ``image_size`` to (shortest / longest edge rule)."""
        size = self.detector_processor.image_processor.size
        short = getattr(size, "shortest_edge", None) or 800
        long = getattr(size, "longest_edge", None) or 1333
        H, W = image_size
        s = short / min(H, W)
        if max(H, W) * s > long:
            s = long / max(H, W)
        return max(1, round(H * s)), max(1, round(W * s))

    def memory_bytes(self, num_prompts: int, image_size: tuple[int, int] | None = None, num_classes: int = 2) -> int:
        """Analytic estimate (not a measurement) of one prediction's peak device memory.

        Both models' weights; the larger of the detector's activations (Swin
        stage-1 maps and window attention, the multi-scale encoder tokens with
        their deformable-attention tensors and the vision-to-text attention
        against ``max_text_len`` tokens, the two-stage proposals' logits, the
        decoder's queries) and SAM's encoder activations (one layer; a global
        layer's attention counted four times over, in float32, as the eager
        implementation holds scores, relative-position term, sum and softmax
        together); the cached SAM embedding; one chunk of
        ``box_batch`` box masks at SAM's padded input size and at the image's;
        every prompt's statistics before the merge and the output probabilities.
        Sizes default to a 1024×1024 image; ``num_classes`` is the task's
        (background included).
        """
        elt = torch.finfo(self.dtype).bits // 8
        H, W = image_size or (1024, 1024)
        k = max(1, int(num_classes) - 1)
        weights = sum(p.numel() * p.element_size() for p in (*self.detector.parameters(), *self.sam.parameters()))
        dc = self.detector.config
        bc = dc.backbone_config
        h, w = self._detector_input((H, W))
        n1 = (h // 4 + 1) * (w // 4 + 1)
        c1, ws = int(getattr(bc, "embed_dim", 96)), int(getattr(bc, "window_size", 7))
        heads1 = int(getattr(bc, "num_heads", [3])[0])
        backbone = n1 * c1 * (4 + 6 + 2) * elt + heads1 * n1 * ws * ws * (2 * elt + 4)
        nv = int((h / 8 + 1) * (w / 8 + 1) * (1 + 1 / 4 + 1 / 16 + 1 / 64)) + 1
        d, t, q = int(dc.d_model), int(dc.max_text_len), int(dc.num_queries)
        lp = int(dc.num_feature_levels) * int(dc.encoder_n_points) * int(dc.encoder_attention_heads)
        # the vision-text fusion's attention (heads × Nv × T) is held in ~5 copies (scores, clamp, both softmaxes)
        encoder = nv * (d * 10 + int(dc.encoder_ffn_dim) * 2 + lp * 3) * elt \
            + 5 * int(dc.encoder_attention_heads) * nv * t * max(elt, 4) + nv * t * 4
        decoder = q * (d * 10 + int(dc.decoder_ffn_dim) * 2 + t * 2) * elt
        detector = backbone + encoder + decoder
        vc = self.sam.config.vision_config
        n = (self.sam_input_size // int(vc.patch_size)) ** 2
        # a global layer holds its scores, the decomposed relative-position term, their sum and the softmax
        sam_enc = elt * n * int(vc.hidden_size) * (6 + int(vc.mlp_ratio)) + 4 * int(vc.num_attention_heads) * n * n * 4
        grid = int(self.sam.config.prompt_encoder_config.image_embedding_size)
        embedding = elt * int(vc.output_channels) * grid * grid
        masks = self.box_batch * 4 * (self.sam_input_size ** 2 + 2 * H * W + (4 * grid) ** 2)
        stats = max(1, int(num_prompts)) * k * H * W * 4 + k * H * W * 4
        out = 4 * (k + 1) * H * W * 3
        return int(weights + max(detector, sam_enc) + embedding + masks + stats + out)


def box_indicator(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(n, H, W) 1 inside each box (x0, y0, x1, y1 in pixels; a pixel counts when its centre is inside), else 0."""
    h, w = size
    ys = torch.arange(h, device=boxes.device, dtype=torch.float32) + 0.5
    xs = torch.arange(w, device=boxes.device, dtype=torch.float32) + 0.5
    b = boxes.float()
    inside_y = (ys[None] >= b[:, 1:2]) & (ys[None] <= b[:, 3:4])
    inside_x = (xs[None] >= b[:, 0:1]) & (xs[None] <= b[:, 2:3])
    return (inside_y[:, :, None] & inside_x[:, None, :]).float()


def default_sam_processor(image_size: int):
    """SAM's preprocessing for an encoder of ``image_size`` px (longest side resized, normalised, padded square)."""
    from transformers import SamImageProcessor

    return SamImageProcessor(size={"longest_edge": image_size}, pad_size={"height": image_size, "width": image_size})


def tiny_detector_config(**overrides: Any):
    """A small random-init ``GroundingDinoConfig`` (Swin and BERT of a few channels) for tests."""
    from transformers import GroundingDinoConfig, SwinConfig

    swin = SwinConfig(window_size=7, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], image_size=64,
                      out_indices=[2, 3, 4])
    text = {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 8,
            "max_position_embeddings": 32, "vocab_size": 1100, "model_type": "bert"}
    kw: dict[str, Any] = dict(d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
                              decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, num_queries=6,
                              num_feature_levels=4, encoder_n_points=2, decoder_n_points=2, max_text_len=32,
                              use_timm_backbone=False, backbone_config=swin, text_config=text)
    kw.update(overrides)
    return GroundingDinoConfig(**kw)


def tiny_sam_config(image_size: int = 64):
    """A small random-init ``SamConfig`` (64 px input) for tests."""
    from transformers import SamConfig

    return SamConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=image_size,
                           patch_size=8, window_size=4, global_attn_indexes=[1], output_channels=32,
                           num_pos_feats=16, mlp_dim=64),
        prompt_encoder_config=dict(hidden_size=32, image_size=image_size, patch_size=8, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32),
    )


__all__ = ["Detection", "GroundedSAMBackend", "RELEASED_DETECTOR", "RELEASED_SAM", "box_indicator", "caption",
           "phrase_ids", "tiny_detector_config", "tiny_sam_config"]
