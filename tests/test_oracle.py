
import numpy as np
import pytest
import torch

from promptopt.backends.base import Backend
from promptopt.backends.features import FeaturesBackend
from promptopt.data import Sample, load_dataset, split_samples
from promptopt.errors import ConfigError, DataError
from promptopt.oracle import ValidationOracle, prediction_to_labels

from test_persam_backend import blobs, sam_dir  # noqa: F401,E402  (fixtures: tiny SAM, blob images)


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


# --- cross-validated mode ------------------------------------------------------------------------------

def small():
    return FeaturesBackend(max_side=64, pixels_per_prompt=128)


class PairLog(FeaturesBackend):
    """The features backend, recording every (prompt, query) pair whose statistics it computes."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.pairs = []

    def pair_stats(self, prompt, query, num_classes):
        self.pairs.append((prompt.key, query.key))
        return super().pair_stats(prompt, query, num_classes)


def test_cv_scores_a_set_on_every_image_but_its_own(dog):
    """A cross-validated oracle's score of S is a holdout score of S on (pool ∪ val) minus S, image for image."""
    images = dog.pool + dog.val
    cv = ValidationOracle(small(), images, cross_validate=True)
    assert cv.mode == "cv" and ValidationOracle(small(), dog.val).mode == "holdout"
    for chosen in (dog.pool[:1], [dog.pool[3], dog.pool[1]]):
        rest = [s for s in images if s not in chosen]
        ref = ValidationOracle(small(), rest).score(chosen)
        res = cv.score(chosen)
        assert list(res.per_image_iou) == [s.id for s in rest]
        assert res.miou == ref.miou and res.per_image_iou == ref.per_image_iou
        assert all((res.confusions[i] == ref.confusions[i]).all() for i in ref.confusions)
        assert [q.id for q in cv.scored_samples([p.key for p in chosen])] == [s.id for s in rest]


def test_cv_never_computes_an_image_with_itself_and_computes_each_pair_once(dog):
    """With the pair cache a greedy step costs no more forwards per image than in holdout mode: each (prompt,
    image) pair once, never an image with itself; later steps are arithmetic; additions equal plain scores."""
    images = dog.pool + dog.val
    be = PairLog(max_side=64, pixels_per_prompt=128)
    cv = ValidationOracle(be, images, cross_validate=True)
    singles = cv.score_additions([], dog.pool)
    assert all(p != q for p, q in be.pairs) and len(set(be.pairs)) == len(be.pairs)
    assert cv.forwards == len(be.pairs) == len(dog.pool) * (len(images) - 1)
    for c, r in zip(dog.pool, singles):
        assert c.id not in r.per_image_iou and len(r.per_image_iou) == len(images) - 1
    pairs = len(be.pairs)
    second = cv.score_additions([dog.pool[0]], dog.pool[1:])
    assert len(be.pairs) == pairs  # a second step computes nothing new
    plain = ValidationOracle(small(), images, cache=False, cross_validate=True)
    for c, r in list(zip(dog.pool[1:], second))[:3]:
        ref = plain.score([dog.pool[0], c])
        assert r.miou == pytest.approx(ref.miou, abs=1e-12) and list(r.per_image_iou) == list(ref.per_image_iou)


def test_cv_model_combining_backend_counts_only_the_rows_it_runs(dog):
    """A model-combining backend runs a set on every image but its own prompts; forwards = rows run."""
    images = dog.pool + dog.val
    be = MeanColourBackend()
    cv = ValidationOracle(be, images, cross_validate=True)
    base, cands = [dog.pool[0]], dog.pool[1:4]
    res = cv.score_additions(base, cands)
    assert cv.forwards == be.rows == len(cands) * 2 * (len(images) - 2)
    for c, r in zip(cands, res):
        ref = ValidationOracle(MeanColourBackend(), images, cross_validate=True).score([*base, c])
        assert r.miou == ref.miou and set(r.per_image_iou) == {s.id for s in images} - {base[0].id, c.id}
    rows = be.rows
    cv.score_additions(base, cands)  # memoised
    assert be.rows == rows


