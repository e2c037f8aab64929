"""Personalize-SAM's own rules, where they differ from transformers' SAM (PerSAM's ``reference="official"``).

Why it exists: PerSAM's published numbers come from the authors' code
(github.com/ZrrSkywalker/Personalize-SAM: ``persam.py``, ``persam_f.py`` and
the modified ``per_segment_anything/modeling/transformer.py``), not from
transformers. transformers' ``SamModel`` accepts PerSAM's two extra decoder
inputs but computes them differently, and the scripts around the model make
choices of their own (where points are picked, how the reference mask meets
the feature grid). This module holds those rules, each as a small function,
so that :mod:`promptopt.backends.persam` can follow the official code by
default and transformers' behaviour on request. Nothing here edits
transformers: :func:`official_decoder` installs two forwards on one decoder's
module *instances* for the duration of a call and removes them afterwards.

The rules, as read in the official files:

Decoder (``per_segment_anything/modeling/transformer.py``)
    * Target-guided attention: in each two-way block's token→image attention
      the probabilities are ``softmax(softmax(q·kᵀ/√d) + sim)`` — a second
      softmax over the first softmax's output plus the similarity map.
      transformers adds ``sim`` to the logits before its only softmax.
      The final token→image attention gets no similarity in either.
    * Target-semantic prompting: ``queries += target`` before every block.
      Before the first block ``queries`` *is* the token tensor that also
      serves as the query positional embedding (an in-place add on an
      alias), so every block's query positional embedding carries the target
      too; transformers has the same aliasing. The official code then adds
      the target once more to the query of the final token→image attention
      (``q = queries + point_embedding; q += target``); transformers does not.

Scripts (``persam.py``, ``persam_f.py``, ``predictor.py``, ``sam.py``)
    * Reference mask → feature cells: the 0/255 mask is resized like the
      image (PIL bilinear, uint8), normalised with the image's mean/std
      (red channel), zero-padded to the square input, bilinearly resampled to
      the feature grid, and a cell is the target's when the value is > 0
      (:func:`reference_cells`).
    * The similarity map is upsampled the way SAM post-processes mask logits
      (×4, then to the input square, crop the padding, then to the original
      image size, all bilinear) and points are picked at the original
      resolution, then mapped to the input frame by the resize ratio
      (:func:`similarity_map`, :func:`extreme_points`, :func:`to_input_frame`).
    * The attention similarity is that full-resolution map, standardised
      (mean, unbiased std), resized to the feature grid (the unpadded image
      stretched over the whole grid, as the official code does), sigmoid
      (:func:`attention_similarity`).
    * Boxes come from the mask at the original resolution
      (:func:`postprocess_logits` > 0), mapped to the input frame.
    * PerSAM-F: location target ``(mean + max) / 2`` of the reference's cells
      (:func:`mean_max_target`), used for the training point *and* for the
      test-time point; training on the full-resolution logits against the
      full-resolution mask.
"""

from __future__ import annotations

import contextlib
import types
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

Point = tuple[float, float]


# --- decoder: the two forwards installed on one decoder's module instances ---------------------------------

