"""Retrieval-style prompting: each query image gets its own nearest pool examples as prompts.

As retrieval-augmented generation does for text: every pool example is
embedded once (``promptopt index build``); at query time the query image is
embedded with the same encoder and its top-k most similar pool examples
(cosine similarity) become its prompt. ``diversity`` > 0 re-ranks the
candidates by maximal marginal relevance (MMR, Carbonell & Goldstein 1998):

    next = argmax_c (1 - diversity) · sim(query, c) - diversity · max_{s chosen} sim(c, s)

so that near-duplicate examples (consecutive video frames) do not fill the
prompt. Nothing is optimised on the validation images: the validation and test
mIoU are measured exactly like every other strategy's, by the same oracle,
through :meth:`~promptopt.oracle.ValidationOracle.score_assignment`.

Only pool examples are ever retrieved, even when the index holds the whole
category: validation and test images can never leak into a prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..data import Sample
from ..embeddings.base import Encoder
from ..errors import ConfigError, DataError
from ..index import EmbeddingIndex
from ..oracle import OracleResult, ValidationOracle
from .base import ProgressFn, PromptStrategy


def mmr(query_sims: np.ndarray, cand_vecs: np.ndarray, k: int, diversity: float) -> list[int]:
    """Indices of k candidates chosen by maximal marginal relevance (``diversity`` = 0: plain top-k)."""
    if not 0.0 <= diversity <= 1.0:
        raise ConfigError(f"diversity must be in [0, 1], got {diversity}")
    n = len(query_sims)
    k = min(k, n)
    if diversity == 0.0:
        return [int(i) for i in np.argsort(-query_sims, kind="stable")[:k]]
    pair = cand_vecs @ cand_vecs.T
    chosen: list[int] = []
    redundancy = np.full(n, -np.inf)
    for _ in range(k):
        red = np.where(np.isinf(redundancy), 0.0, redundancy)
        score = (1.0 - diversity) * query_sims - diversity * red
        score[chosen] = -np.inf
        best = int(np.argmax(score))
        chosen.append(best)
        redundancy = np.maximum(redundancy, pair[best])
    return chosen


def retrieve(index: EmbeddingIndex, encoder: Encoder, queries: Sequence[Sample], candidates: Sequence[Sample],
             k: int, diversity: float = 0.0, batch_size: int = 16) -> dict[str, list[tuple[Sample, float]]]:
    """Per query key, its k (candidate, similarity) pairs: top-k by cosine, or MMR when ``diversity`` > 0."""
    if k < 1:
        raise ConfigError(f"retrieval: k must be at least 1, got {k}")
    by_key = {c.key: c for c in candidates if c.key in index}
    if not by_key:
        raise ConfigError("retrieval: none of the pool examples is in the index; build it on this dataset "
                          "(`promptopt index build --data DIR --category C`)")
    n_fetch = min(len(by_key), k if diversity == 0 else max(4 * k, 20))
    vecs = encoder.encode(queries, batch_size=batch_size)
    hits = index.search(vecs, n_fetch, restrict_to=list(by_key))
    out: dict[str, list[tuple[Sample, float]]] = {}
    for q, row in zip(queries, hits):
        keys = [key for key, _ in row]
        sims = np.array([s for _, s in row], dtype=np.float32)
        order = mmr(sims, index.vectors(keys) if diversity > 0 else np.zeros((len(keys), 1), np.float32), k, diversity)
        out[q.key] = [(by_key[keys[i]], float(sims[i])) for i in order]
    return out


class RetrievalSelector(PromptStrategy):
    """Per-query top-k prompts from an embedding index (see the module docstring).

    Parameters: ``oracle`` (val images), ``index`` (an :class:`EmbeddingIndex` or its
    folder), ``k`` prompts per query, ``diversity`` in [0, 1] (MMR), ``encoder``
    (default: rebuilt from the index manifest and checked by fingerprint).

    Attributes after ``fit``: ``assignment_`` (val image id → its prompt ids),
    ``similarities_`` (the matching cosine similarities), ``selected_`` (every pool
    example used by some val image, in pool order), ``score_`` (val mIoU),
    ``result_`` (the oracle result), ``history_`` (one entry per val image).
    """

    name = "retrieval"
    per_query = True

    def __init__(self, oracle: ValidationOracle, index: EmbeddingIndex | str | Path, k: int = 4,
                 diversity: float = 0.0, encoder: Encoder | None = None, progress: ProgressFn | None = None) -> None:
        super().__init__(oracle, progress)
        if k < 1:
            raise ConfigError(f"retrieval: k must be at least 1, got {k}")
        if not 0.0 <= diversity <= 1.0:
            raise ConfigError(f"retrieval: diversity must be in [0, 1], got {diversity}")
        self.index = index if isinstance(index, EmbeddingIndex) else EmbeddingIndex.load(index)
        self.k = int(k)
        self.diversity = float(diversity)
        self.encoder = encoder

    def _encoder(self) -> Encoder:
        if self.encoder is None:
            self.encoder = self.index.make_encoder()
        else:
            self.index._check_encoder(self.encoder)
        return self.encoder

    def assign(self, queries: Sequence[Sample]) -> dict[str, list[Sample]]:
        """Prompt set of each query (by key), from the fitted pool."""
        hits = retrieve(self.index, self._encoder(), queries, self.pool_, self.k, self.diversity)
        return {key: [s for s, _ in row] for key, row in hits.items()}

    def evaluate(self, oracle: ValidationOracle) -> OracleResult:
        """Score per-query retrieval on another oracle's images (the held-out test split)."""
        return oracle.score_assignment(self.assign(oracle.samples))

    def fit(self, pool: Sequence[Sample]) -> "RetrievalSelector":
        pool = self._check_pool(pool)
        self.index.verify(pool)
        self.index.verify(self.oracle.samples)
        missing = [s.id for s in pool if s.key not in self.index]
        if len(missing) == len(pool):
            raise ConfigError("retrieval: none of the pool examples is in the index; build it on this dataset")
        self.pool_ = [s for s in pool if s.key in self.index]
        self.missing_from_index_ = missing
        self._tick("queries", 0, len(self.oracle.samples))
        hits = retrieve(self.index, self._encoder(), self.oracle.samples, self.pool_, self.k, self.diversity)
        self._tick("queries", len(self.oracle.samples), len(self.oracle.samples))
        assignment = {key: [s for s, _ in row] for key, row in hits.items()}
        self.result_ = self.oracle.score_assignment(assignment)
        used = {s.key for row in assignment.values() for s in row}
        self.selected_ = [s for s in self.pool_ if s.key in used]
        self.score_ = float(self.result_.miou)
        self.assignment_ = {q.id: [s.id for s, _ in hits[q.key]] for q in self.oracle.samples}
        self.similarities_ = {q.id: [round(sim, 6) for _, sim in hits[q.key]] for q in self.oracle.samples}
        per_image = self.result_.per_image_iou
        self.history_ = [{"query": q.id, "prompts": self.assignment_[q.id], "similarity": self.similarities_[q.id],
                          "iou": per_image.get(q.id)} for q in self.oracle.samples]
        return self

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "k": self.k, "diversity": self.diversity, "encoder": self.index.encoder,
                "index_type": self.index.kind, "index_count": len(self.index), "assignment": self.assignment_,
                "pool_not_in_index": self.missing_from_index_}

    def save_prompt(self, run_dir: str | Path, backend_config: Mapping[str, Any], num_classes: int, category: str,
                    extra: Mapping[str, Any] | None = None) -> Path:
        """``prompt.json`` of kind ``retrieval``: the pool examples plus a flat index over them in ``index/``."""
        from ..artifacts import save_prompt

        self.pool_index().save(Path(run_dir) / "index")
        return save_prompt(run_dir, dict(backend_config), self.pool_, num_classes, category, kind="retrieval",
                           extra={**dict(extra or {}), "index": "index", "k": self.k, "diversity": self.diversity})

    def pool_index(self) -> EmbeddingIndex:
        """A flat index over the fitted pool only (what a saved retrieval prompt carries)."""
        keys = [s.key for s in self.pool_]
        sub = EmbeddingIndex(self.index.dim, kind="flat", encoder=self.index.encoder)
        sub.add(self.index.vectors(keys), keys, [self.index.items[self.index._by_key[k]]["hash"] for k in keys])
        sub.dataset_root = self.index.dataset_root
        return sub


