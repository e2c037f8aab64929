from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from promptopt.data import IGNORE_INDEX, Sample, load_dataset, read_mask, split_samples
from promptopt.errors import ConfigError, DataError

from conftest import blob_image, write_pair


def test_bundled_sample_loads(sample_root):
    ds = load_dataset(sample_root)
    assert ds.categories == ["blackswan", "camel", "car-roundabout", "dog"]
    assert len(ds) == 92
    s = ds.samples("camel")[0]
    assert isinstance(s, Sample) and s.category == "camel" and s.id == "00000"
    assert s.image.shape == (180, 320, 3) and s.image.dtype == np.uint8
    assert s.mask.shape == (180, 320) and set(np.unique(s.mask)) == {0, 1}
    assert s.path.name == "00000.jpg"
    assert ds.num_classes("camel") == 2


def test_single_category_layout(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(3):
        img, m = blob_image(rng)
        write_pair(tmp_path / "flat", f"x{i}", img, m * 255, ext=".jpg")
    ds = load_dataset(tmp_path / "flat")
    assert ds.categories == ["flat"]
    assert [s.id for s in ds.samples()] == ["x0", "x1", "x2"]


def test_mask_conventions(tmp_path):
    a = np.array([[0, 255], [255, 0]], dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "bin.png")
    assert read_mask(tmp_path / "bin.png").tolist() == [[0, 1], [1, 0]]
    c = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    Image.fromarray(c).save(tmp_path / "ids.png")
    assert read_mask(tmp_path / "ids.png").tolist() == [[0, 1], [2, IGNORE_INDEX]]
    p = Image.fromarray(np.array([[0, 3], [255, 1]], dtype=np.uint8), mode="P")
    p.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0] * (3 * 251) + [224, 224, 192])
    p.save(tmp_path / "pal.png")
    assert read_mask(tmp_path / "pal.png").tolist() == [[0, 3], [IGNORE_INDEX, 1]]
    assert read_mask(tmp_path / "bin.png", mode="classes").tolist() == [[0, 255], [255, 0]]
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match="rgb.png: colour"):
        read_mask(tmp_path / "rgb.png")


