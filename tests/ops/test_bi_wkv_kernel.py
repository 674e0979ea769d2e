"""The prebuilt Bi-WKV kernel (cuda/ in the repository): loading through `kernels`, the CPU (and, on a GPU, the
CUDA) implementation against the float64 reference, the backend choice and its fallbacks, torch.compile.

The CPU variant is built by `make kernels` (a dependency of `make test`, which sets RWKV_CLIP_REQUIRE_KERNEL=1
so that a missing build fails instead of skipping).
"""

import importlib.util
import json
import logging
import os
from pathlib import Path

import pytest
import torch

from rwkv_clip_hf import RWKVCLIPModel
from rwkv_clip_hf.ops.bi_wkv import KernelUnavailableError, bi_wkv, chunk_bi_wkv, kernel, naive_bi_wkv

from conftest import BOS, EOS, randomize_, tiny_config
from test_bi_wkv import make_inputs, rel_err

KERNEL_DIR = Path(__file__).resolve().parents[2] / "cuda"
REPO_ID = kernel.DEFAULT_KERNEL_REPO
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _build_script():
    spec = importlib.util.spec_from_file_location("bi_wkv_build", KERNEL_DIR / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def local_kernels(monkeypatch):
    """LOCAL_KERNELS points the default repo id at the in-tree build; the loader cache starts empty."""
    monkeypatch.setenv("LOCAL_KERNELS", f"{REPO_ID}={KERNEL_DIR}")
    monkeypatch.delenv(kernel.REPO_ENV, raising=False)
    monkeypatch.delenv(kernel.BACKEND_ENV, raising=False)
    monkeypatch.delenv("RWKV_CLIP_BI_WKV_BACKEND", raising=False)
    kernel.clear_cache()
    yield
    kernel.clear_cache()


@pytest.fixture(scope="module")
def built():
    """The kernel module built for this machine, or skip (fail under RWKV_CLIP_REQUIRE_KERNEL=1)."""
    import kernels

    try:
        return kernels.get_local_kernel(KERNEL_DIR)
    except Exception as error:
        message = f"Bi-WKV kernel not built for this machine ({error}); run `make kernels`"
        if os.environ.get("RWKV_CLIP_REQUIRE_KERNEL") == "1":
            pytest.fail(message)
        pytest.skip(message)


def device_kernel(device):
    if device == "cuda":
        try:
            kernel.load_kernel("cuda")
        except KernelUnavailableError as error:
            pytest.skip(f"CUDA variant not built: {error}")
    return lambda *xs: bi_wkv(*xs, backend="kernel")


# ---------------------------------------------------------------- loading through `kernels`


def test_get_kernel_finds_the_local_build_by_repo_id(built):
    import kernels

    module = kernels.get_kernel(REPO_ID, version=1)
    assert module is built  # one variant, imported once
    assert callable(module.bi_wkv)
    variant = Path(module.__file__).parent  # the flattened layout: build/<variant>/__init__.py
    metadata = json.loads((variant / "metadata.json").read_text())
    assert metadata["name"] == "bi-wkv" and metadata["version"] == 1 and metadata["id"] == module.__name__
    assert variant.name == _build_script().variant_name(metadata["backend"]["type"])
    assert kernels.has_kernel(REPO_ID, version=1)


def test_build_config_is_valid():
    from kernels._rust import Build

    assert {str(b) for b in Build.open(KERNEL_DIR).general.backends} == {"cpu", "cuda"}


# ---------------------------------------------------------------- against the float64 reference

SEQ_LENS = [1, 2, 3, 49, 77, 196, 4096]


def _cases():
    for seq_len in SEQ_LENS:
        sizes = [64] if seq_len == 4096 else [64, 80]
        decays = ["mixed", "spikes"] if seq_len == 4096 else ["mixed", "none", "full", "spikes"]
        for size in sizes:
            for decay in decays:
                yield seq_len, size, decay


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seq_len,size,decay", list(_cases()))
def test_forward_and_backward_against_float64_reference(built, device, seq_len, size, decay):
    run = device_kernel(device)
    batch, heads = (1, 2) if seq_len == 4096 else (2, 2)
    inputs = make_inputs(batch, seq_len, heads, size, decay, seed=seq_len + size)
    grad_out = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref_inputs = [x.clone().requires_grad_() for x in inputs]
    reference = naive_bi_wkv(*ref_inputs)
    if seq_len <= 1000:
        reference.backward(grad_out)
    else:
        # autograd through 2 x 4096 recurrence steps takes minutes: take the gradients of the float64 chunked
        # path instead, which test_bi_wkv.py checks against the naive reference (gradients and gradcheck)
        reference = reference.detach()
        chunk_bi_wkv(*ref_inputs, chunk_size=64).backward(grad_out)

    fast = [x.to(device, torch.float32).requires_grad_() for x in inputs]
    y = run(*fast)
    assert y.dtype == torch.float32 and y.shape == reference.shape
    # float32 decays are rounded per step: over 4096 steps of decay ~1 that alone is a few 1e-6
    assert rel_err(y.cpu(), reference.detach()) <= (2e-5 if seq_len == 4096 else 1e-5)
    y.backward(grad_out.to(device, torch.float32))
    for name, x, ref in zip("rkvwu", fast, ref_inputs):
        expected = ref.grad if ref.grad is not None else torch.zeros_like(ref)  # T = 1: w is unused
        if not expected.any():
            assert x.grad.abs().max().item() <= 1e-6, name
            continue
        # the CPU kernel to the 1e-5; the CUDA kernel (not yet run on a GPU) to 1e-4
        assert rel_err(x.grad.cpu(), expected) <= (1e-5 if device == "cpu" else 1e-4), name


def test_float64_gradcheck_of_the_cpu_kernel(built):
    for decay in ("mixed", "spikes", "trained"):
        inputs = [x.requires_grad_() for x in make_inputs(1, 7, 2, 4, decay, seed=3)]
        assert torch.autograd.gradcheck(built.bi_wkv, inputs)


def test_cpu_hot_loops_run_the_vector_clone_of_this_cpu(built):
    """The hot loops are dispatched on CPU features: an AVX2 / AVX-512 machine runs an FMA clone, whatever its
    vendor (clones keyed on CPU models, like arch=haswell, left AMD CPUs on the SSE2 baseline)."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("no AVX2 on this CPU")
    assert built.ops.hot_loops_use_fma()


@pytest.mark.parametrize("size", [4, 8, 12, 20, 24])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("decay", ["mixed", "spikes"])
def test_cpu_forward_paths_of_every_head_size(built, size, dtype, decay):
    """The CPU forward's register tiles (head sizes a multiple of 8, read in place) and its row-by-row scan (other
    sizes), over more than one block of tokens, against the float64 recurrence; float64 to float64 rounding."""
    inputs = make_inputs(2, 37, 3, size, decay, seed=size)
    reference = naive_bi_wkv(*inputs)
    y = bi_wkv(*(x.to(dtype) for x in inputs), backend="kernel")
    assert y.dtype == dtype
    assert rel_err(y, reference) <= (1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("size", [4, 8, 12, 20, 24, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("decay", ["mixed", "none", "full", "spikes"])
def test_cpu_backward_paths_of_every_head_size(built, size, dtype, decay):
    """The CPU backward's register tiles (head sizes a multiple of 8: dv through the forward's tiles, dr / dk / dw on
    value-major tiles with the forward states of every token stored) and its row-by-row scans with checkpoints
    (other sizes), against autograd through the float64 recurrence, every input's gradient."""
    inputs = make_inputs(2, 37, 3, size, decay, seed=size)
    grad_out = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref_inputs = [x.clone().requires_grad_() for x in inputs]
    naive_bi_wkv(*ref_inputs).backward(grad_out)
    leaves = [x.to(dtype).requires_grad_() for x in inputs]
    bi_wkv(*leaves, backend="kernel").backward(grad_out.to(dtype))
    for name, x, ref in zip("rkvwu", leaves, ref_inputs):
        assert x.grad.dtype == dtype, name
        if not ref.grad.any():  # no decay gradient where every decay is 0 or 1
            assert x.grad.abs().max().item() <= (1e-6 if dtype == torch.float32 else 1e-300), name
            continue
        assert rel_err(x.grad, ref.grad) <= (1e-5 if dtype == torch.float32 else 1e-12), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_compute_in_float32(built, device, dtype):
    run = device_kernel(device)
    r, k, v, w, u = make_inputs(2, 77, 2, 64, "trained", seed=2)
    half = [x.to(device, dtype) for x in (r, k, v, w, u)]
    y = run(*half)
    assert y.dtype == dtype
    # exactly the float32 computation on the (rounded) half inputs, rounded once at the end
    expected = run(*(x.float() for x in half))
    torch.testing.assert_close(y, expected.to(dtype), rtol=0, atol=0)
    assert rel_err(y.float().cpu(), naive_bi_wkv(*(x.double().cpu() for x in half))) <= 1e-2
    # gradients come back in the input dtype, u's in u's
    leaves = [x.detach().requires_grad_() for x in half]
    run(*leaves).float().sum().backward()
    assert all(x.grad.dtype == dtype for x in leaves)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_and_autocast(built, device):
    run = device_kernel(device)
    r, k, v, w, u = (x.to(device, torch.float32) for x in make_inputs(2, 49, 2, 64, "trained", seed=4))
    expected = run(r, k, v, w, u)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = run(r, k, v, w, u)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    # what autocast hands the op in the model: bfloat16 projections, float32 decays and bonus
    mixed = run(r.bfloat16(), k.bfloat16(), v.bfloat16(), w, u)
    assert mixed.dtype == torch.bfloat16
    rounded = [x.bfloat16().float() for x in (r, k, v)]
    torch.testing.assert_close(mixed, run(*rounded, w, u).bfloat16())


