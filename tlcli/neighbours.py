"""Nearest neighbours by cosine similarity, in blocks, and union-find groups of similar rows.

Pure numpy (no TensorFlow): the near-duplicate search of ``audit`` and of ``train``'s check.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK_ROWS = 4096  # rows of the query block: the block's similarity matrix is BLOCK_ROWS x n float32


def normalise(X) -> np.ndarray:
    """Rows of ``X`` [n, d] scaled to unit L2 norm, float32 (an all-zero row stays zero)."""
    X = np.asarray(X, np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(norms > 0, norms, 1.0)


@dataclass
class Neighbours:
    """The ``k`` most similar other rows of each row: ``index`` int64 [n, k] (-1 where a row has
    fewer than k others) and ``similarity`` float32 [n, k] (cosine, in [-1, 1]; -inf where
    ``index`` is -1), each row's neighbours most similar first."""

    index: np.ndarray
    similarity: np.ndarray

    def nearest(self) -> np.ndarray:
        """float32 [n]: each row's similarity to its most similar other row (-inf if none)."""
        return self.similarity[:, 0] if self.similarity.shape[1] else np.full(len(self.index), -np.inf, np.float32)

    def pairs(self, threshold: float) -> list[tuple[int, int, float]]:
        """(i, j, similarity) with i < j for every kept neighbour at or above ``threshold``, each
        once (for a search of every row: ``top_k`` without ``rows``)."""
        rows, cols = np.nonzero((self.similarity >= threshold) & (self.index >= 0))
        seen: dict[tuple[int, int], float] = {}
        for r, c in zip(rows.tolist(), cols.tolist()):
            j = int(self.index[r, c])
            key = (min(r, j), max(r, j))
            seen[key] = max(seen.get(key, -1.0), float(self.similarity[r, c]))
        return [(i, j, s) for (i, j), s in sorted(seen.items())]


def top_k(X, k: int = 5, *, rows=None, block: int = BLOCK_ROWS) -> Neighbours:
    """Exact ``k`` nearest other rows of every row of ``X`` [n, d] by cosine similarity (of the
    rows listed in ``rows`` only, when given: the result's row i is ``X[rows[i]]``'s).

    Rows are L2-normalised, then compared block by block: each block of ``block`` query rows
    is multiplied with all n rows (one [block, n] float32 matrix product), and only each row's
    ``k`` best are kept (``argpartition``). Time O(n^2 d) (the products, BLAS-bound) plus
    O(n^2) for the selection; memory O(block * n) for one block's similarities plus O(n k) for
    the result, never an n x n matrix. A row is never its own neighbour; rows with identical
    content are each other's neighbours at similarity 1.
    """
    U = normalise(X)
    n = len(U)
    query = np.arange(n) if rows is None else np.asarray(rows, np.int64)
    m, k = len(query), max(0, min(k, n - 1))
    index = np.full((m, k), -1, np.int64)
    sim = np.full((m, k), -np.inf, np.float32)
    if k == 0:
        return Neighbours(index, sim)
    for start in range(0, m, block):
        stop = min(m, start + block)
        S = U[query[start:stop]] @ U.T                           # [b, n]
        S[np.arange(stop - start), query[start:stop]] = -np.inf  # not itself
        part = np.argpartition(-S, k - 1, axis=1)[:, :k]          # the k best, unordered
        best = np.take_along_axis(S, part, axis=1)
        order = np.argsort(-best, axis=1, kind="stable")
        index[start:stop] = np.take_along_axis(part, order, axis=1)
        sim[start:stop] = np.take_along_axis(best, order, axis=1)
    return Neighbours(index, sim)


def similarity(a, b) -> np.ndarray:
    """Row-wise cosine similarity of ``a`` and ``b`` (both [n, d]) -> float32 [n]."""
    return np.einsum("ij,ij->i", normalise(a), normalise(b))


def groups(n: int, pairs) -> list[list[int]]:
    """Connected components (union-find) of the rows joined by ``pairs`` ((i, j, ...) tuples),
    only those of two or more rows, each sorted, ordered by their first row."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving keeps the trees flat
            i = parent[i]
        return i

    for i, j, *_ in pairs:
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(root(i), []).append(i)
    return sorted((m for m in members.values() if len(m) > 1), key=lambda m: m[0])
