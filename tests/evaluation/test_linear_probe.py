"""Linear probe: C chosen on validation, refit on train + validation, scored on test (CLIP's protocol)."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from rwkv_clip_hf.evaluation import linear_probe
from rwkv_clip_hf.evaluation.linear_probe import COARSE_LOG10_C, split_validation


def clusters(per_class, spread, seed, num_classes=3, dim=4):
    """Gaussian clusters around fixed class centres (the centres do not depend on the seed)."""
    centres = np.random.default_rng(123).standard_normal((num_classes, dim)) * 2.0
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    return centres[labels] + spread * rng.standard_normal((len(labels), dim)), labels


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_grid_search_matches_a_direct_sklearn_run():
    train_x, train_y = clusters(5, 2.5, seed=1)
    val_x, val_y = clusters(10, 2.5, seed=2)
    test_x, test_y = clusters(10, 2.5, seed=3)
    grid = [1e-3, 1e-1, 1.0, 10.0, 100.0]
    result = linear_probe(train_x, train_y, test_x, test_y, val_features=val_x, val_labels=val_y, c_values=grid)

    # The protocol written out with scikit-learn directly, on L2-normalised features.
    val_accuracy = {}
    for c in grid:
        fitted = LogisticRegression(C=c, max_iter=1000, random_state=0).fit(unit(train_x), train_y)
        val_accuracy[c] = float((fitted.predict(unit(val_x)) == val_y).mean())
    best = max(grid, key=lambda c: val_accuracy[c])  # first of equal accuracies = smallest C
    refit = LogisticRegression(C=best, max_iter=1000, random_state=0).fit(
        unit(np.concatenate([train_x, val_x])), np.concatenate([train_y, val_y])
    )
    predictions = refit.predict(unit(test_x))

    assert result["best_c"] == best
    assert result["validation_accuracy"] == [{"C": c, "accuracy": a} for c, a in val_accuracy.items()]
    assert result["top1"] == pytest.approx(float((predictions == test_y).mean()), abs=1e-12)
    per_class = [float((predictions[test_y == c] == c).mean()) for c in range(3)]
    assert result["per_class_accuracy"] == pytest.approx(per_class)
    assert (result["num_train"], result["num_validation"], result["num_test"]) == (15, 30, 30)
    # On this data both steps matter: C changes the validation accuracy, and the refit on train + validation
    # changes the test accuracy.
    assert len(set(val_accuracy.values())) > 1
    train_only = LogisticRegression(C=best, max_iter=1000, random_state=0).fit(unit(train_x), train_y)
    assert float((train_only.predict(unit(test_x)) == test_y).mean()) != result["top1"]


def test_default_search_and_determinism():
    train_x, train_y = clusters(15, 1.2, seed=4)
    test_x, test_y = clusters(5, 1.2, seed=5)
    first = linear_probe(train_x, train_y, test_x, test_y, val_fraction=0.25)
    second = linear_probe(train_x, train_y, test_x, test_y, val_fraction=0.25)
    assert first == second
    tried = {entry["C"]: entry["accuracy"] for entry in first["validation_accuracy"]}
    # The half-decade sweep over 1e-6 .. 1e6 (25 values) plus at most 4 refinements around the peak.
    assert len(COARSE_LOG10_C) == 25 and 25 <= len(tried) <= 29
    assert tried[first["best_c"]] == max(tried.values())
    assert first["best_c"] == min(c for c, a in tried.items() if a == max(tried.values()))
    assert (first["num_train"], first["num_validation"]) == (33, 12)


def test_separable_classes_are_all_right():
    train_x, train_y = clusters(10, 0.05, seed=6)
    test_x, test_y = clusters(4, 0.05, seed=7)
    result = linear_probe(train_x, train_y, test_x, test_y, c_values=[1.0, 10.0])
    assert result["top1"] == 1.0 and result["per_class_accuracy"] == [1.0, 1.0, 1.0]


def test_validation_split_is_stratified_and_seeded():
    labels = np.repeat([0, 1, 2, 3], [10, 10, 5, 5])
    train, val = split_validation(labels, 0.2, seed=0)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(30))
    assert np.bincount(labels[val]).tolist() == [2, 2, 1, 1]
    again = split_validation(labels, 0.2, seed=0)
    assert np.array_equal(val, again[1])
    with pytest.raises(ValueError, match="`val_fraction`"):
        split_validation(labels, 1.5, seed=0)
