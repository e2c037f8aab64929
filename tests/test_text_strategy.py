"""The text-prompt strategy on tiny random-init CLIPSeg and Grounded SAM: it picks what the oracle scores best
(exhaustively, or by coordinate ascent), keeps the user's order on ties, declares a search over candidates and
thresholds, writes a text artifact that `predict` applies with its thresholds, resumes after a kill, and every
bad input is one line through the CLI."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import numpy as np
import optuna
import pytest

pytest.importorskip("transformers")

# the tiny checkpoints of the backend tests, reused (not copied): imported fixtures register under these names
from conftest import count_state_writes, kill_after_state_write  # noqa: E402
from test_clipseg_backend import checkpoint as clipseg_checkpoint  # noqa: E402,F401
from test_clipseg_backend import make_sample  # noqa: E402
from test_grounded_sam_backend import root as grounded_sam_root  # noqa: E402,F401
from typer.testing import CliRunner  # noqa: E402

from promptopt.artifacts import load_prompt, read_json  # noqa: E402
from promptopt.backends import BackendSpec, create_backend  # noqa: E402
from promptopt.backends.base import TextPrompt, backend_class  # noqa: E402
from promptopt.backends.clipseg import CLIPSegBackend  # noqa: E402
from promptopt.backends.features import FeaturesBackend  # noqa: E402
from promptopt.backends.grounded_sam import GroundedSAMBackend  # noqa: E402
from promptopt.cli import app  # noqa: E402
from promptopt.data import bundled_sample_root  # noqa: E402
from promptopt.errors import BudgetError, ConfigError, DataError  # noqa: E402
from promptopt.oracle import ValidationOracle, prediction_to_labels  # noqa: E402
from promptopt.predict import predict_labels  # noqa: E402
from promptopt.run import run_strategy  # noqa: E402
from promptopt.search import run_search, suggest  # noqa: E402
from promptopt.space import Choice, Float  # noqa: E402
from promptopt.strategies import make_strategy, strategy_class  # noqa: E402
from promptopt.strategies.text import (  # noqa: E402
    CANDIDATES,
    TextPromptSelector,
    category_phrases,
    decode_choice,
    encode_choice,
    parse_candidates,
)
from promptopt.task import Task  # noqa: E402

PHRASES = ["animal", "dog", "a black dog", "grass", "sky"]


@pytest.fixture(scope="module")
def clipseg(clipseg_checkpoint) -> CLIPSegBackend:
    return CLIPSegBackend.from_pretrained(clipseg_checkpoint)


@pytest.fixture(scope="module")
def dog_task() -> Task:
    """Real frames (bundled DAVIS sample, 320×180): a small pool, 4 val and 4 test images."""
    return Task.from_folder(bundled_sample_root(), "dog", pool=4, val=4, test=4, seed=0)


def plain_score(backend, samples, num_classes: int, texts) -> float:
    """mIoU of one text prompt by the uncached path: a fresh oracle with caching off."""
    return ValidationOracle(backend, samples, num_classes, cache=False).score([TextPrompt(tuple(texts))]).miou


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# --- candidates ------------------------------------------------------------------------------------------

def test_candidates_parse_per_class_in_order_without_repeats():
    assert parse_candidates(["umbrella", " parasol ", "1:rain umbrella", "umbrella"], 2) == \
        {1: ("umbrella", "parasol", "rain umbrella")}
    assert parse_candidates(["1:car lamp", "2:wheel", "1: headlight"], 3) == {1: ("car lamp", "headlight"),
                                                                                2: ("wheel",)}
    assert parse_candidates({"2": ["wheel"], 1: "lamp"}, 3) == {1: ("lamp",), 2: ("wheel",)}  # JSON keys are strings


@pytest.mark.parametrize("given, classes, words", [
    (["  "], 2, "empty or whitespace"),
    (["1:"], 2, "empty or whitespace"),
    (["car lamp"], 3, "names no class"),
    (["1:lamp", "3:wheel"], 3, "classes 1..2"),
    (["0:background"], 2, "class 1 only"),
    (["1:lamp"], 3, "no candidate for class 2"),
    ([7], 2, "not a string"),
])
def test_bad_candidates_are_one_line_config_errors(given, classes, words):
    with pytest.raises(ConfigError) as exc:
        parse_candidates(given, classes)
    assert words in one_line(exc)


def test_category_names_as_phrases():
    assert category_phrases("car-roundabout", 2) == ("car roundabout",)
    assert category_phrases("cat,dog", 3) == ("cat", "dog")
    assert category_phrases("cat,dog", 4) is None  # the key does not name three classes
    assert category_phrases("", 2) is None


def test_choice_encoding_round_trips():
    assert encode_choice(("umbrella",)) == "umbrella" and decode_choice("umbrella", 2) == ("umbrella",)
    two = ("car lamp", "wheel")
    assert decode_choice(encode_choice(two), 3) == two
    with pytest.raises(ConfigError):
        decode_choice("car lamp", 3)


# --- choosing --------------------------------------------------------------------------------------------

def test_picks_the_candidate_the_oracle_scores_best(clipseg, dog_task):
    """Binary: every candidate is scored once, in order, and the winner is the best by the plain (uncached) path."""
    val, _ = dog_task.oracles(clipseg)
    sel = make_strategy("text", val, candidates=PHRASES).fit(dog_task.pool)
    plain = {p: plain_score(clipseg, dog_task.split.val, 2, [p]) for p in PHRASES}
    assert len(set(plain.values())) > 1  # the phrases do lead to different masks here
    best = max(PHRASES, key=lambda p: plain[p])
    assert best != PHRASES[0]  # so keeping the first candidate would fail here
    assert sel.texts_ == (best,) and sel.prompt_ == TextPrompt(best)
    assert sel.score_ == pytest.approx(plain[best], abs=1e-9)
    assert [h["texts"] for h in sel.history_] == [[p] for p in PHRASES] and sel.n_evaluations_ == len(PHRASES)
    assert sel.search_ == "exhaustive" and sel.selected_ == [] and sel.selected_ids_ == [TextPrompt(best).key]


def test_ties_go_to_the_candidate_given_first(clipseg, dog_task):
    """CLIP lower-cases its input: "CAT" and "cat" are the same prompt to the model, so they tie exactly."""
    val, _ = dog_task.oracles(clipseg)
    a = make_strategy("text", val, candidates=["CAT", "cat"]).fit([])
    b = make_strategy("text", val, candidates=["cat", "CAT"]).fit([])
    assert a.history_[0]["val_miou"] == a.history_[1]["val_miou"]
    assert a.texts_ == ("CAT",) and b.texts_ == ("cat",)


SEMANTIC = ["1:cat", "1:dog", "1:tree", "2:sky", "2:lamp", "2:car", "2:red car"]
CLASS_1, CLASS_2 = ["cat", "dog", "tree"], ["sky", "lamp", "car", "red car"]


@pytest.fixture(scope="module")
def semantic_val():
    return [make_sample(i, classes=3) for i in range(50, 54)]


def test_semantic_exhaustive_is_the_best_combination(clipseg, semantic_val):
    """Up to max_combinations, every (class 1, class 2) phrase pair is scored: the winner is the global best."""
    sel = TextPromptSelector(ValidationOracle(clipseg, semantic_val, 3), candidates=SEMANTIC).fit([])
    combos = list(itertools.product(CLASS_1, CLASS_2))
    plain = {c: plain_score(clipseg, semantic_val, 3, c) for c in combos}
    assert len(set(plain.values())) > 1
    assert sel.search_ == "exhaustive" and sel.n_evaluations_ == 12
    assert plain[sel.texts_] == max(plain.values())
    assert sel.texts_ == max(combos, key=lambda c: plain[c])  # first of equals in product order


def test_coordinate_ascent_beyond_max_combinations_ends_at_a_coordinate_optimum(clipseg, semantic_val):
    """Beyond max_combinations: fewer evaluations than combinations, and no single-class change of the result
    scores better (checked by scoring every neighbour on the plain path)."""
    sel = TextPromptSelector(ValidationOracle(clipseg, semantic_val, 3), candidates=SEMANTIC,
                             max_combinations=4).fit([])
    assert sel.search_ == "coordinate" and sel.n_evaluations_ < 12
    assert sel.history_[0]["texts"] == ["cat", "sky"]  # it starts from the first candidates
    mine = plain_score(clipseg, semantic_val, 3, sel.texts_)
    assert mine == pytest.approx(sel.score_, abs=1e-9)
    for i, phrases in enumerate((CLASS_1, CLASS_2)):
        for p in phrases:
            neighbour = list(sel.texts_)
            neighbour[i] = p
            assert plain_score(clipseg, semantic_val, 3, neighbour) <= mine + 1e-12
    assert sel.texts_ != ("cat", "sky")  # it moved: both classes changed from the start here


def test_a_fixed_choice_scores_that_prompt_only(clipseg, dog_task):
    val, _ = dog_task.oracles(clipseg)
    sel = make_strategy("text", val, candidates=PHRASES, text="animal").fit([])
    assert sel.search_ == "fixed" and sel.n_evaluations_ == 1 and sel.texts_ == ("animal",)
    assert sel.score_ == pytest.approx(plain_score(clipseg, dog_task.split.val, 2, ["animal"]), abs=1e-9)
    with pytest.raises(ConfigError) as exc:
        make_strategy("text", val, candidates=PHRASES, text="zebra")
    assert "not one of the candidates" in one_line(exc)
    unresolved = make_strategy("text", val, candidates=PHRASES, text=CANDIDATES).fit([])  # the declaration itself
    assert unresolved.search_ == "exhaustive" and unresolved.n_evaluations_ == len(PHRASES)


def test_without_candidates_the_category_name_is_the_candidate(clipseg, dog_task, semantic_val):
    val, test = dog_task.oracles(clipseg)
    sel = make_strategy("text", val).fit([])
    assert sel.candidates == {1: ("dog",)} and sel.texts_ == ("dog",)
    with pytest.raises(ConfigError) as exc:  # a semantic category "t" does not name its two classes
        TextPromptSelector(ValidationOracle(clipseg, semantic_val, 3))
    assert "--text" in one_line(exc)


def test_baselines_first_candidate_and_category_name_on_any_oracle(clipseg, dog_task):
    val, test = dog_task.oracles(clipseg)
    sel = make_strategy("text", val, candidates=["animal", "grass"]).fit([])
    extra = sel.extra_scores(test)
    assert set(extra) == {"first candidate", "category name"}
    assert extra["first candidate"] == pytest.approx(plain_score(clipseg, dog_task.split.test, 2, ["animal"]), abs=1e-9)
    assert extra["category name"] == pytest.approx(plain_score(clipseg, dog_task.split.test, 2, ["dog"]), abs=1e-9)
    assert sel.extra_scores(val)["first candidate"] == sel.history_[0]["val_miou"]


def test_image_only_backend_refuses_the_strategy_before_any_work(dog_task):
    oracle = ValidationOracle(FeaturesBackend(max_side=48), dog_task.split.val, 2)
    with pytest.raises(ConfigError) as exc:
        TextPromptSelector(oracle, candidates=["dog"])
    msg = one_line(exc)
    assert "'features'" in msg and "not text prompts" in msg
    assert oracle.forwards == 0


def test_memory_budget_is_checked_for_one_text_prompt(clipseg, dog_task):
    val, _ = dog_task.oracles(clipseg)
    with pytest.raises(BudgetError) as exc:
        make_strategy("text", val, candidates=PHRASES, memory_budget="1KB").fit([])
    assert "one text prompt" in one_line(exc)
    need = clipseg.memory_bytes(1, max(s.size for s in dog_task.split.val))
    sel = make_strategy("text", val, candidates=PHRASES, memory_budget=need).fit([])
    assert sel.memory_bytes_ <= need


# --- the search's view -----------------------------------------------------------------------------------

def test_declared_space_names_the_candidates_and_resolves_from_the_options():
    assert strategy_class("text").search_space == (Choice("text", (CANDIDATES,)),)
    assert TextPromptSelector.resolve_search_space({"candidates": ["umbrella", "parasol"]}, 2) == \
        (Choice("text", ("umbrella", "parasol")),)
    (space,) = TextPromptSelector.resolve_search_space({"candidates": ["1:a", "1:b", "2:c"]}, 3)
    assert [decode_choice(v, 3) for v in space.choices] == [("a", "c"), ("b", "c")]
    with pytest.raises(ConfigError) as exc:
        TextPromptSelector.resolve_search_space({"candidates": ["1:a", "1:b", "2:c", "2:d"], "max_combinations": 3}, 3)
    assert "max_combinations=3" in one_line(exc)
    with pytest.raises(ConfigError):
        TextPromptSelector.resolve_search_space({}, 2)


def test_backends_declare_thresholds_their_constructors_accept(clipseg_checkpoint, grounded_sam_root):
    """Every bound of the declared threshold spaces builds a backend with that option (what a trial suggests)."""
    assert {p.name for p in backend_class("clipseg").search_space} == {"threshold"}
    assert {p.name for p in backend_class("grounded-sam").search_space} == {"box_threshold", "text_threshold"}
    for name, ckpt in (("clipseg", clipseg_checkpoint), ("grounded-sam", grounded_sam_root)):
        for p in backend_class(name).search_space:
            assert isinstance(p, Float)
            for v in (p.low, p.high):
                assert create_backend(name, str(ckpt), {p.name: v}).config()["options"][p.name] == v


def test_an_optuna_study_over_candidates_and_thresholds(clipseg, dog_task):
    """What a search does with the resolved space (promptopt.search.suggest): each trial's score is the plain
    score of its text at its threshold, and the best trial names both knobs."""
    options = {"candidates": PHRASES[:3]}
    space = TextPromptSelector.resolve_search_space(options, 2)
    seen = []

    def objective(trial: optuna.Trial) -> float:
        knobs = suggest(trial, space, "text", 8)
        backend_knobs = suggest(trial, CLIPSegBackend.search_space, "clipseg", 8)
        be = clipseg.with_options(**backend_knobs)
        sel = make_strategy("text", ValidationOracle(be, dog_task.split.val, 2), **options, **knobs).fit([])
        assert sel.score_ == pytest.approx(plain_score(be, dog_task.split.val, 2, [knobs["text"]]), abs=1e-9)
        seen.append(knobs["text"])
        return sel.score_

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    study.optimize(objective, n_trials=5)
    assert set(study.best_params) == {"text.text", "clipseg.threshold"}
    assert set(seen) <= set(PHRASES[:3]) and len(set(seen)) > 1


def test_the_existing_search_tunes_the_clipseg_threshold(clipseg_checkpoint, dog_task, tmp_path):
    """promptopt.search reads the backend's declared space as it is: the clipseg threshold becomes a trial knob."""
    res = run_search(dog_task, tmp_path / "s", BackendSpec("clipseg", str(clipseg_checkpoint)),
                     strategies=["best-single"], n_trials=2, max_k=2)
    assert "clipseg.threshold" in res["best_params"] and 0.1 <= res["best_params"]["clipseg.threshold"] <= 0.7


