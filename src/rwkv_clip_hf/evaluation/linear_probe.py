"""Linear probe on frozen image features, following CLIP's protocol (Radford et al., 2021, appendix A.3).

A multinomial logistic regression (scikit-learn, L-BFGS) is trained on the L2-normalised image features of the
train split. Its inverse regularisation strength C is chosen on a validation set (the dataset's own, or a
stratified held-out fraction of train) by CLIP's parametric search: 10^-6 .. 10^6 in half-decade steps, then
the step is halved twice around the best value (8 steps per decade). The model is then refit with that C on
train + validation and scored on the test split. Everything is seeded, so a run is deterministic.

The features are L2-normalised first (the space the model is trained in); CLIP's paper does not say, and the
search over C absorbs most of the scale.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np

from .zero_shot import classification_metrics

logger = logging.getLogger(__name__)

# CLIP's sweep: half-decade steps over 1e-6 .. 1e6, then halve the step around the peak down to 8 steps a decade.
COARSE_LOG10_C = tuple(np.arange(-6.0, 6.0 + 0.25, 0.5).tolist())
REFINE_STEPS = (0.25, 0.125)


def _prepare(features) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.where(norms == 0, 1.0, norms)


def _fit(train_x, train_y, c: float, max_iter: int, seed: int):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    classifier = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        classifier.fit(train_x, train_y)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        logger.warning(
            "logistic regression with C=%g did not converge in %d iterations (raise `max_iter`)", c, max_iter
        )
    return classifier


def _scores(classifier, x: np.ndarray, num_classes: int) -> np.ndarray:
    """Decision scores over all `num_classes` ids (classes missing from the training labels score -inf)."""
    raw = classifier.decision_function(x)
    if raw.ndim == 1:  # binary: one margin for classes_[1]
        raw = np.stack([-raw, raw], axis=1)
    scores = np.full((x.shape[0], num_classes), -np.inf)
    scores[:, classifier.classes_] = raw
    return scores


def split_validation(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices `(train, validation)` holding out `fraction` of the rows, stratified by label when every class
    has at least two rows."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < fraction < 1.0:
        raise ValueError(f"`val_fraction` must be in (0, 1), got {fraction}")
    indices = np.arange(len(labels))
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 else None
    try:
        train, val = train_test_split(indices, test_size=fraction, random_state=seed, stratify=stratify)
    except ValueError:  # too few rows to give every class a validation row
        train, val = train_test_split(indices, test_size=fraction, random_state=seed, stratify=None)
    return np.sort(train), np.sort(val)


def select_c(
    train_x, train_y, val_x, val_y, *, c_values: Sequence[float] | None = None, max_iter: int = 1000, seed: int = 0
) -> tuple[float, dict[float, float]]:
    """Choose C by validation top-1 accuracy.

    With `c_values`, a plain grid search. Otherwise CLIP's style of search: the coarse grid `COARSE_LOG10_C`,
    then for each step in `REFINE_STEPS`, try log10 C +- step around the best so far. Ties go to the smaller C
    (stronger regularisation).

    Returns:
        `(best_c, {c: validation accuracy})`.
    """
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    tried: dict[float, float] = {}

    def accuracy(log10_c: float) -> float:
        c = float(10.0**log10_c)
        if c not in tried:
            classifier = _fit(train_x, train_y, c, max_iter, seed)
            tried[c] = classification_metrics(_scores(classifier, val_x, num_classes), val_y, num_classes, (1,))[
                "top1"
            ]
        return tried[c]

    def best() -> float:
        return max(sorted(tried), key=lambda c: tried[c])  # max keeps the first (smallest C) of equal accuracies

    if c_values is not None:
        for c in c_values:
            if c <= 0:
                raise ValueError(f"`c_values` must be positive, got {c}")
            accuracy(float(np.log10(c)))
        return best(), tried
    for log10_c in COARSE_LOG10_C:
        accuracy(log10_c)
    for step in REFINE_STEPS:
        centre = float(np.log10(best()))
        for log10_c in (centre - step, centre + step):
            accuracy(log10_c)
    return best(), tried


def linear_probe(
    train_features,
    train_labels,
    test_features,
    test_labels,
    *,
    val_features=None,
    val_labels=None,
    val_fraction: float = 0.2,
    c_values: Sequence[float] | None = None,
    max_iter: int = 1000,
    seed: int = 0,
) -> dict:
    """CLIP's linear-probe protocol on precomputed features.

    Args:
        train_features, train_labels: `(N, dim)` features and integer labels of the train split.
        test_features, test_labels: the test split.
        val_features, val_labels: a validation split for choosing C; without it, `val_fraction` of train is
            held out (stratified, seeded).
        c_values: the C values to try (default: the coarse-to-fine search of `select_c`).
        max_iter: L-BFGS iterations.
        seed: seeds the held-out split and the solver.

    Returns:
        dict with `top1`, `top5`, `mean_per_class_accuracy`, `per_class_accuracy` on test, `best_c`,
        `validation_accuracy` (`[{"C": c, "accuracy": a}]` per C tried, ascending) and the split sizes.
    """
    train_x, test_x = _prepare(train_features), _prepare(test_features)
    train_y, test_y = np.asarray(train_labels, dtype=np.int64), np.asarray(test_labels, dtype=np.int64)
    if val_features is None:
        fit_idx, val_idx = split_validation(train_y, val_fraction, seed)
        fit_x, fit_y, val_x, val_y = train_x[fit_idx], train_y[fit_idx], train_x[val_idx], train_y[val_idx]
        validation = f"{val_fraction:g} of train held out"
    else:
        fit_x, fit_y = train_x, train_y
        val_x, val_y = _prepare(val_features), np.asarray(val_labels, dtype=np.int64)
        validation = "validation split"
    if len(np.unique(fit_y)) < 2:
        raise ValueError("the linear probe needs at least two classes in the training rows")
    best_c, tried = select_c(fit_x, fit_y, val_x, val_y, c_values=c_values, max_iter=max_iter, seed=seed)
    logger.info("linear probe: best C = %g (validation top-1 %.4f)", best_c, tried[best_c])

    all_x, all_y = np.concatenate([fit_x, val_x]), np.concatenate([fit_y, val_y])
    num_classes = int(max(all_y.max(), test_y.max())) + 1
    classifier = _fit(all_x, all_y, best_c, max_iter, seed)
    metrics = classification_metrics(_scores(classifier, test_x, num_classes), test_y, num_classes)
    return {
        "protocol": "linear-probe",
        **metrics,
        "best_c": best_c,
        "validation_accuracy": [{"C": c, "accuracy": acc} for c, acc in sorted(tried.items())],
        "validation": validation,
        "num_train": int(len(fit_y)),
        "num_validation": int(len(val_y)),
        "num_test": int(len(test_y)),
    }
