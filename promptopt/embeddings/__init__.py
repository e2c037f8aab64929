"""Image encoders for retrieval: weight-free ``features``, open_clip ``clip``, transformers ``hf:``, ``backend:``."""

from .base import EncodeProgress, Encoder, create_encoder, encoder_from_spec, l2_normalize

__all__ = ["Encoder", "EncodeProgress", "create_encoder", "encoder_from_spec", "l2_normalize"]
