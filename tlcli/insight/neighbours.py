"""Nearest neighbours by cosine similarity, in blocks, and union-find groups of similar rows.

Pure numpy (no TensorFlow): the near-duplicate search of ``audit`` and of ``train``'s check.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK_ROWS = 1024  # query rows per block: a block holds BLOCK_ROWS x n float32 similarities and int64 indices


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
    O(n^2) for the selection; memory O(block * n) for one block's similarities and argpartition
    indices (12 bytes each: 1.2 GB for 100,000 rows) plus O(n k) for the result, never an
    n x n matrix (40 GB at 100,000 rows). A row is never its own neighbour; rows with identical
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
        np.negative(S, out=S)                                     # in place: argpartition takes the smallest
        part = np.argpartition(S, k - 1, axis=1)[:, :k]           # the k best, unordered
        best = -np.take_along_axis(S, part, axis=1)
        order = np.argsort(-best, axis=1, kind="stable")
        index[start:stop] = np.take_along_axis(part, order, axis=1)
        sim[start:stop] = np.take_along_axis(best, order, axis=1)
    return Neighbours(index, sim)


def pairs_above(X, threshold: float, *, max_per_row: int = 64, block: int = BLOCK_ROWS) -> list[tuple[int, int, float]]:
    """Every pair (i, j, similarity), i < j, of rows of ``X`` [n, d] whose cosine similarity is at
    least ``threshold``, sorted; a row keeps its ``max_per_row`` most similar later rows (a bound
    for a folder of thousands of identical files, whose groups still join through the rest).

    Blocks of ``block`` rows are multiplied with the rows from the block's first on (the upper
    triangle: each pair is computed once), and only the entries at or above the threshold are
    kept, with one comparison each. Time O(n^2 d / 2) (BLAS-bound); memory O(block * n) for one
    block's similarities (0.4 GB at 100,000 rows) plus the pairs found, never an n x n matrix.
    """
    U = normalise(X)
    n, out = len(U), []
    for start in range(0, n, block):
        stop = min(n, start + block)
        S = U[start:stop] @ U[start:].T                           # [b, n - start]
        S[np.tril_indices(stop - start, 0, S.shape[1])] = -np.inf  # itself and earlier rows of the block
        rows, cols = np.nonzero(S >= threshold)
        sims = S[rows, cols]
        counts = np.bincount(rows, minlength=stop - start)
        for r in np.nonzero(counts > max_per_row)[0]:             # rare: keep that row's best
            mine = np.nonzero(rows == r)[0]
            drop = mine[np.argsort(-sims[mine], kind="stable")[max_per_row:]]
            sims[drop] = np.nan
        keep = ~np.isnan(sims)
        out += zip((rows[keep] + start).tolist(), (cols[keep] + start).tolist(), sims[keep].astype(float).tolist())
    return sorted(out)


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
