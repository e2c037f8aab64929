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
from typing import Any, Sequence

import numpy as np

from ..artifacts import fingerprint
from ..data import Sample
from ..embeddings.base import Encoder
from ..errors import ConfigError, DataError
from ..index import EmbeddingIndex
from ..oracle import OracleResult, ValidationOracle
from ..space import MAX_K, Choice, Int
from .acceptance import DEFAULT_RULE, make_rule
from .base import PromptStrategy


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
             k: int, diversity: float = 0.0, batch_size: int = 16,
             exclude_self: bool = False) -> dict[str, list[tuple[Sample, float]]]:
    """Per query key, its k (candidate, similarity) pairs: top-k by cosine, or MMR when ``diversity`` > 0.

    ``exclude_self``: a query that is itself a candidate (a cross-validated oracle scores pool
    images) never retrieves itself; it gets its k nearest *other* candidates.
    """
    if k < 1:
        raise ConfigError(f"retrieval: k must be at least 1, got {k}")
    by_key = {c.key: c for c in candidates if c.key in index}
    if not by_key:
        raise ConfigError("retrieval: none of the pool examples is in the index; build it on this dataset "
                          "(`promptopt index build --data DIR --category C`)")
    if exclude_self and len(by_key) < 2 and any(q.key in by_key for q in queries):
        raise ConfigError("retrieval: a query that is the only pool example has no other example to retrieve")
    wanted = k if diversity == 0 else max(4 * k, 20)
    n_fetch = min(len(by_key), wanted + (1 if exclude_self else 0))
    vecs = encoder.encode(queries, batch_size=batch_size)
    hits = index.search(vecs, n_fetch, restrict_to=list(by_key))
    out: dict[str, list[tuple[Sample, float]]] = {}
    for q, row in zip(queries, hits):
        if exclude_self:
            row = [(key, sim) for key, sim in row if key != q.key][:wanted]
        keys = [key for key, _ in row]
        sims = np.array([s for _, s in row], dtype=np.float32)
        order = mmr(sims, index.vectors(keys) if diversity > 0 else np.zeros((len(keys), 1), np.float32), k, diversity)
        out[q.key] = [(by_key[keys[i]], float(sims[i])) for i in order]
    return out


