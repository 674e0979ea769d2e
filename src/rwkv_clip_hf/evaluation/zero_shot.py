"""Zero-shot classification, as in the paper (docs/architecture.md §8).

For each class, every template is filled with the class name (and each of its synonyms, where a class has a
list of names), embedded, L2-normalised; the mean is re-normalised and is the class weight. Logits are
`100 * normalised image embedding @ class weights.T`. The metric is top-1 accuracy, except for Caltech101,
FGVC Aircraft, Flowers102 and Oxford Pets, where it is the mean per-class accuracy.

The logits stay float. The original code writes them into an integer tensor before the argmax, truncating
`100 * cosine` to an integer; its predictions therefore differ from ours where two classes' logits share the
integer part (it then takes the first such class), so reproduced numbers can differ slightly in ties.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .data import EvalData, class_names_from_features, labels_as_ints

logger = logging.getLogger(__name__)

MEAN_PER_CLASS_BENCHMARKS = frozenset({"caltech101", "aircraft", "flowers", "pets"})
DEFAULT_TEMPLATES = ["a photo of a {}."]

# Keys of the bundled JSON files, by normalised alias (lower case, alphanumerics only). Hub ids are matched on
# their full id, then their last path component and its tails, so "uoft-cs/cifar10", "cifar-10" and "CIFAR10" all
# map to cifar10.
_ALIASES = {
    "cifar10": "cifar10",
    "cifar100": "cifar100",
    "food101": "food101",
    "food": "food101",
    "pets": "pets",
    "oxfordpets": "pets",
    "oxfordiiitpet": "pets",
    "oxfordiiitpets": "pets",
    "oxfordpet": "pets",
    "pet": "pets",
    "flowers": "flowers",
    "flowers102": "flowers",
    "oxfordflowers": "flowers",
    "oxfordflowers102": "flowers",
    "oxford102flowers": "flowers",
    "flower102": "flowers",
    "sun397": "sun397",
    "sun": "sun397",
    "cars": "stanford_car",
    "stanfordcars": "stanford_car",
    "stanfordcar": "stanford_car",
    "car": "stanford_car",
    "dtd": "dtd",
    "describabletextures": "dtd",
    "caltech101": "caltech101",
    "caltech": "caltech101",
    "aircraft": "aircraft",
    "fgvcaircraft": "aircraft",
    "fgvcaircraft2013b": "aircraft",
    "imagenet": "imagenet",
    "imagenet1k": "imagenet",
    "ilsvrc2012": "imagenet",
    "imagenet2012": "imagenet",
}


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def bundled_zero_shot_data() -> tuple[dict, dict]:
    """The paper's templates and class names shipped in the package: `(templates, classnames)`, dicts keyed
    by benchmark ("cifar10", "imagenet", "pets", ...). Templates hold one `{}` for the class name."""
    folder = resources.files("rwkv_clip_hf").joinpath("data")
    templates = json.loads(folder.joinpath("zero_shot_templates.json").read_text(encoding="utf-8"))
    classnames = json.loads(folder.joinpath("zero_shot_classnames.json").read_text(encoding="utf-8"))
    return templates, classnames


def resolve_benchmark(name: str | None) -> str | None:
    """Map a dataset name, Hub id or path (e.g. `"nelorth/oxford-flowers"`, `"FGVC-Aircraft"`, `"cars"`) to a
    key of the bundled templates/class names, or None if it is not one of them."""
    if not name:
        return None
    templates, classnames = bundled_zero_shot_data()
    known = set(templates) | set(classnames)
    last = name.rstrip("/").split("/")[-1]
    # Then shorter and shorter tails of the last component ("wds_vtab-caltech101" -> "vtab-caltech101" -> ...).
    parts = re.split(r"[-_. ]+", last)
    candidates = [name.rstrip("/"), last] + ["-".join(parts[i:]) for i in range(1, len(parts))]
    for candidate in candidates:
        if candidate in known:
            return candidate
        normalised = _normalise(candidate)
        for key in known:
            if _normalise(key) == normalised:
                return key
        if normalised in _ALIASES:
            return _ALIASES[normalised]
    return None


def uses_mean_per_class(benchmark: str | None) -> bool:
    """Whether the paper reports mean per-class accuracy (rather than top-1) for this benchmark key."""
    return benchmark in MEAN_PER_CLASS_BENCHMARKS


def read_string_list(values: Sequence[str] | str | None, what: str, benchmark: str | None = None) -> list | None:
    """A list given on the command line: one value naming a JSON file (a list, or a dict keyed by benchmark) or a
    text file (one entry per line), or the entries themselves."""
    if values is None:
        return None
    if isinstance(values, str):
        values = [values]
    if len(values) == 1 and Path(values[0]).expanduser().is_file():
        path = Path(values[0]).expanduser()
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            loaded = json.loads(text)
            if isinstance(loaded, dict):
                if benchmark not in loaded:
                    raise ValueError(
                        f"{what} file {path}: a dict without the key {benchmark!r} (keys: {sorted(loaded)[:20]})"
                    )
                loaded = loaded[benchmark]
            if not isinstance(loaded, list) or not loaded:
                raise ValueError(f"{what} file {path}: expected a non-empty JSON list")
            return loaded
        return [line.strip() for line in text.splitlines() if line.strip()]
    return list(values)


def align_to_label_order(classnames: Sequence, label_names: Sequence[str]) -> Sequence:
    """`classnames` permuted to the order of a dataset's label names when both name the same classes in another
    order (compared lower-case, alphanumerics only; a synonym list matches on any of its names); otherwise
    `classnames` itself.

    The bundled lists follow the label order of the datasets the original evaluated on; a Hub copy may number
    its classes differently (e.g. alphabetically), which would silently scramble the classifier.
    """
    keys = [{_normalise(n) for n in ([c] if isinstance(c, str) else c)} for c in classnames]
    order = []
    for name in label_names:
        matches = [i for i, names in enumerate(keys) if _normalise(name) in names]
        if len(matches) != 1:
            return classnames
        order.append(matches[0])
    if sorted(order) != list(range(len(classnames))) or order == list(range(len(classnames))):
        return classnames
    return [classnames[i] for i in order]


def build_classifier(
    encode_texts: Callable[[list[str], str], torch.Tensor], classnames: Sequence, templates: Sequence[str]
) -> torch.Tensor:
    """Class weights `(num_classes, dim)`: per class, the re-normalised mean of the normalised embeddings of
    every template filled with every name of the class.

    Args:
        encode_texts: `(texts, description) -> (len(texts), dim)` features.
        classnames: one entry per class, a name or a list of synonyms.
        templates: strings with one `{}` for the class name.
    """
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(f"template {template!r} must contain exactly one '{{}}' for the class name")
    texts, owner = [], []
    for index, names in enumerate(classnames):
        for name in [names] if isinstance(names, str) else list(names):
            for template in templates:
                texts.append(template.format(name))
                owner.append(index)
    features = encode_texts(texts, f"{len(texts)} prompts").double()
    features = features / features.norm(dim=-1, keepdim=True)
    owner_t = torch.tensor(owner)
    weights = torch.zeros(len(classnames), features.shape[1], dtype=features.dtype).index_add_(0, owner_t, features)
    weights = weights / torch.bincount(owner_t, minlength=len(classnames))[:, None]
    return (weights / weights.norm(dim=-1, keepdim=True)).float()


def zero_shot_logits(image_features: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """`100 * normalise(image_features) @ class_weights.T`, in float (no integer truncation)."""
    image = image_features.double()
    image = image / image.norm(dim=-1, keepdim=True)
    return 100.0 * image @ class_weights.double().T


def classification_metrics(
    scores: torch.Tensor | np.ndarray, labels, num_classes: int | None = None, top_k=(1, 5)
) -> dict:
    """Top-k accuracies and per-class accuracy of scores `(N, C)` against integer labels `(N,)`.

    Ties are broken towards the lower class index. Classes absent from `labels` are left out of the mean
    per-class accuracy (and get `None` in `per_class_accuracy`).

    Returns:
        `{"top1": ..., "top5": ..., "mean_per_class_accuracy": ..., "per_class_accuracy": [...], "num_samples": N}`.
    """
    scores = torch.as_tensor(np.asarray(scores), dtype=torch.float64)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    num_classes = num_classes or scores.shape[1]
    # A stable descending sort keeps the lower index first among equal scores.
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    result = {}
    for k in top_k:
        hit = (order[:, : min(k, scores.shape[1])] == labels[:, None]).any(dim=1)
        result[f"top{k}"] = hit.double().mean().item()
    correct = order[:, 0] == labels
    per_class = []
    for c in range(num_classes):
        mask = labels == c
        per_class.append(correct[mask].double().mean().item() if mask.any() else None)
    present = [a for a in per_class if a is not None]
    result["mean_per_class_accuracy"] = float(np.mean(present)) if present else float("nan")
    result["per_class_accuracy"] = per_class
    result["num_samples"] = int(len(labels))
    return result


def evaluate_zero_shot(
    extractor,
    data: EvalData,
    *,
    image_column: str = "image",
    label_column: str = "label",
    benchmark: str | None = None,
    classnames: Sequence | None = None,
    templates: Sequence[str] | None = None,
    metric: str = "auto",
) -> dict:
    """Zero-shot classification of one dataset split.

    Args:
        extractor: a `FeatureExtractor` (or anything with `image_features(data, column)` and
            `text_features(texts, what)`).
        data: the split (`load_eval_dataset`).
        image_column, label_column: columns of images and of integer labels.
        benchmark: a key of the bundled templates/class names (see `resolve_benchmark`), or None to infer it
            from the dataset name.
        classnames: one name (or list of synonyms) per label id; default: the bundled list of `benchmark`, else
            the names of a `ClassLabel` label column.
        templates: prompt templates with `{}`; default: the bundled ones of `benchmark`, else "a photo of a {}.".
        metric: `"auto"` (the paper's choice for the benchmark), `"top1"` or `"mean_per_class"`.

    Returns:
        a dict with `accuracy` (the chosen metric), `metric`, `top1`, `top5`, `mean_per_class_accuracy`,
        `per_class_accuracy`, `classnames`, the number of templates, the benchmark key and `predictions`.
    """
    bundled_templates, bundled_classnames = bundled_zero_shot_data()
    if benchmark is None:
        benchmark = resolve_benchmark(data.source.get("dataset"))
    elif benchmark not in bundled_classnames and benchmark not in bundled_templates:
        resolved = resolve_benchmark(benchmark)
        if resolved is None:
            logger.warning(
                "benchmark %r is not bundled; give `classnames` / `templates` or rely on the dataset", benchmark
            )
        benchmark = resolved or benchmark
    labels = labels_as_ints(data.dataset, label_column, data.source)

    classnames_source = "given"
    if classnames is None and benchmark in bundled_classnames:
        classnames, classnames_source = bundled_classnames[benchmark], f"bundled:{benchmark}"
    if classnames is None:
        classnames = class_names_from_features(data.dataset, label_column)
        classnames_source = "dataset ClassLabel"
    if classnames is None:
        raise ValueError(
            f"no class names for {data.describe()}: `label_column` {label_column!r} is not a ClassLabel and no "
            "bundled list matches; pass `classnames` or `benchmark`"
        )
    dataset_names = class_names_from_features(data.dataset, label_column)
    if dataset_names is not None and len(dataset_names) != len(classnames):
        raise ValueError(
            f"{len(classnames)} class names ({classnames_source}) but `label_column` {label_column!r} of "
            f"{data.describe()} has {len(dataset_names)} classes; pass matching `classnames` or `benchmark`"
        )
    if dataset_names is not None and classnames_source.startswith("bundled"):
        aligned = align_to_label_order(classnames, dataset_names)
        if aligned is not classnames:
            logger.info("%s: bundled class names reordered to the dataset's label order", data.describe())
            classnames, classnames_source = aligned, classnames_source + " (reordered to the labels)"
    if labels.max() >= len(classnames):
        raise ValueError(
            f"`label_column` {label_column!r} of {data.describe()} holds label {labels.max()} but there are only "
            f"{len(classnames)} class names ({classnames_source})"
        )
    if templates is None:
        templates = bundled_templates.get(benchmark, DEFAULT_TEMPLATES)
        templates_source = f"bundled:{benchmark}" if benchmark in bundled_templates else "default"
    else:
        templates_source = "given"
    logger.info(
        "%s: %d classes (%s), %d templates (%s)",
        data.describe(),
        len(classnames),
        classnames_source,
        len(templates),
        templates_source,
    )

    if metric == "auto":
        metric = "mean_per_class" if uses_mean_per_class(benchmark) else "top1"
    if metric not in ("top1", "mean_per_class"):
        raise ValueError(f"`metric` {metric!r}: choose auto, top1 or mean_per_class")

    image_features = extractor.image_features(data, image_column)
    weights = build_classifier(extractor.text_features, classnames, templates)
    logits = zero_shot_logits(image_features, weights)
    metrics = classification_metrics(logits, labels, num_classes=len(classnames))
    accuracy = metrics["mean_per_class_accuracy"] if metric == "mean_per_class" else metrics["top1"]
    return {
        "protocol": "zero-shot",
        "benchmark": benchmark,
        "metric": metric,
        "accuracy": accuracy,
        **metrics,
        "classnames": [n if isinstance(n, str) else n[0] for n in classnames],
        "classnames_source": classnames_source,
        "num_templates": len(templates),
        "templates_source": templates_source,
        # Row-aligned with the evaluated split: for error analysis and model-to-model agreement.
        "predictions": predictions_of(logits),
    }


def predictions_of(logits: torch.Tensor) -> list[int]:
    """Predicted class per row, ties towards the lower index (as `classification_metrics`)."""
    return torch.sort(logits, dim=1, descending=True, stable=True).indices[:, 0].tolist()
