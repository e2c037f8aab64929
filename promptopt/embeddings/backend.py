"""Embeddings from the segmenter itself: its own image features, pooled.

Why: a backend's features are what its in-context matching sees (SAM's image
embedding, SegGPT's patch features), so neighbours in that space are the
examples the backend can use best. A backend opts in by implementing
``image_embedding(sample) -> (d,) tensor``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..backends.base import Backend
from ..data import Sample
from ..errors import ConfigError
from .base import Encoder, hash_json


class BackendEncoder(Encoder):
    """Wraps a backend that implements ``image_embedding``."""

    @classmethod
    def from_spec(cls, arg: str, checkpoint: str | None, options: dict[str, Any]) -> "BackendEncoder":
        """``backend[:NAME]`` (default ``features``, or the ``backend`` option): the backend built with the options."""
        from ..backends.base import create_backend

        name = arg or options.pop("backend", None) or "features"
        return cls(create_backend(name, checkpoint, options))

    def __init__(self, backend: Backend) -> None:
        if not callable(getattr(backend, "image_embedding", None)):
            raise ConfigError(f"backend {backend.name!r} has no image_embedding(); use encoder 'features' or 'hf:...'")
        self.backend = backend
        self.name = f"backend:{backend.name}"
        self._dim: int | None = None

    def options(self) -> dict[str, Any]:
        return dict(self.backend.config().get("options") or {})

    @property
    def checkpoint(self) -> str | None:
        return self.backend.config().get("checkpoint")

    @property
    def dim(self) -> int:
        if self._dim is None:
            probe = Sample("__promptopt_dim_probe__", image=np.zeros((32, 32, 3), dtype=np.uint8))
            self._dim = int(self._embed(probe).shape[0])
        return self._dim

    @property
    def fingerprint(self) -> str:
        return hash_json({"encoder": self.name, "config": self.backend.config()})

    def _embed(self, sample: Sample) -> np.ndarray:
        with torch.no_grad():
            v = self.backend.image_embedding(sample)  # type: ignore[attr-defined]
        return torch.as_tensor(v).detach().float().flatten().cpu().numpy()

    def _encode_batch(self, samples: Sequence[Sample]) -> np.ndarray:
        return np.stack([self._embed(s) for s in samples])
