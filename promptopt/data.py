"""Datasets of (image, mask) pairs on disk, and deterministic splits.

This module knows files and masks, nothing about models. It turns a folder laid
out as ``<root>/<category>/{images,masks}/`` (or ``<root>/{images,masks}/`` for a
single category), or COCO instances annotations (:mod:`promptopt.coco`), into
:class:`Sample` objects, checks the files up front so that a bad dataset fails
with a message naming the file, and splits each category into a prompt pool, a
validation set (what strategies optimise) and a test set (what users should
trust).

What each mask encoding becomes (class ids; 255 = ignore, never scored):

==============================  ===================================  ===============================
file                            ``mask_mode="auto"`` / ``"classes"``  ``mask_mode="binary"``
==============================  ===================================  ===============================
1-bit PNG (mode ``1``)          0 / 1 = background / object           same
palette PNG (``P``, VOC style)  palette index = class id, 255 ignore  index > 0 → 1, 255 ignore
8-bit grey, values {0, 255}     auto: 255 → 1; classes: 255 = ignore  255 → 1
16-bit grey, values {0, 65535}  auto: 65535 → 1; classes: error       65535 → 1
grey, other values (8/16-bit)   class ids 0..254, 255 = ignore;       {0,1} or {0,1,255}: as is;
                                any value > 255 is an error naming    else value > half the range
                                the file and the values               (127, or 32767 above 255)
grey RGB(A) / LA                as grey (alpha ignored)               as grey
colour RGB, alpha-only masks,   error naming the file                 error
non-integer float TIFF, other
image modes
==============================  ===================================  ===============================

``"auto"`` decides per file. Its one ambiguous case is a class-id mask that
holds only background and ignore pixels (values {0, 255}); pass
``mask_mode="classes"`` for such data. A class-id mask never yields more than
255 classes, and :meth:`Dataset.num_classes` refuses to *infer* more than
``MAX_INFERRED_CLASSES`` (typically a resized 0/255 mask read as class ids).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Protocol, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ConfigError, DataError

IGNORE_INDEX = 255
MAX_CLASS_ID = IGNORE_INDEX - 1  # class ids are 0..254: 255 is "ignore" and masks are saved as 8-bit PNGs
MAX_INFERRED_CLASSES = 64  # more classes than this must be asked for with num_classes (see Dataset.num_classes)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")
LOSSY_EXTENSIONS = (".jpg", ".jpeg", ".webp")

MaskMode = Literal["auto", "binary", "classes"]
LABELME_HINT = "convert the LabelMe folder to COCO with labelme2coco (pip install labelme2coco; see the README)"


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as an (H, W, 3) uint8 RGB array, or raise a DataError naming it."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA").convert("RGB")
            else:
                im = im.convert("RGB")
            return np.asarray(im, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable image ({exc})") from None


def _gray_values(im: Image.Image, path: str | Path) -> np.ndarray:
    """The single channel of a non-palette mask as int64, or a DataError saying why the image is no mask.

    Grey RGB(A)/LA masks are accepted (all colour channels equal); their alpha
    is ignored unless the mask lives *only* in the alpha channel (uniform colour,
    varying alpha), which is refused rather than read as an empty mask.
    """
    mode = im.mode
    if mode in ("RGB", "RGBA", "LA"):
        arr = np.asarray(im)
        colour = arr[..., :-1] if mode in ("RGBA", "LA") else arr
        if mode != "LA" and not (
            np.array_equal(colour[..., 0], colour[..., 1]) and np.array_equal(colour[..., 0], colour[..., 2])
        ):
            raise DataError(
                f"{path}: colour (RGB) masks are not supported; save the mask as a palette PNG "
                "(class id = palette index) or as a single-channel PNG of class ids"
            )
        gray = colour[..., 0]
        if mode != "RGB":
            alpha = arr[..., -1]
            if gray.min(initial=0) == gray.max(initial=0) and alpha.min(initial=255) != alpha.max(initial=255):
                raise DataError(
                    f"{path}: the mask is in the alpha channel (colour is uniform, transparency varies); "
                    "save it as a single-channel PNG (0 = background, 255 = object)"
                )
        return gray.astype(np.int64)
    if mode in ("L", "I") or mode.startswith("I;16"):
        return np.asarray(im).astype(np.int64)
    if mode == "F":
        arr = np.asarray(im)
        if not np.isfinite(arr).all() or not np.array_equal(arr, np.round(arr)):
            raise DataError(
                f"{path}: floating-point mask with non-integer values; masks hold whole class ids "
                "(0 = background, 255 = ignore) or 0/255"
            )
        return arr.astype(np.int64)
    raise DataError(
        f"{path}: unsupported mask image mode {mode!r}; save masks as 1-, 8- or 16-bit single-channel "
        "or palette PNGs"
    )


def _value_set(arr: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an int64 array (counting sort when they fit 16 bits: no full sort of the pixels)."""
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    lo, hi = int(arr.min()), int(arr.max())
    if lo >= 0 and hi <= 0xFFFF:
        return np.flatnonzero(np.bincount(arr.ravel(), minlength=hi + 1)).astype(np.int64)
    return np.unique(arr)


