"""Datasets of (image, mask) pairs on disk, and deterministic splits.

This package knows files and masks, nothing about models. :func:`load_dataset`
is its face: it turns a folder laid out as ``<root>/<category>/{images,masks}/``
(or ``<root>/{images,masks}/`` for a single category, :mod:`.folders`), or COCO
instances annotations (:mod:`.coco`), into :class:`Sample` objects
(:mod:`.samples`), checks the files up front so that a bad dataset fails with a
message naming the file, and :func:`split_samples` (:mod:`.splits`) divides each
category into a prompt pool, a validation set (what strategies optimise) and a
test set (what users should trust). How each mask encoding is read is in
:mod:`.masks`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from ..errors import ConfigError, DataError
from .coco import coco_source, load_coco
from .folders import load_folders, scan_category
from .masks import (IGNORE_INDEX, IMAGE_EXTENSIONS, LABELME_HINT, MASK_EXTENSIONS, MAX_CLASS_ID, MAX_INFERRED_CLASSES,
                    MaskMode, check_labels, decode_mask, read_mask)
from .samples import (Dataset, MaskSource, Sample, bundled_sample_coco, bundled_sample_root, image_samples,
                      image_size, read_image)
from .splits import Split, split_samples


def load_dataset(
    root: str | Path,
    category: str | Iterable[str] | None = None,
    mask_mode: MaskMode = "auto",
    num_classes: int | None = None,
    images: str | Path | None = None,
    keep_empty: bool | None = None,
) -> Dataset:
    """Scan a dataset (a folder of masks, or COCO annotations) and check it, without decoding pixels.

    Folder datasets: ``root`` is ``<root>/{images,masks}`` (one category, named
    after the folder) or ``<root>/<category>/{images,masks}``. ``category``
    restricts the scan to one or several categories (an unknown name is an
    error listing the known ones). ``num_classes``, when given, makes any mask
    holding a larger class id an error naming the file.

    COCO: ``root`` is an instances ``.json`` file, or a folder holding exactly
    one JSON file (directly or in ``annotations/``) and no ``masks/``;
    ``images`` is the folder the ``file_name`` entries are relative to
    (default: see :func:`promptopt.data.coco.default_images_dir`), ``category`` a
    name or id (one binary task), ``"a,b"`` (one semantic task, classes 1..K in
    that order) or a list of those. Images without an annotation of the task
    are dropped by default (the few-shot convention: every image shows the
    object); ``keep_empty=True`` keeps them as all-background masks (negatives,
    e.g. to tune PerSAM's absent-object threshold). See :mod:`promptopt.data.coco`.
    """
    root = Path(root).expanduser()
    if not root.exists():
        what = "annotations file" if root.suffix.lower() == ".json" else "data folder"
        raise DataError(f"{root}: {what} not found")
    if mask_mode not in ("auto", "binary", "classes"):
        raise ConfigError(f"unknown mask mode {mask_mode!r}; use auto, binary or classes")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)):
        raise ConfigError(f"num_classes must be an integer, got {num_classes!r}")
    if num_classes is not None and num_classes < 2:
        raise ConfigError(f"num_classes must be at least 2 (background + one class), got {num_classes}")
    if num_classes is not None and num_classes > MAX_CLASS_ID + 1:
        raise ConfigError(
            f"num_classes must be at most {MAX_CLASS_ID + 1} (class ids 0..{MAX_CLASS_ID}; {IGNORE_INDEX} is "
            f"ignore), got {num_classes}"
        )
    coco = coco_source(root)
    if coco is not None:
        return load_coco(coco, images=images, category=category, mask_mode=mask_mode, num_classes=num_classes,
                         keep_empty=bool(keep_empty))
    if images is not None:
        raise ConfigError(
            f"{root}: --images is for COCO annotations; a folder dataset keeps its images in "
            "<category>/images/ next to <category>/masks/"
        )
    if keep_empty is False:
        raise ConfigError(f"{root}: dropping images without annotations applies to COCO annotations only")
    return load_folders(root, category, mask_mode, num_classes)


__all__ = ["IGNORE_INDEX", "IMAGE_EXTENSIONS", "LABELME_HINT", "MASK_EXTENSIONS", "MAX_CLASS_ID",
           "MAX_INFERRED_CLASSES", "Dataset", "MaskMode", "MaskSource", "Sample", "Split", "bundled_sample_coco",
           "bundled_sample_root", "check_labels", "decode_mask", "image_samples", "image_size", "load_dataset",
           "read_image", "read_mask", "scan_category", "split_samples"]
