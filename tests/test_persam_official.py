"""reference="official": each Personalize-SAM rule asserted directly, on tiny random SamModels.

The rules were read in github.com/ZrrSkywalker/Personalize-SAM (``per_segment_anything/modeling/
transformer.py`` and ``mask_decoder.py``, ``predictor.py``, ``sam.py``, ``persam.py``, ``persam_f.py``);
the expected values below are computed here from those rules, independently of the code under test.
A transformers upgrade that changes the layers the official forwards replace makes the guards fail.
(End-to-end parity with the official scripts themselves: ``benchmarks/parity_persam_official.py``.)
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_persam_backend import blobs, sam_dir, tiny_sam_model  # noqa: F401  (fixtures)

from promptopt.backends import persam as persam_module
from promptopt.backends.persam import PerSAMBackend, location_confidence, mask_to_box
from promptopt.backends.persam_official import mean_max_target, official_decoder, reference_cells
from promptopt.data import Sample

pytest.importorskip("transformers")
torch.set_num_threads(1)


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """(1, 1, N, C) → (1, n, N, C/n), the head split of SAM's attention."""
    return x.reshape(1, x.shape[2], n, -1).transpose(1, 2)


def _attend(attn, probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """SAM attention's output for given probabilities: heads of v_proj, weighted sum, heads merged, out_proj."""
    out = probs @ _heads(attn.v_proj(value), attn.num_attention_heads)
    return attn.out_proj(out.transpose(1, 2).reshape(1, 1, out.shape[2], -1))


@pytest.fixture(scope="module")
def model():
    return tiny_sam_model()


@pytest.fixture(scope="module")
def attention_case(model):
    attn = model.mask_decoder.transformer.layers[0].cross_attn_token_to_image
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, n, 32, generator=g) for n in (7, 64, 64))
    sim = torch.rand(1, 1, 1, 64, generator=g) * 3
    with torch.no_grad():
        d = attn.internal_dim // attn.num_attention_heads
        logits = _heads(attn.q_proj(q), 2) @ _heads(attn.k_proj(k), 2).transpose(-1, -2) / math.sqrt(d)
    return attn, q, k, v, sim, logits


# --- decoder: target-guided attention --------------------------------------------------------------------

def test_official_token_to_image_probabilities_are_softmax_of_softmax_plus_similarity(model, attention_case):
    attn, q, k, v, sim, logits = attention_case
    expected = torch.softmax(torch.softmax(logits, -1) + sim, -1)
    with torch.no_grad(), official_decoder(model.mask_decoder):
        out, probs = attn(query=q, key=k, value=v, attention_similarity=sim)
        assert torch.allclose(probs, expected, atol=1e-6)
        assert torch.allclose(out, _attend(attn, expected, v), atol=1e-5)
    single = torch.softmax(logits + sim, -1)
    assert float((expected - single).abs().max()) > 1e-2  # the two rules are far apart on these inputs


def test_transformers_attention_adds_similarity_to_logits_before_one_softmax(attention_case):
    """Guard: transformers' own rule (reference="transformers"); if an upgrade changes it, this fails."""
    attn, q, k, v, sim, logits = attention_case
    with torch.no_grad():
        native, _ = attn(query=q, key=k, value=v, attention_similarity=sim)
        plain, _ = attn(query=q, key=k, value=v)
        assert torch.allclose(native, _attend(attn, torch.softmax(logits + sim, -1), v), atol=1e-5)
        assert torch.allclose(plain, _attend(attn, torch.softmax(logits, -1), v), atol=1e-5)


def test_official_attention_without_similarity_equals_transformers_layer(model, attention_case):
    """Guard: the installed forward is transformers' SamAttention maths when no similarity is given."""
    attn, q, k, v, _, logits = attention_case
    with torch.no_grad():
        native, _ = attn(query=q, key=k, value=v)
        with official_decoder(model.mask_decoder):
            mine, probs = attn(query=q, key=k, value=v)
    assert torch.allclose(mine, native, atol=1e-6)
    assert torch.allclose(probs, torch.softmax(logits, -1), atol=1e-6)