class RetrievalSelector(PromptStrategy):
    """Per-query top-k prompts from an embedding index (see the module docstring).

    Parameters: ``index`` (an :class:`EmbeddingIndex` or its folder) — or, without one,
    ``encoder`` (a spec such as ``"features"``; ``"features+mask"`` for mask-aware pool
    embeddings) to build a flat index over the pool with at ``fit``; ``k`` prompts per query,
    or ``"auto"``: k = 1, 2, …, ``max_k`` in turn, each kept only if the acceptance rule
    (``rule``, ``noise_z``) finds its paired gain over the best k so far real, stopping at the
    first k that is not kept; ``diversity`` in [0, 1] (MMR). A cross-validated oracle scores
    pool images too, each with its nearest *other* pool examples.

    Attributes after ``fit``: ``k_``, ``assignment_`` (val image id → its prompt ids),
    ``similarities_`` (their cosine similarities), ``selected_`` (every pool example some val
    image uses, in pool order), ``score_``, ``result_`` (the oracle result), ``history_`` (one
    entry per val image), ``k_history_`` (``k="auto"``: one entry per k tried, with its verdict).
    """

    name = "retrieval"
    per_query = True
    artifact_kind = "retrieval"
    baselines = ("forward", "random", "best-single")
    search_space = (Choice("encoder", ("features", "features+mask")), Int("k", 1, MAX_K),
                    Choice("diversity", (0.0, 0.3, 0.6)))

    def __init__(self, oracle: ValidationOracle, *, index: EmbeddingIndex | str | Path | None = None,
                 encoder: str | Encoder | None = None, k: int | str = 4, diversity: float = 0.0, max_k: int = 8,
                 rule: str = DEFAULT_RULE, noise_z: float = 1.0, **common: Any) -> None:
        super().__init__(oracle, **common)
        if k != "auto" and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise ConfigError(f"retrieval: k must be a whole number of at least 1 or 'auto', got {k!r}")
        if max_k < 1:
            raise ConfigError(f"retrieval: max_k must be at least 1, got {max_k}")
        if not 0.0 <= diversity <= 1.0:
            raise ConfigError(f"retrieval: diversity must be in [0, 1], got {diversity}")
        if index is None and encoder is None:
            raise ConfigError("strategy 'retrieval' needs an index (--index indexes/NAME; see `promptopt index build`) "
                              "or an encoder to index the pool with")
        self.index = index if index is None or isinstance(index, EmbeddingIndex) else EmbeddingIndex.load(index)
        self.k = k
        self.max_k = int(max_k)
        self.diversity = float(diversity)
        self.encoder = encoder
        self.rule = make_rule(rule, noise_z)

    def _encoder(self) -> Encoder:
        if not isinstance(self.encoder, Encoder):
            self.encoder = self.index.make_encoder()
        else:
            self.index._check_encoder(self.encoder)
        return self.encoder

    def assign(self, queries: Sequence[Sample]) -> dict[str, list[Sample]]:
        """Prompt set of each query (by key), from the fitted pool (never the query itself)."""
        hits = retrieve(self.index, self._encoder(), queries, self.pool_, self.k_, self.diversity, exclude_self=True)
        return {key: [s for s, _ in row] for key, row in hits.items()}

    def prompts_for(self, queries: Sequence[Sample]) -> list[list[Sample]]:
        assignment = self.assign(queries)
        return [assignment[q.key] for q in queries]

    def evaluate(self, oracle: ValidationOracle) -> OracleResult:
        """Score per-query retrieval on another oracle's images (the held-out test split)."""
        return oracle.score_assignment(self.assign(oracle.samples))

    def _score_k(self, k: int) -> tuple[dict[str, list[tuple[Sample, float]]], OracleResult]:
        hits = retrieve(self.index, self._encoder(), self.oracle.samples, self.pool_, k, self.diversity,
                        exclude_self=True)
        return hits, self.oracle.score_assignment({key: [s for s, _ in row] for key, row in hits.items()})

    def _choose_k(self) -> tuple[int, dict[str, list[tuple[Sample, float]]], OracleResult]:
        """k by the acceptance rule (``k="auto"``), or the given k: (k, hits, result)."""
        # a pool image scored by a cross-validated oracle has one example fewer to retrieve from
        top = len(self.pool_) - (1 if getattr(self.oracle, "cross_validate", False) else 0)
        if self.k != "auto":
            k = min(int(self.k), top)
            return (k, *self._score_k(k))
        cap = self.largest_fitting(min(self.max_k, top))
        best = None
        for k in range(1, cap + 1):
            self._tick("k", k - 1, cap)
            hits, result = self._score_k(k)
            verdict = self.rule.judge(result, best[2]).to_dict() if best else {"gain": None, "noise": 0.0,
                                                                               "accepted": True}
            self.k_history_.append({"k": k, "score": result.miou, **verdict})
            if verdict["accepted"]:
                best = (k, hits, result)
            else:
                break
        self._tick("k", cap, cap)
        return best  # type: ignore[return-value]

    def fit(self, pool: Sequence[Sample]) -> "RetrievalSelector":
        pool = self._check_pool(pool)
        self.require_fit(1 if self.k == "auto" else min(int(self.k), len(pool)))
        if self.index is None:
            self.index = pool_index(pool, self.encoder)  # type: ignore[arg-type]
            self.encoder = None
        self.index.verify(pool)
        self.index.verify(self.oracle.samples)
        missing = [s.id for s in pool if s.key not in self.index]
        if len(missing) == len(pool):
            raise ConfigError("retrieval: none of the pool examples is in the index; build it on this dataset")
        self.pool_ = [s for s in pool if s.key in self.index]
        self.missing_from_index_ = missing
        self.k_history_ = []
        self._tick("queries", 0, len(self.oracle.samples))
        self.k_, hits, self.result_ = self._choose_k()
        self._tick("queries", len(self.oracle.samples), len(self.oracle.samples))
        used = {s.key for row in hits.values() for s, _ in row}
        self.selected_ = [s for s in self.pool_ if s.key in used]
        self.score_ = float(self.result_.miou)
        self.assignment_ = {q.id: [s.id for s, _ in hits[q.key]] for q in self.oracle.samples}
        self.similarities_ = {q.id: [round(sim, 6) for _, sim in hits[q.key]] for q in self.oracle.samples}
        per_image = self.result_.per_image_iou
        self.history_ = [{"query": q.id, "prompts": self.assignment_[q.id], "similarity": self.similarities_[q.id],
                          "iou": per_image.get(q.id)} for q in self.oracle.samples]
        self.n_evaluations_ = max(1, len(self.k_history_))
        return self

    def summary(self) -> dict[str, Any]:
        auto = {"k_option": "auto", "k_history": self.k_history_, **self.rule.describe()} if self.k == "auto" else {}
        return {**super().summary(), "k": self.k_, **auto, "diversity": self.diversity, "encoder": self.index.encoder,
                "index_type": self.index.kind, "index_count": len(self.index), "assignment": self.assignment_,
                "pool_not_in_index": self.missing_from_index_}

    def prompt_examples(self) -> list[Sample]:
        return list(self.pool_)

    def artifact_extra(self, folder: str | Path) -> dict[str, Any]:
        self.saved_index().save(Path(folder) / "index")
        return {"index": "index", "k": self.k_, "diversity": self.diversity}

    def saved_index(self) -> EmbeddingIndex:
        """A flat index over the fitted pool only (what a saved retrieval prompt carries)."""
        keys = [s.key for s in self.pool_]
        sub = EmbeddingIndex(self.index.dim, kind="flat", encoder=self.index.encoder)
        sub.add(self.index.vectors(keys), keys, [self.index.items[self.index._by_key[k]]["hash"] for k in keys])
        sub.dataset_root = self.index.dataset_root
        return sub


