"""Plain-file artifacts: prompt.json, result.json, resume state — the one place that writes them.

Everything a run produces is a file a later ``promptopt predict`` (or a person)
can read without the run that made it:

* ``prompt.json`` names the backend (registry name, checkpoint, options), the
  number of classes and the prompt examples. The prompt images and masks are
  copied next to it (``prompts/``), so the artifact does not depend on where
  the dataset lives. Learned tensors are safetensors files beside it: the
  backend's learned state for the kept examples (``learned.safetensors``,
  e.g. PerSAM-F's weights) and a tuned context (``extra.context_file``). A
  text prompt (``kind: "text"``) holds no examples: its phrases, one per
  foreground class, are ``extra.texts``, and the thresholds it was chosen
  with are the backend's options in ``backend``. Any other
  strategy-specific data goes in ``extra``.
* ``result.json`` holds scores and metadata; a run's ``state.json`` its
  progress (see :mod:`promptopt.run`).

Every write goes to a temporary file in the same folder, is flushed to disk and
then renamed over the target (``os.replace`` is atomic on POSIX and Windows), so
an interrupted run leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from .data import Sample
from .errors import DataError

PROMPT_FORMAT = "promptopt-prompt"
PROMPT_VERSION = 2
LEARNED_FILE = "learned.safetensors"


def _file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename).

    The file gets the permissions any file the user creates gets (``mkstemp``'s
    private 0600 would hide results from the user's group).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _file_mode())
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


def jsonable(data: Any) -> Any:
    """``data`` as it reads back from a JSON file we write (numpy scalars as numbers, NaN/inf as null)."""
    return _clean_floats(json.loads(json.dumps(data, default=_json_default)))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(jsonable(data), indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None


def atomic_write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """A CSV file (header, then rows), atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    """A PIL image, or a uint8 array (H, W) grey / (H, W, 3) RGB, as the bytes of a PNG file."""
    buf = io.BytesIO()
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    pil.save(buf, format="PNG")
    return buf.getvalue()


def save_png_mask(path: str | Path, mask: np.ndarray) -> Path:
    """Class-id mask → single-channel PNG (values are class ids, 255 = ignore), atomically."""
    mask = np.asarray(mask)
    if mask.min(initial=0) < 0 or mask.max(initial=0) > 255:
        raise ValueError("PNG masks hold class ids 0..255")
    return atomic_write_bytes(path, png_bytes(mask.astype(np.uint8)))


def fingerprint(obj: Any) -> str:
    """Stable short hash of a JSON-able object (used to check that a resumed run is the same run)."""
    text = json.dumps(obj, sort_keys=True, default=_json_default)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


@dataclass
class PromptArtifact:
    """A saved prompt: backend description, classes, example files, learned tensors and extras."""

    path: Path
    backend: dict[str, Any]
    num_classes: int
    category: str
    examples: list[dict[str, str]]
    kind: str = "fixed"
    learned_file: str | None = None
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

    @property
    def texts(self) -> list[str] | None:
        """The phrases of a text prompt, one per foreground class (None for an image prompt)."""
        texts = self.extra.get("texts")
        return list(texts) if texts is not None else None

    @property
    def context_file(self) -> str | None:
        """Learned context tensors (context tuning), relative to the artifact's folder."""
        return self.extra.get("context_file")

    def build_backend(self, **overrides: Any):
        """Rebuild the backend the prompt was made for, with its learned state (``device`` etc. as overrides)."""
        from .backends.base import backend_from_config

        backend = backend_from_config(self.backend, **overrides)
        if self.learned_file:
            backend.load_learned_state(load_tensors(self.path.parent / self.learned_file))
        return backend


def save_tensors(path: str | Path, tensors: dict[str, Any]) -> Path:
    """Tensors as a safetensors file, atomically."""
    from safetensors.torch import save

    return atomic_write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))


