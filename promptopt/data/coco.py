"""COCO instances annotations as promptopt datasets, rasterised by pycocotools.

Most labelled segmentation data comes as a COCO *instances* file (CVAT, Label
Studio, Roboflow and labelme2coco all export it): ``images`` (``id``,
``file_name``, ``width``, ``height``), ``categories`` (``id``, ``name``) and
``annotations`` whose ``segmentation`` is polygons, an uncompressed RLE (a list
of run lengths, the usual form of crowd regions) or a compressed RLE (a
string). This module turns such a file into the same :class:`~promptopt.data.Dataset`
of :class:`~promptopt.data.Sample` objects as a mask folder, so splits, the
oracle and every strategy work unchanged. Decoding is pycocotools' (the
reference implementation); this module only validates and composes.

Conventions (the README repeats them):

* **Images**: ``file_name`` is relative to the images folder: the ``images``
  argument, else :func:`default_images_dir`.
* **Tasks**: a category (by name, or by id when no name matches) is one binary
  task: class 1 = that category. ``"a,b"`` is one semantic task with classes
  1..K in the order given; with ``mask_mode="binary"`` it is one binary task
  whose object is any of them. ``category=None`` loads every category as its
  own binary task. The dataset's category key is the name (``"a,b"`` for a
  semantic task), and ``Dataset.class_names`` names each class id.
* **Images without an annotation of the task** are dropped by default (the
  few-shot benchmark convention: every image of a task shows the object; a
  prompt drawn from an empty image teaches nothing). ``keep_empty=True`` keeps
  them as all-background masks (negative examples, "the object is absent",
  since a COCO file lists every image that was looked at).
* **Crowd regions** (``iscrowd=1``) are 255 = ignore, except where a non-crowd
  annotation of the task covers the pixel. Pixels claimed by non-crowd
  annotations of two *different* classes are ignore too: the file does not say
  which is right.
* **Sample ids** are file stems when those are unique within the task, else
  the relative path without extension with ``/`` written ``__``.

Checked at load, each a one-line :class:`~promptopt.errors.DataError` naming
the file: missing or invalid JSON, a file that is not an instances file
(LabelMe, panoptic, captions, results and prompt files are recognised and named),
malformed image / category / annotation entries, annotations pointing to an
unknown image or category, annotations without a mask, RLE sizes that differ
from the image's, missing image files, and image sizes that differ from the
JSON's ``width`` / ``height``. Segmentations are decoded on first use of
``sample.mask``; a malformed one then fails naming the file and annotation id.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

import numpy as np
from pycocotools import mask as mask_utils

from ..errors import ConfigError, DataError
from .folders import has_folder_layout
from .masks import IGNORE_INDEX, LABELME_HINT, MaskMode
from .samples import Dataset, Sample, image_size


# --------------------------------------------------------------------------------------------------
# the file
# --------------------------------------------------------------------------------------------------
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


def coco_source(source: Path) -> Path | None:
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
    if any(d.is_dir() and not d.name.startswith(".") and has_folder_layout(d) for d in source.iterdir()):
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


def read_annotations(path: str | Path) -> dict[str, Any]:
    """Parse a COCO instances JSON file, or raise a DataError naming it and saying what it is instead."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: annotations file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not an annotations file") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    _check_instances(doc, path)
    return doc