# --- decoder: target-semantic prompting ------------------------------------------------------------------

def _capture_decoder(model, official: bool, target, sim=None):
    """Run SamModel once and record the two-way transformer's inputs, each block's inputs and outputs,
    and the final token→image attention's query."""
    dec = model.mask_decoder.transformer
    seen: dict[str, list] = {"tokens": [], "queries": [], "query_pe": [], "out": [], "final": []}
    hooks = [
        dec.register_forward_pre_hook(lambda m, a, kw: seen["tokens"].append(kw["point_embeddings"].clone()),
                                      with_kwargs=True),
        dec.final_attn_token_to_image.register_forward_pre_hook(
            lambda m, a, kw: seen["final"].append(kw["query"].clone()), with_kwargs=True),
    ]

    def block_inputs(module, args, kw):
        seen["queries"].append(kw["queries"].clone())
        seen["query_pe"].append(kw["query_point_embedding"].clone())

    for layer in dec.layers:
        hooks.append(layer.register_forward_pre_hook(block_inputs, with_kwargs=True))
        hooks.append(layer.register_forward_hook(lambda m, a, out: seen["out"].append(out[0].clone())))
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(1, 32, 8, 8, generator=g)
    kwargs = dict(image_embeddings=emb, input_points=torch.tensor([[[[10.0, 12.0], [50.0, 30.0]]]]),
                  input_labels=torch.tensor([[[1, 0]]]), multimask_output=True)
    if target is not None:
        kwargs["target_embedding"] = target
    if sim is not None:
        kwargs["attention_similarity"] = sim
    try:
        with torch.no_grad(), (official_decoder(model.mask_decoder) if official else contextlib.nullcontext()):
            out = model(**kwargs)
    finally:
        for h in hooks:
            h.remove()
    return seen, out.pred_masks


def test_official_target_enters_every_query_and_query_pe_and_twice_the_final_query(model):
    t = torch.randn(1, 1, 32, generator=torch.Generator().manual_seed(3))
    seen, official_masks = _capture_decoder(model, True, t)
    pe = seen["tokens"][0]
    n = len(model.mask_decoder.transformer.layers)
    assert n == 2
    for i in range(n):  # Personalize-SAM: `queries += target` aliases the token tensor used as query PE
        assert torch.allclose(seen["query_pe"][i], pe + t, atol=1e-6)
    assert torch.allclose(seen["queries"][0], pe + t, atol=1e-6)
    assert torch.allclose(seen["queries"][1], seen["out"][0] + t, atol=1e-6)
    assert torch.allclose(seen["final"][0], seen["out"][1] + pe + 2 * t, atol=1e-5)  # `q += target` once more
    # transformers: the same blocks (no similarity here), the final query without the extra target
    tf_seen, tf_masks = _capture_decoder(model, False, t)
    for i in range(n):
        assert torch.allclose(tf_seen["query_pe"][i], pe + t, atol=1e-6)
        assert torch.allclose(tf_seen["out"][i], seen["out"][i], atol=1e-5)
    assert torch.allclose(seen["final"][0] - tf_seen["final"][0], t.expand_as(seen["final"][0]), atol=1e-5)
    assert float((official_masks - tf_masks).abs().max()) > 1e-3


def test_official_decoder_equals_transformers_without_persam_inputs_and_differs_with_each(model):
    t = torch.randn(1, 1, 32, generator=torch.Generator().manual_seed(4))
    sim = torch.rand(1, 1, 1, 64, generator=torch.Generator().manual_seed(5))
    _, a = _capture_decoder(model, True, None)
    _, b = _capture_decoder(model, False, None)
    assert torch.allclose(a, b, atol=1e-5)
    for target, s in ((t, None), (None, sim)):
        _, a = _capture_decoder(model, True, target, s)
        _, b = _capture_decoder(model, False, target, s)
        assert float((a - b).abs().max()) > 1e-3


