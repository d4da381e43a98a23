"""Statistics of an A/B comparison of task heads: metrics, bootstrap, DeLong, Holm, sample-ratio mismatch.

NumPy and SciPy only (no TensorFlow), so it is fast to import and to test.

Metrics per head (rows are the units; unweighted):

* binary heads: AUC (ties count half), log loss (scores clipped to [1e-7, 1 - 1e-7]) and expected calibration
  error, ECE = sum over equal-width score bins of |sum(p - y)| / n (the gap between mean score and positive rate
  in each bin, weighted by the bin's share of rows);
* regression heads: RMSE and MAE.

Bootstrap.  A resample is a vector of row counts (multinomial: n draws with replacement); every metric is a
weighted statistic of the rows, so a chunk of resamples is a `[chunk, n]` count matrix and each metric a few
matrix operations on it, not a Python loop over resamples:

* AUC: rows are sorted by score once; per resample the weights of positives and negatives are summed per group
  of tied scores (`np.add.reduceat`), and AUC = sum_g P_g (N_<g + N_g / 2) / (P N) with N_<g a cumulative sum of
  the negatives' weights in score order;
* log loss, RMSE, MAE, ECE: per-row terms (for ECE, the row's p - y in its bin's column) multiplied by the count
  matrix (`W @ terms`), divided by the resample's row count.

Paired comparison (offline: A and B scored the same rows): one count matrix serves both models, so the
difference B - A of each resample has the models' correlation in it.  Unpaired (online: the arms served
different units): each arm is resampled on its own.

Tests and verdict.  The CI of B - A is the bootstrap percentile interval; its SE is the bootstrap standard
deviation.  The p-value of a head is DeLong's test of the AUC difference for binary heads (paired DeLong,
Sun & Xu 2014, when paired; the sum of the two AUC variances when unpaired) and the normal approximation
|d| / SE_bootstrap of the RMSE difference for regression heads.  Holm's step-down correction is applied across
the heads (and, for slices, across every judged head and slice value of one slice column).  Verdict: "B better"
or "B worse" when the Holm-adjusted p-value is below alpha (the direction from the sign of the difference; lower
is better for RMSE), else "no significant difference".

Minimum detectable effect: MDE = (z_{1-alpha/2} + z_{power}) * SE = (1.960 + 0.842) * SE = 2.80 * SE for alpha
0.05 and 80% power, with SE the bootstrap SE of the head's primary difference (AUC, RMSE).  A true difference of
that size is found 80% of the time at this sample size; a smaller one mostly is not, so "no significant
difference" with a large MDE means "too few rows to tell", not "the same".
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import stats as sps

BINARY, REGRESSION = "binary", "regression"
# The metric tested and judged per head kind, and whether a larger value is better.
PRIMARY = {BINARY: "auc", REGRESSION: "rmse"}
HIGHER_IS_BETTER = {"auc": True, "log_loss": False, "ece": False, "rmse": False, "mae": False}
METRICS = {BINARY: ("auc", "log_loss", "ece"), REGRESSION: ("rmse", "mae")}

B_BETTER, B_WORSE, NO_DIFFERENCE = "B better", "B worse", "no significant difference"
_CLIP = 1e-7
# Elements of one [chunk, n] count matrix; bounds memory (a few such matrices live at once).
_CHUNK_ELEMENTS = 2_000_000

Progress = Optional[Callable[[str], None]]


def mde_factor(alpha: float = 0.05, power: float = 0.8) -> float:
    """z_{1-alpha/2} + z_{power}: the minimum detectable effect in units of the SE (2.80 for 0.05 and 0.8)."""
    return float(sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(power))


# -- checks ---------------------------------------------------------------------------------------------------


def check_head(name: str, kind: str, labels, scores_by_model: Dict[str, np.ndarray]) -> np.ndarray:
    """Validate one head's labels and scores; returns the labels as float64 [n].

    Args:
        name: the head (for messages).
        kind: "binary" or "regression".
        labels: [n] label per row (0/1 for binary heads).
        scores_by_model: model name -> [n] scores.
    Raises ValueError naming the head and the problem (row counts, NaN, labels not 0/1).
    """
    if kind not in METRICS:
        raise ValueError(f"head {name!r}: unknown kind {kind!r}; expected one of {list(METRICS)}")
    y = np.asarray(labels, dtype="float64").ravel()
    if len(y) == 0:
        raise ValueError(f"head {name!r}: no rows")
    for model, scores in scores_by_model.items():
        p = np.asarray(scores).ravel()
        if len(p) != len(y):
            raise ValueError(f"head {name!r}: model {model} has {len(p)} predictions for {len(y)} labelled rows; "
                             f"the row counts must match")
        if not np.all(np.isfinite(p)):
            raise ValueError(f"head {name!r}: model {model} has {int((~np.isfinite(p)).sum())} NaN/inf predictions")
    if not np.all(np.isfinite(y)):
        raise ValueError(f"head {name!r}: {int((~np.isfinite(y)).sum())} labels are NaN/inf (missing outcomes?)")
    if kind == BINARY and not np.all((y == 0) | (y == 1)):
        bad = np.unique(y[(y != 0) & (y != 1)])[:3]
        raise ValueError(f"head {name!r} is binary but has labels other than 0 and 1, e.g. {bad.tolist()}")
    return y


# -- point metrics -------------------------------------------------------------------------------------------


class HeadScores:
    """One model's scores for one head, prepared for fast weighted metrics.

    Args:
        kind: "binary" or "regression".
        labels: [n] float labels (0/1 for binary).
        scores: [n] scores (probabilities for binary heads).
        bins: equal-width score bins of the ECE and the reliability curve.
    """

    def __init__(self, kind: str, labels: np.ndarray, scores: np.ndarray, bins: int = 10):
        self.kind = kind
        self.y = np.asarray(labels, dtype="float64")
        self.p = np.asarray(scores, dtype="float64")
        self.n = len(self.y)
        if kind == BINARY:
            # Sort once: the AUC of any resample is then a cumulative sum in this order.
            self.order = np.argsort(self.p, kind="stable")
            sorted_p = self.p[self.order]
            y_sorted = self.y[self.order]
            self.negative_sorted = (y_sorted == 0).astype("float32")[:, None]
            # For each positive (in score order), its tie group [start, end) of sorted positions: the negatives
            # it beats are those before `start` plus half of those in the group, i.e. the mean of the cumulative
            # negative weight at `start` and at `end` (both equal its own position when it has no tie).
            starts = np.flatnonzero(np.r_[True, sorted_p[1:] != sorted_p[:-1]])
            group = np.cumsum(np.r_[True, sorted_p[1:] != sorted_p[:-1]]) - 1
            ends = np.r_[starts[1:], self.n]
            self.positive_rows = np.flatnonzero(y_sorted == 1)
            self.tie_low = starts[group[self.positive_rows]]
            self.tie_high = ends[group[self.positive_rows]]
            q = np.clip(self.p, _CLIP, 1 - _CLIP)
            log_loss = -(self.y * np.log(q) + (1 - self.y) * np.log(1 - q))
            bin_index = np.minimum((np.clip(self.p, 0, 1) * bins).astype(int), bins - 1)
            gap = np.zeros((self.n, bins))
            gap[np.arange(self.n), bin_index] = self.p - self.y
            # Columns: log loss, then per bin the row's p - y (zero outside its bin).
            terms = np.column_stack([log_loss, gap])
        else:
            error = self.p - self.y
            terms = np.column_stack([error ** 2, np.abs(error)])
        self.terms = terms
        # float64: summing a few hundred thousand float32 log losses drifts by ~1e-7, a few % of the bootstrap SE
        # of a log-loss difference between two close models.
        self.terms_t = np.ascontiguousarray(terms.T)

    def metrics(self, counts: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
        """Metrics of the rows as they are, or of resamples.

        Args:
            counts: None, or [n, c] float32 row counts of c resamples (from `resample_counts`: rows are the
                data rows, columns the resamples, so that cumulative sums over rows are vectorised over
                resamples).
        Returns:
            metric name -> float (counts None) or [c] float64 values.
        """
        if counts is None:
            return self._point()
        total = counts.sum(axis=0, dtype="float64")
        sums = self.terms_t @ counts.astype("float64")  # [terms, c]
        if self.kind == BINARY:
            return {"auc": self._auc(counts), "log_loss": sums[0] / total,
                    "ece": np.abs(sums[1:]).sum(axis=0) / total}
        return {"rmse": np.sqrt(sums[0] / total), "mae": sums[1] / total}

    def _point(self) -> Dict[str, float]:
        sums = self.terms.sum(axis=0)
        if self.kind == BINARY:
            from mmoe.training import roc_auc  # the project's AUC; lazy: it imports Keras

            auc = roc_auc(self.y, self.p)
            return {"auc": auc, "log_loss": sums[0] / self.n, "ece": float(np.abs(sums[1:]).sum() / self.n)}
        return {"rmse": float(np.sqrt(sums[0] / self.n)), "mae": float(sums[1] / self.n)}

    def _auc(self, counts: np.ndarray) -> np.ndarray:
        # float32 is exact while n < 2**24: counts are small integers and every cumulative count is at most n, so
        # each term below is an exact integer or half-integer; only the final sum needs float64. Past that, float64.
        exact = "float32" if self.n < 2 ** 24 else "float64"
        weights = counts[self.order].astype(exact, copy=False)         # [n, c] in score order
        negatives_up_to = np.empty((self.n + 1, counts.shape[1]), dtype=exact)
        negatives_up_to[0] = 0
        np.cumsum(weights * self.negative_sorted, axis=0, out=negatives_up_to[1:])
        beaten = 0.5 * (negatives_up_to[self.tie_low] + negatives_up_to[self.tie_high])
        positive_weights = weights[self.positive_rows]
        numerator = (positive_weights * beaten).sum(axis=0, dtype="float64")
        pairs = positive_weights.sum(axis=0, dtype="float64") * negatives_up_to[-1].astype("float64")
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(pairs > 0, numerator / pairs, np.nan)


def reliability_curve(labels, scores, bins: int = 10) -> Dict[str, list]:
    """Per equal-width score bin: mean score, positive rate and row count (empty bins left out)."""
    y = np.asarray(labels, dtype="float64")
    p = np.asarray(scores, dtype="float64")
    index = np.minimum((np.clip(p, 0, 1) * bins).astype(int), bins - 1)
    count = np.bincount(index, minlength=bins)
    keep = count > 0
    mean_p = np.bincount(index, weights=p, minlength=bins)[keep] / count[keep]
    rate = np.bincount(index, weights=y, minlength=bins)[keep] / count[keep]
    return {"mean_score": mean_p.tolist(), "positive_rate": rate.tolist(), "rows": count[keep].tolist()}


# -- DeLong ----------------------------------------------------------------------------------------------------


def _delong_components(y: np.ndarray, p: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components (midranks, Sun & Xu 2014): V10 per positive, V01 per negative."""
    pos, neg = p[y == 1], p[y == 0]
    m, n = len(pos), len(neg)
    all_ranks = sps.rankdata(np.concatenate([pos, neg]))
    v10 = (all_ranks[:m] - sps.rankdata(pos)) / n      # share of negatives below each positive (ties half)
    v01 = 1.0 - (all_ranks[m:] - sps.rankdata(neg)) / m  # share of positives above each negative
    return v10, v01


