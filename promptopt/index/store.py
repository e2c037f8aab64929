"""A persisted FAISS index of image embeddings with stable ids and a manifest that guards it.

Vectors are L2-normalised and searched by inner product, i.e. cosine
similarity. FAISS sees int64 ids (``IndexIDMap2``), assigned in insertion
order and never reused; the manifest maps each id to its sample key
(``category/id``) and the sample's content hash (``Sample.fingerprint``).

Index types: ``flat`` (exact) for small sets; ``hnsw`` (graph, no training)
or ``ivf`` (inverted lists, trained on the first batch) for large ones.
``auto`` picks flat below ``auto_threshold`` vectors and HNSW above, at the
first ``add``; later adds keep the type (incremental).

On disk (``indexes/<name>/``): ``index.faiss`` plus ``manifest.json`` (encoder
name and fingerprint, dimension, metric, index type and parameters, count,
dataset root, per-sample hashes, creation time), both written atomically.
Loading with an encoder of another fingerprint, or checking against images
whose content changed, is an error that names what differs — never a silent
wrong neighbour.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..artifacts import atomic_write_bytes, atomic_write_json, read_json
from ..data import Sample
from ..errors import ConfigError, DataError
from ..embeddings.base import Encoder, EncodeProgress, encoder_from_spec, l2_normalize

MANIFEST_FORMAT = "promptopt-index"
MANIFEST_VERSION = 1
INDEX_FILE = "index.faiss"
MANIFEST_FILE = "manifest.json"
INDEX_KINDS = ("auto", "flat", "hnsw", "ivf")


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a dependency
        raise ConfigError(f"faiss is not installed ({exc}); pip install faiss-cpu") from None
    return faiss


class EmbeddingIndex:
    """Cosine-similarity index over sample embeddings (see the module docstring).

    Parameters
    ----------
    dim: embedding length.
    kind: ``auto`` | ``flat`` | ``hnsw`` | ``ivf``.
    encoder: the encoder's :meth:`~promptopt.embeddings.Encoder.spec` (what made the vectors).
    hnsw_m, ef_construction, ef_search: HNSW graph degree and beam widths (build / query).
    nlist, nprobe: IVF lists (default ≈ 4·√n) and lists visited per query.
    auto_threshold: ``auto`` builds HNSW from this many vectors on.
    """

    def __init__(self, dim: int, kind: str = "auto", encoder: Mapping[str, Any] | None = None, hnsw_m: int = 32,
                 ef_construction: int = 80, ef_search: int = 64, nlist: int | None = None, nprobe: int = 16,
                 auto_threshold: int = 20_000) -> None:
        if kind not in INDEX_KINDS:
            raise ConfigError(f"unknown index type {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
        if dim < 1:
            raise ConfigError(f"index dimension must be positive, got {dim}")
        self.dim = int(dim)
        self.requested_kind = kind
        self.kind: str | None = None if kind == "auto" else kind
        self.encoder = dict(encoder) if encoder else None
        self.hnsw_m, self.ef_construction, self.ef_search = int(hnsw_m), int(ef_construction), int(ef_search)
        self.nlist, self.nprobe = nlist, int(nprobe)
        self.auto_threshold = int(auto_threshold)
        #: restricted searches over at most this many vectors are exact (see :meth:`search_vectors`)
        self.exact_restrict_limit = 50_000
        self.items: list[dict[str, Any]] = []  # position = FAISS id
        self._by_key: dict[str, int] = {}
        self._index = None
        self.dataset_root: str | None = None
        self.created: str | None = None

    # --- building ---------------------------------------------------------------------------------
    def _make(self, n_first: int, train: np.ndarray):
        faiss = _faiss()
        if self.kind is None:
            self.kind = "hnsw" if n_first >= self.auto_threshold else "flat"
        ip = faiss.METRIC_INNER_PRODUCT
        if self.kind == "flat":
            inner = faiss.IndexFlatIP(self.dim)
        elif self.kind == "hnsw":
            inner = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, ip)
            inner.hnsw.efConstruction = self.ef_construction
            inner.hnsw.efSearch = self.ef_search
        else:
            nlist = self.nlist or max(1, min(int(4 * math.sqrt(n_first)), n_first // 39 or 1))
            self.nlist = int(nlist)
            quantizer = faiss.IndexFlatIP(self.dim)
            inner = faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, ip)
            inner.train(train[np.random.default_rng(0).permutation(len(train))[: 50 * self.nlist]])
            inner.nprobe = self.nprobe
            inner.make_direct_map()  # reconstruct() of stored vectors, for diversity (MMR)
        self._index = faiss.IndexIDMap2(inner)

    def add(self, vectors: np.ndarray, keys: Sequence[str], hashes: Sequence[str | None] | None = None) -> np.ndarray:
        """Add vectors for sample keys (normalised here); returns their int64 ids. Keys must be new."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ConfigError(f"index of dimension {self.dim} cannot add vectors of shape {vectors.shape}")
        if len(keys) != len(vectors):
            raise ConfigError(f"{len(vectors)} vectors but {len(keys)} keys")
        hashes = list(hashes) if hashes is not None else [None] * len(keys)
        dup = [k for k in keys if k in self._by_key]
        if dup or len(set(keys)) != len(keys):
            raise ConfigError(f"index already holds sample {(dup or [k for k in keys if list(keys).count(k) > 1])[0]!r}")
        vectors = l2_normalize(vectors)
        if self._index is None:
            self._make(len(vectors), vectors)
        start = len(self.items)
        ids = np.arange(start, start + len(vectors), dtype=np.int64)
        self._index.add_with_ids(vectors, ids)
        for i, k, h in zip(ids, keys, hashes):
            self._by_key[k] = int(i)
            self.items.append({"id": int(i), "key": k, "hash": h})
        return ids

    def add_samples(self, samples: Sequence[Sample], encoder: Encoder, masked: bool = False, batch_size: int = 16,
                    progress: EncodeProgress | None = None) -> np.ndarray:
        """Encode samples (mask-aware when ``masked``) and add them with their content hashes."""
        self._check_encoder(encoder)
        vecs = (encoder.encode_masked if masked else encoder.encode)(samples, batch_size=batch_size, progress=progress)
        if self.encoder is None:
            self.encoder = {**encoder.spec(), "masked": bool(masked)}
        return self.add(vecs, [s.key for s in samples], [s.fingerprint() for s in samples])

    # --- searching --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.items)

    @property
    def keys(self) -> list[str]:
        return [it["key"] for it in self.items]

    def __contains__(self, key: str) -> bool:
        return key in self._by_key

    def _params(self, ids: np.ndarray | None):
        faiss = _faiss()
        sel = faiss.IDSelectorBatch(ids) if ids is not None else None
        if self.kind == "hnsw":
            return faiss.SearchParametersHNSW(sel=sel, efSearch=self.ef_search) if sel is not None else \
                faiss.SearchParametersHNSW(efSearch=self.ef_search)
        if self.kind == "ivf":
            return faiss.SearchParametersIVF(sel=sel, nprobe=self.nprobe) if sel is not None else \
                faiss.SearchParametersIVF(nprobe=self.nprobe)
        return faiss.SearchParameters(sel=sel) if sel is not None else None

    def search_vectors(self, queries: np.ndarray, k: int,
                       restrict_to: Iterable[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (n, k), best first; id -1 pads when fewer than k vectors qualify.

        ``restrict_to`` limits the search to these sample keys (e.g. the prompt
        pool, so that validation or test images are never retrieved as prompts).
        """
        if self._index is None or not self.items:
            raise ConfigError("the index is empty")
        if k < 1:
            raise ConfigError(f"k must be at least 1, got {k}")
        q = l2_normalize(np.atleast_2d(queries))
        if q.shape[1] != self.dim:
            raise ConfigError(f"query vectors have dimension {q.shape[1]}, the index {self.dim}")
        allowed = None
        if restrict_to is not None:
            allowed = np.array(sorted(self._by_key[key] for key in restrict_to if key in self._by_key), dtype=np.int64)
            if allowed.size == 0:
                raise ConfigError("none of the allowed samples is in the index (was it built on this dataset?)")
        if allowed is not None and self.kind != "flat" and allowed.size <= self.exact_restrict_limit:
            # Exact search over the allowed vectors: filtered graph/IVF search misses neighbours
            # when the allowed set is a small part of the index, and this is cheap when it is small.
            mat = np.stack([self._index.reconstruct(int(i)) for i in allowed])
            sims = q @ mat.T
            kk = min(k, allowed.size)
            top = np.argsort(-sims, axis=1, kind="stable")[:, :kk]
            scores = np.full((len(q), k), -np.inf, dtype=np.float32)
            ids = np.full((len(q), k), -1, dtype=np.int64)
            scores[:, :kk] = np.take_along_axis(sims, top, 1)
            ids[:, :kk] = allowed[top]
            return scores, ids
        params = self._params(allowed)
        if params is None:
            scores, ids = self._index.search(q, k)
        else:
            scores, ids = self._index.search(q, k, params=params)
        return scores, ids

    def search(self, queries: np.ndarray, k: int, restrict_to: Iterable[str] | None = None) -> list[list[tuple[str, float]]]:
        """Per query, up to k (sample key, cosine similarity) pairs, most similar first."""
        scores, ids = self.search_vectors(queries, k, restrict_to)
        return [[(self.items[int(i)]["key"], float(s)) for s, i in zip(srow, irow) if i >= 0]
                for srow, irow in zip(scores, ids)]

    def vectors(self, keys: Sequence[str]) -> np.ndarray:
        """Stored (normalised) vectors of these sample keys."""
        out = np.zeros((len(keys), self.dim), dtype=np.float32)
        for j, key in enumerate(keys):
            if key not in self._by_key:
                raise ConfigError(f"sample {key!r} is not in the index")
            out[j] = self._index.reconstruct(self._by_key[key])
        return out

    # --- checks -----------------------------------------------------------------------------------
    def _check_encoder(self, encoder: Encoder) -> None:
        if self.encoder is None:
            return
        if encoder.name != self.encoder.get("name") or encoder.fingerprint != self.encoder.get("fingerprint"):
            raise ConfigError(
                f"encoder mismatch: the index was built with {self.encoder.get('name')!r} (fingerprint "
                f"{self.encoder.get('fingerprint')}), not {encoder.name!r} (fingerprint {encoder.fingerprint}); "
                f"rebuild the index or use the same encoder"
            )
        if encoder.dim != self.dim:
            raise ConfigError(f"encoder {encoder.name!r} gives dimension {encoder.dim}, the index holds {self.dim}")

    def make_encoder(self) -> Encoder:
        """The encoder that built this index, rebuilt from the manifest and checked by fingerprint."""
        if not self.encoder:
            raise ConfigError("this index does not record its encoder; pass one explicitly")
        enc = encoder_from_spec(self.encoder)
        self._check_encoder(enc)
        return enc

    def verify(self, samples: Iterable[Sample]) -> None:
        """Error if any of these samples is in the index with different content (image or mask changed)."""
        for s in samples:
            i = self._by_key.get(s.key)
            if i is None:
                continue
            stored = self.items[i]["hash"]
            if stored is not None and stored != s.fingerprint():
                raise DataError(
                    f"{s.path or s.key}: image or mask changed since the index was built (sample {s.key!r}); "
                    f"rebuild the index with `promptopt index build`"
                )

    # --- persistence ------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
            "encoder": self.encoder, "dim": self.dim, "metric": "inner_product (cosine on L2-normalised vectors)",
            "index_type": self.kind, "params": {"hnsw_m": self.hnsw_m, "ef_construction": self.ef_construction,
                                                "ef_search": self.ef_search, "nlist": self.nlist, "nprobe": self.nprobe},
            "count": len(self.items), "dataset_root": self.dataset_root,
            "created": self.created or time.strftime("%Y-%m-%dT%H:%M:%S%z"), "items": self.items,
        }

    def manifest_fingerprint(self) -> str:
        """What identifies the index's content: encoder, index type and every item's key and content hash."""
        import hashlib
        import json

        body = json.dumps({"encoder": self.encoder, "kind": self.kind, "items": self.items}, sort_keys=True, default=str)
        return hashlib.sha1(body.encode()).hexdigest()[:16]

    def save(self, folder: str | Path, dataset_root: str | Path | None = None) -> Path:
        """Write ``index.faiss`` then ``manifest.json`` (atomically) into ``folder``; returns the folder."""
        if self._index is None:
            raise ConfigError("cannot save an empty index")
        folder = Path(folder)
        if dataset_root is not None:
            self.dataset_root = str(Path(dataset_root).resolve())
        self.created = self.created or time.strftime("%Y-%m-%dT%H:%M:%S%z")
        faiss = _faiss()
        atomic_write_bytes(folder / INDEX_FILE, faiss.serialize_index(self._index).tobytes())
        atomic_write_json(folder / MANIFEST_FILE, self.manifest())
        return folder

    @classmethod
    def load(cls, folder: str | Path, encoder: Encoder | None = None,
             samples: Iterable[Sample] | None = None) -> "EmbeddingIndex":
        """Read an index folder; with ``encoder`` / ``samples``, check that they are what built it."""
        folder = Path(folder)
        if not folder.is_dir():
            raise DataError(f"{folder}: index folder not found (build one with `promptopt index build`)")
        man = read_json(folder / MANIFEST_FILE)
        if not isinstance(man, dict) or man.get("format") != MANIFEST_FORMAT:
            raise DataError(f"{folder / MANIFEST_FILE}: not a promptopt index manifest")
        if man.get("version", 0) > MANIFEST_VERSION:
            raise DataError(f"{folder / MANIFEST_FILE}: written by a newer promptopt (version {man['version']})")
        path = folder / INDEX_FILE
        if not path.is_file():
            raise DataError(f"{path}: index file missing")
        faiss = _faiss()
        try:
            raw = faiss.deserialize_index(np.frombuffer(path.read_bytes(), dtype=np.uint8))
        except RuntimeError as exc:
            raise DataError(f"{path}: unreadable FAISS index ({exc})") from None
        p = man.get("params", {})
        idx = cls(int(man["dim"]), kind=man["index_type"], encoder=man.get("encoder"), hnsw_m=p.get("hnsw_m", 32),
                  ef_construction=p.get("ef_construction", 80), ef_search=p.get("ef_search", 64),
                  nlist=p.get("nlist"), nprobe=p.get("nprobe", 16))
        if not isinstance(raw, faiss.IndexIDMap2):
            raise DataError(f"{path}: not an id-mapped promptopt index")
        idx._index = raw
        idx.items = list(man.get("items", []))
        idx._by_key = {it["key"]: int(it["id"]) for it in idx.items}
        idx.dataset_root, idx.created = man.get("dataset_root"), man.get("created")
        if idx._index.ntotal != len(idx.items) or man.get("count") != len(idx.items):
            raise DataError(f"{folder}: the FAISS file holds {idx._index.ntotal} vectors but the manifest "
                            f"{len(idx.items)} (a partial write?); rebuild the index")
        if encoder is not None:
            idx._check_encoder(encoder)
        if samples is not None:
            idx.verify(samples)
        return idx


def build_index(samples: Sequence[Sample], encoder: Encoder, kind: str = "auto", masked: bool = False,
                batch_size: int = 16, progress: EncodeProgress | None = None, **index_options: Any) -> EmbeddingIndex:
    """Encode the samples and index them (the Python side of ``promptopt index build``)."""
    if not samples:
        raise DataError("no samples to index")
    if masked and not encoder.supports_masked:
        raise ConfigError(f"encoder {encoder.name!r} has no mask-aware embedding")
    idx = EmbeddingIndex(encoder.dim, kind=kind, encoder={**encoder.spec(), "masked": bool(masked)}, **index_options)
    idx.add_samples(samples, encoder, masked=masked, batch_size=batch_size, progress=progress)
    return idx


def build_dataset_index(data: str | Path, out: str | Path, *, category: str | None = None, encoder: str = "features",
                        checkpoint: str | None = None, options: dict[str, Any] | None = None, kind: str = "auto",
                        masked: bool = False, batch_size: int = 16, mask_mode: str = "auto",
                        progress: Any = None) -> EmbeddingIndex:
    """Embed every image of a dataset (or one category), index it and save it to ``out`` (``promptopt index build``).

    ``progress(label, done, total)`` is called as images are encoded.
    """
    from ..data import load_dataset
    from ..embeddings import create_encoder

    ds = load_dataset(data, category=category, mask_mode=mask_mode)
    samples = [s for cat in ds.categories for s in ds.samples(cat)]
    enc = create_encoder(encoder, checkpoint, options or {})
    cb = (lambda done, total: progress("images", done, total)) if progress else None
    idx = build_index(samples, enc, kind=kind, masked=masked, batch_size=batch_size, progress=cb)
    idx.save(out, dataset_root=data)
    return idx


def query_index(folder: str | Path, image: str | Path, k: int = 5) -> list[tuple[str, float]]:
    """The k indexed items most similar to an image file (``promptopt index query``)."""
    from ..data import image_samples

    idx = EmbeddingIndex.load(folder)
    return idx.search(idx.make_encoder().encode(image_samples([image])), k)[0]
