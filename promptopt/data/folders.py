"""Mask-folder datasets: ``<root>/<category>/{images,masks}/`` or ``<root>/{images,masks}/``, images and masks
paired by file stem and checked from their headers before any pixel is decoded."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from ..errors import ConfigError, DataError
from .masks import IMAGE_EXTENSIONS, LOSSY_EXTENSIONS, MASK_EXTENSIONS, MaskMode
from .samples import Dataset, Sample, image_size


def _files_by_stem(folder: Path, extensions: Sequence[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in extensions:
            if p.stem in out:
                raise DataError(f"{folder}: two files share the stem {p.stem!r} ({out[p.stem].name}, {p.name})")
            out[p.stem] = p
    return out


def scan_category(folder: Path, category: str, mask_mode: MaskMode = "auto", num_classes: int | None = None) -> list[Sample]:
    """Pair ``folder/images/*`` with ``folder/masks/*`` by file stem and check sizes from the headers."""
    img_dir, mask_dir = folder / "images", folder / "masks"
    for d in (img_dir, mask_dir):
        if not d.is_dir():
            raise DataError(
                f"{d}: folder not found (expected {folder}/images/ and {folder}/masks/, "
                "or COCO annotations: an instances .json file)"
            )
    images = _files_by_stem(img_dir, IMAGE_EXTENSIONS)
    masks = _files_by_stem(mask_dir, MASK_EXTENSIONS + LOSSY_EXTENSIONS)
    if not images:
        raise DataError(f"{img_dir}: no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
    lossy = [p for p in masks.values() if p.suffix.lower() in LOSSY_EXTENSIONS]
    if lossy:
        raise DataError(f"{lossy[0]}: masks must be lossless (PNG); JPEG compression corrupts class ids")
    missing = sorted(set(images) - set(masks))
    if missing:
        raise DataError(f"{images[missing[0]]}: image has no mask in {mask_dir} (no file with stem {missing[0]!r}; {len(missing)} image(s) without a mask)")
    orphans = sorted(set(masks) - set(images))
    if orphans:
        raise DataError(f"{masks[orphans[0]]}: mask has no image in {img_dir} ({len(orphans)} mask(s) without an image)")
    samples = []
    for stem, ipath in images.items():
        mpath = masks[stem]
        isize, msize = image_size(ipath), image_size(mpath)
        if isize != msize:
            raise DataError(
                f"{mpath}: mask size {msize[1]}x{msize[0]} does not match image {ipath.name} size {isize[1]}x{isize[0]}"
            )
        samples.append(
            Sample(stem, category, path=ipath, mask_path=mpath, mask_mode=mask_mode, num_classes=num_classes, size=isize)
        )
    return samples


def has_folder_layout(d: Path) -> bool:
    return (d / "images").is_dir() or (d / "masks").is_dir()


def load_folders(root: Path, category: str | Iterable[str] | None, mask_mode: MaskMode,
                 num_classes: int | None) -> Dataset:
    """The folder dataset at ``root`` (one category, or one per subfolder with ``images/`` and ``masks/``)."""
    if has_folder_layout(root):
        folders = {root.resolve().name: root}
    else:
        folders = {
            d.name: d
            for d in sorted(root.iterdir())
            if d.is_dir() and not d.name.startswith(".") and has_folder_layout(d)
        }
    if not folders:
        raise DataError(
            f"{root}: empty dataset: no images/ and masks/ folders and no COCO annotations "
            f"(expected {root}/<category>/images/ and masks/, {root}/images/ and masks/, or a COCO instances .json)"
        )
    if category is not None:
        wanted = [category] if isinstance(category, str) else list(category)
        unknown = [c for c in wanted if c not in folders]
        if unknown:
            raise ConfigError(f"{root}: unknown category {unknown[0]!r}; available: {', '.join(folders)}")
        folders = {c: folders[c] for c in wanted}
    by_cat = {name: scan_category(folder, name, mask_mode, num_classes) for name, folder in folders.items()}
    return Dataset(root=root, samples_by_category=by_cat, mask_mode=mask_mode)
