"""Retrieval: a corpus read by the frozen memory into a faiss-indexed, memory-mapped store.

faiss is imported inside this package only, and only when an index is built or read.
"""

from split_model.retrieval.corpus import Chunk, chunk_documents, read_corpus
from split_model.retrieval.index import IndexSpec
from split_model.retrieval.store import RetrievalStore

__all__ = ["Chunk", "chunk_documents", "read_corpus", "IndexSpec", "RetrievalStore"]
