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
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal, Mapping, Sequence, Union

import numpy as np
import torch

from ..data import IGNORE_INDEX, Sample, check_labels
from ..errors import ConfigError

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


Prompt = Union[Sample, Context]


def one_hot_mask(mask: np.ndarray | torch.Tensor, num_classes: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(H, W) class ids → (C, H, W) float one-hot; ignore (255) pixels become all-zero columns."""
    m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask, device=device).long()
    valid = m != IGNORE_INDEX
    out = torch.zeros((num_classes, *m.shape), dtype=torch.float32, device=device)
    out.scatter_(0, torch.where(valid, m, 0).unsqueeze(0), 1.0)
    return out * valid.unsqueeze(0)


def prompt_key(prompt: Prompt) -> str | None:
    return prompt.key


def infer_num_classes(prompts: Sequence[Prompt]) -> int:
    """Classes implied by a prompt set: the largest label seen + 1, at least 2."""
    top = 1
    for p in prompts:
        if isinstance(p, Context):
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
    def memory_bytes(self, num_prompts: int, image_size: tuple[int, int] | None = None) -> int:
        """Estimated peak device memory (bytes) of one prediction with ``num_prompts`` prompts."""

    @property
    def memory_kind(self) -> str:
        """How :meth:`memory_bytes` is obtained: "analytic estimate" unless a backend profiles ("profiled")."""
        return "analytic estimate"

    def config(self) -> dict[str, Any]:
        """JSON-able description from which :func:`create_backend` rebuilds this backend."""
        return {"name": self.name, "checkpoint": None, "options": {}}

    def to_context(self, prompt: Prompt, num_classes: int) -> Context:
        """The prompt as tensors on this backend's device (the starting point of context tuning)."""
        if isinstance(prompt, Context):
            return prompt
        return Context.from_sample(prompt, num_classes, getattr(self, "device", "cpu"))

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


_REGISTRY: dict[str, str | Callable[..., Backend]] = {
    "features": "promptopt.backends.features:FeaturesBackend",
    "seggpt": "promptopt.backends.seggpt:SegGPTBackend",
    "persam": "promptopt.backends.persam:PerSAMBackend",
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
    factory = _REGISTRY[name]
    if isinstance(factory, str):
        module, _, attr = factory.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"backend {name!r} is registered but cannot be loaded ({exc})") from None
    return factory


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


def backend_from_config(config: Mapping[str, Any], **overrides: Any) -> Backend:
    """Inverse of :meth:`Backend.config` (used when loading a prompt artifact)."""
    return create_backend(config["name"], config.get("checkpoint"), {**config.get("options", {}), **overrides})
