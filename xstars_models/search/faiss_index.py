"""The FAISS indexes a search uses, over unit vectors, ranked by inner product (= cosine
similarity):

* exact (``IndexFlatIP``): every vector kept (4 x D bytes each) and compared with the query;
* IVF-PQ (``IVF<nlist>,PQ<m>x8``) for large datasets: the vectors are split among ``nlist`` ~
  sqrt(rows) clusters (k-means on a sample of 40 rows a cluster, at least 10 000) and stored as
  ``m`` = D / 2 bytes of product-quantisation codes (8 times smaller than the float32 vectors); a
  query scans the ``nprobe`` nearest clusters. Its recall@10 against exact search is measured
  when it is built: rows sampled from the dataset are the queries, their exact 10 nearest other
  rows are found while the vectors are added, and the index's 10 nearest other rows are compared
  with them.

A filter is a bitmap over row ids handed to FAISS (``IDSelectorBitmap``), so the ranking runs on
the allowed rows only: ``k`` hits of the filtered rows, never fewer because other rows ranked
first.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import MissingExtraError

__all__ = ["FLAT", "IVFPQ", "Built", "add_vectors", "build_index", "import_faiss", "ivfpq_params", "nearest"]

FLAT, IVFPQ = "flat", "ivfpq"
RECALL_K = 10
_BLOCK = 65536  # rows per block when the exact neighbours of the recall queries are updated


def import_faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise MissingExtraError("Searching a dataset needs FAISS: pip install 'xstars-models[archive]' (faiss-cpu).") \
            from None
    return faiss


@dataclass(frozen=True)
class Built:
    """How an index was built.

    Attributes:
        kind: :data:`FLAT` or :data:`IVFPQ`.
        params: IVF-PQ's ``nlist``, ``m`` (bytes a vector), ``nbits``; empty for exact.
        recall_at_10: IVF-PQ's recall@10 against exact search on ``recall_queries`` sampled rows
            (with ``nprobe``); ``None`` for exact (1 by definition).
        recall_queries: how many rows the recall was measured on.
        seconds: wall-clock time of the build, recall included.
    """

    kind: str
    params: dict[str, int] = field(default_factory=dict)
    recall_at_10: float | None = None
    recall_queries: int = 0
    seconds: float = 0.0


def ivfpq_params(rows: int, dim: int) -> dict[str, int]:
    """IVF-PQ's shape for ``rows`` vectors of ``dim``: ``nlist`` ~ sqrt(rows) (at most one
    cluster per 40 rows), ``m`` the largest divisor of ``dim`` up to ``dim / 2`` (2 dimensions a
    byte: on clustered data, recall@10 0.8 where 4 a byte gives 0.6), 8 bits a code."""
    nlist = max(1, min(int(round(math.sqrt(rows))), rows // 40))
    m = max(d for d in range(1, max(1, dim // 2) + 1) if dim % d == 0)
    return {"nlist": nlist, "m": m, "nbits": 8}


def build_index(chunks: Callable[[], Iterable[np.ndarray]], rows: int, dim: int, kind: str, *, nprobe: int = 16,
                recall_queries: int = 200, seed: int = 0) -> tuple[Any, Built]:
    """A new index of ``kind`` holding the vectors ``chunks()`` yields (float32 unit rows of
    ``dim``, ``rows`` in all, in id order). IVF-PQ reads them twice (a sample to train on and the
    recall queries, then every row); exact once.

    Raises:
        InvalidInputError: chunks whose row count is not ``rows``.
    """
    faiss = import_faiss()
    started = time.perf_counter()
    if kind == FLAT:
        index = faiss.IndexFlatIP(dim)
        _check_rows(add_vectors(index, chunks()), rows)
        return index, Built(FLAT, seconds=time.perf_counter() - started)
    params = ivfpq_params(rows, dim)
    rng = np.random.default_rng(seed)
    train_ids = np.sort(rng.choice(rows, size=min(rows, max(40 * params["nlist"], 10_000)), replace=False))
    query_ids = np.sort(rng.choice(rows, size=min(rows, recall_queries), replace=False))
    train, queries = _gather(chunks(), [train_ids, query_ids], dim)
    index = faiss.index_factory(dim, f"IVF{params['nlist']},PQ{params['m']}x{params['nbits']}", faiss.METRIC_INNER_PRODUCT)
    # Polysemous training (on by default) reorders the codes for Hamming filtering, which is not
    # used here, and takes ~10x as long as the training itself.
    index.do_polysemous_training = False
    index.train(train)
    del train
    exact = _ExactNeighbours(queries, query_ids, RECALL_K + 1)
    _check_rows(add_vectors(index, chunks(), exact.update), rows)
    _, found = nearest(index, queries, RECALL_K + 1, None, nprobe)
    recall = _recall(found, exact.ids, query_ids)
    return index, Built(IVFPQ, params, recall, len(query_ids), time.perf_counter() - started)


def add_vectors(index: Any, chunks: Iterable[np.ndarray], seen: Callable[[np.ndarray, int], None] | None = None) -> int:
    """Add every chunk to ``index`` (ids continue from ``index.ntotal``); ``seen(chunk, first
    id)`` is called on each. Returns the rows added."""
    added = 0
    for chunk in chunks:
        chunk = np.ascontiguousarray(chunk, np.float32)
        if not len(chunk):
            continue
        if seen is not None:
            seen(chunk, index.ntotal)
        index.add(chunk)
        added += len(chunk)
    return added


def nearest(index: Any, queries: np.ndarray, k: int, allowed: np.ndarray | None, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best (inner product, id) of each query row among the rows ``allowed`` (a bool
    mask over ids; ``None``: all), best first; id -1 (score -inf) pads when fewer rows qualify.
    An IVF index scans ``nprobe`` clusters, and all of them for a query that found fewer hits
    than qualify (a narrow filter)."""
    faiss = import_faiss()
    queries = np.ascontiguousarray(np.atleast_2d(queries), np.float32)
    qualify = index.ntotal if allowed is None else int(allowed.sum())
    k = min(k, max(qualify, 1))
    bits = selector = None
    if allowed is not None:
        bits = np.packbits(allowed.astype(bool), bitorder="little")
        selector = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bits))
    ivf = faiss.try_extract_index_ivf(index)
    probes = [nprobe] if ivf is None else sorted({min(nprobe, ivf.nlist), ivf.nlist})
    for probe in probes:
        if ivf is None:
            params = faiss.SearchParameters(sel=selector) if selector is not None else None
        else:
            params = faiss.SearchParametersIVF(sel=selector, nprobe=probe) if selector is not None else \
                faiss.SearchParametersIVF(nprobe=probe)
        scores, ids = index.search(queries, k, params=params)
        if (ids >= 0).sum(axis=1).min() >= min(k, qualify):
            break
    del bits  # the selector reads it during the search: kept alive until here
    return scores, ids


