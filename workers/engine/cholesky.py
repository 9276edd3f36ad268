"""Cholesky factor and solves of a symmetric positive definite matrix, with numpy alone.

``A = L L^T`` comes from ``numpy.linalg.cholesky`` (LAPACK ``potrf``); ``A^-1 B`` from a forward
then a backward substitution done in blocks of :data:`BLOCK` rows: each block's rows subtract what
the solved blocks contribute (one matrix product, ``n^2 r`` flops in all, as ``potrs``) and multiply
by the inverse of their diagonal block, inverted once per factor. The kriging and cubic fits use
this instead of ``scipy.linalg.cho_factor`` / ``cho_solve`` because importing ``scipy.linalg``
costs more than the whole fit of a typical explanation (scipy 1.17 builds its array-API wrappers
at import).
"""

from __future__ import annotations

import numpy as np

#: Rows per substitution block: large enough that the products run at BLAS speed, small enough
#: that inverting a diagonal block stays cheap and well conditioned relative to ``L``.
BLOCK = 64


class Cholesky:
    """The factor ``L`` of an SPD ``a`` (only its lower triangle is read); raises
    ``numpy.linalg.LinAlgError`` when ``a`` is not positive definite."""

    def __init__(self, a: np.ndarray) -> None:
        self.lower = np.linalg.cholesky(a)
        n = len(self.lower)
        self._blocks = [(start, min(start + BLOCK, n)) for start in range(0, n, BLOCK)]
        self._inverses = [np.linalg.inv(self.lower[s:e, s:e]) for s, e in self._blocks]

    def log_det(self) -> float:
        """``log |A| = 2 sum_i log L_ii``."""
        return 2.0 * float(np.log(np.diag(self.lower)).sum())

    def solve(self, b: np.ndarray) -> np.ndarray:
        """``A^-1 b`` for a vector or a matrix ``b``: ``L y = b``, then ``L^T x = y``."""
        lower = self.lower
        right = np.asarray(b, dtype=float)
        y = np.empty_like(right)
        for (s, e), inverse in zip(self._blocks, self._inverses):
            y[s:e] = inverse @ (right[s:e] - lower[s:e, :s] @ y[:s])
        x = np.empty_like(right)
        for (s, e), inverse in zip(reversed(self._blocks), reversed(self._inverses)):
            x[s:e] = inverse.T @ (y[s:e] - lower[e:, s:e].T @ x[e:])
        return x
