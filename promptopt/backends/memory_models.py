"""Analytic peak-memory models of SegGPT and PerSAM, computed from a transformers config.

Why it exists: a memory budget is only useful if the figure compared with it is
not below what the GPU will really need. Profiling needs the GPU itself; these
models give the figure anywhere (a CPU machine planning a run, the test suite)
and are calibrated against peaks measured on an NVIDIA H100
(``tests/data/h100-2026-11-25.json``; ``torch.cuda.max_memory_allocated``,
weights included). Nothing here allocates weights: the only model ever built
is an empty one on the meta device, to count parameters.

How the models are built. For each computation we find the moment of the peak
by reading the model code (transformers' ``modeling_seggpt.py`` /
``modeling_sam.py`` and the backends), list every tensor alive at that moment
and add their sizes; each function documents its terms. What the op-level
reading cannot see is added as explicit, named CUDA terms: the cuBLAS/cuBLASLt
workspaces (:data:`CUDA_WORKSPACE_BYTES`), cuDNN's convolution-backward
workspace and one extra float32 attention-sized buffer during the recomputed
softmax backward. The sum is multiplied by ``1 + ANALYTIC_MARGIN`` for
allocator rounding (the caching allocator hands out whole blocks: a request can
be given up to 1 MiB more than asked) and small tensors left out. On the H100
file every SegGPT figure is 1.1–6.5 % above the measured peak (inference 1.1–4.0 %,
context tuning 3.2–6.5 %; the two out-of-memory rows come out at 109 and 125 GB),
and PerSAM's 1.4–8.6 % above the peaks of ``bench_persam``; the test suite checks
every row. The ``persam_predict`` rows hold memory PerSAM did not allocate (see
:func:`persam_memory`).

The lists of live tensors were checked with an op-level count on fake CUDA /
meta tensors (every storage created by an aten op, alive until its last
reference goes): through the backend it matches the measured per-row cost of
inference to 0.2 % (k = 1…4: 1 095.0 vs 1 096.6 MB per row in float32, 861.8
vs 861.6 in bfloat16), and the measured peaks sit 35–37 MB above it whatever k
(the workspace term below).

Every function returns a :class:`MemoryEstimate`; ``.total`` is the number to
compare with a budget, ``.terms`` the breakdown (bytes before the margin).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..errors import ConfigError

MiB = 1 << 20

#: Fixed buffers a CUDA process allocates through PyTorch's caching allocator on its first
#: matrix multiplication: the cuBLAS and cuBLASLt workspaces (32 MiB for cuBLAS on Hopper, plus
#: cuBLASLt's). On the H100 the measured SegGPT inference peaks exceed the tensors alive at the
#: peak by 35-37 MB whatever the row count; 40 MiB bounds it.
CUDA_WORKSPACE_BYTES = 40 * MiB

#: Relative headroom on every analytic figure: the caching allocator rounds requests up (to 512 B,
#: and a cached block at most 1 MiB larger than asked is handed out whole), tensors below a few MB
#: (LayerNorm statistics, index tensors, RNG state) are not listed term by term, and a caller may
#: hold memory it does not pass as ``resident_bytes``. The margin is load-bearing: without it the
#: H100 rows come out up to 1.8 % below their peaks (the inference rows were measured with 40-55 MB
#: of other preprocessed images cached; bench_persam's ViT-H float32 pair peak is 67 MB above
#: ViT-B's although the decoder is the same).
ANALYTIC_MARGIN = 0.03

_DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
_CANONICAL = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
ATTENTIONS = ("eager", "sdpa")
ENSEMBLES = ("feature", "output")


@dataclass(frozen=True)
class MemoryEstimate:
    """A peak-memory figure: named terms (bytes) and the relative margin applied to their sum."""

    terms: Mapping[str, int]
    margin: float = ANALYTIC_MARGIN
    note: str = ""

    @property
    def subtotal(self) -> int:
        """Sum of the terms, before the margin."""
        return int(sum(self.terms.values()))

    @property
    def total(self) -> int:
        """The figure to compare with a budget: the terms' sum times ``1 + margin``, rounded up."""
        return int(math.ceil(self.subtotal * (1.0 + self.margin)))

    def __int__(self) -> int:
        return self.total

    def describe(self) -> str:
        """One line per term, largest first, then the total (for reports and ``--dry-run``)."""
        width = max(len(k) for k in self.terms)
        lines = [f"{k:<{width}}  {v / 1e9:9.3f} GB" for k, v in sorted(self.terms.items(), key=lambda kv: -kv[1])]
        lines.append(f"{'total (+' + format(self.margin * 100, '.0f') + '% margin)':<{width}}  {self.total / 1e9:9.3f} GB")
        return "\n".join(lines)


