"""Grounded SAM (Grounding DINO boxes → SAM masks) on tiny random-init checkpoints: each step against direct
transformers calls, thresholds, union and per-class masks, caches, the oracle and one-line errors."""

from __future__ import annotations

import string

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertTokenizer,
    GroundingDinoForObjectDetection,
    GroundingDinoImageProcessor,
    GroundingDinoProcessor,
    SamModel,
    SamProcessor,
)

from promptopt.backends import backend_from_config, create_backend  # noqa: E402
from promptopt.backends.base import TextPrompt  # noqa: E402
from promptopt.backends.grounded_sam import (  # noqa: E402
    GroundedSAMBackend,
    box_indicator,
    caption,
    default_sam_processor,
    phrase_ids,
    tiny_detector_config,
    tiny_sam_config,
)
from promptopt.data import Sample  # noqa: E402
from promptopt.errors import CheckpointError, ConfigError  # noqa: E402
from promptopt.oracle import ValidationOracle, prediction_to_labels  # noqa: E402

WORDS = ["cat", "dog", "car", "lamp", "horse", "umbrella", "parasol", "grass", "sky", "a", "red"]


def tiny_bert_tokenizer() -> BertTokenizer:
    """WordPiece vocabulary with bert-base-uncased's ids for [PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102 and "." 1012,
    which Grounding DINO hard-codes as its phrase separators."""
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += list(string.ascii_lowercase) + WORDS + ["?"]
    vocab += [f"[unused{i}]" for i in range(len(vocab), 1012)] + ["."]
    assert vocab.index("[CLS]") == 101 and vocab.index(".") == 1012
    return BertTokenizer(vocab={t: i for i, t in enumerate(vocab)})


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """DIR/detector (tiny Grounding DINO + processor) and DIR/sam (tiny SAM + SamProcessor). SAM's weights get
    some spread (a plain random init paints every mask logit near 0)."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("grounded-sam")
    det = GroundingDinoForObjectDetection(tiny_detector_config())
    det.save_pretrained(d / "detector")
    GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}),
                           tokenizer=tiny_bert_tokenizer()).save_pretrained(d / "detector")
    sam = SamModel(tiny_sam_config())
    with torch.no_grad():
        for p in sam.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    sam.save_pretrained(d / "sam")
    SamProcessor(image_processor=default_sam_processor(64)).save_pretrained(d / "sam")
    return d


@pytest.fixture(scope="module")
def backend(root):
    return GroundedSAMBackend.from_pretrained(root)


def make_sample(i: int, h: int = 50, w: int = 70, classes: int = 2) -> Sample:
    rng = np.random.default_rng(i)
    mask = np.zeros((h, w), np.int64)
    for c in range(1, classes):
        mask[rng.integers(0, h // 2):, rng.integers(0, w // 2):][: h // 3, : w // 3] = c
    return Sample(f"g{i}", "t", image=rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mask=mask)


def middle_threshold(scores: torch.Tensor) -> float:
    """A box threshold that keeps some boxes and drops others (asserts the scores allow one)."""
    s = scores.sort().values
    assert s[0] < s[-1]
    return float((s[len(s) // 2 - 1] + s[len(s) // 2]) / 2)


# --- the caption and the phrases --------------------------------------------------------------------------

def test_caption_is_lower_case_dot_separated():
    assert caption(["Car Lamp", " dog "]) == "car lamp . dog ."
    assert caption(["umbrella"]) == "umbrella ."


def test_phrase_ids_follow_the_separators():
    tok = tiny_bert_tokenizer()
    ids = torch.tensor(tok("car lamp . dog .")["input_ids"])
    assert phrase_ids(ids, torch.tensor([101, 102, 1012, 1029])).tolist() == [0, 1, 1, 0, 2, 0, 0]


# --- each step against transformers -----------------------------------------------------------------------

def test_detections_match_transformers_post_processing(backend, root):
    """Kept boxes (pixels) and scores equal GroundingDinoProcessor.post_process_grounded_object_detection's."""
    q = make_sample(1)
    det = backend.detect(q, TextPrompt("cat"))
    thr = middle_threshold(det.scores)
    processor = GroundingDinoProcessor.from_pretrained(root / "detector")
    inputs = processor(images=q.image, text="cat .", return_tensors="pt")
    with torch.no_grad():
        out = backend.detector(**inputs)
    ref = processor.post_process_grounded_object_detection(out, inputs["input_ids"], threshold=thr, text_threshold=0.0,
                                                          target_sizes=[q.size])[0]
    boxes, classes = det.select(thr, 0.0)
    assert 0 < boxes.shape[0] < det.scores.shape[0]
    torch.testing.assert_close(boxes, ref["boxes"], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(det.scores[det.scores > thr], ref["scores"])
    assert classes.tolist() == [1] * boxes.shape[0]


def test_box_masks_match_sam_called_directly(backend, root):
    """One box → SamProcessor(input_boxes) → SamModel(multimask_output=False) → post_process_masks, sigmoid."""
    q = make_sample(2)
    box = [8.0, 5.0, 40.0, 30.0]
    processor = SamProcessor.from_pretrained(root / "sam")
    inputs = processor(images=q.image, input_boxes=[[box]], return_tensors="pt")
    with torch.no_grad():
        out = backend.sam(**inputs, multimask_output=False)
    logits = processor.post_process_masks(out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"],
                                          binarize=False)[0][:, 0]
    mine = backend.box_masks(q, torch.tensor([box]))
    torch.testing.assert_close(mine, torch.sigmoid(logits), atol=1e-5, rtol=1e-5)
    assert 0.05 < float((mine > 0.5).float().mean()) < 0.95  # the mask is neither empty nor everything


def test_binary_mask_is_union_of_kept_boxes(root):
    """Binary task: foreground = per-pixel max over the kept boxes' SAM masks; its 0.5 cut = union of masks."""
    be = GroundedSAMBackend.from_pretrained(root)
    q = make_sample(3)
    det = be.detect(q, TextPrompt("dog"))
    be = be.with_options(box_threshold=middle_threshold(det.scores), text_threshold=0.0)
    boxes, _ = det.select(be.box_threshold, 0.0)
    per_box = torch.stack([be.box_masks(q, b[None])[0] for b in boxes])
    probs = be.predict([TextPrompt("dog")], [q], 2)[0]
    torch.testing.assert_close(probs[1], per_box.amax(0), atol=1e-5, rtol=1e-5)
    union = (per_box > 0.5).any(0)
    assert torch.equal(prediction_to_labels(probs) == 1, union)
    fewer = be.with_options(box_threshold=float(det.scores.max()) - 1e-6)  # only the best box
    assert float(fewer.predict([TextPrompt("dog")], [q], 2)[0][1].sum()) < float(probs[1].sum())


def test_no_box_above_threshold_gives_empty_mask(backend):
    q = make_sample(4)
    det = backend.detect(q, TextPrompt("cat"))
    none = backend.with_options(box_threshold=float(det.scores.max()))
    decoder = none.decoder_calls
    probs = none.predict([TextPrompt("cat")], [q], 2)[0]
    assert probs.shape == (2, 50, 70)
    assert float(probs[1].max()) == 0.0 and bool((prediction_to_labels(probs) == 0).all())
    assert none.decoder_calls == decoder  # SAM's decoder never ran


def test_clip_to_boxes_keeps_mask_inside_the_boxes_union(root):
    be = GroundedSAMBackend.from_pretrained(root, box_threshold=0.0, text_threshold=0.0)
    q = make_sample(5)
    boxes, _ = be.detect(q, TextPrompt("cat")).select(0.0, 0.0)
    inside = box_indicator(boxes, q.size).amax(0).bool()
    free = prediction_to_labels(be.predict([TextPrompt("cat")], [q], 2)[0]) == 1
    clipped_be = be.with_options(clip_to_boxes=True)
    clipped = prediction_to_labels(clipped_be.predict([TextPrompt("cat")], [q], 2)[0]) == 1
    assert bool((free & ~inside).any())  # SAM's masks do leak outside the boxes here…
    assert not bool((clipped & ~inside).any())  # …and clipping removes that
    per_box = be.box_masks(q, boxes) > 0.5
    assert torch.equal(clipped, (per_box & box_indicator(boxes, q.size).bool()).any(0))  # each mask cut to its box


def test_box_indicator_uses_pixel_centres():
    ind = box_indicator(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), (6, 5))[0]
    expected = torch.zeros(6, 5)
    expected[2:4, 1:3] = 1
    assert torch.equal(ind, expected)


