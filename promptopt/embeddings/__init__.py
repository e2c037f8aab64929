"""Image encoders for retrieval, found by spec on a lazy registry like backends and strategies: weight-free
``features``, open_clip ``clip``, transformers ``hf:``, a backend's own features ``backend:``."""

from .base import (EncodeProgress, Encoder, available_encoders, create_encoder, encoder_from_spec, l2_normalize,
                   register_encoder)

__all__ = ["Encoder", "EncodeProgress", "available_encoders", "create_encoder", "encoder_from_spec", "l2_normalize",
           "register_encoder"]
