"""Paired comparisons and the noise-aware acceptance rule (promptopt.strategies.acceptance), on hand-built
per-image results whose right answers are known, and the rule at work in context tuning and retrieval."""

from __future__ import annotations

import math

import numpy as np
import pytest

from promptopt.errors import ConfigError
from promptopt.metrics import miou_from_confusion, summarize
from promptopt.strategies.acceptance import (AcceptanceRule, StoredResult, best_index, better, compare, make_rule,
                                             rank)


def cm(tp: int, fp: int, fn: int, tn: int = 100) -> np.ndarray:
    """A binary confusion matrix (rows truth, columns prediction) with foreground IoU tp / (tp + fp + fn)."""
    return np.array([[tn, fp], [fn, tp]], dtype=np.int64)


def result(per_image: dict[str, np.ndarray]) -> StoredResult:
    return StoredResult.from_confusions(per_image)


def test_batched_miou_is_summarize_miou():
    """The vectorised mIoU used for paired comparisons is the metric of every report, binary and multi-class
    (a class absent from prediction and truth is left out of the mean)."""
    rng = np.random.default_rng(0)
    for c in (2, 3, 5):
        stack = rng.integers(0, 50, (7, c, c))
        stack[0, 1, :] = 0
        stack[0, :, 1] = 0  # class 1 absent from truth and prediction in the first matrix
        stack[1] = 0  # nothing at all: undefined
        got = miou_from_confusion(stack)
        want = [summarize(m)["miou"] for m in stack]
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_allclose(got[~np.isnan(got)], np.array(want)[~np.isnan(want)], rtol=0, atol=1e-15)


def test_paired_gain_is_computed_on_the_common_images_only():
    a = result({"x": cm(10, 0, 0), "y": cm(5, 5, 0), "z": cm(1, 9, 0)})
    b = result({"w": cm(0, 10, 0), "y": cm(8, 2, 0), "z": cm(2, 8, 0)})
    p = compare(a, b)
    assert p.images == ("y", "z")
    assert p.gain == pytest.approx((5 + 1) / 20 - (8 + 2) / 20, abs=1e-15)
    np.testing.assert_allclose(p.diffs, [0.5 - 0.8, 0.1 - 0.2])
    same = compare(a, result({"x": cm(9, 1, 0), "y": cm(5, 5, 0), "z": cm(1, 9, 0)}))
    assert same.gain == pytest.approx(a.miou - (9 + 5 + 1) / 30, abs=1e-15)  # same images: the plain difference


def test_ranking_is_not_fooled_by_a_candidate_leaving_out_a_hard_image():
    """Cross-validated candidates {a} and {b}: a is a hard image that b segments badly. Scored on its own images,
    {a} looks better only because it leaves a out; paired, on the images both were scored on, {b} is better."""
    cand_a = result({"b": cm(6, 4, 0), "v1": cm(6, 4, 0), "v2": cm(6, 4, 0)})
    cand_b = result({"a": cm(0, 30, 0), "v1": cm(8, 2, 0), "v2": cm(8, 2, 0)})
    assert cand_a.miou > cand_b.miou  # plain scores favour a
    assert rank([cand_a, cand_b])[1] > rank([cand_a, cand_b])[0]
    assert best_index([cand_a, cand_b]) == 1
    assert better(cand_b, cand_a) and not better(cand_a, cand_b)
    # scored on the same images, ranking is the plain score, ties go to the first
    same = [result({"v": cm(5, 5, 0)}), result({"v": cm(6, 4, 0)}), result({"v": cm(6, 4, 0)})]
    assert rank(same) == [r.miou for r in same] and best_index(same) == 1


def test_se_rule_keeps_a_gain_only_above_z_standard_errors():
    ref = result({f"i{j}": cm(50, 50, 0) for j in range(8)})  # IoU 0.5 everywhere
    ups = [2, 4, 6, 8, 2, 4, 6, 8]  # per-image gains (in %) of a candidate: mean 5, spread

    def new(shift: int) -> StoredResult:
        return result({f"i{j}": cm(50 + u + shift, 50 - u - shift, 0) for j, u in enumerate(ups)})

    d = np.array(ups) / 100
    se = np.std(d, ddof=1) / math.sqrt(len(d))
    v = AcceptanceRule("se", z=1.0).judge(new(0), ref)
    assert v.gain == pytest.approx(d.mean(), abs=1e-12) and v.noise == pytest.approx(se, abs=1e-12)
    assert v.accepted and v.images == 8
    assert not AcceptanceRule("se", z=v.gain / se + 0.01).judge(new(0), ref).accepted  # just too strict
    assert AcceptanceRule("se", z=v.gain / se - 0.01).judge(new(0), ref).accepted
    assert not AcceptanceRule("se", z=0.0, min_gain=0.06).judge(new(0), ref).accepted


