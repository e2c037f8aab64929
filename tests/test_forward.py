from types import SimpleNamespace

import numpy as np
import pytest

from promptopt.backends.features import FeaturesBackend
from promptopt.data import Sample, load_dataset, split_samples
from promptopt.errors import BudgetError, ConfigError
from promptopt.memory import format_bytes, parse_bytes
from promptopt.oracle import ValidationOracle
from promptopt.strategies import BestSingle, ForwardSelector, RandomK, RandomSearch, WorstCaseGreedy
from promptopt.strategies.acceptance import StoredResult


@pytest.fixture(scope="module")
def car(sample_root):
    return split_samples(load_dataset(sample_root, category="car-roundabout").samples(), pool=12, val=6, seed=0)


def small_backend():
    return FeaturesBackend(max_side=96, pixels_per_prompt=256)


def test_parse_bytes():
    assert parse_bytes("16GiB") == 16 * 1024**3
    assert parse_bytes("512MB") == 512 * 1000**2
    assert parse_bytes("1.5 KiB") == 1536
    assert parse_bytes(2048) == 2048 and parse_bytes(None) is None
    for bad in ("lots", "12 parsecs", "-1GB", 0):
        with pytest.raises(BudgetError):
            parse_bytes(bad)
    assert format_bytes(1536) == "1.5 KiB"


def test_cached_and_plain_select_the_same(car):
    """The cached greedy (pair statistics merged arithmetically) picks exactly what the plain one picks."""
    fast_oracle = ValidationOracle(small_backend(), car.val, cache=True)
    plain_oracle = ValidationOracle(small_backend(), car.val, cache=False)
    fast = ForwardSelector(fast_oracle, max_prompts=4).fit(car.pool)
    plain = ForwardSelector(plain_oracle, max_prompts=4).fit(car.pool)
    assert fast.selected_ids_ == plain.selected_ids_
    assert fast.score_ == pytest.approx(plain.score_, abs=1e-9)
    steps = len(plain.history_)
    n, v = len(car.pool), len(car.val)
    # plain: each step scores every remaining candidate with the whole set; cached: each pair once
    assert plain_oracle.forwards == v * sum((n - s) * (s + 1) for s in range(steps))
    assert fast_oracle.forwards == v * n
    for hf, hp in zip(fast.history_, plain.history_):
        assert hf["chosen"] == hp["chosen"]
        for cid, score in hp["candidates"].items():
            assert hf["candidates"][cid] == pytest.approx(score, abs=1e-9)


class ScriptedOracle:
    """Duck-typed oracle with scripted scores: strategies only talk to the oracle, so this isolates
    the stopping rules. ``table`` maps frozenset(ids) → val mIoU."""

    def __init__(self, table, memory=lambda k: 100 * k):
        self.table = table
        self.samples = [Sample("v", "c", image=np.zeros((4, 4, 3), np.uint8), mask=np.zeros((4, 4), int))]
        self.backend = SimpleNamespace(memory_bytes=lambda k, size=None, num_classes=2: memory(k), name="scripted",
                                       config=lambda: {"name": "scripted"}, memory_kind="scripted")
        self.num_classes = 2
        self.uses_pair_cache = True
        self.calls = 0

    def score_additions(self, base, candidates, approximate=False):
        self.calls += len(candidates)
        out = []
        for c in candidates:
            ids = [b.id for b in base] + [c.id]
            entry = self.table.get(frozenset(ids), 0.0)
            out.append(entry if isinstance(entry, StoredResult) else SimpleNamespace(miou=entry, per_image_iou={}))
        return out


def pool_of(*ids):
    return [Sample(i, "c", image=np.zeros((4, 4, 3), np.uint8), mask=np.zeros((4, 4), int)) for i in ids]


