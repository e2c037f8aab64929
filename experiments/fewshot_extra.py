"""Few-shot strategies of the experiment that need the optional modules: tuned context and retrieval.

Imported by fewshot_vs_supervised.py, which adds ``STRATEGIES`` to its table of few-shot strategies.
"""

from __future__ import annotations

from typing import Any

from promptopt.strategies import ForwardSelector
from promptopt.task import Task


def tuned(task: Task, cfg: dict[str, Any]) -> dict[str, Any]:
    """Forward selection (at most ``tuned_prompts`` examples) as the start, then context tuning on the pool."""
    from promptopt.strategies.tuning import ContextTuner, score_contexts

    t = cfg.get("tuned", {})
    from fewshot_vs_supervised import make_backend

    be = make_backend(cfg, **t.get("backend_options", {}))
    val, _ = task.oracles(be)
    start = ForwardSelector(val, max_prompts=int(t.get("prompts", 2))).fit(task.pool).selected_
    train = [s for s in task.pool if s not in start] or list(task.pool)
    steps = int(t.get("steps", 30))
    tuner = ContextTuner(be, init=start, steps=steps, lr=float(t.get("lr", 0.05)), batch_size=int(t.get("batch_size", 4)),
                         warmup=max(1, steps // 10), eval_every=max(1, steps // 6), seed=0).fit(train, val)
    test = score_contexts(be, tuner.contexts_, task.split.test, task.num_classes).miou
    start_test = score_contexts(be, tuner.initial_contexts_, task.split.test, task.num_classes).miou
    return {"test_miou": test, "start_test_miou": start_test, "val_miou": tuner.score_, "k": len(start),
            "steps_run": tuner.steps_run_, "labels_used": len(task.pool) + len(task.split.val)}


STRATEGIES = {"tuned": tuned}


def retrieval(task: Task, cfg: dict[str, Any]) -> dict[str, Any]:
    """Per test image, its k nearest pool examples (weight-free encoder, FAISS flat index) as the prompt."""
    from promptopt.embeddings import create_encoder
    from promptopt.index import build_index
    from promptopt.strategies.retrieval import RetrievalSelector

    from fewshot_vs_supervised import make_backend

    be = make_backend(cfg)
    val, test = task.oracles(be)
    k = int(cfg.get("k", 4))
    index = build_index(list(task.pool), create_encoder("features"), kind="flat")
    sel = RetrievalSelector(val, index, k=k).fit(task.pool)
    return {"test_miou": sel.evaluate(test).miou, "val_miou": sel.score_, "k": k,
            "labels_used": len(task.pool)}


STRATEGIES["retrieval"] = retrieval