def _check_instances(doc: Any, path: Path) -> None:
    expected = "expected a COCO instances file: a JSON object with 'images', 'annotations' and 'categories' lists"
    if isinstance(doc, list):
        kind = "a COCO results file (a list of detections)" if doc and isinstance(doc[0], dict) and "image_id" in doc[0] \
            else "a JSON list"
        raise DataError(f"{path}: {kind}, not an instances file; {expected}")
    if not isinstance(doc, dict):
        raise DataError(f"{path}: a JSON {type(doc).__name__}, not an instances file; {expected}")
    if "shapes" in doc and "imagePath" in doc:
        raise DataError(f"{path}: a LabelMe annotation, not COCO; {LABELME_HINT}")
    if "examples" in doc and "backend" in doc:
        raise DataError(f"{path}: a promptopt prompt file, not annotations; {expected}")
    anns = doc.get("annotations")
    if isinstance(anns, list) and anns and isinstance(anns[0], dict):
        if "segments_info" in anns[0]:
            raise DataError(f"{path}: a COCO panoptic file, not an instances file; {expected}")
        if "caption" in anns[0] and "segmentation" not in anns[0]:
            raise DataError(f"{path}: a COCO captions file, not an instances file; {expected}")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(doc.get(k), list)]
    if missing:
        raise DataError(f"{path}: not a COCO instances file (no {' / '.join(repr(k) for k in missing)} list); {expected}")


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class _Image:
    id: int
    file_name: str
    height: int
    width: int


def _images(doc: dict, path: Path) -> dict[int, _Image]:
    out: dict[int, _Image] = {}
    by_name: dict[str, int] = {}
    for i, e in enumerate(doc["images"]):
        if not isinstance(e, dict) or not _int(e.get("id")):
            raise DataError(f"{path}: images[{i}] has no integer 'id'")
        name, w, h = e.get("file_name"), e.get("width"), e.get("height")
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{path}: image id {e['id']} has no 'file_name'")
        if not (_int(w) and _int(h) and w > 0 and h > 0):
            raise DataError(f"{path}: image id {e['id']} ({name}) needs positive integer 'width' and 'height', "
                            f"got {w!r} x {h!r}")
        if e["id"] in out:
            raise DataError(f"{path}: image id {e['id']} is listed twice ({out[e['id']].file_name}, {name})")
        name = name.replace("\\", "/")  # Windows exports
        if name in by_name:
            raise DataError(f"{path}: file_name {name!r} is listed twice (image ids {by_name[name]} and {e['id']})")
        by_name[name] = e["id"]
        out[e["id"]] = _Image(e["id"], name, h, w)
    if not out:
        raise DataError(f"{path}: lists no images")
    return out


def _categories(doc: dict, path: Path) -> dict[int, str]:
    out: dict[int, str] = {}
    for i, c in enumerate(doc["categories"]):
        if not isinstance(c, dict) or not _int(c.get("id")) or not isinstance(c.get("name"), str) or not c["name"]:
            raise DataError(f"{path}: categories[{i}] needs an integer 'id' and a 'name'")
        if c["id"] in out:
            raise DataError(f"{path}: category id {c['id']} is listed twice ({out[c['id']]!r}, {c['name']!r})")
        out[c["id"]] = c["name"]
    if not out:
        raise DataError(f"{path}: lists no categories")
    return out


@dataclass(frozen=True)
class _Region:
    """One annotation of a task, ready to rasterise: which class, crowd or not, and its segmentation."""

    ann_id: Any
    class_id: int
    crowd: bool
    segmentation: Any


def _annotations(doc: dict, path: Path, images: dict[int, _Image], categories: dict[int, str]) -> list[dict]:
    """The annotation list, each entry checked to point to a known image and category."""
    anns = doc["annotations"]
    for i, a in enumerate(anns):
        if not isinstance(a, dict):
            raise DataError(f"{path}: annotations[{i}] is not an object")
        ann = a.get("id", f"#{i}")
        if not _int(a.get("image_id")) or a["image_id"] not in images:
            raise DataError(f"{path}: annotation {ann} points to unknown image id {a.get('image_id')!r}")
        if not _int(a.get("category_id")) or a["category_id"] not in categories:
            raise DataError(f"{path}: annotation {ann} points to unknown category id {a.get('category_id')!r}")
        if a.get("iscrowd", 0) not in (0, 1):
            raise DataError(f"{path}: annotation {ann}: 'iscrowd' must be 0 or 1, got {a.get('iscrowd')!r}")
    return anns


