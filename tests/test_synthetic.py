"""The MMoE paper's synthetic data (section 4.1)."""
import numpy as np
import pytest

from features.synthetic import make_synthetic


def test_shapes_dtypes_and_determinism():
    x, y1, y2 = make_synthetic(500, rho=0.5, dim=20, seed=1)
    assert x.shape == (500, 20) and y1.shape == y2.shape == (500,)
    assert x.dtype == y1.dtype == y2.dtype == np.float32
    again = make_synthetic(500, rho=0.5, dim=20, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip((x, y1, y2), again))
    assert not np.array_equal(y1, make_synthetic(500, rho=0.5, dim=20, seed=2)[1])


def test_label_correlation_increases_with_rho():
    corr = [np.corrcoef(*make_synthetic(20_000, rho=rho, seed=0)[1:])[0, 1] for rho in (0.0, 0.5, 0.9, 1.0)]
    assert all(a < b for a, b in zip(corr, corr[1:])), corr
    assert abs(corr[0]) < 0.2 and corr[-1] > 0.99  # rho=1: same weights, only noise differs


def test_rho_one_without_noise_gives_identical_tasks():
    _, y1, y2 = make_synthetic(100, rho=1.0, noise=0.0)
    np.testing.assert_allclose(y1, y2, rtol=1e-6)


def test_linear_part_follows_construction():
    # Without sine terms or noise, y = w^T x, so y is exactly linear in x with |w| = c.
    x, y1, y2 = make_synthetic(300, rho=0.3, dim=10, num_sin=0, c=2.0, noise=0.0)
    w1, *_ = np.linalg.lstsq(x.astype(np.float64), y1.astype(np.float64), rcond=None)
    w2, *_ = np.linalg.lstsq(x.astype(np.float64), y2.astype(np.float64), rcond=None)
    assert np.linalg.norm(w1) == pytest.approx(2.0, rel=1e-4)
    assert np.dot(w1, w2) / (np.linalg.norm(w1) * np.linalg.norm(w2)) == pytest.approx(0.3, abs=1e-4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rho=1.5), "rho must be in"), (dict(rho=-1.01), "rho must be in"),
    (dict(rho=0.5, n=0), "n must be"), (dict(rho=0.5, dim=1), "dim must be"),
])
def test_invalid_arguments(kwargs, message):
    kwargs.setdefault("n", 10)
    with pytest.raises(ValueError, match=message):
        make_synthetic(**kwargs)