def test_the_existing_search_runs_the_text_strategy_over_grounded_sam_thresholds(grounded_sam_root, tmp_path):
    """Today's search cannot pass --text, so each trial's text strategy takes the category name; the trials
    differ in the detector's thresholds, and the best trial's text artifact carries the thresholds it chose."""
    task = Task.from_folder(bundled_sample_root(), "dog", pool=2, val=2, test=2, seed=0)
    res = run_search(task, tmp_path / "s", BackendSpec("grounded-sam", str(grounded_sam_root)), strategies=["text"],
                     n_trials=2, max_k=1)
    params = res["best_params"]
    assert {"grounded-sam.box_threshold", "grounded-sam.text_threshold"} <= set(params)
    art = load_prompt(tmp_path / "s" / "best")
    assert art.kind == "text" and art.texts == ["dog"]
    assert art.backend["options"]["box_threshold"] == params["grounded-sam.box_threshold"]
    assert 0.0 <= res["test_miou"] <= 1.0


# --- runs, artifacts, predict --------------------------------------------------------------------------------

def _select(task: Task, ckpt: Path, out: Path, candidates=("animal", "dog", "grass"), **options):
    # scored on the val split (the holdout oracle), where the tiny model's winner is not the first candidate
    return run_strategy(task, BackendSpec("clipseg", str(ckpt), {"threshold": 0.4}), out, "text",
                        {"candidates": list(candidates), **options}, oracle="holdout")