def test_a_gain_from_one_image_is_noise_for_se_and_bootstrap_but_not_for_none():
    ref = result({f"i{j}": cm(50, 50, 0) for j in range(10)})
    lucky = result({f"i{j}": cm(90, 10, 0) if j == 0 else cm(49, 51, 0) for j in range(10)})
    steady = result({f"i{j}": cm(52 + j % 2, 48 - j % 2, 0) for j in range(10)})
    assert compare(lucky, ref).gain > compare(steady, ref).gain > 0
    assert AcceptanceRule("none").judge(lucky, ref).accepted
    for kind in ("se", "bootstrap"):
        rule = AcceptanceRule(kind, z=1.0)
        assert not rule.judge(lucky, ref).accepted, kind
        assert rule.judge(steady, ref).accepted, kind


def test_bootstrap_is_deterministic_and_needs_two_images():
    ref = result({f"i{j}": cm(50, 50, 0) for j in range(6)})
    new = result({f"i{j}": cm(50 + 3 * j, 50 - 3 * j, 0) for j in range(6)})
    rule = AcceptanceRule("bootstrap", z=1.0)
    first = rule.judge(new, ref)
    assert rule.judge(new, ref) == first
    assert first.noise != AcceptanceRule("bootstrap", z=2.0).judge(new, ref).noise
    one = AcceptanceRule("bootstrap").judge(result({"i": cm(90, 10, 0)}), result({"i": cm(50, 50, 0)}))
    assert not one.accepted and math.isinf(one.noise)
    assert math.isinf(AcceptanceRule("se").judge(result({"i": cm(90, 10, 0)}), result({"i": cm(50, 50, 0)})).noise)


def test_bad_rules_are_one_line_errors():
    with pytest.raises(ConfigError, match="rule must be one of none, se, bootstrap"):
        make_rule("t-test")
    with pytest.raises(ConfigError, match="noise_z must be a finite number >= 0"):
        make_rule("se", -1)
    assert make_rule("bootstrap", 2.0).describe() == {"rule": "bootstrap", "min_gain": 0.0, "noise_z": 2.0,
                                                      "resamples": 2000, "seed": 0}


# --- the rule at work: context tuning, retrieval, the run and its report ---------------------------------

def _dog_task():
    from promptopt.data import bundled_sample_root
    from promptopt.task import Task

    return Task.from_folder(bundled_sample_root(), category="dog", seed=0)


def _small_backend():
    from promptopt.backends.features import FeaturesBackend

    return FeaturesBackend(max_side=48, pixels_per_prompt=64)


@pytest.mark.parametrize("rule, kept_step", [("se", 0), ("none", 2)])
def test_tuning_keeps_its_start_unless_an_evaluation_beats_the_noise(rule, kept_step, monkeypatch):
    """Evaluations scripted: the start, then a gain carried by one image twice. The se rule keeps the start
    tensors (tuning cannot end below its start because of noise); the plain rule takes the first 'gain'."""
    from promptopt.strategies.tuning import ContextTuner

    task = _dog_task()
    oracle, _ = task.oracles(_small_backend())
    start = result({f"v{j}": cm(50, 50, 0) for j in range(5)})
    lucky = result({f"v{j}": cm(90, 10, 0) if j == 0 else cm(49, 51, 0) for j in range(5)})
    scripted = iter([start, lucky, lucky])
    monkeypatch.setattr(oracle, "score_contexts", lambda contexts, chunk=8, exclude=(): next(scripted))
    tuner = ContextTuner(oracle, init=[task.pool[0]], steps=4, eval_every=2, batch_size=2, patience=None,
                         rule=rule).fit(task.pool)
    assert tuner.best_step_ == kept_step
    assert tuner.score_ == (start.miou if rule == "se" else lucky.miou)
    assert [h.get("accepted") for h in tuner.history_[1:]] == ([False, False] if rule == "se" else [True, False])
    if rule == "se":
        assert all((a.image == b.image).all() for a, b in zip(tuner.contexts_, tuner.initial_contexts_))


def test_cross_validated_tuning_is_scored_only_on_images_it_neither_starts_from_nor_trains_on():
    from promptopt.strategies.tuning import ContextTuner

    task = _dog_task()
    cv, _ = task.oracles(_small_backend(), mode="cv")
    tuner = ContextTuner(cv, init=[task.pool[0]], steps=2, eval_every=1, batch_size=2).fit(task.pool)
    assert set(tuner.evaluate(cv).per_image_iou) == {s.id for s in task.split.val}
    assert tuner.summary()["oracle"] == "cv" and tuner.summary()["rule"] == "se"


