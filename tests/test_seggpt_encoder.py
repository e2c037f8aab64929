"""promptopt's SegGPT network forward (promptopt/backends/seggpt_encoder.py) against transformers and Painter, on tiny random models.

* SDPA attention and the whole forward in transformers mode equal transformers'
  own eager layer and model *at run time* — a transformers release that changes
  the maths of the layer or the encoder makes these tests fail;
* the official mode equals a transliteration of Painter's ``forward_encoder`` /
  ``Block.forward`` (SegGPT/SegGPT_inference/models_seggpt.py) and differs from
  transformers exactly where Painter's merge-layer rule does;
* several prompt sets in one call give each set's one-set answer;
* a backend never changes a model another object holds (checkpointing per call).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import SegGptForImageSegmentation  # noqa: E402

from promptopt.backends.base import Context  # noqa: E402
from promptopt.backends.seggpt import SegGPTBackend, tiny_config  # noqa: E402
from promptopt.backends.seggpt_encoder import (  # noqa: E402
    SegGptRunner, ensemble_plan, ensemble_query_half, sdpa_attention)
from promptopt.data import Sample  # noqa: E402
from test_seggpt_official import painter_pred  # noqa: E402

SIZE = 32


def frozen(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def tiny_model(seed: int = 0, **overrides) -> SegGptForImageSegmentation:
    """A tiny random SegGPT whose attention (relative-position tables, qkv) is scaled up so that it matters."""
    torch.manual_seed(seed)
    model = SegGptForImageSegmentation(tiny_config(**overrides))
    with torch.no_grad():
        for layer in model.model.encoder.layers:
            layer.attention.rel_pos_h.normal_(0.0, 0.5)
            layer.attention.rel_pos_w.normal_(0.0, 0.5)
            layer.attention.qkv.weight.normal_(0.0, 0.3)
    return frozen(model)


def rows(n: int, seed: int = 1, same_query: bool = True):
    """(queries, prompt images, prompt masks) of one prompt set of n rows (the query repeated)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 3, SIZE, SIZE, generator=g).expand(n, -1, -1, -1) if same_query else torch.randn(n, 3, SIZE, SIZE, generator=g)
    return q.contiguous(), torch.randn(n, 3, SIZE, SIZE, generator=g), torch.randn(n, 3, SIZE, SIZE, generator=g)


def transformers_pred(model, q, im, ms, **kwargs):
    with torch.no_grad():
        return model(pixel_values=q, prompt_pixel_values=im, prompt_masks=ms, **kwargs).pred_masks


# --- attention ---------------------------------------------------------------------------------------
def test_sdpa_attention_equals_transformers_eager_layer_float32():
    model = tiny_model()
    attn = model.model.encoder.layers[1].attention
    x = torch.randn(3, 8, 4, 32) * 2
    with torch.no_grad():
        eager = attn(x)[0]  # transformers' own SegGptAttention.forward
        torch.testing.assert_close(sdpa_attention(attn, x), eager, atol=1e-5, rtol=1e-5)
        # the relative-position terms are part of what is compared: without them the answer moves
        attn.rel_pos_h.zero_()
        attn.rel_pos_w.zero_()
        assert (sdpa_attention(attn, x) - eager).abs().max() > 1e-2


def test_sdpa_attention_bfloat16_tolerance():
    """bfloat16: SDPA is as close to the float32 layer as transformers' eager bfloat16 layer is (within 1.5x),
    and within 5 % of the output's range of the eager bfloat16 answer."""
    model = tiny_model()
    attn = model.model.encoder.layers[1].attention
    x = torch.randn(3, 8, 4, 32) * 2
    with torch.no_grad():
        exact = attn(x)[0]
        low = tiny_model().to(torch.bfloat16).model.encoder.layers[1].attention
        eager, sdpa = low(x.bfloat16())[0].float(), sdpa_attention(low, x.bfloat16()).float()
    err_eager, err_sdpa = (eager - exact).abs().max(), (sdpa - exact).abs().max()
    assert err_sdpa <= 1.5 * err_eager
    assert (sdpa - eager).abs().max() <= 0.05 * exact.abs().max()


# --- the whole forward, transformers mode ----------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_transformers_mode_equals_transformers_model(n, attention):
    model = tiny_model()
    q, im, ms = rows(n)
    ref = transformers_pred(model, q, im, ms, **({"feature_ensemble": True} if n > 1 else {}))
    with torch.no_grad():
        ours = SegGptRunner(model, reference="transformers", attention=attention)(q, im, ms, [n]).pred_masks
    if attention == "eager":  # the same modules in the same order: the same numbers
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    else:  # float32 SDPA: within 1e-5 of the output's range
        assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_loss_equals_transformers_loss():
    """With labels and one masked row per prompt, the loss is transformers' SegGptLoss of transformers' forward."""
    model = tiny_model()
    q, im, ms = rows(3)
    labels = torch.randn(3, 3, SIZE, SIZE)
    patches = model.model.embeddings.patch_embeddings.num_patches
    masked = torch.zeros(3, patches, dtype=torch.bool)
    masked[:, patches // 2:] = True
    with torch.no_grad():
        ref = model(pixel_values=q, prompt_pixel_values=im, prompt_masks=ms, labels=labels, bool_masked_pos=masked,
                    feature_ensemble=True).loss
        ours = SegGptRunner(model, reference="transformers", attention="eager")(q, im, ms, [3], labels=labels).loss
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)


