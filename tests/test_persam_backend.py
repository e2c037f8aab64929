"""PerSAM / PerSAM-F on tiny random-init SAM models saved and reloaded (mechanics, not accuracy)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from promptopt.backends import backend_from_config, create_backend
from promptopt.backends.persam import (
    PerSAMBackend,
    attention_bias,
    combine_targets,
    fit_mask_weights,
    location_confidence,
    mask_to_box,
    mask_to_grid,
    mix_masks,
    normalise,
    select_points,
    target_embedding,
    upsample_similarity,
)
from promptopt.data import Sample
from promptopt.errors import CheckpointError, ConfigError
from promptopt.oracle import ValidationOracle

transformers = pytest.importorskip("transformers")


def tiny_sam_config(image_size: int = 64):
    from transformers import SamConfig

    return SamConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=image_size,
                           patch_size=8, window_size=4, global_attn_indexes=[1], output_channels=32, num_pos_feats=16,
                           mlp_dim=64),
        prompt_encoder_config=dict(hidden_size=32, image_size=image_size, patch_size=8, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32),
    )


def tiny_sam_model(seed: int = 0):
    """A tiny random SamModel whose outputs vary: encoder weights spread (random init leaves SAM's vision
    weights near zero), decoder and prompt-encoder weights at ~2/sqrt(fan-in) (at the default init every
    mask logit is ~0, so no test could see a decoder change)."""
    from transformers import SamModel

    torch.manual_seed(seed)
    model = SamModel(tiny_sam_config())
    with torch.no_grad():
        for p in model.vision_encoder.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
        for name, p in [*model.mask_decoder.named_parameters(), *model.prompt_encoder.named_parameters()]:
            if p.dim() > 1:
                p.normal_(0, 2.0 / p[0].numel() ** 0.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def sam_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_sam")
    tiny_sam_model().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def blobs():
    """Six images of a bright square on a dark noisy background, with masks (sizes vary, non-square)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(6):
        h, w = (48, 80) if i % 2 else (60, 44)
        img = rng.normal(40, 10, (h, w, 3))
        mask = np.zeros((h, w), np.int64)
        y, x = rng.integers(4, h // 2), rng.integers(4, w // 2)
        mask[y:y + h // 3, x:x + w // 3] = 1
        img[mask == 1] = (230, 60, 50)
        out.append(Sample(f"s{i}", "blob", image=img.clip(0, 255).astype(np.uint8), mask=mask))
    return out


# --- the algorithm's steps --------------------------------------------------------------------------------

def test_points_from_handmade_feature_map():
    d, h, w = 8, 16, 16
    feats = torch.randn(d, h, w) * 0.05
    t = torch.zeros(d)
    t[0] = 1.0
    feats[0, 4:8, 9:13] += 1.0  # the target region
    feats[0, 12:15, 1:4] -= 1.0  # its opposite: the least similar region
    ref_cover = torch.zeros(h, w)
    ref_cover[4:8, 9:13] = 1
    target = target_embedding(feats, ref_cover)
    assert torch.allclose(normalise(target), normalise(feats[:, 4:8, 9:13].mean((1, 2))))
    sim = location_confidence(target, feats)
    assert sim.shape == (h, w) and float(sim.max()) <= 1 + 1e-5
    (px, py), (nx, ny) = select_points(sim)
    assert 4 <= py < 8 and 9 <= px < 13
    assert not (4 <= ny < 8 and 9 <= nx < 13) and 12 <= ny < 15 and 1 <= nx < 4
    # the same on the resized-input frame (grid upsampled to a 64 px input, image 40 x 64)
    dense = upsample_similarity(sim, 64, (40, 64))
    assert dense.shape == (40, 64)
    (px, py), _ = select_points(dense)
    assert 14 <= py < 34 and 34 <= px < 54


def test_mask_to_grid_and_kshot_targets():
    mask = torch.zeros(30, 60)
    mask[:, :30] = 1  # left half of a 2:1 image
    cover = mask_to_grid(mask, reshaped=(32, 64), input_size=64, grid=(8, 8))
    assert cover.shape == (8, 8)
    assert float(cover[:4, :3].min()) == 1.0 and float(cover[:4, 3].min()) > 0.9 and float(cover[4:].sum()) == 0
    assert float(cover[:4, 4:].max()) < 0.1
    assert target_embedding(torch.randn(4, 8, 8), torch.zeros(8, 8)) is None
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])
    assert torch.allclose(combine_targets([a, b]), torch.tensor([0.5, 1.5]))


