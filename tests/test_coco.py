"""COCO instances input: every segmentation encoding, tasks, crowd / overlap rules, detection and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from promptopt.data.coco import default_images_dir, rle_string_counts
from promptopt.data import IGNORE_INDEX, bundled_sample_coco, load_dataset, split_samples
from promptopt.errors import ConfigError, DataError
from promptopt.task import Task

H, W = 6, 8


def rect(x0: int, y0: int, x1: int, y1: int) -> list[list[float]]:
    """A rectangle polygon; pycocotools fills columns x0..x1-1 and rows y0..y1-1."""
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def box(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def runs(mask: np.ndarray) -> list[int]:
    """Reference uncompressed RLE (column-major runs, starting with background), written independently."""
    flat = mask.ravel(order="F").astype(int).tolist()
    out, cur, n = [], 0, 0
    for v in flat:
        if v == cur:
            n += 1
        else:
            out.append(n)
            cur, n = v, 1
    out.append(n)
    return out


def compressed(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def write_coco(root: Path, anns: list[dict], images: list[tuple[str, int, int]] | None = None,
               categories: list[tuple[int, str]] = ((1, "cat"), (2, "dog")), name: str = "ann.json",
               write_images: bool = True) -> Path:
    """``root/images/<file>`` PNGs and ``root/<name>``; annotations get ids 1.. and iscrowd 0 unless given."""
    images = images or [("a.png", H, W), ("b.png", H, W), ("c.png", H, W)]
    (root / "images").mkdir(parents=True, exist_ok=True)
    doc_images = []
    for i, (fname, h, w) in enumerate(images, 1):
        if write_images:
            (root / "images" / fname).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((h, w, 3), 40 * i, dtype=np.uint8)).save(root / "images" / fname)
        doc_images.append({"id": i, "file_name": fname, "height": h, "width": w})
    doc_anns = [{"id": k, "iscrowd": 0, **a} for k, a in enumerate(anns, 1)]
    doc = {"images": doc_images, "annotations": doc_anns,
           "categories": [{"id": i, "name": n} for i, n in categories]}
    (root / name).write_text(json.dumps(doc))
    return root / name


def masks_by_id(ds, category=None) -> dict[str, np.ndarray]:
    return {s.id: s.mask for s in ds.samples(category)}


# --- the bundled sample, both ways -----------------------------------------------------------------------------------
def test_bundled_coco_matches_folder_masks_with_crowd_as_ignore(sample_root):
    coco = load_dataset(bundled_sample_coco(), keep_empty=False)
    folder = load_dataset(sample_root)
    assert coco.categories == folder.categories
    crowd_pixels = 0
    for cat in folder.categories:
        f, c = masks_by_id(folder, cat), masks_by_id(coco, cat)
        assert f.keys() == c.keys()
        for sid in f:
            if (cat, sid) == ("camel", "00000"):
                crowd = c[sid] == IGNORE_INDEX
                crowd_pixels = int(crowd.sum())
                assert (f[sid][crowd] == 1).all()  # the crowd part is object in the folder mask
                assert np.array_equal(f[sid][~crowd], c[sid][~crowd])
                assert (c[sid] == 1).any()  # the non-crowd part is still object
            else:
                assert np.array_equal(f[sid], c[sid]), (cat, sid)
    assert crowd_pixels > 100


def test_bundled_coco_gives_the_same_task(sample_root):
    """Samples behave like folder samples: same ids, same split, same class count, same fingerprints' inputs."""
    a = Task.from_dataset(load_dataset(bundled_sample_coco(), keep_empty=False), "dog", seed=3)
    b = Task.from_dataset(load_dataset(sample_root), "dog", seed=3)
    assert a.split.ids() == b.split.ids() and a.num_classes == b.num_classes == 2
    assert a.data_root == bundled_sample_coco()
    assert np.array_equal(a.pool[0].image, b.pool[0].image)


