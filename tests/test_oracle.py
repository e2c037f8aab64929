
import numpy as np
import pytest
import torch

from promptopt.backends.base import Backend
from promptopt.backends.features import FeaturesBackend
from promptopt.data import load_dataset, split_samples
from promptopt.errors import ConfigError, DataError
from promptopt.oracle import ValidationOracle, prediction_to_labels


@pytest.fixture(scope="module")
def dog(sample_root):
    return split_samples(load_dataset(sample_root, category="dog").samples(), seed=0)


class MeanColourBackend(Backend):
    """A model-combining test backend: foreground = pixels closer to the prompts' mean object colour."""

    name = "mean-colour"
    combines = "model"

    def __init__(self):
        self.rows = 0

    def prepare(self, samples):
        pass

    def predict(self, prompts, queries, num_classes=None):
        self.rows += len(prompts) * len(queries)
        fg = np.mean([p.image[p.mask == 1].mean(0) for p in prompts], 0)
        bg = np.mean([p.image[p.mask == 0].mean(0) for p in prompts], 0)
        out = []
        for q in queries:
            img = q.image.astype(np.float32)
            d_fg = ((img - fg) ** 2).sum(-1)
            d_bg = ((img - bg) ** 2).sum(-1)
            p1 = torch.from_numpy((d_bg / (d_fg + d_bg + 1e-6)).astype(np.float32))
            out.append(torch.stack([1 - p1, p1]))
        return out

    def memory_bytes(self, num_prompts, image_size=None, num_classes=2):
        return 1000 * num_prompts


def test_score_matches_hand_computation(dog):
    b = FeaturesBackend()
    o = ValidationOracle(b, dog.val)
    prompts = dog.pool[:2]
    res = o.score(prompts)
    probs = b.predict(sorted(prompts, key=lambda p: p.key), dog.val, 2)
    inter = union = 0
    for p, q in zip(probs, dog.val):
        pred = prediction_to_labels(p).numpy() == 1
        gt = q.mask == 1
        inter += (pred & gt).sum()
        union += (pred | gt).sum()
    assert res.miou == pytest.approx(inter / union, abs=1e-12)
    assert set(res.per_image_iou) == {q.id for q in dog.val}


def test_cached_equals_plain(dog):
    sets = [dog.pool[:1], dog.pool[1:3], dog.pool[:4], [dog.pool[5], dog.pool[0]]]
    cached = ValidationOracle(FeaturesBackend(), dog.val, cache=True)
    plain = ValidationOracle(FeaturesBackend(), dog.val, cache=False)
    for s in sets:
        assert cached.score(s).miou == pytest.approx(plain.score(s).miou, abs=1e-9)
    # 1 + 2 + 4 + 2 = 9 pairs per image without caching; with caching 5 distinct prompts (pool 0-3 and 5)
    assert plain.forwards == 9 * len(dog.val)
    assert cached.forwards == 5 * len(dog.val)


def test_no_pair_computed_twice_and_memo(dog):
    o = ValidationOracle(FeaturesBackend(), dog.val)
    o.score(dog.pool[:3])
    f = o.forwards
    o.score(list(reversed(dog.pool[:3])))  # same set, other order: memoised
    assert o.forwards == f and o.stats["memo_hits"] == 1
    o.score(dog.pool[:2])  # subset: all pairs cached
    assert o.forwards == f


def test_score_additions_equals_score(dog):
    o = ValidationOracle(FeaturesBackend(), dog.val)
    ref = ValidationOracle(FeaturesBackend(), dog.val, cache=False)
    base = dog.pool[:2]
    cands = dog.pool[2:6]
    fast = o.score_additions(base, cands)
    for c, r in zip(cands, fast):
        assert r.miou == pytest.approx(ref.score([*base, c]).miou, abs=1e-9)


def test_model_combining_backend_counts_rows(dog):
    b = MeanColourBackend()
    o = ValidationOracle(b, dog.val)
    assert not o.uses_pair_cache
    o.score(dog.pool[:3])
    assert o.forwards == 3 * len(dog.val) == b.rows
    o.score(dog.pool[:3])
    assert o.forwards == 3 * len(dog.val)
    with pytest.raises(ConfigError, match="no output-level statistics"):
        o.score_additions(dog.pool[:1], dog.pool[1:2], approximate=True)


def test_bad_inputs(dog):
    with pytest.raises(DataError, match="at least one labelled image"):
        ValidationOracle(FeaturesBackend(), [])
    o = ValidationOracle(FeaturesBackend(), dog.val)
    with pytest.raises(ConfigError, match="empty prompt set"):
        o.score([])
    with pytest.raises(ConfigError, match="repeats"):
        o.score([dog.pool[0], dog.pool[0]])
