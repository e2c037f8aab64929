"""Several prompt sets per model call (SegGPTBackend.predict_sets) and the oracle's use of it, on a tiny model and real frames.

Grouped scoring must give what one set per call gives: the same per-candidate
validation scores, the same memo and counters, the same forward selection.
"""

from __future__ import annotations

import types

import pytest
import torch

transformers = pytest.importorskip("transformers")

from promptopt.backends.base import Backend  # noqa: E402
from promptopt.backends.seggpt import SegGPTBackend, save_random_model  # noqa: E402
from promptopt.data import bundled_sample_root, load_dataset, split_samples  # noqa: E402
from promptopt.errors import ConfigError  # noqa: E402
from promptopt.oracle import ValidationOracle  # noqa: E402
from promptopt.strategies import ForwardSelector  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_random_model(tmp_path_factory.mktemp("seggpt-tiny-sets"))


@pytest.fixture(scope="module")
def task():
    split = split_samples(load_dataset(bundled_sample_root(), category="dog").samples(), seed=0)
    return split.pool[:6], split.val[:2]


def one_set_per_call(backend: SegGPTBackend) -> SegGPTBackend:
    """The same backend with the base class's predict_sets: a loop of predict, one set (one model call) each."""
    backend.predict_sets = types.MethodType(Backend.predict_sets, backend)
    return backend


@pytest.mark.parametrize("reference", ["official", "transformers"])
def test_predict_sets_equals_predict_per_set(checkpoint, task, reference):
    pool, val = task
    be = SegGPTBackend.from_pretrained(checkpoint, reference=reference, batch_size=5)
    sets = [pool[:3], pool[3:4], pool[1:3], pool[4:6], pool[:4]]  # 3 + 1 + 2 + 2 + 4 rows
    calls = be.model_calls
    grouped = be.predict_sets(sets, val[0], 2)
    assert be.model_calls - calls == 3  # [3, 1], [2, 2], [4]: at most max(batch_size, set) rows per call
    for ps, probs in zip(sets, grouped):
        torch.testing.assert_close(probs, be.predict(ps, [val[0]], 2)[0], atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="at least one prompt"):
        be.predict_sets([pool[:1], []], val[0], 2)


def test_output_mode_predict_sets_is_the_plain_loop(checkpoint, task):
    pool, val = task
    be = SegGPTBackend.from_pretrained(checkpoint, ensemble="output")
    sets = [pool[:2], pool[2:5]]
    for ps, probs in zip(sets, be.predict_sets(sets, val[1], 2)):
        torch.testing.assert_close(probs, be.predict(ps, [val[1]], 2)[0], atol=0, rtol=0)


def results(rs) -> list:
    return [(r.prompt_ids, r.miou, r.per_image_iou, r.per_class_iou) for r in rs]


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("reference", ["official", "transformers"])
def test_score_additions_grouped_equals_one_set_per_call(checkpoint, task, cache, reference):
    """Same results, memo and counters (calls, forwards as rows, memo hits) as scoring each set alone, fewer model calls."""
    pool, val = task
    grouped_be = SegGPTBackend.from_pretrained(checkpoint, batch_size=8, reference=reference)
    plain_be = one_set_per_call(SegGPTBackend.from_pretrained(checkpoint, batch_size=8, reference=reference))
    seen = {"grouped": 0, "plain": 0}
    oracles = {
        "grouped": ValidationOracle(grouped_be, val, num_classes=2, cache=cache,
                                    progress=lambda n: seen.__setitem__("grouped", seen["grouped"] + n)),
        "plain": ValidationOracle(plain_be, val, num_classes=2, cache=cache,
                                  progress=lambda n: seen.__setitem__("plain", seen["plain"] + n)),
    }
    base = [pool[0]]
    candidates = [pool[1], pool[2], pool[1], pool[3]]  # a repeat: memoised (cache on) or recomputed (off)
    out = {}
    for name, oracle in oracles.items():
        oracle.score([pool[0], pool[2]])  # one set memoised before the step
        out[name] = oracle.score_additions(base, candidates)
        out[name] += oracle.score_additions([pool[1], pool[2]], [pool[3], pool[4]])
    assert results(out["grouped"]) == results(out["plain"])
    assert oracles["grouped"].stats == oracles["plain"].stats
    assert seen["grouped"] == seen["plain"] == oracles["plain"].forwards
    assert grouped_be.model_rows == plain_be.model_rows
    assert grouped_be.model_calls < plain_be.model_calls
    with pytest.raises(ConfigError, match="repeats an example"):
        oracles["grouped"].score_additions(base, [pool[0]])


def test_forward_selection_identical_to_one_set_per_call(checkpoint, task):
    """k = 1..4: every candidate's val score at every step and the selection are those of one set per call.

    20 candidates, so that ForwardSelector's progress chunks hand the oracle two or more sets at a time.
    """
    pool = split_samples(load_dataset(bundled_sample_root(), category="camel").samples(), seed=0).pool + task[0][:5]
    val = task[1]
    fits = {}
    for name in ("grouped", "plain"):
        be = SegGPTBackend.from_pretrained(checkpoint, batch_size=8)
        if name == "plain":
            one_set_per_call(be)
        oracle = ValidationOracle(be, val, num_classes=2)
        sel = ForwardSelector(oracle, max_prompts=4, patience=4).fit(pool)
        fits[name] = (sel, oracle.forwards, be.model_calls)
    (g, g_rows, g_calls), (p, p_rows, p_calls) = fits["grouped"], fits["plain"]
    assert len(g.history_) == len(p.history_) == 4
    assert [h["candidates"] for h in g.history_] == [h["candidates"] for h in p.history_]
    assert [s.id for s in g.selected_] == [s.id for s in p.selected_] and g.score_ == p.score_
    assert g_rows == p_rows and g_calls < p_calls
    assert len({round(v, 9) for v in g.history_[0]["candidates"].values()}) > 1  # the scores do tell sets apart
