"""SegGPT's network forward as promptopt runs it: over the modules of a transformers model, never changing it.

Why not simply call ``model(...)``:

1. **Grouped prompt sets.** transformers' ``SegGptEncoder`` averages the
   feature ensemble over the *whole* batch, so one call can hold one prompt set.
   Here a batch holds several sets, each with its own query, and every average
   is taken within the rows of one set (``sizes``: rows per set, in order). A
   set's answer does not depend on what else is in the batch.
2. **The official merge-layer rule** (``reference="official"``, the default).
   Painter's ``models_seggpt.py`` (``forward_encoder``: ``merge = 1 if merge_idx
   >= idx else 2``; ``Block.forward``) averages the query half of the attention
   output *per stream* (image stream, mask stream) up to and including layer
   ``merge_index``, and over the set's rows after the two streams have been
   merged. transformers (``ensemble_cond = 2 if merge_index > i else 1``) does
   the same except at layer ``merge_index`` itself, where it averages all 2N
   rows of both streams together. See :func:`ensemble_plan`.
3. **SDPA attention** (``attention="sdpa"``, the default): the function of
   ``SegGptAttention`` computed by ``F.scaled_dot_product_attention``, the
   decomposed relative-position terms passed as its additive mask
   (:func:`sdpa_attention`). ``"eager"`` calls transformers' own attention module.
4. **Per call, per backend settings**: activation checkpointing (only while
   gradients are recorded) and ``torch.compile`` of the layer pieces are applied
   by this runner at call time. Nothing is installed on the model, so two
   backends sharing one model cannot leak settings into each other, and
   ``model(...)`` still runs transformers' own forward.

Apart from that it does, step by step, what ``SegGptForImageSegmentation.forward``
does — the embeddings module, each encoder layer's layer norms, attention, MLP
and (inert) drop-path, the merge of the two streams after layer ``merge_index``,
the layer-normed intermediate features, the decoder and ``SegGptLoss`` — calling
transformers' modules for each. ``tests/test_seggpt_encoder.py`` compares it
with transformers' own model and attention at run time, so a transformers
release that changes this maths makes a test fail.

With one set per call and N = 1 nothing is averaged (the backend never asks
transformers for ``feature_ensemble`` with one prompt either; transformers would
average the two streams at the merge layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .seggpt_codec import check_reference

ATTENTIONS = ("sdpa", "eager")


def check_attention(attention: str) -> str:
    """``attention`` itself, or a one-line :class:`ConfigError` naming the choices."""
    if attention not in ATTENTIONS:
        raise ConfigError(f"seggpt backend: attention must be one of {ATTENTIONS}, got {attention!r}")
    return attention


# --- attention -------------------------------------------------------------------------------------
def eager_attention(attention: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """transformers' own ``SegGptAttention`` forward (attention map materialised, softmax in float32)."""
    return attention(hidden_states)[0]


def sdpa_attention(attention: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """``SegGptAttention``'s function through ``F.scaled_dot_product_attention``.

    Eager computes ``softmax((q·scale) kᵀ + rel_h + rel_w) v`` with ``rel_h`` /
    ``rel_w`` the decomposed relative-position terms of the *unscaled* query
    (``add_decomposed_rel_pos``). Here the same two terms, built with the
    module's own ``get_rel_pos``, are summed into one (B, heads, T, T) additive
    mask — the only T×T tensor materialised — and SDPA applies ``scale`` to
    ``q kᵀ`` itself. The softmax runs inside the SDPA kernel (in the model's
    dtype with float32 accumulation on CUDA), not as eager's separate float32 copy.
    """
    batch, height, width, _ = hidden_states.shape
    heads = attention.num_attention_heads
    tokens = height * width
    qkv = attention.qkv(hidden_states).reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
    query, key, value = qkv.unbind(0)  # (B, heads, T, head_dim)
    mask = None
    if attention.use_relative_position_embeddings:
        rel_h = attention.get_rel_pos(height, height, attention.rel_pos_h)  # (H, H, head_dim)
        rel_w = attention.get_rel_pos(width, width, attention.rel_pos_w)  # (W, W, head_dim)
        grid = query.reshape(batch, heads, height, width, -1)
        term_h = torch.einsum("bnhwc,hkc->bnhwk", grid, rel_h)  # (B, heads, H, W, H)
        term_w = torch.einsum("bnhwc,wkc->bnhwk", grid, rel_w)  # (B, heads, H, W, W)
        mask = (term_h.unsqueeze(-1) + term_w.unsqueeze(-2)).reshape(batch, heads, tokens, tokens)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=attention.scale)
    out = out.reshape(batch, heads, height, width, -1).permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1)
    return attention.proj(out)


