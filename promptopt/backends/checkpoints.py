"""Finding a transformers checkpoint offline, with one clear error when it is not there or not the right model.

Why it exists: the text-prompt backends (``clipseg``, ``grounded-sam``) load
three kinds of transformers checkpoints by model id or local folder, and each
failure (no folder, a file instead of a folder, an id missing from the local
cache on a machine without hub access, a folder holding another model) must
read as one line that names the checkpoint and the problem. Nothing is ever
downloaded: every load passes ``local_files_only=True``.
"""

from __future__ import annotations

import inspect
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, backend: str) -> tuple[str, torch.dtype]:
    """("float32" | "bfloat16" | "float16", torch dtype); float16 falls back to float32 on CPU with a warning."""
    if isinstance(dtype, torch.dtype):
        dtype = _DTYPE_NAMES.get(dtype, str(dtype))
    if dtype not in DTYPES:
        raise ConfigError(f"{backend} backend: dtype must be one of float32, bfloat16, float16; got {dtype!r}")
    t = DTYPES[dtype]
    if t == torch.float16 and device.type == "cpu":
        warnings.warn(f"{backend} backend: float16 is not supported on CPU; using float32", stacklevel=3)
        t = torch.float32
    return _DTYPE_NAMES[t], t


def check_options(cls: Any, options: dict[str, Any], backend: str, reserved: tuple[str, ...] = ()) -> None:
    """ConfigError naming any option the backend's constructor does not take (instead of a TypeError).

    ``reserved`` names constructor arguments that ``from_pretrained`` fills itself (models, processors).
    """
    params = inspect.signature(cls.__init__).parameters
    known = {n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    known -= {"self", *reserved}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"{backend} backend: unknown option(s) {unknown}; it takes {sorted(known)}")


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") != 1 or (os.sep != "/" and os.sep in name)


def locate(name: str | os.PathLike, what: str, released: str) -> tuple[str, str]:
    """(source for ``from_pretrained``, reference to record) of a model id or local folder.

    ``what`` names the part in messages ("clipseg checkpoint"); ``released`` is
    the public model id a user can download elsewhere.
    """
    name = str(name)
    path = Path(name).expanduser()
    how = (f"download it where there is network access (`huggingface-cli download {released} --local-dir DIR`) "
           "and pass that folder")
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{what} {path} is a file; give the folder saved by transformers (with config.json)")
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{what} folder {path} has no config.json; {how}")
        return str(path), str(path.resolve())
    if _looks_like_path(name):
        raise CheckpointError(f"{what} folder {name} not found; {how}")
    return name, name


def load_config(source: str, what: str, model_type: str, released: str) -> Any:
    """The checkpoint's config, checked to be ``model_type`` (CheckpointError otherwise)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        if not Path(source).is_dir():
            raise CheckpointError(
                f"{what} {source!r} is not in the local Hugging Face cache and nothing is downloaded here; "
                f"download {released} where there is network access and pass its folder"
            ) from None
        raise CheckpointError(f"cannot read {what} {source}: {str(exc).splitlines()[0]}") from None
    found = getattr(config, "model_type", None)
    if found != model_type:
        raise CheckpointError(f"{what} {source} holds a {found!r} model, not {model_type!r}")
    return config


def load_part(cls: Any, source: str, what: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(source, local_files_only=True, **kwargs)`` with a one-line CheckpointError."""
    try:
        return cls.from_pretrained(source, local_files_only=True, **kwargs)
    except (OSError, ValueError, TypeError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"cannot load {what} from {source}: {str(exc).splitlines()[0]}") from None


__all__ = ["DTYPES", "check_options", "load_config", "load_part", "locate", "resolve_dtype"]