# ---------------------------------------------------------------- backend choice and fallbacks


def test_backends_agree_and_auto_uses_the_kernel(built):
    r, k, v, w, u = (x.float() for x in make_inputs(2, 77, 2, 64, "trained", seed=5))
    by_kernel = bi_wkv(r, k, v, w, u, backend="kernel")
    torch.testing.assert_close(bi_wkv(r, k, v, w, u, backend="auto"), by_kernel, rtol=0, atol=0)
    torch.testing.assert_close(built.bi_wkv(r, k, v, w, u), by_kernel, rtol=0, atol=0)
    assert rel_err(bi_wkv(r, k, v, w, u, backend="torch"), by_kernel.double()) <= 1e-5
    # float64 stays on the PyTorch path under "auto"
    inputs64 = make_inputs(1, 20, 2, 8, "mixed", seed=6)
    torch.testing.assert_close(bi_wkv(*inputs64, backend="auto"), chunk_bi_wkv(*inputs64), rtol=0, atol=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        bi_wkv(r, k, v, w, u, backend="cuda")


def _fake_variant(root: Path, init_py: str, files: dict[str, bytes] = {}) -> Path:
    """A kernel repo folder with one build variant for this machine whose package is `init_py`."""
    variant = root / "build" / _build_script().variant_name("cpu")
    package = variant / "bi_wkv"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(init_py)
    for name, data in files.items():
        (package / name).write_bytes(data)
    metadata = {"name": "bi-wkv", "id": f"_bi_wkv_test_{root.name}", "version": 1, "license": "MIT",
                "python-depends": [], "backend": {"type": "cpu"}}  # fmt: skip
    (variant / "metadata.json").write_text(json.dumps(metadata))
    return root


@pytest.mark.parametrize("problem", ["missing", "broken", "raises"])
def test_auto_falls_back_and_kernel_raises(tmp_path, monkeypatch, caplog, problem):
    repo = tmp_path / problem
    repo.mkdir()
    if problem == "broken":  # a shared object that is not one
        _fake_variant(repo, "from . import _bi_wkv_broken\n", {"_bi_wkv_broken.abi3.so": b"not an ELF file"})
    elif problem == "raises":
        _fake_variant(repo, "raise RuntimeError('incompatible build')\n")
    monkeypatch.setenv("LOCAL_KERNELS", f"{REPO_ID}={repo}")
    r, k, v, w, u = (x.float() for x in make_inputs(1, 30, 2, 8, "trained", seed=7))
    expected = chunk_bi_wkv(r, k, v, w, u)
    with caplog.at_level(logging.INFO, logger=kernel.__name__):
        for _ in range(3):
            torch.testing.assert_close(bi_wkv(r, k, v, w, u, backend="auto"), expected, rtol=0, atol=0)
    reports = [rec for rec in caplog.records if rec.name == kernel.__name__]
    assert len(reports) == 1 and "PyTorch chunked path" in reports[0].getMessage()
    with pytest.raises(KernelUnavailableError, match="unavailable for cpu tensors"):
        bi_wkv(r, k, v, w, u, backend="kernel")


def test_without_local_kernels_the_package_asks_the_hub_only(monkeypatch, built):
    # library code never looks for a source checkout's build: without LOCAL_KERNELS (offline) there is no kernel
    monkeypatch.delenv("LOCAL_KERNELS")
    r, k, v, w, u = (x.float() for x in make_inputs(1, 10, 2, 8, "trained", seed=8))
    with pytest.raises(KernelUnavailableError, match="unavailable for cpu tensors"):
        bi_wkv(r, k, v, w, u, backend="kernel")
    torch.testing.assert_close(bi_wkv(r, k, v, w, u, backend="auto"), chunk_bi_wkv(r, k, v, w, u), rtol=0, atol=0)


def test_kernel_repo_is_configurable(monkeypatch, built):
    monkeypatch.setenv("LOCAL_KERNELS", f"someone/bi-wkv-fork={KERNEL_DIR}")
    r, k, v, w, u = (x.float() for x in make_inputs(1, 10, 2, 8, "trained", seed=8))
    with pytest.raises(KernelUnavailableError, match="rwkv-clip-hf/bi-wkv"):
        bi_wkv(r, k, v, w, u, backend="kernel")
    expected = built.bi_wkv(r, k, v, w, u)
    torch.testing.assert_close(bi_wkv(r, k, v, w, u, backend="kernel", kernel_repo="someone/bi-wkv-fork"), expected)
    monkeypatch.setenv(kernel.REPO_ENV, "someone/bi-wkv-fork")
    torch.testing.assert_close(bi_wkv(r, k, v, w, u, backend="kernel"), expected)


# ---------------------------------------------------------------- the model on either backend


def _captions():
    return torch.tensor([[BOS, 4, 9, 17, EOS, 0, 0], [BOS, 5, 6, 7, 8, 9, EOS]]), torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("head_size", [8, 16])
def test_model_outputs_and_gradients_agree_across_backends(built, head_size):
    config = tiny_config(text_config={"head_size": head_size}, vision_config={"head_size": head_size})
    model = randomize_(RWKVCLIPModel(config))
    ids, pixels = _captions()
    results = {}
    for backend in ("torch", "kernel"):
        assert model.set_kernel_backend(backend) is model and model.get_kernel_backend() == backend
        model.zero_grad()
        out = model(input_ids=ids, pixel_values=pixels, return_loss=True)
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results[backend] = (out.text_embeds.detach(), out.image_embeds.detach(), grads)
    for a, b in zip(results["torch"][:2], results["kernel"][:2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch_grads, kernel_grads = results["torch"][2], results["kernel"][2]
    assert torch_grads.keys() == kernel_grads.keys()
    for name in torch_grads:
        assert rel_err(kernel_grads[name], torch_grads[name].double()) <= 1e-4, name


def test_backend_is_set_on_the_model_and_the_environment_is_only_its_default(monkeypatch, tmp_path, built):
    ids, _ = _captions()
    monkeypatch.setenv(kernel.BACKEND_ENV, "torch")
    model = randomize_(RWKVCLIPModel(tiny_config())).eval()
    assert model.get_kernel_backend() == "torch"
    monkeypatch.setenv("LOCAL_KERNELS", f"{REPO_ID}={tmp_path}")  # nothing built there
    model.get_text_features(ids)  # the PyTorch path never asks for the kernel
    monkeypatch.setenv(kernel.BACKEND_ENV, "kernel")
    model.get_text_features(ids)  # read when a model is built, never during a forward
    assert RWKVCLIPModel(tiny_config()).get_kernel_backend() == "kernel"
    model.set_kernel_backend("kernel")
    assert {m.kernel_backend for m in model.modules() if hasattr(m, "kernel_backend")} == {"kernel"}
    with pytest.raises(KernelUnavailableError):
        model.get_text_features(ids)
    with pytest.raises(ValueError, match="backend must be one of"):
        model.set_kernel_backend("cuda")
    monkeypatch.setenv(kernel.BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match=r"\$RWKV_CLIP_KERNEL_BACKEND must be one of"):
        RWKVCLIPModel(tiny_config())


def test_configs_saved_with_the_old_backend_field_still_load(tmp_path):
    config = tiny_config()
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "bi_wkv_backend" not in saved["text_config"] and "bi_wkv_backend" not in saved["vision_config"]
    saved["text_config"]["bi_wkv_backend"] = "auto"
    saved["vision_config"]["bi_wkv_backend"] = "torch"
    (tmp_path / "config.json").write_text(json.dumps(saved))
    from transformers.testing_utils import CaptureLogger

    from rwkv_clip_hf import configuration_rwkv_clip

    with CaptureLogger(configuration_rwkv_clip.logger) as captured:
        loaded = type(config).from_pretrained(tmp_path)
    assert "set_kernel_backend('torch')" in captured.out
    assert not hasattr(loaded.vision_config, "bi_wkv_backend") and "bi_wkv_backend" not in loaded.to_json_string()
    RWKVCLIPModel(loaded)


# ---------------------------------------------------------------- torch.compile


def test_no_graph_break_at_the_op(built):
    inputs = [x.float().requires_grad_() for x in make_inputs(2, 49, 2, 64, "trained", seed=9)]

    def loss(*xs):
        return bi_wkv(*xs, backend="auto").square().sum()

    explanation = torch._dynamo.explain(loss)(*inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    value = compiled(*inputs)
    value.backward()
    expected_grads = [x.grad.clone() for x in inputs]
    for x in inputs:
        x.grad = None
    eager = loss(*inputs)
    eager.backward()
    torch.testing.assert_close(value, eager)
    for got, x in zip(expected_grads, inputs):
        torch.testing.assert_close(got, x.grad)


def test_no_graph_break_in_the_token_mix(built):
    model = randomize_(RWKVCLIPModel(tiny_config())).eval()
    token_mix = model.text_model.encoder.layers[0].token_mix
    hidden = torch.randn(2, 12, 32)
    explanation = torch._dynamo.explain(token_mix)(hidden, (1, 12))
    assert explanation.graph_break_count == 0, explanation.break_reasons