def test_bfloat16_forward_accuracy_cost():
    """bfloat16 vs float32 on the same tiny model (the documented cost): SDPA's error is within 2x eager's and
    within 10 % of the output's range (measured: eager 4 %, SDPA 6 %)."""
    model = tiny_model()
    q, im, ms = rows(3)
    ref = transformers_pred(model, q, im, ms, feature_ensemble=True)
    low = tiny_model().to(torch.bfloat16)
    with torch.no_grad():
        err = {a: (SegGptRunner(low, reference="transformers", attention=a)(q, im, ms, [3]).pred_masks.float() - ref)
               .abs().max() for a in ("eager", "sdpa")}
    assert err["sdpa"] <= 2 * err["eager"] and err["sdpa"] <= 0.1 * ref.abs().max()


# --- the official merge rule ---------------------------------------------------------------------------
def test_ensemble_plan_encodes_both_merge_rules():
    assert ensemble_plan(6, 2, "official") == ["streams", "streams", "streams", "rows", "rows", "rows"]
    assert ensemble_plan(6, 2, "transformers") == ["streams", "streams", "both", "rows", "rows", "rows"]
    assert ensemble_plan(3, 5, "official") == ensemble_plan(3, 5, "transformers") == ["streams"] * 3


def test_merge_layer_streams_averaged_separately_or_together():
    """Official: image-stream and mask-stream query halves averaged apart; transformers: all 2N rows together."""
    x = torch.randn(6, 4, 2, 5)  # 2 streams x 3 rows, 4 patch rows (the lower 2 are the query half)
    official = ensemble_query_half(x, [3], "streams")
    together = ensemble_query_half(x, [3], "both")
    assert torch.equal(official[:, :2], x[:, :2]) and torch.equal(together[:, :2], x[:, :2])  # prompt halves kept
    torch.testing.assert_close(official[:3, 2:], x[:3, 2:].mean(0, keepdim=True).expand(3, -1, -1, -1))
    torch.testing.assert_close(official[3:, 2:], x[3:, 2:].mean(0, keepdim=True).expand(3, -1, -1, -1))
    torch.testing.assert_close(together[:, 2:], x[:, 2:].mean(0, keepdim=True).expand(6, -1, -1, -1))


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_official_mode_equals_painter_and_differs_from_transformers(attention):
    model = tiny_model()
    q, im, ms = rows(3)
    painter = painter_pred(model, q, im, ms)
    with torch.no_grad():
        ours = SegGptRunner(model, reference="official", attention=attention)(q, im, ms, [3]).pred_masks
    torch.testing.assert_close(ours, painter, atol=1e-5, rtol=1e-5)
    assert (transformers_pred(model, q, im, ms, feature_ensemble=True) - painter).abs().max() > 1e-4


def layer_outputs(runner: SegGptRunner, q, im, ms, sizes) -> list[torch.Tensor]:
    """The MLP output of every encoder layer during one call."""
    seen: list[torch.Tensor] = []
    hooks = [layer.mlp.register_forward_hook(lambda _m, _i, out: seen.append(out.clone()))
             for layer in runner.model.model.encoder.layers]
    try:
        with torch.no_grad():
            runner(q, im, ms, sizes)
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_official_and_transformers_agree_where_the_rules_agree():
    """One prompt (no ensemble): official == transformers' model. Several: identical up to the merge layer, apart from it on."""
    model = tiny_model()
    q, im, ms = rows(1)
    with torch.no_grad():
        ours = SegGptRunner(model, reference="official", attention="eager")(q, im, ms, [1]).pred_masks
    assert torch.equal(ours, transformers_pred(model, q, im, ms))
    q, im, ms = rows(3)
    official = layer_outputs(SegGptRunner(model, reference="official", attention="eager"), q, im, ms, [3])
    hf = layer_outputs(SegGptRunner(model, reference="transformers", attention="eager"), q, im, ms, [3])
    merge = model.config.merge_index
    assert merge >= 1 and all(torch.equal(a, b) for a, b in zip(official[:merge], hf[:merge]))
    assert all((a - b).abs().max() > 1e-6 for a, b in zip(official[merge:], hf[merge:]))