def _check_segmentation(a: dict, index: int, image: _Image, path: Path) -> None:
    """Cheap structural checks at load; the coordinates and run lengths are checked when rasterised."""
    where = f"{path}: annotation {a.get('id', f'#{index}')} (image {image.file_name})"
    seg = a.get("segmentation")
    if seg is None or (isinstance(seg, list) and not seg):
        raise DataError(f"{where} has no segmentation (boxes only?); promptopt needs masks: polygons or RLE")
    if isinstance(seg, list):
        if not all(isinstance(p, list) and len(p) % 2 == 0 for p in seg):
            raise DataError(f"{where}: polygons must be lists of x, y coordinates (an even count of numbers)")
    elif isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(_int(v) for v in size)):
            raise DataError(f"{where}: an RLE needs 'size': [height, width], got {size!r}")
        if size != [image.height, image.width]:
            raise DataError(f"{where}: RLE size {size[1]}x{size[0]} (width x height) differs from the image's "
                            f"{image.width}x{image.height}")
        if isinstance(counts, list):
            if not all(_int(v) and v >= 0 for v in counts):
                raise DataError(f"{where}: uncompressed RLE counts must be non-negative integers")
        elif not isinstance(counts, str):
            raise DataError(f"{where}: RLE 'counts' must be a list of run lengths or a compressed string")
    else:
        raise DataError(f"{where}: segmentation must be polygons (a list) or an RLE (an object), "
                        f"got {type(seg).__name__}")


# --------------------------------------------------------------------------------------------------
# rasterising one image's mask
# --------------------------------------------------------------------------------------------------
def rle_string_counts(counts: str | bytes) -> list[int]:
    """Run lengths of a compressed COCO RLE string (the inverse of pycocotools' string encoding).

    Used only to check that the runs cover exactly height x width pixels before
    pycocotools decodes them: its decoder fills a too-short RLE's tail from
    uninitialised memory instead of failing. Raises ValueError on a malformed string.
    """
    s = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    out: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            if p >= len(s):
                raise ValueError("the string ends inside a run length")
            c = s[p] - 48
            if not 0 <= c < 64:
                raise ValueError(f"character {chr(s[p])!r} is not part of the RLE alphabet")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def _region_rle(seg: Any, h: int, w: int, where: str) -> dict | None:
    """A pycocotools RLE of one segmentation (None when its polygons enclose no area)."""
    if isinstance(seg, list):
        polys = []
        for p in seg:
            try:
                xy = np.asarray(p, dtype=np.float64)
            except (TypeError, ValueError):
                raise DataError(f"{where}: polygon coordinates must be numbers") from None
            if xy.ndim != 1 or not np.isfinite(xy).all():
                raise DataError(f"{where}: polygon coordinates must be finite numbers")
            if xy.size >= 6:  # fewer than 3 points enclose nothing (and pycocotools reads 4 numbers as a box)
                polys.append(xy.tolist())
        return mask_utils.merge(mask_utils.frPyObjects(polys, h, w)) if polys else None
    counts = seg["counts"]
    if isinstance(counts, list):
        runs = counts
    else:
        try:
            runs = rle_string_counts(counts)
        except (ValueError, UnicodeEncodeError) as exc:
            raise DataError(f"{where}: invalid compressed RLE ({exc})") from None
        if min(runs, default=0) < 0:
            raise DataError(f"{where}: invalid compressed RLE (negative run length)")
    if sum(runs) != h * w:
        raise DataError(f"{where}: RLE run lengths cover {sum(runs)} pixels, not height x width = {h * w}")
    if isinstance(counts, list):
        return mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    return {"size": [h, w], "counts": counts.encode("ascii")}


def _rasterise(seg: Any, h: int, w: int, where: str) -> np.ndarray:
    rle = _region_rle(seg, h, w, where)
    if rle is None:
        return np.zeros((h, w), dtype=bool)
    try:
        with warnings.catch_warnings():  # pycocotools' own numpy-2 "__array__ copy" deprecation, not ours
            warnings.simplefilter("ignore", DeprecationWarning)
            return mask_utils.decode(rle).astype(bool)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{where}: invalid segmentation ({exc})") from None


