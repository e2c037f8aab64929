"""Plain-file artifacts: prompt.json, result.json, resume state — the one place that writes them.

Everything a run produces is a file a later ``promptopt predict`` (or a person)
can read without the run that made it:

* ``prompt.json`` names the backend (registry name, checkpoint, options), the
  number of classes and the prompt examples. The prompt images and masks are
  copied next to it (``prompts/``), so the artifact does not depend on where
  the dataset lives. A learned context (context tuning) is a safetensors file
  beside it, and any strategy-specific data goes in ``extra``.
* ``result.json`` holds scores and metadata; ``state.json`` the progress of an
  interruptible run.

Every write goes to a temporary file in the same folder, is flushed to disk and
then renamed over the target (``os.replace`` is atomic on POSIX and Windows), so
an interrupted run leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .data import Sample
from .errors import ConfigError, DataError

PROMPT_FORMAT = "promptopt-prompt"
PROMPT_VERSION = 1


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _clean_floats(obj: Any) -> Any:
    """NaN/inf are not JSON; write them as null so every JSON reader can load our files."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_floats(v) for v in obj]
    return obj


def atomic_write_json(path: str | Path, data: Any) -> Path:
    text = json.dumps(_clean_floats(json.loads(json.dumps(data, default=_json_default))), indent=2, sort_keys=False)
    return atomic_write_text(path, text + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None


def save_png_mask(path: str | Path, mask: np.ndarray) -> Path:
    """Class-id mask → single-channel PNG (values are class ids, 255 = ignore), atomically."""
    mask = np.asarray(mask)
    if mask.min(initial=0) < 0 or mask.max(initial=0) > 255:
        raise ValueError("PNG masks hold class ids 0..255")
    import io

    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8), mode="L").save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def fingerprint(obj: Any) -> str:
    """Stable short hash of a JSON-able object (used to check that a resumed run is the same run)."""
    text = json.dumps(obj, sort_keys=True, default=_json_default)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


@dataclass
class PromptArtifact:
    """A saved prompt: backend description, classes, example files and optional extras."""

    path: Path
    backend: dict[str, Any]
    num_classes: int
    category: str
    examples: list[dict[str, str]]
    kind: str = "fixed"
    context_file: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def samples(self) -> list[Sample]:
        """The prompt examples as samples read from the artifact's own copies."""
        base = self.path.parent
        return [
            Sample(e["id"], self.category, path=base / e["image"], mask_path=base / e["mask"], mask_mode="classes",
                   num_classes=self.num_classes)
            for e in self.examples
        ]

    @property
    def ids(self) -> list[str]:
        return [e["id"] for e in self.examples]

    def build_backend(self, **overrides: Any):
        """Rebuild the backend the prompt was made for (overrides such as ``device`` are passed on)."""
        from .backends.base import backend_from_config

        return backend_from_config(self.backend, **overrides)


def save_prompt(
    run_dir: str | Path,
    backend_config: dict[str, Any],
    prompts: Sequence[Sample],
    num_classes: int,
    category: str = "",
    kind: str = "fixed",
    context_file: str | None = None,
    extra: dict[str, Any] | None = None,
    name: str = "prompt.json",
) -> Path:
    """Write ``prompt.json`` with copies of the prompt images and masks under ``prompts/``."""
    run_dir = Path(run_dir)
    out_dir = run_dir / "prompts"
    out_dir.mkdir(parents=True, exist_ok=True)
    examples = []
    for s in prompts:
        stem = s.id
        if s.path is not None:
            img_rel = f"prompts/{stem}{s.path.suffix.lower()}"
            tmp = out_dir / f".{stem}.copy"
            shutil.copyfile(s.path, tmp)
            os.replace(tmp, run_dir / img_rel)
        else:
            img_rel = f"prompts/{stem}.png"
            import io

            buf = io.BytesIO()
            Image.fromarray(s.image).save(buf, format="PNG")
            atomic_write_bytes(run_dir / img_rel, buf.getvalue())
        mask_rel = f"prompts/{stem}_mask.png"
        save_png_mask(run_dir / mask_rel, s.mask)
        examples.append({"id": s.id, "image": img_rel, "mask": mask_rel,
                         "source": str(s.path) if s.path is not None else None})
    doc = {
        "format": PROMPT_FORMAT,
        "version": PROMPT_VERSION,
        "kind": kind,
        "backend": backend_config,
        "num_classes": int(num_classes),
        "category": category,
        "examples": examples,
        "context_file": context_file,
        "extra": extra or {},
    }
    return atomic_write_json(run_dir / name, doc)


def load_prompt(path: str | Path) -> PromptArtifact:
    """Read a ``prompt.json`` (or a run folder containing one) and check that its files exist."""
    path = Path(path)
    if path.is_dir():
        path = path / "prompt.json"
    doc = read_json(path)
    if not isinstance(doc, dict) or doc.get("format") != PROMPT_FORMAT:
        raise DataError(f"{path}: not a promptopt prompt file (no \"format\": \"{PROMPT_FORMAT}\")")
    if doc.get("version", 0) > PROMPT_VERSION:
        raise DataError(f"{path}: written by a newer promptopt (format version {doc['version']})")
    for key in ("backend", "num_classes", "examples"):
        if key not in doc:
            raise DataError(f"{path}: missing field {key!r}")
    art = PromptArtifact(
        path=path, backend=doc["backend"], num_classes=int(doc["num_classes"]), category=doc.get("category", ""),
        examples=list(doc["examples"]), kind=doc.get("kind", "fixed"), context_file=doc.get("context_file"),
        extra=doc.get("extra") or {},
    )
    for e in art.examples:
        for k in ("image", "mask"):
            if not (path.parent / e[k]).is_file():
                raise DataError(f"{path}: prompt {e['id']} refers to missing file {path.parent / e[k]}")
    if art.context_file and not (path.parent / art.context_file).is_file():
        raise DataError(f"{path}: learned context file {path.parent / art.context_file} is missing")
    return art


class RunState:
    """Progress of an interruptible run, in ``<run_dir>/<name>`` (default ``state.json``).

    A state is only reused when its fingerprint (a hash of everything that
    determines the run's answer: data split, backend config, strategy options)
    matches; otherwise the run starts over and says why.
    """

    def __init__(self, run_dir: str | Path, fingerprint_: str, name: str = "state.json") -> None:
        self.path = Path(run_dir) / name
        self.fingerprint = fingerprint_

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        try:
            doc = json.loads(self.path.read_text())
        except json.JSONDecodeError:
            return None
        if doc.get("fingerprint") != self.fingerprint:
            return None
        return doc.get("data")

    def save(self, data: dict[str, Any]) -> None:
        atomic_write_json(self.path, {"fingerprint": self.fingerprint, "data": data})

    def exists_with_other_fingerprint(self) -> bool:
        if not self.path.is_file():
            return False
        try:
            return json.loads(self.path.read_text()).get("fingerprint") != self.fingerprint
        except json.JSONDecodeError:
            return True


def check_run_dir(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: exists and is not a folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir
