"""SegGPT backend on tiny random-init checkpoints: parity with transformers, ensembles, gradients, palette, errors.

The parity tests run the backend with ``reference="transformers"`` (the default,
"official", follows Painter's code, whose answers differ on purpose: see
tests/test_seggpt_reference.py and tests/test_seggpt_encoder.py).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import SegGptImageProcessor  # noqa: E402
from transformers.models.seggpt.image_processing_seggpt import build_palette  # noqa: E402

from promptopt.backends import backend_from_config, create_backend  # noqa: E402
from promptopt.backends.base import Context  # noqa: E402
from promptopt.backends.seggpt import SegGPTBackend, seggpt_palette, save_random_model  # noqa: E402
from promptopt.data import Sample, load_dataset, split_samples  # noqa: E402
from promptopt.errors import CheckpointError, ConfigError  # noqa: E402
from promptopt.oracle import ValidationOracle  # noqa: E402
from promptopt.strategies import ForwardSelector  # noqa: E402

SIZE = 32  # per-image input size of tiny_config()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random SegGPT saved as a transformers folder; the decoder head is scaled up so that the
    predicted colours spread over the palette (a plain random init paints everything near black)."""
    return save_random_model(tmp_path_factory.mktemp("seggpt-tiny"))


@pytest.fixture(scope="module")
def backend(checkpoint):
    """transformers' rules (processor, encoder, post-processing), against which these parity tests compare."""
    return SegGPTBackend.from_pretrained(checkpoint, reference="transformers")


def make_sample(i: int, h: int = SIZE, w: int = SIZE, classes: int = 2) -> Sample:
    rng = np.random.default_rng(i)
    return Sample(f"s{i}", "t", image=rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                  mask=rng.integers(0, classes, (h, w)).astype(np.int64))


def processor() -> SegGptImageProcessor:
    return SegGptImageProcessor(size={"height": SIZE, "width": SIZE})


def direct_call(model, prompts, query, num_labels=1, feature_ensemble=None):
    """transformers end to end: processor → model → (mean of rows) → post_process_semantic_segmentation."""
    proc = processor()
    n = len(prompts)
    inputs = proc(images=[query.image] * n, prompt_images=[p.image for p in prompts],
                  prompt_masks=[p.mask.astype(np.uint8) for p in prompts], num_labels=num_labels, return_tensors="pt")
    kwargs = {} if feature_ensemble is None else {"feature_ensemble": feature_ensemble}
    with torch.no_grad():
        out = model(**inputs, **kwargs)
    out = SimpleNamespace(pred_masks=out.pred_masks.mean(0, keepdim=True))
    return proc.post_process_semantic_segmentation(out, target_sizes=[query.size], num_labels=num_labels,
                                                   return_segmentation_scores=True)[0]


def test_parity_one_prompt(backend):
    p, q = make_sample(0), make_sample(1)
    ref = direct_call(backend.model, [p], q)
    probs = backend.predict([p], [q], 2)[0]
    assert probs.shape == (2, SIZE, SIZE)
    assert torch.equal(probs.argmax(0), ref.segmentation)
    assert 0.05 < ref.segmentation.float().mean() < 0.95  # the head's colours do span both classes
    expected = torch.softmax(ref.segmentation_scores / 255.0**2 / backend.temperature, dim=0)
    torch.testing.assert_close(probs, expected, atol=1e-4, rtol=1e-4)


def test_parity_with_resize(backend):
    """Queries and prompts of other sizes: bicubic/nearest resizes as the processor does (rounding to uint8)."""
    p, q = make_sample(2, 45, 70), make_sample(3, 50, 61)
    ref = direct_call(backend.model, [p], q)
    probs = backend.predict([p], [q], 2)[0]
    assert probs.shape == (2, 50, 61)
    assert torch.equal(probs.argmax(0), ref.segmentation)
    inputs = processor()(images=q.image, prompt_images=p.image, prompt_masks=p.mask.astype(np.uint8), num_labels=1,
                         return_tensors="pt")
    assert torch.equal(backend.query_input(q), inputs["pixel_values"][0])
    assert torch.equal(backend.prompt_input(p, 2)[0], inputs["prompt_pixel_values"][0])
    assert torch.equal(backend.prompt_input(p, 2)[1], inputs["prompt_masks"][0])


