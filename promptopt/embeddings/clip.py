"""open_clip image encoders: a model name plus a pretrained tag or a local checkpoint file.

``clip`` (default model ViT-B-32) or ``clip:<model>``; ``--checkpoint`` is an
open_clip pretrained tag (e.g. ``laion2b_s34b_b79k``, downloaded by open_clip)
or a path to a state-dict file. Without a checkpoint the weights are random,
which is only useful for tests, so it is refused unless ``allow_random=True``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from ..data import Sample
from ..errors import CheckpointError, ConfigError
from .base import Encoder


class OpenClipEncoder(Encoder):
    """open_clip's ``encode_image`` with the model's own preprocessing."""

    @classmethod
    def from_spec(cls, arg: str, checkpoint: str | None, options: dict[str, Any]) -> "OpenClipEncoder":
        """``clip[:MODEL]`` (default ViT-B-32, or the ``model`` option); ``checkpoint``: a pretrained tag or file."""
        model = arg or options.pop("model", None) or "ViT-B-32"
        return cls(model, pretrained=checkpoint, **options)

    def __init__(self, model: str = "ViT-B-32", pretrained: str | None = None, device: str = "cpu",
                 allow_random: bool = False) -> None:
        try:
            import open_clip
        except ImportError as exc:  # pragma: no cover - open_clip is a dependency
            raise CheckpointError(f"open_clip is not installed ({exc})") from None
        if pretrained is None and not allow_random:
            raise ConfigError(f"clip encoder {model!r}: give --checkpoint (an open_clip pretrained tag or a file)")
        if model not in open_clip.list_models():
            raise ConfigError(f"clip encoder: unknown open_clip model {model!r} (see open_clip.list_models())")
        self.model_name = model
        self.pretrained = pretrained
        self.allow_random = bool(allow_random)
        self.name = f"clip:{model}"
        self.device = torch.device(device)
        try:
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained,
                                                                                   device=self.device)
        except (RuntimeError, OSError, ValueError) as exc:
            raise CheckpointError(f"cannot load open_clip {model!r} with {pretrained!r}: {exc}") from None
        self.model.eval()
        self._dim: int | None = None
        self._fingerprint: str | None = None

    @property
    def checkpoint(self) -> str | None:
        return self.pretrained

    def options(self) -> dict[str, Any]:
        return {"allow_random": True} if self.allow_random else {}

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = int(self._encode_batch([Sample("__promptopt_dim_probe__", image=np.zeros((32, 32, 3), np.uint8))]).shape[1])
        return self._dim

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            h = hashlib.sha1(self.model_name.encode())
            if self.pretrained and Path(self.pretrained).is_file():
                h.update(Path(self.pretrained).read_bytes())
            else:
                for k, v in sorted(self.model.visual.state_dict().items()):
                    h.update(k.encode())
                    h.update(v.detach().float().cpu().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def _encode_batch(self, samples: Sequence[Sample]) -> np.ndarray:
        batch = torch.stack([self.preprocess(Image.fromarray(s.image)) for s in samples]).to(self.device)
        with torch.no_grad():
            return self.model.encode_image(batch).float().cpu().numpy()
