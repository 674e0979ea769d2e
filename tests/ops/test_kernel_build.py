"""The built Bi-WKV kernel variant (`make kernels`): the kernel hub's rules on the files and the shared object
(cuda/check_hub_rules.py), and torch.library.opcheck of its custom ops."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_bi_wkv import make_inputs

KERNEL_DIR = Path(__file__).resolve().parents[2] / "cuda"


def _script(name):
    spec = importlib.util.spec_from_file_location(f"bi_wkv_{name}", KERNEL_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cpu_variant():
    """The CPU variant built for this machine, or skip (fail under RWKV_CLIP_REQUIRE_KERNEL=1)."""
    variant = KERNEL_DIR / "build" / _script("build").variant_name("cpu")
    if not (variant / "metadata.json").is_file():
        message = f"Bi-WKV kernel not built for this machine ({variant}); run `make kernels`"
        if os.environ.get("RWKV_CLIP_REQUIRE_KERNEL") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return variant


@pytest.fixture(scope="module")
def built(cpu_variant):
    import kernels

    return kernels.get_local_kernel(KERNEL_DIR, backend="cpu")


def test_cpu_variant_follows_the_hub_rules(cpu_variant):
    problems = _script("check_hub_rules").check_variant(cpu_variant)
    assert problems == []


def test_the_rules_catch_violations(cpu_variant, tmp_path):
    """The checks can fail: a variant with a tampered file, the old nested layout, or no digest."""
    rules = _script("check_hub_rules")
    tampered = tmp_path / "tampered"
    shutil.copytree(cpu_variant, tampered, ignore=shutil.ignore_patterns("__pycache__"))
    with open(tampered / "_ops.py", "a") as f:
        f.write("# changed\n")
    assert any("digest does not match" in p and "_ops.py" in p for p in rules.check_variant(tampered))

    nested = tmp_path / "nested"
    shutil.copytree(cpu_variant, nested, ignore=shutil.ignore_patterns("__pycache__"))
    (nested / "__init__.py").unlink()
    metadata = json.loads((nested / "metadata.json").read_text())
    del metadata["digest"]
    (nested / "metadata.json").write_text(json.dumps(metadata))
    problems = rules.check_variant(nested)
    assert any("top-level __init__.py" in p for p in problems) and any("no digest" in p for p in problems)


def test_shared_object_checks_read_the_binary(cpu_variant, monkeypatch):
    """Fed the dynamic section and symbols of the old build (libgomp, exp@GLIBC_2.29, __libc_single_threaded),
    the shared-object check reports all three."""
    rules = _script("check_hub_rules")
    monkeypatch.setattr(rules, "needed_libraries", lambda so: ["libtorch_cpu.so", "libgomp.so.1", "libc.so.6"])
    monkeypatch.setattr(
        rules, "glibc_symbols", lambda so: {"exp": (2, 29), "__libc_single_threaded": (2, 32), "expf": (2, 27)}
    )
    problems = rules.check_shared_object(next(cpu_variant.glob("*.so")))
    assert len(problems) == 3
    assert "libgomp" in problems[0] and "exp@GLIBC_2.29" in " ".join(problems)
    assert "__libc_single_threaded@GLIBC_2.32" in " ".join(problems)


def test_digest_is_checked_by_kernels(built, cpu_variant):
    from kernels import Metadata

    metadata = Metadata.read_from_file(cpu_variant / "metadata.json")
    assert metadata.digest is not None and set(metadata.digest.files) >= {
        "__init__.py",
        "_ops.py",
        "bi_wkv/__init__.py",
    }
    assert built.__name__ == metadata.id


COMPAT_CHECK = """
import importlib.util, sys
import torch
from rwkv_clip_hf.ops.bi_wkv import naive_bi_wkv
spec = importlib.util.spec_from_file_location("bi_wkv", sys.argv[1] + "/bi_wkv/__init__.py")
compat = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compat)
g = torch.Generator().manual_seed(0)
r, k, v, w = (torch.randn(1, 9, 2, 8, generator=g, dtype=torch.float64) for _ in range(4))
u = torch.randn(2, 8, generator=g, dtype=torch.float64)
torch.testing.assert_close(compat.bi_wkv(r, k, v, w, u), naive_bi_wkv(r, k, v, w, u), rtol=1e-12, atol=1e-12)
print("ok", ",".join(sorted(compat.__all__)))
"""


def test_compatibility_package_exports_the_kernel(cpu_variant):
    """`kernels` versions before the flattened layout import build/<variant>/bi_wkv/, which loads and
    re-exports the kernel (in a fresh process: one build's ops register once per process)."""
    result = subprocess.run(
        [sys.executable, "-c", COMPAT_CHECK, str(cpu_variant)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [
        "ok",
        "bi_wkv,group_norm_gate,group_norm_gate_backward,ops,token_shift_mix,token_shift_mix_backward",
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck_of_the_cpu_ops(built, dtype):
    """torch.library.opcheck of forward (with its registered autograd) and backward: schema, fake tensors,
    autograd registration, AOT dispatch."""
    r, k, v, w = (x.to(dtype) for x in make_inputs(1, 21, 2, 16, "mixed", seed=4)[:4])
    u = make_inputs(1, 21, 2, 16, "mixed", seed=4)[4].to(torch.float64 if dtype == torch.float64 else torch.float32)
    leaves = tuple(x.clone().requires_grad_(dtype != torch.bfloat16) for x in (r, k, v, w, u))
    torch.library.opcheck(built.ops.forward.default, leaves)
    torch.library.opcheck(built.ops.backward.default, (torch.randn_like(r), r, k, v, w, u))


@pytest.fixture(scope="module")
def triton_variant():
    """The Triton variant for CUDA (build/torch-cuda, Python only), imported the way `kernels` imports a
    variant: `kernels` itself selects it only on a machine with a GPU backend."""
    import sys

    variant = KERNEL_DIR / "build" / "torch-cuda"
    if not (variant / "metadata.json").is_file():
        message = f"Triton variants not built ({variant}); run `make kernels`"
        if os.environ.get("RWKV_CLIP_REQUIRE_KERNEL") == "1":
            pytest.fail(message)
        pytest.skip(message)
    kernel_id = json.loads((variant / "metadata.json").read_text())["id"]
    if kernel_id not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            kernel_id, variant / "__init__.py", submodule_search_locations=[str(variant)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[kernel_id] = module
        spec.loader.exec_module(module)
    return sys.modules[kernel_id]


def test_triton_variants_follow_the_hub_rules():
    rules = _script("check_hub_rules")
    for backend in ("cuda", "rocm", "xpu"):
        variant = KERNEL_DIR / "build" / f"torch-{backend}"
        assert rules.check_variant(variant) == [], backend
        assert json.loads((variant / "metadata.json").read_text())["backend"] == {"type": backend}


def test_triton_variant_is_the_packages_triton_op(triton_variant):
    """Same results, bit for bit, as the package's Triton op, from ops in a namespace of its own."""
    from rwkv_clip_hf.ops.bi_wkv.triton_op import triton_bi_wkv

    assert triton_variant.ops is getattr(torch.ops, triton_variant.__name__)
    assert triton_variant.add_op_namespace_prefix("triton_bi_wkv") == f"{triton_variant.__name__}::triton_bi_wkv"
    device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    if not triton_variant.available(device):
        pytest.skip(f"triton cannot run on {device} here")
    inputs = [x.float().to(device) for x in make_inputs(1, 20, 1, 16, "spikes", seed=3)]
    leaves = [x.clone().requires_grad_() for x in inputs]
    y = triton_variant.bi_wkv(*leaves)
    y.sum().backward()
    leaves_pkg = [x.clone().requires_grad_() for x in inputs]
    y_pkg = triton_bi_wkv(*leaves_pkg)
    y_pkg.sum().backward()
    torch.testing.assert_close(y, y_pkg, rtol=0, atol=0)
    for x, x_pkg in zip(leaves, leaves_pkg):
        torch.testing.assert_close(x.grad, x_pkg.grad, rtol=0, atol=0)