def test_run_writes_a_text_artifact_that_predict_applies(clipseg_checkpoint, clipseg, dog_task, tmp_path):
    res = _select(dog_task, clipseg_checkpoint, tmp_path / "run")
    texts = res["summary"]["texts"]
    assert texts != ["animal"]  # the winner is not the first candidate: saving that one instead would fail below
    assert res["selected"] == [TextPrompt(tuple(texts)).key] and res["baselines"] == {}
    assert set(res["extra"]["test"]) == {"first candidate", "category name"}
    art = load_prompt(tmp_path / "run")
    assert art.kind == "text" and art.texts == texts and art.examples == []
    assert art.backend["options"]["threshold"] == 0.4  # the threshold it was chosen with travels with it
    be = clipseg.with_options(threshold=0.4)
    queries = dog_task.split.test
    expected = [prediction_to_labels(be.predict([TextPrompt(tuple(texts))], [q], 2)[0]).numpy() for q in queries]
    for got, want in zip(predict_labels(art, queries), expected):
        assert np.array_equal(got, want)
    test_miou = ValidationOracle(be, queries, 2, cache=False).score([TextPrompt(tuple(texts))]).miou
    assert res["test_miou"] == pytest.approx(test_miou, abs=1e-9)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "first candidate val" in report and (tmp_path / "run" / "text_candidates.png").is_file()