_POOL_INDEXES: dict[str, EmbeddingIndex] = {}


def pool_index(pool: Sequence[Sample], encoder: str | Encoder) -> EmbeddingIndex:
    """A flat index over ``pool`` built with an encoder spec (``"NAME"`` or ``"NAME+mask"`` for mask-aware
    embeddings); memoised per process, so the trials of a search embed each pool once.

    Queries are always encoded without their masks, so a mask-aware index never sees a validation mask.
    """
    from ..embeddings import create_encoder
    from ..index import build_index

    spec = encoder if isinstance(encoder, str) else encoder.name
    key = fingerprint({"encoder": spec, "samples": [s.key for s in pool]})
    if key not in _POOL_INDEXES:
        enc = create_encoder(spec.removesuffix("+mask")) if isinstance(encoder, str) else encoder
        _POOL_INDEXES[key] = build_index(list(pool), enc, kind="flat", masked=spec.endswith("+mask"))
    return _POOL_INDEXES[key]


def predict_retrieval(art, backend, queries: Sequence[Sample]) -> tuple[list[np.ndarray], list[list[str]]]:
    """Predictor of ``kind: retrieval`` prompt artifacts: nearest saved examples per new image.

    Returns the label maps and, per image, the ids of the prompts it was given.
    """
    from ..oracle import prediction_to_labels

    folder = art.path.parent / art.extra.get("index", "index")
    if not folder.is_dir():
        raise DataError(f"{art.path}: retrieval prompt refers to missing index folder {folder}")
    index = EmbeddingIndex.load(folder)
    hits = retrieve(index, index.make_encoder(), queries, art.samples(), int(art.extra.get("k", 4)),
                    float(art.extra.get("diversity", 0.0)))
    labels, used = [], []
    for q in queries:
        prompts = [s for s, _ in hits[q.key]]
        labels.append(prediction_to_labels(backend.predict(prompts, [q], art.num_classes)[0]).cpu().numpy())
        used.append([s.id for s in prompts])
    return labels, used
