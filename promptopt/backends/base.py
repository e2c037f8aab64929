"""The in-context segmenter protocol and the registry that finds backends by name.

A backend turns (prompts, queries) into per-query class-probability maps. It is
shaped like segment-anything's predictor: :meth:`Backend.prepare` computes the
expensive per-image state once (features, embeddings) and keeps it;
:meth:`Backend.predict` is then cheap and called many times with different
prompt sets. A backend never knows which strategy calls it.

How several prompts combine is declared by ``combines``:

``"output"``
    Each (prompt, query) pair yields *sufficient statistics* that do not depend
    on the other prompts, and the prediction for a prompt set is a fixed,
    associative merge of those statistics followed by a finalisation. Averaged
    probabilities are one such statistic (sum of probabilities, count); the
    weight-free ``features`` backend's softmax-kernel head is another
    (per-pixel log-max and rescaled numerators, merged exactly with a
    log-sum-exp). The oracle caches each pair's statistics, so no pair is ever
    computed twice, and a greedy step over N candidates is arithmetic only.

``"model"``
    Prompts interact inside the network (SegGPT's feature ensemble); only the
    whole set can be evaluated. A backend of this kind may still implement the
    pair-statistics methods, which strategies use as a cheap approximation
    (shortlisting), never as the score.

Everything is torch tensors, so a backend can be differentiable with respect
to the prompt image and mask (context tuning uses :class:`Context` prompts
whose tensors require grad).

Prompt kinds
    An *image* prompt is a labelled :class:`~promptopt.data.Sample` or a
    :class:`Context`; a *text* prompt is a :class:`TextPrompt` (one phrase per
    foreground class). A backend declares the kinds it takes in
    ``prompt_types``; every subclass's ``predict`` and ``pair_stats`` first run
    :func:`check_prompts`, so a text prompt given to an image-only backend (or
    the reverse) fails with one line naming both, whichever backend it is.
"""

from __future__ import annotations

import functools
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal, Mapping, Sequence, Union

import numpy as np
import torch

from ..data import IGNORE_INDEX, Sample, check_labels
from ..errors import ConfigError
from ..registry import load_entry
from ..space import SearchSpace

Stats = dict[str, torch.Tensor]


@dataclass
class Context:
    """A prompt given as tensors rather than as a labelled file.

    ``image`` is (3, H, W) float RGB in [0, 1]; ``mask`` is (C, H, W) float class
    probabilities (a labelled mask is its one-hot encoding; ignored pixels are
    all-zero columns). Either may require grad. ``key`` identifies the context
    for caches; leave it None for tensors that change (tuning).
    """

    image: torch.Tensor
    mask: torch.Tensor
    key: str | None = None

    @property
    def num_classes(self) -> int:
        return int(self.mask.shape[0])

    @classmethod
    def from_sample(cls, sample: Sample, num_classes: int, device: torch.device | str = "cpu") -> "Context":
        """One-hot context from a labelled sample (the ids must be < num_classes)."""
        check_labels(sample.mask, num_classes, f"prompt {sample.key}")
        image = torch.from_numpy(sample.image).to(device).permute(2, 0, 1).float().div_(255.0)
        return cls(image=image, mask=one_hot_mask(sample.mask, num_classes, device), key=sample.key)


@dataclass(frozen=True)
class TextPrompt:
    """A text prompt: one phrase per foreground class (``texts[c-1]`` names class c).

    A single string is one phrase (a binary task). Phrases are checked when the
    prompt is made: an empty or whitespace-only phrase is a :class:`ConfigError`.
    """

    texts: tuple[str, ...]

    def __post_init__(self) -> None:
        texts = (self.texts,) if isinstance(self.texts, str) else tuple(self.texts)
        if not texts:
            raise ConfigError("a text prompt needs at least one phrase (one per foreground class)")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ConfigError(f"text prompt phrase {i + 1} is {type(t).__name__} {t!r}, not a string")
            if not t.strip():
                raise ConfigError(f"text prompt phrase {i + 1} of {list(texts)!r} is empty or whitespace; "
                                  "give each foreground class a word or phrase")
        object.__setattr__(self, "texts", texts)

    @property
    def key(self) -> str:
        """Stable identity for caches: ``text:`` + the JSON list of phrases.

        "/" is written as its JSON escape so that the key has no "/": callers
        show ``key.split("/")[-1]`` as a prompt's short id.
        """
        return "text:" + json.dumps(list(self.texts), ensure_ascii=False).replace("/", "\\u002f")

    @property
    def num_classes(self) -> int:
        """Classes the prompt names, background included."""
        return len(self.texts) + 1


