"""Write the bundled sample's COCO instances file from its own PNG masks.

    python scripts/make_sample_coco.py

Reads promptopt/sample_data/davis_mini/<object>/{images,masks}/ and writes
promptopt/sample_data/davis_mini/annotations/instances.json: one category per
object (ids 1..4 in name order), one image entry per frame (``file_name``
relative to davis_mini/), and one annotation per mask as a compressed RLE made
by pycocotools' encoder. One frame (CROWD_FRAME) is annotated twice instead:
the right third of its object as a crowd region (``iscrowd=1``, uncompressed RLE,
COCO's convention for crowds), the rest as a normal annotation, so loading the
file gives that frame's folder mask with 255 (ignore) on the crowd part.
The tests load the file both ways and compare. Deterministic: rerunning it
gives the same bytes.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from promptopt.data import bundled_sample_root, load_dataset  # noqa: E402

CROWD_FRAME = ("camel", "00000")


def runs(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts: alternating background / object run lengths in column-major order."""
    flat = np.asarray(mask, dtype=np.uint8).ravel(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    edges = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(edges).tolist()
    return ([0] + counts) if flat[0] else counts


def annotation(ann_id: int, image_id: int, category_id: int, mask: np.ndarray, crowd: bool) -> dict:
    m = np.asfortranarray(mask.astype(np.uint8))
    rle = mask_utils.encode(m)
    if crowd:
        seg = {"size": list(mask.shape), "counts": runs(mask)}
        check = mask_utils.decode(mask_utils.frPyObjects(seg, *mask.shape))
        assert np.array_equal(check, m), "uncompressed RLE does not round-trip"
    else:
        seg = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "segmentation": seg,
            "area": int(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            "iscrowd": int(crowd)}


def main() -> None:
    root = bundled_sample_root()
    ds = load_dataset(root)
    images, annotations, categories = [], [], []
    for cat_id, cat in enumerate(ds.categories, 1):
        categories.append({"id": cat_id, "name": cat, "supercategory": "davis"})
        for s in ds.samples(cat):
            image_id = len(images) + 1
            h, w = s.size
            images.append({"id": image_id, "file_name": s.path.relative_to(root).as_posix(), "width": w,
                           "height": h, "license": 1})
            obj = s.mask == 1
            if (cat, s.id) == CROWD_FRAME:
                cols = np.flatnonzero(obj.any(0))
                cut = cols[0] + 2 * (cols[-1] - cols[0] + 1) // 3
                crowd = obj.copy()
                crowd[:, :cut] = False
                parts = [(obj & ~crowd, False), (crowd, True)]
            else:
                parts = [(obj, False)]
            for part, is_crowd in parts:
                annotations.append(annotation(len(annotations) + 1, image_id, cat_id, part, is_crowd))
    doc = {
        "info": {"description": "davis_mini: DAVIS 2016 subset bundled with promptopt, masks as COCO RLE",
                 "url": "https://davischallenge.org/", "version": "1"},
        "licenses": [{"id": 1, "name": "BSD (DAVIS, see ../LICENSE)", "url": ""}],
        "images": images, "annotations": annotations, "categories": categories,
    }
    out = root / "annotations" / "instances.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    print(f"wrote {out}: {len(images)} images, {len(annotations)} annotations, {len(categories)} categories")


if __name__ == "__main__":
    main()
