"""What the pipeline's model steps (captioner, taggers, merger) share: a model given as an instance or as a name
loaded on first use, device and dtype handling, and the description of the step that goes into the manifest."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..evaluation.data import to_pil
from ..evaluation.features import DTYPES, model_fingerprint


def default_device() -> str:
    """`"cuda"` when a GPU is visible, else `"cpu"`."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_dtype(dtype: str | torch.dtype | None, device: str):
    """The `dtype=` for `from_pretrained`: a name from `DTYPES`, or `"auto"` (None): the checkpoint's own dtype on
    a GPU, float32 on the CPU (half-precision matmuls are slow there)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return "auto" if torch.device(device).type != "cpu" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"`dtype` {dtype!r}: choose auto or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    parameter = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    if parameter is None:
        return torch.device("cpu"), torch.float32
    return parameter.device, parameter.dtype


def rgb_images(values, column: str = "image") -> list:
    """Cells of an image column (PIL images, `datasets` image dicts, bytes, arrays, paths) as RGB PIL images."""
    images = []
    for value in values:
        image = to_pil(value, column)
        images.append(image if image.mode == "RGB" else image.convert("RGB"))
    return images


def to_device(inputs, device: torch.device, dtype: torch.dtype) -> dict:
    """Move a processor's output to `device`; floating tensors (pixel values) also to the model's `dtype`."""
    moved = {}
    for key, value in dict(inputs).items():
        if isinstance(value, torch.Tensor):
            value = value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
        moved[key] = value
    return moved


class ModelStage:
    """Base class of the pipeline's model steps.

    Args:
        model: a model instance, or a local directory / Hub id loaded with `load()` (called by the pipeline
            only when there is work to do, so a finished run never loads anything).
        device: where to run; default cuda when available. A model passed as an instance is moved only when a
            device is given.
        dtype: `"auto"` (default: the checkpoint's dtype on a GPU, float32 on the CPU), `"float32"`,
            `"float16"` or `"bfloat16"`. Applied to instances only when not `"auto"`.
        revision, trust_remote_code: passed to `from_pretrained`.
    """

    #: the step's name in the manifest and in progress bars
    name = "stage"

    def __init__(
        self,
        model,
        *,
        device: str | None = None,
        dtype: str | None = "auto",
        revision: str | None = None,
        trust_remote_code: bool = False,
    ):
        self.source = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
        self.model = None if self.source is not None else model
        self.device = device
        self.dtype = dtype or "auto"
        self.revision = revision
        self.trust_remote_code = trust_remote_code
        self._ready = False

    # -- loading -------------------------------------------------------------------------------------------
    @property
    def resolved_device(self) -> str:
        return self.device or default_device()

    def pretrained_kwargs(self) -> dict:
        return {
            "revision": self.revision,
            "trust_remote_code": self.trust_remote_code,
            "dtype": torch_dtype(self.dtype, self.resolved_device),
        }

    def load(self):
        """Load the model (and its processor or tokenizer) if given by name, move it to the device, check it.
        Idempotent; returns self."""
        if self._ready:
            return self
        if self.model is None:
            self._load_pretrained()
            self.model = self.model.to(self.resolved_device)
        else:
            self._complete_instance()
            if self.device is not None:
                self.model = self.model.to(self.device)
            if self.dtype != "auto":
                self.model = self.model.to(torch_dtype(self.dtype, self.resolved_device))
        self.model.eval()
        self._check()
        self._ready = True
        return self

    def precheck(self) -> None:
        """Cheap checks run before any output is written or weights are loaded (e.g. the merger's chat
        template); raise a `ValueError` saying what is wrong."""

    def _load_pretrained(self) -> None:
        raise NotImplementedError

    def _complete_instance(self) -> None:
        """Fill in what a model passed as an instance lacks (e.g. load its processor by name)."""

    def _load_companion(self, auto_class: str, what: str):
        """The processor (or image processor) saved with the model: `transformers.<auto_class>.from_pretrained`
        of the model's source or `name_or_path`; a clear error for an in-memory model that has neither."""
        import transformers

        name = self.source or getattr(self.model, "name_or_path", None)
        if not name:
            raise ValueError(f"{type(self).__name__}: give the {what} of a model passed as an instance")
        return getattr(transformers, auto_class).from_pretrained(
            name, revision=self.revision, trust_remote_code=self.trust_remote_code
        )

    def _check(self) -> None:
        """Validate the loaded model; raise a `ValueError` saying what is wrong."""

    # -- identity ------------------------------------------------------------------------------------------
    def model_identity(self) -> dict:
        """What identifies the model: for a name, its id / path with revision, cached commit or file stamps;
        for an instance, its class and `name_or_path`."""
        if self.source is not None:
            identity = model_fingerprint(None, source=self.source, revision=self.revision)
            identity.pop("class", None)
            identity.pop("dtype", None)
            return identity
        return {"class": type(self.model).__name__, "name_or_path": getattr(self.model, "name_or_path", "") or ""}

    def settings(self) -> dict[str, Any]:
        """The step's own settings that change its outputs (subclasses extend this)."""
        return {}

    def config(self) -> dict[str, Any]:
        """JSON-serialisable description of everything that determines this step's outputs (recorded in the
        pipeline's manifest; a resumed run must match it)."""
        return {
            "step": type(self).__name__,
            "model": self.model_identity(),
            "dtype": str(self.dtype),
            **self.settings(),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source or type(self.model).__name__!r})"