def test_feature_ensemble_equals_manual_call(backend):
    prompts, q = [make_sample(i) for i in (4, 5, 6)], make_sample(7)
    ref = direct_call(backend.model, prompts, q, feature_ensemble=True)
    probs = backend.predict(prompts, [q], 2)[0]
    expected = torch.softmax(ref.segmentation_scores / 255.0**2 / backend.temperature, dim=0)
    torch.testing.assert_close(probs, expected, atol=1e-4, rtol=1e-4)
    # the ensemble really changes the answer, and the N rows are reduced by their mean, not row 0
    alone = direct_call(backend.model, prompts, q, feature_ensemble=False)
    assert not torch.allclose(ref.segmentation_scores, alone.segmentation_scores)


def test_feature_ensemble_rows_differ_and_mean_is_used(backend):
    prompts, q = [make_sample(i) for i in (4, 5)], make_sample(7)
    proc = processor()
    inputs = proc(images=[q.image] * 2, prompt_images=[p.image for p in prompts],
                  prompt_masks=[p.mask.astype(np.uint8) for p in prompts], num_labels=1, return_tensors="pt")
    with torch.no_grad():
        rows = backend.model(**inputs, feature_ensemble=True).pred_masks
    half = rows[:, :, SIZE:]
    assert not torch.allclose(half[0], half[1])
    mean_probs = backend.decode(half.mean(0), 2)
    torch.testing.assert_close(backend.predict(prompts, [q], 2)[0], mean_probs, atol=1e-5, rtol=1e-5)


def test_one_prompt_runs_without_feature_ensemble(backend, monkeypatch):
    """One prompt: every row is its own set (no ensemble), rows of several queries share a call; two prompts: one set."""
    seen = []
    original = backend._forward

    def spy(queries, images, masks, sizes, labels=None):
        seen.append(list(sizes))
        return original(queries, images, masks, sizes, labels)

    monkeypatch.setattr(backend, "_forward", spy)
    backend.predict([make_sample(0)], [make_sample(1), make_sample(2)], 2)
    assert seen == [[1, 1]]
    backend.predict([make_sample(0), make_sample(3)], [make_sample(1)], 2)
    assert seen[-1] == [2]


def test_output_ensemble_is_mean_of_single_runs(checkpoint):
    be = SegGPTBackend.from_pretrained(checkpoint, ensemble="output", batch_size=2)
    assert be.combines == "output" and be.has_pair_stats
    prompts, queries = [make_sample(i) for i in (10, 11, 12)], [make_sample(13), make_sample(14, 40, 30)]
    probs = be.predict(prompts, queries, 2)
    for q, pr in zip(queries, probs):
        singles = torch.stack([be.predict([p], [q], 2)[0] for p in prompts]).mean(0)
        torch.testing.assert_close(pr, singles, atol=1e-5, rtol=1e-5)
        from_pairs = be.predict_from_pairs(prompts, [q], 2)[0]
        torch.testing.assert_close(pr, from_pairs, atol=1e-5, rtol=1e-5)


def test_gradients_reach_prompt_tensors_only(checkpoint):
    be = SegGPTBackend.from_pretrained(checkpoint, checkpointing=True)
    before = {k: v.clone() for k, v in be.model.state_dict().items()}
    ctxs = []
    for i in (20, 21):
        c = Context.from_sample(make_sample(i, 40, 40), 2)
        ctxs.append(Context(c.image.clone().requires_grad_(True), c.mask.clone().requires_grad_(True)))
    loss = be.tuning_loss(ctxs, [make_sample(22), make_sample(23)], 2)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for c in ctxs:
        assert c.image.grad is not None and c.image.grad.abs().sum() > 0
        assert c.mask.grad is not None and c.mask.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in be.model.parameters())
    after = be.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # predictions are differentiable too
    be.predict(ctxs, [make_sample(24)], 2)[0][1].mean().backward()


def test_tuning_loss_averages_over_prompts(backend):
    """One row per prompt in bool_masked_pos: N copies of the same prompt give the single-prompt loss."""
    c = Context.from_sample(make_sample(30), 2)
    q = [make_sample(31)]
    with torch.no_grad():
        one = backend.tuning_loss([c], q, 2)
        be_out = SegGPTBackend(backend.model, ensemble="output")
        three = be_out.tuning_loss([c, c, c], q, 2)
    torch.testing.assert_close(one, three, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [2, 3, 5, 9, 21])