class _ExactNeighbours:
    """The exact ``k`` nearest ids of each query row, updated chunk by chunk as rows are added."""

    def __init__(self, queries: np.ndarray, query_ids: np.ndarray, k: int) -> None:
        self.queries = queries
        self.scores = np.full((len(queries), k), -np.inf, np.float32)
        self.ids = np.full((len(queries), k), -1, np.int64)
        self.k = k

    def update(self, chunk: np.ndarray, first: int) -> None:
        for start in range(0, len(chunk), _BLOCK):
            block = chunk[start:start + _BLOCK]
            scores = np.concatenate([self.scores, self.queries @ block.T], axis=1)
            ids = np.concatenate([self.ids, np.broadcast_to(first + start + np.arange(len(block)),
                                                            (len(self.queries), len(block)))], axis=1)
            keep = np.argpartition(-scores, min(self.k, scores.shape[1]) - 1, axis=1)[:, :self.k]
            self.scores = np.take_along_axis(scores, keep, axis=1)
            self.ids = np.take_along_axis(ids, keep, axis=1)


def _recall(found: np.ndarray, exact: np.ndarray, query_ids: np.ndarray) -> float:
    """Mean share of each query's exact 10 nearest other rows among the index's 10 nearest
    other rows (a query's own row is left out of both)."""
    shares = []
    for own, approximate, true in zip(query_ids, found, exact):
        true = [i for i in true if i >= 0 and i != own][:RECALL_K]
        got = [i for i in approximate if i >= 0 and i != own][:RECALL_K]
        if true:
            shares.append(len(set(got) & set(true)) / len(true))
    return float(np.mean(shares)) if shares else 1.0


def _gather(chunks: Iterable[np.ndarray], wanted: list[np.ndarray], dim: int) -> list[np.ndarray]:
    """The rows of each sorted id array of ``wanted``, read from one pass over ``chunks``."""
    out: list[list[np.ndarray]] = [[] for _ in wanted]
    first = 0
    for chunk in chunks:
        for pieces, ids in zip(out, wanted):
            lo, hi = np.searchsorted(ids, [first, first + len(chunk)])
            pieces.append(np.asarray(chunk[ids[lo:hi] - first], np.float32))
        first += len(chunk)
    return [np.ascontiguousarray(np.concatenate(p) if p else np.zeros((0, dim)), np.float32) for p in out]


def _check_rows(added: int, rows: int) -> None:
    from ..errors import InvalidInputError

    if added != rows:
        raise InvalidInputError(f"the dataset changed while it was indexed: {added} rows read, {rows} expected; "
                                "search again once the run writing it has finished.", field="dataset")
