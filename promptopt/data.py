"""Datasets of (image, mask) pairs on disk, and deterministic splits.

This module knows files and masks, nothing about models. It turns a folder laid
out as ``<root>/<category>/{images,masks}/`` (or ``<root>/{images,masks}/`` for a
single category) into :class:`Sample` objects, checks the files up front so that
a bad dataset fails with a message naming the file, and splits each category
into a prompt pool, a validation set (what strategies optimise) and a test set
(what users should trust).

Mask conventions (``mask_mode="auto"``, decided per file):

* palette PNGs (mode ``P``, VOC style): the palette index is the class id,
  255 is "ignore";
* single-channel masks whose values are all in {0, 255}: binary, 255 is the
  foreground (class 1);
* any other single-channel mask: class ids 0..K, 255 is "ignore".

The one ambiguous case is a class-id mask that holds only background and
ignore pixels (values {0, 255}); pass ``mask_mode="classes"`` for such data.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ConfigError, DataError

IGNORE_INDEX = 255
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")
LOSSY_EXTENSIONS = (".jpg", ".jpeg", ".webp")

MaskMode = Literal["auto", "binary", "classes"]


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


def decode_mask(im: Image.Image, mode: MaskMode = "auto", path: str | Path = "<mask>") -> np.ndarray:
    """Turn a mask image into an (H, W) int64 array of class ids (255 = ignore).

    See the module docstring for the conventions ``mode="auto"`` follows.
    ``mode="binary"`` thresholds any single-channel mask at > 127 (foreground = 1)
    and keeps 255 nowhere; ``mode="classes"`` takes the values as class ids.
    """
    if im.mode == "P":
        arr = np.asarray(im, dtype=np.int64)
        if mode == "binary":  # any non-background index is the object; 255 stays "ignore"
            return np.where(arr == IGNORE_INDEX, IGNORE_INDEX, (arr > 0).astype(np.int64))
        return arr.copy()
    if im.mode in ("RGB", "RGBA"):
        rgb = np.asarray(im.convert("RGB"))
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise DataError(
                f"{path}: colour (RGB) masks are not supported; save the mask as a palette PNG "
                "(class id = palette index) or as a single-channel PNG of class ids"
            )
        arr = rgb[..., 0].astype(np.int64)
    elif im.mode == "1":
        arr = np.asarray(im, dtype=np.int64) * 255
    else:
        arr = np.asarray(im.convert("L") if im.mode not in ("L", "I", "I;16") else im).astype(np.int64)
    if mode == "binary":
        return (arr > 127).astype(np.int64)
    if mode == "auto":
        values = np.unique(arr)
        if np.isin(values, (0, 255)).all():
            return (arr == 255).astype(np.int64)
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


class Sample:
    """One labelled image: ``id`` (file stem), ``category``, ``image`` (H, W, 3) uint8, ``mask`` (H, W) int.

    Images and masks are read from ``path`` / ``mask_path`` on first access and
    then kept, so a large dataset costs memory only for what is used. A sample can
    also be built from arrays directly (``path`` is then ``None``).
    """

    __slots__ = ("id", "category", "path", "mask_path", "mask_mode", "num_classes", "_image", "_mask", "_size")

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
    ) -> None:
        if image is None and path is None:
            raise ValueError("a Sample needs an image array or a path")
        self.id = str(id)
        self.category = str(category)
        self.path = Path(path) if path is not None else None
        self.mask_path = Path(mask_path) if mask_path is not None else None
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
        return self._mask is not None or self.mask_path is not None

    @property
    def mask(self) -> np.ndarray:
        if self._mask is None:
            if self.mask_path is None:
                raise DataError(f"sample {self.key} has no mask")
            mask = read_mask(self.mask_path, self.mask_mode)
            size = self._size or self.image.shape[:2]
            if mask.shape != tuple(size):
                raise DataError(
                    f"{self.mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} does not match "
                    f"image {self.path} size {size[1]}x{size[0]}"
                )
            if self.num_classes is not None:
                check_labels(mask, self.num_classes, str(self.mask_path))
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
        for p, arr in ((self.path, self._image), (self.mask_path, self._mask)):
            if p is not None:
                h.update(Path(p).read_bytes())
            elif arr is not None:
                h.update(np.ascontiguousarray(arr).tobytes())
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


def _image_size(path: Path) -> tuple[int, int]:
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
            raise DataError(f"{d}: folder not found (expected {folder}/images/ and {folder}/masks/)")
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
        isize, msize = _image_size(ipath), _image_size(mpath)
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
    """All categories of one dataset root, each a list of :class:`Sample` sorted by id."""

    root: Path
    samples_by_category: dict[str, list[Sample]]
    mask_mode: MaskMode = "auto"
    _num_classes: dict[str, int] = field(default_factory=dict, repr=False)

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
        """Number of classes (background included) = largest class id in the category's masks + 1, at least 2."""
        cat = self.resolve_category(category)
        if cat not in self._num_classes:
            given = {s.num_classes for s in self.samples_by_category[cat]} - {None}
            if given:
                self._num_classes[cat] = int(max(given))
            else:
                top = 1
                for s in self.samples_by_category[cat]:
                    m = s.mask
                    valid = m[m != IGNORE_INDEX]
                    if valid.size:
                        top = max(top, int(valid.max()))
                self._num_classes[cat] = top + 1
        return self._num_classes[cat]

    def __len__(self) -> int:
        return sum(len(v) for v in self.samples_by_category.values())


def load_dataset(
    root: str | Path,
    category: str | Iterable[str] | None = None,
    mask_mode: MaskMode = "auto",
    num_classes: int | None = None,
) -> Dataset:
    """Scan a dataset folder and check it, without decoding pixels.

    ``root`` is either ``<root>/{images,masks}`` (one category, named after the
    folder) or ``<root>/<category>/{images,masks}``. ``category`` restricts the
    scan to one or several categories (an unknown name is an error listing the
    known ones). ``num_classes``, when given, makes any mask holding a larger
    class id an error naming the file.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"{root}: data folder not found")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    if mask_mode not in ("auto", "binary", "classes"):
        raise ConfigError(f"unknown mask mode {mask_mode!r}; use auto, binary or classes")
    if num_classes is not None and num_classes < 2:
        raise ConfigError(f"num_classes must be at least 2 (background + one class), got {num_classes}")
    if (root / "images").is_dir() or (root / "masks").is_dir():
        folders = {root.resolve().name: root}
    else:
        folders = {
            d.name: d
            for d in sorted(root.iterdir())
            if d.is_dir() and not d.name.startswith(".") and ((d / "images").is_dir() or (d / "masks").is_dir())
        }
    if not folders:
        raise DataError(
            f"{root}: empty dataset: no images/ and masks/ folders "
            f"(expected {root}/<category>/images/ and masks/, or {root}/images/ and masks/)"
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