def dtype_name(dtype: str | torch.dtype) -> str:
    """Canonical name ("float32", "bfloat16", "float16") of a dtype given as a string or torch dtype."""
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).replace("torch.", "")
    name = _CANONICAL.get(str(dtype), str(dtype))
    if name not in _DTYPE_BYTES:
        raise ConfigError(f"memory model: dtype must be float32, bfloat16 or float16, got {dtype!r}")
    return name


def dtype_bytes(dtype: str | torch.dtype) -> int:
    """Bytes per element of a floating dtype (4 for float32, 2 for bfloat16 / float16)."""
    return _DTYPE_BYTES[dtype_name(dtype)]


def _config_and_params(model_or_config: Any, model_type: str) -> tuple[Any, int]:
    """(config, parameter count) from a model (counted directly) or a config (an empty meta-device model)."""
    if isinstance(model_or_config, torch.nn.Module):
        cfg = model_or_config.config
        params = sum(p.numel() for p in model_or_config.parameters())
    else:
        cfg = model_or_config
        params = None
    if getattr(cfg, "model_type", None) != model_type:
        raise ConfigError(f"memory model for {model_type}: got a {getattr(cfg, 'model_type', type(cfg).__name__)!r} config")
    if params is None:
        params = _meta_parameter_count(model_type, cfg.to_json_string())
    return cfg, int(params)


@functools.lru_cache(maxsize=32)
def _meta_parameter_count(model_type: str, config_json: str) -> int:
    """Parameters of the model a config describes, counted on an empty meta-device instance (no weights)."""
    import json

    from transformers import SamConfig, SamModel, SegGptConfig, SegGptForImageSegmentation

    config_cls, model_cls = {"seggpt": (SegGptConfig, SegGptForImageSegmentation), "sam": (SamConfig, SamModel)}[model_type]
    cfg = config_cls(**{k: v for k, v in json.loads(config_json).items() if k != "transformers_version"})
    with torch.device("meta"):
        model = model_cls(cfg)
    return sum(p.numel() for p in model.parameters())


def _check_count(name: str, value: int, minimum: int = 1) -> int:
    try:
        ok = int(value) == value and int(value) >= minimum
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"memory model: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"memory model: {name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _check_hw(name: str, hw: Any) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in hw)
    except (TypeError, ValueError):
        raise ConfigError(f"memory model: {name} must be (height, width), got {hw!r}") from None
    if h < 1 or w < 1:
        raise ConfigError(f"memory model: {name} must be positive, got {hw!r}")
    return h, w