def test_official_semantics_never_leak_into_other_holders_of_the_model(sam_dir, blobs):
    from transformers import SamModel

    shared = SamModel.from_pretrained(sam_dir)
    off = PerSAMBackend(model=shared, reference="official")
    tf = PerSAMBackend(model=shared, reference="transformers")
    emb = off.image_state(blobs[0]).embedding
    pts, lab = [(10.0, 12.0), (50.0, 30.0)], [1, 0]
    sim, tgt = torch.rand(1, 1, 1, 64), torch.randn(32)

    def direct():
        with torch.no_grad():
            return shared(image_embeddings=emb, input_points=torch.tensor([[pts]]), input_labels=torch.tensor([[lab]]),
                          attention_similarity=sim, target_embedding=tgt.view(1, 1, -1)).pred_masks[0, 0]

    def untouched():
        return all("forward" not in vars(m) for m in shared.modules())

    before = direct()
    a, _ = off.decode(emb, pts, lab, attention_similarity=sim, target=tgt)
    b, _ = tf.decode(emb, pts, lab, attention_similarity=sim, target=tgt)
    c, _ = off.decode(emb, pts, lab, attention_similarity=sim, target=tgt)
    assert untouched() and torch.equal(direct(), before) and torch.equal(b, before)
    assert torch.equal(a, c) and float((a - b).abs().max()) > 1e-3
    with pytest.raises(Exception):  # a failing call (malformed box) inside the official forwards
        off.decode(emb, pts, lab, box=[1.0, 2.0, 3.0], attention_similarity=sim, target=tgt)
    assert untouched() and torch.equal(direct(), before)


# --- geometry --------------------------------------------------------------------------------------------

def test_reference_cells_sample_the_padded_normalised_mask_at_cell_centres():
    """64 px input, 8x8 grid: a cell's bilinear sample sits between pixels 8i+3 and 8i+4 in each axis."""
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[19:21, 43:45] = True  # 4 of cell (2, 5)'s 64 pixels, around its sampling point
    mask[48:56, 8:16] = True
    mask[51:53, 11:13] = False  # cell (6, 1) 94 % covered, but not at its sampling point
    cells = reference_cells(mask, (64, 64), 64, (8, 8))
    assert cells.nonzero().tolist() == [[2, 5]]
    # a 2:1 image: rows below the image are zero padding (never inside); a sampling point half on the mask
    # counts, since white's normalised value (2.25) outweighs black's (-2.12)
    wide = torch.zeros(32, 64, dtype=torch.bool)
    wide[28:, :] = True
    cells = reference_cells(wide, (32, 64), 64, (8, 8))
    assert cells[3].all() and not cells[4:].any() and not cells[:3].any()


def test_official_and_transformers_targets_use_their_own_cell_rules(sam_dir):
    img = np.random.default_rng(1).integers(0, 255, (64, 64, 3)).astype(np.uint8)
    mask = np.zeros((64, 64), np.int64)
    mask[19:21, 43:45] = 1
    mask[48:56, 8:16] = 1
    mask[51:53, 11:13] = 0
    ref = Sample("r", "cells", image=img, mask=mask)
    speck = np.zeros((64, 64), np.int64)
    speck[:2, :2] = 1  # reaches no sampling point: the official code would average no cell (NaN)
    tiny = Sample("t", "cells", image=img, mask=speck)
    for reference, cell in (("official", (2, 5)), ("transformers", (6, 1))):
        be = PerSAMBackend.from_pretrained(sam_dir, reference=reference)
        feats = be.image_state(ref).embedding[0].float()
        assert torch.allclose(be.targets(ref, 2)[1].semantic, feats[:, cell[0], cell[1]], atol=1e-6)
        assert torch.allclose(be.targets(tiny, 2)[1].semantic, feats[:, 0, 0], atol=1e-6)  # fallback: touched cells
    area = PerSAMBackend.from_pretrained(sam_dir, min_cover=0.9)  # a number: the area rule, also in official mode
    assert torch.allclose(area.targets(ref, 2)[1].semantic, feats[:, 6, 1], atol=1e-6)