def load_tensors(path: str | Path) -> dict[str, Any]:
    """A safetensors file as a dict of CPU tensors, or a DataError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    try:
        return load(path.read_bytes())
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (SafetensorError, ValueError) as exc:
        raise DataError(f"{path}: not a readable safetensors file ({exc})") from None


def save_prompt(
    run_dir: str | Path,
    backend_config: dict[str, Any],
    prompts: Sequence[Sample],
    num_classes: int,
    category: str = "",
    kind: str = "fixed",
    learned: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    name: str = "prompt.json",
) -> Path:
    """Write ``prompt.json`` with copies of the prompt images and masks under ``prompts/``
    and the backend's ``learned`` tensors (if any) in ``learned.safetensors``; prompt.json last."""
    run_dir = Path(run_dir)
    out_dir = run_dir / "prompts"
    out_dir.mkdir(parents=True, exist_ok=True)
    examples = []
    for s in prompts:
        stem = s.id
        img_rel = f"prompts/{stem}{s.path.suffix.lower() if s.path is not None else '.png'}"
        atomic_write_bytes(run_dir / img_rel, Path(s.path).read_bytes() if s.path is not None else png_bytes(s.image))
        mask_rel = f"prompts/{stem}_mask.png"
        save_png_mask(run_dir / mask_rel, s.mask)
        examples.append({"id": s.id, "image": img_rel, "mask": mask_rel,
                         "source": str(s.path) if s.path is not None else None})
    if learned:
        save_tensors(run_dir / LEARNED_FILE, learned)
    palette = source_palette(prompts)
    if palette is not None:
        extra = {"palette": palette, **(extra or {})}
    doc = {
        "format": PROMPT_FORMAT,
        "version": PROMPT_VERSION,
        "kind": kind,
        "backend": backend_config,
        "num_classes": int(num_classes),
        "category": category,
        "examples": examples,
        "learned_file": LEARNED_FILE if learned else None,
        "extra": extra or {},
    }
    return atomic_write_json(run_dir / name, doc)


def source_palette(samples: Sequence[Sample]) -> list[int] | None:
    """The colour palette of the examples' mask files when they are palette PNGs (VOC style), else None:
    predictions of a multi-class prompt are then written in the dataset's own colours."""
    for s in samples:
        if s.mask_path is None or s.mask_path.suffix.lower() != ".png":
            continue
        try:
            with Image.open(s.mask_path) as im:
                if im.mode == "P" and im.getpalette():
                    return [int(v) for v in im.getpalette()[:768]]
        except OSError:
            continue
    return None


def load_prompt(path: str | Path) -> PromptArtifact:
    """Read a ``prompt.json`` (or a run folder containing one) and check its fields and files."""
    path = Path(path)
    if path.is_dir():
        path = path / "prompt.json"
    doc = read_json(path)
    if not isinstance(doc, dict) or doc.get("format") != PROMPT_FORMAT:
        raise DataError(f"{path}: not a promptopt prompt file (no \"format\": \"{PROMPT_FORMAT}\")")
    version = doc.get("version", 0)
    if not isinstance(version, int) or version > PROMPT_VERSION:
        raise DataError(f"{path}: written by a newer promptopt (format version {version})")
    for key, kind in (("backend", dict), ("num_classes", int), ("examples", list)):
        if key not in doc:
            raise DataError(f"{path}: missing field {key!r}")
        if not isinstance(doc[key], kind) or isinstance(doc[key], bool):
            raise DataError(f"{path}: field {key!r} must be {'an integer' if kind is int else 'a ' + kind.__name__}, "
                            f"got {doc[key]!r}")
    if doc["num_classes"] < 2:
        raise DataError(f"{path}: num_classes must be at least 2, got {doc['num_classes']}")
    if not isinstance(doc["backend"].get("name"), str):
        raise DataError(f"{path}: field 'backend' names no backend")
    extra = doc.get("extra") or {}
    if not isinstance(extra, dict):
        raise DataError(f"{path}: field 'extra' must be an object")
    if version < 2 and doc.get("context_file"):  # version 1 kept the tuned context's file at the top level
        extra = {**extra, "context_file": doc["context_file"]}
    art = PromptArtifact(
        path=path, backend=doc["backend"], num_classes=doc["num_classes"], category=str(doc.get("category", "")),
        examples=list(doc["examples"]), kind=str(doc.get("kind", "fixed")), learned_file=doc.get("learned_file"),
        extra=extra,
    )
    for e in art.examples:
        if not isinstance(e, dict) or not all(isinstance(e.get(k), str) for k in ("id", "image", "mask")):
            raise DataError(f"{path}: every example needs string fields id, image and mask; got {e!r}")
        for k in ("image", "mask"):
            if not (path.parent / e[k]).is_file():
                raise DataError(f"{path}: prompt {e['id']} refers to missing file {path.parent / e[k]}")
    for rel in (art.context_file, art.learned_file):
        if rel is not None and not (path.parent / rel).is_file():
            raise DataError(f"{path}: learned tensor file {path.parent / rel} is missing")
    texts = extra.get("texts")
    if texts is not None and (not isinstance(texts, list) or len(texts) != art.num_classes - 1
                              or not all(isinstance(t, str) and t.strip() for t in texts)):
        raise DataError(f"{path}: field 'extra.texts' must list {art.num_classes - 1} non-empty phrase(s), one per "
                        f"foreground class; got {texts!r}")
    if not art.examples and not art.context_file and not texts:
        raise DataError(f"{path}: holds no prompt examples, no learned context and no text")
    return art
