
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