def test_attention_bias_and_box():
    sim = torch.zeros(8, 8)
    sim[2, 3] = 1.0
    bias = attention_bias(sim, valid=(4, 8))
    assert bias.shape == (1, 1, 1, 64)
    assert float(bias.max()) == pytest.approx(float(bias[0, 0, 0, 2 * 8 + 3])) and 0 < float(bias.min()) < 0.5
    m = torch.zeros(10, 12, dtype=torch.bool)
    m[2:5, 3:9] = True
    assert mask_to_box(m) == [3.0, 2.0, 8.0, 4.0]
    assert mask_to_box(torch.zeros(3, 3, dtype=torch.bool)) is None


def test_fit_mask_weights_lowers_loss():
    torch.manual_seed(0)
    gt = torch.zeros(32, 32)
    gt[8:24, 8:24] = 1
    good = (gt * 2 - 1) * 6
    logits = torch.stack([torch.randn(32, 32) * 3, good, -good])
    w, losses = fit_mask_weights(logits, gt, steps=200, lr=1e-2)
    assert losses[-1] < losses[0] - 0.05
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-5) and float(w[1]) > 1 / 3
    assert mix_masks(logits, w).shape == (32, 32)


# --- the backend on a tiny SAM --------------------------------------------------------------------------

@pytest.mark.parametrize("reference", ["transformers", "official"])
def test_decoder_call_equals_direct_sam_call_except_official_persam_inputs(sam_dir, blobs, reference):
    """decode() is SamModel's forward; official mode differs from it exactly when PerSAM's inputs are given."""
    be = PerSAMBackend.from_pretrained(sam_dir, reference=reference)
    st = be.image_state(blobs[0])
    emb = st.embedding
    from transformers import SamModel

    sam = SamModel.from_pretrained(sam_dir).eval()
    pts, lab = [(10.0, 12.0), (50.0, 30.0)], [1, 0]
    mask_in = torch.randn(32, 32)
    box = [4.0, 6.0, 40.0, 30.0]
    sim = torch.rand(1, 1, 1, 64)
    tgt = torch.randn(32)
    cases = [
        dict(kw={}, direct={}, persam=False),
        dict(kw={"box": box}, direct={"input_boxes": torch.tensor([[box]])}, persam=False),
        dict(kw={"box": box, "mask_input": mask_in}, direct={"input_boxes": torch.tensor([[box]]),
                                                             "input_masks": mask_in[None, None]}, persam=False),
        dict(kw={"attention_similarity": sim, "target": tgt},
             direct={"attention_similarity": sim, "target_embedding": tgt.view(1, 1, -1)}, persam=True),
    ]
    for case in cases:
        logits, scores = be.decode(emb, pts, lab, multimask=True, **case["kw"])
        with torch.no_grad():
            ref = sam(image_embeddings=emb, input_points=torch.tensor([[pts]]), input_labels=torch.tensor([[lab]]),
                      multimask_output=True, **case["direct"])
        if reference == "official" and case["persam"]:
            assert float((logits - ref.pred_masks[0, 0]).abs().max()) > 1e-2
        else:
            assert torch.allclose(logits, ref.pred_masks[0, 0], atol=1e-5)
            assert torch.allclose(scores, ref.iou_scores[0, 0], atol=1e-6)
    # the encoder path equals get_image_embeddings on the processor's pixels: transformers' (torchvision) resize,
    # or, official, the PIL bilinear resize of the uint8 image, normalised, zero-padded (Personalize-SAM's predictor)
    from PIL import Image
    from transformers import SamImageProcessor

    img = blobs[0].image
    if reference == "transformers":
        px = SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})(
            images=img, return_tensors="pt")["pixel_values"]
    else:
        hr, wr = st.reshaped
        assert (hr, wr) == (64, int(img.shape[1] * 64 / img.shape[0] + 0.5))
        resized = np.asarray(Image.fromarray(img).resize((wr, hr), Image.Resampling.BILINEAR), np.float32)
        norm = (resized - np.array([123.675, 116.28, 103.53])) / np.array([58.395, 57.12, 57.375])
        px = torch.nn.functional.pad(torch.from_numpy(norm).float().permute(2, 0, 1), (0, 64 - wr, 0, 64 - hr))[None]
    assert torch.allclose(emb, sam.get_image_embeddings(px), atol=1e-5)


