"""The FAISS embedding index: exact vs approximate search, persistence, and the manifest's guards."""

import json

import numpy as np
import pytest

from promptopt.data import load_dataset
from promptopt.embeddings import create_encoder
from promptopt.errors import ConfigError, DataError
from promptopt.index import EmbeddingIndex, build_index


def clustered(n, dim=32, centres=50, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim)).astype(np.float32)
    x = c[rng.integers(0, centres, n)] + 0.7 * rng.standard_normal((n, dim)).astype(np.float32)
    return x.astype(np.float32)


def recall_at_10(approx: EmbeddingIndex, exact: EmbeddingIndex, queries) -> float:
    _, a = approx.search_vectors(queries, 10)
    _, e = exact.search_vectors(queries, 10)
    return float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, e)]))


@pytest.mark.parametrize("kind, opts", [("hnsw", {"ef_search": 64}), ("ivf", {"nlist": 16, "nprobe": 8})])
def test_approximate_recall_against_exact(kind, opts):
    x = clustered(3000)
    q = clustered(100, seed=1)
    keys = [f"c/{i}" for i in range(len(x))]
    exact = EmbeddingIndex(32, kind="flat")
    exact.add(x, keys)
    approx = EmbeddingIndex(32, kind=kind, **opts)
    approx.add(x, keys)
    assert approx.kind == kind
    assert recall_at_10(approx, exact, q) >= 0.9
    # exact search returns true cosine similarities, best first
    scores, ids = exact.search_vectors(q[:1], 5)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q[0] / np.linalg.norm(q[0])
    assert ids[0][0] == int(np.argmax(xn @ qn))
    assert np.all(np.diff(scores[0]) <= 1e-6)
    assert scores[0][0] == pytest.approx(float(np.max(xn @ qn)), abs=1e-5)


def test_auto_kind_and_incremental_add():
    x = clustered(300)
    small = EmbeddingIndex(32, kind="auto", auto_threshold=1000)
    small.add(x[:200], [str(i) for i in range(200)])
    assert small.kind == "flat"
    ids = small.add(x[200:], [str(i) for i in range(200, 300)])
    assert list(ids) == list(range(200, 300)) and len(small) == 300
    big = EmbeddingIndex(32, kind="auto", auto_threshold=100)
    big.add(x, [str(i) for i in range(300)])
    assert big.kind == "hnsw"
    with pytest.raises(ConfigError, match="already holds sample '5'"):
        small.add(x[:1], ["5"])
    with pytest.raises(ConfigError, match="dimension 32"):
        small.add(np.zeros((1, 8), np.float32), ["new"])
    with pytest.raises(ConfigError, match="unknown index type"):
        EmbeddingIndex(32, kind="lsh")


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_restricted_search_only_returns_allowed(kind):
    x = clustered(500)
    keys = [f"k{i}" for i in range(500)]
    idx = EmbeddingIndex(32, kind=kind, nlist=8)
    idx.add(x, keys)
    allowed = keys[100:110]
    hits = idx.search(x[:3], 4, restrict_to=allowed)
    exact = x[100:110] / np.linalg.norm(x[100:110], axis=1, keepdims=True)
    for q, row in zip(x[:3], hits):
        assert len(row) == 4 and {k for k, _ in row} <= set(allowed)
        best = int(np.argmax(exact @ (q / np.linalg.norm(q))))
        assert row[0][0] == allowed[best]  # restricted searches over a few vectors are exact
    with pytest.raises(ConfigError, match="none of the allowed"):
        idx.search(x[:1], 2, restrict_to=["absent"])


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_persistence_round_trip(tmp_path, kind):
    x = clustered(400)
    keys = [f"cat/{i:03d}" for i in range(400)]
    idx = EmbeddingIndex(32, kind=kind, encoder={"name": "test", "fingerprint": "abc"}, nlist=8)
    idx.add(x, keys, [f"h{i}" for i in range(400)])
    idx.save(tmp_path / "idx", dataset_root=tmp_path)
    man = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    for field in ("encoder", "dim", "metric", "index_type", "count", "dataset_root", "created", "items"):
        assert field in man
    assert man["count"] == 400 and man["index_type"] == kind and man["items"][7] == {"id": 7, "key": "cat/007", "hash": "h7"}
    back = EmbeddingIndex.load(tmp_path / "idx")
    assert back.search(x[:5], 5) == idx.search(x[:5], 5)
    np.testing.assert_allclose(back.vectors(["cat/010"]), idx.vectors(["cat/010"]))
    back.add(x[:2] + 1, ["cat/new1", "cat/new2"])  # incremental after loading
    assert len(back) == 402 and back.search(x[:1] + 1, 1)[0][0][0] == "cat/new1"
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "idx").iterdir())


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="index folder not found"):
        EmbeddingIndex.load(tmp_path / "nope")
    idx = EmbeddingIndex(4, kind="flat")
    idx.add(np.eye(4, dtype=np.float32), list("abcd"))
    idx.save(tmp_path / "i")
    man = json.loads((tmp_path / "i" / "manifest.json").read_text())
    man["items"] = man["items"][:3]
    man["count"] = 3
    (tmp_path / "i" / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DataError, match="holds 4 vectors but the manifest 3"):
        EmbeddingIndex.load(tmp_path / "i")
    (tmp_path / "i" / "manifest.json").write_text("{}")
    with pytest.raises(DataError, match="not a promptopt index manifest"):
        EmbeddingIndex.load(tmp_path / "i")


def test_different_encoder_and_changed_image_are_errors(blob_dataset, tmp_path):
    samples = load_dataset(blob_dataset).samples()
    enc = create_encoder("features", options={"max_side": 48})
    idx = build_index(samples, enc)
    idx.save(tmp_path / "idx", dataset_root=blob_dataset)
    # same encoder, same images: fine, and the encoder can be rebuilt from the manifest
    loaded = EmbeddingIndex.load(tmp_path / "idx", encoder=enc, samples=load_dataset(blob_dataset).samples())
    assert loaded.make_encoder().fingerprint == enc.fingerprint
    other = create_encoder("features", options={"max_side": 64})
    with pytest.raises(ConfigError, match="encoder mismatch"):
        EmbeddingIndex.load(tmp_path / "idx", encoder=other)
    # change one image on disk: loading against the dataset names the file
    from PIL import Image

    path = samples[3].path
    img = np.asarray(Image.open(path)).copy()
    img[:4, :4] = 0
    Image.fromarray(img).save(path)
    with pytest.raises(DataError, match=f"{path.name}: image or mask changed"):
        EmbeddingIndex.load(tmp_path / "idx", samples=load_dataset(blob_dataset).samples())
