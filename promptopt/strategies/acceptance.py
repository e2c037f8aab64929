"""Paired comparisons of prompt sets and the noise-aware rule that decides whether a gain is real.

Why it exists: a validation split of a few images is a noisy judge. Greedy
selection compares tens of candidates per step and keeps going on any positive
gain, so it ends up fitting the noise of those images. Everything here works on
the per-image confusion matrices an oracle result carries, so the same code
serves forward selection (which candidate, whether to keep a step, so how many
prompts), baselines (which set is best), retrieval (which k) and context tuning
(which checkpoint, when to stop).

Definitions (``A``, ``B``: oracle results of two prompt sets)

*Common images* ``I(A, B)``
    the images scored for both. With a holdout oracle these are all its images;
    with a cross-validated one, every labelled image in neither set.
*Paired gain* ``Δ(A, B)``
    mIoU of A minus mIoU of B, both dataset-level (Σ intersections / Σ unions,
    :func:`promptopt.metrics.miou_from_confusion`) over ``I(A, B)`` only. With a
    holdout oracle it is exactly ``A.miou - B.miou``. An undefined mIoU (no
    class present at all) counts as -1, below every defined one.
*Candidate ranking* (:func:`rank`)
    among candidate sets, each one's mean paired gain over every other
    candidate. When all were scored on the same images this orders them exactly
    as their mIoU does (the mIoU itself is returned then); in cross-validated
    mode no candidate gains from leaving its own — possibly hard — image out,
    because every pairwise comparison leaves out both.

The rule (:class:`AcceptanceRule`) keeps a new set over the reference only if
``Δ > 0``, ``Δ >= min_gain`` and ``Δ > noise``, where ``noise`` is

``none``
    0 (the plain rule: any positive gain counts);
``se``
    ``z`` standard errors of the per-image IoU differences over the common
    images (images whose IoU is undefined for either set are skipped;
    fewer than two images give no noise estimate, so nothing is accepted);
``bootstrap``
    how far the lower end of a one-sided paired-bootstrap interval of Δ lies
    below Δ: images of ``I(A, B)`` are resampled with replacement
    (``resamples`` times, generator seeded with ``seed``, so the answer is a
    function of the data alone) and the Φ(-z) quantile of the resampled Δ is
    taken (z = 1: the 15.9 % quantile). ``Δ > noise`` means that quantile is
    above zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from ..errors import ConfigError
from ..metrics import miou_from_confusion, summarize

RULES = ("none", "se", "bootstrap")
#: the rule that picks k in forward selection and retrieval unless told otherwise. Measured in
#: benchmarks/bench_selection.py (features backend, 21 categories x 3 split seeds): every noise-aware rule stopped
#: earlier and lost test mIoU there (cross-validated oracle: 0.741 with "none", 0.715 with "se", z = 1), because an
#: extra prompt whose gain looks like noise still helps on test more often than not. Context tuning, where a noisy
#: checkpoint choice can end below the start, defaults to "se" (ContextTuner).
DEFAULT_RULE = "none"
#: an undefined mIoU (NaN) compares as this: below every defined IoU
UNDEFINED = -1.0


class Scored(Protocol):
    """What the comparisons read from an oracle result."""

    miou: float
    per_image_iou: Mapping[str, float]


def confusions_of(result: Scored) -> Mapping[str, np.ndarray]:
    """Per-image confusion matrices of a result (empty for results that carry none)."""
    return getattr(result, "confusions", None) or {}


def _defined(x: float | np.ndarray) -> float | np.ndarray:
    return np.where(np.isnan(x), UNDEFINED, x) if isinstance(x, np.ndarray) else (UNDEFINED if math.isnan(x) else x)


@dataclass(frozen=True)
class Paired:
    """The paired comparison of two results on their common images."""

    gain: float
    images: tuple[str, ...]
    diffs: np.ndarray  # per-image IoU differences where both are defined

    @property
    def se(self) -> float:
        """Standard error of the mean per-image difference (inf below two images)."""
        n = len(self.diffs)
        return float(np.std(self.diffs, ddof=1) / math.sqrt(n)) if n >= 2 else math.inf


def compare(a: Scored, b: Scored) -> Paired:
    """``Δ(a, b)`` on the images both were scored on (see the module docstring)."""
    ca, cb = confusions_of(a), confusions_of(b)
    if not ca or not cb:  # results without per-image data (test doubles): only the headline numbers
        return Paired(float(_defined(a.miou) - _defined(b.miou)), (), np.zeros(0))
    common = tuple(i for i in ca if i in cb)
    if not common:
        raise ConfigError("the two prompt sets were scored on no common image; they cannot be compared")
    if len(common) == len(ca) == len(cb):
        gain = float(_defined(a.miou) - _defined(b.miou))
    else:
        gain = float(_defined(miou_from_confusion(sum(ca[i] for i in common)))
                     - _defined(miou_from_confusion(sum(cb[i] for i in common))))
    ia, ib = a.per_image_iou, b.per_image_iou
    diffs = np.array([ia[i] - ib[i] for i in common if not (math.isnan(ia[i]) or math.isnan(ib[i]))], dtype=float)
    return Paired(gain, common, diffs)


def same_images(results: Sequence[Scored]) -> bool:
    """Whether every result was scored on the same images (always true without per-image data)."""
    sets = [frozenset(confusions_of(r)) for r in results]
    return all(s == sets[0] for s in sets)


def rank(results: Sequence[Scored]) -> list[float]:
    """Ranking values of candidate results (higher is better; see "Candidate ranking" above).

    Their mIoU when all were scored on the same images, else each one's mean paired gain over
    the others, computed for all pairs at once from stacked confusion matrices.
    """
    results = list(results)
    if len(results) <= 1 or same_images(results):
        return [float(_defined(r.miou)) for r in results]
    ids = list(dict.fromkeys(i for r in results for i in confusions_of(r)))
    where = {i: j for j, i in enumerate(ids)}
    c = next(iter(confusions_of(results[0]).values())).shape[0]
    conf = np.zeros((len(results), len(ids), c, c), dtype=np.int64)
    seen = np.zeros((len(results), len(ids)), dtype=np.int64)
    for n, r in enumerate(results):
        for i, cm in confusions_of(r).items():
            conf[n, where[i]] = cm
            seen[n, where[i]] = 1
    # sums[a, b] = a's confusions summed over the images scored for both a and b
    sums = np.einsum("bx,axij->abij", seen, conf)
    score = _defined(miou_from_confusion(sums))
    gain = score - score.T
    n = len(results)
    return [float(v) for v in gain.sum(1) / (n - 1)]


def best_index(results: Sequence[Scored]) -> int:
    """Index of the best result by :func:`rank` (ties: the first)."""
    values = rank(results)
    return int(np.argmax(values))


def better(new: Scored, best: Scored | None) -> bool:
    """Whether ``new`` beats ``best`` by a positive paired gain (any result beats None)."""
    return best is None or compare(new, best).gain > 0


@dataclass(frozen=True)
class Judgement:
    """A rule's verdict on one step: the paired gain, the noise it had to beat, and the answer."""

    gain: float
    noise: float
    images: int
    accepted: bool

    def to_dict(self) -> dict[str, Any]:
        return {"gain": self.gain, "noise": None if math.isinf(self.noise) else self.noise,
                "images": self.images, "accepted": self.accepted}