def test_predict_uses_the_saved_thresholds(grounded_sam_root, tmp_path):
    """Grounded SAM: the same phrase saved with two box thresholds predicts differently, each as the backend does."""
    task = Task.from_folder(bundled_sample_root(), "dog", pool=2, val=2, test=2, seed=0)
    be = GroundedSAMBackend.from_pretrained(grounded_sam_root, box_threshold=0.0, text_threshold=0.0)
    top = max(float(be.detect(q, TextPrompt("dog")).scores.max()) for q in task.split.test)
    masks = {}
    for thr in (0.0, top):
        out = tmp_path / f"thr-{thr}"
        run_strategy(task, BackendSpec("grounded-sam", str(grounded_sam_root),
                                       {"box_threshold": thr, "text_threshold": 0.0}), out, "text",
                     {"candidates": ["dog"]})
        art = load_prompt(out)
        assert art.backend["options"]["box_threshold"] == thr
        masks[thr] = predict_labels(art, task.split.test)
        direct = be.with_options(box_threshold=thr)
        for got, q in zip(masks[thr], task.split.test):
            assert np.array_equal(got, prediction_to_labels(direct.predict([TextPrompt("dog")], [q], 2)[0]).numpy())
    assert sum(int(m.sum()) for m in masks[0.0]) > 0 and sum(int(m.sum()) for m in masks[top]) == 0