def test_semantic_palette_round_trip(backend, k):
    assert seggpt_palette(k).tolist() == [list(c) for c in build_palette(k - 1)]
    mask = torch.arange(k).repeat_interleave(3).reshape(1, -1).expand(4, -1)
    onehot = torch.nn.functional.one_hot(mask, k).permute(2, 0, 1).float()
    rgb = backend.mask_to_rgb(onehot)
    np.testing.assert_array_equal(
        (rgb * 255).round().to(torch.uint8).numpy(),
        processor().mask_to_rgb(mask.numpy(), palette=build_palette(k - 1)),
    )
    pred = backend.codec.normalise(rgb)  # a perfect prediction of the mask decodes back to its ids
    assert torch.equal(backend.decode(pred, k).argmax(0), mask)
    official = SegGPTBackend(backend.model)  # the official rules read a perfect picture back the same way
    assert torch.equal(official.decode(pred, k).argmax(0), mask)


def test_semantic_embedding_and_multiclass_predict(checkpoint):
    be = SegGPTBackend.from_pretrained(checkpoint, embedding_type="semantic", reference="transformers")
    p, q = make_sample(40, classes=4), make_sample(41)
    probs = be.predict([p], [q], 4)[0]
    assert probs.shape == (4, SIZE, SIZE)
    torch.testing.assert_close(probs.sum(0), torch.ones(SIZE, SIZE))
    proc = processor()
    inputs = proc(images=q.image, prompt_images=p.image, prompt_masks=p.mask.astype(np.uint8), num_labels=3,
                  return_tensors="pt")
    with torch.no_grad():
        out = be.model(**inputs, embedding_type="semantic")
    seg = proc.post_process_semantic_segmentation(out, target_sizes=[q.size], num_labels=3)[0]
    assert torch.equal(probs.argmax(0), seg)
    with pytest.raises(ConfigError, match="embedding_type"):
        SegGPTBackend(be.model, embedding_type="panoptic")


def test_missing_checkpoint_errors(tmp_path):
    with pytest.raises(ConfigError, match="needs a checkpoint"):
        create_backend("seggpt")
    with pytest.raises(CheckpointError, match="not found"):
        SegGPTBackend.from_pretrained(tmp_path / "absent")
    with pytest.raises(CheckpointError, match="no config.json"):
        SegGPTBackend.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache.*huggingface-cli download"):
        SegGPTBackend.from_pretrained("BAAI/seggpt-vit-large-not-cached")


def test_config_round_trip(checkpoint):
    be = create_backend("seggpt", str(checkpoint), {"ensemble": "output", "temperature": 0.1})
    assert be.config()["options"]["reference"] == "official" and be.attention == "sdpa" and be.compile is False
    cfg = json.loads(json.dumps(be.config()))
    again = backend_from_config(cfg)
    assert isinstance(again, SegGPTBackend) and again.config() == cfg
    assert again.ensemble == "output" and again.combines == "output" and again.temperature == 0.1
    opts = {"reference": "transformers", "attention": "eager", "compile": "aot_eager"}
    cfg = json.loads(json.dumps(create_backend("seggpt", str(checkpoint), opts).config()))
    again = backend_from_config(cfg)
    assert {k: cfg["options"][k] for k in opts} == opts and again.config() == cfg
    assert (again.reference, again.attention, again.compile) == ("transformers", "eager", "aot_eager")


@pytest.mark.parametrize("option, value, needle", [
    ("reference", "painter", "reference must be one of"),
    ("attention", "flash", "attention must be one of"),
    ("compile", "no-such-backend", "compile must be"),
    ("compile", 3, "compile must be true or false"),
])
def test_bad_options_are_one_line_errors(backend, option, value, needle):
    with pytest.raises(ConfigError, match=needle):
        SegGPTBackend(backend.model, **{option: value})


def test_memory_estimate_is_the_calibrated_model_of_the_largest_call(checkpoint):
    """Off CUDA the figure is memory_models' (calibrated on the H100) for the largest call the backend makes:
    grouped feature-ensemble sets fill batch_size rows; output-ensemble maps grow with k; the input cache
    counts at its cap so the figure never depends on what happens to be cached."""
    from promptopt.backends.memory_models import seggpt_inference_memory

    feat = SegGPTBackend.from_pretrained(checkpoint)  # batch_size 4
    out = SegGPTBackend.from_pretrained(checkpoint, ensemble="output", batch_size=2)
    assert feat.memory_kind == "analytic estimate"
    m = {k: feat.memory_bytes(k, (480, 854)) for k in (1, 2, 4, 8)}
    assert m[1] == m[2] == m[4] < m[8]  # up to batch_size rows per call whatever k
    assert m[8] == seggpt_inference_memory(feat.model, dtype=torch.float32, k=8, image_size_hw=(480, 854),
                                           attention="sdpa", resident_bytes=feat.cache_bytes).total
    assert out.memory_bytes(16) > out.memory_bytes(2)  # k averaged maps, batch_size rows
    feat.prepare(load_dataset(pytest.importorskip("promptopt.data").bundled_sample_root(), category="dog").samples()[:3])
    assert feat.memory_bytes(8, (480, 854)) == m[8]