def _show_values(values: np.ndarray, limit: int = 5) -> str:
    shown = ", ".join(str(int(v)) for v in values[:limit])
    return f"[{shown}, ...] ({values.size} distinct)" if values.size > limit else f"[{shown}]"


def _check_class_ids(values: np.ndarray, path: str | Path) -> None:
    """Refuse values that cannot be class ids (negative, or above 255) instead of inventing thousands of classes."""
    bad = values[(values < 0) | (values > IGNORE_INDEX)]
    if bad.size:
        raise DataError(
            f"{path}: mask value(s) {_show_values(bad)} are not class ids: class-id masks hold 0..{MAX_CLASS_ID} "
            f"({IGNORE_INDEX} = ignore) and binary masks 0/255 or 0/65535; "
            "for a mask to threshold at half its range use --mask-mode binary"
        )


def _decode_binary(arr: np.ndarray, values: np.ndarray, path: str | Path) -> np.ndarray:
    """``mask_mode="binary"`` for single-channel masks (see the module docstring's table)."""
    if values.size and values.min() < 0:
        raise DataError(f"{path}: negative mask value(s) {_show_values(values[values < 0])}")
    if np.isin(values, (0, 1)).all():
        return arr.copy()
    if 1 in values and np.isin(values, (0, 1, IGNORE_INDEX)).all():
        return arr.copy()  # 0/1 class ids with 255 = ignore: already binary
    top = int(values.max())
    half = 127 if top <= 255 else 32767
    if top <= half:
        raise DataError(
            f"{path}: binary mask mode: largest value {top} is not above half the mask's range ({half}), "
            f"so no pixel would be foreground (values {_show_values(values)}); "
            "for class ids use --mask-mode auto or classes"
        )
    return (arr > half).astype(np.int64)


def decode_mask(im: Image.Image, mode: MaskMode = "auto", path: str | Path = "<mask>") -> np.ndarray:
    """Turn a mask image into an (H, W) int64 array of class ids (255 = ignore).

    The module docstring's table says what every encoding becomes in each mode.
    Values that cannot be class ids are a DataError naming ``path`` and the
    values, never a silently huge number of classes.
    """
    if im.mode in ("P", "PA"):
        arr = np.asarray(im.getchannel(0) if im.mode == "PA" else im).astype(np.int64)
        if mode == "binary":  # any non-background index is the object; 255 stays "ignore"
            return np.where(arr == IGNORE_INDEX, IGNORE_INDEX, (arr > 0).astype(np.int64))
        return arr
    if im.mode == "1":
        return np.asarray(im).astype(np.int64)  # 0/1 already: background / foreground in every mode
    arr = _gray_values(im, path)
    values = _value_set(arr)
    if mode == "binary":
        return _decode_binary(arr, values, path)
    if mode == "auto":
        for full in (255, 0xFFFF):  # 0/255 (8-bit) or 0/65535 (16-bit) alone: a binary mask
            if np.isin(values, (0, full)).all():
                return (arr == full).astype(np.int64)
    _check_class_ids(values, path)
    return arr


