"""Optuna search: results are real oracle scores, studies resume and extend, strategies and backends are searched.

Several workers, storages, failures and seeds: test_search_workers.py and test_search_trials.py."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from promptopt.artifacts import load_prompt, read_json
from promptopt.backends import BackendSpec, create_backend
from promptopt.cli import app
from promptopt.errors import ConfigError
from promptopt.oracle import ValidationOracle
from promptopt.search import PromptSearch, open_storage, run_search, score_artifact
from promptopt.task import Task


def _task(root: Path) -> Task:
    return Task.from_folder(root, "blob", pool=6, val=3, test=3, seed=0)


def test_search_result_is_the_oracle_score_and_resumes(blob_dataset: Path, tmp_path: Path) -> None:
    task = _task(blob_dataset)
    out = tmp_path / "run"
    res = run_search(task, out, n_trials=4, max_k=3, tune_backend=False)
    for key in ("best_params", "val_miou", "test_miou", "selected", "trials", "split", "prompt"):
        assert key in res
    assert res["trials"]["total"] == 4 and read_json(out / "cost.json")["trials_run_by_this_call"] == [0, 1, 2, 3]
    assert (out / "best" / "prompt.json").is_file() and (out / "report.html").is_file()
    assert (out / "history.png").is_file()
    # the reported val mIoU is what the oracle gives for the saved best prompt; test is scored on test
    art = load_prompt(out / "best" / "prompt.json")
    backend = create_backend("features")
    val = ValidationOracle(backend, task.split.val, task.num_classes).score(art.samples()).miou
    test = ValidationOracle(backend, task.split.test, task.num_classes).score(art.samples()).miou
    assert res["val_miou"] == pytest.approx(val, abs=1e-12)
    assert res["test_miou"] == pytest.approx(test, abs=1e-12)
    # rerunning the finished command does no new trial and changes no file; asking for more adds the missing ones
    stamp = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    again = run_search(task, out, n_trials=4, max_k=3, tune_backend=False)
    assert again == res
    assert stamp == {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    more = run_search(task, out, n_trials=6, max_k=3, tune_backend=False)
    assert read_json(out / "cost.json")["trials_run_by_this_call"] == [4, 5] and more["trials"]["total"] == 6
    assert more["val_miou"] >= res["val_miou"]


def test_search_refuses_a_study_made_for_another_task(blob_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    PromptSearch(_task(blob_dataset), out, n_trials=1, max_k=2, tune_backend=False, strategies=["forward"]).fit()
    other = Task.from_folder(blob_dataset, "blob", pool=6, val=3, test=3, seed=1)
    with pytest.raises(ConfigError, match="another task"):
        PromptSearch(other, out, n_trials=2, max_k=2, tune_backend=False, strategies=["forward"]).fit()
    run_search(_task(blob_dataset), tmp_path / "run2", n_trials=1, max_k=2, tune_backend=False, strategies=["forward"])
    with pytest.raises(ConfigError, match="holds a different run .*split_seed: 0 → 1"):
        run_search(other, tmp_path / "run2", n_trials=1, max_k=2, tune_backend=False, strategies=["forward"])


def test_pruning_uses_forward_steps_and_all_pruned_is_a_clear_error(blob_dataset: Path, tmp_path: Path) -> None:
    search = PromptSearch(_task(blob_dataset), tmp_path / "run", n_trials=2, max_k=2, tune_backend=False,
                          strategies=["forward"], pruner=optuna.pruners.ThresholdPruner(lower=1.5))
    with pytest.raises(ConfigError, match="no trial completed"):
        search.fit()
    study = optuna.load_study(study_name="promptopt-blob", storage=open_storage(None, tmp_path / "run"))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.PRUNED] * 2
    # each trial was pruned on a forward step's value, or has the parameters of one that was (then not re-run)
    for t in study.trials:
        twin = study.trials[t.user_attrs.get("duplicate_of", t.number)]
        assert twin.intermediate_values and twin.params == t.params and "pruned after step" in twin.user_attrs["pruned"]


def test_backend_options_are_searched(blob_dataset: Path, tmp_path: Path) -> None:
    search = PromptSearch(_task(blob_dataset), tmp_path / "run", n_trials=2, max_k=1, strategies=["forward"]).fit()
    assert {"features.temperature", "features.pixels_per_prompt", "features.scales"} <= set(search.best_params_)
    art = load_prompt(search.best_prompt_)
    assert art.backend["options"]["temperature"] == search.best_params_["features.temperature"]


def test_unknown_strategy_is_a_clear_error(blob_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown search strategy 'nope'"):
        PromptSearch(_task(blob_dataset), tmp_path / "run", strategies=["nope"])


def test_cli_search_then_predict(blob_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    r = CliRunner().invoke(app, ["search", "--data", str(blob_dataset), "--out", str(out), "--n-trials", "2",
                                 "--max-k", "2", "--fixed-backend", "--pool", "6", "--val", "3", "--test", "3"])
    assert r.exit_code == 0, r.output
    assert "best trial" in r.output
    masks = tmp_path / "masks"
    r = CliRunner().invoke(app, ["predict", "--prompt", str(out / "best" / "prompt.json"),
                                 "--images", str(blob_dataset / "blob" / "images"), "--out", str(masks)])
    assert r.exit_code == 0, r.output
    assert len(list(masks.glob("*.png"))) == 12
    r = CliRunner().invoke(app, ["search", "--data", str(blob_dataset), "--out", str(out), "--strategies", "nope"])
    assert r.exit_code == 2 and "unknown search strategy" in r.output


def test_retrieval_and_tuned_are_searchable(blob_dataset: Path, tmp_path: Path) -> None:
    """Retrieval and tuned trials save artifacts that reproduce, through promptopt predict's path, the val score
    the trial's strategy reported, and the reported test score equals an independent oracle computation."""
    from promptopt.predict import predict_with_prompts
    from promptopt.strategies.tuning import load_contexts

    task = _task(blob_dataset)
    for strategy in ("retrieval", "tuned"):
        out = tmp_path / strategy
        res = run_search(task, out, n_trials=2, max_k=2, tune_backend=False, strategies=[strategy])
        assert res["best_params"]["strategy"] == strategy
        best = out / "best" / "prompt.json"
        art = load_prompt(best)
        assert art.kind == strategy
        assert score_artifact(best, task.split.val, task.num_classes)["miou"] == pytest.approx(res["val_miou"],
                                                                                              abs=1e-9)
        test_oracle = ValidationOracle(create_backend("features"), task.split.test, task.num_classes)
        if strategy == "tuned":
            expected = test_oracle.score_contexts(load_contexts(out / "best" / art.context_file)).miou
        else:
            by_id = {s.id: s for s in art.samples()}
            _, used = predict_with_prompts(art, task.split.test)
            expected = test_oracle.score_assignment({q.key: [by_id[i] for i in ids]
                                                     for q, ids in zip(task.split.test, used)}).miou
        assert res["test_miou"] == pytest.approx(expected, abs=1e-9)