def test_bundled_coco_keeps_images_without_the_object_as_empty_masks_when_asked(sample_root):
    assert len(load_dataset(bundled_sample_coco(), category="dog")) == 20  # the default: only images with a dog
    ds = load_dataset(bundled_sample_coco(), category="dog", keep_empty=True)
    assert ds.categories == ["dog"] and len(ds) == 92 and ds.num_classes() == 2
    empty = [s for s in ds.samples() if not s.mask.any()]
    assert len(empty) == 92 - 20
    assert all(not s.id.startswith("dog__") for s in empty)
    assert ds.class_names == {"dog": ["background", "dog"]}


def test_coco_samples_score_like_folder_samples(sample_root):
    """The oracle gives the same number on COCO-loaded and folder-loaded samples (no crowd in 'dog')."""
    from promptopt.backends import create_backend
    from promptopt.oracle import ValidationOracle

    backend = create_backend("features", options={"max_side": 48})
    scores = []
    for ds in (load_dataset(bundled_sample_coco(), keep_empty=False), load_dataset(sample_root)):
        sp = split_samples(ds.samples("dog"), pool=4, val=3, test=0, seed=0)
        scores.append(ValidationOracle(backend, sp.val, 2).score(sp.pool[:2]).miou)
    assert scores[0] == scores[1] and 0 < scores[0] < 1


# --- segmentation encodings ------------------------------------------------------------------------------------------
def test_polygons(tmp_path):
    ann = write_coco(tmp_path, [{"image_id": 1, "category_id": 1, "segmentation": rect(1, 2, 5, 4)}])
    ds = load_dataset(ann, category="cat", keep_empty=True)
    m = masks_by_id(ds)
    assert np.array_equal(m["a"], box(1, 2, 5, 4).astype(int))
    assert not m["b"].any() and not m["c"].any()


def test_degenerate_polygon_is_not_read_as_a_box(tmp_path):
    """pycocotools reads a 4-number list as a bounding box; a 2-point polygon encloses nothing."""
    ann = write_coco(tmp_path, [{"image_id": 1, "category_id": 1, "segmentation": [[1, 1, 5, 4], *rect(0, 0, 2, 2)]}])
    assert np.array_equal(masks_by_id(load_dataset(ann, category="cat"))["a"], box(0, 0, 2, 2).astype(int))


def test_uncompressed_rle(tmp_path):
    obj = box(2, 1, 4, 5)
    seg = {"size": [H, W], "counts": runs(obj)}
    ann = write_coco(tmp_path, [{"image_id": 2, "category_id": 2, "segmentation": seg}])
    assert np.array_equal(masks_by_id(load_dataset(ann, category="dog"))["b"], obj.astype(int))


def test_compressed_rle(tmp_path):
    rng = np.random.default_rng(0)
    obj = rng.random((H, W)) > 0.5
    ann = write_coco(tmp_path, [{"image_id": 3, "category_id": 1, "segmentation": compressed(obj)}])
    assert np.array_equal(masks_by_id(load_dataset(ann, category="cat"))["c"], obj.astype(int))


@pytest.mark.parametrize("first", [0, 1])
def test_rle_string_counts_inverts_pycocotools_encoder(first):
    rng = np.random.default_rng(first)
    for _ in range(20):
        h, w = rng.integers(1, 40, size=2)
        m = rng.random((h, w)) > rng.random()
        m[0, 0] = bool(first)
        counts = rle_string_counts(mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))["counts"])
        assert counts == runs(m)


def test_short_or_malformed_compressed_rle_is_an_error(tmp_path):
    short = {"size": [H, W], "counts": mask_utils.encode(np.asfortranarray(np.ones((2, 2), np.uint8)))["counts"].decode()}
    bad = {"size": [H, W], "counts": "ab\x7f"}
    ann = write_coco(tmp_path, [{"image_id": 1, "category_id": 1, "segmentation": short},
                                {"image_id": 2, "category_id": 1, "segmentation": bad}])
    ds = load_dataset(ann, category="cat")
    m = {s.id: s for s in ds.samples()}
    with pytest.raises(DataError, match=r"ann\.json: annotation 1 \(image a\.png\): RLE run lengths cover 4 pixels, not .* 48"):
        m["a"].mask
    with pytest.raises(DataError, match=r"annotation 2 \(image b\.png\): invalid compressed RLE"):
        m["b"].mask