def test_predict_shapes_and_embeddings_computed_once(sam_dir, blobs):
    be = create_backend("persam", str(sam_dir))
    assert be.combines == "output" and be.has_pair_stats
    refs, queries = blobs[:2], blobs[2:]
    be.prepare(queries)
    assert be.encoder_calls == len(queries)
    for _ in range(3):
        outs = be.predict(refs, queries, 2)
        outs += be.predict(refs[:1], queries, 2)
    assert be.encoder_calls == len(queries) + len(refs)  # each image encoded exactly once
    for p, q in zip(outs, queries):
        assert p.shape == (2, *q.size)
        assert torch.allclose(p.sum(0), torch.ones(q.size), atol=1e-5)
    # output-level combination: the prediction is the merge of per-pair statistics
    direct = be.predict(refs, queries[:1], 2)[0]
    merged = be.finalize(be.merge_stats(be.pair_stats(refs[0], queries[0], 2), be.pair_stats(refs[1], queries[0], 2)),
                         queries[0])
    assert torch.allclose(direct, merged)


def test_kshot_mean_max_and_multiclass(sam_dir, blobs):
    mc = []
    for s in blobs[:3]:
        m = s.mask.copy()
        m[: 6, : 6] = 2  # a second class in the corner
        mc.append(Sample(s.id, "mc", image=s.image, mask=m))
    for kshot in ("mean", "max"):
        be = PerSAMBackend.from_pretrained(sam_dir, kshot=kshot, instances=2, instance_threshold=0.0)
        assert be.combines == "model"
        out = be.predict(mc[:2], mc[2:], 3)
        assert out[0].shape == (3, *mc[2].size)
        assert torch.allclose(out[0].sum(0), torch.ones(mc[2].size), atol=1e-5)
    st = PerSAMBackend.from_pretrained(sam_dir).pair_stats(mc[0], mc[2], 3)
    assert st["sum"].shape[0] == 2 and st["count"].tolist() == [1.0, 1.0]
    st = PerSAMBackend.from_pretrained(sam_dir).pair_stats(blobs[0], mc[2], 3)
    assert st["count"].tolist() == [1.0, 0.0] and float(st["sum"][1].abs().sum()) == 0


def test_multi_instance_runs_extra_segmentations(sam_dir, blobs):
    one = PerSAMBackend.from_pretrained(sam_dir, instances=1)
    three = PerSAMBackend.from_pretrained(sam_dir, instances=3, instance_threshold=-1.0)
    p1 = one.pair_stats(blobs[0], blobs[1], 2)["sum"]
    calls = three.decoder_calls
    p3 = three.pair_stats(blobs[0], blobs[1], 2)["sum"]
    assert three.decoder_calls - calls > 3  # more than one cascade ran (unless the first mask covered everything)
    assert bool((p3 >= p1 - 1e-6).all())  # instances are merged by a per-pixel max


def test_persam_f_trains_weights_sam_frozen(sam_dir, blobs):
    be = PerSAMBackend.from_pretrained(sam_dir, variant="persam-f", train_steps=60, lr=1e-2)
    before = {k: v.clone() for k, v in be.model.state_dict().items()}
    weights, losses = be.train_reference(blobs[0])
    assert losses[-1] < losses[0]
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():  # as the oracle calls it: training must still work
        out = be.predict(blobs[:2], blobs[2:4], 2)
    after = be.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # SAM's parameters bit-identical
    assert all(not p.requires_grad for p in be.model.parameters())
    assert set(be.mask_weights) == {"blob/s0#1", "blob/s1#1"} and be.trainings == 3


