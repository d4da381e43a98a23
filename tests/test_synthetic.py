"""The MMoE paper's synthetic data (section 4.1)."""
import numpy as np
import pytest

from features.synthetic import label_function, make_synthetic, sine_parameters, task_weights


def test_shapes_dtypes_and_determinism():
    x, y1, y2 = make_synthetic(500, rho=0.5, dim=20, seed=1)
    assert x.shape == (500, 20) and y1.shape == y2.shape == (500,)
    assert x.dtype == y1.dtype == y2.dtype == np.float32
    again = make_synthetic(500, rho=0.5, dim=20, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip((x, y1, y2), again))
    other = make_synthetic(500, rho=0.5, dim=20, seed=2)
    assert not np.array_equal(x, other[0]) and not np.array_equal(y1, other[1])


def test_label_correlation_falls_as_rho_falls():
    corr = [np.corrcoef(*make_synthetic(20_000, rho=rho, seed=0)[1:])[0, 1] for rho in (1.0, 0.9, 0.5, 0.0)]
    assert all(a > b for a, b in zip(corr, corr[1:])), corr
    assert corr[0] > 0.98 and abs(corr[-1]) < 0.2, corr  # rho=1: same weights, only the noise differs


def test_weights_have_norm_c_and_cosine_rho():
    for rho in (-0.3, 0.0, 0.5, 0.9, 1.0):
        w1, w2 = task_weights(rho, dim=30, c=2.0, seed=4)
        assert np.linalg.norm(w1) == pytest.approx(2.0) and np.linalg.norm(w2) == pytest.approx(2.0)
        assert np.dot(w1, w2) / 4.0 == pytest.approx(rho, abs=1e-12)


def test_sine_parameters_are_shared_by_all_seeds_and_rhos():
    # The paper's alpha, beta are "given parameters": without noise every label is
    # f(w^T x) with the one fixed (alpha, beta), whatever the seed and rho.
    alpha, beta = sine_parameters(10)
    for seed, rho in ((0, 0.5), (3, 0.9), (7, 1.0)):
        x, y1, y2 = make_synthetic(200, rho=rho, dim=12, seed=seed, noise=0.0)
        w1, w2 = task_weights(rho, dim=12, seed=seed)
        np.testing.assert_allclose(y1, label_function(x.astype(np.float64) @ w1, alpha, beta), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(y2, label_function(x.astype(np.float64) @ w2, alpha, beta), rtol=1e-5, atol=1e-5)
    assert not np.allclose(sine_parameters(10, sin_seed=1)[0], alpha)


def test_inputs_do_not_depend_on_rho():
    # Common random numbers: for one seed only w2 (so only y2) changes with rho.
    x_a, y1_a, y2_a = make_synthetic(300, rho=0.5, seed=5)
    x_b, y1_b, y2_b = make_synthetic(300, rho=0.9, seed=5)
    assert np.array_equal(x_a, x_b) and np.array_equal(y1_a, y1_b) and not np.allclose(y2_a, y2_b)


def test_noise_is_the_papers_variance_0_01():
    # With rho = 1 both tasks have the same noiseless label, so y1 - y2 is the
    # difference of two N(0, 0.01) draws: standard deviation sqrt(2) * 0.1.
    _, y1, y2 = make_synthetic(50_000, rho=1.0, seed=2)
    assert np.std(y1 - y2) == pytest.approx(np.sqrt(2) * 0.1, rel=0.03)
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
    (dict(rho=1.5), "rho must be in"), (dict(rho=-1.01), "rho must be in"), (dict(rho=float("nan")), "rho must be in"),
    (dict(n=0), "n must be"), (dict(n=2.5), "n must be"), (dict(dim=1), "dim must be"),
    (dict(num_sin=-1), "num_sin must be"), (dict(noise=-0.1), "noise must be"),
    (dict(noise=float("nan")), "noise must be"), (dict(c=0.0), "c must be"), (dict(c=float("inf")), "c must be"),
])
def test_invalid_arguments(kwargs, message):
    kwargs = {"n": 10, "rho": 0.5, **kwargs}
    with pytest.raises(ValueError, match=message):
        make_synthetic(**kwargs)


def test_paired_change_of_mmoes_advantage_is_per_seed():
    import math

    from benchmarks.synthetic import paired_change

    # Final losses (last epoch) per seed; seed 1's data is harder for both models at both rhos.
    runs = {(0.5, "omoe"): [[0.9, 0.30], [0.9, 0.50]], (0.5, "mmoe"): [[0.9, 0.20], [0.9, 0.42]],
            (1.0, "omoe"): [[0.9, 0.30], [0.9, 0.50]], (1.0, "mmoe"): [[0.9, 0.31], [0.9, 0.50]]}
    mean, se = paired_change(runs, 0.5, 1.0, {0.5: "omoe", 1.0: "omoe"})
    # Per seed: (0.30 - 0.20) - (0.30 - 0.31) = 0.11 and (0.50 - 0.42) - (0.50 - 0.50) = 0.08.
    assert math.isclose(mean, 0.095, abs_tol=1e-12)
    assert math.isclose(se, abs(0.11 - 0.08) / math.sqrt(2) / math.sqrt(2), abs_tol=1e-12)
    one_seed = {k: v[:1] for k, v in runs.items()}
    assert paired_change(one_seed, 0.5, 1.0, {0.5: "omoe", 1.0: "omoe"}) is None