# --- SegGPT ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SegGptShape:
    """The sizes of a SegGPT configuration that its memory depends on (from ``SegGptConfig``)."""

    params: int
    hidden: int
    layers: int
    heads: int
    mlp: int
    patch: int
    image_h: int  # one image: half the stacked input's height (448 for the released model)
    image_w: int
    merge_index: int
    intermediates: int
    decoder_hidden: int

    @classmethod
    def of(cls, model_or_config: Any) -> "SegGptShape":
        cfg, params = _config_and_params(model_or_config, "seggpt")
        size = cfg.image_size if isinstance(cfg.image_size, (list, tuple)) else (cfg.image_size, cfg.image_size)
        patch = cfg.patch_size[0] if isinstance(cfg.patch_size, (list, tuple)) else cfg.patch_size
        return cls(params=params, hidden=int(cfg.hidden_size), layers=int(cfg.num_hidden_layers),
                   heads=int(cfg.num_attention_heads), mlp=int(cfg.mlp_dim or 4 * cfg.hidden_size),
                   patch=int(patch), image_h=int(size[0]) // 2, image_w=int(size[1]),
                   merge_index=int(cfg.merge_index), intermediates=len(cfg.intermediate_hidden_state_indices),
                   decoder_hidden=int(cfg.decoder_hidden_size))

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid of the stacked (prompt over query) input: 56 × 28 for the released model."""
        return 2 * self.image_h // self.patch, self.image_w // self.patch

    @property
    def tokens(self) -> int:
        """Tokens per stream and row (1568 for the released model)."""
        return self.grid[0] * self.grid[1]

    @property
    def pre_merge_layers(self) -> int:
        """Layers that run on both streams (image and mask): 0 … merge_index."""
        return min(self.merge_index + 1, self.layers)

    @property
    def scores(self) -> int:
        """Elements of one row's attention scores: heads × tokens²."""
        return self.heads * self.tokens ** 2

    @property
    def image_elems(self) -> int:
        """Elements of one preprocessed image at the model's per-image input size (3 × 448 × 448)."""
        return 3 * self.image_h * self.image_w

    @property
    def decoder_map(self) -> int:
        """Elements of one row's full-resolution decoder feature map (decoder_hidden × 896 × 448)."""
        return self.decoder_hidden * 2 * self.image_h * self.image_w


def _inference_score_bytes(dtype: str) -> int:
    """Bytes per attention-score element alive at the peak of a no-grad eager attention.

    transformers' ``SegGptAttention`` computes ``QKᵀ``, adds the decomposed
    relative positions in two steps (``attn + rel_h`` then ``+ rel_w``: three
    score tensors at once), then ``softmax(..., dtype=float32).to(dtype)``.
    float32: the three tensors at the second add (12 B) exceed the softmax
    moment (8 B). bfloat16: ``softmax`` first converts its input to float32
    (PyTorch's fused half-to-float path covers float16 only), so the scores
    (2 B), their float32 copy (4 B) and the float32 output (4 B) coexist: 10 B.
    float16: the fused path; scores, float32 output and the float16 copy: 8 B.
    """
    return {"float32": 12, "bfloat16": 10, "float16": 8}[dtype]