def test_uncompressed_rle_with_wrong_total_is_an_error(tmp_path):
    ann = write_coco(tmp_path, [{"image_id": 1, "category_id": 1, "segmentation": {"size": [H, W], "counts": [3, 2]}}])
    with pytest.raises(DataError, match="cover 5 pixels"):
        load_dataset(ann, category="cat").samples()[0].mask


def test_bad_polygon_coordinates_fail_on_decode_naming_the_annotation(tmp_path):
    ann = write_coco(tmp_path, [{"image_id": 1, "category_id": 1, "segmentation": [["x", 1, 2, 3, 4, 5]]}])
    ds = load_dataset(ann, category="cat")
    with pytest.raises(DataError, match=r"annotation 1 \(image a\.png\): polygon coordinates must be numbers"):
        ds.samples()[0].mask


# --- tasks: binary per category, semantic over several ----------------------------------------------------------------
def _two_objects(tmp_path: Path) -> Path:
    return write_coco(tmp_path, [
        {"image_id": 1, "category_id": 1, "segmentation": rect(0, 0, 3, 3)},
        {"image_id": 1, "category_id": 2, "segmentation": rect(2, 2, 6, 5)},   # overlaps the cat at (2, 2)
        {"image_id": 2, "category_id": 2, "segmentation": rect(4, 0, 8, 2)},
    ])


def test_semantic_task_classes_follow_the_given_order(tmp_path):
    ann = _two_objects(tmp_path)
    ds = load_dataset(ann, category="cat,dog")
    assert ds.categories == ["cat,dog"] and ds.num_classes("cat,dog") == 3
    assert ds.class_names["cat,dog"] == ["background", "cat", "dog"]
    a = masks_by_id(ds)["a"]
    expected = np.zeros((H, W), dtype=int)
    expected[box(0, 0, 3, 3)] = 1
    expected[box(2, 2, 6, 5)] = 2
    expected[2, 2] = IGNORE_INDEX  # claimed by both classes: the file does not say which
    assert np.array_equal(a, expected)
    swapped = masks_by_id(load_dataset(ann, category="dog,cat"))["a"]
    assert swapped[0, 0] == 2 and swapped[4, 5] == 1 and swapped[2, 2] == IGNORE_INDEX


def test_binary_mode_merges_categories_and_ids_select_categories(tmp_path):
    ann = _two_objects(tmp_path)
    union = masks_by_id(load_dataset(ann, category="cat,dog", mask_mode="binary"))["a"]
    assert np.array_equal(union, (box(0, 0, 3, 3) | box(2, 2, 6, 5)).astype(int))
    by_id = load_dataset(ann, category="2")
    assert by_id.categories == ["dog"] and np.array_equal(masks_by_id(by_id)["b"], box(4, 0, 8, 2).astype(int))
    assert load_dataset(ann, category=2).categories == ["dog"]
    every = load_dataset(ann)
    assert every.categories == ["cat", "dog"] and all(every.num_classes(c) == 2 for c in every.categories)
    listed = load_dataset(ann, category=["dog", "cat,dog"])
    assert listed.categories == ["dog", "cat,dog"]


def test_crowd_regions_are_ignore_except_under_instances(tmp_path):
    crowd = box(0, 0, 8, 3)
    ann = write_coco(tmp_path, [
        {"image_id": 1, "category_id": 1, "segmentation": {"size": [H, W], "counts": runs(crowd)}, "iscrowd": 1},
        {"image_id": 1, "category_id": 1, "segmentation": rect(1, 1, 3, 5)},
        {"image_id": 1, "category_id": 2, "segmentation": rect(6, 4, 8, 6), "iscrowd": 1},  # other category
    ])
    a = masks_by_id(load_dataset(ann, category="cat"))["a"]
    expected = np.where(crowd, IGNORE_INDEX, 0)
    expected[box(1, 1, 3, 5)] = 1
    assert np.array_equal(a, expected)