def test_stops_when_no_gain_and_keeps_best_prefix():
    t = {frozenset("a"): 0.5, frozenset("b"): 0.4, frozenset("c"): 0.1,
         frozenset("ab"): 0.6, frozenset("ac"): 0.55,
         frozenset("abc"): 0.58}
    sel = ForwardSelector(ScriptedOracle(t), rule="none").fit(pool_of("a", "b", "c"))
    assert sel.selected_ids_ == ["a", "b"] and sel.score_ == 0.6
    assert sel.stop_reason_ == "no_gain"
    assert [h["accepted"] for h in sel.history_] == [True, True, False]


def test_patience_lets_a_dip_through():
    t = {frozenset("a"): 0.5, frozenset("b"): 0.1, frozenset("c"): 0.1, frozenset("d"): 0.1,
         frozenset("ab"): 0.45, frozenset("ac"): 0.4, frozenset("ad"): 0.4,
         frozenset("abc"): 0.7, frozenset("abd"): 0.3, frozenset("abcd"): 0.65}
    pool = pool_of("a", "b", "c", "d")
    assert ForwardSelector(ScriptedOracle(t), rule="none", patience=1).fit(pool).selected_ids_ == ["a"]
    sel = ForwardSelector(ScriptedOracle(t), rule="none", patience=2).fit(pool)
    assert sel.selected_ids_ == ["a", "b", "c"] and sel.score_ == 0.7


def test_min_gain():
    t = {frozenset("a"): 0.5, frozenset("ab"): 0.505, frozenset("b"): 0.2}
    assert ForwardSelector(ScriptedOracle(t), rule="none", min_gain=0.01).fit(pool_of("a", "b")).selected_ids_ == ["a"]
    assert ForwardSelector(ScriptedOracle(t), rule="none", min_gain=0.0).fit(pool_of("a", "b")).selected_ids_ == ["a", "b"]


def test_memory_budget_and_max_prompts():
    t = {frozenset(s): 0.1 * len(s) for s in ("a", "ab", "abc", "abcd")}
    t.update({frozenset(x): 0.0 for x in ("b", "c", "d")})
    pool = pool_of("a", "b", "c", "d")
    sel = ForwardSelector(ScriptedOracle(t), rule="none", memory_budget=250).fit(pool)  # 100 bytes per prompt
    assert sel.selected_ids_ == ["a", "b"] and sel.stop_reason_ == "memory_budget"
    assert sel.budget_bytes_ == 250 and sel.memory_bytes_ == 200
    sel = ForwardSelector(ScriptedOracle(t), rule="none", max_prompts=3).fit(pool)
    assert len(sel.selected_) == 3 and sel.stop_reason_ == "max_prompts"
    with pytest.raises(BudgetError, match="too small for one prompt"):
        ForwardSelector(ScriptedOracle(t), rule="none", memory_budget="50B").fit(pool)
    with pytest.raises(BudgetError, match="cannot read memory budget"):
        ForwardSelector(ScriptedOracle(t), rule="none", memory_budget="a lot").fit(pool)


def test_real_budget_too_small(car):
    o = ValidationOracle(small_backend(), car.val)
    with pytest.raises(BudgetError, match="too small for one prompt: backend 'features' needs about"):
        ForwardSelector(o, memory_budget="1KiB").fit(car.pool)


def test_resume_after_interruption(car, tmp_path):
    """Interrupted after step 2, a fit with the run's checkpoint continues from there and ends where an
    uninterrupted fit ends; another configuration refuses the checkpoint instead of reusing it."""
    from promptopt.run import Run

    full = ForwardSelector(ValidationOracle(small_backend(), car.val), max_prompts=3).fit(car.pool)

    def interrupt(label, done, total):
        if label == "step" and done == 2 and done < total:
            raise KeyboardInterrupt

    run = Run(tmp_path / "run", {"test": "forward"})
    with pytest.raises(KeyboardInterrupt):
        ForwardSelector(ValidationOracle(small_backend(), car.val), max_prompts=3, checkpoint=run.checkpoint("s"),
                        progress=interrupt).fit(car.pool)
    run = Run(tmp_path / "run", {"test": "forward"})  # a new process: the state is read back from disk
    saved, _ = run.checkpoint("s").load(ForwardSelector(ValidationOracle(small_backend(), car.val),
                                                        max_prompts=3)._fingerprint(car.pool))
    assert len(saved["history"]) == 2
    oracle = ValidationOracle(small_backend(), car.val)
    resumed = ForwardSelector(oracle, max_prompts=3, checkpoint=run.checkpoint("s")).fit(car.pool)
    assert resumed.resumed_steps_ == 2
    assert resumed.selected_ids_ == full.selected_ids_ and resumed.n_evaluations_ == full.n_evaluations_
    assert resumed.history_[:2] == saved["history"]
    assert oracle.calls == len(car.pool) - 2  # only step 3's candidates were scored in the resumed fit
    with pytest.raises(ConfigError, match="another configuration"):
        ForwardSelector(ValidationOracle(small_backend(), car.val), max_prompts=2,
                        checkpoint=run.checkpoint("s")).fit(car.pool)


