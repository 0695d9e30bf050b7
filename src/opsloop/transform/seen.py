"""Keys seen earlier in one load, for the ``unique`` quality rule, in bounded memory.

Each key is kept as a 128-bit digest (two independent 64-bit DuckDB hashes: of the value and of its
text plus a marker byte), 16 bytes a key whatever the key's type or length, in a few runs sorted by
digest that merge as they grow (about log₂ of the batch count of them); a probe is a binary search
per run.
Holding the keys themselves and building a hash set over all of them for every batch grew with the
load (≈ 1 GB at 10M keys) and cost time quadratic in the number of batches. Two different keys
share a digest with probability ≈ n² / 2¹²⁹ (10⁻²⁵ for 10M keys).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

_SQL = "hash(v) AS a, hash(CAST(v AS VARCHAR) || chr(1)) AS b"
Digests = tuple[np.ndarray, np.ndarray]  # (first hash, second hash), uint64 each


def _sorted(a: np.ndarray, b: np.ndarray) -> Digests:
    # by the first hash (equal ones, rare, are told apart by the second); stable = timsort, which merges
    # two concatenated sorted runs in linear time
    order = np.argsort(a, kind="stable")
    return a[order], b[order]


class SeenKeys:
    """The digests of every key added so far; ``contains`` answers per key, ``add`` remembers a batch."""

    def __init__(self) -> None:
        self._runs: list[Digests] = []  # each sorted by (a, b)
        self._con: Any = None

    def __len__(self) -> int:
        return sum(len(a) for a, _ in self._runs)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self._runs)

    def digests(self, keys: pa.Array) -> Digests:
        """One 128-bit digest per key (no NULLs: drop them first)."""
        if len(keys) == 0:
            return np.empty(0, np.uint64), np.empty(0, np.uint64)
        if self._con is None:
            import duckdb

            self._con = duckdb.connect()
            self._con.execute("SET threads = 1")
        t = self._con.from_arrow(pa.table({"v": keys})).select(_SQL).to_arrow_table()
        a = np.asarray(t.column("a").to_numpy(), dtype=np.uint64)
        b = np.asarray(t.column("b").to_numpy(), dtype=np.uint64)
        return a, b

    def contains(self, digests: Digests) -> np.ndarray:
        order = np.argsort(digests[0])  # sorted probes: each binary search starts where the last one ended
        a, b = digests[0][order], digests[1][order]
        hit = np.zeros(len(a), dtype=bool)
        for ra, rb in self._runs:
            lo = np.minimum(np.searchsorted(ra, a), len(ra) - 1)
            same = ra[lo] == a
            hit |= same & (rb[lo] == b)
            nxt = np.minimum(lo + 1, len(ra) - 1)
            for i in np.flatnonzero(same & (nxt > lo) & (ra[nxt] == a)):  # first hash repeats in the run: rare
                hi = int(np.searchsorted(ra, a[i], side="right"))
                hit[i] |= bool((rb[lo[i] : hi] == b[i]).any())
        out = np.empty(len(a), dtype=bool)
        out[order] = hit
        return out

    def add(self, digests: Digests) -> None:
        if len(digests[0]) == 0:
            return
        self._runs.append(_sorted(*digests))
        while len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]):
            (na, nb), (oa, ob) = self._runs.pop(), self._runs.pop()
            self._runs.append(_sorted(np.concatenate([oa, na]), np.concatenate([ob, nb])))

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None