# --- semantic tasks, thresholds, text -----------------------------------------------------------------------

def test_semantic_boxes_go_to_their_phrase(root):
    """Two phrases: each kept box feeds the class whose phrase holds its best token, and only that class."""
    be = GroundedSAMBackend.from_pretrained(root, box_threshold=0.0, text_threshold=0.0)
    q = make_sample(6, classes=3)
    prompt = TextPrompt(("red car", "grass"))
    det = be.detect(q, prompt)
    boxes, classes = det.select(0.0, 0.0)
    assert set(classes.tolist()) == {1, 2}  # both phrases win some boxes on this image
    assert torch.equal(classes - 1, det.class_scores.argmax(1))
    fg = be.foreground(prompt, q)
    for c in (1, 2):
        expected = torch.stack([be.box_masks(q, b[None])[0] for b in boxes[classes == c]]).amax(0)
        torch.testing.assert_close(fg[c - 1], expected, atol=1e-5, rtol=1e-5)
    probs = be.predict([prompt], [q], 3)[0]
    assert probs.shape == (3, 50, 70)
    torch.testing.assert_close(probs.sum(0), torch.ones(50, 70))


def test_text_threshold_drops_boxes_without_a_confident_phrase(backend):
    q = make_sample(7, classes=3)
    det = backend.detect(q, TextPrompt(("red car", "grass")))
    best = det.class_scores.max(1).values
    t = middle_threshold(best)
    boxes, _ = det.select(0.0, t)
    assert boxes.shape[0] == int((best > t).sum()) < det.scores.shape[0]