def test_cv_refuses_what_it_cannot_score(dog):
    cv = ValidationOracle(small(), dog.pool[:3], cross_validate=True)
    with pytest.raises(ConfigError, match="holds every labelled image"):
        cv.score(dog.pool[:3])
    with pytest.raises(ConfigError, match="holds every labelled image"):
        cv.score_additions(dog.pool[:2], [dog.pool[2]])
    with pytest.raises(ConfigError, match="itself as a prompt"):
        cv.score_assignment({s.key: [s] for s in dog.pool[:3]})


def test_task_builds_the_oracle_of_each_mode_and_never_touches_test(sample_root):
    from promptopt.task import Task

    task = Task.from_folder(sample_root, category="dog", seed=0)
    hold, test = task.oracles(small())
    cv, test_cv = task.oracles(small(), mode="cv")
    assert [s.key for s in hold.samples] == [s.key for s in task.split.val] and not hold.cross_validate
    assert [s.key for s in cv.samples] == [s.key for s in task.split.pool + task.split.val] and cv.cross_validate
    assert [s.key for s in test_cv.samples] == [s.key for s in test.samples] == [s.key for s in task.split.test]
    assert not test_cv.cross_validate
    with pytest.raises(ConfigError, match="oracle mode must be one of holdout, cv"):
        task.oracles(small(), mode="loo")


def test_cv_oracle_runs_tiny_seggpt_and_counts_model_rows(tmp_path):
    """SegGPT's feature ensemble (model-combining) under a cross-validated oracle: the rows the model computes
    equal the oracle's forwards, sets never run on their own prompts, and grouped sets equal sets scored alone."""
    pytest.importorskip("transformers")
    from promptopt.backends.seggpt import SegGPTBackend, save_random_model

    save_random_model(tmp_path / "seggpt")
    be = SegGPTBackend.from_pretrained(tmp_path / "seggpt")
    assert be.combines == "model"
    rows = []
    be.model.model.embeddings.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    rng = np.random.default_rng(0)
    images = [Sample(f"s{i}", "t", image=rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                     mask=(rng.random((32, 32)) < 0.4).astype(np.int64)) for i in range(6)]
    cv = ValidationOracle(be, images, num_classes=2, cross_validate=True)
    res = cv.score_additions(images[:1], images[1:4])
    assert cv.forwards == sum(rows) == 3 * 2 * (6 - 2)
    alone = ValidationOracle(SegGPTBackend.from_pretrained(tmp_path / "seggpt"), images, num_classes=2,
                             cross_validate=True)
    for c, r in zip(images[1:4], res):
        assert set(r.per_image_iou) == {s.id for s in images} - {"s0", c.id}
        assert r.miou == pytest.approx(alone.score([images[0], c]).miou, abs=1e-6)


@pytest.mark.parametrize("kshot", ["output", "mean"])
def test_cv_oracle_runs_tiny_persam(kshot, sam_dir, blobs):
    """PerSAM on a tiny SAM: output-combining (pair cache, no image paired with itself) and model-combining
    (kshot=mean: forwards = prompts x images scored) both score a set on every image but its own prompts."""
    from promptopt.backends.persam import PerSAMBackend

    be = PerSAMBackend.from_pretrained(sam_dir, kshot=kshot)
    cv = ValidationOracle(be, blobs, num_classes=2, cross_validate=True)
    res = cv.score_additions(blobs[:1], blobs[1:3])
    n = len(blobs)
    if kshot == "output":
        assert cv.uses_pair_cache and cv.forwards == len(cv._pairs) == 3 * (n - 1) - 2  # s0 on n-1, s1/s2 on n-2
        assert all(p != q for p, q in cv._pairs)
    else:
        assert not cv.uses_pair_cache and cv.forwards == 2 * 2 * (n - 2)
    for c, r in zip(blobs[1:3], res):
        assert set(r.per_image_iou) == {s.id for s in blobs} - {"s0", c.id}