class _Spy:
    """Records every decode() call of a backend (its arguments and outputs)."""

    def __init__(self, be):
        self.calls, self._decode = [], be.decode
        be.decode = self

    def __call__(self, emb, points, labels, **kw):
        out = self._decode(emb, points, labels, **kw)
        self.calls.append(dict(points=points, labels=labels, out=out, **kw))
        return out


def _official_dense(sim: torch.Tensor, reshaped, original) -> torch.Tensor:
    """Personalize-SAM: ×4 bilinear, SAM's postprocess_masks (to 64 px, crop, to the original size)."""
    x = F.interpolate(sim[None, None], scale_factor=4, mode="bilinear", align_corners=False)
    x = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)[..., : reshaped[0], : reshaped[1]]
    return F.interpolate(x, size=original, mode="bilinear", align_corners=False)[0, 0]


def _postprocess(logits: torch.Tensor, reshaped, original) -> torch.Tensor:
    x = F.interpolate(logits[None, None], size=(64, 64), mode="bilinear", align_corners=False)
    x = x[..., : reshaped[0], : reshaped[1]]
    return F.interpolate(x, size=original, mode="bilinear", align_corners=False)[0, 0]


def _to_original(xy, reshaped, original):
    return round(xy[0] * original[1] / reshaped[1]), round(xy[1] * original[0] / reshaped[0])


def test_official_persam_cascade_points_attention_boxes_and_mask_at_original_resolution(sam_dir, blobs):
    be = PerSAMBackend.from_pretrained(sam_dir)
    spy = _Spy(be)
    ref, query = blobs[0], blobs[1]
    prob = be.pair_stats(ref, query, 2)["sum"][0]
    st = be.image_state(query)
    (hr, wr), (h, w) = st.reshaped, st.original
    assert (h, w) == (48, 80) and (hr, wr) == (38, 64)
    target = be.targets(ref, 2)[1]
    dense = _official_dense(location_confidence(target.semantic, st.embedding[0]), st.reshaped, st.original)
    first, second, third = spy.calls
    # step 1: the points are the extremes of the similarity at the query's original resolution, rescaled
    (px, py), (nx, ny) = (_to_original(p, st.reshaped, st.original) for p in first["points"])
    assert first["labels"] == [1, 0] and float(dense[py, px]) == pytest.approx(float(dense.max()), abs=1e-6)
    assert float(dense[ny, nx]) == pytest.approx(float(dense.min()), abs=1e-6)
    for x, y in first["points"]:
        assert x * w / wr == pytest.approx(round(x * w / wr), abs=1e-4)  # an original pixel, scaled by wr/W
    # the attention similarity: full-resolution map standardised (unbiased std), resized to the grid, sigmoid
    z = (dense - dense.mean()) / dense.std()
    expected = torch.sigmoid(F.interpolate(z[None, None], size=(8, 8), mode="bilinear", align_corners=False))
    assert torch.allclose(first["attention_similarity"], expected.reshape(1, 1, 1, 64), atol=1e-5)
    assert torch.equal(first["target"], target.semantic) and first["multimask"] is False
    # step 2: the mask alone; step 3: its box, from the mask at the original resolution
    assert torch.equal(second["mask_input"], first["out"][0][0]) and "attention_similarity" not in second
    best = second["out"][0][int(second["out"][1].argmax())]
    x0, y0, x1, y1 = mask_to_box(_postprocess(best, st.reshaped, st.original) > 0)
    assert third["box"] == pytest.approx([x0 * wr / w, y0 * hr / h, x1 * wr / w, y1 * hr / h])
    final = third["out"][0][int(third["out"][1].argmax())]
    # the probability is the sigmoid of SAM's post-processed logits: p > 1/2 is exactly the official mask
    assert prob.shape == (h, w)
    assert torch.allclose(prob, torch.sigmoid(_postprocess(final, st.reshaped, st.original)), atol=1e-6)