def test_different_phrases_reach_the_detector(backend):
    q = make_sample(8)
    a = backend.detect(q, TextPrompt("umbrella"))
    b = backend.detect(q, TextPrompt("horse"))
    assert (a.scores - b.scores).abs().max() > 1e-4


def test_thresholds_reuse_cached_detections_and_embeddings(root):
    be = GroundedSAMBackend.from_pretrained(root)
    q = make_sample(9)
    be.predict([TextPrompt("sky")], [q], 2)
    assert (be.detector_calls, be.encoder_calls) == (1, 1)
    twin = be.with_options(box_threshold=0.0, text_threshold=0.0)
    twin.predict([TextPrompt("sky")], [q], 2)
    assert (twin.detector_calls, twin.encoder_calls) == (0, 0)
    be.predict([TextPrompt("grass")], [q], 2)
    assert (be.detector_calls, be.encoder_calls) == (2, 1)  # a new caption runs the detector, not SAM's encoder
    with pytest.raises(ConfigError):
        be.with_options(dtype="bfloat16")  # would convert the shared models in place


def test_text_prompts_scored_by_the_oracle_with_pair_cache(root):
    """ValidationOracle.score([TextPrompt]) works; two prompts average their pairs, cached per (prompt, image)."""
    be = GroundedSAMBackend.from_pretrained(root, box_threshold=0.0, text_threshold=0.0)
    val = [make_sample(i) for i in (20, 21)]
    oracle = ValidationOracle(be, val, 2)
    a, b = TextPrompt("cat"), TextPrompt("dog")
    ra, rb = oracle.score([a]), oracle.score([b])
    assert 0.0 <= ra.miou <= 1.0 and oracle.forwards == 4
    both = oracle.score([a, b])
    assert oracle.forwards == 4
    plain = ValidationOracle(be, val, 2, cache=False).score([a, b])
    assert both.miou == pytest.approx(plain.miou, abs=1e-9)
    q = val[0]
    merged = be.finalize(be.merge_stats(be.pair_stats(a, q, 2), be.pair_stats(b, q, 2)), q)
    torch.testing.assert_close(be.predict([a, b], [q], 2)[0], merged)


