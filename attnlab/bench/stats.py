"""Statistics for the report, with no dependency beyond the standard library: Student's t quantiles, mean and
sample std, and the two intervals every comparison shows (Welch's, and paired by seed)."""
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
        return {"diff": diff, "low": float("nan"), "high": float("nan"), "df": float("nan")}
    va, vb = sa * sa / na, sb * sb / nb
    se = math.sqrt(va + vb)
    if se == 0.0:  # every seed identical on both sides: no spread to build an interval from
        return {"diff": diff, "low": diff, "high": diff, "df": float("inf")}
    df = (va + vb) ** 2 / ((va * va / (na - 1) if va else 0.0) + (vb * vb / (nb - 1) if vb else 0.0))
    half = t_ppf(0.5 + level / 2.0, df) * se
    return {"diff": diff, "low": diff - half, "high": diff + half, "df": df}


def paired_interval(a: dict, b: dict, level=0.95):
    """Mean of the per-seed differences a[seed] - b[seed] over the seeds both have, with its t interval (n - 1 df).

    Each seed draws the data subset and the validation hold-out, so pairing by seed removes that shared noise.
    """
    diffs = [a[k] - b[k] for k in sorted(set(a) & set(b)) if not isnan(a[k]) and not isnan(b[k])]
    mean, std, n = mean_std(diffs)
    if n < 2:
        return {"diff": mean, "low": float("nan"), "high": float("nan"), "df": float("nan"), "n": n}
    half = t_ppf(0.5 + level / 2.0, n - 1) * std / math.sqrt(n)
    return {"diff": mean, "low": mean - half, "high": mean + half, "df": n - 1, "n": n}


def isnan(v):
    try:
        return math.isnan(float(v))
    except (TypeError, ValueError):
        return True
