"""Apply a saved prompt artifact to new images and write PNG masks.

A ``fixed`` prompt (forward selection, baselines) uses the same prompt set for
every image. Other kinds (per-query retrieval, learned contexts, text prompts)
have their own predictor here, chosen by the artifact's ``kind``. A predictor returns, per
image, the label map and the ids of the prompts that image was given. A
``text`` prompt is its phrases (``extra.texts``) read by the backend rebuilt
from the artifact's config, thresholds included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .artifacts import PromptArtifact, atomic_write_bytes, atomic_write_csv, load_prompt, png_bytes
from .backends.base import Backend, Prompt, TextPrompt
from .data import Sample, image_samples
from .errors import DataError
from .oracle import prediction_to_labels

Predicted = tuple[list[np.ndarray], list[list[str]]]


def labels_under(backend: Backend, prompts: Sequence[Prompt], queries: Sequence[Sample],
                 num_classes: int) -> list[np.ndarray]:
    """(H, W) class ids of each query under one prompt set, predicted one image at a time."""
    return [prediction_to_labels(backend.predict(list(prompts), [q], num_classes)[0]).cpu().numpy() for q in queries]


def _predict_fixed(art: PromptArtifact, backend: Backend, queries: Sequence[Sample]) -> Predicted:
    return labels_under(backend, art.samples(), queries, art.num_classes), [art.ids for _ in queries]


def _predict_text(art: PromptArtifact, backend: Backend, queries: Sequence[Sample]) -> Predicted:
    """A text prompt: the phrases of ``extra.texts``; the thresholds are in the backend's saved config."""
    if not art.texts:
        raise DataError(f"{art.path}: a text prompt needs 'extra.texts' (one phrase per foreground class)")
    prompt = TextPrompt(tuple(art.texts))
    return labels_under(backend, [prompt], queries, art.num_classes), [[prompt.key] for _ in queries]


def _predict_tuned(art: PromptArtifact, backend: Backend, queries: Sequence[Sample]) -> Predicted:
    """Learned contexts (context tuning): the safetensors beside prompt.json are the prompt."""
    from .strategies.tuning import load_contexts

    if not art.context_file:
        raise DataError(f"{art.path}: a tuned prompt needs a context_file")
    contexts = load_contexts(art.path.parent / art.context_file, backend.device)
    labels = labels_under(backend, contexts, queries, art.num_classes)
    return labels, [[f"context {i}" for i in range(len(contexts))] for _ in queries]


def _predict_retrieval(art: PromptArtifact, backend: Backend, queries: Sequence[Sample]) -> Predicted:
    from .strategies.retrieval import predict_retrieval  # lazy: FAISS is only needed for retrieval prompts

    return predict_retrieval(art, backend, queries)


#: how each kind of prompt artifact labels new images
_PREDICTORS: dict[str, Callable[[PromptArtifact, Backend, Sequence[Sample]], Predicted]] = {
    "fixed": _predict_fixed, "text": _predict_text, "tuned": _predict_tuned, "retrieval": _predict_retrieval}


def predict_with_prompts(artifact: PromptArtifact | str | Path, queries: Sequence[Sample],
                         backend: Backend | None = None,
                         **backend_overrides) -> Predicted:
    """(H, W) class-id maps for each query under a saved prompt, and the prompt ids each query got."""
    art = artifact if isinstance(artifact, PromptArtifact) else load_prompt(artifact)
    if art.kind not in _PREDICTORS:
        raise DataError(f"{art.path}: prompt kind {art.kind!r} cannot be applied by this version of promptopt")
    backend = backend or art.build_backend(**backend_overrides)
    return _PREDICTORS[art.kind](art, backend, queries)


def predict_labels(artifact: PromptArtifact | str | Path, queries: Sequence[Sample],
                   backend: Backend | None = None, **backend_overrides) -> list[np.ndarray]:
    """(H, W) class-id maps for each query under a saved prompt."""
    return predict_with_prompts(artifact, queries, backend, **backend_overrides)[0]


def mask_names(queries: Sequence[Sample]) -> list[str]:
    """Output file name per image: ``<stem>.png``, or ``<stem>_<ext>.png`` for images that share a stem."""
    stems: dict[str, int] = {}
    for q in queries:
        stems[Path(q.id).stem] = stems.get(Path(q.id).stem, 0) + 1
    return [f"{Path(q.id).stem}.png" if stems[Path(q.id).stem] == 1 else
            f"{Path(q.id).stem}_{Path(q.id).suffix.lstrip('.').lower()}.png" for q in queries]


def label_png(labels: np.ndarray, num_classes: int, palette: Sequence[int] | None = None) -> bytes:
    """The PNG people can look at: binary 0/255 grey; several classes as a palette PNG (the dataset's
    palette when the prompt recorded one, else SegGPT's class colours) whose pixel values are the class ids."""
    from PIL import Image

    if num_classes == 2:
        return png_bytes(labels.astype(np.uint8) * 255)
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    if palette is None:
        from .backends.seggpt import seggpt_palette

        palette = [int(v) for v in seggpt_palette(num_classes).flatten().tolist()]
    im.putpalette(list(palette) + [0] * (768 - len(palette)))
    return png_bytes(im)


def predict_folder(prompt_path: str | Path, images: str | Path, out_dir: str | Path, *,
                   masks: str | Path | None = None, overlays: bool = False,
                   progress: Callable[[str, int, int], None] | None = None, **backend_overrides) -> list[Path]:
    """Label every image of a folder with a saved prompt; write masks, ``predictions.csv`` and optional overlays.

    ``out_dir`` gets one PNG per image (see :func:`mask_names` and :func:`label_png`),
    ``predictions.csv`` (image, mask file, class, area in pixels, the prompts the image was given, and the
    IoU against ``masks/<stem>.png`` when a ground-truth folder is given — not for images whose stem another
    image shares, which no mask names unambiguously), and with ``overlays`` a
    ``overlays/`` folder of images with the prediction drawn over them.
    """
    from .data import read_mask
    from .metrics import mean_iou

    art = load_prompt(prompt_path)
    queries = image_samples(images)
    truth_dir = Path(masks) if masks is not None else None
    if truth_dir is not None and not truth_dir.is_dir():
        raise DataError(f"{truth_dir}: ground-truth mask folder not found")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; give --out a folder path")
    backend = art.build_backend(**backend_overrides)
    palette = art.extra.get("palette")
    names = mask_names(queries)
    rows, written = [], []
    for i, (q, name) in enumerate(zip(queries, names)):
        if progress:
            progress("images", i, len(queries))
        (labels,), (used,) = predict_with_prompts(art, [q], backend)
        written.append(atomic_write_bytes(out / name, label_png(labels, art.num_classes, palette)))
        if overlays:
            from .plots import mask_overlay

            atomic_write_bytes(out / "overlays" / name, png_bytes(mask_overlay(q.image, labels)))
        iou = None
        unique = name == f"{Path(q.id).stem}.png"  # a stem two images share matches no ground truth unambiguously
        truth_path = truth_dir / f"{Path(q.id).stem}.png" if truth_dir is not None and unique else None
        if truth_path is not None and truth_path.is_file():
            iou = mean_iou([labels], [read_mask(truth_path)], art.num_classes)
        for c in range(1, art.num_classes):
            rows.append([q.id, name, c, int((labels == c).sum()), " ".join(used),
                         "" if iou is None or iou != iou else f"{iou:.6f}"])
    if progress:
        progress("images", len(queries), len(queries))
    atomic_write_csv(out / "predictions.csv", ["image", "mask", "class", "area", "prompts", "iou"], rows)
    return written
