"""Labelled images: :class:`Sample` (pixels read on first use), :class:`Dataset` (samples by category), and
unlabelled query images read from a folder.

Why a module of its own: every stage below the data (backends, oracle,
strategies) holds samples, never files; this is the one place that turns a file
into pixels, so a bad file is reported by name before any model runs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ConfigError, DataError
from .masks import IGNORE_INDEX, IMAGE_EXTENSIONS, MAX_INFERRED_CLASSES, MaskMode, check_labels, read_mask


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


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image file from its header (no decoding), or a DataError naming it."""
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable image ({exc})") from None


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


def bundled_sample_root() -> Path:
    """Folder of the small DAVIS 2016 subset shipped with the package (see its README for licence)."""
    return Path(__file__).resolve().parent.parent / "sample_data" / "davis_mini"


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