# --- the feature ensemble, within groups of rows -----------------------------------------------------
def ensemble_plan(num_layers: int, merge_index: int, reference: str) -> list[str]:
    """Per encoder layer, how the query half of the attention output is averaged within a set of N ≥ 2 rows.

    ``"streams"``: over the set's image-stream rows and, separately, over its
    mask-stream rows (the streams are not merged yet); ``"both"``: over all 2N
    rows of the set, both streams together (transformers at the merge layer);
    ``"rows"``: over the set's N rows (after the merge). Official (Painter):
    ``"streams"`` for ``i <= merge_index``, then ``"rows"``. transformers:
    ``"streams"`` for ``i < merge_index``, ``"both"`` at ``i == merge_index``,
    then ``"rows"``.
    """
    check_reference(reference)
    plan = []
    for i in range(num_layers):
        if i < merge_index:
            plan.append("streams")
        elif i == merge_index:
            plan.append("streams" if reference == "official" else "both")
        else:
            plan.append("rows")
    return plan


def _runs(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive groups of equal size as (size, count)."""
    runs: list[tuple[int, int]] = []
    for n in sizes:
        if runs and runs[-1][0] == n:
            runs[-1] = (n, runs[-1][1] + 1)
        else:
            runs.append((n, 1))
    return runs


def mean_within_groups(x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Every row of ``x`` replaced by the mean of its group's rows (groups: consecutive ``sizes``; size 1 unchanged).

    Groups of equal size next to each other are reduced together as one
    (count, size, ...) view; one set alone is the same computation with count 1.
    """
    if all(n == 1 for n in sizes):
        return x
    pieces, start, rest = [], 0, x.shape[1:]
    for n, count in _runs(sizes):
        block = x[start:start + n * count]
        if n > 1:
            grouped = block.reshape(count, n, *rest)
            block = grouped.mean(1, keepdim=True).expand_as(grouped).reshape(n * count, *rest)
        pieces.append(block)
        start += n * count
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _mean_over_both_streams(image: torch.Tensor, mask: torch.Tensor, sizes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' merge-layer average: each set's image rows and mask rows together (2N rows, image rows first)."""
    outs_i, outs_m, start, rest = [], [], 0, image.shape[1:]
    for n, count in _runs(sizes):
        a, b = image[start:start + n * count], mask[start:start + n * count]
        if n > 1:
            both = torch.cat([a.reshape(count, n, *rest), b.reshape(count, n, *rest)], dim=1)
            mean = both.mean(1, keepdim=True).expand(count, n, *rest).reshape(n * count, *rest)
            a, b = mean, mean
        outs_i.append(a)
        outs_m.append(b)
        start += n * count
    return torch.cat(outs_i), torch.cat(outs_m)


def ensemble_query_half(attention_output: torch.Tensor, sizes: Sequence[int], how: str) -> torch.Tensor:
    """Average the query (lower) half of ``attention_output`` (rows, h, w, d) within each set (see :func:`ensemble_plan`).

    Before the merge there are 2B rows (the image stream, then the mask
    stream, each B = sum(sizes) rows); after it, B rows. Sets of one row are
    left alone.
    """
    prompt, query = attention_output.split(attention_output.shape[1] // 2, dim=1)
    batch = sum(sizes)
    if how == "rows":
        query = mean_within_groups(query, sizes)
    elif how == "streams":
        query = torch.cat([mean_within_groups(query[:batch], sizes), mean_within_groups(query[batch:], sizes)])
    elif how == "both":
        query = torch.cat(_mean_over_both_streams(query[:batch], query[batch:], sizes))
    else:
        raise ValueError(f"unknown ensemble step {how!r}")
    return torch.cat([prompt, query], dim=1)


# --- one encoder layer, in two pieces (compiled when asked) ------------------------------------------
def _attention_piece(layer: torch.nn.Module, hidden: torch.Tensor, sdpa: bool) -> torch.Tensor:
    x = layer.layernorm_before(hidden)  # SegGPT is pre-norm
    return sdpa_attention(layer.attention, x) if sdpa else eager_attention(layer.attention, x)


def _mlp_piece(layer: torch.nn.Module, hidden: torch.Tensor, attention_output: torch.Tensor) -> torch.Tensor:
    hidden = layer.drop_path(attention_output) + hidden
    return hidden + layer.drop_path(layer.mlp(layer.layernorm_after(hidden)))


@dataclass
class SegGptOutput:
    """What one call returns: the painted (B, 3, 2h, w) pictures and, given labels, SegGPT's loss."""

    pred_masks: torch.Tensor
    loss: torch.Tensor | None = None


class SegGptRunner:
    """Runs a transformers ``SegGptForImageSegmentation`` with promptopt's settings (module docstring).

    ``compile``: False, True (inductor) or a ``torch.compile`` backend name;
    the two pieces of a layer (attention, MLP) are compiled once and reused by
    every layer (the layer is an argument, so one graph serves all 24).
    """

    def __init__(self, model: Any, *, reference: str = "official", attention: str = "sdpa",
                 checkpointing: bool = False, compile: bool | str = False) -> None:
        self.model = model
        self.reference = check_reference(reference)
        self.attention = check_attention(attention)
        self.checkpointing = bool(checkpointing)
        self.compile = compile
        cfg = model.config
        self.num_layers = len(model.model.encoder.layers)
        self.merge_index = int(cfg.merge_index)
        self.feature_layers = set(int(i) for i in cfg.intermediate_hidden_state_indices)
        self.plan = ensemble_plan(self.num_layers, self.merge_index, reference)
        self._attention_piece: Callable[..., torch.Tensor] = _attention_piece
        self._mlp_piece: Callable[..., torch.Tensor] = _mlp_piece
        if compile:
            backend = "inductor" if compile is True else str(compile)
            self._attention_piece = torch.compile(_attention_piece, backend=backend)
            self._mlp_piece = torch.compile(_mlp_piece, backend=backend)

    def _layer(self, layer: torch.nn.Module, hidden: torch.Tensor, sizes: tuple[int, ...], how: str | None) -> torch.Tensor:
        out = self._attention_piece(layer, hidden, self.attention == "sdpa")
        if how is not None:
            out = ensemble_query_half(out, sizes, how)
        return self._mlp_piece(layer, hidden, out)

    def __call__(self, queries: torch.Tensor, prompt_images: torch.Tensor, prompt_masks: torch.Tensor,
                 sizes: Sequence[int], embedding_type: str = "instance",
                 labels: torch.Tensor | None = None) -> SegGptOutput:
        """Paint the query halves of ``B = sum(sizes)`` rows; rows of one set (``sizes``, in order) share an ensemble.

        ``queries``, ``prompt_images`` and ``prompt_masks`` are (B, 3, h, w)
        normalised inputs. With ``labels`` (B, 3, h, w) the query's mask half of
        the mask stream is the label (masked out all the same) and the loss is
        SegGPT's smooth-L1 over each row's masked (query) patches.
        """
        sizes = tuple(int(n) for n in sizes)
        if sum(sizes) != queries.shape[0] or any(n < 1 for n in sizes):
            raise ValueError(f"set sizes {sizes} do not partition {queries.shape[0]} rows")
        model = self.model
        dtype = model.model.embeddings.patch_embeddings.projection.weight.dtype
        pixel_values = torch.cat((prompt_images, queries), dim=2).to(dtype)  # the image stream: prompt above query
        lower = prompt_masks if labels is None else labels
        mask_values = torch.cat((prompt_masks, lower), dim=2).to(dtype)  # the mask stream
        num_patches = model.model.embeddings.patch_embeddings.num_patches
        masked = torch.zeros(num_patches, dtype=torch.bool, device=pixel_values.device)
        masked[num_patches // 2:] = True  # the query's mask: what the model paints (and the loss scores)
        masked = masked.unsqueeze(0).expand(queries.shape[0], -1)
        hidden = model.model.embeddings(pixel_values, mask_values, bool_masked_pos=masked,
                                        embedding_type=embedding_type)
        ensemble = any(n > 1 for n in sizes)
        checkpoint = self.checkpointing and torch.is_grad_enabled()
        features = []
        for i, layer in enumerate(model.model.encoder.layers):
            how = self.plan[i] if ensemble else None
            if checkpoint:
                from torch.utils.checkpoint import checkpoint as run_checkpointed

                hidden = run_checkpointed(self._layer, layer, hidden, sizes, how, use_reentrant=False)
            else:
                hidden = self._layer(layer, hidden, sizes, how)
            if i == self.merge_index:  # merge the image and mask streams
                hidden = (hidden[: hidden.shape[0] // 2] + hidden[hidden.shape[0] // 2:]) * 0.5
            if i in self.feature_layers:
                features.append(model.model.encoder.layernorm(hidden))
        pred = model.decoder(torch.cat(features, dim=-1))
        loss = None
        if labels is not None:
            from transformers.models.seggpt.modeling_seggpt import SegGptLoss

            loss = SegGptLoss(model.config)(prompt_masks.to(dtype), pred, labels.to(dtype), masked)
        return SegGptOutput(pred_masks=pred, loss=loss)


__all__ = ["ATTENTIONS", "SegGptOutput", "SegGptRunner", "check_attention", "eager_attention", "ensemble_plan",
           "ensemble_query_half", "mean_within_groups", "sdpa_attention"]