def delong_auc_variance(labels, scores) -> Tuple[float, float]:
    """(AUC, DeLong variance of the AUC) of one model on binary labels."""
    y = np.asarray(labels, dtype="float64")
    v10, v01 = _delong_components(y, np.asarray(scores, dtype="float64"))
    return float(v10.mean()), float(v10.var(ddof=1) / len(v10) + v01.var(ddof=1) / len(v01))


def _mean_components(y: np.ndarray, scores) -> Tuple[np.ndarray, np.ndarray]:
    """DeLong components of one model's scores `[rows]`, or of the mean AUC of several `[models, rows]`.

    The mean of several AUCs on the same rows is again a two-sample U-statistic (its kernel the models' mean
    kernel), so its components are the models' components averaged, and DeLong's variance holds for it.
    """
    scores = np.asarray(scores, dtype="float64")
    if scores.ndim == 1:
        return _delong_components(y, scores)
    parts = [_delong_components(y, row) for row in scores]
    return np.mean([v10 for v10, _ in parts], axis=0), np.mean([v01 for _, v01 in parts], axis=0)


def delong_paired(labels, scores_a, scores_b) -> Dict[str, float]:
    """Paired DeLong test of AUC(B) - AUC(A) on the same rows.

    `scores_a` or `scores_b` may be `[models, rows]`: that side's AUC is then the mean AUC of those models (e.g.
    training seeds), tested as one statistic.  Returns auc_a, auc_b, diff, se (of the difference) and the
    two-sided p-value (1.0 when se is 0 and the difference is 0, e.g. identical scores).
    """
    y = np.asarray(labels, dtype="float64")
    a10, a01 = _mean_components(y, scores_a)
    b10, b01 = _mean_components(y, scores_b)
    s10 = np.cov(np.vstack([a10, b10]))
    s01 = np.cov(np.vstack([a01, b01]))
    cov = s10 / len(a10) + s01 / len(a01)
    variance = max(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1], 0.0)
    return _z_test(float(a10.mean()), float(b10.mean()), variance)


