"""Statistics for the report, with no dependency beyond the standard library: Student's t quantiles, mean and
sample std, the intervals every comparison shows (Welch's on the two methods' own SDs, Student's on the matrix's
pooled SD, and paired by seed), p-values, the minimum detectable effect, Holm's adjustment, and the interval of a
latency ratio over timing rounds.

Minimum detectable effect (MDE): the smallest true difference a two-sided test at level alpha detects with the
given power, for groups of n1 and n2 with standard deviation sd and df degrees of freedom,
    MDE = (t_{1 - alpha/2, df} + t_{power, df}) * sd * sqrt(1/n1 + 1/n2)
(the usual normal-approximation formula with t quantiles; against the exact noncentral-t power it errs by a few
percent, tests/test_report.py checks it against scipy)."""
import math


def _betacf(a, b, x):
    # Continued fraction of the regularized incomplete beta function (modified Lentz's method).
    tiny, eps = 1e-300, 3e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a, b, x):
    """Regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t, df):
    """CDF of Student's t with ``df`` (real, > 0) degrees of freedom."""
    t2 = t * t
    if t2 < df:  # near 0 the other form of the same integral keeps its precision
        half = 0.5 * betainc(0.5, df / 2.0, t2 / (df + t2))
        return 0.5 + half if t > 0 else 0.5 - half
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t2))
    return 1.0 - tail if t > 0 else tail


def t_ppf(q, df):
    """Quantile of Student's t (bisection on the CDF; plenty fast for a report)."""
    if not 0.0 < q < 1.0:
        raise ValueError("q must be in (0, 1)")
    lo, hi = -1e4, 1e4
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def mean_std(values):
    """(mean, sample std with ddof=1 or nan for one value, n)."""
    vals = [float(v) for v in values if v is not None and not isnan(v)]
    n = len(vals)
    if n == 0:
        return float("nan"), float("nan"), 0
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else float("nan")
    return mean, std, n


def welch_interval(a, b, level=0.95):
    """Difference mean(a) - mean(b) with its Welch t interval (unequal variances, Welch-Satterthwaite df).

    Returns dict(diff, low, high, df); low/high are nan when either side has fewer than 2 values.
    """
    ma, sa, na = mean_std(a)
    mb, sb, nb = mean_std(b)
    diff = ma - mb
    if na < 2 or nb < 2:
        return {"diff": diff, "low": float("nan"), "high": float("nan"), "df": float("nan"), "se": float("nan")}
    va, vb = sa * sa / na, sb * sb / nb
    se = math.sqrt(va + vb)
    if se == 0.0:  # every seed identical on both sides: no spread to build an interval from
        return {"diff": diff, "low": diff, "high": diff, "df": float("inf"), "se": 0.0}
    df = (va + vb) ** 2 / ((va * va / (na - 1) if va else 0.0) + (vb * vb / (nb - 1) if vb else 0.0))
    return _t_interval(diff, se, df, level)


def _t_interval(diff, se, df, level):
    half = t_ppf(0.5 + level / 2.0, df) * se
    return {"diff": diff, "low": diff - half, "high": diff + half, "df": df, "se": se}


def pooled_sd(groups):
    """(pooled standard deviation, its degrees of freedom) over every group with at least 2 values:
    sqrt(sum (n_i - 1) s_i^2 / sum (n_i - 1)). (nan, 0) when no group has 2 values."""
    ss, df = 0.0, 0
    for values in groups:
        _, sd, n = mean_std(values)
        if n >= 2:
            ss += (n - 1) * sd * sd
            df += n - 1
    return (math.sqrt(ss / df), df) if df else (float("nan"), 0)


def pooled_interval(a, b, sd, df, level=0.95):
    """Difference mean(a) - mean(b) with the Student t interval from a pooled SD (``sd`` with ``df`` degrees of
    freedom, usually every method of the matrix): steadier than Welch's when each method has only 3 values."""
    ma, _, na = mean_std(a)
    mb, _, nb = mean_std(b)
    if na < 1 or nb < 1 or not df or isnan(sd):
        return {"diff": ma - mb, "low": float("nan"), "high": float("nan"), "df": float("nan"), "se": float("nan")}
    return _t_interval(ma - mb, sd * math.sqrt(1 / na + 1 / nb), df, level)


def p_two_sided(interval: dict) -> float:
    """Two-sided p-value of diff = 0 for an interval from this module (its diff, se and df)."""
    return _p_tail(abs(interval["diff"]), interval, two_sided=True)


def p_below(interval: dict, bound: float) -> float:
    """One-sided p-value of the null diff >= ``bound`` (small when the difference is surely below it)."""
    return _p_tail(bound - interval["diff"], interval)


def p_above(interval: dict, bound: float) -> float:
    """One-sided p-value of the null diff <= ``bound`` (small when the difference is surely above it)."""
    return _p_tail(interval["diff"] - bound, interval)


def _p_tail(distance, interval, two_sided=False):
    se, df = interval.get("se", float("nan")), interval.get("df", float("nan"))
    if isnan(se) or isnan(df):
        return float("nan")
    if se == 0.0:
        return 0.0 if distance > 0 else 1.0
    tail = 1.0 - t_cdf(distance / se, df)
    return min(1.0, 2.0 * tail) if two_sided else tail


def mde(sd, n1, n2, df, alpha=0.05, power=0.8) -> float:
    """Minimum detectable effect (module docstring) of a two-sided test at ``alpha`` with ``power``."""
    if n1 < 1 or n2 < 1 or not df or isnan(sd) or isnan(df):
        return float("nan")
    return (t_ppf(1.0 - alpha / 2.0, df) + t_ppf(power, df)) * sd * math.sqrt(1 / n1 + 1 / n2)


def holm(pvalues):
    """Holm's step-down adjustment of a family of p-values (nan entries are left out of the family and stay nan)."""
    ranked = sorted((p, i) for i, p in enumerate(pvalues) if not isnan(p))
    out = [float("nan")] * len(pvalues)
    running, m = 0.0, len(ranked)
    for rank, (p, i) in enumerate(ranked):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def ratio_interval(numerators, denominators, level=0.95):
    """Ratio of two timings paired by round (round r of each timed in the same pass) with a t interval over rounds,
    computed on the log ratios: {ratio, low, high, n}. low/high are nan with fewer than 2 rounds."""
    logs = [math.log(a / b) for a, b in zip(numerators, denominators) if a and b and a > 0 and b > 0]
    mean, sd, n = mean_std(logs)
    if n == 0:
        return {"ratio": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    if n < 2:
        return {"ratio": math.exp(mean), "low": float("nan"), "high": float("nan"), "n": n}
    half = t_ppf(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return {"ratio": math.exp(mean), "low": math.exp(mean - half), "high": math.exp(mean + half), "n": n}


def paired_interval(a: dict, b: dict, level=0.95):
    """Mean of the per-seed differences a[seed] - b[seed] over the seeds both have, with its t interval (n - 1 df).

    Each seed draws the data subset and the validation hold-out, so pairing by seed removes that shared noise.
    """
    diffs = [a[k] - b[k] for k in sorted(set(a) & set(b)) if not isnan(a[k]) and not isnan(b[k])]
    mean, std, n = mean_std(diffs)
    if n < 2:
        return {"diff": mean, "low": float("nan"), "high": float("nan"), "df": float("nan"), "se": float("nan"),
                "n": n}
    return {**_t_interval(mean, std / math.sqrt(n), n - 1, level), "n": n}


def isnan(v):
    try:
        return math.isnan(float(v))
    except (TypeError, ValueError):
        return True