@dataclass(frozen=True)
class AcceptanceRule:
    """Keep a step only if its paired gain beats ``min_gain`` and the per-image paired noise.

    ``kind``: "none", "se" or "bootstrap" (see the module docstring); ``z``: standard errors
    (se) or the normal quantile of the one-sided bootstrap level Φ(-z); ``resamples`` and
    ``seed``: the bootstrap's.
    """

    kind: str = DEFAULT_RULE
    z: float = 1.0
    min_gain: float = 0.0
    resamples: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in RULES:
            raise ConfigError(f"rule must be one of {', '.join(RULES)}, got {self.kind!r}")
        if not (self.z >= 0 and math.isfinite(self.z)):
            raise ConfigError(f"noise_z must be a finite number >= 0, got {self.z}")
        if self.resamples < 100:
            raise ConfigError(f"the bootstrap needs at least 100 resamples, got {self.resamples}")

    def describe(self) -> dict[str, Any]:
        """What identifies the rule in a run's spec and a strategy's fingerprint."""
        out: dict[str, Any] = {"rule": self.kind, "min_gain": self.min_gain}
        if self.kind != "none":
            out["noise_z"] = self.z
        if self.kind == "bootstrap":
            out.update(resamples=self.resamples, seed=self.seed)
        return out

    def noise(self, new: Scored, ref: Scored, paired: Paired) -> float:
        """The margin ``paired.gain`` must exceed."""
        if self.kind == "none":
            return 0.0
        if self.kind == "se":
            return self.z * paired.se
        return self._bootstrap_margin(new, ref, paired)

    def _bootstrap_margin(self, new: Scored, ref: Scored, paired: Paired) -> float:
        ca, cb = confusions_of(new), confusions_of(ref)
        if len(paired.images) < 2:
            return math.inf
        a = np.stack([ca[i] for i in paired.images]).reshape(len(paired.images), -1).astype(np.float64)
        b = np.stack([cb[i] for i in paired.images]).reshape(len(paired.images), -1).astype(np.float64)
        n, c = len(paired.images), ca[paired.images[0]].shape[0]
        counts = np.random.default_rng(self.seed).multinomial(n, np.full(n, 1.0 / n), size=self.resamples)
        da = miou_from_confusion((counts @ a).reshape(-1, c, c))
        db = miou_from_confusion((counts @ b).reshape(-1, c, c))
        delta = _defined(da) - _defined(db)
        low = float(np.quantile(delta, 0.5 * math.erfc(self.z / math.sqrt(2))))
        return paired.gain - low

    def judge(self, new: Scored, ref: Scored) -> Judgement:
        """Whether ``new`` is kept over ``ref``: paired gain > 0, >= min_gain and > the noise."""
        paired = compare(new, ref)
        noise = self.noise(new, ref, paired)
        accepted = paired.gain > 0 and paired.gain >= self.min_gain and paired.gain > noise
        return Judgement(paired.gain, noise, len(paired.images), bool(accepted))