def test_missing_and_empty_data_dir(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty dataset"):
        load_dataset(tmp_path / "empty")
    (tmp_path / "noimg" / "cat" / "images").mkdir(parents=True)
    (tmp_path / "noimg" / "cat" / "masks").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        load_dataset(tmp_path / "noimg")


def test_image_without_mask(blob_dataset):
    (blob_dataset / "blob" / "masks" / "b03.png").unlink()
    with pytest.raises(DataError, match=r"b03\.png: image has no mask"):
        load_dataset(blob_dataset)


def test_mask_size_mismatch(blob_dataset):
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(blob_dataset / "blob" / "masks" / "b05.png")
    with pytest.raises(DataError, match=r"b05\.png: mask size 10x10 does not match image b05\.png size 64x48"):
        load_dataset(blob_dataset)


def test_unreadable_image(blob_dataset):
    (blob_dataset / "blob" / "images" / "b02.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"b02\.png: unreadable image"):
        load_dataset(blob_dataset)


def test_truncated_image_fails_on_decode_with_name(blob_dataset):
    p = blob_dataset / "blob" / "images" / "b04.png"
    p.write_bytes(p.read_bytes()[:200])
    ds = load_dataset(blob_dataset)  # the header is fine, so the scan passes
    s = [s for s in ds.samples() if s.id == "b04"][0]
    with pytest.raises(DataError, match=r"b04\.png: unreadable image"):
        s.image


def test_unknown_category(sample_root):
    with pytest.raises(ConfigError, match="unknown category 'zebra'.*blackswan"):
        load_dataset(sample_root, category="zebra")
    ds = load_dataset(sample_root)
    with pytest.raises(ConfigError, match="holds 4 categories"):
        ds.samples()


def test_class_id_out_of_range(tmp_path):
    rng = np.random.default_rng(2)
    img, m = blob_image(rng)
    write_pair(tmp_path / "d" / "c", "a", img, m * 3)  # class id 3
    ds = load_dataset(tmp_path / "d", num_classes=3)
    with pytest.raises(DataError, match=r"a\.png: class id\(s\) \[3\] out of range for 3 classes"):
        ds.samples("c")[0].mask
    assert load_dataset(tmp_path / "d").num_classes("c") == 4


def test_jpeg_masks_rejected(tmp_path):
    rng = np.random.default_rng(3)
    img, m = blob_image(rng)
    (tmp_path / "c" / "images").mkdir(parents=True)
    (tmp_path / "c" / "masks").mkdir(parents=True)
    Image.fromarray(img).save(tmp_path / "c" / "images" / "a.jpg")
    Image.fromarray(m * 255).save(tmp_path / "c" / "masks" / "a.jpg")
    with pytest.raises(DataError, match="lossless"):
        load_dataset(tmp_path)


def test_split_is_deterministic_and_disjoint(sample_root):
    samples = load_dataset(sample_root, category="camel").samples()
    a = split_samples(samples, pool=0.5, val=0.25, seed=3)
    b = split_samples(list(reversed(samples)), pool=0.5, val=0.25, seed=3)
    assert a.ids() == b.ids()
    ids = a.ids()
    assert len(ids["pool"]) == 15 and len(ids["val"]) == 8 and len(ids["test"]) == 7
    assert not set(ids["pool"]) & set(ids["val"]) and not set(ids["val"]) & set(ids["test"])
    assert sorted(ids["pool"] + ids["val"] + ids["test"]) == sorted(s.id for s in samples)
    assert split_samples(samples, seed=4).ids() != a.ids()
    c = split_samples(samples, pool=5, val=3, test=2, seed=0)
    assert (len(c.pool), len(c.val), len(c.test)) == (5, 3, 2)
    with pytest.raises(ConfigError):
        split_samples(samples, pool=25, val=10)


def test_pool_lookup_errors(sample_root):
    sp = split_samples(load_dataset(sample_root, category="dog").samples(), seed=0)
    with pytest.raises(ConfigError, match="not in the prompt pool \\(it is in the val split\\)"):
        sp.find_pool([sp.val[0].id])
    with pytest.raises(ConfigError, match="'nope' is not in the prompt pool"):
        sp.find_pool(["nope"])


# --- every mask encoding: handled as documented (data.py's table) or refused naming the file ------------------------
def _save(path: Path, im: Image.Image) -> Path:
    im.save(path)
    return path


def test_one_bit_masks_are_background_object_in_every_mode(tmp_path):
    p = _save(tmp_path / "m.png", Image.fromarray(np.array([[True, False], [False, True]])))
    assert Image.open(p).mode == "1"
    for mode in ("auto", "classes", "binary"):
        assert read_mask(p, mode=mode).tolist() == [[1, 0], [0, 1]]


def test_sixteen_bit_binary_masks_become_background_object(tmp_path):
    """0/65535 (a 16-bit binary mask) is read like 0/255, not as class 65535 (the 32 GiB confusion matrix)."""
    p = _save(tmp_path / "m.png", Image.fromarray(np.array([[0, 65535], [65535, 0]], dtype=np.uint16)))
    assert Image.open(p).mode == "I;16"
    assert read_mask(p).tolist() == [[0, 1], [1, 0]]
    assert read_mask(p, mode="binary").tolist() == [[0, 1], [1, 0]]
    with pytest.raises(DataError, match=r"m\.png: mask value\(s\) \[65535\] are not class ids"):
        read_mask(p, mode="classes")


def test_sixteen_bit_class_ids_keep_ids_and_ignore(tmp_path):
    p = _save(tmp_path / "ids.png", Image.fromarray(np.array([[0, 1], [2, 255]], dtype=np.uint16)))
    assert read_mask(p).tolist() == [[0, 1], [2, IGNORE_INDEX]]
    p8 = _save(tmp_path / "bin16.png", Image.fromarray(np.array([[0, 255]], dtype=np.uint16)))
    assert read_mask(p8).tolist() == [[0, 1]]  # 0/255 stored in 16 bits is still a binary mask


def test_values_beyond_class_ids_are_an_error_naming_file_and_values(tmp_path):
    p = _save(tmp_path / "inst.png", Image.fromarray(np.array([[0, 1000], [26001, 1]], dtype=np.uint16)))
    with pytest.raises(DataError, match=r"inst\.png: mask value\(s\) \[1000, 26001\] are not class ids"):
        read_mask(p)
    many = np.arange(300, 312, dtype=np.uint16).reshape(3, 4)
    p2 = _save(tmp_path / "many.png", Image.fromarray(many))
    with pytest.raises(DataError, match=r"\[300, 301, 302, 303, 304, \.\.\.\] \(12 distinct\)"):
        read_mask(p2)


def test_thirty_two_bit_masks(tmp_path):
    ok = _save(tmp_path / "ok.tif", Image.fromarray(np.array([[0, 3], [255, 1]], dtype=np.int32)))
    assert Image.open(ok).mode == "I"
    assert read_mask(ok).tolist() == [[0, 3], [IGNORE_INDEX, 1]]
    neg = _save(tmp_path / "neg.tif", Image.fromarray(np.array([[0, -1], [70000, 1]], dtype=np.int32)))
    with pytest.raises(DataError, match=r"neg\.tif: mask value\(s\) \[-1, 70000\]"):
        read_mask(neg)


def test_float_masks_need_whole_numbers(tmp_path):
    ok = _save(tmp_path / "ok.tif", Image.fromarray(np.array([[0.0, 1.0], [2.0, 0.0]], dtype=np.float32)))
    assert Image.open(ok).mode == "F"
    assert read_mask(ok).tolist() == [[0, 1], [2, 0]]
    bad = _save(tmp_path / "soft.tif", Image.fromarray(np.array([[0.0, 0.5]], dtype=np.float32)))
    with pytest.raises(DataError, match=r"soft\.tif: floating-point mask with non-integer values"):
        read_mask(bad)


def test_binary_mode_on_eight_bit_masks(tmp_path):
    zero_one = _save(tmp_path / "01.png", Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8)))
    assert read_mask(zero_one, mode="binary").tolist() == [[0, 1], [1, 0]]  # not thresholded away at 127
    with_ignore = _save(tmp_path / "01i.png", Image.fromarray(np.array([[0, 1], [255, 0]], dtype=np.uint8)))
    assert read_mask(with_ignore, mode="binary").tolist() == [[0, 1], [IGNORE_INDEX, 0]]
    soft = _save(tmp_path / "aa.png", Image.fromarray(np.array([[0, 100], [128, 250]], dtype=np.uint8)))
    assert read_mask(soft, mode="binary").tolist() == [[0, 0], [1, 1]]
    ids = _save(tmp_path / "ids.png", Image.fromarray(np.array([[0, 2], [3, 0]], dtype=np.uint8)))
    with pytest.raises(DataError, match=r"ids\.png: binary mask mode: largest value 3 is not above half"):
        read_mask(ids, mode="binary")
    soft16 = _save(tmp_path / "aa16.png", Image.fromarray(np.array([[0, 30000], [40000, 65535]], dtype=np.uint16)))
    assert read_mask(soft16, mode="binary").tolist() == [[0, 0], [1, 1]]
    for dtype in (np.uint8, np.uint16):  # an image without the object: empty, not an error
        empty = _save(tmp_path / f"empty{dtype.__name__}.png", Image.fromarray(np.zeros((2, 2), dtype=dtype)))
        assert read_mask(empty, mode="binary").tolist() == [[0, 0], [0, 0]]
        assert read_mask(empty).tolist() == [[0, 0], [0, 0]]