def test_images_without_the_task_are_dropped_unless_kept(tmp_path):
    ann = _two_objects(tmp_path)
    assert [s.id for s in load_dataset(ann, category="dog", keep_empty=False).samples()] == ["a", "b"]
    assert [s.id for s in load_dataset(ann, category="cat").samples()] == ["a"]  # the default drops them
    assert len(load_dataset(ann, category="cat", keep_empty=True).samples()) == 3
    only_cat = write_coco(tmp_path / "x", [{"image_id": 1, "category_id": 1, "segmentation": rect(0, 0, 2, 2)}])
    with pytest.raises(DataError, match="no image has an annotation of category 'dog'"):
        load_dataset(only_cat, category="dog", keep_empty=False)


def test_sample_ids_stay_unique_when_stems_repeat(tmp_path):
    images = [("x/00000.jpg", H, W), ("y/00000.jpg", H, W), ("y/00000.png", H, W), ("z\\00001.jpg", H, W)]
    ann = write_coco(tmp_path, [], images=images, write_images=False)
    for fname, _, _ in images:
        p = tmp_path / "images" / fname.replace("\\", "/")
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(p)
    ids = [s.id for s in load_dataset(ann, category="cat", keep_empty=True).samples()]
    assert ids == ["x__00000_jpg", "y__00000_jpg", "y__00000_png", "z__00001_jpg"]


def test_fingerprint_follows_the_annotations(tmp_path):
    """An index built on COCO samples must notice an edited annotation (Sample.fingerprint feeds its manifest)."""
    ann = write_coco(tmp_path, [{"image_id": 1, "category_id": 1, "segmentation": rect(0, 0, 2, 2)}])
    before = load_dataset(ann, category="cat").samples()[0].fingerprint()
    assert load_dataset(ann, category="cat").samples()[0].fingerprint() == before
    doc = json.loads(ann.read_text())
    doc["annotations"][0]["segmentation"] = rect(0, 0, 3, 2)
    ann.write_text(json.dumps(doc))
    assert load_dataset(ann, category="cat").samples()[0].fingerprint() != before


# --- where the images are, and how a COCO source is recognised --------------------------------------------------------
def test_cvat_export_folder_is_detected(tmp_path):
    """CVAT's COCO 1.0 export: images/ + annotations/instances_default.json, loaded from the folder alone."""
    root = tmp_path / "export"
    write_coco(root, [{"image_id": 1, "category_id": 1, "segmentation": rect(0, 0, 2, 2)}], name="x.json")
    (root / "annotations").mkdir()
    (root / "x.json").rename(root / "annotations" / "instances_default.json")
    ds = load_dataset(root, category="cat")
    assert ds.root == root / "annotations" / "instances_default.json" and ds.images_root == root / "images"
    assert masks_by_id(ds)["a"].sum() == 4