def test_a_category_name_the_backend_refuses_is_skipped_with_the_reason(grounded_sam_root):
    """Grounding DINO reads '.' as a class separator: the category-name baseline "st. bernard" is dropped, said why."""
    val = [make_sample(i) for i in (60, 61)]
    for s in val:
        s.category = "st.-bernard"
    be = GroundedSAMBackend.from_pretrained(grounded_sam_root)
    sel = TextPromptSelector(ValidationOracle(be, val, 2), candidates=["dog"]).fit([])
    assert set(sel.baseline_prompts_) == {"first candidate"}
    assert "separator" in sel.skipped_baselines_["category name"]
    assert sel.summary()["skipped_baselines"] == sel.skipped_baselines_


def test_killed_at_every_state_write_then_rerun_equals_uninterrupted(clipseg_checkpoint, dog_task, tmp_path,
                                                                     monkeypatch):
    saves, reference = count_state_writes(monkeypatch, lambda: _select(dog_task, clipseg_checkpoint,
                                                                       tmp_path / "reference"))
    assert saves == 4  # one checkpoint per candidate scored, then the finish
    for n in range(1, saves):
        out = tmp_path / f"killed-{n}"
        kill_after_state_write(monkeypatch, n, lambda: _select(dog_task, clipseg_checkpoint, out))
        assert _select(dog_task, clipseg_checkpoint, out) == reference, f"killed after write {n}"