class CocoMask:
    """The mask of one image for one task, rasterised from its annotations on first use (a ``MaskSource``)."""

    __slots__ = ("annotations", "image", "regions")

    def __init__(self, annotations: Path, image: _Image, regions: tuple[_Region, ...]) -> None:
        self.annotations = annotations
        self.image = image
        self.regions = regions

    def load(self) -> np.ndarray:
        h, w = self.image.height, self.image.width
        label = np.zeros((h, w), dtype=np.int64)
        conflict = np.zeros((h, w), dtype=bool)
        crowd = np.zeros((h, w), dtype=bool)
        for r in self.regions:
            m = _rasterise(r.segmentation, h, w, f"{self.annotations}: annotation {r.ann_id} (image "
                                                 f"{self.image.file_name})")
            if r.crowd:
                crowd |= m
                continue
            conflict |= m & (label != 0) & (label != r.class_id)
            label[m & (label == 0)] = r.class_id
        label[crowd & (label == 0)] = IGNORE_INDEX
        label[conflict] = IGNORE_INDEX
        return label

    def fingerprint(self) -> bytes:
        doc = [self.image.height, self.image.width,
               [[r.class_id, r.crowd, r.segmentation] for r in self.regions]]
        return json.dumps(doc, sort_keys=True, default=str).encode()

    def __str__(self) -> str:
        return f"{self.annotations} (image {self.image.file_name})"


# --------------------------------------------------------------------------------------------------
# tasks, samples, dataset
# --------------------------------------------------------------------------------------------------
def default_images_dir(annotations: str | Path) -> Path:
    """Where ``file_name`` entries are looked up when no images folder is given.

    The base is the JSON's folder, or its parent when that folder is named
    ``annotations`` (COCO's and CVAT's layout). Then, first that exists:
    ``<base>/<split>/`` for ``instances_<split>.json`` (COCO:
    ``annotations/instances_val2017.json`` → ``val2017/``), ``<base>/images/``
    (CVAT's COCO 1.0 export), ``<base>`` itself.
    """
    annotations = Path(annotations)
    base = annotations.parent.parent if annotations.parent.name == "annotations" else annotations.parent
    stem = annotations.stem
    if stem.startswith("instances_") and (base / stem[len("instances_"):]).is_dir():
        return base / stem[len("instances_"):]
    if (base / "images").is_dir():
        return base / "images"
    return base


def _resolve_one(name: str, categories: dict[int, str], path: Path) -> int:
    ids = [cid for cid, n in categories.items() if n == name]
    if len(ids) > 1:
        raise ConfigError(f"{path}: category name {name!r} is used by ids {ids}; choose one by id")
    if ids:
        return ids[0]
    text = name.strip()
    if text.lstrip("-").isdigit() and int(text) in categories:
        return int(text)
    shown = ", ".join(sorted(set(categories.values()))[:30])
    more = ", ..." if len(set(categories.values())) > 30 else ""
    raise ConfigError(f"{path}: unknown category {name!r}; available: {shown}{more} (or their ids)")


def _tasks(category: str | int | Iterable[str | int] | None, categories: dict[int, str], path: Path) -> list[list[int]]:
    """The category ids of each task: one list per requested task, in the order given."""
    if category is None:
        names = list(categories.values())
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise DataError(f"{path}: several categories are named {dupes[0]!r}; choose categories by id")
        return [[cid] for cid in categories]
    specs = [str(c) for c in ([category] if isinstance(category, (str, int)) else category)]  # ids may be ints
    tasks = []
    for spec in specs:
        if any(n == spec for n in categories.values()) or "," not in spec:
            tasks.append([_resolve_one(spec, categories, path)])
            continue
        ids = [_resolve_one(part.strip(), categories, path) for part in spec.split(",") if part.strip()]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"{path}: category {spec!r} names a category twice")
        tasks.append(ids)
    return tasks