def test_binary_mode_on_palette_masks(tmp_path):
    p = Image.fromarray(np.array([[0, 3], [255, 1]], dtype=np.uint8), mode="P")
    p.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0] * (3 * 251) + [224, 224, 192])
    path = _save(tmp_path / "pal.png", p)
    assert read_mask(path, mode="binary").tolist() == [[0, 1], [IGNORE_INDEX, 1]]


def test_grey_masks_with_alpha(tmp_path):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[0, 1, :3] = 255
    rgba[1, 1, 3] = 0  # transparent but the grey value says background: alpha is not the mask here
    p = _save(tmp_path / "grey.png", Image.fromarray(rgba))
    assert read_mask(p).tolist() == [[0, 1], [0, 0]]
    la = _save(tmp_path / "la.png", Image.fromarray(np.array([[0, 255]], dtype=np.uint8)).convert("LA"))
    assert Image.open(la).mode == "LA" and read_mask(la).tolist() == [[0, 1]]
    cutout = np.zeros((2, 2, 4), dtype=np.uint8)
    cutout[0, 0, 3] = 255  # uniform colour, the object only in alpha
    p2 = _save(tmp_path / "alpha.png", Image.fromarray(cutout))
    with pytest.raises(DataError, match=r"alpha\.png: the mask is in the alpha channel"):
        read_mask(p2)


