"""The description pipeline: captions, tags and merged descriptions for a `datasets.Dataset`, in resumable shards.

`DescriptionPipeline(captioner, tagger, merger).run(dataset, output_dir)` adds, for each image,

* `synthetic_caption` (str, the paper's Ts) from a `Captioner`,
* `tags` (list of str) from a `ClassifierTagger` or `ZeroShotTagger`,
* `generated_description` (str, the paper's Tg) from a `DescriptionMerger`,

and renames the raw-text column to `raw_text` (Tr, values unchanged): exactly the columns
`rwkv_clip_hf.training.ContrastiveTransform(processor, caption_columns=("raw_text", "synthetic_caption",
"generated_description"))` samples from. Any step can be left out; the merger then uses whatever caption and tags
columns the input already has.

Resuming and caching. The rows are cut into contiguous shards of `shard_size`; each finished shard is saved with
`save_to_disk` to a temporary directory and renamed into `output_dir/shards/` (`os.replace`, atomic), so a shard
directory either is complete or does not exist. `output_dir/manifest.json`, written first, records the pipeline's
configuration (models, prompt, thresholds, generation settings, column names, shard size) and the input's
identity (row count, columns, a digest of the raw texts). Running again with `resume=True` and the same
configuration skips every finished shard; a different configuration or input is refused with the list of
differences (`overwrite=True` starts over). At the end the shards are concatenated and saved to
`output_dir/dataset/` (again through a temporary directory and a rename), then the shards are deleted unless
`keep_shards=True`. Load the result with `datasets.load_from_disk(output_dir + "/dataset")`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .captioning import Captioner
from .merging import DescriptionMerger
from .stage import ModelStage

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FINAL = "dataset"
SHARDS = "shards"
MANIFEST_FORMAT = 1
_TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class OutputColumns:
    """Names of the columns the pipeline writes (defaults: what `ContrastiveTransform` is documented with)."""

    raw_text: str = "raw_text"
    caption: str = "synthetic_caption"
    tags: str = "tags"
    description: str = "generated_description"

    @property
    def caption_columns(self) -> tuple[str, str, str]:
        """`(raw_text, caption, description)`: the `caption_columns` for `ContrastiveTransform` (Tr, Ts, Tg)."""
        return (self.raw_text, self.caption, self.description)


class DescriptionPipeline:
    """Captioner, tagger and merger over a dataset of images with raw texts (see the module docstring).

    Args:
        captioner: a `Captioner`, or None to skip captions.
        tagger: a `ClassifierTagger` / `ZeroShotTagger`, or None to skip tags.
        merger: a `DescriptionMerger`, or None to skip the generated descriptions.
        image_column: the input's image column (`datasets.Image`, or strings holding paths / URLs).
        text_column: the input's raw-text column (renamed to `columns.raw_text`), or None if there is none.
        columns: the output column names.
        batch_size: rows per model call (each step is a batched `datasets.map`).
        shard_size: rows per saved shard: the unit of resuming (work lost on an interruption is at most one shard).
        keep_shards: keep `output_dir/shards/` after the final dataset is written.
    """

    def __init__(
        self,
        captioner: Captioner | None = None,
        tagger: ModelStage | None = None,
        merger: DescriptionMerger | None = None,
        *,
        image_column: str = "image",
        text_column: str | None = "raw_text",
        columns: OutputColumns | None = None,
        batch_size: int = 16,
        shard_size: int = 1000,
        keep_shards: bool = False,
    ):
        if captioner is None and tagger is None and merger is None:
            raise ValueError("nothing to do: give a captioner, a tagger or a merger (`captioner`, `tagger`, `merger`)")
        if batch_size < 1 or shard_size < 1:
            raise ValueError(f"batch size ({batch_size}) and shard size ({shard_size}) must be positive")
        self.captioner, self.tagger, self.merger = captioner, tagger, merger
        self.image_column = image_column
        self.text_column = text_column or None
        self.columns = columns or OutputColumns()
        names = list(asdict(self.columns).values())
        if len(set(names)) != len(names) or image_column in names:
            raise ValueError(f"output column names {names} must differ from each other and from {image_column!r}")
        self.batch_size = batch_size
        self.shard_size = shard_size
        self.keep_shards = keep_shards

    @property
    def stages(self) -> list[ModelStage]:
        return [s for s in (self.captioner, self.tagger, self.merger) if s is not None]

    def config(self) -> dict:
        """Everything that determines the output, as recorded in the manifest (batch size and device are not
        part of it: a run may be resumed with others)."""
        return {
            "image_column": self.image_column,
            "text_column": self.text_column,
            "columns": asdict(self.columns),
            "shard_size": self.shard_size,
            "steps": {
                "caption": self.captioner.config() if self.captioner else None,
                "tags": self.tagger.config() if self.tagger else None,
                "merge": self.merger.config() if self.merger else None,
            },
        }

    # -- input checks ----------------------------------------------------------------------------------------
    def validate(self, dataset) -> None:
        """Raise a `ValueError` naming the problem if `dataset` lacks what the steps need."""
        import datasets

        columns = dataset.column_names
        needed = []
        if self.captioner is not None or self.tagger is not None:
            needed.append(("`image_column`", self.image_column))
        if self.text_column is not None:
            needed.append(("`text_column`", self.text_column))
        missing = [f"{option} {name!r}" for option, name in needed if name not in columns]
        if missing:
            raise ValueError(f"no such column: {', '.join(missing)}; the dataset's columns are {columns}")
        if self.captioner is not None or self.tagger is not None:
            feature = dataset.features[self.image_column]
            if not _is_image_feature(feature):
                images = [c for c, f in dataset.features.items() if isinstance(f, datasets.Image)]
                raise ValueError(
                    f"`image_column` {self.image_column!r} holds {_describe(feature)}, not images (a datasets.Image "
                    f"column, or strings with paths / URLs); image columns of this dataset: {images or 'none'}"
                )
        if self.text_column is not None:
            feature = dataset.features[self.text_column]
            if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string", "null")):
                raise ValueError(f"`text_column` {self.text_column!r} holds {_describe(feature)}, not strings")
            if self.text_column != self.columns.raw_text and self.columns.raw_text in columns:
                raise ValueError(
                    f"the raw-text column {self.text_column!r} would be renamed to {self.columns.raw_text!r}, which "
                    "the dataset has already: choose another output name (`columns.raw_text`)"
                )
        if self.merger is not None and self.captioner is None and self.tagger is None:
            has_inputs = self.text_column is not None or any(
                c in columns for c in (self.columns.caption, self.columns.tags)
            )
            if not has_inputs:
                raise ValueError(
                    "the merger has nothing to merge: no raw-text column, and neither a captioner / tagger nor "
                    f"existing {self.columns.caption!r} / {self.columns.tags!r} columns"
                )

    def prepare(self, dataset):
        """The input with its raw-text column renamed to `columns.raw_text` (a metadata-only change)."""
        if self.text_column is not None and self.text_column != self.columns.raw_text:
            dataset = dataset.rename_column(self.text_column, self.columns.raw_text)
        return dataset

    # -- processing ------------------------------------------------------------------------------------------
    def process(self, dataset, label: str = ""):
        """Run the steps over `dataset` in memory (no files, no resuming) and return the new dataset. `run` does
        this shard by shard."""
        self.validate(dataset)
        for stage in self.stages:
            stage.load()
        return self._process_part(self.prepare(dataset), label)

    def _process_part(self, part, label: str):
        from datasets import Sequence, Value

        if getattr(part, "_indices", None) is not None:  # a selection of rows: materialise it (in memory)
            part = part.flatten_indices(keep_in_memory=True)
        cols = self.columns
        if self.captioner is not None:
            captioner = self.captioner
            part = self._add_column(
                part, cols.caption, Value("string"), [self.image_column],
                lambda batch: captioner(batch[self.image_column]), f"captioning{label}",
            )  # fmt: skip
        if self.tagger is not None:
            tagger = self.tagger
            part = self._add_column(
                part, cols.tags, Sequence(Value("string")), [self.image_column],
                lambda batch: tagger(batch[self.image_column]), f"tagging{label}",
            )  # fmt: skip
        if self.merger is not None:
            merger = self.merger
            inputs = [c for c in (cols.raw_text, cols.caption, cols.tags) if c in part.column_names]

            def merge(batch):
                rows = len(next(iter(batch.values())))
                empty = [None] * rows
                return merger(
                    batch.get(cols.raw_text, empty), batch.get(cols.caption, empty), batch.get(cols.tags, empty)
                )

            part = self._add_column(part, cols.description, Value("string"), inputs, merge, f"merging{label}")
        return part

    def _add_column(self, part, name: str, feature, inputs: list[str], function: Callable, desc: str):
        """`part` plus the column `name = function(batch of inputs)`, computed with a batched `map` over the input
        columns only (so no other column is decoded or rewritten)."""
        from datasets import Features

        if name in part.column_names:
            logger.warning("the input has a column %r already: it is replaced", name)
            part = part.remove_columns(name)
        fingerprint = hashlib.sha256(
            json.dumps([getattr(part, "_fingerprint", ""), name, inputs, self.config()], default=str).encode()
        ).hexdigest()[:32]
        new = part.select_columns(inputs).map(
            lambda batch: {name: function(batch)},
            batched=True,
            batch_size=self.batch_size,
            remove_columns=inputs,
            features=Features({name: feature}),
            keep_in_memory=True,
            new_fingerprint=fingerprint,  # also spares `datasets` hashing the model inside `function`
            desc=desc,
        )
        return part.add_column(name, new[name], feature=feature)

    # -- sharded, resumable run ------------------------------------------------------------------------------
    def input_identity(self, dataset) -> dict:
        """What identifies the input rows: their number, the column names and a digest of the raw texts (or
        `datasets`' fingerprint when there is no raw-text column)."""
        identity = {"num_rows": len(dataset), "columns": sorted(dataset.column_names)}
        if self.text_column is not None:
            digest = hashlib.sha256()
            for batch in dataset.select_columns([self.text_column]).iter(batch_size=10_000):
                digest.update(json.dumps(batch[self.text_column]).encode())
            identity["text_sha256"] = digest.hexdigest()
        else:
            identity["fingerprint"] = getattr(dataset, "_fingerprint", None)
        return identity

    def run(self, dataset, output_dir: str | os.PathLike, *, resume: bool = False, overwrite: bool = False):
        """Process `dataset` into `output_dir` (see the module docstring) and return the final dataset (loaded
        from `output_dir/dataset`).

        Args:
            dataset: a `datasets.Dataset`.
            output_dir: created if needed. If it holds an earlier run, pass `resume=True` to continue it (the
                configuration and input must be the same) or `overwrite=True` to delete it and start over.
        """
        import datasets

        if resume and overwrite:
            raise ValueError("`resume` and `overwrite` exclude each other")
        self.validate(dataset)
        if len(dataset) == 0:
            raise ValueError("the dataset has no rows")
        for stage in self.stages:
            stage.precheck()
        output = Path(output_dir).expanduser()
        expected = json.loads(
            json.dumps({"pipeline": self.config(), "input": self.input_identity(dataset)}, default=str)
        )
        self._claim_output(output, expected, resume, overwrite)

        final = output / FINAL
        shards = output / SHARDS
        if final.is_dir():
            logger.info("%s is complete already; nothing to do", output)
            self._remove_shards(shards)
            return datasets.load_from_disk(str(final))

        num_shards = -(-len(dataset) // self.shard_size)
        names = [f"{i:05d}-of-{num_shards:05d}" for i in range(num_shards)]
        shards.mkdir(parents=True, exist_ok=True)
        _remove_temporaries(shards)
        _remove_temporaries(output)
        todo = [i for i in range(num_shards) if not (shards / names[i]).is_dir()]
        if len(todo) < num_shards:
            logger.info("resuming: %d of %d shards are done, %d to go", num_shards - len(todo), num_shards, len(todo))
        if todo:
            for stage in self.stages:
                stage.load()
        prepared = self.prepare(dataset)
        for index in todo:
            start, stop = index * self.shard_size, min((index + 1) * self.shard_size, len(dataset))
            began = time.perf_counter()
            part = self._process_part(prepared.select(range(start, stop)), f" [shard {index + 1}/{num_shards}]")
            _save_atomically(part, shards / names[index])
            logger.info(
                "shard %d/%d (rows %d-%d) saved in %.1f s", index + 1, num_shards, start, stop - 1,
                time.perf_counter() - began,
            )  # fmt: skip

        combined = datasets.concatenate_datasets([datasets.load_from_disk(str(shards / n)) for n in names])
        _save_atomically(combined, final)
        manifest = json.loads((output / MANIFEST).read_text())
        manifest.update(complete=True, finished=time.strftime("%Y-%m-%dT%H:%M:%S"), num_rows=len(combined))
        _write_json_atomically(output / MANIFEST, manifest)
        self._remove_shards(shards)
        logger.info("%d rows written to %s", len(combined), final)
        return datasets.load_from_disk(str(final))

    def _claim_output(self, output: Path, expected: dict, resume: bool, overwrite: bool) -> None:
        manifest_path = output / MANIFEST
        if output.exists() and not output.is_dir():
            raise ValueError(f"`output_dir` {output} is a file, not a directory")
        if output.is_dir() and any(output.iterdir()):
            if not manifest_path.is_file():
                raise ValueError(
                    f"`output_dir` {output} exists, is not empty and holds no {MANIFEST}: it is not an output of this "
                    "pipeline; choose another directory"
                )
            if overwrite:
                logger.info("overwrite: removing the earlier run in %s", output)
                for entry in (FINAL, SHARDS, MANIFEST):
                    _remove(output / entry)
                _remove_temporaries(output)
            elif resume:
                saved = json.loads(manifest_path.read_text())
                if saved.get("format") != MANIFEST_FORMAT:
                    raise ValueError(
                        f"`output_dir` {output} was written by another version of this pipeline "
                        f"(manifest format {saved.get('format')}); pass `overwrite=True` to start over"
                    )
                differences = _differences(saved.get("config", {}), expected)
                if differences:
                    raise ValueError(
                        f"`output_dir` {output} holds a run with a different configuration or input, so its shards "
                        "cannot be reused:\n  "
                        + "\n  ".join(differences[:20])
                        + ("\n  ..." if len(differences) > 20 else "")
                        + "\npass `overwrite=True` to start over, or choose another `output_dir`"
                    )
                return
            else:
                raise ValueError(
                    f"`output_dir` {output} holds an earlier run: pass `resume=True` to continue it (same "
                    "configuration) or `overwrite=True` to start over"
                )
        output.mkdir(parents=True, exist_ok=True)
        _write_json_atomically(
            manifest_path,
            {
                "format": MANIFEST_FORMAT,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "complete": False,
                "config": expected,
            },
        )

    def _remove_shards(self, shards: Path) -> None:
        if not self.keep_shards:
            _remove(shards)


def _is_image_feature(feature) -> bool:
    import datasets

    if isinstance(feature, datasets.Image):
        return True
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        return True  # paths or URLs
    return isinstance(feature, dict) and set(feature) == {"bytes", "path"}


def _describe(feature) -> str:
    import datasets

    if isinstance(feature, datasets.Value):
        return f"values of type {feature.dtype}"
    if isinstance(feature, datasets.ClassLabel):
        return "class labels"
    return type(feature).__name__


def _differences(saved, expected, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON values, as 'key: was X, now Y' lines."""
    if isinstance(saved, dict) and isinstance(expected, dict):
        out = []
        for key in sorted(set(saved) | set(expected), key=str):
            out += _differences(saved.get(key), expected.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    if saved != expected:
        return [f"{prefix}: was {_short(saved)}, now {_short(expected)}"]
    return []


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 160 else text[:157] + "..."


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _remove_temporaries(folder: Path) -> None:
    """Leftovers of an interrupted save (they were never renamed into place)."""
    if folder.is_dir():
        for entry in folder.iterdir():
            if entry.name.startswith(_TMP_PREFIX):
                _remove(entry)


def _save_atomically(dataset, target: Path) -> None:
    """`save_to_disk` into a temporary sibling, then rename it to `target`: `target` is complete or absent."""
    temporary = target.with_name(f"{_TMP_PREFIX}{target.name}-{os.getpid()}")
    _remove(temporary)
    dataset.save_to_disk(str(temporary))
    os.replace(temporary, target)


def _write_json_atomically(path: Path, value: dict) -> None:
    temporary = path.with_name(f"{_TMP_PREFIX}{path.name}-{os.getpid()}")
    temporary.write_text(json.dumps(value, indent=1, default=str) + "\n")
    os.replace(temporary, path)


__all__ = ["FINAL", "MANIFEST", "SHARDS", "DescriptionPipeline", "OutputColumns"]