def predict_retrieval(art, backend, queries: Sequence[Sample]) -> list[np.ndarray]:
    """Predictor of ``kind: retrieval`` prompt artifacts: nearest saved examples per new image."""
    from ..oracle import prediction_to_labels

    folder = art.path.parent / art.extra.get("index", "index")
    if not folder.is_dir():
        raise DataError(f"{art.path}: retrieval prompt refers to missing index folder {folder}")
    index = EmbeddingIndex.load(folder)
    encoder = index.make_encoder()
    examples = art.samples()
    hits = retrieve(index, encoder, queries, examples, int(art.extra.get("k", 4)), float(art.extra.get("diversity", 0.0)))
    out = []
    for q in queries:
        prompts = [s for s, _ in hits[q.key]]
        out.append(prediction_to_labels(backend.predict(prompts, [q], art.num_classes)[0]).cpu().numpy())
    return out


# --- Optuna search ------------------------------------------------------------------------------------
_SEARCH_INDEXES: dict[str, EmbeddingIndex] = {}


def _search_retrieval(trial, ctx):
    """Optuna search strategy "retrieval": encoder (weight-free, or mask-aware), k and MMR diversity searched.

    The index over the pool is built once per encoder and reused by later trials of the process (queries are
    always encoded without their masks, so a mask-aware index never sees a validation mask).
    Encoders that need weights are searched only when given as ``retrieval_encoders`` in the search extras.
    """
    from ..artifacts import fingerprint as _fp
    from ..embeddings import create_encoder
    from ..index import build_index
    from ..search import TrialOutcome

    choices = list(ctx.extras.get("retrieval_encoders") or ["features", "features+mask"])
    spec = trial.suggest_categorical("retrieval.encoder", choices)
    k = trial.suggest_int("retrieval.k", 1, ctx.max_k)
    diversity = trial.suggest_categorical("retrieval.diversity", [0.0, 0.3, 0.6])
    name, masked = spec.removesuffix("+mask"), spec.endswith("+mask")
    samples = list(ctx.task.pool)
    key = _fp({"encoder": spec, "samples": [s.key for s in samples]})
    if key not in _SEARCH_INDEXES:
        _SEARCH_INDEXES[key] = build_index(samples, create_encoder(name), kind="flat", masked=masked)
    sel = RetrievalSelector(ctx.oracle, _SEARCH_INDEXES[key], k=k, diversity=diversity,
                            progress=ctx.progress).fit(ctx.task.pool)
    path = sel.save_prompt(ctx.trial_dir, ctx.backend.config(), ctx.task.num_classes, ctx.task.category,
                           extra={"strategy": "retrieval", "val_miou": sel.score_})
    return TrialOutcome(sel.score_, path, sel.selected_ids_, {"encoder": spec})


def register_search() -> None:
    """Make "retrieval" available to :mod:`promptopt.search` (called by its loader of optional strategies)."""
    from ..search import register_search_strategy

    register_search_strategy("retrieval", _search_retrieval)