def test_resumed_fit_reads_finished_scores_back_instead_of_scoring(clipseg, dog_task):
    """The checkpoint holds each finished score: a fit resumed after two candidates scores only the rest."""

    class Memory:
        def __init__(self):
            self.entry = None

        def load(self, fp):
            return (self.entry[1], None) if self.entry and self.entry[0] == fp else None

        def save(self, fp, data, blob=None):
            self.entry = (fp, json.loads(json.dumps(data)))

    class Stop(Exception):
        pass

    ck = Memory()
    val, _ = dog_task.oracles(clipseg)

    def stop_after_two(step, score):
        if step == 2:
            raise Stop

    with pytest.raises(Stop):
        make_strategy("text", val, candidates=PHRASES, checkpoint=ck, on_step=stop_after_two).fit([])
    fresh = ValidationOracle(clipseg, dog_task.split.val, 2)
    resumed = make_strategy("text", fresh, candidates=PHRASES, checkpoint=ck).fit([])
    # scored here: the three candidates left, then the two baselines (first candidate and category name, both
    # among the two finished ones: their scores were read back, so the baseline check scores them afresh)
    assert fresh.stats["calls"] == (len(PHRASES) - 2) + 2
    reference = make_strategy("text", ValidationOracle(clipseg, dog_task.split.val, 2), candidates=PHRASES).fit([])
    assert resumed.history_ == reference.history_ and resumed.texts_ == reference.texts_


def test_prompt_files_with_bad_texts_are_data_errors(clipseg_checkpoint, dog_task, tmp_path):
    _select(dog_task, clipseg_checkpoint, tmp_path / "run", candidates=["dog"])
    path = tmp_path / "run" / "prompt.json"
    doc = read_json(path)
    for bad in ([], ["dog", "cat"], ["  "], [3], "dog"):
        path.write_text(json.dumps({**doc, "extra": {**doc["extra"], "texts": bad}}))
        with pytest.raises(DataError) as exc:
            load_prompt(path)
        assert "extra.texts" in one_line(exc)
    path.write_text(json.dumps({**doc, "extra": {k: v for k, v in doc["extra"].items() if k != "texts"}}))
    with pytest.raises(DataError) as exc:
        load_prompt(path)
    assert "no text" in one_line(exc)


# --- the command line --------------------------------------------------------------------------------------

def cli(*args: str):
    return CliRunner().invoke(app, list(args))


DATA = ["--data", str(bundled_sample_root()), "--category", "dog", "--pool", "3", "--val", "3", "--test", "3"]


def test_cli_select_text_then_predict(clipseg_checkpoint, tmp_path):
    out = tmp_path / "run"
    r = cli("select", *DATA, "--backend", "clipseg", "--checkpoint", str(clipseg_checkpoint), "--option",
            "threshold=0.3", "--strategy", "text", "--text", "dog", "--text", "animal", "--out", str(out), "--quiet")
    assert r.exit_code == 0, r.output
    res = read_json(out / "result.json")
    assert res["options"] == {"candidates": ["dog", "animal"]} and res["summary"]["texts"][0] in ("dog", "animal")
    images = bundled_sample_root() / "dog" / "images"
    r = cli("predict", "--prompt", str(out), "--images", str(images), "--out", str(tmp_path / "masks"), "--quiet")
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "masks").glob("*.png"))) == len(list(images.iterdir()))
    with open(tmp_path / "masks" / "predictions.csv", newline="") as f:
        used = {row["prompts"] for row in csv.DictReader(f)}
    assert used == {TextPrompt(tuple(res["summary"]["texts"])).key}


def _refused(r, words: str) -> str:
    assert r.exit_code == 2, r.output
    assert words in r.output and "Traceback" not in r.output
    return r.output


