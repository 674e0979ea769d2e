"""Loading evaluation data: any `datasets` dataset by Hub name or local path, one split, checked columns."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

# File extensions `datasets` has a packaged builder for, used when `dataset` is a single local file.
_BUILDER_BY_SUFFIX = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".arrow": "arrow",
}


@dataclass
class EvalData:
    """One split of a dataset, ready to encode.

    Attributes:
        dataset: the `datasets.Dataset` (after filtering and `max_samples`).
        source: a description of where it came from (name or path, config, split, filter, subset), used
            in reports and as part of the feature-cache key.
    """

    dataset: Any
    source: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def fingerprint(self) -> str:
        """`datasets`' content fingerprint of the selected rows (stable across runs for the same data)."""
        return getattr(self.dataset, "_fingerprint", "") or ""

    def describe(self) -> str:
        split = self.source.get("split")
        return f"{self.source.get('dataset')}" + (f" [{split}]" if split else "")


def _is_saved_to_disk(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file()
        or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())
    )


def load_eval_dataset(
    dataset: str,
    split: str | None = "test",
    *,
    config_name: str | None = None,
    revision: str | None = None,
    max_samples: int | None = None,
    filters: list[str] | None = None,
    seed: int = 0,
    cache_dir: str | None = None,
) -> EvalData:
    """Load one split of a dataset given by Hub id or local path.

    Args:
        dataset: a Hub dataset id (`"uoft-cs/cifar10"`), a directory written by `save_to_disk`, a directory
            `datasets` can read directly (an imagefolder of class sub-folders, a folder of parquet/csv/json
            files), or a single parquet/csv/json/arrow file.
        split: the split to use. A `save_to_disk` directory holding a single `Dataset` has no splits; the
            name is then ignored.
        config_name: the dataset configuration (Hub datasets with several).
        revision: a Hub revision.
        max_samples: keep this many rows, drawn with a fixed seed (a plain head would often be a single
            class, as many datasets are sorted by label); the kept rows stay in dataset order.
        filters: `COLUMN=VALUE` strings; keep rows whose column, as a string, equals the value (e.g.
            `split=test` for Flickr30k dumps that store the Karpathy split in a column).
        seed: the seed of the `max_samples` draw.
        cache_dir: the `datasets` cache directory (default: the `datasets` default).

    Returns:
        An `EvalData`.
    """
    import datasets

    path = Path(dataset).expanduser()
    source = {"dataset": dataset, "config": config_name, "split": split, "revision": revision}
    if _is_saved_to_disk(path):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = _pick_split(loaded, split, dataset)
        else:
            source["split"] = None
    else:
        kwargs = {"cache_dir": cache_dir}
        if path.is_file():
            builder = _BUILDER_BY_SUFFIX.get(path.suffix.lower())
            if builder is None:
                raise ValueError(
                    f"`dataset` {dataset}: cannot tell the format of this file; give a parquet, csv, "
                    "json(l) or arrow file, a directory, or a Hub dataset id"
                )
            loaded = datasets.load_dataset(builder, data_files={"data": str(path)}, **kwargs)
            # A single file has no split names of its own.
            loaded = loaded["data"]
            source["split"] = None
        else:
            if not path.exists() and dataset.startswith((".", "/", "~")):
                raise FileNotFoundError(f"`dataset` {dataset}: no such file or directory")
            loaded = datasets.load_dataset(dataset, config_name, revision=revision, **kwargs)
            if isinstance(loaded, datasets.DatasetDict):
                loaded = _pick_split(loaded, split, dataset)

    for spec in filters or []:
        column, sep, value = spec.partition("=")
        if not sep:
            raise ValueError(f"`filters` entry {spec!r}: expected COLUMN=VALUE")
        if column not in loaded.column_names:
            raise ValueError(
                f"`filters` entry {spec!r}: no such column {column!r} in {dataset}; available columns: "
                f"{loaded.column_names}"
            )
        keep = [i for i, v in enumerate(loaded[column]) if str(v) == value]
        if not keep:
            raise ValueError(
                f"`filters` entry {spec!r}: no row of {dataset} [{source['split']}] has {column} == {value!r}"
            )
        loaded = loaded.select(keep)
    source["filters"] = list(filters or [])

    if max_samples is not None and max_samples < len(loaded):
        if max_samples <= 0:
            raise ValueError(f"`max_samples` must be positive, got {max_samples}")
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(len(loaded), size=max_samples, replace=False))
        loaded = loaded.select(keep.tolist())
    source["max_samples"] = max_samples
    source["seed"] = seed if max_samples is not None else None
    source["num_rows"] = len(loaded)
    if len(loaded) == 0:
        raise ValueError(f"{dataset} [{source['split']}] has no rows")
    return EvalData(dataset=loaded, source=source)