def attention_logits(attn: torch.nn.Module, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """(B, heads, Nq, Nk) scaled dot products of a transformers ``SamAttention`` (before any softmax)."""
    q = attn._separate_heads(attn.q_proj(query), attn.num_attention_heads)
    k = attn._separate_heads(attn.k_proj(key), attn.num_attention_heads)
    return torch.matmul(q, k.transpose(2, 3)) * attn.scaling


def double_softmax(logits: torch.Tensor, similarity: torch.Tensor | None) -> torch.Tensor:
    """Personalize-SAM's target-guided attention probabilities: softmax(softmax(logits) + similarity)."""
    probs = torch.softmax(logits.float(), dim=-1)
    if similarity is not None:
        probs = torch.softmax(probs + similarity.float(), dim=-1)
    return probs


def _official_attention_forward(self: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                attention_similarity: torch.Tensor | None = None,
                                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """SamAttention.forward with the double softmax (installed on token→image attentions only)."""
    point_batch_size = query.shape[1]
    probs = double_softmax(attention_logits(self, query, key), attention_similarity).to(query.dtype)
    v = self._separate_heads(self.v_proj(value), self.num_attention_heads)
    out = torch.matmul(probs, v).transpose(1, 2).contiguous()
    return self.out_proj(self._recombine_heads(out, point_batch_size)), probs


def _official_two_way_forward(self: torch.nn.Module, point_embeddings: torch.Tensor, image_embeddings: torch.Tensor,
                              image_positional_embeddings: torch.Tensor,
                              attention_similarity: torch.Tensor | None = None,
                              target_embedding: torch.Tensor | None = None,
                              **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """SamTwoWayTransformer.forward with Personalize-SAM's target-semantic prompting.

    Written out (no in-place aliasing): the query positional embedding of
    every block is ``tokens + target``; block ``i > 0`` adds the target to its
    incoming queries; the final token→image query is
    ``queries + tokens + target + target``.
    """
    keys = image_embeddings.flatten(2).transpose(1, 2).unsqueeze(1)
    key_pe = image_positional_embeddings.flatten(2).transpose(1, 2).unsqueeze(1)
    query_pe = point_embeddings if target_embedding is None else point_embeddings + target_embedding
    queries = query_pe
    for i, layer in enumerate(self.layers):
        if i > 0 and target_embedding is not None:
            queries = queries + target_embedding
        queries, keys, _ = layer(queries=queries, keys=keys, query_point_embedding=query_pe,
                                 key_point_embedding=key_pe, attention_similarity=attention_similarity, **kwargs)
    final_query = queries + query_pe
    if target_embedding is not None:
        final_query = final_query + target_embedding
    attn_out, _ = self.final_attn_token_to_image(query=final_query, key=keys + key_pe, value=keys)
    return self.layer_norm_final_attn(queries + attn_out), keys


@contextlib.contextmanager
def official_decoder(decoder: torch.nn.Module) -> Iterator[None]:
    """Run a transformers ``SamMaskDecoder`` with Personalize-SAM's semantics inside the ``with`` block.

    Installs instance-level forwards on the decoder's two-way transformer and
    on each block's token→image attention, and restores whatever was there
    on exit (also after an exception). Other holders of the same model see
    transformers' behaviour outside the block; not safe for two threads
    decoding with one model object at the same time.
    """
    transformer = decoder.transformer
    installs = [(transformer, _official_two_way_forward)]
    installs += [(layer.cross_attn_token_to_image, _official_attention_forward) for layer in transformer.layers]
    saved = [(module, vars(module).get("forward")) for module, _ in installs]
    try:
        for module, fn in installs:
            module.forward = types.MethodType(fn, module)
        yield
    finally:
        for module, previous in saved:
            if previous is None:
                vars(module).pop("forward", None)
            else:
                module.forward = previous


# --- geometry: reference cells, similarity maps, points, boxes ----------------------------------------------

def reference_cells(mask: torch.Tensor, reshaped: tuple[int, int], input_size: int, grid: tuple[int, int],
                    mean: float = 0.485, std: float = 0.229) -> torch.Tensor:
    """(H, W) boolean mask → (h, w) boolean feature cells the official code averages over.

    The mask as a 0/255 uint8 image, resized to the resized input with PIL
    bilinear, normalised like the image's red channel (``mean``/``std`` on the
    0–1 scale), zero-padded to ``input_size``, bilinearly resampled to the
    grid; a cell is the target's when the value is > 0. Padding (0) never
    counts, background (negative) never counts, and a cell counts when the
    mask reaches its sampling point, whatever its area.
    """
    img = Image.fromarray(mask.detach().cpu().numpy().astype(np.uint8) * 255)
    resized = np.asarray(img.resize((reshaped[1], reshaped[0]), Image.Resampling.BILINEAR), dtype=np.float32)
    m = (torch.from_numpy(resized) - 255.0 * mean) / (255.0 * std)
    m = F.pad(m, (0, input_size - reshaped[1], 0, input_size - reshaped[0]))
    return F.interpolate(m[None, None], size=grid, mode="bilinear", align_corners=False)[0, 0].to(mask.device) > 0


def mean_max_target(features: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """PerSAM-F's location target: (mean + per-channel max) / 2 of (D, h, w) features over the ``inside`` cells."""
    cells = features.float()[:, inside]
    return (cells.mean(1) + cells.amax(1)) / 2


def postprocess_logits(logits: torch.Tensor, input_size: int, reshaped: tuple[int, int],
                       original: tuple[int, int]) -> torch.Tensor:
    """SAM's mask post-processing: (..., h, w) → (..., H, W) at the original image size.

    Bilinear to the ``input_size`` square, padding cropped, bilinear to
    ``original``. Leading dimensions are kept.
    """
    lead = logits.shape[:-2]
    x = logits.reshape(1, -1, *logits.shape[-2:]).float()
    x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False)
    x = F.interpolate(x[..., : reshaped[0], : reshaped[1]], size=original, mode="bilinear", align_corners=False)
    return x.reshape(*lead, *original)


def similarity_map(sim: torch.Tensor, input_size: int, reshaped: tuple[int, int],
                   original: tuple[int, int]) -> torch.Tensor:
    """(h, w) grid similarity → (H, W) map at the original image size: ×4 bilinear, then mask post-processing."""
    x = F.interpolate(sim.float()[None, None], scale_factor=4, mode="bilinear", align_corners=False)
    return postprocess_logits(x[0, 0], input_size, reshaped, original)


def extreme_points(pick: torch.Tensor, full: torch.Tensor | None = None) -> tuple[Point, Point]:
    """(positive (x, y), negative (x, y)): top-1 of ``pick`` and bottom-1 of ``full`` (default ``pick``).

    ``pick`` may have excluded (``-inf``) pixels (further instances); the
    negative point is the minimum of the whole map, as in the official code.
    """
    full = pick if full is None else full
    w = pick.shape[1]
    hi = int(pick.flatten().topk(1).indices[0])
    lo = int(full.flatten().topk(1, largest=False).indices[0])
    return (float(hi % w), float(hi // w)), (float(lo % w), float(lo // w))


def to_input_frame(xy: Point, original: tuple[int, int], reshaped: tuple[int, int]) -> Point:
    """(x, y) in original-image pixels → the resized-input frame SAM's prompt encoder takes."""
    return xy[0] * (reshaped[1] / original[1]), xy[1] * (reshaped[0] / original[0])


def attention_similarity(dense: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Target-guided attention input from the (H, W) full-resolution similarity, as (1, 1, 1, h*w).

    Standardised over all pixels (unbiased std), resized to the grid, sigmoid.
    A constant map (zero spread) gives 0.5 everywhere instead of the
    official division by zero.
    """
    z = (dense - dense.mean()) / dense.std().clamp_min(1e-12)
    z = F.interpolate(z[None, None], size=grid, mode="bilinear", align_corners=False)
    return torch.sigmoid(z).reshape(1, 1, 1, -1)
