"""The validation-mIoU oracle: the one scorer every strategy uses.

It owns caching, forward counting and the metric, so strategies stay
backend-agnostic and two strategies scored by the same oracle are comparable.

* ``score(prompts)`` is memoised by prompt-set identity (the set of sample
  keys; the order of prompts does not change what a set-combining backend
  predicts, up to float rounding).
* For backends that combine at the output, each (prompt, query) pair's
  sufficient statistics are computed once and kept; any prompt set is then
  scored by merging cached statistics. :meth:`ValidationOracle.score_additions`
  scores "base set + one candidate" for many candidates with one merged base
  per query: a greedy step is arithmetic, with no model forward.
* ``forwards`` counts (prompt, query) pairs pushed through the model — one per
  pair statistic for output-combining backends, ``len(prompts)`` per query for
  model-combining ones (the batch rows of SegGPT's feature ensemble).

Two modes (``cross_validate``):

``holdout`` (the default)
    Every prompt set is scored on the same images, the validation split; the
    prompts come from a separate pool.
``cv`` (``cross_validate=True``)
    The oracle's images are every labelled image a strategy may learn from
    (prompt pool ∪ validation split), and a prompt set is scored on all of them
    *except its own prompts*: an image is never scored by a set that shows it.
    The score of set S is the dataset-level mIoU over the images not in S, a
    function of S alone, so memoisation by set identity stays exact, and the
    pair cache still computes each (prompt, image) pair at most once — a
    query's own pair is never computed. Two sets that hold different prompts are
    scored on slightly different images; strategies compare them *paired*, on
    the images both were scored on (see :mod:`promptopt.strategies.acceptance`),
    which is why every result carries its per-image confusion matrices. The
    test split is never among the oracle's images: it is scored once, at the
    end, by a separate holdout oracle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Collection, Iterable, Mapping, Sequence

import numpy as np
import torch

from .backends.base import Backend, Context, Prompt, Stats
from .data import IGNORE_INDEX, Sample, check_labels
from .errors import ConfigError, DataError
from .metrics import IoUAccumulator, SegmentationScore, confusion_matrix


@dataclass
class OracleResult:
    """Score of one prompt set on the oracle's images.

    ``confusions`` maps each scored image's id to its (C, C) confusion matrix:
    the images the set was scored on (in cross-validated mode, the oracle's
    images minus the set's own prompts), and what paired comparisons of two
    sets sum over.
    """

    prompt_ids: list[str]
    score: SegmentationScore
    confusions: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def miou(self) -> float:
        return self.score.miou

    @property
    def per_image_iou(self) -> dict[str, float]:
        return self.score.per_image_iou

    @property
    def per_class_iou(self) -> list[float]:
        return self.score.per_class_iou

    def to_dict(self) -> dict:
        return {"prompt_ids": list(self.prompt_ids), **self.score.to_dict()}


def prediction_to_labels(probs: torch.Tensor) -> torch.Tensor:
    """(C, H, W) probabilities → (H, W) class ids; ties go to the lower id, as with argmax.

    A running comparison over classes: for the few classes of segmentation tasks
    it is an order of magnitude faster than ``argmax(0)`` on CPU, which reduces
    across a strided dimension.
    """
    best = probs[0]
    labels = torch.zeros(probs.shape[1:], dtype=torch.long, device=probs.device)
    for c in range(1, probs.shape[0]):
        better = probs[c] > best
        labels.masked_fill_(better, c)
        best = torch.where(better, probs[c], best)
    return labels


def _set_key(prompts: Sequence[Prompt]) -> tuple[str, ...]:
    keys = []
    for p in prompts:
        if p.key is None:
            raise ConfigError("the oracle memoises by prompt identity; give each Context a key")
        keys.append(p.key)
    if len(set(keys)) != len(keys):
        raise ConfigError(f"prompt set repeats an example: {keys}")
    return tuple(sorted(keys))


@dataclass
class _Counters:
    calls: int = 0
    forwards: int = 0
    memo_hits: int = 0
    pair_hits: int = 0


class ValidationOracle:
    """Scores prompt sets by dataset-level mIoU on a fixed set of labelled images.

    Parameters
    ----------
    backend:
        Any :class:`~promptopt.backends.base.Backend`.
    val_samples:
        The labelled images scored against (a validation split; build a second
        oracle on the test split for held-out numbers).
    num_classes:
        Classes of the task (background included); inferred from the masks when None.
    cache:
        Keep per-pair statistics and per-set results. ``cache=False`` is the
        plain path, used to check that caching never changes an answer.
    cross_validate:
        Score each prompt set on every image except its own prompts (the ``cv``
        mode of the module docstring); give it the pool and the validation
        split together (:meth:`promptopt.task.Task.oracles` does).
    """

    def __init__(
        self,
        backend: Backend,
        val_samples: Sequence[Sample],
        num_classes: int | None = None,
        ignore_index: int = IGNORE_INDEX,
        cache: bool = True,
        progress: Callable[[int], None] | None = None,
        cross_validate: bool = False,
    ) -> None:
        if not val_samples:
            raise DataError("the oracle needs at least one labelled image to score against (empty split?)")
        keys = [s.key for s in val_samples]
        if len(set(keys)) != len(keys):
            raise DataError("the oracle's images repeat a sample id")
        self.backend = backend
        self.samples = list(val_samples)
        if num_classes is None:
            top = 1
            for s in self.samples:
                m = s.mask
                valid = m[m != ignore_index]
                if valid.size:
                    top = max(top, int(valid.max()))
            num_classes = top + 1
        for s in self.samples:
            check_labels(s.mask, num_classes, f"{s.mask_path or s.key}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.cache = cache
        self.progress = progress
        self.cross_validate = bool(cross_validate)
        self._pairs: dict[tuple[str, str], Stats] = {}
        self._results: dict[tuple[str, ...], OracleResult] = {}
        self._approx_results: dict[tuple[str, ...], OracleResult] = {}
        self._counters = _Counters()
        backend.prepare(self.samples)

    # --- counters ---------------------------------------------------------------------------------
    @property
    def calls(self) -> int:
        """Prompt sets scored (memo hits included)."""
        return self._counters.calls

    @property
    def forwards(self) -> int:
        """(prompt, query) pairs the model computed."""
        return self._counters.forwards

    @property
    def stats(self) -> dict[str, int]:
        c = self._counters
        return {"calls": c.calls, "forwards": c.forwards, "memo_hits": c.memo_hits, "pair_cache_hits": c.pair_hits,
                "cached_pairs": len(self._pairs), "cached_sets": len(self._results)}

    @property
    def mode(self) -> str:
        """"cv" (every image but the set's own prompts is scored) or "holdout" (the same images for every set)."""
        return "cv" if self.cross_validate else "holdout"

    def scored_samples(self, prompt_keys: Collection[str | None] = ()) -> list[Sample]:
        """The images a set with these prompt keys is scored on (all of them in holdout mode).

        A cross-validated oracle leaves the set's own images out; a set that covers every
        image leaves nothing to score, which is a :class:`ConfigError`.
        """
        if not self.cross_validate:
            return self.samples
        keys = set(prompt_keys)
        out = [q for q in self.samples if q.key not in keys]
        if not out:
            raise ConfigError("cross-validated oracle: the prompt set holds every labelled image, so none is left "
                              "to score it on (give the oracle a validation split)")
        return out

    @property
    def uses_pair_cache(self) -> bool:
        """True when scores come from cached per-pair statistics (output-combining backend, cache on)."""
        return self.cache and self.backend.combines == "output" and self.backend.has_pair_stats

    # --- scoring ----------------------------------------------------------------------------------
    def pair_stats(self, prompt: Prompt, query: Sample) -> Stats:
        """Statistics of one pair, computed at most once while caching is on."""
        key = (prompt.key, query.key) if prompt.key is not None else None
        if self.cache and key is not None and key in self._pairs:
            self._counters.pair_hits += 1
            return self._on_device(self._pairs[key])
        with torch.no_grad():
            st = self.backend.pair_stats(prompt, query, self.num_classes)
        self._counters.forwards += 1
        if self.progress:
            self.progress(1)
        if self.cache and key is not None:
            # kept in host memory when the backend computes on an accelerator: the cache grows with
            # pool x images and is not part of the backend's memory estimate
            self._pairs[key] = st if self.backend.device.type == "cpu" else {k: v.cpu() for k, v in st.items()}
        return st

    def _on_device(self, st: Stats) -> Stats:
        dev = self.backend.device
        return st if dev.type == "cpu" else {k: v.to(dev, non_blocking=True) for k, v in st.items()}

    def _confusion(self, probs: torch.Tensor, sample: Sample) -> np.ndarray:
        return confusion_matrix(prediction_to_labels(probs), sample.mask, self.num_classes, self.ignore_index)

    def _result(self, prompt_ids: list[str], confusions: Iterable[tuple[Sample, np.ndarray]]) -> OracleResult:
        acc = IoUAccumulator(self.num_classes, self.ignore_index)
        per_image = {}
        for q, cm in confusions:
            acc.add_confusion(cm, q.id)
            per_image[q.id] = cm
        return OracleResult(prompt_ids, acc.result(), per_image)

    def _predict_one(self, prompts: Sequence[Prompt], query: Sample) -> torch.Tensor:
        if self.uses_pair_cache:
            return self.backend.finalize(self.backend.reduce_stats([self.pair_stats(p, query) for p in prompts]), query)
        with torch.no_grad():
            probs = self.backend.predict(list(prompts), [query], self.num_classes)[0]
        self._counters.forwards += len(prompts)
        if self.progress:
            self.progress(len(prompts))
        return probs

    def score(self, prompts: Sequence[Prompt]) -> OracleResult:
        """mIoU (and per-class, per-image IoU) of this prompt set on the oracle's images."""
        if not prompts:
            raise ConfigError("cannot score an empty prompt set")
        key = _set_key(prompts)
        self._counters.calls += 1
        if self.cache and key in self._results:
            self._counters.memo_hits += 1
            return self._results[key]
        ordered = sorted(prompts, key=lambda p: p.key)
        result = self._result([p.key.split("/")[-1] for p in ordered],
                              ((q, self._confusion(self._predict_one(ordered, q), q)) for q in self.scored_samples(key)))
        if self.cache:
            self._results[key] = result
        return result

    def score_additions(self, base: Sequence[Prompt], candidates: Sequence[Prompt],
                        approximate: bool = False) -> list[OracleResult]:
        """Scores of ``base + [c]`` for each candidate c (the inner loop of greedy selection).

        With the pair cache, the base's statistics are merged once per query
        and each candidate costs one merge and one finalisation. For a
        model-combining backend, all not-yet-memoised sets are predicted per
        query through ``backend.predict_sets`` (several sets per model call),
        with the results, memo and counters of :meth:`score`; otherwise each
        set is scored with :meth:`score`. ``approximate=True`` scores a
        model-combining backend through its output-level pair statistics
        instead (a cheap ranking for shortlists, memoised apart from exact scores).
        """
        if approximate:
            if not self.backend.has_pair_stats:
                raise ConfigError(f"backend {self.backend.name!r} has no output-level statistics to shortlist with")
            if self.uses_pair_cache:
                return self._additions_from_pairs(base, candidates, self._results)
            return self._additions_from_pairs(base, candidates, self._approx_results)
        if not self.uses_pair_cache:
            if self.backend.combines == "model":
                return self._additions_by_sets(base, candidates)
            return [self.score([*base, c]) for c in candidates]
        return self._additions_from_pairs(base, candidates, self._results)

    def _additions_by_sets(self, base: Sequence[Prompt], candidates: Sequence[Prompt]) -> list[OracleResult]:
        """``[self.score([*base, c]) for c in candidates]`` with one ``backend.predict_sets`` call per query.

        Every candidate set not yet memoised is predicted for a query in one
        call, so a backend can batch the rows of several sets; memo, counters
        (``forwards``: rows, ``len(set)`` per set and query), progress and
        results are those of calling :meth:`score` per set.
        """
        out: list[OracleResult | None] = [None] * len(candidates)
        todo: list[tuple[tuple[str, ...], list[Prompt], list[int]]] = []
        pending: dict[tuple[str, ...], list[int]] = {}
        for i, c in enumerate(candidates):
            prompts = [*base, c]
            key = _set_key(prompts)
            self._counters.calls += 1
            if self.cache and key in self._results:
                self._counters.memo_hits += 1
                out[i] = self._results[key]
            elif self.cache and key in pending:  # score() would find the first one's result memoised
                self._counters.memo_hits += 1
                pending[key].append(i)
            else:
                todo.append((key, sorted(prompts, key=lambda p: p.key), [i]))
                pending[key] = todo[-1][2]
        if todo:
            for key, _, _ in todo:
                self.scored_samples(key)  # a set that leaves nothing to score fails before any model work
            confusions: list[list[tuple[Sample, np.ndarray]]] = [[] for _ in todo]
            for q in self.samples:
                # cross-validated: a set is never run on one of its own prompts (and that costs no forward)
                live = [j for j, (key, _, _) in enumerate(todo) if not self.cross_validate or q.key not in key]
                if not live:
                    continue
                sets = [todo[j][1] for j in live]
                with torch.no_grad():
                    probs = self.backend.predict_sets(sets, q, self.num_classes)
                for j, p, ordered in zip(live, probs, sets):
                    confusions[j].append((q, self._confusion(p, q)))
                    self._counters.forwards += len(ordered)
                    if self.progress:
                        self.progress(len(ordered))
            for cms, (key, ordered, slots) in zip(confusions, todo):
                result = self._result([p.key.split("/")[-1] for p in ordered], cms)
                if self.cache:
                    self._results[key] = result
                for i in slots:
                    out[i] = result
        return out  # type: ignore[return-value]

    def _additions_from_pairs(self, base: Sequence[Prompt], candidates: Sequence[Prompt],
                              memo: dict[tuple[str, ...], OracleResult]) -> list[OracleResult]:
        base = sorted(base, key=lambda p: p.key)
        out: list[OracleResult | None] = [None] * len(candidates)
        todo = []
        for i, c in enumerate(candidates):
            key = _set_key([*base, c])
            self._counters.calls += 1
            if key in memo:
                self._counters.memo_hits += 1
                out[i] = memo[key]
            else:
                todo.append((i, c, key))
        if todo:
            for _, _, key in todo:
                self.scored_samples(key)  # a set that leaves nothing to score fails before any model work
            base_keys = {p.key for p in base}
            confusions: list[list[tuple[Sample, np.ndarray]]] = [[] for _ in todo]
            for q in self.samples:
                if self.cross_validate and q.key in base_keys:
                    continue  # every candidate set holds this image: none is scored on it
                merged = self.backend.reduce_stats([self.pair_stats(p, q) for p in base]) if base else None
                for cms, (_, c, _) in zip(confusions, todo):
                    if self.cross_validate and c.key == q.key:
                        continue
                    st = self.pair_stats(c, q)
                    st = st if merged is None else self.backend.merge_stats(merged, st)
                    cms.append((q, self._confusion(self.backend.finalize(st, q), q)))
            for cms, (i, c, key) in zip(confusions, todo):
                res = self._result([p.key.split("/")[-1] for p in [*base, c]], cms)
                if self.cache:
                    memo[key] = res
                out[i] = res
        return out  # type: ignore[return-value]

    def score_assignment(self, assignment: Mapping[str, Sequence[Prompt]]) -> OracleResult:
        """mIoU when every image has its own prompt set (retrieval-style prompting).

        ``assignment`` maps each of the oracle's images (its ``key``,
        ``category/id``, or its ``id``) to that image's prompts. Pair statistics
        come from the same cache as :meth:`score`, so a prompt already scored
        against an image is never recomputed. ``prompt_ids`` of the result is
        the union of the prompts used. Every image is scored (each has its own
        prompts); an image given itself as a prompt is a :class:`ConfigError`.
        """
        per_query: list[tuple[Sample, list[Prompt]]] = []
        for q in self.samples:
            prompts = assignment.get(q.key, assignment.get(q.id))
            if not prompts:
                raise ConfigError(f"no prompts assigned to image {q.key!r}")
            if any(p.key == q.key for p in prompts):
                raise ConfigError(f"image {q.key!r} is given itself as a prompt: it cannot be scored on its own label")
            per_query.append((q, sorted(prompts, key=lambda p: p.key or "")))
        key = ("@assignment",) + tuple(f"{q.key}<-{','.join(_set_key(ps))}" for q, ps in per_query)
        self._counters.calls += 1
        if self.cache and key in self._results:
            self._counters.memo_hits += 1
            return self._results[key]
        used = sorted({p.key.split("/")[-1] for _, ps in per_query for p in ps})
        result = self._result(used, ((q, self._confusion(self._predict_one(ps, q), q)) for q, ps in per_query))
        if self.cache:
            self._results[key] = result
        return result

    def score_contexts(self, contexts: Sequence[Context], chunk: int = 8,
                       exclude: Collection[str] = ()) -> OracleResult:
        """mIoU of tensor prompts that change between calls (context tuning): never memoised or pair-cached.

        ``exclude`` names (by key) the images the contexts were made from — a tuner's
        starting examples and training images; a cross-validated oracle leaves them
        out, as it leaves a set's prompts out (a holdout oracle holds none of them).
        Queries go to the backend ``chunk`` at a time, so a backend can prepare the
        contexts once per chunk; every query counts ``len(contexts)`` forwards.
        """
        if not contexts:
            raise ConfigError("cannot score an empty set of contexts")
        samples = self.scored_samples(exclude)
        self._counters.calls += 1
        confusions: list[tuple[Sample, np.ndarray]] = []
        with torch.no_grad():
            for start in range(0, len(samples), chunk):
                part = samples[start:start + chunk]
                for q, probs in zip(part, self.backend.predict(list(contexts), part, self.num_classes)):
                    confusions.append((q, self._confusion(probs, q)))
                self._counters.forwards += len(contexts) * len(part)
                if self.progress:
                    self.progress(len(contexts) * len(part))
        return self._result([f"context {i}" for i in range(len(contexts))], confusions)

    def predict(self, prompts: Sequence[Prompt]) -> list[torch.Tensor]:
        """The (C, H, W) probabilities behind :meth:`score`, one per scored image
        (:meth:`scored_samples`; uncached, for reports)."""
        ordered = sorted(prompts, key=lambda p: p.key or "")
        return [self._predict_one(ordered, q) for q in self.scored_samples([p.key for p in ordered])]

    def clear(self, pairs: bool = True) -> None:
        """Forget memoised set results and, unless ``pairs=False``, cached pair statistics (counters are kept)."""
        if pairs:
            self._pairs.clear()
        self._results.clear()
        self._approx_results.clear()