def delong_unpaired(labels_a, scores_a, labels_b, scores_b) -> Dict[str, float]:
    """DeLong test of AUC(B) - AUC(A) on independent samples: the two variances add."""
    auc_a, var_a = delong_auc_variance(labels_a, scores_a)
    auc_b, var_b = delong_auc_variance(labels_b, scores_b)
    return _z_test(auc_a, auc_b, var_a + var_b)


def _z_test(a: float, b: float, variance: float) -> Dict[str, float]:
    diff = b - a
    se = math.sqrt(variance) if variance > 0 else 0.0
    return {"auc_a": a, "auc_b": b, "diff": diff, "se": se, "p_value": z_p_value(diff, se)}


def z_p_value(diff: float, se: float) -> float:
    """Two-sided normal p-value of diff / se (1.0 for a zero difference with zero SE, 0.0 for nonzero)."""
    if not np.isfinite(diff) or not np.isfinite(se):
        return float("nan")
    if se <= 0:
        return 1.0 if diff == 0 else 0.0
    return float(2 * sps.norm.sf(abs(diff) / se))


# -- multiple testing, SRM ------------------------------------------------------------------------------------


def holm(p_values: Sequence[float]) -> List[float]:
    """Holm-Bonferroni adjusted p-values (step-down), in the input order; NaN entries stay NaN and do not count.

    adjusted p_(i) = max over j <= i of min(1, (m - j + 1) p_(j)) for the sorted p_(1) <= ... <= p_(m).
    """
    p = np.asarray(p_values, dtype="float64")
    out = np.full(len(p), np.nan)
    valid = np.flatnonzero(np.isfinite(p))
    m = len(valid)
    if not m:
        return out.tolist()
    order = valid[np.argsort(p[valid], kind="stable")]
    scaled = np.minimum(1.0, p[order] * (m - np.arange(m)))
    out[order] = np.maximum.accumulate(scaled)
    return out.tolist()