def test_baselines(car):
    o = ValidationOracle(small_backend(), car.val)
    best = BestSingle(o).fit(car.pool)
    singles = best.history_[0]["candidates"]
    assert best.score_ == max(singles.values())
    rnd = RandomK(o, k=2, seeds=4).fit(car.pool)
    assert len(rnd.draws_) == 4 and all(len(d) == 2 for d in rnd.draws_)
    assert rnd.extra_scores(o)["mean"] == pytest.approx(np.mean([h["val_miou"] for h in rnd.history_]))
    assert rnd.n_evaluations_ == 4 and best.n_evaluations_ == len(car.pool)
    rs = RandomSearch(o, k=3, n_trials=10, seed=0).fit(car.pool)
    assert len(rs.history_) == 10 and rs.score_ == max(h["val_miou"] for h in rs.history_)
    assert max(len(h["selected"]) for h in rs.history_) <= 3
    wc = WorstCaseGreedy(o, max_prompts=3).fit(car.pool)
    assert wc.selected_[0].id == best.selected_[0].id and 1 <= len(wc.selected_) <= 3
    for s in (best, rnd, rs, wc):
        assert s.oracle is o
    with pytest.raises(ConfigError, match="also validation images"):
        BestSingle(o).fit(car.val)


def test_shortlist_mode_on_model_combining_backend(car):
    """Model-combining backend: exact greedy re-scores all candidates; shortlist=M only the top M exactly."""
    from promptopt.backends.testing import JointFeaturesBackend

    make = lambda: JointFeaturesBackend(max_side=96, pixels_per_prompt=256)  # noqa: E731
    exact_oracle = ValidationOracle(make(), car.val)
    assert not exact_oracle.uses_pair_cache
    exact = ForwardSelector(exact_oracle, max_prompts=3, patience=3).fit(car.pool)
    n, v, steps = len(car.pool), len(car.val), len(exact.history_)
    assert exact_oracle.forwards == v * sum((n - s) * (s + 1) for s in range(steps))
    short_oracle = ValidationOracle(make(), car.val)
    short = ForwardSelector(short_oracle, max_prompts=3, patience=3, shortlist=2).fit(car.pool)
    for h in short.history_:
        exact_scored = [c for c, s in h["candidates"].items() if s == s]  # not NaN
        assert len(exact_scored) == min(2, len(h["candidates"]))
    # pair statistics once per (candidate, image) + exact sets of the top 2 per step
    assert short_oracle.forwards == v * n + v * sum(2 * (s + 1) for s in range(len(short.history_)))
    assert short_oracle.forwards < exact_oracle.forwards
    # the shortlist's choice is scored exactly: its val score is a real joint-prediction score
    assert short.score_ == pytest.approx(ValidationOracle(make(), car.val).score(short.selected_).miou, abs=1e-9)


def per_image(*ious, skip=None):
    """A result whose images v0, v1, ... have these foreground IoUs (one image left out: cross-validated)."""
    return StoredResult.from_confusions({f"v{i}": np.array([[100, 100 - round(100 * u)], [0, round(100 * u)]])
                                         for i, u in enumerate(ious) if i != skip})