def seggpt_inference_memory(
    model_or_config: Any,
    *,
    dtype: str | torch.dtype,
    k: int,
    image_size_hw: tuple[int, int] | None = None,
    ensemble: str = "feature",
    batch_size: int = 4,
    num_classes: int = 2,
    attention: str = "eager",
    resident_bytes: int = 0,
) -> MemoryEstimate:
    """Peak CUDA memory of ``SegGPTBackend.predict(k prompts, [one query])`` (no grad).

    ``model_or_config``: a ``SegGptForImageSegmentation`` or its ``SegGptConfig``;
    ``k`` prompts; ``image_size_hw`` the query's (H, W) (the output is at that
    size; default the model's per-image input size); ``ensemble`` "feature"
    (one call, k rows) or "output" (``min(k, batch_size)`` rows per call, the k
    decoded maps kept until averaged); ``resident_bytes``: anything else already
    on the device (a backend passes its preprocessed-input cache).

    ``attention="sdpa"`` (the same attention through
    ``scaled_dot_product_attention`` with the relative positions as an additive
    mask) returns the eager figure, which bounds it: SDPA materialises the
    mask (one score-sized tensor in the model dtype) and, in its math fallback,
    the scores and their softmax — at most the three score tensors eager holds
    at its peak (float32: 12 B per element; bfloat16: 2 + 2 + 4 ≤ 10 B). Not
    measured; expect the real SDPA peak to be much lower.

    Terms (rows R = k for "feature", min(k, batch_size) for "output"; T = 1568
    tokens, D = 1024, 16 heads for the released model):

    * ``weights``: parameters × dtype size.
    * ``resident``: ``resident_bytes``.
    * ``inputs``: the backend's float32 preprocessed prompt images and masks
      (2k), the query, their stacks for the call (3R), the casts to the model
      dtype (bfloat16/float16: 3R), and the model's two stacked (R, 3, 896, 448)
      inputs in the model dtype.
    * ``encoder``: the peak inside a layer before the merge, where both
      streams (2R sequences) run: the embeddings (kept by ``SegGptModel.forward``),
      the layer input, its LayerNorm, the qkv projection and its reshaped copy
      (9 · 2R · T · D), the decomposed relative-position terms, and the attention
      scores (2R · heads · T² at 12/10/8 B, see :func:`_inference_score_bytes`).
      When the decoder needs more (never for the released shapes) its phase is
      used instead: the intermediate features and their concatenation, and four
      full-resolution decoder maps per row.
    * ``outputs``: the k decoded (C, 448, 448) probability maps (output
      ensemble) and the query-resolution result with its interpolation.
    * ``cuda_workspace``: :data:`CUDA_WORKSPACE_BYTES`.
    """
    s = SegGptShape.of(model_or_config)
    dt = dtype_name(dtype)
    b = dtype_bytes(dt)
    k = _check_count("k", k)
    batch_size = _check_count("batch_size", batch_size)
    num_classes = _check_count("num_classes", num_classes, 2)
    _check_choice("ensemble", ensemble, ENSEMBLES)
    _check_choice("attention", attention, ATTENTIONS)
    resident_bytes = _check_count("resident_bytes", resident_bytes, 0)
    H, W = _check_hw("image_size_hw", image_size_hw or (s.image_h, s.image_w))
    rows = k if ensemble == "feature" else min(k, batch_size)
    T, D = s.tokens, s.hidden
    stream_rows = 2 * rows  # before the merge every row is two sequences (image and mask)

    inputs = (2 * k + 1) * s.image_elems * 4 + 3 * rows * s.image_elems * 4
    if b != 4:
        inputs += 3 * rows * s.image_elems * b
    inputs += 2 * rows * 2 * s.image_elems * b  # (R, 3, 896, 448) pixel and prompt stacks
    attention_phase = stream_rows * (9 * T * D * b + s.heads * T * sum(s.grid) * b
                                     + s.scores * _inference_score_bytes(dt))
    decoder_phase = rows * (2 * s.intermediates * T * D * b + 4 * s.decoder_map * b)
    outputs = 2 * num_classes * H * W * 4
    if ensemble == "output" or k == 1:
        outputs += k * num_classes * s.image_h * s.image_w * 4
    terms = {
        "weights": s.params * b,
        "resident": resident_bytes,
        "inputs": inputs,
        "encoder" if attention_phase >= decoder_phase else "decoder": max(attention_phase, decoder_phase),
        "outputs": outputs,
        "cuda_workspace": CUDA_WORKSPACE_BYTES,
    }
    note = "sdpa: the eager figure, an upper bound (not measured)" if attention == "sdpa" else ""
    return MemoryEstimate(terms, note=note)


def _layer_saved_bytes(s: SegGptShape, b: int) -> int:
    """Bytes one sequence (one stream of one row) of one encoder layer keeps for backward (eager attention).

    The float32 softmax output (for the softmax backward) and, below float32,
    its copy in the model dtype (for ``attn @ V``); the reshaped qkv (Q, K, V)
    and the scaled query (for ``QKᵀ``); the MLP's pre-activation (for GELU);
    the inputs of both LayerNorms.
    """
    T, D = s.tokens, s.hidden
    return s.scores * (4 + (b if b != 4 else 0)) + T * (3 * D + D + s.mlp + 2 * D) * b