def sample_ratio_mismatch(counts: Dict[str, int], fractions: Dict[str, float],
                          threshold: float = 0.001) -> Dict[str, object]:
    """Chi-square test of units per arm against the configured split fractions.

    Args:
        counts: arm -> units observed (distinct keys or requests).
        fractions: arm -> configured fraction (arms with fraction 0 must have no units).
        threshold: p-value below which the test is flagged.
    Returns a dict: counts, expected, chi2, p_value, flagged, message.
    """
    arms = list(fractions)
    unknown = sorted(set(counts) - set(arms))
    if unknown:
        raise ValueError(f"units in arm(s) {unknown} that the split config does not have (arms: {arms})")
    total = int(sum(counts.get(a, 0) for a in arms))
    if total == 0:
        raise ValueError("sample-ratio check: no units in any arm")
    frac = np.array([float(fractions[a]) for a in arms])
    frac = frac / frac.sum()
    observed = np.array([counts.get(a, 0) for a in arms], dtype="float64")
    expected = frac * total
    live = expected > 0
    if np.any(observed[~live] > 0):
        chi2, p = float("inf"), 0.0  # units in an arm configured to get none
    elif live.sum() < 2:
        chi2, p = 0.0, 1.0
    else:
        chi2, p = (float(v) for v in sps.chisquare(observed[live], expected[live]))
    flagged = bool(p < threshold)
    message = (f"SRM: do not trust this test (chi-square p = {p:.2g} < {threshold:g}: the arms' unit counts "
               f"{dict(zip(arms, observed.astype(int).tolist()))} do not match the split "
               f"{dict(zip(arms, frac.round(4).tolist()))})" if flagged else
               f"no sample-ratio mismatch (chi-square p = {p:.3g})")
    return {"counts": dict(zip(arms, observed.astype(int).tolist())),
            "expected": dict(zip(arms, expected.round(1).tolist())), "chi2": chi2, "p_value": p,
            "threshold": threshold, "flagged": flagged, "message": message}