@pytest.mark.parametrize("tuning", [False, True])
def test_cuda_figure_profiles_the_exact_call_once_per_shape(checkpoint, tuning):
    """The CUDA path (run here with the measurement replaced) profiles the exact call — the grouped rows of an
    inference, or contexts x images of a tuning step with its backward — once per shape, and answers weights
    + input cache cap + increment x (1 + margin) without counting the profiling as model work."""
    from promptopt.memory import PROFILE_MARGIN

    be = SegGPTBackend.from_pretrained(checkpoint)
    runs: list[int] = []

    def measure(fn, device):
        fn()  # the real call, on the CPU
        runs.append(be.model_rows)
        return 1000

    shape = (2, 3) if tuning else 6
    first = be._profiled_peak(shape, (48, 64), tuning=tuning, measure=measure)
    assert first == be.weight_bytes + be.cache_bytes + int(np.ceil(1000 * (1 + PROFILE_MARGIN)))
    assert be._profiled_peak(shape, (48, 64), tuning=tuning) == first and len(runs) == 1  # cached
    other = (2, 4) if tuning else 7
    be._profiled_peak(other, (48, 64), tuning=tuning)
    assert be._profiler.measurements == 2
    assert be.model_calls == 0 and be.model_rows == 0 and not len(be._inputs)  # profiling left no trace
    assert all(p.grad is None for p in be.model.parameters())


def test_oracle_and_forward_selection(checkpoint):
    root = pytest.importorskip("promptopt.data").bundled_sample_root()
    split = split_samples(load_dataset(root, category="dog").samples(), seed=0)
    pool, val = split.pool[:4], split.val[:2]
    for ensemble in ("feature", "output"):
        be = SegGPTBackend.from_pretrained(checkpoint, ensemble=ensemble)
        oracle = ValidationOracle(be, val, num_classes=2)
        exact = oracle.score(pool[:2])
        probs = be.predict(sorted(pool[:2], key=lambda s: s.key), val, 2)
        assert 0.0 <= exact.miou <= 1.0 and probs[0].shape == (2, *val[0].size)
        sel = ForwardSelector(oracle, max_prompts=2, shortlist=2 if ensemble == "feature" else None).fit(pool)
        assert 1 <= len(sel.selected_) <= 2 and 0.0 <= sel.score_ <= 1.0
        if ensemble == "output":
            assert oracle.uses_pair_cache and oracle.forwards <= len(pool) * len(val)


def test_cli_evaluate(checkpoint):
    from typer.testing import CliRunner

    from promptopt.cli import app
    from promptopt.data import bundled_sample_root

    r = CliRunner().invoke(app, ["evaluate", "--data", str(bundled_sample_root()), "--category", "dog",
                                 "--backend", "seggpt", "--checkpoint", str(checkpoint), "--shots", "2", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert 0.0 <= doc["val"]["miou"] <= 1.0 and len(doc["prompts"]) == 2
    r = CliRunner().invoke(app, ["evaluate", "--data", str(bundled_sample_root()), "--category", "dog",
                                 "--backend", "seggpt", "--shots", "1"])
    assert r.exit_code == 2 and "needs a checkpoint" in r.output


def test_bfloat16_and_fp16_fallback(checkpoint):
    p, q = make_sample(50), make_sample(51)
    ref = SegGPTBackend.from_pretrained(checkpoint).predict([p], [q], 2)[0]
    bf = SegGPTBackend.from_pretrained(checkpoint, dtype="bfloat16")
    assert next(bf.model.parameters()).dtype == torch.bfloat16 and bf.config()["options"]["dtype"] == "bfloat16"
    out = bf.predict([p], [q], 2)[0]
    assert out.dtype == torch.float32 and (out.argmax(0) == ref.argmax(0)).float().mean() > 0.8
    with pytest.warns(UserWarning, match="float16 is not supported on CPU"):
        half = SegGPTBackend.from_pretrained(checkpoint, dtype="float16")
    assert half.dtype == torch.float32
