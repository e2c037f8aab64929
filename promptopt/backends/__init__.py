"""Segmenters behind one protocol, found by name: image-prompted (``features``, ``seggpt``, ``persam``),
text- and image-prompted (``clipseg``) and text-prompted (``grounded-sam``)."""

from .base import (Backend, BackendSpec, Context, TextPrompt, available_backends, backend_class, backend_from_config,
                   check_prompts, create_backend, register_backend)

__all__ = ["Backend", "BackendSpec", "Context", "TextPrompt", "available_backends", "backend_class",
           "backend_from_config", "check_prompts",
           "create_backend", "register_backend"]
