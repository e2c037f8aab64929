"""Text-prompt selection: the best phrase per class among the user's candidates, scored by the oracle.

Why it exists: a text-prompted segmenter (CLIPSeg, Grounded SAM) is only as
good as its phrase — the blog's example: "car lamp" finds cars, "headlight"
finds the lamp. Which phrase works on *these* images is an empirical question,
so it is answered like every other prompt choice in promptopt: each candidate
becomes a :class:`~promptopt.backends.base.TextPrompt` scored on the validation
images by the oracle (``oracle.score([TextPrompt(...)])``), and the best wins.
The strategy never knows which backend reads the phrase; a backend that takes
no text prompts is refused when the strategy is built, in one line.

Candidates (``candidates=``, the CLI's repeatable ``--text``)
    Binary task: ``["umbrella", "parasol", "rain umbrella"]``. Semantic task:
    each candidate names its class, ``["1:car lamp", "1:headlight", "2:wheel"]``
    (or a mapping ``{1: [...], 2: [...]}``); a binary candidate may carry
    ``1:`` too. Phrases are stripped; a phrase given twice for a class counts
    once. Every class needs at least one candidate. Without candidates, the
    category's own name is the only one (see :func:`category_phrases`).

Which combinations are scored
    A text prompt is one phrase per class. When the number of combinations
    (the product of the per-class candidate counts) is at most
    ``max_combinations``, every combination is scored: the best on val, exactly
    (binary tasks always are). Beyond it, coordinate ascent: start from the
    first candidates, then for each class in turn score its candidates with
    the other classes fixed and keep the best; passes repeat until one changes
    nothing. Ties go to the combination scored first, i.e. the user's order.
    Classes interact (Grounding DINO reads all phrases in one caption; the
    per-pixel argmax compares classes), which is why combinations, not
    per-class winners, are scored.

A fixed choice (``text=``)
    Scores that one combination and nothing else: the knob an Optuna search
    sets. The class declares it as ``Choice("text", (CANDIDATES,))`` — "the
    candidates the user gave", which only exist at run time;
    :meth:`TextPromptSelector.resolve_search_space` turns that declaration into
    ``Choice("text", <every combination>)`` given the strategy's options. A
    search that calls it (and passes the same options to the strategy) searches
    over candidates; the backends declare their thresholds themselves. A
    search that does not resolve it passes :data:`CANDIDATES` itself, which
    means "no fixed choice": each trial picks among the candidates (the
    category name when it was given none) at the thresholds the trial chose.

Baselines (:meth:`TextPromptSelector.extra_scores`)
    ``first candidate`` (the user's first guess per class, what one would use
    without a search) and ``category name`` (binary: the category; COCO
    semantic tasks ``"cat,dog"``: one name per class), scored on any oracle.
    A backend that rejects the category name (Grounding DINO refuses a "." in
    a phrase) drops that baseline; the summary says why.

Memory: every prediction uses one text prompt, so ``memory_for(1)`` must fit
the budget. Resume: each scored combination is checkpointed; a resumed fit
walks the same deterministic order, reading finished scores back.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..artifacts import fingerprint
from ..backends.base import TextPrompt, check_prompts
from ..data import Sample
from ..errors import ConfigError
from ..oracle import OracleResult, ValidationOracle
from ..space import Choice, SearchSpace
from .base import PromptStrategy, comparable

#: the declared choices of the ``text`` knob: the candidates a user gives (resolved by
#: :meth:`TextPromptSelector.resolve_search_space`, since they only exist at run time)
CANDIDATES = "<candidates>"

_CLASS_PREFIX = re.compile(r"^\s*(\d+)\s*:(.*)$", re.DOTALL)

Candidates = dict[int, tuple[str, ...]]


def parse_candidates(candidates: Sequence[str] | Mapping[Any, Sequence[str]] | str, num_classes: int) -> Candidates:
    """Per foreground class (1..K), its candidate phrases in the order given (stripped, without repeats).

    ``candidates`` is a list of ``"phrase"`` / ``"c:phrase"`` strings (a bare
    phrase is class 1 of a binary task) or a mapping class → phrases. Every
    problem is a one-line :class:`ConfigError` naming the candidate.
    """
    k = num_classes - 1
    pairs: list[tuple[int, str, str]] = []  # (class, phrase, as given)
    if isinstance(candidates, str):
        candidates = [candidates]
    if isinstance(candidates, Mapping):
        for c, phrases in candidates.items():
            if isinstance(phrases, str):
                phrases = [phrases]
            if not isinstance(phrases, (list, tuple)):
                raise ConfigError(f"text: candidates of class {c!r} must be a list of phrases, got {phrases!r}")
            try:
                cls = int(c)
            except (TypeError, ValueError):
                raise ConfigError(f"text: class {c!r} of the candidates is not a class id (1..{k})") from None
            pairs += [(cls, p, f"{cls}:{p}") for p in phrases]
    else:
        for given in candidates:
            if not isinstance(given, str):
                raise ConfigError(f"text: candidate {given!r} is {type(given).__name__}, not a string")
            m = _CLASS_PREFIX.match(given)
            if m:
                pairs.append((int(m.group(1)), m.group(2), given))
            elif k == 1:
                pairs.append((1, given, given))
            else:
                raise ConfigError(f"text: candidate {given!r} names no class; this task has {k} foreground classes: "
                                  f"write --text 'C:{given.strip()}' with C in 1..{k}")
    out: dict[int, list[str]] = {}
    for cls, phrase, given in pairs:
        if not isinstance(phrase, str):
            raise ConfigError(f"text: candidate {phrase!r} is {type(phrase).__name__}, not a string")
        if not 1 <= cls <= k:
            raise ConfigError(f"text: candidate {given!r} names class {cls}; this task has "
                              f"{'class 1 only' if k == 1 else f'classes 1..{k}'} (background 0 takes no phrase)")
        phrase = phrase.strip()
        if not phrase:
            raise ConfigError(f"text: candidate {given!r} is empty or whitespace; give each --text a word or phrase")
        if phrase not in out.setdefault(cls, []):
            out[cls].append(phrase)
    missing = [c for c in range(1, k + 1) if c not in out]
    if missing:
        raise ConfigError(f"text: no candidate for class{'es' if len(missing) > 1 else ''} "
                          f"{', '.join(map(str, missing))}; add --text '{missing[0]}:PHRASE' for each")
    return {c: tuple(out[c]) for c in range(1, k + 1)}


def category_phrases(category: str, num_classes: int) -> tuple[str, ...] | None:
    """The category's name as one phrase per class, or None when it does not name them.

    Binary: the category with "_" and "-" read as spaces ("car-roundabout" →
    "car roundabout"). Semantic: a category key of K comma-separated names (how
    COCO tasks such as ``--category cat,dog`` are named), one per class.
    """
    names = [category] if num_classes == 2 else category.split(",")
    names = [" ".join(n.replace("_", " ").replace("-", " ").split()) for n in names]
    if len(names) != num_classes - 1 or not all(names):
        return None
    return tuple(names)


def encode_choice(texts: Sequence[str]) -> str:
    """A combination as one categorical value: the phrase (binary), else the JSON list of phrases."""
    return texts[0] if len(texts) == 1 else json.dumps(list(texts), ensure_ascii=False)


def decode_choice(value: str | Sequence[str], num_classes: int) -> tuple[str, ...]:
    """Inverse of :func:`encode_choice` (a list or tuple of phrases is taken as it is)."""
    if isinstance(value, str) and num_classes > 2:
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ConfigError(f"text: choice {value!r} of a {num_classes - 1}-class task must be a JSON list of "
                              "phrases, one per class") from None
    texts = (value,) if isinstance(value, str) else tuple(value)
    if len(texts) != num_classes - 1 or not all(isinstance(t, str) for t in texts):
        raise ConfigError(f"text: choice {value!r} must give {num_classes - 1} phrase(s), one per foreground class")
    return tuple(t.strip() for t in texts)


class TextPromptSelector(PromptStrategy):
    """The best text prompt (one phrase per class) among the user's candidates (see the module docstring).

    Parameters
    ----------
    candidates:
        Phrases to try: ``["umbrella", "parasol"]``, or ``["1:car lamp", "2:wheel"]`` for semantic tasks
        (or a mapping class → phrases); default: the category's name.
    text:
        Score only this combination (a search's choice; see :meth:`resolve_search_space`).
    max_combinations:
        Score every combination up to this many; beyond, coordinate ascent.

    Attributes after ``fit``: ``prompt_`` (the chosen :class:`TextPrompt`), ``texts_`` (its phrases),
    ``score_`` (its val mIoU), ``history_`` (every combination scored, in order, with its val mIoU),
    ``n_evaluations_``, ``search_`` ("exhaustive", "coordinate" or "fixed"), ``baseline_prompts_``
    (name → prompt, scored by :meth:`extra_scores`), ``skipped_baselines_`` (name → why),
    ``selected_`` (empty: a text prompt uses no pool example).
    """

    name = "text"
    artifact_kind = "text"
    #: image-prompt baselines do not apply; the text baselines are in :meth:`extra_scores`
    baselines = ()
    search_space = (Choice("text", (CANDIDATES,)),)

    def __init__(self, oracle: ValidationOracle, *,
                 candidates: Sequence[str] | Mapping[Any, Sequence[str]] | str | None = None,
                 text: str | Sequence[str] | None = None, max_combinations: int = 64, **common: Any) -> None:
        super().__init__(oracle, **common)
        c = oracle.num_classes
        if isinstance(max_combinations, bool) or not isinstance(max_combinations, int) or max_combinations < 1:
            raise ConfigError(f"text: max_combinations must be an integer >= 1, got {max_combinations!r}")
        self.max_combinations = max_combinations
        self.category = _common_category(oracle.samples)
        named = category_phrases(self.category, c) if self.category is not None else None
        if candidates is None or (not isinstance(candidates, (str, Mapping)) and not list(candidates)):
            if named is None:
                raise ConfigError(f"text: give candidate phrases (--text), one or more per class 1..{c - 1}; "
                                  f"the category {self.category!r} does not name the classes")
            candidates = {i: [t] for i, t in enumerate(named, start=1)}
        self.candidates = parse_candidates(candidates, c)
        self.text = None
        if text is not None and text != CANDIDATES:  # the unresolved declaration: choose among the candidates here
            self.text = decode_choice(text, c)
            if any(t not in self.candidates[i] for i, t in enumerate(self.text, start=1)):
                shown = {i: list(p) for i, p in self.candidates.items()}
                raise ConfigError(f"text: choice {list(self.text)!r} is not one of the candidates {shown}")
        first = tuple(p[0] for p in self.candidates.values())
        check_prompts(oracle.backend, [TextPrompt(first)])  # an image-only backend fails here, before any work
        self.baseline_prompts_: dict[str, TextPrompt] = {"first candidate": TextPrompt(first)}
        if named is not None:
            self.baseline_prompts_["category name"] = TextPrompt(named)

    # --- the search's view ---------------------------------------------------------------------------
    @classmethod
    def resolve_search_space(cls, options: Mapping[str, Any], num_classes: int) -> SearchSpace:
        """The declared space with the user's candidates in place of :data:`CANDIDATES`.

        ``options`` are the strategy options the user fixed (``candidates``,
        ``max_combinations``); the result is ``(Choice("text", combos),)``
        with every combination in :func:`encode_choice` form, first
        candidates first. More than ``max_combinations`` combinations is a
        ConfigError: a categorical that large is no search.
        """
        candidates = _candidates_for(options, num_classes)
        limit = int(options.get("max_combinations") or 64)
        n = _count(candidates)
        if n > limit:
            raise ConfigError(f"text: {n} combinations of candidates exceed max_combinations={limit} for a "
                              "search; search thresholds only (the strategy picks the text itself), or give fewer")
        return (Choice("text", tuple(encode_choice(t) for t in _combinations(candidates))),)

    # --- fitting ----------------------------------------------------------------------------------------
    def _fingerprint(self) -> str:
        return fingerprint({
            "strategy": self.name, "candidates": {str(k): list(v) for k, v in self.candidates.items()},
            "text": list(self.text) if self.text else None, "max_combinations": self.max_combinations,
            "val": [s.key for s in self.oracle.samples], "num_classes": self.oracle.num_classes,
            "backend": self.oracle.backend.config()})

    def fit(self, pool: Sequence[Sample] = ()) -> "TextPromptSelector":
        """Score the candidate combinations on the oracle's images and keep the best.

        ``pool`` is accepted for the common interface and not used: a text prompt needs no example.
        """
        self.require_fit(1, "one text prompt")
        fp = self._fingerprint()
        saved = self.checkpoint.load(fp) if self.checkpoint else None
        stored: dict[str, float | None] = dict(saved[0]["scores"]) if saved else {}
        history: list[dict[str, Any]] = []
        seen: dict[tuple[str, ...], float | None] = {}
        exhaustive = _count(self.candidates) <= self.max_combinations
        planned = 1 if self.text else (_count(self.candidates) if exhaustive
                                       else sum(len(v) for v in self.candidates.values()))

        def score(texts: tuple[str, ...]) -> float | None:
            if texts in seen:
                return seen[texts]
            key = TextPrompt(texts).key
            if key not in stored:
                miou = self.oracle.score([TextPrompt(texts)]).miou
                stored[key] = None if miou is None or math.isnan(miou) else float(miou)
                if self.checkpoint:
                    self.checkpoint.save(fp, {"scores": stored})
            seen[texts] = stored[key]
            history.append({"texts": list(texts), "val_miou": stored[key]})
            best = max((h["val_miou"] for h in history), key=comparable)
            self._report_step(len(history), best)
            self._tick("text prompts", len(history), max(planned, len(history)))
            return stored[key]

        self._tick("text prompts", 0, planned)
        if self.text:
            self.search_ = "fixed"
            score(self.text)
        elif exhaustive:
            self.search_ = "exhaustive"
            for texts in _combinations(self.candidates):
                score(texts)
        else:
            self.search_ = "coordinate"
            self._coordinate_ascent(score)
        best = max(history, key=lambda h: comparable(h["val_miou"]))  # the first of equals: the user's order
        self.texts_ = tuple(best["texts"])
        self.prompt_ = TextPrompt(self.texts_)
        self.score_ = float("nan") if best["val_miou"] is None else float(best["val_miou"])
        self.history_ = history
        self.n_evaluations_ = len(history)
        self.selected_: list[Sample] = []
        self.memory_bytes_ = self.memory_for(1)
        self._check_baselines()
        return self

    def _coordinate_ascent(self, score: Any) -> None:
        """From the first candidates, per class in turn keep the best phrase (the others fixed), until a pass
        changes nothing."""
        current = [v[0] for v in self.candidates.values()]
        best = score(tuple(current))
        changed = True
        while changed:
            changed = False
            for i, phrases in enumerate(self.candidates.values()):
                for phrase in phrases:
                    trial = tuple(current[:i] + [phrase] + current[i + 1:])
                    s = score(trial)
                    if comparable(s) > comparable(best):
                        current, best, changed = list(trial), s, True

    def _check_baselines(self) -> None:
        """Drop a baseline the backend refuses (e.g. a '.' in a Grounding DINO phrase), saying why."""
        self.skipped_baselines_: dict[str, str] = {}
        for name, prompt in list(self.baseline_prompts_.items()):
            try:
                self.oracle.score([prompt])
            except ConfigError as exc:
                self.skipped_baselines_[name] = str(exc).splitlines()[0]
                del self.baseline_prompts_[name]

    # --- what the fitted strategy offers ------------------------------------------------------------
    @property
    def selected_ids_(self) -> list[str]:
        """The chosen prompt's key (``text:["phrase", ...]``), as the oracle names it."""
        return [self.prompt_.key]

    def evaluate(self, oracle: ValidationOracle) -> OracleResult:
        return oracle.score([self.prompt_])

    def prompts_for(self, queries: Sequence[Sample]) -> list[list[Any]]:
        return [[self.prompt_] for _ in queries]

    def extra_scores(self, oracle: ValidationOracle) -> dict[str, float]:
        """mIoU of the text baselines (first candidate, category name) on an oracle's images."""
        return {name: oracle.score([p]).miou for name, p in self.baseline_prompts_.items()}

    def artifact_extra(self, folder: str | Path) -> dict[str, Any]:
        """``texts`` (what ``promptopt predict`` reads) and the candidates they were chosen from."""
        return {"texts": list(self.texts_), "candidates": {str(k): list(v) for k, v in self.candidates.items()}}

    def figures(self, folder: Path) -> list[tuple[str, str]]:
        """A bar per text prompt tried (the 20 best), by val mIoU, the chosen one on top and darker."""
        import matplotlib.pyplot as plt

        from ..plots import save_figure

        ranked = sorted(self.history_, key=lambda h: -comparable(h["val_miou"]))[:20]
        scores = [h["val_miou"] if h["val_miou"] is not None else float("nan") for h in ranked]
        names = [" | ".join(h["texts"]) for h in ranked]
        fig, ax = plt.subplots(figsize=(6, 0.8 + 0.3 * len(ranked)))
        colours = ["#1f77b4" if tuple(h["texts"]) == self.texts_ else "#aec7e8" for h in ranked]
        ax.barh(range(len(ranked)), scores, color=colours)
        ax.set_yticks(range(len(ranked)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("val mIoU")
        ax.set_xlim(0, 1)
        ax.set_title(f"Text prompts tried: {len(self.history_)} ({self.search_})", fontsize=9)
        path = save_figure(fig, folder / "text_candidates.png")
        return [("Val mIoU of each text prompt tried (best first; the chosen one is dark)", path.name)]

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "texts": list(self.texts_), "search": self.search_,
                "candidates": {str(k): list(v) for k, v in self.candidates.items()},
                "baselines": {n: list(p.texts) for n, p in self.baseline_prompts_.items()},
                "skipped_baselines": self.skipped_baselines_}


def _common_category(samples: Sequence[Sample]) -> str | None:
    cats = {s.category for s in samples}
    return cats.pop() if len(cats) == 1 else None


def _candidates_for(options: Mapping[str, Any], num_classes: int) -> Candidates:
    given = options.get("candidates")
    if not given:
        raise ConfigError("text: a search over text prompts needs the candidates (--text)")
    return parse_candidates(given, num_classes)


def _count(candidates: Candidates) -> int:
    """How many combinations the candidates make (counted, not listed: it can be huge)."""
    return math.prod(len(v) for v in candidates.values())


def _combinations(candidates: Candidates) -> list[tuple[str, ...]]:
    """Every phrase combination, the first class varying slowest (the first candidates first)."""
    return list(itertools.product(*candidates.values()))


__all__ = ["CANDIDATES", "TextPromptSelector", "category_phrases", "decode_choice", "encode_choice",
           "parse_candidates"]
