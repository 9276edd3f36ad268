"""The numpy-only Cholesky solves against dense solves and log-determinants."""

import numpy as np
import pytest

from shapfleet.workers.engine.cholesky import BLOCK, Cholesky


def _spd(n: int, seed: int, condition: float = 1e6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return (q * np.geomspace(1.0, 1.0 / condition, n)) @ q.T


@pytest.mark.parametrize("n", [1, 2, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 7])
def test_solves_match_a_dense_solve(n):
    a = _spd(n, n)
    rng = np.random.default_rng(100 + n)
    factor = Cholesky(a)
    for b in (rng.normal(size=n), rng.normal(size=(n, 5))):
        x = factor.solve(b)
        assert x.shape == b.shape
        np.testing.assert_allclose(a @ x, b, rtol=0, atol=1e-8 * np.abs(b).max())
        np.testing.assert_allclose(x, np.linalg.solve(a, b), rtol=1e-6, atol=1e-9 * np.abs(x).max())
    sign, log_det = np.linalg.slogdet(a)
    assert sign == 1 and factor.log_det() == pytest.approx(log_det, rel=1e-10, abs=1e-9)


def test_only_the_lower_triangle_is_read():
    a = _spd(70, 3)
    upper_garbage = np.tril(a) + np.triu(np.full_like(a, 9.0), 1)
    b = np.arange(70.0)
    np.testing.assert_allclose(Cholesky(upper_garbage).solve(b), np.linalg.solve(a, b), rtol=1e-6)


def test_a_matrix_that_is_not_positive_definite_is_refused():
    a = _spd(80, 5)
    a[40, 40] = -1.0
    with pytest.raises(np.linalg.LinAlgError):
        Cholesky(a)
