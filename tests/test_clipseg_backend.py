"""CLIPSeg backend on a tiny random-init checkpoint: parity with transformers, the authors' visual-prompt
recipe, the oracle's pair cache, semantic prompts, gradients and one-line errors."""

from __future__ import annotations

import string

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
scipy_ndimage = pytest.importorskip("scipy.ndimage")
from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor, CLIPTokenizer, ViTImageProcessor  # noqa: E402

from promptopt.backends import backend_from_config, create_backend  # noqa: E402
from promptopt.backends.base import Context, TextPrompt  # noqa: E402
from promptopt.backends.clipseg import (  # noqa: E402
    CLIPSegBackend,
    gaussian_blur,
    object_box,
    pad_to_square,
    tiny_config,
    visual_prompt,
)
from promptopt.backends.features import FeaturesBackend  # noqa: E402
from promptopt.data import Sample  # noqa: E402
from promptopt.errors import CheckpointError, ConfigError  # noqa: E402
from promptopt.oracle import ValidationOracle, prediction_to_labels  # noqa: E402

SIZE = 64  # the tiny processor's input size
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer over single letters (no merges): every lower-case phrase tokenises without <unk>."""
    letters = list(string.ascii_lowercase)
    vocab = ["<|startoftext|>", "<|endoftext|>"] + letters + [c + "</w>" for c in letters]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Tiny CLIPSeg + its processor saved as one transformers folder. The last transposed convolution is
    scaled down so that the random logits spread around 0 instead of saturating the sigmoid."""
    torch.manual_seed(0)
    model = CLIPSegForImageSegmentation(tiny_config())
    with torch.no_grad():
        model.decoder.transposed_convolution[-1].weight.mul_(0.02)
    processor = CLIPSegProcessor(
        image_processor=ViTImageProcessor(size={"height": SIZE, "width": SIZE}, image_mean=list(MEAN),
                                          image_std=list(STD)),
        tokenizer=tiny_clip_tokenizer())
    path = tmp_path_factory.mktemp("clipseg-tiny")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def backend(checkpoint):
    return CLIPSegBackend.from_pretrained(checkpoint)