def test_cli_empty_or_whitespace_text_is_one_line(clipseg_checkpoint, tmp_path):
    for bad in ("   ", "", "1: "):
        r = cli("select", *DATA, "--backend", "clipseg", "--checkpoint", str(clipseg_checkpoint), "--strategy", "text",
                "--text", "dog", "--text", bad, "--out", str(tmp_path / "run"), "--quiet")
        _refused(r, "empty or whitespace")
        assert not (tmp_path / "run").exists()


def test_cli_text_prompt_on_an_image_only_backend_is_one_line(tmp_path):
    r = cli("select", *DATA, "--backend", "features", "--strategy", "text", "--text", "dog", "--out",
            str(tmp_path / "run"), "--quiet")
    _refused(r, "backend 'features' takes image prompts, not text prompts")
    assert not (tmp_path / "run").exists()


def test_cli_image_prompts_on_a_text_only_backend_is_one_line(grounded_sam_root, tmp_path):
    r = cli("select", *DATA, "--backend", "grounded-sam", "--checkpoint", str(grounded_sam_root), "--strategy",
            "forward", "--max-prompts", "2", "--no-baselines", "--out", str(tmp_path / "run"), "--quiet")
    _refused(r, "backend 'grounded-sam' takes text prompts, not image prompts")
    r = cli("select", *DATA, "--strategy", "forward", "--text", "dog", "--out", str(tmp_path / "run"), "--quiet")
    _refused(r, "--text gives candidate phrases to --strategy text")


def test_cli_checkpoint_of_the_wrong_model_type_is_one_line(clipseg_checkpoint, grounded_sam_root, tmp_path):
    text = ["--strategy", "text", "--text", "dog", "--out", str(tmp_path / "run"), "--quiet"]
    r = cli("select", *DATA, "--backend", "clipseg", "--checkpoint", str(grounded_sam_root / "sam"), *text)
    _refused(r, "holds a 'sam' model, not 'clipseg'")
    r = cli("select", *DATA, "--backend", "grounded-sam", "--option", f"detector={clipseg_checkpoint}",
            "--option", f"sam={grounded_sam_root / 'sam'}", *text)
    _refused(r, "holds a 'clipseg' model, not 'grounding-dino'")
    r = cli("select", *DATA, "--backend", "grounded-sam", "--option", f"detector={grounded_sam_root / 'detector'}",
            "--option", f"sam={clipseg_checkpoint}", *text)
    _refused(r, "holds a 'clipseg' model, not 'sam'")
    assert not (tmp_path / "run").exists()


def test_search_takes_fixed_text_candidates_and_derives_threshold_backends_from_one_model(clipseg_checkpoint,
                                                                                         dog_task, tmp_path,
                                                                                         monkeypatch):
    """``promptopt search --strategies text --text A --text B``: trials choose among exactly those phrases (the
    resolved space), every trial's backend is the one loaded model with another threshold (shared caches: no
    model loaded or image encoded twice), and options for a strategy not searched are refused."""
    loads = []
    real = CLIPSegBackend.from_pretrained.__func__

    def counting(cls, *a, **k):
        loads.append(1)
        return real(cls, *a, **k)

    monkeypatch.setattr(CLIPSegBackend, "from_pretrained", classmethod(counting))
    from promptopt.search import PromptSearch

    search = PromptSearch(dog_task, tmp_path / "s", BackendSpec("clipseg", str(clipseg_checkpoint)),
                          strategies=["text"], n_trials=4, max_k=1,
                          strategy_options={"text": {"candidates": PHRASES[:2]}}).fit()
    study = search.open_study()
    texts = {t.params["text.text"] for t in study.trials}
    assert texts <= set(PHRASES[:2]) and len({t.params["clipseg.threshold"] for t in study.trials}) > 1
    assert len(loads) == 1  # one model; every other threshold is with_options over it
    caches = {id(be._activations) for be, _ in search._backends.values()}
    assert len(caches) == 1
    with pytest.raises(ConfigError, match="options given for strategy 'text', which is not among"):
        PromptSearch(dog_task, tmp_path / "t", strategies=["forward"], strategy_options={"text": {"candidates": ["a"]}})
