import numpy as np
import pytest
import torch

from promptopt.backends import Context, create_backend
from promptopt.backends.features import FeaturesBackend
from promptopt.data import Sample, load_dataset, split_samples
from promptopt.errors import ConfigError
from promptopt.metrics import mean_iou
from promptopt.oracle import prediction_to_labels

from conftest import blob_image


@pytest.fixture(scope="module")
def camel(sample_root):
    return split_samples(load_dataset(sample_root, category="camel").samples(), seed=0)


def test_registry():
    assert isinstance(create_backend("features"), FeaturesBackend)
    with pytest.raises(ConfigError, match="unknown backend 'nope'"):
        create_backend("nope")
    with pytest.raises(ConfigError, match="uses no checkpoint"):
        create_backend("features", checkpoint="some/model")
    with pytest.raises(ConfigError, match="bad options"):
        create_backend("features", options={"no_such_option": 1})


def test_probabilities_shape_and_sum(camel):
    b = FeaturesBackend()
    probs = b.predict(camel.pool[:2], camel.val[:2], num_classes=2)
    for p, q in zip(probs, camel.val[:2]):
        assert p.shape == (2, *q.size)
        assert torch.allclose(p.sum(0), torch.ones(q.size), atol=1e-5)
        assert p.min() >= 0


def test_pairs_merge_equals_pooled_softmax(camel):
    """The output-level merge is exact: it equals one softmax over all prompts' pixels."""
    b = FeaturesBackend()
    prompts = camel.pool[:3]
    merged = b.predict(prompts, camel.val[:2], 2)
    pooled = b.predict_pooled(prompts, camel.val[:2], 2)
    for m, p in zip(merged, pooled):
        assert torch.allclose(m, p, atol=1e-5)


def test_merge_is_order_independent(camel):
    b = FeaturesBackend()
    q = camel.val[0]
    s = [b.pair_stats(p, q, 2) for p in camel.pool[:3]]
    a = b.finalize(b.reduce_stats(s), q)
    c = b.finalize(b.reduce_stats(s[::-1]), q)
    assert torch.allclose(a, c, atol=1e-6)


def test_deterministic_across_instances(camel):
    p1 = FeaturesBackend().predict(camel.pool[:2], camel.val[:1], 2)[0]
    p2 = FeaturesBackend().predict(camel.pool[:2], camel.val[:1], 2)[0]
    assert torch.equal(p1, p2)
    p3 = FeaturesBackend(seed=1).predict(camel.pool[:2], camel.val[:1], 2)[0]
    assert not torch.equal(p1, p3)


def test_features_computed_once_per_image(camel):
    b = FeaturesBackend()
    b.prepare(camel.val)
    assert b.feature_computations == len(camel.val)
    for _ in range(3):
        b.predict(camel.pool[:2], camel.val, 2)
    assert b.feature_computations == len(camel.val) + 2


def test_differentiable_wrt_context(camel):
    b = FeaturesBackend()
    base = Context.from_sample(camel.pool[0], 2)
    img = base.image.clone().requires_grad_(True)
    mask = base.mask.clone().requires_grad_(True)
    probs = b.predict([Context(img, mask)], camel.val[:1], 2)[0]
    loss = -(probs[1] * torch.from_numpy(camel.val[0].mask).float()).mean()
    loss.backward()
    assert img.grad is not None and mask.grad is not None
    assert torch.isfinite(img.grad).all() and torch.isfinite(mask.grad).all()
    assert img.grad.abs().sum() > 0 and mask.grad.abs().sum() > 0


def test_multiclass_colours():
    """Three classes told apart by colour: a red and a green ellipse on blue."""
    rng = np.random.default_rng(0)

    def two_blobs(seed):
        r = np.random.default_rng(seed)
        img1, m1 = blob_image(r, colour=(230, 30, 30))
        img2, m2 = blob_image(r, colour=(30, 200, 30))
        img = img1.copy()
        img[:, 32:] = img2[:, 32:]
        mask = np.where(np.arange(64)[None, :] < 32, m1, m2 * 2)
        return Sample(f"s{seed}", "multi", image=img, mask=mask)

    prompts, queries = [two_blobs(i) for i in range(2)], [two_blobs(i) for i in range(10, 14)]
    b = FeaturesBackend(position=0.5)
    probs = b.predict(prompts, queries, 3)
    assert all(p.shape[0] == 3 for p in probs)
    miou = mean_iou([prediction_to_labels(p) for p in probs], [q.mask for q in queries], 3)
    assert miou > 0.8


def test_context_class_count_mismatch(camel):
    b = FeaturesBackend()
    ctx = Context.from_sample(camel.pool[0], 3)
    with pytest.raises(ConfigError, match="3 classes, the task has 2"):
        b.predict([ctx], camel.val[:1], 2)


def test_real_data_is_non_trivial(camel):
    """On real DAVIS frames, two prompts segment the camel far better than chance (IoU of all-foreground)."""
    b = FeaturesBackend()
    probs = b.predict(camel.pool[:2], camel.test, 2)
    miou = mean_iou([prediction_to_labels(p) for p in probs], [q.mask for q in camel.test], 2)
    chance = mean_iou([np.ones_like(q.mask) for q in camel.test], [q.mask for q in camel.test], 2)
    assert miou > 0.5 > chance


def test_memory_estimate_grows_with_prompts_and_size():
    b = FeaturesBackend()
    assert b.memory_bytes(4, (480, 854)) > b.memory_bytes(1, (480, 854)) > b.memory_bytes(1, (100, 100)) > 0