def make_sample(i: int, h: int = 50, w: int = 70, classes: int = 2) -> Sample:
    """Random image with a rectangular object per foreground class (class c in its own band of rows)."""
    rng = np.random.default_rng(i)
    mask = np.zeros((h, w), np.int64)
    for c in range(1, classes):
        y = int(rng.integers(0, h // 2))
        x = int(rng.integers(0, w // 2))
        mask[y:y + h // 3, x:x + w // 3] = c
    return Sample(f"s{i}", "t", image=rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mask=mask)


def reference_probs(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """transformers logits (K, h, w) → class probabilities by the documented rule, computed longhand."""
    fg = F.interpolate(torch.sigmoid(logits)[None], size=size, mode="bilinear", align_corners=False)[0].clamp(0, 1)
    bg = 1 - fg.max(0).values
    probs = torch.cat([bg[None], fg])
    return probs / probs.sum(0, keepdim=True)


# --- parity with transformers' own forward ----------------------------------------------------------------

def test_text_prompt_matches_transformers_forward(backend, checkpoint):
    """predict(TextPrompt) == sigmoid of CLIPSegForImageSegmentation(processor(text, image)).logits, resized."""
    q = make_sample(1)
    processor = CLIPSegProcessor.from_pretrained(checkpoint)
    inputs = processor(text=["a cat"], images=[q.image], return_tensors="pt")
    with torch.no_grad():
        logits = backend.model(**inputs).logits
    probs = backend.predict([TextPrompt("a cat")], [q], 2)[0]
    assert probs.shape == (2, 50, 70)
    torch.testing.assert_close(probs, reference_probs(logits, (50, 70)), atol=1e-5, rtol=1e-5)
    fg = probs[1]
    assert 0.0 <= float(fg.min()) and float(fg.max()) <= 1.0 and 0.02 < float(fg.std())
    torch.testing.assert_close(probs.sum(0), torch.ones(50, 70))


def test_cached_activations_split_equals_full_forward(backend, checkpoint):
    """The encoder-once / decoder-per-condition split gives transformers' logits for a batch of phrases."""
    q = make_sample(2)
    processor = CLIPSegProcessor.from_pretrained(checkpoint)
    phrases = ["a dog", "red car", "tree"]
    inputs = processor(text=phrases, images=[q.image] * 3, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = backend.model(**inputs).logits
        mine = backend.decode(q, torch.stack([backend.text_condition(p) for p in phrases]))
    torch.testing.assert_close(mine, ref, atol=1e-4, rtol=1e-4)


def test_visual_prompt_reaches_model_as_conditional_pixel_values(backend):
    """An image prompt is the recipe's image passed as conditional_pixel_values (transformers' own path)."""
    p, q = make_sample(3), make_sample(4)
    image = torch.from_numpy(p.image).permute(2, 0, 1).float() / 255
    vp = visual_prompt(image, torch.from_numpy(p.mask == 1).float(), (SIZE, SIZE), torch.tensor(MEAN), torch.tensor(STD))
    pixels = backend.query_pixels(q)
    with torch.no_grad():
        ref = backend.model(pixel_values=pixels, conditional_pixel_values=vp[None]).logits
    st = backend.pair_stats(p, q, 2)
    torch.testing.assert_close(st["sum"], torch.sigmoid(ref), atol=1e-5, rtol=1e-5)
    assert st["count"].tolist() == [1.0]


def test_different_phrases_different_outputs(backend):
    """Different phrases give different predictions (the text reaches the model), the same phrase the same one."""
    q = make_sample(5)
    a = backend.pair_stats(TextPrompt("umbrella"), q, 2)["sum"]
    b = backend.pair_stats(TextPrompt("parasol"), q, 2)["sum"]
    again = backend.pair_stats(TextPrompt("umbrella"), q, 2)["sum"]
    assert (a - b).abs().max() > 1e-3
    torch.testing.assert_close(a, again)


# --- the authors' visual-prompt recipe --------------------------------------------------------------------

def test_gaussian_blur_is_opencv_gaussian_15x15_sigma3():
    """Same as cv2.GaussianBlur(img, (15, 15), 3) with REFLECT_101 borders (scipy's 'mirror', radius 7)."""
    x = torch.rand(3, 40, 33)
    ref = scipy_ndimage.gaussian_filter(x.numpy(), sigma=(0, 3, 3), mode="mirror", truncate=7 / 3)
    torch.testing.assert_close(gaussian_blur(x), torch.from_numpy(ref), atol=1e-5, rtol=1e-5)


def test_object_box_widens_by_ten_percent_of_extent():
    mask = torch.zeros(100, 100, dtype=torch.bool)
    mask[10:20, 20:40] = True  # 10 rows, 20 columns
    assert object_box(mask) == (9, 21, 18, 42)
    mask2 = torch.zeros(50, 60, dtype=torch.bool)
    mask2[0:50, 55:60] = True
    assert object_box(mask2) == (0, 50, 54, 60)  # clipped at the borders
    assert object_box(torch.zeros(8, 9, dtype=torch.bool)) == (0, 8, 0, 9)  # empty: the whole image


def test_pad_to_square_centres_the_crop():
    x = torch.ones(3, 4, 7)
    y = pad_to_square(x)
    assert y.shape == (3, 7, 7)
    assert y[:, 1:5].eq(1).all() and y[:, 0].eq(0).all() and y[:, 5:].eq(0).all()


def official_crop_blur_highlight(image_u8: np.ndarray, seg: np.ndarray, size: int) -> torch.Tensor:
    """A literal transcription of timojl/clipseg for ``crop_blur_highlight352`` (square inputs, as there):
    datasets/phrasecut.py load_sample (resize, /255, normalise) → evaluation_utils.img_preprocess(blur=3,
    bg_fac=0.1, center_context=0.1) → object_crop → crop_mask → pad_to_square; cv2's blur via scipy."""
    from torchvision.transforms.functional import pad

    img = torch.from_numpy(image_u8).permute(2, 0, 1).unsqueeze(0).float()
    seg_t = torch.from_numpy(seg.astype("uint8")).view(1, 1, *seg.shape)
    seg_t = F.interpolate(seg_t, (size, size), mode="nearest")[0, 0]
    img = F.interpolate(img, (size, size), mode="bilinear", align_corners=True)[0] / 255.0
    img = (img - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    mask = seg_t.float()
    img_bl = torch.from_numpy(scipy_ndimage.gaussian_filter(img.permute(1, 2, 0).numpy(), sigma=(3, 3, 0),
                                                            mode="mirror", truncate=7 / 3)).permute(2, 0, 1)
    img_inp = img * mask + 0.1 * img_bl * (1 - mask)
    context = 0.1
    bbox = [mask.max(0).values.argmax(), mask.size(0) - mask.max(0).values.flip(0).argmax()]
    bbox += [mask.max(1).values.argmax(), mask.size(1) - mask.max(1).values.flip(0).argmax()]
    bbox = [int(x) for x in bbox]
    width, height = (bbox[3] - bbox[2]), (bbox[1] - bbox[0])
    bbox[0] = int(max(0, bbox[0] - context * height))
    bbox[1] = int(min(mask.size(0), bbox[1] + context * height))
    bbox[2] = int(max(0, bbox[2] - context * width))
    bbox[3] = int(min(mask.size(1), bbox[3] + context * width))
    crop = img_inp[:, bbox[2]:bbox[3], bbox[0]:bbox[1]]
    h, w = crop.shape[1:]
    pady1 = pady2 = padx1 = padx2 = 0
    if h > w:
        padx1 = (h - w) // 2
        padx2 = h - w - padx1
    elif w > h:
        pady1 = (w - h) // 2
        pady2 = w - h - pady1
    crop = pad(crop, padding=(padx1, pady1, padx2, pady2), padding_mode="constant")
    return F.interpolate(crop.unsqueeze(0), (size, size)).squeeze(0)


@pytest.mark.parametrize("shape, box", [((50, 70), (5, 30, 10, 50)), ((64, 48), (40, 64, 0, 12))])
def test_visual_prompt_equals_official_recipe(shape, box):
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    seg = np.zeros(shape, np.int64)
    seg[box[0]:box[1], box[2]:box[3]] = 1
    ref = official_crop_blur_highlight(image, seg, SIZE)
    mine = visual_prompt(torch.from_numpy(image).permute(2, 0, 1).float() / 255, torch.from_numpy(seg).float(),
                         (SIZE, SIZE), torch.tensor(MEAN), torch.tensor(STD))
    assert mine.shape == (3, SIZE, SIZE)
    torch.testing.assert_close(mine, ref, atol=1e-4, rtol=1e-4)


def test_visual_prompt_darkens_background_keeps_object():
    """Object pixels are the normalised image; background is 0.1 × its blur (checked without a crop)."""
    image = torch.rand(3, SIZE, SIZE)
    mask = torch.zeros(SIZE, SIZE)
    mask[2:62, 3:61] = 1  # the widened box covers the whole image: no crop, no resize
    mean, std = torch.tensor(MEAN), torch.tensor(STD)
    vp = visual_prompt(image, mask, (SIZE, SIZE), mean, std)
    norm = (image - mean[:, None, None]) / std[:, None, None]
    inside = mask.bool()
    torch.testing.assert_close(vp[:, inside], norm[:, inside])
    torch.testing.assert_close(vp[:, ~inside], 0.1 * gaussian_blur(norm)[:, ~inside])


# --- several prompts, the oracle and semantic tasks -------------------------------------------------------

def test_pair_cache_scores_two_examples_by_merging_pairs(backend):
    """Score of {a, b} through the pair cache == the plain (uncached) path == merge of the two pairs, and it
    costs no new forward once both pairs are known."""
    val = [make_sample(i) for i in (10, 11, 12)]
    a, b = make_sample(20), make_sample(21)
    oracle = ValidationOracle(backend, val, 2)
    assert oracle.uses_pair_cache
    oracle.score([a])
    oracle.score([b])
    assert oracle.forwards == 6
    both = oracle.score([a, b])
    assert oracle.forwards == 6
    plain = ValidationOracle(backend, val, 2, cache=False).score([a, b])
    assert both.miou == pytest.approx(plain.miou, abs=1e-9)
    for q in val:
        merged = backend.finalize(backend.merge_stats(backend.pair_stats(a, q, 2), backend.pair_stats(b, q, 2)), q)
        single = backend.finalize(backend.pair_stats(a, q, 2), q)
        torch.testing.assert_close(backend.predict([a, b], [q], 2)[0], merged)
        assert not torch.allclose(merged, single)  # the second example does change the prediction


def test_text_prompt_scored_by_the_oracle(backend):
    """ValidationOracle.score([TextPrompt]) works, is memoised by the prompt's key, and is a real mIoU."""
    val = [make_sample(i) for i in (30, 31)]
    oracle = ValidationOracle(backend, val, 2)
    r1 = oracle.score([TextPrompt("a cat")])
    assert 0.0 <= r1.miou <= 1.0
    assert r1.prompt_ids == [TextPrompt("a cat").key]
    r2 = oracle.score([TextPrompt(("a cat",))])
    assert oracle.stats["memo_hits"] == 1 and r2.miou == r1.miou
    labels = prediction_to_labels(backend.predict([TextPrompt("a cat")], [val[0]], 2)[0])
    other = prediction_to_labels(backend.predict([TextPrompt("zebra")], [val[0]], 2)[0])
    assert not torch.equal(labels, other)


def test_image_prompt_strategies_run_on_clipseg(backend):
    """Forward selection, random-k and retrieval-style per-image prompts run on real frames through the pair cache:
    no (example, image) pair is ever computed twice."""
    from promptopt.data import bundled_sample_root, load_dataset, split_samples
    from promptopt.strategies import ForwardSelector, RandomK

    split = split_samples(load_dataset(bundled_sample_root(), category="dog").samples(), seed=0)
    pool, val = split.pool[:4], split.val[:2]
    oracle = ValidationOracle(backend, val, 2)
    sel = ForwardSelector(oracle, max_prompts=2).fit(pool)
    assert 1 <= len(sel.selected_) <= 2 and 0.0 <= sel.score_ <= 1.0
    rnd = RandomK(oracle, k=2, seeds=3).fit(pool)
    assert 0.0 <= rnd.score_ <= 1.0
    per_image = oracle.score_assignment({val[0].key: pool[:1], val[1].key: pool[1:3]})
    assert 0.0 <= per_image.miou <= 1.0
    assert oracle.forwards == len(pool) * len(val)


def test_semantic_visual_prompts_cover_only_their_classes(backend):
    """3 classes: an example showing only class 1 speaks for class 1 alone; a set averages per class."""
    q = make_sample(40, classes=3)
    both = make_sample(41, classes=3)
    only1 = make_sample(42, classes=2)  # class ids 0/1 only
    s1 = backend.pair_stats(only1, q, 3)
    assert s1["count"].tolist() == [1.0, 0.0] and float(s1["sum"][1].abs().max()) == 0.0
    s2 = backend.pair_stats(both, q, 3)
    assert s2["count"].tolist() == [1.0, 1.0]
    probs = backend.predict([only1, both], [q], 3)[0]
    fg = torch.stack([(s1["sum"][0] + s2["sum"][0]) / 2, s2["sum"][1]])
    fg = F.interpolate(fg[None], size=q.size, mode="bilinear", align_corners=False)[0].clamp(0, 1)
    bg = 1 - fg.max(0).values
    expected = torch.cat([bg[None], fg]) / torch.cat([bg[None], fg]).sum(0, keepdim=True)
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=1e-6)


def test_semantic_text_prompt_one_phrase_per_class(backend):
    q = make_sample(43, classes=3)
    st = backend.pair_stats(TextPrompt(("a dog", "grass")), q, 3)
    alone = backend.pair_stats(TextPrompt("grass"), q, 2)
    torch.testing.assert_close(st["sum"][1], alone["sum"][0])
    assert backend.predict([TextPrompt(("a dog", "grass"))], [q])[0].shape == (3, 50, 70)


def test_visual_condition_cache_encodes_each_example_once(backend):
    p, q1, q2 = make_sample(50), make_sample(51), make_sample(52)
    backend.pair_stats(p, q1, 2)
    calls = backend.condition_calls
    backend.pair_stats(p, q2, 2)
    assert backend.condition_calls == calls


def test_context_prompt_is_differentiable_in_its_image(backend):
    """A Context's image gets a gradient through the visual-prompt recipe and CLIP's image encoder."""
    p, q = make_sample(60), make_sample(61)
    ctx = backend.to_context(p, 2)
    image = ctx.image.clone().requires_grad_(True)
    loss = backend.tuning_loss([Context(image, ctx.mask)], [q], 2)
    loss.backward()
    assert image.grad is not None and float(image.grad.abs().sum()) > 0


def test_threshold_option_moves_the_foreground_cut_and_shares_caches(backend):
    """threshold=t: a pixel is foreground iff its probability > t (t=0.5: the plain sigmoid cut); the twin
    backend reuses the cached encoder activations and phrase embeddings."""
    q = make_sample(62)
    prompt = TextPrompt("a cat")
    fg = backend.predict([prompt], [q], 2)[0][1]
    half = prediction_to_labels(backend.predict([prompt], [q], 2)[0])
    low = backend.with_options(threshold=0.3)
    enc, cond = backend.encoder_calls, backend.condition_calls
    labels = prediction_to_labels(low.predict([prompt], [q], 2)[0])
    assert (low.encoder_calls, low.condition_calls, backend.encoder_calls) == (0, 0, enc) and cond > 0
    assert torch.equal(half == 1, fg > 0.5)
    assert torch.equal(labels == 1, fg > 0.3)
    assert not torch.equal(labels, half)  # some pixels lie between 0.3 and 0.5
    assert low.config()["options"]["threshold"] == 0.3
    with pytest.raises(ConfigError):
        backend.with_options(threshold=1.0)


def test_tensor_lru_keeps_within_budget_and_most_recent():
    from promptopt.backends.cache import TensorLRU

    lru = TensorLRU(budget=3 * 400)  # three (10, 10) float32 tensors
    for i in range(4):
        lru.put(i, [torch.zeros(10, 10)])
        if i == 1:
            assert lru.get(0) is not None  # touch 0: now 1 is the least recently used
    assert 1 not in lru and {0, 2, 3} == {k for k in range(4) if k in lru} and lru.nbytes == 1200
    lru.put("big", torch.zeros(100, 100))
    assert len(lru) == 1 and "big" in lru  # the newest entry stays even above the budget


def test_memory_estimate_grows_with_prompts_and_output_size(backend):
    assert backend.memory_kind == "analytic estimate"
    assert backend.memory_bytes(8) > backend.memory_bytes(1)
    assert backend.memory_bytes(1, (1000, 1000)) > backend.memory_bytes(1, (100, 100))


# --- registry and errors ----------------------------------------------------------------------------------

def test_registry_builds_and_config_round_trips(checkpoint):
    be = create_backend("clipseg", str(checkpoint))
    assert isinstance(be, CLIPSegBackend) and be.prompt_types == {"text", "image"}
    again = backend_from_config(be.config())
    assert again.config() == be.config()


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_text_prompt_identity_and_class_count():
    """Keys are stable (a string is a one-phrase tuple), distinct per phrase list, free of '/', and a text
    prompt implies len(texts) + 1 classes."""
    from promptopt.backends.base import infer_num_classes

    assert TextPrompt("a cat").key == TextPrompt(("a cat",)).key == TextPrompt(["a cat"]).key
    assert TextPrompt(("a", "b")).key != TextPrompt(("b", "a")).key
    slash = TextPrompt(("car/truck", "lamp"))
    assert "/" not in slash.key and slash.key.split("/")[-1] == slash.key
    assert infer_num_classes([TextPrompt(("a", "b"))]) == 3 and infer_num_classes([TextPrompt("a")]) == 2


@pytest.mark.parametrize("texts", ["", "   ", ("cat", " \t"), ()])
def test_empty_or_whitespace_text_is_a_config_error(texts):
    with pytest.raises(ConfigError) as exc:
        TextPrompt(texts)
    assert "phrase" in one_line(exc)


def test_text_prompt_on_image_only_backend_is_one_line():
    """The weight-free features backend takes only image prompts: a clear ConfigError, not a traceback."""
    be = FeaturesBackend()
    val = [make_sample(70)]
    with pytest.raises(ConfigError) as exc:
        ValidationOracle(be, val, 2).score([TextPrompt("a cat")])
    msg = one_line(exc)
    assert "'features'" in msg and "text prompts" in msg
    with pytest.raises(ConfigError):
        be.predict(prompts=[TextPrompt("a cat")], queries=val, num_classes=2)  # by keyword too
    with pytest.raises(ConfigError) as exc:
        be.to_context(TextPrompt("a cat"), 2)  # context tuning has no image to start from
    assert "text prompt" in one_line(exc)


def test_phrase_count_must_match_classes(backend):
    with pytest.raises(ConfigError) as exc:
        backend.predict([TextPrompt(("cat", "dog"))], [make_sample(71)], 2)
    assert "one phrase per class" in one_line(exc)


def test_wrong_model_type_and_missing_parts_are_checkpoint_errors(tmp_path, checkpoint):
    from transformers import SamConfig, SamModel

    sam_dir = tmp_path / "sam"
    SamModel(SamConfig(vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=64,
                                          patch_size=8, output_channels=32, num_pos_feats=16, mlp_dim=64),
                       prompt_encoder_config=dict(hidden_size=32, image_size=64, patch_size=8),
                       mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=2,
                                                iou_head_hidden_dim=32))).save_pretrained(sam_dir)
    with pytest.raises(CheckpointError) as exc:
        CLIPSegBackend.from_pretrained(sam_dir)
    assert "'sam'" in one_line(exc) and "clipseg" in str(exc.value)
    with pytest.raises(CheckpointError) as exc:
        CLIPSegBackend.from_pretrained(tmp_path / "nowhere")
    assert "not found" in one_line(exc)
    model_only = tmp_path / "model-only"
    CLIPSegForImageSegmentation.from_pretrained(checkpoint).save_pretrained(model_only)
    with pytest.raises(CheckpointError) as exc:
        CLIPSegBackend.from_pretrained(model_only)
    assert "processor" in one_line(exc)
    with pytest.raises(CheckpointError) as exc:
        CLIPSegBackend.from_pretrained("nobody-here/clipseg-missing")  # a hub id that is not in the local cache
    assert "local Hugging Face cache" in one_line(exc)
    with pytest.raises(ConfigError):
        create_backend("clipseg")
    with pytest.raises(ConfigError) as exc:
        create_backend("clipseg", str(checkpoint), {"box_threshold": 0.3})  # a grounded-sam option
    assert "box_threshold" in one_line(exc)


def test_cli_evaluate_with_image_prompts(checkpoint):
    """`promptopt evaluate --backend clipseg --checkpoint DIR` builds the backend by name and scores image prompts."""
    import json

    from typer.testing import CliRunner

    from promptopt.cli import app
    from promptopt.data import bundled_sample_root

    args = ["evaluate", "--data", str(bundled_sample_root()), "--category", "dog", "--shots", "2"]
    r = CliRunner().invoke(app, [*args, "--backend", "clipseg", "--checkpoint", str(checkpoint), "--json"])
    assert r.exit_code == 0, r.output
    assert 0.0 <= json.loads(r.stdout)["val"]["miou"] <= 1.0