def read_mask(path: str | Path, mode: MaskMode = "auto") -> np.ndarray:
    """Read a mask file as an (H, W) int64 array of class ids, or raise a DataError naming it."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            return decode_mask(im, mode, path)
    except FileNotFoundError:
        raise DataError(f"{path}: mask file not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable mask ({exc})") from None


def check_labels(mask: np.ndarray, num_classes: int, where: str) -> None:
    """Raise a DataError if ``mask`` holds a class id outside 0..num_classes-1 (255 is allowed)."""
    bad = (mask >= num_classes) & (mask != IGNORE_INDEX) | (mask < 0)
    if bad.any():
        values = sorted(int(v) for v in np.unique(mask[bad]))[:5]
        raise DataError(
            f"{where}: class id(s) {values} out of range for {num_classes} classes "
            f"(valid ids are 0..{num_classes - 1}, and {IGNORE_INDEX} = ignore)"
        )


class MaskSource(Protocol):
    """Where a sample's mask comes from when it is not a mask file (e.g. COCO annotations).

    ``load()`` returns the (H, W) int64 class-id mask (255 = ignore), raising a
    DataError that names the source on bad data; ``fingerprint()`` returns bytes
    that change whenever the mask would; ``str(source)`` names it in messages.
    """

    def load(self) -> np.ndarray: ...

    def fingerprint(self) -> bytes: ...


class Sample:
    """One labelled image: ``id`` (file stem), ``category``, ``image`` (H, W, 3) uint8, ``mask`` (H, W) int.

    Images and masks are read from ``path`` / ``mask_path`` (or ``mask_source``,
    e.g. COCO annotations) on first access and then kept, so a large dataset
    costs memory only for what is used. A sample can also be built from arrays
    directly (``path`` is then ``None``).
    """

    __slots__ = ("id", "category", "path", "mask_path", "mask_source", "mask_mode", "num_classes",
                 "_image", "_mask", "_size")

    def __init__(
        self,
        id: str,
        category: str = "",
        image: np.ndarray | None = None,
        mask: np.ndarray | None = None,
        path: str | Path | None = None,
        mask_path: str | Path | None = None,
        mask_mode: MaskMode = "auto",
        num_classes: int | None = None,
        size: tuple[int, int] | None = None,
        mask_source: MaskSource | None = None,
    ) -> None:
        if image is None and path is None:
            raise ValueError("a Sample needs an image array or a path")
        self.id = str(id)
        self.category = str(category)
        self.path = Path(path) if path is not None else None
        self.mask_path = Path(mask_path) if mask_path is not None else None
        self.mask_source = mask_source
        self.mask_mode: MaskMode = mask_mode
        self.num_classes = num_classes
        self._image = None if image is None else np.ascontiguousarray(image, dtype=np.uint8)
        self._mask = None if mask is None else np.asarray(mask, dtype=np.int64)
        if self._image is not None:
            if self._image.ndim != 3 or self._image.shape[2] != 3:
                raise DataError(f"sample {self.key}: image must be (H, W, 3), got {self._image.shape}")
            size = self._image.shape[:2]
        if self._mask is not None and size is not None and tuple(self._mask.shape) != tuple(size):
            raise DataError(f"sample {self.key}: mask size {self._mask.shape} != image size {tuple(size)}")
        self._size = tuple(size) if size is not None else None

    @property
    def key(self) -> str:
        """Identity used by caches: ``category/id`` (ids are only unique within a category)."""
        return f"{self.category}/{self.id}" if self.category else self.id

    @property
    def image(self) -> np.ndarray:
        if self._image is None:
            self._image = read_image(self.path)
            if self._size is not None and self._image.shape[:2] != self._size:
                raise DataError(f"{self.path}: image size changed on disk since the dataset was scanned")
        return self._image

    @property
    def has_mask(self) -> bool:
        return self._mask is not None or self.mask_path is not None or self.mask_source is not None

    @property
    def mask(self) -> np.ndarray:
        if self._mask is None:
            if self.mask_path is not None:
                mask, where = read_mask(self.mask_path, self.mask_mode), str(self.mask_path)
            elif self.mask_source is not None:
                mask, where = self.mask_source.load(), str(self.mask_source)
            else:
                raise DataError(f"sample {self.key} has no mask")
            size = self._size or self.image.shape[:2]
            if mask.shape != tuple(size):
                raise DataError(
                    f"{where}: mask size {mask.shape[1]}x{mask.shape[0]} does not match "
                    f"image {self.path} size {size[1]}x{size[0]}"
                )
            if self.num_classes is not None:
                check_labels(mask, self.num_classes, where)
            self._mask = mask
        return self._mask

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) without decoding the image when the header was already read."""
        if self._size is None:
            self._size = tuple(self.image.shape[:2])
        return self._size

    def fingerprint(self) -> str:
        """A content hash of image and mask bytes (for index manifests and caches that outlive a run)."""
        h = hashlib.sha1()
        if self.path is not None:
            h.update(self.path.read_bytes())
        elif self._image is not None:
            h.update(np.ascontiguousarray(self._image).tobytes())
        if self.mask_path is not None:
            h.update(self.mask_path.read_bytes())
        elif self.mask_source is not None:
            h.update(self.mask_source.fingerprint())
        elif self._mask is not None:
            h.update(np.ascontiguousarray(self._mask).tobytes())
        return h.hexdigest()

    def __repr__(self) -> str:
        return f"Sample({self.key!r})"