def test_memory_estimate_grows_with_prompts_and_image(backend):
    assert backend.memory_kind == "analytic estimate"
    assert backend.memory_bytes(4, (200, 300)) > backend.memory_bytes(1, (200, 300))
    assert backend.memory_bytes(1, (800, 1200)) > backend.memory_bytes(1, (200, 300))


# --- construction and errors --------------------------------------------------------------------------------

def test_registry_builds_from_one_folder_or_two_parts(root):
    be = create_backend("grounded-sam", str(root), {"box_threshold": 0.2})
    assert be.box_threshold == 0.2 and be.prompt_types == {"text"}
    assert backend_from_config(be.config()).config() == be.config()
    parts = create_backend("grounded-sam", None, {"detector": str(root / "detector"), "sam": str(root / "sam")})
    cfg = parts.config()
    assert cfg["checkpoint"] is None and cfg["options"]["sam"] == str((root / "sam").resolve())
    assert backend_from_config(cfg).config() == cfg


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_image_prompt_on_grounded_sam_is_one_line(backend):
    q = make_sample(30)
    with pytest.raises(ConfigError) as exc:
        ValidationOracle(backend, [q], 2).score([make_sample(31)])
    msg = one_line(exc)
    assert "'grounded-sam'" in msg and "image prompts" in msg
    with pytest.raises(ConfigError):
        backend.predict([make_sample(31)], [q], 2)


def test_phrase_with_a_separator_is_rejected(backend):
    with pytest.raises(ConfigError) as exc:
        backend.predict([TextPrompt("car. lamp")], [make_sample(32)], 2)
    assert "separator" in one_line(exc)
    with pytest.raises(ConfigError):
        backend.predict([TextPrompt(("cat", "dog"))], [make_sample(32)], 2)  # 2 phrases for a binary task


def test_checkpoint_errors_are_one_line(root, tmp_path):
    with pytest.raises(CheckpointError) as exc:
        GroundedSAMBackend.from_pretrained(detector=root / "sam", sam=root / "sam")
    assert "'sam'" in one_line(exc) and "grounding-dino" in str(exc.value)
    with pytest.raises(CheckpointError) as exc:
        GroundedSAMBackend.from_pretrained(detector=root / "detector", sam=root / "detector")
    assert "'grounding-dino'" in one_line(exc)
    (tmp_path / "half" / "detector").mkdir(parents=True)
    with pytest.raises(CheckpointError) as exc:
        GroundedSAMBackend.from_pretrained(tmp_path / "half")
    assert "sam/" in one_line(exc)
    with pytest.raises(CheckpointError) as exc:
        GroundedSAMBackend.from_pretrained(tmp_path / "missing")
    assert "not found" in one_line(exc)
    with pytest.raises(ConfigError) as exc:
        create_backend("grounded-sam")
    assert "two checkpoints" in one_line(exc)
    for bad in ({"box_threshold": 1.5}, {"text_threshold": "high"}, {"clip_to_boxes": "false"}, {"box_batch": 0}):
        with pytest.raises(ConfigError) as exc:
            GroundedSAMBackend.from_pretrained(root, **bad)
        assert next(iter(bad)) in one_line(exc)


def test_cli_refuses_image_prompts_in_one_line(root):
    """`promptopt evaluate` picks image examples; the text-only backend says so (exit 2), not a traceback."""
    from typer.testing import CliRunner

    from promptopt.cli import app
    from promptopt.data import bundled_sample_root

    args = ["evaluate", "--data", str(bundled_sample_root()), "--category", "dog", "--shots", "1",
            "--backend", "grounded-sam"]
    r = CliRunner().invoke(app, [*args, "--checkpoint", str(root)])
    assert r.exit_code == 2 and "takes text prompts, not image prompts" in r.output
    assert "Traceback" not in r.output
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "two checkpoints" in r.output
