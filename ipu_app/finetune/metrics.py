"""The task metrics of fine-tuning (GLUE's): accuracy, Matthews correlation and F1 for classes;
Pearson and Spearman correlation and MSE for a regression (STS-B)."""

from __future__ import annotations

import math

import numpy as np

CLASSIFICATION_METRICS = ("accuracy", "matthews", "f1", "loss")
REGRESSION_METRICS = ("pearson", "spearman", "mse", "loss")
LOWER_IS_BETTER = ("loss", "mse")


def classification_metrics(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> dict:
    """Accuracy; Matthews correlation (over all classes, Gorodkin's R_K); F1 of class 1 (binary tasks)."""
    confusion = np.zeros((num_classes, num_classes), dtype=np.float64)
    np.add.at(confusion, (labels, predictions), 1)
    total, correct = confusion.sum(), np.trace(confusion)
    true, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    denominator = math.sqrt((total**2 - predicted @ predicted) * (total**2 - true @ true))
    result = {"accuracy": float(correct / total),
              "matthews": float((correct * total - true @ predicted) / denominator) if denominator else 0.0}
    if num_classes == 2:
        tp, fp, fn = confusion[1, 1], confusion[0, 1], confusion[1, 0]
        result["f1"] = float(2 * tp / (2 * tp + fp + fn)) if tp else 0.0
    return result


def regression_metrics(labels: np.ndarray, predictions: np.ndarray) -> dict:
    """Pearson's r, Spearman's rho (0 where either side is constant) and the mean squared error."""
    from scipy import stats

    labels, predictions = np.asarray(labels, dtype=np.float64), np.asarray(predictions, dtype=np.float64)
    constant = np.ptp(labels) == 0 or np.ptp(predictions) == 0
    return {"pearson": 0.0 if constant else float(stats.pearsonr(labels, predictions)[0]),
            "spearman": 0.0 if constant else float(stats.spearmanr(labels, predictions)[0]),
            "mse": float(np.mean((labels - predictions) ** 2))}


def default_metric(kind: str) -> str:
    """What ``--save best`` compares by default: accuracy, or Pearson's r for a regression."""
    return "pearson" if kind == "regression" else "accuracy"


def check_metric(metric: str, kind: str, num_classes: int) -> str:
    from ..config import ConfigError

    known = REGRESSION_METRICS if kind == "regression" else CLASSIFICATION_METRICS
    if metric not in known or (metric == "f1" and num_classes != 2):
        usable = [m for m in known if m != "f1" or num_classes == 2]
        raise ConfigError(f"--metric {metric!r} is not a metric of this {kind} task; use one of {usable}")
    return metric


def better(metric: str, new: float, old: float | None) -> bool:
    """Whether ``new`` beats the best so far (strictly: the first best epoch is kept on ties)."""
    if old is None:
        return True
    return new < old if metric in LOWER_IS_BETTER else new > old