def make_rule(rule: str | AcceptanceRule, noise_z: float = 1.0, min_gain: float = 0.0) -> AcceptanceRule:
    """A rule from a strategy's options (an :class:`AcceptanceRule` passes through)."""
    if isinstance(rule, AcceptanceRule):
        return rule
    return AcceptanceRule(kind=str(rule), z=float(noise_z), min_gain=float(min_gain))


@dataclass
class StoredResult:
    """A result rebuilt from its per-image confusion matrices (what a strategy's checkpoint keeps)."""

    miou: float
    per_image_iou: dict[str, float]
    confusions: dict[str, np.ndarray]

    @classmethod
    def from_confusions(cls, confusions: Mapping[str, Any], miou: float | None = None) -> "StoredResult":
        cms = {i: np.asarray(cm, dtype=np.int64) for i, cm in confusions.items()}
        total = sum(cms.values()) if cms else None
        score = float(miou) if miou is not None else (float(miou_from_confusion(total)) if total is not None
                                                        else float("nan"))
        return cls(score, {i: float(summarize(cm)["miou"]) for i, cm in cms.items()}, cms)


def confusions_to_json(result: Scored) -> dict[str, list[list[int]]]:
    """Per-image confusions as plain lists (for a checkpoint's JSON)."""
    return {i: np.asarray(cm).tolist() for i, cm in confusions_of(result).items()}


__all__ = ["DEFAULT_RULE", "AcceptanceRule", "Judgement", "Paired", "RULES", "StoredResult", "best_index", "better", "compare",
           "confusions_to_json", "make_rule", "rank", "same_images"]
