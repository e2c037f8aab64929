"""Encoders, per-query oracle scoring, MMR, the retrieval selector, its predictor and CLI."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from promptopt.backends.features import FeaturesBackend
from promptopt.cli import app
from promptopt.data import Sample, load_dataset, split_samples
from promptopt.embeddings import create_encoder, encoder_from_spec
from promptopt.errors import ConfigError
from promptopt.index import build_index
from promptopt.oracle import ValidationOracle
from promptopt.predict import predict_labels
from promptopt.strategies.retrieval import RetrievalSelector, mmr

FAST = {"max_side": 64, "pixels_per_prompt": 128}


@pytest.fixture(scope="module")
def dog(sample_root):
    ds = load_dataset(sample_root, category="dog")
    return ds, split_samples(ds.samples(), seed=0)


def small_backend():
    return FeaturesBackend(**FAST)


# --- encoders -----------------------------------------------------------------------------------
def test_features_encoder(dog):
    ds, split = dog
    enc = create_encoder("features", options={"max_side": 64})
    seen = []
    v = enc.encode(ds.samples()[:5], batch_size=2, progress=lambda d, t: seen.append((d, t)))
    assert v.shape == (5, enc.dim) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert seen == [(2, 5), (4, 5), (5, 5)]
    np.testing.assert_allclose(enc.encode(ds.samples()[:2]), v[:2], atol=1e-6)
    m = enc.encode_masked(ds.samples()[:2])
    assert m.shape == (2, enc.dim) and not np.allclose(m, v[:2])
    assert enc.fingerprint != create_encoder("features", options={"max_side": 96}).fingerprint
    assert encoder_from_spec(enc.spec()).fingerprint == enc.fingerprint
    with pytest.raises(ConfigError, match="unknown encoder"):
        create_encoder("sift")


def test_backend_encoder(dog):
    ds, _ = dog
    enc = create_encoder("backend:features", options={"max_side": 64})
    v = enc.encode(ds.samples()[:3])
    assert v.shape == (3, FeaturesBackend(max_side=64).num_channels) == (3, enc.dim)
    assert encoder_from_spec(enc.spec()).fingerprint == enc.fingerprint


@pytest.mark.parametrize("kind", ["clip_vision", "dinov2"])
def test_hf_encoder_tiny_model_saved_and_reloaded(tmp_path, kind, dog):
    from transformers import CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    if kind == "clip_vision":
        model = CLIPVisionModel(CLIPVisionConfig(intermediate_size=64, **common))
    else:
        model = Dinov2Model(Dinov2Config(**common))
    model.save_pretrained(tmp_path / "m")
    enc = create_encoder(f"hf:{tmp_path / 'm'}")
    samples = dog[0].samples()[:3]
    v = enc.encode(samples)
    assert v.shape == (3, 32) and np.isfinite(v).all()
    again = encoder_from_spec(enc.spec())
    assert again.fingerprint == enc.fingerprint
    np.testing.assert_allclose(again.encode(samples), v, atol=1e-5)
    # an index built with it refuses another model's weights
    idx = build_index(samples, enc)
    torch.manual_seed(1)
    (Dinov2Model(Dinov2Config(**common)) if kind == "dinov2" else CLIPVisionModel(CLIPVisionConfig(intermediate_size=64, **common))).save_pretrained(tmp_path / "m2")
    with pytest.raises(ConfigError, match="encoder mismatch"):
        idx._check_encoder(create_encoder(f"hf:{tmp_path / 'm2'}"))


def test_clip_encoder_tiny_config_from_file(tmp_path, dog):
    import open_clip

    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
           "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "tiny-clip-test.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "tiny-clip-test.json")
    model = open_clip.create_model("tiny-clip-test")
    torch.save(model.state_dict(), tmp_path / "w.pt")
    enc = create_encoder("clip:tiny-clip-test", checkpoint=str(tmp_path / "w.pt"))
    v = enc.encode(dog[0].samples()[:2])
    assert v.shape == (2, 16) and np.isfinite(v).all()
    assert encoder_from_spec(enc.spec()).fingerprint == enc.fingerprint
    with pytest.raises(ConfigError, match="give --checkpoint"):
        create_encoder("clip:tiny-clip-test")


# --- oracle and MMR -------------------------------------------------------------------------------
def test_score_assignment_matches_score_and_reuses_pairs(dog):
    _, split = dog
    oracle = ValidationOracle(small_backend(), split.val)
    prompts = split.pool[:2]
    same = oracle.score_assignment({q.key: prompts for q in split.val})
    assert same.miou == pytest.approx(oracle.score(prompts).miou, abs=1e-9)
    forwards = oracle.forwards
    mixed = {q.key: [split.pool[i % 2]] for i, q in enumerate(split.val)}
    res = oracle.score_assignment(mixed)
    assert oracle.forwards == forwards  # every pair was already cached
    assert sorted(res.prompt_ids) == sorted(s.id for s in split.pool[:2])
    plain = ValidationOracle(small_backend(), split.val, cache=False)
    assert plain.score_assignment(mixed).miou == pytest.approx(res.miou, abs=1e-6)
    with pytest.raises(ConfigError, match="no prompts assigned"):
        oracle.score_assignment({split.val[0].key: prompts})


def test_mmr_prefers_diverse_examples():
    sims = np.array([0.99, 0.98, 0.90, 0.5], dtype=np.float32)
    vecs = np.array([[1, 0, 0], [0.999, 0.045, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
    assert mmr(sims, vecs, 2, 0.0) == [0, 1]
    assert mmr(sims, vecs, 2, 0.5) == [0, 2]  # the near-duplicate of 0 is skipped
    assert mmr(sims, vecs, 10, 0.3)[:1] == [0] and len(mmr(sims, vecs, 10, 0.3)) == 4
    with pytest.raises(ConfigError):
        mmr(sims, vecs, 2, 1.5)


# --- the selector --------------------------------------------------------------------------------
def test_retrieval_selector_on_bundled_sample(dog):
    ds, split = dog
    enc = create_encoder("features", options={"max_side": 64})
    idx = build_index(ds.samples(), enc)  # the whole category: val/test images must never be retrieved
    val = ValidationOracle(small_backend(), split.val)
    test = ValidationOracle(val.backend, split.test)
    sel = RetrievalSelector(val, index=idx, k=3).fit(split.pool)
    pool_ids = {s.id for s in split.pool}
    assert set(sel.assignment_) == {s.id for s in split.val}
    for q, ids in sel.assignment_.items():
        assert len(ids) == 3 and set(ids) <= pool_ids
        assert sel.similarities_[q] == sorted(sel.similarities_[q], reverse=True)
    assert 0.0 <= sel.score_ <= 1.0 and set(sel.selected_ids_) <= pool_ids
    # top-1 of each val image is its most similar pool image by brute force
    pv = enc.encode(split.pool)
    for q, qv in zip(split.val, enc.encode(split.val)):
        assert sel.assignment_[q.id][0] == split.pool[int(np.argmax(pv @ qv))].id
    # the test score is the score of the brute-force top-3 of each test image, on a fresh oracle
    brute = {q.key: [split.pool[i] for i in np.argsort(-(pv @ qv), kind="stable")[:3]]
             for q, qv in zip(split.test, enc.encode(split.test))}
    fresh = ValidationOracle(small_backend(), split.test)
    assert sel.evaluate(test).miou == pytest.approx(fresh.score_assignment(brute).miou, abs=1e-9)
    div = RetrievalSelector(val, index=idx, k=3, diversity=0.7).fit(split.pool)
    assert all(set(v) <= pool_ids for v in div.assignment_.values())
    assert div.summary()["diversity"] == 0.7
    with pytest.raises(ConfigError, match="diversity"):
        RetrievalSelector(val, index=idx, k=3, diversity=2)


def test_retrieval_selector_pool_not_indexed(dog, blob_dataset):
    _, split = dog
    idx = build_index(load_dataset(blob_dataset).samples(), create_encoder("features", options={"max_side": 48}))
    val = ValidationOracle(small_backend(), split.val)
    with pytest.raises(ConfigError, match="none of the pool examples is in the index"):
        RetrievalSelector(val, index=idx, k=2).fit(split.pool)


# --- CLI, artifacts and predict ----------------------------------------------------------------------
def test_cli_index_select_predict(sample_root, tmp_path):
    runner = CliRunner()
    opts = [a for k, v in FAST.items() for a in ("--option", f"{k}={v}")]
    r = runner.invoke(app, ["index", "build", "--data", str(sample_root), "--category", "dog", "--option", "max_side=64",
                            "--out", str(tmp_path / "indexes" / "dog")])
    assert r.exit_code == 0, r.output
    man = json.loads((tmp_path / "indexes" / "dog" / "manifest.json").read_text())
    assert man["count"] == 20 and man["encoder"]["name"] == "features" and man["index_type"] == "flat"
    img = sample_root / "dog" / "images" / "00000.jpg"
    r = runner.invoke(app, ["index", "query", "--index", str(tmp_path / "indexes" / "dog"), "--image", str(img),
                            "--k", "3", "--json"])
    assert r.exit_code == 0, r.output
    hits = json.loads(r.stdout)
    assert len(hits) == 3 and hits[0]["key"] == "dog/00000" and hits[0]["similarity"] == pytest.approx(1.0, abs=1e-4)
    run = tmp_path / "run"
    r = runner.invoke(app, ["select", "--data", str(sample_root), "--category", "dog", "--strategy", "retrieval",
                            "--index", str(tmp_path / "indexes" / "dog"), "--k", "2", "--out", str(run),
                            "--random-seeds", "2", *opts])
    assert r.exit_code == 0, r.output
    res = json.loads((run / "result.json").read_text())
    assert res["strategy"] == "retrieval" and 0 <= res["val_miou"] <= 1 and 0 <= res["test_miou"] <= 1
    assert set(res["baselines"]) == {"forward", "random", "best-single"} and res["baselines"]["random"]["k"] == 2
    assert all(len(v) == 2 for v in res["summary"]["assignment"].values())
    prompt = json.loads((run / "prompt.json").read_text())
    assert prompt["kind"] == "retrieval" and prompt["extra"]["k"] == 2 and (run / "index" / "index.faiss").is_file()
    r = runner.invoke(app, ["predict", "--prompt", str(run), "--images", str(img), "--out", str(tmp_path / "masks")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "masks" / "00000.png").is_file()
    # the predictor picks the query's nearest saved examples
    q = Sample("00000", "query", path=img)
    labels = predict_labels(run / "prompt.json", [q])[0]
    assert labels.shape == q.size and set(np.unique(labels)) <= {0, 1}


@pytest.mark.parametrize("args, message", [
    (["select", "--strategy", "retrieval", "--out", "{tmp}/r"], "needs an index"),
    (["select", "--strategy", "retrieval", "--index", "{tmp}/none", "--out", "{tmp}/r"], "index folder not found"),
    (["index", "build", "--encoder", "sift", "--out", "{tmp}/i"], "unknown encoder 'sift'"),
    (["index", "build", "--encoder", "clip", "--out", "{tmp}/i"], "give --checkpoint"),
])
def test_cli_errors(sample_root, tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = CliRunner().invoke(app, [*args, "--data", str(sample_root), "--category", "dog"])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
