"""Apply a saved prompt artifact to new images and write PNG masks.

A ``fixed`` prompt (forward selection, baselines) uses the same prompt set for
every image. Other kinds (per-query retrieval, learned contexts) register a
predictor here under their ``kind``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from .artifacts import PromptArtifact, load_prompt, save_png_mask
from .backends.base import Backend
from .data import IMAGE_EXTENSIONS, Sample, read_image
from .errors import DataError
from .oracle import prediction_to_labels

Predictor = Callable[[PromptArtifact, Backend, Sequence[Sample]], list[np.ndarray]]
_PREDICTORS: dict[str, Predictor] = {}


def register_predictor(kind: str, fn: Predictor) -> None:
    """Let a prompt kind other than ``fixed`` define how it labels new images."""
    _PREDICTORS[kind] = fn


def _predict_fixed(art: PromptArtifact, backend: Backend, queries: Sequence[Sample]) -> list[np.ndarray]:
    prompts = art.samples()
    return [prediction_to_labels(backend.predict(prompts, [q], art.num_classes)[0]).cpu().numpy() for q in queries]


register_predictor("fixed", _predict_fixed)


def image_samples(images: str | Path | Iterable[str | Path]) -> list[Sample]:
    """Unlabelled samples from a folder of images (or a list of files), checked up front."""
    if isinstance(images, (str, Path)):
        folder = Path(images)
        if not folder.exists():
            raise DataError(f"{folder}: not found")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS) if folder.is_dir() else [folder]
        if not files:
            raise DataError(f"{folder}: no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
    else:
        files = [Path(p) for p in images]
    out = []
    for p in files:
        img = read_image(p)  # reads now so that a bad file is reported by name before any model runs
        out.append(Sample(p.stem, f"query:{p.parent.resolve()}", image=img, path=p))
    return out


def predict_labels(artifact: PromptArtifact | str | Path, queries: Sequence[Sample],
                   backend: Backend | None = None, **backend_overrides) -> list[np.ndarray]:
    """(H, W) class-id maps for each query under a saved prompt."""
    art = artifact if isinstance(artifact, PromptArtifact) else load_prompt(artifact)
    if art.kind not in _PREDICTORS:
        raise DataError(f"{art.path}: prompt kind {art.kind!r} cannot be applied by this version of promptopt")
    backend = backend or art.build_backend(**backend_overrides)
    return _PREDICTORS[art.kind](art, backend, queries)


def predict_folder(prompt_path: str | Path, images: str | Path, out_dir: str | Path,
                   progress: Callable[[int, int], None] | None = None, **backend_overrides) -> list[Path]:
    """Write one PNG mask per image into ``out_dir`` (binary tasks: 0/255; otherwise class ids)."""
    art = load_prompt(prompt_path)
    queries = image_samples(images)
    backend = art.build_backend(**backend_overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, q in enumerate(queries):
        labels = predict_labels(art, [q], backend)[0]
        png = labels.astype(np.uint8) * 255 if art.num_classes == 2 else labels
        written.append(save_png_mask(out / f"{q.id}.png", png))
        if progress:
            progress(i + 1, len(queries))
    return written


def _predict_tuned(art: PromptArtifact, backend: Backend, queries: Sequence[Sample]) -> list[np.ndarray]:
    """Learned contexts (context tuning): the safetensors beside prompt.json are the prompt."""
    from .strategies.tuning import load_contexts

    if not art.context_file:
        raise DataError(f"{art.path}: a tuned prompt needs a context_file")
    contexts = load_contexts(art.path.parent / art.context_file, getattr(backend, "device", "cpu"))
    return [prediction_to_labels(backend.predict(contexts, [q], art.num_classes)[0]).cpu().numpy() for q in queries]


register_predictor("tuned", _predict_tuned)


def _predict_retrieval(art: PromptArtifact, backend: Backend, queries: Sequence[Sample]) -> list[np.ndarray]:
    from .strategies.retrieval import predict_retrieval  # lazy: FAISS is only needed for retrieval prompts

    return predict_retrieval(art, backend, queries)


register_predictor("retrieval", _predict_retrieval)