def test_retrieval_k_auto_stops_where_the_rule_does_and_never_retrieves_the_query_itself():
    from promptopt.strategies.retrieval import RetrievalSelector

    task = _dog_task()
    cv, _ = task.oracles(_small_backend(), mode="cv")
    sel = RetrievalSelector(cv, encoder="features", k="auto", max_k=4).fit(task.pool)
    ks = [h["k"] for h in sel.k_history_]
    assert ks == list(range(1, len(ks) + 1)) and 1 <= sel.k_ <= 4
    kept = [h["k"] for h in sel.k_history_ if h["accepted"]]
    assert kept == list(range(1, sel.k_ + 1))
    assert len(ks) == sel.k_ or not sel.k_history_[-1]["accepted"]
    assert set(sel.assignment_) == {s.id for s in task.split.pool + task.split.val}  # cv scores pool images too
    assert all(q not in prompts and len(prompts) == sel.k_ for q, prompts in sel.assignment_.items())
    plain = RetrievalSelector(cv, encoder="features", k="auto", max_k=4, rule="none").fit(task.pool)
    assert plain.k_ >= sel.k_
    fixed = RetrievalSelector(cv, encoder="features", k=3).fit(task.pool)
    assert fixed.k_ == 3 and all(q not in p for q, p in fixed.assignment_.items())
    with pytest.raises(ConfigError, match="'auto'"):
        RetrievalSelector(cv, encoder="features", k="most")


def test_plot_steps_draws_each_steps_noise_band(monkeypatch, tmp_path):
    """The band of a step spans the kept set's score on the same images (score - gain) up to that plus the
    noise; a step without a noise estimate gets a band above its point (nothing passes)."""
    import matplotlib.axes

    from promptopt.plots import plot_steps

    bands = []
    real = matplotlib.axes.Axes.fill_between
    monkeypatch.setattr(matplotlib.axes.Axes, "fill_between",
                        lambda self, x, y1, y2, **kw: bands.append((x[0], y1[0], y2[0])) or real(self, x, y1, y2, **kw))
    history = [{"step": 1, "chosen": "a", "score": 0.5, "gain": 0.5, "noise": 0.0, "accepted": True},
               {"step": 2, "chosen": "b", "score": 0.6, "gain": 0.1, "noise": 0.04, "accepted": True},
               {"step": 3, "chosen": "c", "score": 0.62, "gain": 0.02, "noise": 0.05, "accepted": False},
               {"step": 4, "chosen": "d", "score": 0.63, "gain": 0.03, "noise": None, "accepted": False}]
    plot_steps(history, tmp_path / "steps.png")
    assert [b[0] for b in bands] == [1.7, 2.7, 3.7]
    assert bands[0][1:] == pytest.approx((0.5, 0.54)) and bands[1][1:] == pytest.approx((0.6, 0.65))
    assert bands[2][1] == pytest.approx(0.6) and bands[2][2] > 0.63


def test_select_with_the_cv_oracle_names_mode_and_rule_and_a_resume_cannot_mix_them(blob_dataset, tmp_path):
    from typer.testing import CliRunner

    from promptopt.artifacts import read_json
    from promptopt.cli import app

    out = tmp_path / "run"
    base = ["select", "--data", str(blob_dataset), "--category", "blob", "--pool", "6", "--val", "3", "--test", "3",
            "--option", "max_side=48", "--option", "pixels_per_prompt=64", "--max-prompts", "3", "--random-seeds",
            "2", "--out", str(out), "--quiet"]
    r = CliRunner().invoke(app, [*base, "--oracle", "cv", "--rule", "bootstrap"])
    assert r.exit_code == 0, r.output
    res = read_json(out / "result.json")
    assert res["selection"] == {"oracle": "cv", "rule": "bootstrap", "noise_z": 1.0}
    assert res["summary"]["oracle"] == "cv" and res["summary"]["rule"] == "bootstrap"
    report = (out / "report.md").read_text()
    assert "Selection oracle: cross-validated" in report and "acceptance rule: bootstrap" in report
    rows = (out / "per_image.csv").read_text().splitlines()
    cv_rows = {line.split(",")[1] for line in rows if line.startswith("cv,")}
    assert cv_rows == {s for s in read_json(out / "result.json")["split"]["pool"] + res["split"]["val"]} \
        - set(res["selected"])
    for other in (["--oracle", "holdout", "--rule", "bootstrap"], ["--oracle", "cv"]):
        r = CliRunner().invoke(app, [*base, *other])
        assert r.exit_code == 2 and "holds a different run (" in r.output and "selection." in r.output, r.output
    r = CliRunner().invoke(app, [*base, "--rule", "t-test", "--restart"])
    assert r.exit_code == 2 and "rule must be one of none, se, bootstrap" in r.output