# --- grouped sets ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("reference", ["official", "transformers"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_grouped_sets_give_each_sets_single_call_answer(reference, attention):
    """Sets of 3, 1, 2, 2 rows (each its own query) in one call: every set's rows equal its one-set call."""
    model = tiny_model()
    runner = SegGptRunner(model, reference=reference, attention=attention)
    sets = [rows(n, seed=10 + i) for i, n in enumerate([3, 1, 2, 2])]
    with torch.no_grad():
        together = runner(*(torch.cat(parts) for parts in zip(*sets)), [3, 1, 2, 2]).pred_masks
        start = 0
        for q, im, ms in sets:
            n = q.shape[0]
            alone = runner(q, im, ms, [n]).pred_masks
            torch.testing.assert_close(together[start:start + n], alone, atol=1e-6, rtol=1e-6)
            start += n
        # and the grouping matters: one big set of the same rows is a different ensemble
        big = runner(*(torch.cat(parts) for parts in zip(*sets)), [8]).pred_masks
    assert (big[:3] - together[:3]).abs().max() > 1e-4


def test_bad_group_sizes_are_refused():
    runner = SegGptRunner(tiny_model())
    q, im, ms = rows(3)
    with pytest.raises(ValueError, match="do not partition"):
        runner(q, im, ms, [2])


# --- compile ---------------------------------------------------------------------------------------------
def test_compiled_forward_gives_the_plain_answer():
    """compile= (here the fast "aot_eager" backend, which traces the same graphs) changes no answer, grouped or not."""
    torch._dynamo.reset()
    model = tiny_model(num_hidden_layers=2, merge_index=0, intermediate_hidden_state_indices=(0, 1))
    plain = SegGptRunner(model, reference="official", attention="sdpa")
    compiled = SegGptRunner(model, reference="official", attention="sdpa", compile="aot_eager")
    q, im, ms = rows(3)
    with torch.no_grad():
        for sizes in ([3], [1, 2]):
            torch.testing.assert_close(compiled(q, im, ms, sizes).pred_masks, plain(q, im, ms, sizes).pred_masks,
                                       atol=1e-6, rtol=1e-6)
    torch._dynamo.reset()


# --- a shared model is never changed ---------------------------------------------------------------------
def model_state(model) -> list:
    return [(name, type(m), sorted(vars(m)), m.training) for name, m in model.named_modules()] + \
           [(name, p.dtype, p.requires_grad) for name, p in model.named_parameters()]


def make_sample(i: int) -> Sample:
    rng = np.random.default_rng(i)
    return Sample(f"s{i}", "t", image=rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8),
                  mask=rng.integers(0, 2, (SIZE, SIZE)).astype(np.int64))


def backward_layer_runs(backend: SegGPTBackend) -> tuple[int, int, int]:
    """(MLP runs during the forward, MLP runs during the backward, tensors saved for backward) of one tuning loss."""
    runs = [0]  # a pre-hook: a recomputation stops early, inside the layer's last op, before any post-hook
    hooks = [layer.mlp.register_forward_pre_hook(lambda *_: runs.__setitem__(0, runs[0] + 1))
             for layer in backend.model.model.encoder.layers]
    saved = [0]

    def pack(t):
        saved[0] += 1
        return t

    ctx = Context.from_sample(make_sample(0), 2)
    ctx = Context(ctx.image.clone().requires_grad_(True), ctx.mask.clone().requires_grad_(True))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = backend.tuning_loss([ctx], [make_sample(1)], 2)
        forward = runs[0]
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
    assert ctx.image.grad is not None and ctx.image.grad.abs().sum() > 0
    return forward, runs[0] - forward, saved[0]


def test_checkpointing_is_per_backend_on_a_shared_model():
    """A checkpointing and a plain backend on one model: the second keeps its activations (issue 12 item 4)."""
    model = tiny_model()
    before = model_state(model)
    ckpt = SegGPTBackend(model, checkpointing=True, attention="eager")
    plain = SegGPTBackend(model, checkpointing=False)
    assert ckpt.model is model and plain.model is model  # shared, not copied
    assert model_state(model) == before  # constructing either changed nothing on the model
    layers = len(model.model.encoder.layers)
    fwd, bwd, saved_plain = backward_layer_runs(plain)
    assert (fwd, bwd) == (layers, 0)  # nothing recomputed: activations were kept
    fwd, bwd, saved_ckpt = backward_layer_runs(ckpt)
    assert (fwd, bwd) == (layers, layers)  # every encoder layer recomputed in the backward pass
    assert saved_ckpt < saved_plain
    fwd, bwd, again = backward_layer_runs(plain)  # and building / using the checkpointing one did not leak
    assert (fwd, bwd, again) == (layers, 0, saved_plain)
    assert model_state(model) == before


def test_a_model_that_is_not_ready_is_copied_not_changed():
    """A model in training mode, trainable, or of another dtype is copied; the caller's object stays as it was."""
    model = SegGptForImageSegmentation(tiny_config())  # fresh: training mode, requires_grad
    before = model_state(model)
    be = SegGPTBackend(model, dtype="bfloat16")
    assert be.model is not model and model_state(model) == before
    assert next(be.model.parameters()).dtype == torch.bfloat16 and not be.model.training
    assert all(not p.requires_grad for p in be.model.parameters())
    out = model(**{k: v[:1] for k, v in zip(("pixel_values", "prompt_pixel_values", "prompt_masks"), rows(1))})
    assert out.pred_masks.shape == (1, 3, 2 * SIZE, SIZE)  # still usable by transformers as before