Prompt = Union[Sample, Context, TextPrompt]


def one_hot_mask(mask: np.ndarray | torch.Tensor, num_classes: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(H, W) class ids → (C, H, W) float one-hot; ignore (255) pixels become all-zero columns."""
    m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask, device=device).long()
    valid = m != IGNORE_INDEX
    out = torch.zeros((num_classes, *m.shape), dtype=torch.float32, device=device)
    out.scatter_(0, torch.where(valid, m, 0).unsqueeze(0), 1.0)
    return out * valid.unsqueeze(0)


def prompt_key(prompt: Prompt) -> str | None:
    return prompt.key


def prompt_kind(prompt: Prompt) -> str:
    """"text" for a :class:`TextPrompt`, "image" for a labelled sample or a :class:`Context`."""
    return "text" if isinstance(prompt, TextPrompt) else "image"


def check_prompts(backend: "Backend", prompts: Sequence[Prompt]) -> None:
    """Raise a one-line :class:`ConfigError` if a prompt is of a kind ``backend`` does not take."""
    accepted = backend.prompt_types
    for p in prompts:
        kind = prompt_kind(p)
        if kind not in accepted:
            what = " or ".join(sorted(accepted))
            shown = p.key if p.key is not None else "a context tensor"
            raise ConfigError(f"backend {backend.name!r} takes {what} prompts, not {kind} prompts "
                              f"(got {shown}); choose a backend that takes {kind} prompts")


def infer_num_classes(prompts: Sequence[Prompt]) -> int:
    """Classes implied by a prompt set: the largest label seen + 1 (phrases + 1 for text), at least 2."""
    top = 1
    for p in prompts:
        if isinstance(p, (Context, TextPrompt)):
            top = max(top, p.num_classes - 1)
        else:
            m = p.mask
            valid = m[m != IGNORE_INDEX]
            if valid.size:
                top = max(top, int(valid.max()))
    return top + 1


class Backend(ABC):
    """An in-context segmenter. Subclasses set ``name`` and implement the abstract methods."""

    name: ClassVar[str] = "backend"
    #: "output" (pairs are independent, cacheable) or "model" (prompts interact in the network)
    combines: Literal["output", "model"] = "output"
    #: whether :meth:`tuning_loss` is differentiable in :class:`Context` prompts (context tuning applies)
    differentiable: ClassVar[bool] = False
    #: options a search may tune (turned into ``trial.suggest_*`` calls by :mod:`promptopt.search`)
    search_space: ClassVar[SearchSpace] = ()
    #: where the backend computes (its model and tensors live here)
    device: torch.device = torch.device("cpu")

    def modules(self) -> list[torch.nn.Module]:
        """The torch modules holding the backend's weights (frozen during context tuning); none by default."""
        return []

    #: prompt kinds this backend takes: "image" (samples, contexts) and/or "text" (:class:`TextPrompt`)
    prompt_types: ClassVar[frozenset[str]] = frozenset({"image"})

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # every backend's entry points check the prompt kinds first (see "Prompt kinds" in the module docstring)
        super().__init_subclass__(**kwargs)
        for attr in ("predict", "pair_stats"):
            fn = cls.__dict__.get(attr)
            if fn is not None and not getattr(fn, "_checks_prompts", False):
                setattr(cls, attr, _checking_prompts(fn, attr == "pair_stats"))

    @abstractmethod
    def prepare(self, samples: Sequence[Sample]) -> None:
        """Compute and cache per-image state for these samples (idempotent)."""

    @abstractmethod
    def predict(self, prompts: Sequence[Prompt], queries: Sequence[Sample], num_classes: int | None = None) -> list[torch.Tensor]:
        """Per query, a (C, H, W) float tensor of class probabilities at the query's resolution."""

    def predict_sets(self, prompt_sets: Sequence[Sequence[Prompt]], query: Sample,
                     num_classes: int | None = None) -> list[torch.Tensor]:
        """One query under several prompt sets: ``predict(ps, [query], num_classes)[0]`` for each set ``ps``.

        The default is exactly that loop. A model-combining backend overrides it
        to put the rows of several sets into one model call (SegGPT's grouped
        feature ensemble); the answers must stay those of the loop.
        """
        return [self.predict(ps, [query], num_classes)[0] for ps in prompt_sets]

    @abstractmethod
    def memory_bytes(self, num_prompts: int, image_size: tuple[int, int] | None = None, num_classes: int = 2) -> int:
        """Estimated peak device memory (bytes) of one prediction with ``num_prompts`` prompts of a task with
        ``num_classes`` classes on an image of ``image_size`` (H, W): a function of its arguments only, never of
        what the backend happens to have cached (a resumed run must decide as an uninterrupted one did)."""

    @property
    def memory_kind(self) -> str:
        """How :meth:`memory_bytes` is obtained: "analytic estimate" unless a backend profiles ("profiled")."""
        return "analytic estimate"

    def config(self) -> dict[str, Any]:
        """JSON-able description from which :func:`create_backend` rebuilds this backend."""
        return {"name": self.name, "checkpoint": None, "options": {}}

    def learned_state(self, prompt_keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tensors this backend learned for these prompts (e.g. PerSAM-F's mixing weights), by name.

        Learned state is not configuration: :meth:`config` stays fixed while
        predicting, and an artifact saves these tensors (safetensors) beside
        ``prompt.json`` for the prompts it keeps. Names are plain strings.
        Most backends learn nothing: ``{}``.
        """
        return {}

    def load_learned_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Take tensors returned by :meth:`learned_state` (of a backend with the same config)."""
        if tensors:
            names = ", ".join(sorted(tensors)[:3]) + (", …" if len(tensors) > 3 else "")
            raise ConfigError(f"backend {self.name!r} learns no state, but learned tensors were given: {names}")

    def to_context(self, prompt: Prompt, num_classes: int) -> Context:
        """The prompt as tensors on this backend's device (the starting point of context tuning)."""
        if isinstance(prompt, TextPrompt):
            raise ConfigError(f"context tuning learns an image prompt; {prompt.key} is a text prompt")
        if isinstance(prompt, Context):
            return prompt
        return Context.from_sample(prompt, num_classes, self.device)

    def tuning_memory_bytes(self, num_contexts: int, image_size: tuple[int, int], batch_size: int,
                            num_classes: int = 2) -> int:
        """Estimated peak of one context-tuning step (``tuning_loss`` on ``batch_size`` images + backward).

        The default keeps one prediction per training image alive for the backward pass;
        backends whose activations dominate differently override it.
        """
        return int(batch_size * self.memory_bytes(num_contexts, image_size, num_classes))

    def tuning_loss(self, prompts: Sequence[Context], queries: Sequence[Sample], num_classes: int) -> torch.Tensor:
        """Differentiable loss of a (learnable) context on labelled queries, for context tuning.

        The default is the mean over queries of pixel cross-entropy plus soft
        Dice on the predicted probabilities (ignore pixels excluded). Backends
        with a loss of their own (SegGPT's smooth-L1 on masked patches)
        override this.
        """
        losses = []
        probs = self.predict(list(prompts), list(queries), num_classes)
        for p, q in zip(probs, queries):
            target = torch.as_tensor(q.mask, device=p.device).long()
            valid = target != IGNORE_INDEX
            onehot = one_hot_mask(q.mask, num_classes, p.device)
            logp = torch.log(p.clamp_min(1e-6))
            ce = -(logp * onehot).sum(0)[valid].mean() if valid.any() else p.sum() * 0
            v = valid.unsqueeze(0).float()
            inter = (p * onehot * v).sum((1, 2))
            denom = (p * v).sum((1, 2)) + (onehot * v).sum((1, 2))
            dice = 1 - ((2 * inter + 1) / (denom + 1)).mean()
            losses.append(ce + dice)
        return torch.stack(losses).mean()

    # --- optional: output-level combination --------------------------------------------------
    @property
    def has_pair_stats(self) -> bool:
        """Whether :meth:`pair_stats` / :meth:`merge_stats` / :meth:`finalize` are implemented."""
        return type(self).pair_stats is not Backend.pair_stats

    def pair_stats(self, prompt: Prompt, query: Sample, num_classes: int) -> Stats:
        """Sufficient statistics of one (prompt, query) pair (output-combining backends)."""
        raise NotImplementedError(f"backend {self.name!r} does not combine prompts at the output")

    def merge_stats(self, a: Stats, b: Stats) -> Stats:
        """Associative, commutative merge of two statistics of the same query."""
        raise NotImplementedError

    def finalize(self, stats: Stats, query: Sample) -> torch.Tensor:
        """(C, H, W) probabilities at the query's resolution from merged statistics."""
        raise NotImplementedError

    def reduce_stats(self, stats: Sequence[Stats]) -> Stats:
        """Left-to-right merge of a non-empty list of statistics."""
        if not stats:
            raise ValueError("cannot reduce an empty list of statistics")
        acc = stats[0]
        for s in stats[1:]:
            acc = self.merge_stats(acc, s)
        return acc

    def predict_from_pairs(self, prompts: Sequence[Prompt], queries: Sequence[Sample], num_classes: int | None = None) -> list[torch.Tensor]:
        """Prediction by merging per-pair statistics (the definition of output-level combination)."""
        if not prompts:
            raise ConfigError("a prediction needs at least one prompt")
        k = num_classes or infer_num_classes(prompts)
        return [self.finalize(self.reduce_stats([self.pair_stats(p, q, k) for p in prompts]), q) for q in queries]


def _checking_prompts(fn: Callable[..., Any], single: bool) -> Callable[..., Any]:
    """``fn`` (a backend's ``predict`` or ``pair_stats``) preceded by :func:`check_prompts` on its prompt argument."""

    @functools.wraps(fn)
    def wrapper(self: Backend, *args: Any, **kwargs: Any) -> Any:
        given = args[0] if args else kwargs.get("prompt" if single else "prompts")
        if given is not None:
            check_prompts(self, [given] if single else given)
        return fn(self, *args, **kwargs)

    wrapper._checks_prompts = True  # type: ignore[attr-defined]
    return wrapper


_REGISTRY: dict[str, str | Callable[..., Backend]] = {
    "features": "promptopt.backends.features:FeaturesBackend",
    "seggpt": "promptopt.backends.seggpt:SegGPTBackend",
    "persam": "promptopt.backends.persam:PerSAMBackend",
    "clipseg": "promptopt.backends.clipseg:CLIPSegBackend",
    "grounded-sam": "promptopt.backends.grounded_sam:GroundedSAMBackend",
}


def register_backend(name: str, factory: str | Callable[..., Backend]) -> None:
    """Make a backend available by name (a class, a factory, or a lazy ``"module:Class"`` path)."""
    _REGISTRY[name] = factory


def available_backends() -> list[str]:
    """Registered backend names whose module can be imported here."""
    names = []
    for name in _REGISTRY:
        try:
            _resolve(name)
            names.append(name)
        except ConfigError:
            pass
    return names


def _resolve(name: str) -> Callable[..., Backend]:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown backend {name!r}; available: {', '.join(_REGISTRY)}")
    return load_entry(_REGISTRY[name], f"backend {name!r}")


def create_backend(name: str, checkpoint: str | None = None, options: Mapping[str, Any] | None = None, **kwargs: Any) -> Backend:
    """Build a backend by registry name.

    ``checkpoint`` (a model id or a local folder) goes to the class's
    ``from_pretrained``; backends without weights refuse one. ``options`` and
    keyword arguments are passed to the constructor (or ``from_pretrained``).
    """
    factory = _resolve(name)
    opts = {**(options or {}), **kwargs}
    if checkpoint is not None:
        if not hasattr(factory, "from_pretrained"):
            raise ConfigError(f"backend {name!r} uses no checkpoint; drop --checkpoint {checkpoint}")
        return factory.from_pretrained(checkpoint, **opts)
    try:
        return factory(**opts)
    except TypeError as exc:
        raise ConfigError(f"backend {name!r}: bad options {sorted(opts)} ({exc})") from None


def backend_class(name: str) -> Any:
    """The class (or factory) registered under ``name``; its ``search_space`` lists the tunable options."""
    return _resolve(name)


@dataclass(frozen=True)
class BackendSpec:
    """A backend described but not yet built (name, checkpoint, options): what a command line gives.

    A run fingerprints it without loading any weights, so a finished run answers
    at once; :meth:`build` loads the model when work is actually needed.
    """

    name: str
    checkpoint: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "checkpoint": self.checkpoint, "options": dict(self.options)}

    def build(self, **overrides: Any) -> Backend:
        return create_backend(self.name, self.checkpoint, {**self.options, **overrides})


def backend_from_config(config: Mapping[str, Any], **overrides: Any) -> Backend:
    """Inverse of :meth:`Backend.config` (used when loading a prompt artifact)."""
    return create_backend(config["name"], config.get("checkpoint"), {**config.get("options", {}), **overrides})