def test_default_images_dir_follows_coco_layout(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2017").mkdir()
    assert default_images_dir(tmp_path / "annotations" / "instances_val2017.json") == tmp_path / "val2017"
    assert default_images_dir(tmp_path / "annotations" / "other.json") == tmp_path
    (tmp_path / "images").mkdir()
    assert default_images_dir(tmp_path / "annotations" / "other.json") == tmp_path / "images"


def test_images_folder_can_be_given(tmp_path):
    ann = write_coco(tmp_path / "data", [{"image_id": 1, "category_id": 1, "segmentation": rect(0, 0, 2, 2)}])
    moved = tmp_path / "pictures"
    (tmp_path / "data" / "images").rename(moved)
    with pytest.raises(DataError, match=r"a\.png: image file not found .*--images"):
        load_dataset(ann)
    ds = load_dataset(ann, images=moved, category="cat")
    assert ds.images_root == moved and ds.samples()[0].image.shape == (H, W, 3)


def test_folder_with_several_json_files_is_ambiguous(tmp_path):
    write_coco(tmp_path, [], name="one.json")
    write_coco(tmp_path, [], name="two.json")
    with pytest.raises(DataError, match=r"holds several JSON files \(one\.json, two\.json\); pass the COCO"):
        load_dataset(tmp_path)


def test_labelme_folder_points_to_the_conversion(tmp_path):
    for stem in ("a", "b"):
        (tmp_path / f"{stem}.json").write_text(json.dumps({"version": "5.4.1", "shapes": [], "imagePath": f"{stem}.jpg"}))
    with pytest.raises(DataError, match=r"holds LabelMe annotations \(a\.json, \.\.\.\), not COCO; .*labelme2coco"):
        load_dataset(tmp_path)


def test_folder_datasets_ignore_a_json_beside_them(sample_root):
    assert bundled_sample_coco().parent.parent == sample_root
    assert load_dataset(sample_root).categories == ["blackswan", "camel", "car-roundabout", "dog"]


def test_options_that_only_fit_coco_are_refused_for_folders(blob_dataset):
    with pytest.raises(ConfigError, match="--images is for COCO annotations"):
        load_dataset(blob_dataset, images=blob_dataset)
    with pytest.raises(ConfigError, match="applies to COCO annotations only"):
        load_dataset(blob_dataset, keep_empty=False)


# --- errors: one line naming the file ---------------------------------------------------------------------------------
def _doc(ann_path: Path) -> dict:
    return json.loads(ann_path.read_text())


def _rewrite(ann_path: Path, edit) -> Path:
    doc = _doc(ann_path)
    edit(doc)
    ann_path.write_text(json.dumps(doc))
    return ann_path


BAD_FILES = {
    "invalid JSON": ('{"images": [', r"bad\.json: not valid JSON \(line 1 column 13"),
    "empty file": ("", r"bad\.json: not valid JSON"),
    "no categories": ('{"images": [], "annotations": []}', r"bad\.json: not a COCO instances file \(no 'categories' list\)"),
    "results list": ('[{"image_id": 1, "category_id": 1, "score": 0.9}]', r"bad\.json: a COCO results file"),
    "labelme": ('{"version": "5", "shapes": [], "imagePath": "a.jpg"}', r"bad\.json: a LabelMe annotation.*labelme2coco"),
    "panoptic": ('{"images": [], "annotations": [{"segments_info": []}], "categories": []}', r"bad\.json: a COCO panoptic"),
    "captions": ('{"images": [], "annotations": [{"caption": "a dog"}], "categories": []}', r"bad\.json: a COCO captions"),
    "prompt file": ('{"format": "promptopt-prompt", "examples": [], "backend": {}}', r"bad\.json: a promptopt prompt"),
    "a number": ("3", r"bad\.json: a JSON int, not an instances file"),
    "no images": ('{"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}', r"bad\.json: lists no images"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_files_that_are_not_instances_files(tmp_path, case):
    text, message = BAD_FILES[case]
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(DataError, match=message):
        load_dataset(tmp_path / "bad.json")


def test_missing_json_and_xml(tmp_path):
    with pytest.raises(DataError, match=r"nope\.json: annotations file not found"):
        load_dataset(tmp_path / "nope.json")
    (tmp_path / "cvat.xml").write_text("<annotations/>")
    with pytest.raises(DataError, match=r"cvat\.xml: XML annotations .* COCO 1\.0"):
        load_dataset(tmp_path / "cvat.xml")


def test_unknown_category_lists_the_available_ones(tmp_path):
    ann = _two_objects(tmp_path)
    with pytest.raises(ConfigError, match=r"ann\.json: unknown category 'horse'; available: cat, dog"):
        load_dataset(ann, category="horse")
    with pytest.raises(ConfigError, match=r"unknown category 'horse'"):
        load_dataset(ann, category="cat,horse")
    with pytest.raises(ConfigError, match=r"unknown category '7'"):
        load_dataset(ann, category="7")


BAD_ENTRIES = {
    "annotation to unknown image": (lambda d: d["annotations"][0].update(image_id=99),
                                    r"ann\.json: annotation 1 points to unknown image id 99"),
    "annotation to unknown category": (lambda d: d["annotations"][0].update(category_id=9),
                                       r"ann\.json: annotation 1 points to unknown category id 9"),
    "no segmentation": (lambda d: d["annotations"][0].update(segmentation=[]),
                        r"ann\.json: annotation 1 \(image a\.png\) has no segmentation \(boxes only\?\)"),
    "RLE of another size": (lambda d: d["annotations"][0].update(segmentation={"size": [3, 3], "counts": [9]}),
                            r"annotation 1 \(image a\.png\): RLE size 3x3 .* differs from the image's 8x6"),
    "odd polygon": (lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3]]),
                    r"annotation 1 \(image a\.png\): polygons must be lists of x, y"),
    "duplicate image id": (lambda d: d["images"][1].update(id=1), r"ann\.json: image id 1 is listed twice"),
    "image without size": (lambda d: d["images"][0].pop("width"),
                           r"ann\.json: image id 1 \(a\.png\) needs positive integer 'width' and 'height'"),
    "bad iscrowd": (lambda d: d["annotations"][0].update(iscrowd=2), r"annotation 1: 'iscrowd' must be 0 or 1"),
    "duplicate category id": (lambda d: d["categories"][1].update(id=1), r"ann\.json: category id 1 is listed twice"),
}