def test_unsupported_image_mode_is_refused(tmp_path):
    p = _save(tmp_path / "cmyk.tif", Image.new("CMYK", (2, 2)))
    with pytest.raises(DataError, match=r"cmyk\.tif: unsupported mask image mode 'CMYK'"):
        read_mask(p)


def _mask_dataset(root: Path, masks: list[Image.Image]) -> Path:
    rng = np.random.default_rng(7)
    for i, m in enumerate(masks):
        img, _ = blob_image(rng, size=(m.size[1], m.size[0]))
        write_pair(root / "c", f"m{i}", img, m)
    return root


def test_sixteen_bit_dataset_end_to_end(tmp_path):
    """A folder of 0/65535 masks is a 2-class task whose masks are 0/1 (the issue's 32 GiB crash)."""
    rng = np.random.default_rng(5)
    masks = []
    for _ in range(3):
        _, m = blob_image(rng)
        masks.append(Image.fromarray(m.astype(np.uint16) * 65535))
    ds = load_dataset(_mask_dataset(tmp_path / "d", masks))
    assert ds.num_classes("c") == 2
    for s, m in zip(ds.samples("c"), masks):
        assert s.mask.tolist() == (np.asarray(m) > 0).astype(int).tolist()


def test_bad_sixteen_bit_mask_in_dataset_names_the_file(tmp_path):
    rng = np.random.default_rng(6)
    _, m = blob_image(rng)
    bad = m.astype(np.uint16) * 65535
    bad[0, 0] = 1  # no longer a pure 0/65535 mask: 65535 cannot be a class id
    ds = load_dataset(_mask_dataset(tmp_path / "d", [Image.fromarray(bad)]))
    with pytest.raises(DataError, match=r"m0\.png: mask value\(s\) \[65535\] are not class ids"):
        ds.num_classes("c")


def test_inferred_class_count_is_bounded_and_names_the_file(tmp_path):
    """A resized 0/255 mask read as class ids would be a 255-class task: refused, naming the file, unless asked for."""
    ok = np.zeros((48, 64), dtype=np.uint8)
    ok[10:20, 10:30] = 1
    soft = (np.arange(48 * 64) % 256).astype(np.uint8).reshape(48, 64)  # like anti-aliased edges: every value 0..255
    root = _mask_dataset(tmp_path / "d", [Image.fromarray(ok), Image.fromarray(soft)])
    with pytest.raises(DataError, match=r"m1\.png: holds class id 254, .* 255-class task .* --num-classes 255"):
        load_dataset(root).num_classes("c")
    assert load_dataset(root, num_classes=255).num_classes("c") == 255
    assert load_dataset(root, mask_mode="binary").num_classes("c") == 2


def test_num_classes_option_is_checked(tmp_path, blob_dataset):
    with pytest.raises(ConfigError, match="num_classes must be at most 255"):
        load_dataset(blob_dataset, num_classes=256)
    with pytest.raises(ConfigError, match="num_classes must be at least 2"):
        load_dataset(blob_dataset, num_classes=1)
    with pytest.raises(ConfigError, match="num_classes must be an integer"):
        load_dataset(blob_dataset, num_classes="3")


def test_masks_folder_missing_mentions_coco(tmp_path):
    rng = np.random.default_rng(8)
    img, _ = blob_image(rng)
    (tmp_path / "d" / "images").mkdir(parents=True)
    Image.fromarray(img).save(tmp_path / "d" / "images" / "a.png")
    with pytest.raises(DataError, match=r"masks: folder not found .*COCO"):
        load_dataset(tmp_path / "d")