def test_persam_f_learned_state_is_state_not_config(sam_dir, blobs, tmp_path):
    """config() never holds or grows with learned weights; learned_state → safetensors → load_learned_state
    predicts identically without retraining, and only the asked-for references travel."""
    from safetensors.torch import load_file, save_file

    be = PerSAMBackend.from_pretrained(sam_dir, variant="persam-f", train_steps=30, lr=1e-2)
    cfg = json.loads(json.dumps(be.config()))
    out = be.predict(blobs[:2], blobs[2:4], 2)
    assert be.trainings == 2 and be.config() == cfg and "mask_weights" not in json.dumps(cfg)
    one = be.learned_state(["blob/s1"])
    assert list(one) == ["mask_weights/blob/s1#1"] and one["mask_weights/blob/s1#1"].shape == (3,)
    assert be.learned_state(["blob/s5"]) == {}  # never used as a reference: nothing learned
    save_file(be.learned_state(["blob/s0", "blob/s1"]), tmp_path / "learned.safetensors")
    again = backend_from_config(cfg)
    again.load_learned_state(load_file(tmp_path / "learned.safetensors"))
    out2 = again.predict(blobs[:2], blobs[2:4], 2)
    assert again.trainings == 0 and again.config() == cfg
    assert all(torch.equal(a, b) for a, b in zip(out, out2))
    part = backend_from_config(cfg)
    part.load_learned_state(one)
    part.predict(blobs[:2], blobs[2:3], 2)
    assert part.trainings == 1  # s1 came from the state, s0 was trained
    assert torch.equal(part.learned_state(["blob/s0"])["mask_weights/blob/s0#1"],
                       be.learned_state(["blob/s0"])["mask_weights/blob/s0#1"])  # training is deterministic


def test_learned_state_errors_and_backends_without_state(sam_dir):
    from promptopt.backends.features import FeaturesBackend

    f = PerSAMBackend.from_pretrained(sam_dir, variant="persam-f")
    with pytest.raises(ConfigError, match="'blob/s0#1' is not named mask_weights/"):
        f.load_learned_state({"blob/s0#1": torch.ones(3) / 3})
    with pytest.raises(ConfigError, match="must hold 3 finite mixing weights, got shape \\(2,\\)"):
        f.load_learned_state({"mask_weights/blob/s0#1": torch.ones(2)})
    with pytest.raises(ConfigError, match="3 finite"):
        f.load_learned_state({"mask_weights/blob/s0#1": torch.tensor([0.5, float("nan"), 0.5])})
    assert f.mask_weights == {}  # a refused state leaves nothing behind
    plain = PerSAMBackend.from_pretrained(sam_dir)
    assert plain.learned_state(["blob/s0"]) == {}
    with pytest.raises(ConfigError, match="variant 'persam' learns nothing"):
        plain.load_learned_state({"mask_weights/blob/s0#1": torch.ones(3) / 3})
    feats = FeaturesBackend()
    assert feats.learned_state(["blob/s0"]) == {}
    feats.load_learned_state({})
    with pytest.raises(ConfigError, match="backend 'features' learns no state"):
        feats.load_learned_state({"x": torch.ones(1)})


def test_config_roundtrip_plain(sam_dir):
    be = PerSAMBackend.from_pretrained(sam_dir, kshot="max", refine=False, dtype="float32", reference="transformers",
                                       min_similarity=0.3, min_score=0.5)
    cfg = be.config()
    assert cfg["name"] == "persam" and cfg["checkpoint"] == str(sam_dir)
    assert cfg["options"]["reference"] == "transformers" and cfg["options"]["min_similarity"] == 0.3
    assert backend_from_config(cfg).config() == cfg
    assert PerSAMBackend.from_pretrained(sam_dir).config()["options"]["reference"] == "official"  # the default
    assert be.memory_bytes(4, (480, 854)) > be.memory_bytes(1, (480, 854)) > 0


