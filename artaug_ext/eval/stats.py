"""Paired statistics for `artaug eval`: a candidate arm against a baseline arm (numpy only).

Both arms are generated from the same prompts and seeds, so score i of `a` (candidate, e.g.
FLUX + LoRA) and score i of `b` (baseline, the base model) form a pair, and every number is
computed over pairs. One row of the paper-like table (`summarize_metric`) holds:

- `mean_a`, `mean_b`: the mean score of each arm. This is how the paper's aesthetic
  (6.81 vs 6.35) and CLIP (26.97 vs 26.92) columns read.
- `mean_diff`: mean(a - b), with a bootstrap interval `diff_ci`; 0 outside it means the
  difference is more than seed-and-prompt noise.
- `win_rate`: the share of pairs where a scores better than b, ties counting half (a hard
  preference), with `win_ci`. Better is higher, or lower for a metric where lower is better
  (`lower_is_better`: an error, a Delta E); `pair_wins` is the one definition of a win.
- `preference` (kind "preference" only, the PickScore column): the MEAN over pairs of the
  probability that a is preferred, softmax([s_a, s_b])[0], where s = logit_scale.exp() *
  cosine(image, text) is PickScore's own logit. We implement this reading of the paper's
  57.78% vs 42.22%: the two arms' numbers sum to 100 as those do, and p(a over b) + p(b over a)
  is exactly 1 here.
- `n` pairs and `prompts`: the number of distinct prompts (`groups`), or n without groups.

Intervals are 95% percentile bootstraps. With `groups` (the prompt index of each pair) the
bootstrap is nested: it resamples prompts with replacement, then the seeds of each drawn
prompt with replacement, because the seeds of one prompt are not independent of each other
(a hard prompt is hard for every seed) and resampling pairs alone would give too narrow an
interval. All three statistics are means of a per-pair value, so one set of resampled index
arrays serves them all.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import UsageError

STATISTICS = ("mean_diff", "win_rate", "preference")
KINDS = ("score", "preference")

_CHUNK_ELEMENTS = 1 << 21  # resampled indices held at once (bounds memory for large evals)


def _check_pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    """a and b as float64 arrays, or a UsageError naming what is wrong."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or b.ndim != 1:
        raise UsageError(f"scores must be 1-D (one score per image), got shapes {a.shape} and {b.shape}")
    if a.shape != b.shape:
        raise UsageError(f"candidate and baseline need the same number of scores (paired), got {a.size} and {b.size}")
    if a.size < 2:
        raise UsageError(f"need at least 2 pairs of scores, got {a.size}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise UsageError("scores contain NaN or Inf; rescore the images that produced them")
    return a, b


def _check_groups(groups, n: int) -> np.ndarray | None:
    """groups as 0..G-1 codes (one per pair), None without groups."""
    if groups is None:
        return None
    g = np.asarray(groups)
    if g.ndim != 1 or g.size != n:
        raise UsageError(f"groups needs one prompt index per pair ({n}), got shape {g.shape}")
    if g.dtype.kind not in "iu":
        raise UsageError(f"groups must be integer prompt indices, got dtype {g.dtype}")
    codes = np.unique(g, return_inverse=True)[1].reshape(-1)
    if codes.max() < 1:
        raise UsageError("groups name a single prompt; a nested bootstrap needs at least 2 (or pass groups=None)")
    return codes


def pair_wins(a, b, lower_is_better: bool = False) -> np.ndarray:
    """Per pair, 1 where candidate a beats baseline b, 0.5 for a tie, 0 where it loses: a beats b
    with the higher score, or with the lower one when lower is better."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return ((a < b) if lower_is_better else (a > b)) + 0.5 * (a == b)


def win_rate(a, b, lower_is_better: bool = False) -> float:
    """Share of pairs where candidate a beats baseline b, a tie counting half."""
    a, b = _check_pair(a, b)
    return math.fsum(pair_wins(a, b, lower_is_better)) / a.size


def pairwise_preference(score_a, score_b) -> np.ndarray:
    """Per pair, the probability that a is preferred: softmax([s_a, s_b])[0] = 1 / (1 + exp(s_b - s_a)).

    exp is only taken of -|s_a - s_b| (no overflow), and the smaller probability is 1 minus the
    larger, so swapping the arms gives exactly 1 - p."""
    a = np.asarray(score_a, dtype=np.float64)
    b = np.asarray(score_b, dtype=np.float64)
    d = a - b
    high = 1.0 / (1.0 + np.exp(-np.abs(d)))  # the probability of the higher-scored image, >= 0.5
    return np.where(d >= 0, high, 1.0 - high)


def _pair_values(statistic: str, a: np.ndarray, b: np.ndarray, lower_is_better: bool = False) -> np.ndarray:
    """The per-pair value whose mean is the statistic."""
    if statistic == "mean_diff":
        return a - b
    if statistic == "win_rate":
        return pair_wins(a, b, lower_is_better)
    if statistic == "preference":
        return pairwise_preference(a, b)
    raise UsageError(f"unknown statistic {statistic!r}; choose one of {', '.join(STATISTICS)}")


def _estimate(statistic: str, a: np.ndarray, b: np.ndarray, lower_is_better: bool = False) -> float:
    """The statistic on the data itself; exact for symmetric data (a mirror of b gives 0.5)."""
    if statistic == "win_rate":
        return win_rate(a, b, lower_is_better)
    if statistic == "preference":
        # p - 0.5 is exact, and fsum is exactly rounded: mirrored pairs cancel to exactly 0.
        return 0.5 + math.fsum(pairwise_preference(a, b) - 0.5) / a.size
    return float(np.mean(_pair_values(statistic, a, b)))


def _bootstrap_means(values: np.ndarray, codes: np.ndarray | None, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, k) bootstrap replicates of the mean of each row of `values` (k, n).

    Without codes: n pairs drawn with replacement. With codes: as many prompts as there are
    drawn with replacement, then for each drawn prompt as many of its pairs as it has, drawn
    with replacement from it; a replicate is the mean over all pairs drawn. Prompts with fewer
    seeds than the largest are padded and the padding masked out."""
    rng = np.random.default_rng(seed)
    k, n = values.shape
    out = np.empty((n_boot, k))
    if codes is None:
        rows = max(1, _CHUNK_ELEMENTS // n)
        for start in range(0, n_boot, rows):
            stop = min(n_boot, start + rows)
            idx = rng.integers(0, n, size=(stop - start, n))
            out[start:stop] = values[:, idx].mean(axis=2).T
        return out
    order = np.argsort(codes, kind="stable")
    values = values[:, order]
    sizes = np.bincount(codes)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    n_groups, widest = sizes.size, int(sizes.max())
    slots = np.arange(widest)
    rows = max(1, _CHUNK_ELEMENTS // (n_groups * widest))
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        drawn = rng.integers(0, n_groups, size=(stop - start, n_groups))  # prompts
        size = sizes[drawn][..., None]
        within = rng.integers(0, size, size=(stop - start, n_groups, widest))  # seeds of each prompt
        idx = starts[drawn][..., None] + within
        mask = slots < size
        total = values[:, idx] * mask
        out[start:stop] = (total.sum(axis=(2, 3)) / mask.sum(axis=(1, 2))).T
    return out


def _check_bootstrap(n_boot: int, level: float) -> None:
    if int(n_boot) != n_boot or n_boot < 1:
        raise UsageError(f"n_boot must be a positive whole number, got {n_boot!r}")
    if not 0.0 < level < 1.0:
        raise UsageError(f"level must be between 0 and 1 (0.95 for a 95% interval), got {level!r}")


def _interval(replicates: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval of the replicates."""
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(replicates, [tail, 1.0 - tail])
    return float(low), float(high)


def paired_bootstrap(a, b, groups=None, statistic: str = "mean_diff", n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95, lower_is_better: bool = False) -> dict:
    """Percentile bootstrap interval of a paired statistic ("mean_diff", "win_rate" or "preference").

    `groups` (one prompt index per pair) makes the bootstrap nested (prompts, then their seeds);
    the same seed gives the same interval. Returns the estimate, `low`, `high`, and what was
    resampled."""
    a, b = _check_pair(a, b)
    codes = _check_groups(groups, a.size)
    _check_bootstrap(n_boot, level)
    values = _pair_values(statistic, a, b, lower_is_better)
    replicates = _bootstrap_means(values[None, :], codes, int(n_boot), seed)[:, 0]
    low, high = _interval(replicates, level)
    return {
        "statistic": statistic, "estimate": _estimate(statistic, a, b, lower_is_better), "low": low, "high": high,
        "level": level, "n_boot": int(n_boot), "n": int(a.size),
        "prompts": int(a.size) if codes is None else int(codes.max()) + 1,
        "resampled": "pairs" if codes is None else "prompts, then seeds within each prompt",
    }


def summarize_metric(a, b, groups=None, kind: str = "score", n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95, lower_is_better: bool = False) -> dict:
    """One row of the paper-like table for one metric: candidate scores `a` against baseline `b`.

    kind "score" (aesthetic, CLIP): means, mean difference and win rate, each difference with
    its interval. kind "preference" (PickScore logits): also the mean probability that a is
    preferred over b, the number the paper's PickScore column reports. The intervals share one
    set of resamples, and equal those of `paired_bootstrap` with the same seed. `lower_is_better`:
    the win rate counts the lower score as the win (the difference stays a - b)."""
    if kind not in KINDS:
        raise UsageError(f"unknown metric kind {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "preference" and lower_is_better:
        raise UsageError("a preference (PickScore logits) is higher-is-better by definition")
    a, b = _check_pair(a, b)
    codes = _check_groups(groups, a.size)
    _check_bootstrap(n_boot, level)
    names = ["mean_diff", "win_rate"] + (["preference"] if kind == "preference" else [])
    values = np.stack([_pair_values(name, a, b, lower_is_better) for name in names])
    replicates = _bootstrap_means(values, codes, int(n_boot), seed)
    cis = {name: _interval(replicates[:, i], level) for i, name in enumerate(names)}
    row = {
        "kind": kind, "n": int(a.size), "prompts": int(a.size) if codes is None else int(codes.max()) + 1,
        "mean_a": float(np.mean(a)), "mean_b": float(np.mean(b)),
        "mean_diff": _estimate("mean_diff", a, b), "diff_ci": cis["mean_diff"],
        "win_rate": _estimate("win_rate", a, b, lower_is_better), "win_ci": cis["win_rate"],
        "better": "lower" if lower_is_better else "higher", "level": level, "n_boot": int(n_boot),
    }
    if kind == "preference":
        row["preference"] = _estimate("preference", a, b)
        row["preference_ci"] = cis["preference"]
    return row
