"""Remote code: the model's source files written next to a saved config, so that `trust_remote_code=True` loads
a saved directory (or Hub repository) without this package.

transformers resolves only flat sibling imports (`from .name import ...`) in remote code. The configuration and
modeling files are flat already and are copied as they are; the Bi-WKV op package (`ops/bi_wkv/`) is flattened
into `bi_wkv*.py` files with its relative imports rewritten. The tokenizer, image processor and processor need
no help: they are registered for their Auto classes (`register_for_auto_class`), so transformers' own
`custom_object_save` copies their (flat) modules and writes their `auto_map` when they are saved.
"""

import os
import re
import sys
from pathlib import Path

# model_type -> {transformers auto class: model class in modeling_rwkv_clip}
AUTO_MODEL_CLASSES: dict[str, dict[str, str]] = {
    "rwkv_clip": {
        "AutoModel": "RWKVCLIPModel",
        "AutoModelForZeroShotImageClassification": "RWKVCLIPModel",
        "AutoModelForImageClassification": "RWKVCLIPForImageClassification",
    },
    "rwkv_clip_text_model": {"AutoModel": "RWKVCLIPTextModel"},
    "rwkv_clip_vision_model": {"AutoModel": "RWKVCLIPVisionModel"},
}


def _remote_code_auto_map(config) -> dict:
    mapping = {"AutoConfig": f"configuration_rwkv_clip.{type(config).__name__}"}
    for auto_class, model_class in AUTO_MODEL_CLASSES.get(config.model_type, {}).items():
        mapping[auto_class] = f"modeling_rwkv_clip.{model_class}"
    return mapping


# Files written next to a saved model so that it loads with `trust_remote_code=True`. transformers resolves
# only flat sibling imports (`from .name import ...`), so the op package is flattened and its imports rewritten.
_PACKAGE_DIR = Path(__file__).resolve().parent
_REMOTE_CODE_FILES = {
    "configuration_rwkv_clip.py": ("configuration_rwkv_clip.py", {}),
    "remote_code_rwkv_clip.py": ("remote_code_rwkv_clip.py", {}),
    "modeling_rwkv_clip.py": (
        "modeling_rwkv_clip.py",
        {"from .ops.bi_wkv import": "from .bi_wkv import", "from .ops.block import": "from .block_ops import"},
    ),
    "block_ops.py": ("ops/block.py", {"from .bi_wkv.kernel import": "from .bi_wkv_kernel import"}),
    "bi_wkv.py": (
        "ops/bi_wkv/__init__.py",
        {
            "from .chunk import": "from .bi_wkv_chunk import",
            "from .kernel import": "from .bi_wkv_kernel import",
            "from .naive import": "from .bi_wkv_naive import",
            "from .triton_op import": "from .bi_wkv_triton_op import",
        },
    ),
    "bi_wkv_chunk.py": ("ops/bi_wkv/chunk.py", {}),
    "bi_wkv_kernel.py": ("ops/bi_wkv/kernel.py", {}),
    "bi_wkv_naive.py": ("ops/bi_wkv/naive.py", {}),
    "bi_wkv_triton_op.py": (
        "ops/bi_wkv/triton_op.py",
        {"from .triton_kernels import": "from .bi_wkv_triton_kernels import"},
    ),
    "bi_wkv_triton_kernels.py": ("ops/bi_wkv/triton_kernels.py", {}),
}


def _loaded_flat_module_file(target: str) -> Path:
    # transformers may load the config and the model code from different cache folders
    candidates = [_PACKAGE_DIR / target]
    stem = target.removesuffix(".py")
    for name, module in list(sys.modules.items()):
        if name.rsplit(".", 1)[-1] == stem and getattr(module, "__file__", None):
            candidates.append(Path(module.__file__))
    # a file imported lazily (the Triton Bi-WKV) is not loaded: look beside the flattened files that are
    flat_stems = {flat.removesuffix(".py") for flat in _REMOTE_CODE_FILES}
    for name, module in list(sys.modules.items()):
        if name.rsplit(".", 1)[-1] in flat_stems and getattr(module, "__file__", None):
            candidates.append(Path(module.__file__).with_name(target))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"remote-code export: cannot find the source of {target}")


def export_remote_code(save_directory: str | os.PathLike) -> list[Path]:
    """Write the self-contained model code used by `trust_remote_code=True` into `save_directory`."""
    written = []
    for target, (source, rewrites) in _REMOTE_CODE_FILES.items():
        path = _PACKAGE_DIR / source
        if not path.is_file():
            # running from a flattened copy (loaded with trust_remote_code): copy the loaded files as they are
            path, rewrites = _loaded_flat_module_file(target), {}
        text = path.read_text(encoding="utf-8")
        for old, new in rewrites.items():
            if old not in text:
                raise RuntimeError(f"remote-code export: expected {old!r} in {source}; update _REMOTE_CODE_FILES")
            text = text.replace(old, new)
        leftover = re.findall(r"^\s*from\s+\.(\S+)\s+import", text, flags=re.MULTILINE)
        unknown = [name for name in leftover if f"{name}.py" not in _REMOTE_CODE_FILES]
        if unknown:
            raise RuntimeError(f"remote-code export: {source} imports {unknown}, which are not exported")
        path = Path(save_directory) / target
        tmp = path.with_suffix(".py.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        written.append(path)
    return written


def save_with_remote_code(config, save_fn, save_directory, push_to_hub: bool, **kwargs) -> None:
    config.auto_map = _remote_code_auto_map(config)
    if not push_to_hub:
        save_fn(save_directory, **kwargs)
        export_remote_code(save_directory)
        return
    # Save and export locally first, then push the complete folder.
    save_fn(save_directory)
    export_remote_code(save_directory)
    repo_id = kwargs.pop("repo_id", Path(save_directory).name)
    config.push_to_hub(repo_id, **kwargs)


# the names of the files `export_remote_code` writes
REMOTE_CODE_FILES = tuple(_REMOTE_CODE_FILES)

__all__ = ["AUTO_MODEL_CLASSES", "REMOTE_CODE_FILES", "export_remote_code", "save_with_remote_code"]