def test_checkpoint_errors(tmp_path, sam_dir):
    with pytest.raises(CheckpointError, match="nowhere: SAM checkpoint folder not found"):
        PerSAMBackend.from_pretrained(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        PerSAMBackend.from_pretrained(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no-such-org/no-such-sam"):
        PerSAMBackend.from_pretrained("no-such-org/no-such-sam")
    with pytest.raises(ConfigError, match="needs SAM weights"):
        create_backend("persam")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((sam_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match="broken"):
        PerSAMBackend.from_pretrained(broken)
    with pytest.raises(ConfigError, match="variant"):
        PerSAMBackend.from_pretrained(sam_dir, variant="nope")
    with pytest.raises(ConfigError, match="reference must be one of official, transformers, got 'paper'"):
        PerSAMBackend.from_pretrained(sam_dir, reference="paper")
    with pytest.raises(ConfigError, match="mask_weights is not an option: .*learned state"):
        backend_from_config({"name": "persam", "checkpoint": str(sam_dir),
                             "options": {"mask_weights": {"blob/s0#1": [0.3, 0.3, 0.4]}}})
    with pytest.raises(ConfigError, match="unknown option\\(s\\) colour"):
        PerSAMBackend.from_pretrained(sam_dir, colour="red")
    with pytest.raises(ConfigError, match="min_similarity"):
        PerSAMBackend.from_pretrained(sam_dir, min_similarity=2.0)


def test_through_oracle_caches_pairs(sam_dir, blobs):
    be = PerSAMBackend.from_pretrained(sam_dir)
    oracle = ValidationOracle(be, blobs[3:], num_classes=2)
    assert be.encoder_calls == 3 and oracle.uses_pair_cache
    r = oracle.score_additions([], blobs[:3])
    assert len(r) == 3 and all(0.0 <= x.miou <= 1.0 for x in r)
    fw = oracle.forwards
    r2 = oracle.score_additions([blobs[0]], blobs[1:3])
    assert oracle.forwards == fw  # every (reference, query) pair came from the cache
    assert r2[0].miou == pytest.approx(oracle.score(blobs[:2]).miou)
    assert be.encoder_calls == 6


def test_cli_evaluate_with_persam(sam_dir, sample_root):
    from promptopt.cli import app

    r = CliRunner().invoke(app, ["evaluate", "--data", str(sample_root), "--category", "dog", "--backend", "persam",
                                 "--checkpoint", str(sam_dir), "--shots", "1", "--pool", "3", "--val", "2",
                                 "--test", "2", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["backend"]["name"] == "persam" and 0.0 <= doc["val"]["miou"] <= 1.0
    r = CliRunner().invoke(app, ["evaluate", "--data", str(sample_root), "--category", "dog", "--backend", "persam",
                                 "--checkpoint", "/no/such/sam", "--shots", "1"])
    assert r.exit_code == 2 and "SAM checkpoint folder not found" in r.output


def test_cli_select_then_predict_with_persam_f(sam_dir, sample_root, tmp_path):
    """prompt.json holds PerSAM-F's fixed config (official reference, no learned weights); predict runs from it."""
    from PIL import Image

    from promptopt.artifacts import load_prompt
    from promptopt.cli import app

    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["select", "--data", str(sample_root), "--category", "dog", "--backend", "persam",
                                 "--checkpoint", str(sam_dir), "--strategy", "best-single", "--no-baselines",
                                 "--pool", "2", "--val", "2", "--test", "1", "--out", str(out),
                                 "--option", "variant=persam-f", "--option", "train_steps=20"])
    assert r.exit_code == 0, r.output
    art = load_prompt(out / "prompt.json")
    assert "mask_weights" not in art.backend["options"]
    assert art.backend["options"]["reference"] == "official" and art.backend["options"]["variant"] == "persam-f"
    be = art.build_backend()
    assert be.config() == art.backend
    images = tmp_path / "new"
    images.mkdir()
    src = sorted((sample_root / "dog" / "images").iterdir())[-1]
    (images / src.name).write_bytes(src.read_bytes())
    r = CliRunner().invoke(app, ["predict", "--prompt", str(out), "--images", str(images), "--out", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    m = np.asarray(Image.open(tmp_path / "m" / f"{src.stem}.png"))
    assert m.shape == Image.open(src).size[::-1] and set(np.unique(m)) <= {0, 255}


def _background_only(rng: np.random.Generator, i: int) -> Sample:
    """A query without the object: the blobs' noisy background alone, empty mask."""
    img = rng.normal(40, 10, (48, 80, 3)).clip(0, 255).astype(np.uint8)
    return Sample(f"bg{i}", "blob", image=img, mask=np.zeros((48, 80), np.int64))


@pytest.mark.parametrize("reference", ["official", "transformers"])
def test_min_similarity_gives_absent_objects_an_empty_mask(sam_dir, blobs, reference):
    """Personalize-SAM issue #13: below the location prior's peak threshold the query gets an empty mask;
    queries above it, and a threshold that nothing falls below, give the output without the option."""
    rng = np.random.default_rng(5)
    absent = [_background_only(rng, i) for i in range(2)]
    ref, present = blobs[0], blobs[1:4]
    plain = PerSAMBackend.from_pretrained(sam_dir, reference=reference)
    target = plain.targets(ref, 2)[1]

    def peak(q):
        st = plain.image_state(q)
        return plain.segment(st, location_confidence(target.location, st.embedding[0]), target).peak

    lo, hi = max(peak(q) for q in absent), min(peak(q) for q in present)
    assert lo < hi  # on these images the object's features resemble the reference's more than background does
    gated = PerSAMBackend.from_pretrained(sam_dir, reference=reference, min_similarity=(lo + hi) / 2)
    for q in absent:
        st = gated.pair_stats(ref, q, 2)
        assert st["count"].tolist() == [1.0] and float(st["sum"].abs().max()) == 0
        assert int(gated.predict([ref], [q], 2)[0].argmax(0).max()) == 0  # all background
    base = plain.predict([ref], present + absent, 2)
    for a, b in zip(gated.predict([ref], present, 2), base):
        assert torch.equal(a, b)
    assert any(int(p.argmax(0).max()) == 1 for p in base[len(present):])  # without the option: false positives
    everything = PerSAMBackend.from_pretrained(sam_dir, reference=reference, min_similarity=-1.0)
    assert all(torch.equal(a, b) for a, b in zip(everything.predict([ref], present + absent, 2), base))


def test_min_score_thresholds_sams_predicted_iou(sam_dir, blobs):
    ref, q = blobs[0], blobs[1]
    plain = PerSAMBackend.from_pretrained(sam_dir)
    st, target = plain.image_state(q), plain.targets(ref, 2)[1]
    score = plain.segment(st, location_confidence(target.location, st.embedding[0]), target).score
    above = PerSAMBackend.from_pretrained(sam_dir, min_score=score + 1e-3)
    assert float(above.pair_stats(ref, q, 2)["sum"].abs().max()) == 0
    below = PerSAMBackend.from_pretrained(sam_dir, min_score=score - 1e-3)
    assert torch.equal(below.pair_stats(ref, q, 2)["sum"], plain.pair_stats(ref, q, 2)["sum"])
    assert below.config()["options"]["min_score"] == pytest.approx(score - 1e-3)  # an ordinary, saved option


def test_memory_figure_is_the_calibrated_model_cold_and_the_cuda_path_profiles_the_exact_call(sam_dir, blobs):
    """Off CUDA: memory_models' cold PerSAM figure with the embedding cache at its cap (independent of what is
    cached). The CUDA path (measurement replaced) runs the exact uncached predict once per k and leaves no
    cached embedding, target or counter behind."""
    from promptopt.memory import PROFILE_MARGIN
    from promptopt.backends.memory_models import persam_memory

    be = PerSAMBackend.from_pretrained(str(sam_dir))
    expected = persam_memory(be.model, dtype=torch.float32, k=3, image_size_hw=(480, 854), cached=False,
                             resident_bytes=be.cache_bytes).total
    assert be.memory_bytes(3, (480, 854)) == expected
    be.prepare(blobs[:2])
    assert be.memory_bytes(3, (480, 854)) == expected
    before = (be._images.keys(), be.encoder_calls, be.decoder_calls)
    ran, encoder = [], be.model.get_image_embeddings

    def counting(*args, **kwargs):
        ran.append(1)
        return encoder(*args, **kwargs)

    be.model.get_image_embeddings = counting

    def measure(fn, device):
        fn()
        return 5000

    peak = be._profiled_peak(2, (40, 56), measure=measure)
    weights = sum(p.numel() * p.element_size() for p in be.model.parameters())
    assert peak == weights + be.cache_bytes + int(np.ceil(5000 * (1 + PROFILE_MARGIN)))
    assert len(ran) == 3  # two references and the query were encoded: a cold call
    be._profiled_peak(2, (40, 56))
    assert be._profiler.measurements == 1
    assert (be._images.keys(), be.encoder_calls, be.decoder_calls) == before
