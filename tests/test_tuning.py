"""Context tuning: frozen model, gradients only on the context, val gain, artifacts, resume, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from promptopt.artifacts import load_prompt
from promptopt.backends import create_backend
from promptopt.backends.features import FeaturesBackend
from promptopt.data import Sample
from promptopt.errors import BudgetError, ConfigError
from promptopt.oracle import ValidationOracle, prediction_to_labels
from promptopt.predict import predict_labels
from promptopt.strategies.tuning import ContextTuner, load_contexts, model_parameters
from promptopt.task import Task

FAST = {"max_side": 64, "pixels_per_prompt": 128}


class ConvFeaturesBackend(FeaturesBackend):
    """A stand-in for a backend with weights: a trainable-looking 1x1 conv in front of the filter bank."""

    name = "features-conv"

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        torch.manual_seed(0)
        self.model = torch.nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.model.weight.copy_(torch.eye(3).view(3, 3, 1, 1) + 0.05 * torch.randn(3, 3, 1, 1))
            self.model.bias.zero_()
        self.model.train()

    def compute_features(self, image: torch.Tensor) -> torch.Tensor:
        return super().compute_features(self.model(image.unsqueeze(0))[0].clamp(0, 1))

    def modules(self) -> list[torch.nn.Module]:
        return [self.model]


def features_factory(tmp_path: Path):
    return create_backend("features", **FAST)


def seggpt_factory(tmp_path: Path):
    """A tiny random SegGPT through the real loading path (skipped until promptopt.backends.seggpt exists)."""
    pytest.importorskip("promptopt.backends.seggpt")
    from transformers import SegGptConfig, SegGptForImageSegmentation

    cfg = SegGptConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=[64, 32], patch_size=8,
                       pretrain_image_size=32, mlp_dim=64, decoder_hidden_size=16, merge_index=1,
                       intermediate_hidden_state_indices=[1, 3])
    torch.manual_seed(0)
    SegGptForImageSegmentation(cfg).save_pretrained(tmp_path / "tiny-seggpt")
    return create_backend("seggpt", str(tmp_path / "tiny-seggpt"))


BACKENDS = {"features": features_factory, "seggpt": seggpt_factory}


@pytest.fixture(scope="module")
def dog_task(sample_root) -> Task:
    return Task.from_folder(sample_root, category="dog", seed=0)


def _oracle(backend, samples, num_classes=2) -> ValidationOracle:
    return ValidationOracle(backend, samples, num_classes)


def test_model_frozen_bit_identical_and_grads_only_on_context(dog_task):
    backend = ConvFeaturesBackend(**FAST)
    before = [p.detach().clone() for p in model_parameters(backend)]
    assert backend.modules() == [backend.model] and all(p.requires_grad for p in backend.model.parameters())
    tuner = ContextTuner(_oracle(backend, dog_task.split.val[:2]), init=dog_task.pool[:1], steps=4, batch_size=2,
                         warmup=1, eval_every=2, patience=None).fit(dog_task.pool)
    after = model_parameters(backend)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(p.grad is None for p in backend.model.parameters())  # no gradient ever reached the model
    assert all(p.requires_grad for p in backend.model.parameters()) and backend.model.training  # restored
    for p in tuner.params_:  # the context did learn
        assert p.image_logits.grad is not None and p.image_logits.grad.abs().sum() > 0
        assert p.mask_logits.grad is not None
    assert tuner.steps_run_ == 4
    assert [s.id for s in tuner.train_] == [s.id for s in dog_task.pool[1:]]  # the start example is not trained on


def test_weight_free_backend_declares_no_modules():
    assert create_backend("features").modules() == [] and model_parameters(create_backend("features")) == []


@pytest.mark.parametrize("backend_name", sorted(BACKENDS))
def test_tuning_keeps_the_best_evaluation_and_roundtrips(backend_name, dog_task, tmp_path):
    """The kept contexts are the best-scoring evaluation, re-scored identically by the oracle, and a saved
    prompt reproduces their predictions in a fresh backend."""
    backend = BACKENDS[backend_name](tmp_path)
    val_o, _ = dog_task.oracles(backend)
    init = dog_task.pool[:1]
    tuner = ContextTuner(val_o, init=init, steps=12, lr=0.05, batch_size=3, warmup=2, eval_every=4,
                         patience=None).fit(dog_task.pool)
    if backend_name == "features":
        assert tuner.score_ > tuner.initial_score_ + 0.02  # a real gain on this object
        assert np.mean(tuner.losses_[-4:]) < np.mean(tuner.losses_[:4])
    assert tuner.score_ == max(h["val_miou"] for h in tuner.history_)
    assert tuner.history_[tuner.best_step_ // 4]["val_miou"] == tuner.score_
    assert tuner.history_[0]["step"] == 0 and tuner.history_[0]["val_miou"] == tuner.initial_score_
    for c in tuner.contexts_:  # always valid tensors
        assert c.key is None and 0 <= float(c.image.min()) and float(c.image.max()) <= 1
        assert torch.all(c.mask >= 0) and torch.all(c.mask.sum(0) <= 1 + 1e-5)
    assert val_o.score_contexts(tuner.contexts_).miou == pytest.approx(tuner.score_, abs=1e-12)
    out = tmp_path / "run"
    tuner.save_prompt(out, category="dog")
    queries = dog_task.split.test[:3]
    expected = [prediction_to_labels(backend.predict(tuner.contexts_, [q], 2)[0]).numpy() for q in queries]
    got = predict_labels(out / "prompt.json", queries)  # a fresh backend built from the artifact
    assert all(np.array_equal(e, g) for e, g in zip(expected, got))
    loaded = load_contexts(out / "context.safetensors")
    assert all(torch.equal(a.image, b.image) and torch.equal(a.mask, b.mask) for a, b in zip(loaded, tuner.contexts_))
    art = load_prompt(out)
    assert art.kind == "tuned" and art.ids == [init[0].id]


def test_budget_and_option_errors(dog_task):
    oracle = _oracle(create_backend("features", **FAST), dog_task.split.val[:1])
    with pytest.raises(BudgetError, match="too small for context tuning"):
        ContextTuner(oracle, init=dog_task.pool[:1], steps=2, memory_budget="1KiB").fit(dog_task.pool)
    with pytest.raises(ConfigError, match="tune must be one of"):
        ContextTuner(oracle, tune="weights")
    with pytest.raises(ConfigError, match="init must be"):
        ContextTuner(oracle, init="prompt.json")
    with pytest.raises(ConfigError, match="also validation images"):
        ContextTuner(oracle, init=dog_task.pool[:1], steps=1).fit(dog_task.split.val[:2])
    with pytest.raises(ConfigError, match="init examples .* are validation images"):
        ContextTuner(oracle, init=dog_task.split.val[:1], steps=1).fit(dog_task.pool)


def _three_class_samples(n: int) -> list[Sample]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = np.zeros((40, 48, 3), np.uint8) + np.array([40, 90, 200], np.uint8)
        mask = np.zeros((40, 48), np.int64)
        r = int(rng.integers(4, 12))
        img[r:r + 12, 4:20] = (220, 40, 40)
        mask[r:r + 12, 4:20] = 1
        img[r + 14:r + 26, 26:44] = (40, 200, 40)
        mask[r + 14:r + 26, 26:44] = 2
        mask[0, 0] = 255
        img = (img + rng.normal(0, 10, img.shape)).clip(0, 255).astype(np.uint8)
        out.append(Sample(f"s{i}", "three", image=img, mask=mask))
    return out


@pytest.mark.parametrize("per_class", [False, True])
def test_semantic_contexts(per_class):
    data = _three_class_samples(8)
    oracle = _oracle(create_backend("features", **FAST), data[6:], 3)
    tuner = ContextTuner(oracle, init=data[:2], steps=3, batch_size=2, warmup=1, eval_every=3, per_class=per_class,
                         patience=None).fit(data[:6])
    assert len(tuner.contexts_) == 2  # per class: one per foreground class; else one palette context per example
    if per_class:
        for k, c in zip((1, 2), tuner.contexts_):
            other = 3 - k
            assert float(c.mask[other].abs().max()) == 0.0 and float(c.mask[k].max()) > 0.5
    else:
        assert all(float(c.mask[k].max()) > 0.5 for c in tuner.contexts_ for k in range(3))
    assert float(tuner.contexts_[0].mask[:, 0, 0].sum()) == 0.0  # ignored pixel stays ignored
    assert [s.id for s in tuner.train_] == [s.id for s in data[2:6]]


def test_noise_init():
    data = _three_class_samples(6)
    tuner = ContextTuner(_oracle(create_backend("features", **FAST), data[4:], 3), init="noise", num_contexts=2,
                         noise_size=(24, 32), steps=2, batch_size=2, warmup=0, eval_every=1).fit(data[:4])
    assert len(tuner.contexts_) == 2 and tuple(tuner.contexts_[0].image.shape) == (3, 24, 32)
    assert tuple(tuner.contexts_[0].mask.shape) == (3, 24, 32)
    assert tuner.selected_ == [] and len(tuner.train_) == 4


def test_cli_tune_then_predict(sample_root, tmp_path):
    from promptopt.cli import app

    runner = CliRunner()
    out = tmp_path / "tuned"
    opts = ["--option", "max_side=64", "--option", "pixels_per_prompt=128"]
    args = ["tune", "--data", str(sample_root), "--category", "camel", "--shots", "1", "--steps", "4",
            "--eval-every", "2", "--warmup", "1", "--batch-size", "2", "--out", str(out), "--quiet", *opts]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "result.json").read_text())
    assert res["strategy"] == "tuned" and res["summary"]["steps_run"] == 4
    assert set(res["extra"]["test"]) == {"start", "init_examples"}
    assert res["test_miou"] is not None and set(res["test_per_image_iou"]) == set(res["split"]["test"])
    for f in ("prompt.json", "context.safetensors", "report.md", "report.html", "loss.png", "val_miou.png",
              "contexts.png", "per_image.csv"):
        assert (out / f).is_file(), f
    images = tmp_path / "new"
    images.mkdir()
    for i in res["split"]["test"][:2]:
        shutil.copy(sample_root / "camel" / "images" / f"{i}.jpg", images / f"{i}.jpg")
    r = runner.invoke(app, ["predict", "--prompt", str(out / "prompt.json"), "--images", str(images),
                            "--out", str(tmp_path / "masks"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert {f"{i}.png" for i in res["split"]["test"][:2]} <= {p.name for p in (tmp_path / "masks").iterdir()}
    r = runner.invoke(app, ["tune", "--data", str(sample_root), "--category", "camel", "--shots", "1", "--steps", "2",
                            "--memory-budget", "1KiB", "--out", str(tmp_path / "y"), *opts])
    assert r.exit_code == 2 and "too small for context tuning" in r.output
    assert not (tmp_path / "y").exists()  # a failed start leaves no folder behind


def test_tuning_refuses_a_backend_that_is_not_differentiable(dog_task, tmp_path):
    from promptopt.backends.base import Backend

    class Frozen(FeaturesBackend):
        differentiable = False

    with pytest.raises(ConfigError, match="not differentiable") as err:
        ContextTuner(_oracle(Frozen(**FAST), dog_task.split.val[:1]))
    assert Backend.differentiable is False
    # the error names the registered backends that declare themselves differentiable (the strategy names none)
    assert str(err.value).endswith("context tuning applies to features, seggpt")


@pytest.mark.parametrize("backend_name", sorted(BACKENDS))
def test_loss_falls_with_frozen_model(backend_name, dog_task, tmp_path):
    """The same two training images every step: the backend's own loss falls, its weights do not move."""
    backend = BACKENDS[backend_name](tmp_path)
    before = [p.detach().clone() for p in model_parameters(backend)]
    tuner = ContextTuner(_oracle(backend, dog_task.split.val[:1]), init=dog_task.pool[:1], steps=8, lr=0.1,
                         batch_size=2, warmup=1, eval_every=8, patience=None).fit(dog_task.pool[:3])
    assert tuner.losses_[-1] < tuner.losses_[0]
    assert all(torch.equal(a, b) for a, b in zip(before, model_parameters(backend)))
    assert all(p.grad is None for p in model_parameters(backend))