def seggpt_tuning_memory(
    model_or_config: Any,
    *,
    dtype: str | torch.dtype,
    contexts: int,
    batch_size: int,
    checkpointing: bool,
    image_size_hw: tuple[int, int] | None = None,
    context_hw: tuple[int, int] | None = None,
    num_classes: int = 2,
    attention: str = "eager",
    resident_bytes: int = 0,
) -> MemoryEstimate:
    """Peak CUDA memory of one context-tuning step: ``SegGPTBackend.tuning_loss`` + ``backward``.

    ``contexts`` learnable contexts (N), ``batch_size`` training queries (Q)
    per step, each query one forward of N rows whose graph is kept until the
    single backward; ``checkpointing``: encoder layers recomputed in backward;
    ``image_size_hw`` the training images' (H, W), ``context_hw`` the learnable
    tensors' (default the same). ``attention="sdpa"`` returns the eager figure,
    an upper bound (not measured): per layer SDPA keeps the additive
    relative-position mask in the model dtype and, in its math fallback, one
    softmax — no more than eager's float32 softmax plus its bfloat16 copy; its
    backward materialises the mask's gradient where eager holds three float32
    score tensors.

    Terms:

    * ``weights``, ``resident``, ``cuda_workspace``: as for inference.
    * ``contexts``: per context the image and mask logits, their gradients,
      the forward's sigmoid / softmax / palette mix at context size, and the
      preprocessed (448 × 448) image and mask.
    * ``query_inputs``: per query the two stacked (N, 3, 896, 448) model
      inputs (kept by the patch convolution), and for the query being run its
      label (one-hot, palette image, resized) and the casts of its N-row inputs
      to the model dtype.
    * Without checkpointing, ``saved_activations``: everything every query's
      graph keeps until backward — per encoder layer and sequence
      :func:`_layer_saved_bytes` (2N sequences before the merge, N after),
      the relative-position tables, the last layer's output (the other
      LayerNorm inputs are layer inputs already counted), the decoder's four
      full-resolution maps per row and the loss tensors — for all Q
      queries; plus ``backward_start``: the first gradients of the decoder and
      cuDNN's convolution-backward workspace (two float32 decoder maps per row;
      the workspace is not visible at the op level: the H100 peaks exceed the
      tensors alive by 83 MB (float32) / 118 MB (bfloat16) per row).
    * With checkpointing, ``saved_activations``: each layer's input (the
      checkpoint), the decoder maps and loss tensors, for the Q − 1 queries
      whose backward has not started; ``recompute``: the last query's
      pre-merge layer being recomputed and differentiated (2N sequences): its
      qkv, scaled query and layer inputs, and at the softmax backward four
      float32 score tensors per sequence — the saved softmax output, the
      incoming gradient, the softmax's gradient, and one more that only the
      CUDA run shows (the H100 peaks sit one float32 score tensor per
      sequence above the op-level count, in float32 and bfloat16 alike).
    """
    s = SegGptShape.of(model_or_config)
    dt = dtype_name(dtype)
    b = dtype_bytes(dt)
    n = _check_count("contexts", contexts)
    q = _check_count("batch_size", batch_size)
    num_classes = _check_count("num_classes", num_classes, 2)
    _check_choice("attention", attention, ATTENTIONS)
    resident_bytes = _check_count("resident_bytes", resident_bytes, 0)
    H, W = _check_hw("image_size_hw", image_size_hw or (s.image_h, s.image_w))
    ch, cw = _check_hw("context_hw", context_hw or (H, W))
    T, D = s.tokens, s.hidden
    pred = 2 * s.image_elems  # one row's (3, 896, 448) predicted image

    context_terms = n * (6 * (3 + num_classes) * ch * cw * 4 + 4 * s.image_elems * 4)
    # the query being run: its label (one-hot, palette, resized) and the casts of the N-row inputs
    query_transient = (num_classes + 3) * H * W * 4 + s.image_elems * 4 + 4 * n * s.image_elems * b
    stacks = 2 * n * pred * b  # the two (N, 3, 896, 448) model inputs, kept by the patch convolution
    last_output = n * T * D * b  # the last layer's output, kept by the intermediate LayerNorm
    decoder = n * 4 * s.decoder_map * b
    loss = n * 5 * pred * 4
    terms: dict[str, int] = {
        "weights": s.params * b,
        "resident": resident_bytes,
        "contexts": context_terms,
        "query_inputs": q * stacks + query_transient,
    }
    pre, post = s.pre_merge_layers, s.layers - s.pre_merge_layers
    sequences = 2 * n * pre + n * post  # layer-sequences of one query's forward
    if not checkpointing:
        rel_tables = s.layers * (s.grid[0] ** 2 + s.grid[1] ** 2) * (D // s.heads) * b
        per_query = sequences * _layer_saved_bytes(s, b) + rel_tables + last_output + decoder + loss
        terms["saved_activations"] = q * per_query
        terms["backward_start"] = n * 2 * s.decoder_map * 4
    else:
        per_query = sequences * T * D * b + last_output + decoder + loss
        terms["saved_activations"] = (q - 1) * per_query
        seq = 2 * n  # the recomputed layer runs before the merge
        terms["recompute"] = seq * (T * (3 * D + D + 2 * D) * b + 4 * s.scores * 4) + 2 * n * pre * T * D * b
    terms["cuda_workspace"] = CUDA_WORKSPACE_BYTES
    note = "sdpa: the eager figure, an upper bound (not measured)" if attention == "sdpa" else ""
    return MemoryEstimate(terms, note=note)


# --- PerSAM ----------------------------------------------------------------------------------------------

#: The image encoders of the released SAM checkpoints (facebook/sam-vit-base, -large, -huge); the
#: rest of ``SamConfig``'s defaults is shared by all three (``SamVisionConfig()`` is ViT-B).
RELEASED_SAM_VISION = {
    "vit-b": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, global_attn_indexes=[2, 5, 8, 11]),
    "vit-l": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, global_attn_indexes=[5, 11, 17, 23]),
    "vit-h": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, global_attn_indexes=[7, 15, 23, 31]),
}