def _unique_ids(file_names: list[str]) -> list[str]:
    """Stems when they are unique, else relative paths without extension (``/`` → ``__``), else with it."""
    stems = [PurePosixPath(n).stem for n in file_names]
    if len(set(stems)) == len(stems):
        return stems
    paths = [str(PurePosixPath(n).with_suffix("")).replace("/", "__") for n in file_names]
    if len(set(paths)) == len(paths):
        return paths
    return [p + "_" + PurePosixPath(n).suffix.lstrip(".") for p, n in zip(paths, file_names)]


def _check_image_file(path: Path, image: _Image, annotations: Path, images_dir: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: image file not found (image id {image.id} of {annotations}; file names are "
                        f"looked up in {images_dir}, pass the images folder with --images)")
    h, w = image_size(path)
    if (h, w) != (image.height, image.width):
        hint = " (an EXIF rotation? save the image rotated)" if (h, w) == (image.width, image.height) else ""
        raise DataError(f"{path}: image size {w}x{h} differs from the width x height {image.width}x{image.height} "
                        f"recorded in {annotations}{hint}")


def load_coco(
    annotations: str | Path,
    images: str | Path | None = None,
    category: str | Iterable[str] | None = None,
    mask_mode: MaskMode = "auto",
    num_classes: int | None = None,
    keep_empty: bool = False,
) -> Dataset:
    """A :class:`~promptopt.data.Dataset` of one task per requested category (see the module docstring).

    Reads the JSON and every used image's header (size check); masks are
    rasterised on first access. ``num_classes``, when given, must equal the
    task's (2 for a binary task, K + 1 for K categories).
    """
    path = Path(annotations).expanduser()
    doc = read_annotations(path)
    imgs = _images(doc, path)
    cats = _categories(doc, path)
    anns = _annotations(doc, path, imgs, cats)
    images_dir = Path(images).expanduser() if images is not None else default_images_dir(path)
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: images folder not found")
    by_category: dict[int, list[int]] = {}  # so that each task touches only its own annotations
    for i, a in enumerate(anns):
        by_category.setdefault(a["category_id"], []).append(i)

    by_cat: dict[str, list[Sample]] = {}
    names: dict[str, list[str]] = {}
    checked: set[int] = set()
    for cat_ids in _tasks(category, cats, path):
        key = ",".join(cats[c] for c in cat_ids)
        binary = mask_mode == "binary" or len(cat_ids) == 1
        class_of = {c: 1 if binary else k + 1 for k, c in enumerate(cat_ids)}
        n_classes = 2 if binary else len(cat_ids) + 1
        if num_classes is not None and num_classes != n_classes:
            raise ConfigError(f"{path}: category {key!r} is a {n_classes}-class task (background + "
                              f"{n_classes - 1}), not {num_classes} classes")
        regions: dict[int, list[_Region]] = {}
        for c in cat_ids:
            for i in by_category.get(c, ()):
                a = anns[i]
                _check_segmentation(a, i, imgs[a["image_id"]], path)
                regions.setdefault(a["image_id"], []).append(
                    _Region(a.get("id", f"#{i}"), class_of[c], bool(a.get("iscrowd", 0)), a["segmentation"]))
        picked = [(img, tuple(regions.get(img.id, ()))) for img in imgs.values() if keep_empty or img.id in regions]
        if not picked:
            raise DataError(f"{path}: no image has an annotation of category {key!r}")
        samples = []
        for (img, regions), sid in zip(picked, _unique_ids([img.file_name for img, _ in picked])):
            file = images_dir / img.file_name
            if img.id not in checked:
                _check_image_file(file, img, path, images_dir)
                checked.add(img.id)
            samples.append(Sample(sid, key, path=file, mask_source=CocoMask(path, img, regions),
                                  num_classes=n_classes, size=(img.height, img.width)))
        by_cat[key] = sorted(samples, key=lambda s: s.id)
        names[key] = ["background"] + ([key] if binary else [cats[c] for c in cat_ids])
    return Dataset(root=path, samples_by_category=by_cat, mask_mode=mask_mode, images_root=images_dir,
                   class_names=names)
