"""Scores for probes: accuracy (single-label) and mean average precision (multi-label, as in FSD50K/OpenMIC).

AP follows scikit-learn's `average_precision_score` definition (step-wise sum over distinct thresholds,
AP = sum_n (R_n - R_{n-1}) P_n; tied scores form one threshold) so numbers are comparable with EVAR / M2D, which
use it; mAP is the mean over all classes, a class without a positive in the evaluated set counting 0, as EVAR's
mean of `average_precision_score(..., average=None)` does (sklearn gives such a class 0).
"""

from __future__ import annotations

import numpy as np


def accuracy(y_true: np.ndarray, scores: np.ndarray) -> float:
    """y_true int (n,), scores (n, C) -> fraction of argmax hits."""
    y_true = np.asarray(y_true)
    if len(y_true) == 0:
        raise ValueError("accuracy of an empty set")
    return float((np.asarray(scores).argmax(1) == y_true).mean())


def average_precision(y_true: np.ndarray, score: np.ndarray) -> float:
    """Binary AP for one class: y_true {0,1} (n,), score (n,). NaN when there is no positive."""
    y = np.asarray(y_true, dtype=np.float64)
    s = np.asarray(score, dtype=np.float64)
    n_pos = y.sum()
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_threshold = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # tied scores count as one threshold
    tp = np.cumsum(y)[last_of_threshold]
    precision = tp / (last_of_threshold + 1)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(Y_true: np.ndarray, scores: np.ndarray) -> float:
    """Y_true {0,1} (n, C), scores (n, C) -> mean AP over the C classes, 0 for a class without a positive (EVAR's
    rule: leaving such classes out gave a higher score than the papers' protocol on the same predictions)."""
    aps = [average_precision(Y_true[:, c], scores[:, c]) for c in range(Y_true.shape[1])]
    if all(np.isnan(a) for a in aps):
        raise ValueError("mAP: no class has a positive example in this set")
    return float(np.mean([0.0 if np.isnan(a) else a for a in aps]))


def score(y_true: np.ndarray, scores: np.ndarray, multilabel: bool) -> float:
    return mean_average_precision(y_true, scores) if multilabel else accuracy(y_true, scores)


def metric_name(multilabel: bool) -> str:
    return "mAP" if multilabel else "accuracy"
