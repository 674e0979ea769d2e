"""Results as JSON and a markdown table; optional PNG plots when matplotlib is installed."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def _percent(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100.0 * value:.2f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def results_markdown(result: dict) -> str:
    """A markdown summary of one protocol's result dict (accuracies and recalls in percent)."""
    protocol = result.get("protocol")
    model, dataset = result.get("model", "?"), result.get("dataset", "?")
    title = f"## {protocol}: {model} on {dataset}\n\n"
    if protocol == "zero-shot":
        table = markdown_table(
            ["model", "dataset", "metric", "accuracy", "top-1", "top-5", "mean per class", "images"],
            [
                [
                    model,
                    dataset,
                    result["metric"],
                    _percent(result["accuracy"]),
                    _percent(result["top1"]),
                    _percent(result["top5"]),
                    _percent(result["mean_per_class_accuracy"]),
                    result["num_samples"],
                ]
            ],
        )
        note = (
            f"\n{len(result['classnames'])} classes ({result['classnames_source']}), {result['num_templates']} "
            f"templates ({result['templates_source']}); float logits.\n"
        )
        return title + table + note
    if protocol == "retrieval":
        i2t, t2i = result["image_to_text"], result["text_to_image"]
        ks = [key for key in i2t if key.startswith("R@")]
        table = markdown_table(
            ["model", "dataset"]
            + [f"I2T {k}" for k in ks]
            + [f"T2I {k}" for k in ks]
            + ["rsum", "images", "captions"],
            [
                [model, dataset]
                + [_percent(i2t[k]) for k in ks]
                + [_percent(t2i[k]) for k in ks]
                + [f"{result['rsum']:.2f}", result["num_images"], result["num_texts"]]
            ],
        )
        return title + table
    if protocol == "linear-probe":
        table = markdown_table(
            ["model", "dataset", "top-1", "top-5", "mean per class", "best C", "train", "val", "test"],
            [
                [
                    model,
                    dataset,
                    _percent(result["top1"]),
                    _percent(result["top5"]),
                    _percent(result["mean_per_class_accuracy"]),
                    f"{result['best_c']:.4g}",
                    result["num_train"],
                    result["num_validation"],
                    result["num_test"],
                ]
            ],
        )
        return title + table + f"\nC chosen on: {result['validation']}.\n"
    raise ValueError(f"unknown protocol {protocol!r}")


def write_report(result: dict, output_dir: str | Path, name: str) -> dict[str, Path]:
    """Write `<name>.json` (the full result) and `<name>.md` (the table) into `output_dir`.

    Returns:
        `{"json": path, "markdown": path}`.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": output_dir / f"{name}.json", "markdown": output_dir / f"{name}.md"}
    paths["json"].write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    paths["markdown"].write_text(results_markdown(result), encoding="utf-8")
    return paths


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed; skipping the plots (pip install matplotlib)")
        return None
    return plt


def plot_per_class_accuracy(
    per_class: Sequence[float | None], classnames: Sequence[str], path: str | Path, title: str = ""
) -> Path | None:
    """A bar chart of per-class accuracy (classes sorted by accuracy); None when matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return None
    pairs = sorted(((a, n) for a, n in zip(per_class, classnames) if a is not None), key=lambda p: p[0])
    height = max(3.0, 0.18 * len(pairs))
    figure, axis = plt.subplots(figsize=(7, height))
    axis.barh(range(len(pairs)), [100 * a for a, _ in pairs])
    axis.set_yticks(range(len(pairs)), [n for _, n in pairs], fontsize=6 if len(pairs) > 40 else 8)
    axis.set_xlabel("accuracy (%)")
    axis.set_xlim(0, 100)
    axis.set_title(title or "per-class accuracy")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return Path(path)


def plot_similarity_heatmap(
    similarity, text_to_image, path: str | Path, max_images: int = 32, title: str = ""
) -> Path | None:
    """A heatmap of image-caption cosine similarity for the first `max_images` images and their captions,
    with each image's own captions outlined; None when matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return None
    similarity = np.asarray(similarity)
    owner = np.asarray(text_to_image)
    images = min(max_images, similarity.shape[0])
    texts = np.flatnonzero(owner < images)
    block = similarity[:images][:, texts]
    figure, axis = plt.subplots(figsize=(max(4.0, 0.12 * len(texts) + 2), max(3.5, 0.2 * images + 1.5)))
    shown = axis.imshow(block, aspect="auto", cmap="viridis", interpolation="nearest")
    for i in range(images):
        columns = np.flatnonzero(owner[texts] == i)
        if columns.size:
            axis.add_patch(
                plt.Rectangle((columns.min() - 0.5, i - 0.5), columns.size, 1.0, fill=False, edgecolor="red", lw=0.8)
            )
    axis.set_xlabel("caption")
    axis.set_ylabel("image")
    axis.set_title(title or "image-caption cosine similarity")
    figure.colorbar(shown, ax=axis)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return Path(path)
