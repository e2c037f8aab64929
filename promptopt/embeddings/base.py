"""The encoder protocol and the registry that builds encoders from a spec string.

An encoder maps images to fixed-length float32 vectors so that similar images
are close in cosine similarity; the index (``promptopt.index``) stores them and
retrieval picks each query's nearest pool examples as its prompt. Specs:

``features``            weight-free pooled filter-bank statistics (the default; works everywhere)
``clip``                open_clip: ``model`` option (e.g. ViT-B-32) + ``checkpoint`` (pretrained tag or file)
``hf:<name_or_dir>``    a transformers vision model (CLIP vision tower, DINOv2, ...) loaded with AutoModel
``backend:<name>``      the segmenter's own image features (``Backend.image_embedding``)

Every encoder has a ``name`` (its spec), ``dim``, and a ``fingerprint`` that
changes whenever the vectors it would produce change (weights, options); an
index refuses to be queried with an encoder of another fingerprint.

Schemes live in a lazy ``"module:attr"`` registry (:func:`register_encoder`), as
backends and strategies do: this module never imports an encoder, so no
encoder's dependencies load until its spec is used.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..data import Sample
from ..errors import ConfigError
from ..registry import load_entry

EncodeProgress = Callable[[int, int], None]
"""progress(done, total) in images; the CLI draws a bar from it."""


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float32 and C-contiguous (what FAISS wants)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


def hash_json(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Encoder(ABC):
    """Images → (n, dim) float32 embeddings, in batches."""

    #: registry spec that rebuilds this encoder (with :meth:`options`)
    name: str = "encoder"

    @property
    @abstractmethod
    def dim(self) -> int:
        """Length of one embedding."""

    @property
    @abstractmethod
    def fingerprint(self) -> str:
        """Changes whenever the embeddings would (weights, options, code version of the weight-free one)."""

    def options(self) -> dict[str, Any]:
        """Keyword options that :func:`create_encoder` needs, next to ``name`` and ``checkpoint``."""
        return {}

    @property
    def checkpoint(self) -> str | None:
        return None

    def spec(self) -> dict[str, Any]:
        """JSON-able description from which :func:`encoder_from_spec` rebuilds this encoder."""
        return {"name": self.name, "checkpoint": self.checkpoint, "options": self.options(), "dim": self.dim,
                "fingerprint": self.fingerprint}

    @abstractmethod
    def _encode_batch(self, samples: Sequence[Sample]) -> np.ndarray:
        """(len(samples), dim) embeddings of one batch (unnormalised is fine)."""

    def _encode_masked_batch(self, samples: Sequence[Sample]) -> np.ndarray:
        raise ConfigError(f"encoder {self.name!r} has no mask-aware embedding; use it without --masked")

    @property
    def supports_masked(self) -> bool:
        return type(self)._encode_masked_batch is not Encoder._encode_masked_batch

    def encode(self, samples: Sequence[Sample], batch_size: int = 16,
               progress: EncodeProgress | None = None) -> np.ndarray:
        """L2-normalised (n, dim) float32 embeddings of the images, computed ``batch_size`` at a time."""
        return self._run(self._encode_batch, samples, batch_size, progress)

    def encode_masked(self, samples: Sequence[Sample], batch_size: int = 16,
                      progress: EncodeProgress | None = None) -> np.ndarray:
        """Mask-aware embeddings of labelled candidates (features pooled with the object emphasised).

        They live in the same space as :meth:`encode` of an unlabelled query,
        so a query retrieves candidates whose *object* looks like the query image.
        """
        return self._run(self._encode_masked_batch, samples, batch_size, progress)

    def _run(self, fn, samples: Sequence[Sample], batch_size: int, progress: EncodeProgress | None) -> np.ndarray:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        samples = list(samples)
        out = np.zeros((len(samples), self.dim), dtype=np.float32)
        for start in range(0, len(samples), batch_size):
            part = samples[start:start + batch_size]
            vecs = np.asarray(fn(part), dtype=np.float32)
            if vecs.shape != (len(part), self.dim):
                raise RuntimeError(f"encoder {self.name!r} returned {vecs.shape}, expected {(len(part), self.dim)}")
            out[start:start + len(part)] = vecs
            if progress:
                progress(start + len(part), len(samples))
        return l2_normalize(out)


#: encoder scheme (the part of a spec before ":") → ``"module:factory"``, imported on first use. A factory
#: takes ``(arg, checkpoint, options)``: ``arg`` is the spec's part after ":" ("" when there is none).
_REGISTRY: dict[str, str | Callable[..., Encoder]] = {
    "features": "promptopt.embeddings.features:FeatureStatsEncoder.from_spec",
    "clip": "promptopt.embeddings.clip:OpenClipEncoder.from_spec",
    "hf": "promptopt.embeddings.hf:HFVisionEncoder.from_spec",
    "backend": "promptopt.embeddings.backend:BackendEncoder.from_spec",
}


def register_encoder(scheme: str, factory: str | Callable[..., Encoder]) -> None:
    """Make encoder specs ``scheme`` / ``scheme:ARG`` available (a factory or a lazy ``"module:attr"`` path)."""
    _REGISTRY[scheme] = factory


def available_encoders() -> list[str]:
    """Registered encoder schemes."""
    return list(_REGISTRY)


def create_encoder(name: str = "features", checkpoint: str | None = None,
                   options: Mapping[str, Any] | None = None) -> Encoder:
    """Build an encoder from its spec ``scheme[:ARG]`` (see the module docstring)."""
    scheme, _, arg = name.partition(":")
    if scheme not in _REGISTRY:
        raise ConfigError(f"unknown encoder {name!r}; registered: "
                          + ", ".join(f"{s}[:ARG]" for s in _REGISTRY))
    factory = _REGISTRY[scheme] = load_entry(_REGISTRY[scheme], f"encoder {scheme!r}")
    opts = dict(options or {})
    try:
        return factory(arg, checkpoint, opts)
    except TypeError as exc:
        raise ConfigError(f"encoder {name!r}: bad options {sorted(opts)} ({exc})") from None


def encoder_from_spec(spec: Mapping[str, Any]) -> Encoder:
    """Inverse of :meth:`Encoder.spec`; the fingerprint is checked by the index, not here."""
    name = spec["name"]
    checkpoint = spec.get("checkpoint")
    if name.startswith("hf:"):
        checkpoint = None  # the name holds the model
    return create_encoder(name, checkpoint, spec.get("options") or {})
