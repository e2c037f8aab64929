"""In-context segmenters behind one protocol, found by name (``features``, ``seggpt``, ``persam``)."""

from .base import (Backend, BackendSpec, Context, available_backends, backend_class, backend_from_config,
                   create_backend, register_backend)

__all__ = ["Backend", "BackendSpec", "Context", "available_backends", "backend_class", "backend_from_config",
           "create_backend", "register_backend"]
