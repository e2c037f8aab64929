"""Segmenters behind one protocol, found by name: image-prompted (``features``, ``seggpt``, ``persam``),
text- and image-prompted (``clipseg``) and text-prompted (``grounded-sam``)."""

from .base import (
    Backend,
    Context,
    TextPrompt,
    available_backends,
    backend_from_config,
    check_prompts,
    create_backend,
    register_backend,
)

__all__ = ["Backend", "Context", "TextPrompt", "available_backends", "backend_from_config", "check_prompts",
           "create_backend", "register_backend"]