# -- bootstrap ---------------------------------------------------------------------------------------------


def resample_counts(rng: np.random.Generator, n: int, count: int) -> np.ndarray:
    """[n, count] float32 multinomial bootstrap counts: column j tallies n draws with replacement of the rows."""
    draws = rng.integers(0, n, size=(count, n)) + (np.arange(count) * n)[:, None]
    tally = np.bincount(draws.ravel(), minlength=count * n).reshape(count, n)
    return np.ascontiguousarray(tally.T, dtype="float32")


def _chunks(resamples: int, n: int):
    size = max(1, min(resamples, _CHUNK_ELEMENTS // max(n, 1)))
    for start in range(0, resamples, size):
        yield min(size, resamples - start)


def paired_bootstrap(heads: Dict[str, Tuple[HeadScores, HeadScores]], resamples: int, seed: int,
                     progress: Progress = None, what: str = "") -> Dict[str, Dict[str, np.ndarray]]:
    """B - A of every metric of every head over `resamples` paired resamples of the rows.

    Args:
        heads: head -> (A's HeadScores, B's HeadScores), all on the same n rows.
        resamples: number of bootstrap resamples.
        seed: the generator seed; the same seed gives the same resamples.
        progress: called with a line of text after each chunk.
        what: prefix of the progress lines.
    Returns head -> metric -> [resamples] differences B - A.
    """
    return _bootstrap(heads, resamples, seed, progress, what, paired=True)


def unpaired_bootstrap(heads: Dict[str, Tuple[HeadScores, HeadScores]], resamples: int, seed: int,
                       progress: Progress = None, what: str = "") -> Dict[str, Dict[str, np.ndarray]]:
    """Like paired_bootstrap, but A's and B's rows (different units, any sizes) are resampled independently.

    Heads may hold different numbers of rows (each is resampled on its own rows).
    """
    return _bootstrap(heads, resamples, seed, progress, what, paired=False)


def _bootstrap(heads, resamples, seed, progress, what, paired):
    # Heads may hold different rows (online, a head leaves out the units whose outcome is not known yet), so the
    # resample counts are drawn per row count: heads of one arm with the same rows share them.
    largest = max(max(a.n, b.n) for a, b in heads.values())
    rng = np.random.default_rng(seed)
    parts: Dict[str, Dict[str, list]] = {h: {} for h in heads}
    done = 0
    for size in _chunks(resamples, largest):
        drawn: Dict[tuple, np.ndarray] = {}

        def counts(arm: str, n: int) -> np.ndarray:
            if (arm, n) not in drawn:
                drawn[arm, n] = resample_counts(rng, n, size)
            return drawn[arm, n]

        for head, (a, b) in heads.items():
            wa = counts("A", a.n)
            wb = wa if paired else counts("B", b.n)  # paired: the same rows for A and B
            ma, mb = a.metrics(wa), b.metrics(wb)
            for k in ma:
                parts[head].setdefault(k, []).append(mb[k] - ma[k])
        done += size
        if progress:
            progress(f"{what}bootstrap {done}/{resamples} resamples")
    return {h: {k: np.concatenate(v) for k, v in m.items()} for h, m in parts.items()}


# -- one comparison ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Settings:
    """How a comparison is run and judged.

    resamples: bootstrap resamples; seed: their generator's seed; alpha: test level (CI = 1 - alpha);
    power: power of the minimum detectable effect; bins: ECE / reliability bins; min_rows, min_class: a slice
    with fewer rows (per arm), or fewer positives or negatives in a binary head, is marked "too small" and not
    judged.
    """

    resamples: int = 1000
    seed: int = 0
    alpha: float = 0.05
    power: float = 0.8
    bins: int = 10
    min_rows: int = 200
    min_class: int = 20

    def __post_init__(self):
        if not isinstance(self.resamples, int) or self.resamples < 10:
            raise ValueError(f"resamples must be an integer >= 10, got {self.resamples!r}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha!r}")
        if not 0 < self.power < 1:
            raise ValueError(f"power must be in (0, 1), got {self.power!r}")
        if self.bins < 2:
            raise ValueError(f"bins must be >= 2, got {self.bins!r}")
        if self.min_rows < 2 or self.min_class < 1:
            raise ValueError(f"min_rows must be >= 2 and min_class >= 1, got {self.min_rows}, {self.min_class}")


def too_small(kind: str, labels_by_arm: Sequence[np.ndarray], settings: Settings) -> str:
    """Why a (slice of a) head is too small to judge, or "" when it is not."""
    for arm, y in zip("AB", labels_by_arm):
        if len(y) < settings.min_rows:
            return f"{len(y)} rows{'' if len(labels_by_arm) == 1 else ' in arm ' + arm} < {settings.min_rows}"
        if kind == BINARY:
            positives = int(y.sum())
            if min(positives, len(y) - positives) < settings.min_class:
                return (f"{positives} positives / {len(y) - positives} negatives"
                        f"{'' if len(labels_by_arm) == 1 else ' in arm ' + arm} (< {settings.min_class})")
    return ""


def compare(heads: Dict[str, dict], settings: Settings, paired: bool, progress: Progress = None,
            what: str = "") -> Dict[str, dict]:
    """Compare A and B on every head: metrics, bootstrap CIs of B - A, the head's test and its MDE.

    Args:
        heads: head -> {"kind": "binary"|"regression", "labels_a": [n_a], "scores_a": [n_a],
            "labels_b": [n_b], "scores_b": [n_b]} (paired: the same rows, so labels_a == labels_b).
        settings: resamples, seed, alpha, ...
        paired: True for the offline mode (same rows), False for the online mode (different units).
        progress, what: progress lines (see paired_bootstrap).
    Returns head -> result dict with rows, metrics {name: {a, b, diff, ci, se, p_value}}, test {metric,
    method, diff, se, p_value, mde}; too-small heads get "too_small": reason and no metrics.  The Holm
    correction and the verdict are added by `judge`.
    """
    results: Dict[str, dict] = {}
    prepared = {}
    for head, h in heads.items():
        kind = h["kind"]
        ya = check_head(head, kind, h["labels_a"], {"A": h["scores_a"]})
        yb = check_head(head, kind, h["labels_b"], {"B": h["scores_b"]})
        if paired and (len(ya) != len(yb)):
            raise ValueError(f"head {head!r}: a paired comparison needs the same rows, got {len(ya)} and {len(yb)}")
        rows = {"rows": len(ya)} if paired else {"rows_a": len(ya), "rows_b": len(yb)}
        if kind == BINARY:
            rows.update({"positives": int(ya.sum())} if paired else
                        {"positives_a": int(ya.sum()), "positives_b": int(yb.sum())})
        reason = too_small(kind, [ya] if paired else [ya, yb], settings)
        results[head] = {"kind": kind, **rows}
        if reason:
            results[head]["too_small"] = reason
            continue
        prepared[head] = (HeadScores(kind, ya, h["scores_a"], settings.bins),
                          HeadScores(kind, yb, h["scores_b"], settings.bins))
    if not prepared:
        return results
    boot = (paired_bootstrap if paired else unpaired_bootstrap)(prepared, settings.resamples, settings.seed,
                                                               progress, what)
    factor = mde_factor(settings.alpha, settings.power)
    for head, (a, b) in prepared.items():
        point_a, point_b = a.metrics(), b.metrics()
        metrics = {}
        for name, diffs in boot[head].items():
            diff = point_b[name] - point_a[name]
            se = float(np.nanstd(diffs, ddof=1))
            low, high = np.nanpercentile(diffs, [100 * settings.alpha / 2, 100 * (1 - settings.alpha / 2)])
            metrics[name] = {"a": point_a[name], "b": point_b[name], "diff": diff, "ci": [float(low), float(high)],
                             "se": se, "p_value": z_p_value(diff, se)}
        primary = PRIMARY[a.kind]
        test = {"metric": primary, "diff": metrics[primary]["diff"], "se_bootstrap": metrics[primary]["se"],
                "mde_per_test": factor * metrics[primary]["se"]}  # `judge` adds the family's "mde"
        if a.kind == BINARY:
            dl = delong_paired(a.y, a.p, b.p) if paired else delong_unpaired(a.y, a.p, b.y, b.p)
            test.update(method="DeLong (paired)" if paired else "DeLong (unpaired)", p_value=dl["p_value"],
                        se_delong=dl["se"])
        else:
            test.update(method="bootstrap normal approximation", p_value=metrics[primary]["p_value"])
        results[head]["metrics"] = metrics
        results[head]["test"] = test
    return results


def judge(results: Sequence[Dict[str, dict]], settings: Settings) -> None:
    """Holm-correct the head tests of all `results` (one family) and write p_holm, mde and verdict into them.

    The MDE is the difference this family would find four times in five (at `settings.power`) through Holm's
    first step, alpha / m for m tests: with several heads (or slice values) the per-test MDE would overstate
    the power (two heads: 71 % at the per-test MDE, not 80 %)."""
    tests = [(r, h) for res in results for h, r in res.items() if "test" in r]
    adjusted = holm([r["test"]["p_value"] for r, _ in tests])
    family = mde_factor(settings.alpha / max(len(tests), 1), settings.power)
    for (r, _), p_holm in zip(tests, adjusted):
        test = r["test"]
        test["p_holm"] = p_holm
        test["mde"] = family * test["se_bootstrap"]
        test["tests_in_family"] = len(tests)
        if not np.isfinite(p_holm) or p_holm >= settings.alpha or test["diff"] == 0:
            r["verdict"] = NO_DIFFERENCE
        else:
            better = (test["diff"] > 0) == HIGHER_IS_BETTER[test["metric"]]
            r["verdict"] = B_BETTER if better else B_WORSE
    for res in results:
        for r in res.values():
            if "too_small" in r:
                r["verdict"] = "too small: " + r["too_small"]