@pytest.mark.parametrize("case", sorted(BAD_ENTRIES))
def test_malformed_entries_name_the_file(tmp_path, case):
    edit, message = BAD_ENTRIES[case]
    ann = _rewrite(_two_objects(tmp_path), edit)
    with pytest.raises(DataError, match=message):
        load_dataset(ann)


def test_image_file_missing_or_of_another_size(tmp_path):
    ann = _two_objects(tmp_path)
    Image.fromarray(np.zeros((H + 1, W, 3), np.uint8)).save(tmp_path / "images" / "b.png")
    with pytest.raises(DataError, match=r"b\.png: image size 8x7 differs from the width x height 8x6 recorded in .*ann\.json"):
        load_dataset(ann)
    Image.fromarray(np.zeros((W, H, 3), np.uint8)).save(tmp_path / "images" / "b.png")
    with pytest.raises(DataError, match="EXIF rotation"):
        load_dataset(ann)
    (tmp_path / "images" / "b.png").unlink()
    with pytest.raises(DataError, match=r"images/b\.png: image file not found \(image id 2 of .*ann\.json"):
        load_dataset(ann)


def test_num_classes_must_match_the_task(tmp_path):
    ann = _two_objects(tmp_path)
    assert load_dataset(ann, category="cat,dog", num_classes=3).num_classes() == 3
    with pytest.raises(ConfigError, match=r"category 'cat,dog' is a 3-class task .* not 2 classes"):
        load_dataset(ann, category="cat,dog", num_classes=2)


def test_duplicate_category_names_need_ids(tmp_path):
    ann = write_coco(tmp_path, [{"image_id": 1, "category_id": 2, "segmentation": rect(0, 0, 2, 2)}],
                     categories=[(1, "cat"), (2, "cat")])
    with pytest.raises(ConfigError, match=r"category name 'cat' is used by ids \[1, 2\]; choose one by id"):
        load_dataset(ann, category="cat")
    with pytest.raises(DataError, match="several categories are named 'cat'"):
        load_dataset(ann)
    assert masks_by_id(load_dataset(ann, category="2"))["a"].sum() == 4