def released_sam_config(kind: str) -> Any:
    """``SamConfig`` of a released SAM size ("vit-b", "vit-l", "vit-h")."""
    from transformers import SamConfig

    if kind not in RELEASED_SAM_VISION:
        raise ConfigError(f"SAM size must be one of {', '.join(RELEASED_SAM_VISION)}, got {kind!r}")
    return SamConfig(vision_config=dict(RELEASED_SAM_VISION[kind]))


@dataclass(frozen=True)
class SamShape:
    """The sizes of a SAM configuration that PerSAM's memory depends on (from ``SamConfig``)."""

    params: int
    hidden: int
    heads: int
    patch: int
    input_size: int  # the encoder's square input (1024)
    window: int
    global_layers: int
    output_channels: int  # image-embedding channels (256)
    embedding_grid: int  # image-embedding side (64)

    @classmethod
    def of(cls, model_or_config: Any) -> "SamShape":
        cfg, params = _config_and_params(model_or_config, "sam")
        vc = cfg.vision_config
        return cls(params=params, hidden=int(vc.hidden_size), heads=int(vc.num_attention_heads),
                   patch=int(vc.patch_size), input_size=int(vc.image_size), window=int(vc.window_size),
                   global_layers=len(vc.global_attn_indexes), output_channels=int(vc.output_channels),
                   embedding_grid=int(cfg.prompt_encoder_config.image_embedding_size))

    @property
    def tokens(self) -> int:
        """Tokens of the encoder's global attention (64 × 64 = 4096 for the released models)."""
        return (self.input_size // self.patch) ** 2

    @property
    def embedding_elems(self) -> int:
        """Elements of one cached image embedding (256 × 64 × 64)."""
        return self.output_channels * self.embedding_grid ** 2


def persam_memory(
    model_or_config: Any,
    *,
    dtype: str | torch.dtype,
    k: int,
    image_size_hw: tuple[int, int],
    cached: bool,
    num_classes: int = 2,
    resident_bytes: int = 0,
) -> MemoryEstimate:
    """Peak CUDA memory of ``PerSAMBackend.predict(k references, [one query])``.

    ``cached=False``: some image (reference or query) is encoded during the
    call, so the image encoder's peak counts; ``cached=True``: all embeddings
    are in the backend's cache and only the prompt encoder, mask decoder and
    PerSAM's own maps run. ``image_size_hw`` is the query's (H, W).

    Terms (T = 4096 encoder tokens, E = 256 × 64 × 64 embedding elements):

    * ``weights``, ``resident``, ``cuda_workspace``: as for SegGPT.
    * ``embeddings``: the k + 1 cached image embeddings.
    * ``encoder`` (cold): the 1024² input and, inside a global-attention layer,
      the residual stream, its LayerNorm, the qkv projection and its reshaped
      copy, the attention output and projection (10 · T · D in all), plus two
      score-sized tensors in the model dtype (heads · T² each): transformers'
      SAM attention is SDPA, which gets the decomposed relative positions as a
      materialised additive mask, and the memory-efficient kernel holds one
      more of that size (the H100 encoder peaks are two, not three, score
      tensors above the rest). Windowed layers are smaller for SAM's shapes;
      the larger of the two is used.
    * ``decoder``: the prompt encoder and mask decoder on one embedding
      (twelve embedding-sized tensors in the model dtype: dense prompt,
      positional encoding, the two-way transformer's queries / keys / attention
      outputs, the upscaled masks) and PerSAM's float32 maps over the 1024²
      input frame (similarity, point picking).
    * ``outputs``: the (C, H, W) class probabilities and their interpolation.

    On the H100 file these figures are 1.4–8.6 % above the peaks ``bench_persam``
    measured for ViT-B/H (encoding 8 images; PerSAM pairs with 8 embeddings
    cached). The ``persam_predict`` rows of the same backend, models and dtypes
    sit 0.82–0.86 GB higher still, by the same amount cold and cached (to
    within 1.5 MB): memory the measuring process held that PerSAM did not
    allocate (``tests/test_memory_models.py`` derives it from the file). With
    it passed as ``resident_bytes`` the figures are 1.8–5.9 % above those rows;
    without it they are 11–74 % below. Pass whatever else the device holds as
    ``resident_bytes``.
    """
    s = SamShape.of(model_or_config)
    dt = dtype_name(dtype)
    b = dtype_bytes(dt)
    k = _check_count("k", k)
    num_classes = _check_count("num_classes", num_classes, 2)
    resident_bytes = _check_count("resident_bytes", resident_bytes, 0)
    H, W = _check_hw("image_size_hw", image_size_hw)
    T, D = s.tokens, s.hidden
    terms: dict[str, int] = {
        "weights": s.params * b,
        "resident": resident_bytes,
        "embeddings": (k + 1) * s.embedding_elems * b,
    }
    decoder = 12 * s.embedding_elems * b + 2 * s.input_size ** 2 * 4
    if cached:
        terms["decoder"] = decoder
    else:
        side = s.input_size // s.patch
        windows = math.ceil(side / s.window) ** 2 if s.window > 0 else 0
        padded = windows * s.window ** 2
        global_phase = 10 * T * D * b + 2 * s.heads * T * T * b if s.global_layers else 0
        window_phase = 10 * padded * D * b + 2 * s.heads * windows * s.window ** 4 * b if windows else 0
        encoder = 3 * s.input_size ** 2 * b + max(global_phase, window_phase)
        terms["encoder" if encoder >= decoder else "decoder"] = max(encoder, decoder)
    terms["outputs"] = 2 * num_classes * H * W * 4
    terms["cuda_workspace"] = CUDA_WORKSPACE_BYTES
    return MemoryEstimate(terms)


__all__ = [
    "ANALYTIC_MARGIN", "CUDA_WORKSPACE_BYTES", "MemoryEstimate", "RELEASED_SAM_VISION", "SamShape", "SegGptShape",
    "dtype_bytes", "dtype_name", "persam_memory", "released_sam_config", "seggpt_inference_memory",
    "seggpt_tuning_memory",
]