def test_search_over_seggpt_and_persam_options_with_tiny_checkpoints(blob_dataset: Path, tmp_path: Path) -> None:
    import torch
    from transformers import SamConfig, SamModel, SegGptForImageSegmentation

    from promptopt.backends.seggpt import tiny_config

    torch.manual_seed(0)
    seg_dir = tmp_path / "seggpt"
    SegGptForImageSegmentation(tiny_config()).save_pretrained(seg_dir)
    sam_dir = tmp_path / "sam"
    SamModel(SamConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=8,
                           window_size=4, global_attn_indexes=[1], output_channels=32, num_pos_feats=16, mlp_dim=64),
        prompt_encoder_config=dict(hidden_size=32, image_size=64, patch_size=8, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32),
    )).save_pretrained(sam_dir)
    task = _task(blob_dataset)
    for name, ckpt, knob in (("seggpt", seg_dir, "seggpt.ensemble"), ("persam", sam_dir, "persam.kshot")):
        spec = BackendSpec(name, str(ckpt), {"train_steps": 5} if name == "persam" else {})
        search = PromptSearch(task, tmp_path / f"run-{name}", spec, n_trials=2, max_k=2, strategies=["forward"])
        search.fit()
        assert knob in search.best_params_
        art = load_prompt(search.best_prompt_)
        assert art.backend["name"] == name and art.backend["checkpoint"] == str(ckpt)
