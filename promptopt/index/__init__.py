"""Persisted FAISS indexes of image embeddings (flat / HNSW / IVF) with manifests that guard them."""

from .store import INDEX_KINDS, EmbeddingIndex, build_dataset_index, build_index, query_index

__all__ = ["EmbeddingIndex", "build_index", "build_dataset_index", "query_index", "INDEX_KINDS"]
