"""Mask files → class-id arrays: every encoding promptopt reads, and the one check of class ids.

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

from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError

IGNORE_INDEX = 255
MAX_CLASS_ID = IGNORE_INDEX - 1  # class ids are 0..254: 255 is "ignore" and masks are saved as 8-bit PNGs
MAX_INFERRED_CLASSES = 64  # more classes than this must be asked for with num_classes (see Dataset.num_classes)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")
LOSSY_EXTENSIONS = (".jpg", ".jpeg", ".webp")

MaskMode = Literal["auto", "binary", "classes"]
LABELME_HINT = "convert the LabelMe folder to COCO with labelme2coco (pip install labelme2coco; see the README)"


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
