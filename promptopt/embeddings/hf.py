"""Encoders from transformers vision models (CLIP's vision tower, DINOv2, ViT, ...), pooled.

``hf:<name_or_dir>`` loads with ``AutoModel.from_pretrained`` (a hub id, or a
local folder written by ``save_pretrained``). The embedding is the model's
image projection when it has one (``get_image_features``, CLIP), else its
``pooler_output``, else the mean of ``last_hidden_state`` over tokens.
Preprocessing comes from the folder's image processor when there is one, and
otherwise is a resize to the config's ``image_size`` with ImageNet statistics.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data import Sample
from ..errors import CheckpointError, ConfigError
from .base import Encoder

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class HFVisionEncoder(Encoder):
    """A transformers vision model as an encoder (see the module docstring)."""

    @classmethod
    def from_spec(cls, arg: str, checkpoint: str | None, options: dict[str, Any]) -> "HFVisionEncoder":
        """``hf:<name_or_dir>`` (or ``hf`` with the model as the checkpoint)."""
        if not (checkpoint or arg):
            raise ConfigError("encoder 'hf' needs a model: hf:<name_or_dir>")
        return cls(checkpoint or arg, **options)

    def __init__(self, name_or_dir: str, device: str = "cpu") -> None:
        try:
            from transformers import AutoModel
        except ImportError as exc:  # pragma: no cover - transformers is a dependency
            raise CheckpointError(f"transformers is not installed ({exc})") from None
        self.name_or_dir = str(name_or_dir)
        self.name = f"hf:{self.name_or_dir}"
        self.device = torch.device(device)
        try:
            self.model = AutoModel.from_pretrained(self.name_or_dir).to(self.device).eval()
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot load transformers model {self.name_or_dir!r}: {exc}") from None
        self.processor = None
        try:
            from transformers import AutoImageProcessor

            self.processor = AutoImageProcessor.from_pretrained(self.name_or_dir)
        except Exception:  # no preprocessor_config.json: fall back to a plain resize (see the docstring)
            self.processor = None
        cfg = getattr(self.model.config, "vision_config", self.model.config)
        self.image_size = int(getattr(cfg, "image_size", 224) or 224)
        self._dim: int | None = None
        self._fingerprint: str | None = None

    def options(self) -> dict[str, Any]:
        return {}

    @property
    def dim(self) -> int:
        if self._dim is None:
            probe = Sample("__promptopt_dim_probe__", image=np.zeros((self.image_size, self.image_size, 3), dtype=np.uint8))
            self._dim = int(self._encode_batch([probe]).shape[1])
        return self._dim

    @property
    def fingerprint(self) -> str:
        """Hash of the config and every parameter (the weights define the embedding)."""
        if self._fingerprint is None:
            h = hashlib.sha1(self.model.config.to_json_string().encode())
            for k, v in sorted(self.model.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().float().cpu().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def _pixels(self, samples: Sequence[Sample]) -> torch.Tensor:
        if self.processor is not None:
            return self.processor(images=[s.image for s in samples], return_tensors="pt")["pixel_values"]
        size = (self.image_size, self.image_size)
        mean = torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1)
        batch = [F.interpolate(torch.from_numpy(s.image).permute(2, 0, 1)[None].float() / 255.0, size=size,
                               mode="bilinear", align_corners=False, antialias=True) for s in samples]
        return (torch.cat(batch) - mean) / std

    def _encode_batch(self, samples: Sequence[Sample]) -> np.ndarray:
        pixels = self._pixels(samples).to(self.device)
        with torch.no_grad():
            if hasattr(self.model, "get_image_features"):
                out = self.model.get_image_features(pixel_values=pixels)
                emb = out if isinstance(out, torch.Tensor) else getattr(out, "pooler_output", out[0])
            else:
                out = self.model(pixel_values=pixels)
                pooled = getattr(out, "pooler_output", None)
                emb = pooled if pooled is not None else out.last_hidden_state.mean(1)
        return emb.reshape(len(samples), -1).float().cpu().numpy()