def test_mean_max_target_is_half_the_mean_plus_the_channel_max():
    feats = torch.tensor([[[1.0, 5.0], [3.0, 100.0]], [[-2.0, -4.0], [0.0, 100.0]]])  # (2, 2, 2)
    inside = torch.tensor([[True, True], [True, False]])
    assert mean_max_target(feats, inside).tolist() == pytest.approx([(3.0 + 5.0) / 2, (-2.0 + 0.0) / 2])


@pytest.mark.parametrize("reference", ["official", "transformers"])
def test_persam_f_training_and_test_points_and_training_resolution(sam_dir, blobs, monkeypatch, reference):
    fits = []
    real_fit = persam_module.fit_mask_weights
    monkeypatch.setattr(persam_module, "fit_mask_weights",
                        lambda logits, target, valid, steps, lr: fits.append((logits, target, valid))
                        or real_fit(logits, target, valid, steps, lr))
    be = PerSAMBackend.from_pretrained(sam_dir, variant="persam-f", train_steps=5, reference=reference)
    spy = _Spy(be)
    ref, query = blobs[0], blobs[1]
    be.pair_stats(ref, query, 2)
    target = be.targets(ref, 2)[1]
    st_ref, st_q = be.image_state(ref), be.image_state(query)
    cells = reference_cells(torch.as_tensor(ref.mask == 1), st_ref.reshaped, 64, (8, 8)) if reference == "official" \
        else None
    logits, gt, valid = fits[0]
    if reference == "official":  # (mean + max) / 2 of the reference's cells, full-resolution training
        assert torch.allclose(target.location, mean_max_target(st_ref.embedding[0], cells), atol=1e-6)
        assert logits.shape == (3, *ref.size) and torch.equal(gt, torch.as_tensor(ref.mask == 1).float())
        assert bool(valid.all())
        assert torch.allclose(logits, _postprocess_3(spy.calls[0]["out"][0], st_ref), atol=1e-5)
    else:  # mean target, SAM's low-res grid
        assert torch.equal(target.location, target.semantic)
        assert logits.shape == (3, 32, 24)  # 60x44 → 64x47 → 32x24 of the 32x32 grid
    # training point (first decode: on the reference) and test-time point (second: on the query)
    for call, st in ((spy.calls[0], st_ref), (spy.calls[1], st_q)):
        sim = location_confidence(target.location, st.embedding[0])
        if reference == "official":
            dense = _official_dense(sim, st.reshaped, st.original)
            x, y = _to_original(call["points"][0], st.reshaped, st.original)
        else:
            dense = F.interpolate(sim[None, None], size=(64, 64), mode="bilinear")[0, 0]
            dense = dense[: st.reshaped[0], : st.reshaped[1]]
            x, y = (round(v) for v in call["points"][0])
        assert call["labels"] == [1] and float(dense[y, x]) == pytest.approx(float(dense.max()), abs=1e-6)


def _postprocess_3(logits: torch.Tensor, st) -> torch.Tensor:
    return torch.stack([_postprocess(x, st.reshaped, st.original) for x in logits])


def test_official_and_transformers_predictions_differ_end_to_end(sam_dir, blobs):
    outs = {r: PerSAMBackend.from_pretrained(sam_dir, reference=r).predict(blobs[:1], blobs[1:3], 2)
            for r in ("official", "transformers")}
    for a, b in zip(outs["official"], outs["transformers"]):
        assert a.shape == b.shape and float((a - b).abs().max()) > 1e-2