def _pick_split(splits, split: str | None, name: str):
    available = list(splits.keys())
    if split is None:
        if len(available) == 1:
            return splits[available[0]]
        raise ValueError(f"`dataset` {name} has splits {available}; choose one with `split`")
    if split not in splits:
        raise ValueError(
            f"`dataset` {name} has no split {split!r}; available splits: {available} (choose with `split`)"
        )
    return splits[split]


def require_column(dataset, column: str, option: str, source: dict | None = None) -> None:
    """Raise a `ValueError` naming the column, the argument (`option`, e.g. "`label_column`"), the split and the
    available columns if missing."""
    if column not in dataset.column_names:
        where = ""
        if source:
            where = f" of {source.get('dataset')}" + (f" [{source['split']}]" if source.get("split") else "")
        raise ValueError(f"{option} {column!r}: no such column{where}; available columns: {dataset.column_names}")


def to_pil(value, column: str = "image") -> Image.Image:
    """Turn one cell of an image column into a PIL image.

    Accepts a decoded PIL image, a `datasets` image dict (`{"bytes": ..., "path": ...}`), raw bytes, a
    numpy array, or a path / URL string (read with transformers' `load_image`).
    """
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return Image.open(io.BytesIO(value["bytes"]))
        if value.get("path"):
            return _load_path(value["path"])
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    if isinstance(value, str):
        return _load_path(value)
    raise TypeError(f"column {column!r}: cannot read an image from a value of type {type(value).__name__}")


def _load_path(path: str) -> Image.Image:
    from transformers.image_utils import load_image

    return load_image(path)


def class_names_from_features(dataset, label_column: str) -> list[str] | None:
    """The names of a `ClassLabel` column (underscores turned into spaces), or None for other columns."""
    feature = dataset.features.get(label_column)
    names = getattr(feature, "names", None)
    if not names:
        return None
    return [name.replace("_", " ") for name in names]


def labels_as_ints(dataset, label_column: str, source: dict | None = None) -> np.ndarray:
    """The label column as an int64 array; raises naming the column when it does not hold integers."""
    require_column(dataset, label_column, "`label_column`", source)
    values = dataset[label_column]
    try:
        labels = np.asarray(values, dtype=np.int64)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"`label_column` {label_column!r} must hold integer class ids (a ClassLabel column), "
            f"got e.g. {values[0]!r}"
        ) from error
    if labels.ndim != 1:
        raise ValueError(f"`label_column` {label_column!r} must hold one integer per row")
    if len(labels) and labels.min() < 0:
        raise ValueError(f"`label_column` {label_column!r} holds negative ids (unlabelled rows?); filter them out")
    return labels


def captions_per_image(dataset, caption_column: str, source: dict | None = None) -> tuple[list[str], np.ndarray]:
    """Flatten a caption column (one string, or a list of strings, per image).

    Returns:
        `(texts, text_to_image)`: all captions in row order, and for each caption the row index of its image.
    """
    require_column(dataset, caption_column, "`caption_column`", source)
    texts, owners = [], []
    for row, value in enumerate(dataset[caption_column]):
        captions = [value] if isinstance(value, str) else list(value or [])
        if not captions or not all(isinstance(c, str) for c in captions):
            raise ValueError(
                f"`caption_column` {caption_column!r}: row {row} must hold a caption or a non-empty list of captions, "
                f"got {value!r}"
            )
        texts.extend(captions)
        owners.extend([row] * len(captions))
    return texts, np.asarray(owners, dtype=np.int64)
