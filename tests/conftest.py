import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without a GPU the Triton Bi-WKV is tested under Triton's interpreter, which must be on before triton is first
# imported (torch._dynamo imports it): tests/ops/test_bi_wkv_triton.py
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py
# The Bi-WKV kernel that `make kernels` built in this checkout, under its Hub repo id (`kernels`' LOCAL_KERNELS):
# the package itself never looks for a source checkout.
os.environ.setdefault("LOCAL_KERNELS", f"rwkv-clip-hf/bi-wkv={os.path.join(os.path.dirname(__file__), '..', 'cuda')}")

from rwkv_clip_hf import RWKVCLIPConfig  # noqa: E402

VOCAB, BOS, EOS = 120, 118, 119


def tiny_config(**overrides) -> RWKVCLIPConfig:
    text = {
        "hidden_size": 32,
        "head_size": 8,
        "num_hidden_layers": 2,
        "intermediate_size": 48,
        "mix_lora_rank": 4,
        "decay_lora_rank": 6,
        "vocab_size": VOCAB,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "max_position_embeddings": 12,
    }
    vision = {
        "hidden_size": 32,
        "head_size": 8,
        "num_hidden_layers": 2,
        "intermediate_size": 40,
        "mix_lora_rank": 4,
        "decay_lora_rank": 6,
        "image_size": 32,
        "patch_size": 8,
        "drop_path_rate": 0.0,
    }
    text.update(overrides.pop("text_config", {}))
    vision.update(overrides.pop("vision_config", {}))
    return RWKVCLIPConfig(text_config=text, vision_config=vision, **overrides)


def real_vocab_config(
    text_config: dict | None = None, vision_config: dict | None = None, **overrides
) -> RWKVCLIPConfig:
    """`tiny_config` with CLIP's vocabulary and special ids (for the bundled tokenizer) and 32x32 images in 8x8
    patches; `text_config` / `vision_config` update those towers."""
    return tiny_config(
        text_config={
            "vocab_size": 49408,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "max_position_embeddings": 77,
            **(text_config or {}),
        },
        vision_config={"image_size": 32, "patch_size": 8, "drop_path_rate": 0.0, **(vision_config or {})},
        **overrides,
    )


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replace every parameter with O(1) random values so that no term of the computation is trivially zero
    (a fresh init zeroes the output projections). Decay parameters get a wide range."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            values = torch.randn(param.shape, generator=generator, dtype=torch.float64)
            if name.endswith("time_decay"):
                values = values * 2.0 - 1.0
            elif name.endswith(("weight", "w1", "w2")) and param.dim() >= 2:
                values = values / param.shape[-1] ** 0.5
            elif "norm" in name and name.endswith("weight"):
                values = 1.0 + 0.2 * values
            param.copy_(values)
    return model


@pytest.fixture
def config() -> RWKVCLIPConfig:
    return tiny_config()


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny models (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): they run fastest
    on one thread and leave the other core to a parallel job."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The first lines of every script that plays a Hub user without this package (tests/test_modeling.py,
# tests/test_remote_code.py): the package cannot be imported there.
WITHOUT_THE_PACKAGE = textwrap.dedent(
    """
    import sys
    sys.modules["rwkv_clip_hf"] = None  # the package must not be importable here
    try:
        import rwkv_clip_hf
        raise SystemExit("rwkv_clip_hf is importable")
    except ImportError:
        pass
    """
)


def run_without_the_package(script: str, *args, cwd: Path, timeout: int) -> None:
    """Run `script` (after `WITHOUT_THE_PACKAGE`) with `args` in a fresh interpreter, offline and with its own
    transformers modules cache under `cwd`; fail with the end of its stderr unless it exits with 0."""
    path = Path(cwd) / "without_the_package.py"
    path.write_text(WITHOUT_THE_PACKAGE + textwrap.dedent(script))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(Path(cwd) / "modules")}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, str(path), *map(str, args)],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def use_torch_bi_wkv(model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """Put `model` and the remote-code copies a subprocess loads on the PyTorch Bi-WKV path, so that their outputs
    must be bitwise equal (the copied code cannot see this checkout's kernel build)."""
    monkeypatch.setenv("RWKV_CLIP_KERNEL_BACKEND", "torch")
    model.set_kernel_backend("torch")