def _files_by_stem(folder: Path, extensions: Sequence[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in extensions:
            if p.stem in out:
                raise DataError(f"{folder}: two files share the stem {p.stem!r} ({out[p.stem].name}, {p.name})")
            out[p.stem] = p
    return out


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image file from its header (no decoding), or a DataError naming it."""
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable image ({exc})") from None


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


@dataclass
class Dataset:
    """All categories of one dataset, each a list of :class:`Sample` sorted by id.

    ``root`` is the dataset folder, or the annotations file of a COCO dataset
    (whose images are under ``images_root``). ``class_names`` holds, per
    category, the name of each class id when the source names them (COCO:
    ``["background", "cat", ...]``); folder datasets leave it empty.
    """

    root: Path
    samples_by_category: dict[str, list[Sample]]
    mask_mode: MaskMode = "auto"
    _num_classes: dict[str, int] = field(default_factory=dict, repr=False)
    images_root: Path | None = None
    class_names: dict[str, list[str]] = field(default_factory=dict)

    @property
    def categories(self) -> list[str]:
        return list(self.samples_by_category)

    def samples(self, category: str | None = None) -> list[Sample]:
        """Samples of one category (or of the only one when ``category`` is None)."""
        return self.samples_by_category[self.resolve_category(category)]

    def resolve_category(self, category: str | None) -> str:
        if category is None:
            if len(self.samples_by_category) != 1:
                raise ConfigError(
                    f"{self.root}: holds {len(self.categories)} categories; choose one with --category "
                    f"({', '.join(self.categories[:10])}{', ...' if len(self.categories) > 10 else ''})"
                )
            return self.categories[0]
        if category not in self.samples_by_category:
            raise ConfigError(
                f"{self.root}: unknown category {category!r}; available: {', '.join(self.categories)}"
            )
        return category

    def num_classes(self, category: str | None = None) -> int:
        """Number of classes (background included): given at load, or the largest class id in the masks + 1 (≥ 2).

        An inferred count above ``MAX_INFERRED_CLASSES`` is an error naming the
        mask with the largest id: such masks are far more often resized /
        anti-aliased 0-255 masks or instance ids than that many real classes,
        and every class costs the backends memory and time. Pass
        ``num_classes`` (``--num-classes``) to confirm a large count.
        """
        cat = self.resolve_category(category)
        if cat not in self._num_classes:
            given = {s.num_classes for s in self.samples_by_category[cat]} - {None}
            if given:
                self._num_classes[cat] = int(max(given))
            else:
                top, where = 1, None
                for s in self.samples_by_category[cat]:
                    m = s.mask
                    valid = m[m != IGNORE_INDEX]
                    if valid.size and int(valid.max()) > top:
                        top, where = int(valid.max()), s.mask_path or s.mask_source or s.key
                if top + 1 > MAX_INFERRED_CLASSES:
                    raise DataError(
                        f"{where}: holds class id {top}, the largest in category {cat!r}, which would make a "
                        f"{top + 1}-class task (more than {MAX_INFERRED_CLASSES} are not inferred); if these are "
                        f"class ids pass --num-classes {top + 1}, if this is a resized or anti-aliased 0/255 mask "
                        "use --mask-mode binary"
                    )
                self._num_classes[cat] = top + 1
        return self._num_classes[cat]

    def __len__(self) -> int:
        return sum(len(v) for v in self.samples_by_category.values())


def _has_folder_layout(d: Path) -> bool:
    return (d / "images").is_dir() or (d / "masks").is_dir()


def _annotation_files(folder: Path) -> list[Path]:
    """JSON files directly in ``folder`` or in ``folder/annotations/`` (where COCO and CVAT exports keep them)."""
    found = []
    for d in (folder, folder / "annotations"):
        if d.is_dir():
            found += [p for p in sorted(d.iterdir()) if p.is_file() and p.suffix.lower() == ".json"
                      and not p.name.startswith(".")]
    return found


def _is_labelme(path: Path) -> bool:
    """Whether a JSON file is a LabelMe annotation (one per image: 'shapes' and 'imagePath'), for a better error."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and "shapes" in doc and "imagePath" in doc


def _coco_source(source: Path) -> Path | None:
    """The COCO annotations file ``source`` designates, or None for a folder dataset.

    A ``.json`` file is COCO. A folder is a folder dataset when it has
    ``masks/`` or category subfolders; otherwise (e.g. ``images/`` and
    ``annotations/instances_default.json``, CVAT's COCO export) it is COCO when
    it holds exactly one JSON file, directly or in ``annotations/``.
    """
    if source.is_file():
        suffix = source.suffix.lower()
        if suffix == ".json":
            return source
        if suffix == ".xml":
            raise DataError(
                f"{source}: XML annotations (CVAT, Pascal VOC) are not read; export the task as COCO 1.0 "
                "(CVAT) or save the masks as PNG files"
            )
        raise DataError(f"{source}: not a dataset folder or a COCO annotations .json file")
    if (source / "masks").is_dir():
        return None
    if any(d.is_dir() and not d.name.startswith(".") and _has_folder_layout(d) for d in source.iterdir()):
        return None
    candidates = _annotation_files(source)
    if len(candidates) > 1:
        if _is_labelme(candidates[0]):
            raise DataError(
                f"{source}: holds LabelMe annotations ({candidates[0].name}, ...), not COCO; {LABELME_HINT}"
            )
        raise DataError(
            f"{source}: holds several JSON files ({', '.join(str(p.relative_to(source)) for p in candidates[:6])}"
            f"{', ...' if len(candidates) > 6 else ''}); pass the COCO instances file itself"
        )
    return candidates[0] if candidates else None


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
    (default: see :func:`promptopt.coco.default_images_dir`), ``category`` a
    name or id (one binary task), ``"a,b"`` (one semantic task, classes 1..K in
    that order) or a list of those. Images without an annotation of the task
    are dropped by default (the few-shot convention: every image shows the
    object); ``keep_empty=True`` keeps them as all-background masks (negatives,
    e.g. to tune PerSAM's absent-object threshold). See :mod:`promptopt.coco`.
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
    coco = _coco_source(root)
    if coco is not None:
        from .coco import load_coco

        return load_coco(coco, images=images, category=category, mask_mode=mask_mode, num_classes=num_classes,
                         keep_empty=bool(keep_empty))
    if images is not None:
        raise ConfigError(
            f"{root}: --images is for COCO annotations; a folder dataset keeps its images in "
            "<category>/images/ next to <category>/masks/"
        )
    if keep_empty is False:
        raise ConfigError(f"{root}: dropping images without annotations applies to COCO annotations only")
    if _has_folder_layout(root):
        folders = {root.resolve().name: root}
    else:
        folders = {
            d.name: d
            for d in sorted(root.iterdir())
            if d.is_dir() and not d.name.startswith(".") and _has_folder_layout(d)
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


@dataclass(frozen=True)
class Split:
    """A category's samples divided into prompt ``pool``, ``val`` (optimised on) and ``test`` (held out)."""

    pool: list[Sample]
    val: list[Sample]
    test: list[Sample]

    def ids(self) -> dict[str, list[str]]:
        return {"pool": [s.id for s in self.pool], "val": [s.id for s in self.val], "test": [s.id for s in self.test]}

    def find_pool(self, ids: Sequence[str]) -> list[Sample]:
        """Pool samples with the given ids, in that order; an id outside the pool is a clear error."""
        by_id = {s.id: s for s in self.pool}
        out = []
        for i in ids:
            if i not in by_id:
                where = "val" if i in {s.id for s in self.val} else "test" if i in {s.id for s in self.test} else None
                hint = f" (it is in the {where} split)" if where else ""
                raise ConfigError(
                    f"prompt id {i!r} is not in the prompt pool{hint}; pool ids: {', '.join(sorted(by_id)[:20])}"
                    f"{', ...' if len(by_id) > 20 else ''}"
                )
            out.append(by_id[i])
        return out


def _count(spec: float | int | None, n: int, name: str) -> int | None:
    if spec is None:
        return None
    if isinstance(spec, bool) or spec < 0:
        raise ConfigError(f"split size {name}={spec!r} must be a non-negative count or fraction")
    if isinstance(spec, int) or (isinstance(spec, float) and spec.is_integer() and spec > 1):
        return int(spec)
    if spec > 1:
        raise ConfigError(f"split size {name}={spec!r}: fractions must be in [0, 1]")
    return int(math.floor(spec * n + 0.5))


def split_samples(
    samples: Sequence[Sample],
    pool: float | int = 0.5,
    val: float | int = 0.25,
    test: float | int | None = None,
    seed: int = 0,
) -> Split:
    """Split one category deterministically: same samples + same seed = same split.

    Sizes are counts (int) or fractions of the category (float in [0, 1]);
    ``test=None`` takes the rest. Samples are ordered by id before a seeded
    shuffle, so the split does not depend on file-system order. When fractions
    are used, each part gets at least one sample if the category is big enough.
    """
    ordered = sorted(samples, key=lambda s: s.id)
    n = len(ordered)
    if n == 0:
        raise DataError("cannot split an empty category")
    n_pool, n_val, n_test = _count(pool, n, "pool"), _count(val, n, "val"), _count(test, n, "test")
    fractions = not isinstance(pool, int) or not isinstance(val, int)
    if fractions and n >= 3:
        n_pool, n_val = max(n_pool, 1), max(n_val, 1)
        if n_test is None and n - n_pool - n_val < 1 and (test is None or test > 0):
            if n_pool >= n_val and n_pool > 1:
                n_pool -= 1
            else:
                n_val -= 1
    if n_test is None:
        n_test = n - n_pool - n_val
    if n_pool + n_val + n_test > n or n_test < 0:
        raise ConfigError(f"split sizes pool={n_pool}, val={n_val}, test={n_test} exceed the {n} samples of the category")
    if n_pool == 0:
        raise ConfigError(f"the prompt pool is empty (category of {n} samples, pool={pool!r})")
    order = np.random.default_rng(seed).permutation(n)
    shuffled = [ordered[i] for i in order]
    part = lambda a, b: sorted(shuffled[a:b], key=lambda s: s.id)  # noqa: E731
    return Split(
        pool=part(0, n_pool),
        val=part(n_pool, n_pool + n_val),
        test=part(n_pool + n_val, n_pool + n_val + n_test),
    )


def bundled_sample_root() -> Path:
    """Folder of the small DAVIS 2016 subset shipped with the package (see its README for licence)."""
    return Path(__file__).parent / "sample_data" / "davis_mini"


def bundled_sample_coco() -> Path:
    """The bundled sample's masks as a COCO instances file (RLE; one crowd region on camel/00000)."""
    return bundled_sample_root() / "annotations" / "instances.json"


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
        # the file name (not the stem) is the id: 00000.jpg and 00000.png are two images, never one cache entry
        out.append(Sample(p.name, f"query:{p.parent.resolve()}", image=img, path=p))
    return out