def test_noise_rule_keeps_only_steps_whose_gain_beats_the_per_image_noise():
    """Step 2's gain comes from one image (noise by the se rule): 'se' stops at one prompt, 'none' keeps it;
    a gain seen on every image is kept by both. max_prompts is a cap the rule may stop short of."""
    t = {frozenset("a"): per_image(.5, .5, .5, .5, .5), frozenset("b"): per_image(.3, .3, .3, .3, .3),
         frozenset("ab"): per_image(.9, .49, .49, .49, .49)}
    pool = pool_of("a", "b")
    se = ForwardSelector(ScriptedOracle(t), rule="se", max_prompts=2).fit(pool)
    assert se.selected_ids_ == ["a"] and se.stop_reason_ == "no_gain"
    step = se.history_[1]
    assert step["gain"] > 0 and step["noise"] > step["gain"] and step["images"] == 5 and not step["accepted"]
    assert ForwardSelector(ScriptedOracle(t), rule="none", max_prompts=2).fit(pool).selected_ids_ == ["a", "b"]
    t[frozenset("ab")] = per_image(.56, .55, .56, .55, .56)
    assert ForwardSelector(ScriptedOracle(t), rule="se", max_prompts=2).fit(pool).selected_ids_ == ["a", "b"]


def test_cross_validated_candidates_are_ranked_paired():
    """Each singleton is scored without its own image; 'a' leaves out the image 'b' fails on, which inflates
    its plain score. Forward selection and best single both pick 'b', the better prompt on common images."""
    t = {frozenset("a"): per_image(.6, .6, .6, skip=0), frozenset("b"): per_image(0.0, .8, .8, skip=1)}
    t = {k: StoredResult.from_confusions({("a" if i == "v0" else "b" if i == "v1" else i): cm
                                          for i, cm in v.confusions.items()}) for k, v in t.items()}
    assert t[frozenset("a")].miou > t[frozenset("b")].miou
    sel = ForwardSelector(ScriptedOracle(t), max_prompts=1).fit(pool_of("a", "b"))
    assert sel.selected_ids_ == ["b"] and set(sel.history_[0]["advantage"]) == {"a", "b"}
    assert BestSingle(ScriptedOracle(t)).fit(pool_of("a", "b")).selected_ids_ == ["b"]


def test_cross_validated_forward_resumes_exactly(car, tmp_path):
    """Cross-validated oracle and the se rule: every step is scored on every image but its prompts, and a fit
    interrupted after step 2 resumes from the run's checkpoint (the kept set's per-image result included) to
    exactly the uninterrupted answer."""
    from promptopt.run import Run

    images = car.pool + car.val
    make = lambda: ValidationOracle(small_backend(), images, cross_validate=True)  # noqa: E731
    full = ForwardSelector(make(), max_prompts=4, patience=2, rule="se").fit(car.pool)
    assert [h["images"] for h in full.history_[1:]] == [len(images) - s for s in range(2, len(full.history_) + 1)]
    assert all("advantage" in h for h in full.history_)

    def interrupt(label, done, total):
        if label == "step" and done == 2 and done < total:
            raise KeyboardInterrupt

    run = Run(tmp_path / "run", {"test": "forward-cv"})
    with pytest.raises(KeyboardInterrupt):
        ForwardSelector(make(), max_prompts=4, patience=2, rule="se", checkpoint=run.checkpoint("s"),
                        progress=interrupt).fit(car.pool)
    run = Run(tmp_path / "run", {"test": "forward-cv"})
    resumed = ForwardSelector(make(), max_prompts=4, patience=2, rule="se", checkpoint=run.checkpoint("s")).fit(car.pool)
    assert resumed.resumed_steps_ == 2
    assert resumed.selected_ids_ == full.selected_ids_ and resumed.history_ == full.history_
    assert resumed.stop_reason_ == full.stop_reason_
    with pytest.raises(ConfigError, match="another configuration"):
        ForwardSelector(make(), max_prompts=4, patience=2, rule="none", checkpoint=run.checkpoint("s")).fit(car.pool)
