"""The fused element-wise block ops (`rwkv_clip_hf.ops.block`, kernel sources cuda/bi_wkv/block_cpu.cpp): the
prebuilt CPU kernel and the PyTorch composition against float64 references written token by token
(tests/reference.py), forward and backward, the backend choice and the fallbacks, and a whole model on each path.
"""

import os
from pathlib import Path

import pytest
import torch

from rwkv_clip_hf import RWKVCLIPModel
from rwkv_clip_hf.ops import block
from rwkv_clip_hf.ops.bi_wkv import kernel

from conftest import BOS, EOS, randomize_, tiny_config
from reference import shift_image, shift_text

KERNEL_DIR = Path(__file__).resolve().parents[2] / "cuda"
Q_SHIFT = ((0, -1), (0, 1), (-1, 0), (1, 0))
B_SHIFT = ((0, -1), (0, 1))


@pytest.fixture(autouse=True)
def local_kernels(monkeypatch):
    monkeypatch.setenv("LOCAL_KERNELS", f"{kernel.DEFAULT_KERNEL_REPO}={KERNEL_DIR}")
    monkeypatch.delenv(kernel.REPO_ENV, raising=False)
    kernel.clear_cache()
    yield
    kernel.clear_cache()


@pytest.fixture(scope="module")
def built():
    """The kernel module built for this machine, or skip (fail under RWKV_CLIP_REQUIRE_KERNEL=1)."""
    import kernels

    try:
        module = kernels.get_local_kernel(KERNEL_DIR)
    except Exception as error:
        message = f"kernel not built for this machine ({error}); run `make kernels`"
        if os.environ.get("RWKV_CLIP_REQUIRE_KERNEL") == "1":
            pytest.fail(message)
        pytest.skip(message)
    assert hasattr(module, "token_shift_mix") and hasattr(module, "group_norm_gate")
    return module


def rel_err(actual, expected):
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def reference_shift_mix(x, maa, grid, offsets, head_size):
    """float64, token by token: delta = shift(x) - x, mixed[j] = x + delta * maa[j]."""
    x, maa = x.double(), maa.double()
    if offsets == Q_SHIFT:
        shifted = torch.stack([shift_image(seq, grid[0], grid[1], head_size) for seq in x])
    else:
        shifted = torch.stack([shift_text(seq, head_size) for seq in x])
    delta = shifted - x
    return delta, torch.stack([x + delta * m for m in maa])


def reference_group_norm_gate(y, gate, weight, bias, groups, eps):
    y, gate, weight, bias = (t.double() for t in (y, gate, weight, bias))
    rows, dim = y.shape
    grouped = y.view(rows, groups, dim // groups)
    mean = grouped.mean(-1, keepdim=True)
    var = ((grouped - mean) ** 2).mean(-1, keepdim=True)
    return ((grouped - mean) / torch.sqrt(var + eps)).view(rows, dim) * weight * gate + bias * gate


# (batch, grid, offsets, head_size, channels)
SHIFT_CASES = [
    (2, (3, 5), Q_SHIFT, 8, 16),
    (1, (7, 7), Q_SHIFT, 20, 40),
    (3, (1, 1), Q_SHIFT, 4, 8),
    (1, (2, 9), Q_SHIFT, 80, 160),
    (2, (1, 9), B_SHIFT, 8, 24),
    (1, (1, 1), B_SHIFT, 2, 4),
    (1, (1, 77), B_SHIFT, 64, 128),
]


def _shift_inputs(batch, grid, channels, mixes, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, grid[0] * grid[1], channels, generator=g, dtype=torch.float64) * scale
    maa = torch.rand(mixes, channels, generator=g, dtype=torch.float64) * 2 - 0.5
    return x.to(dtype), maa.to(dtype)


@pytest.mark.parametrize("case", SHIFT_CASES)
@pytest.mark.parametrize("mixes", [1, 2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_token_shift_mix_kernel_matches_reference(built, case, mixes, dtype):
    batch, grid, offsets, head_size, channels = case
    x, maa = _shift_inputs(batch, grid, channels, mixes, dtype)
    ref_delta, ref_mixed = reference_shift_mix(x, maa, grid, offsets, head_size)
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    for with_delta in (True, False):
        delta, mixed = built.token_shift_mix(x, maa, grid, offsets, head_size, with_delta)
        assert mixed.shape == (mixes, batch, grid[0] * grid[1], channels) and mixed.dtype == dtype
        assert rel_err(mixed, ref_mixed) <= tol
        if with_delta:
            assert rel_err(delta, ref_delta) <= tol
        else:
            assert delta.numel() == 0
    # the composition (the fallback) agrees as well
    delta, mixed = block.token_shift_mix(x, maa, grid, offsets, head_size, backend="torch")
    assert rel_err(delta, ref_delta) <= tol and rel_err(mixed, ref_mixed) <= tol


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_token_shift_mix_extreme_magnitudes(built, scale):
    x, maa = _shift_inputs(2, (4, 3), 16, 3, torch.float32, seed=3, scale=scale)
    _, ref_mixed = reference_shift_mix(x, maa, (4, 3), Q_SHIFT, 8)
    _, mixed = built.token_shift_mix(x, maa, (4, 3), Q_SHIFT, 8, False)
    assert torch.isfinite(mixed).all()
    assert rel_err(mixed, ref_mixed) <= 1e-6


def _shift_mix_grads(fn, x, maa, grid, offsets, head_size, with_delta, weights):
    """Gradients of sum(delta * weights[0]) (with_delta) + sum(mixed * weights[1]) w.r.t. (x, maa) through `fn`."""
    inputs = (x.clone().requires_grad_(), maa.clone().requires_grad_())
    delta, mixed = fn(*inputs)
    loss = (mixed * weights[1]).sum() + ((delta * weights[0]).sum() if with_delta else 0)
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("case", SHIFT_CASES)
@pytest.mark.parametrize("mixes", [1, 2, 5])
@pytest.mark.parametrize("with_delta", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_token_shift_mix_backward_kernel_matches_reference(built, case, mixes, with_delta, dtype):
    # the fused backward pass (token_shift_mix_backward), against autograd through the float64 token-by-token
    # reference: every grid edge, shift group and number of interpolations
    assert hasattr(built, "token_shift_mix_backward")
    batch, grid, offsets, head_size, channels = case
    x, maa = _shift_inputs(batch, grid, channels, mixes, torch.float64, seed=mixes)
    g = torch.Generator().manual_seed(7)
    weights = (
        torch.randn(x.shape, generator=g, dtype=torch.float64),
        torch.randn((mixes,) + x.shape, generator=g, dtype=torch.float64),
    )
    expected = _shift_mix_grads(
        lambda x_, maa_: reference_shift_mix(x_, maa_, grid, offsets, head_size),
        x,
        maa,
        grid,
        offsets,
        head_size,
        with_delta,
        weights,
    )
    actual = _shift_mix_grads(
        lambda x_, maa_: block.token_shift_mix(x_, maa_, grid, offsets, head_size, True, backend="kernel"),
        x.to(dtype),
        maa.to(dtype),
        grid,
        offsets,
        head_size,
        with_delta,
        tuple(w.to(dtype) for w in weights),
    )
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    for ours, theirs in zip(actual, expected):
        assert ours.dtype == dtype
        assert rel_err(ours, theirs) <= tol


@pytest.mark.parametrize("case", [SHIFT_CASES[0], SHIFT_CASES[4]])
@pytest.mark.parametrize("with_delta", [True, False])
def test_token_shift_mix_backward(built, case, with_delta):
    batch, grid, offsets, head_size, channels = case
    x, maa = _shift_inputs(batch, grid, channels, 3, torch.float64, seed=1)

    def fused(x_, maa_):
        delta, mixed = block.token_shift_mix(x_, maa_, grid, offsets, head_size, with_delta, backend="kernel")
        return (delta, mixed) if with_delta else mixed

    inputs = (x.clone().requires_grad_(), maa.clone().requires_grad_())
    assert torch.autograd.gradcheck(fused, inputs)


class _WithoutFusedBackward:
    """A kernel module as published before the fused backward passes: the forward ops only."""

    def __init__(self, module):
        self._module = module
        self.asked = []

    def __getattr__(self, name):
        self.asked.append(name)
        if name.endswith("_backward"):
            raise AttributeError(name)
        return getattr(self._module, name)


def test_token_shift_mix_backward_of_older_builds_recomputes(built, monkeypatch):
    # a build with the forward but not the backward pass differentiates the composition instead: same gradients
    batch, grid, offsets, head_size, channels = SHIFT_CASES[1]
    x, maa = _shift_inputs(batch, grid, channels, 2, torch.float64, seed=3)
    weights = (torch.randn_like(x), torch.randn((2,) + x.shape, dtype=torch.float64))

    def fused(x_, maa_):
        return block.token_shift_mix(x_, maa_, grid, offsets, head_size, True, backend="kernel")

    new = _shift_mix_grads(fused, x, maa, grid, offsets, head_size, True, weights)
    older = _WithoutFusedBackward(built)
    monkeypatch.setattr(block, "kernel_module", lambda key: older)
    old = _shift_mix_grads(fused, x, maa, grid, offsets, head_size, True, weights)
    assert "token_shift_mix" in older.asked and "token_shift_mix_backward" in older.asked
    for a, b in zip(new, old):
        assert rel_err(a, b) <= 1e-13


@pytest.mark.parametrize("rows, channels, groups", [(1, 8, 1), (7, 16, 2), (33, 160, 2), (5, 640, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_group_norm_gate_kernel_matches_reference(built, rows, channels, groups, dtype):
    g = torch.Generator().manual_seed(rows)
    y, gate = (torch.randn(rows, channels, generator=g, dtype=torch.float64) for _ in range(2))
    y = y * 3 + 5  # a mean far from zero: the variance must not cancel
    weight, bias = (torch.randn(channels, generator=g, dtype=torch.float64) for _ in range(2))
    expected = reference_group_norm_gate(y, gate, weight, bias, groups, 1e-5 * 64)
    args = [t.to(dtype) for t in (y, gate, weight, bias)]
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    assert rel_err(built.group_norm_gate(*args, groups, 1e-5 * 64), expected) <= tol
    assert rel_err(block.group_norm_gate(*args, groups, 1e-5 * 64, backend="torch"), expected) <= tol


@pytest.mark.parametrize("rows, channels, groups", [(1, 8, 1), (7, 16, 2), (33, 160, 2), (2000, 640, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_group_norm_gate_backward_kernel_matches_reference(built, rows, channels, groups, dtype):
    # the fused backward pass (group_norm_gate_backward) against autograd through the float64 reference, every
    # input's gradient; 2000 rows run in more than one task (weight / bias partial sums)
    assert hasattr(built, "group_norm_gate_backward")
    g = torch.Generator().manual_seed(rows)
    y, gate, grad = (torch.randn(rows, channels, generator=g, dtype=torch.float64) for _ in range(3))
    y = y * 3 + 5  # a mean far from zero
    weight, bias = (torch.randn(channels, generator=g, dtype=torch.float64) for _ in range(2))
    ref_inputs = [t.clone().requires_grad_() for t in (y, gate, weight, bias)]
    expected = torch.autograd.grad(reference_group_norm_gate(*ref_inputs, groups, 1e-5 * 64), ref_inputs, grad)
    inputs = [t.to(dtype).requires_grad_() for t in (y, gate, weight, bias)]
    out = block.group_norm_gate(*inputs, groups, 1e-5 * 64, backend="kernel")
    actual = torch.autograd.grad(out, inputs, grad.to(dtype))
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    for name, ours, theirs in zip(("y", "gate", "weight", "bias"), actual, expected):
        assert ours.dtype == dtype, name
        assert rel_err(ours, theirs) <= tol, name


def test_group_norm_gate_backward_of_older_builds_recomputes(built, monkeypatch):
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((9, 24), (9, 24), (24,), (24,))]
    grad = torch.randn(9, 24, generator=g, dtype=torch.float64)

    def grads():
        inputs = [t.clone().requires_grad_() for t in tensors]
        return torch.autograd.grad(block.group_norm_gate(*inputs, 3, 1e-3, backend="kernel"), inputs, grad)

    new = grads()
    older = _WithoutFusedBackward(built)
    monkeypatch.setattr(block, "kernel_module", lambda key: older)
    old = grads()
    assert "group_norm_gate" in older.asked and "group_norm_gate_backward" in older.asked
    for a, b in zip(new, old):
        assert rel_err(a, b) <= 1e-13


def test_group_norm_gate_backward(built):
    g = torch.Generator().manual_seed(0)
    inputs = tuple(
        torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()
        for shape in ((6, 12), (6, 12), (12,), (12,))
    )
    assert torch.autograd.gradcheck(lambda *t: block.group_norm_gate(*t, 3, 1e-3, backend="kernel"), inputs)


def test_kernel_rejects_bad_input_with_a_clear_message(built):
    x = torch.randn(1, 6, 16)
    maa = torch.randn(2, 16)
    with pytest.raises(RuntimeError, match="grid does not hold 6 tokens"):
        built.token_shift_mix(x, maa, (2, 2), Q_SHIFT, 8)
    with pytest.raises(RuntimeError, match="head_size 6 must divide"):
        built.token_shift_mix(x, maa, (2, 3), Q_SHIFT, 6)
    with pytest.raises(RuntimeError, match="maa must be"):
        built.token_shift_mix(x, torch.randn(2, 8), (2, 3), Q_SHIFT, 8)
    with pytest.raises(RuntimeError, match="groups do not divide"):
        built.group_norm_gate(torch.randn(2, 10), torch.randn(2, 10), torch.ones(10), torch.zeros(10), 3, 1e-5)


class _Counting:
    """A kernel module stand-in that counts fused calls and forwards them to the real build."""

    def __init__(self, module, ops=("token_shift_mix", "group_norm_gate")):
        self.calls = []
        for op in ops:
            setattr(self, op, self._wrap(op, getattr(module, op)))

    def _wrap(self, name, fn):
        def call(*args):
            self.calls.append(name)
            return fn(*args)

        return call


def _count_fused(monkeypatch, built, ops=("token_shift_mix", "group_norm_gate")):
    counting = _Counting(built, ops)
    monkeypatch.setattr(block, "kernel_module", lambda key: counting)
    return counting


def test_backend_choice_and_fallbacks(built, monkeypatch):
    x, maa = _shift_inputs(1, (3, 3), 16, 2, torch.float32)
    expected = block.token_shift_mix(x, maa, (3, 3), Q_SHIFT, 8, backend="torch")
    counting = _count_fused(monkeypatch, built)
    for backend, fused in (("auto", True), ("kernel", True), ("torch", False), ("triton", False)):
        counting.calls.clear()
        delta, mixed = block.token_shift_mix(x, maa, (3, 3), Q_SHIFT, 8, backend=backend)
        assert counting.calls == (["token_shift_mix"] if fused else []), backend
        assert rel_err(mixed, expected[1].double()) <= 1e-6
    # dtypes the kernel does not take run the composition, exactly
    counting.calls.clear()
    bf16 = (x.bfloat16(), maa.bfloat16())
    delta, mixed = block.token_shift_mix(*bf16, (3, 3), Q_SHIFT, 8, backend="auto")
    assert counting.calls == []
    assert torch.equal(mixed, block.token_shift_mix(*bf16, (3, 3), Q_SHIFT, 8, backend="torch")[1])
    # a kernel build that predates the block ops (Bi-WKV only) is still used for Bi-WKV, the block ops fall back
    old_build = _count_fused(monkeypatch, built, ops=())
    delta, mixed = block.token_shift_mix(x, maa, (3, 3), Q_SHIFT, 8, backend="kernel")
    assert old_build.calls == [] and torch.equal(mixed, expected[1])


def _models():
    config = tiny_config()
    model = randomize_(RWKVCLIPModel(config)).eval()
    reference = randomize_(RWKVCLIPModel(config)).double().eval()
    return model, reference


def test_model_paths_agree_with_float64(built, monkeypatch):
    """The whole model with the fused kernels, with and without autograd (the in-place inference path), against
    the float64 model on the PyTorch path."""
    model, reference = _models()
    reference.set_kernel_backend("torch")
    inputs = {
        "input_ids": torch.tensor([[BOS, 5, 9, 3, EOS], [BOS, 7, EOS, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
        "pixel_values": torch.randn(2, 3, 40, 32),
    }
    with torch.no_grad():
        expected = reference(**{k: v.double() if v.is_floating_point() else v for k, v in inputs.items()})
    counting = _count_fused(monkeypatch, built)
    for backend in ("kernel", "torch"):
        model.set_kernel_backend(backend)
        for grad in (False, True):
            counting.calls.clear()
            with torch.set_grad_enabled(grad):
                out = model(**inputs)
            assert bool(counting.calls) == (backend == "kernel")
            for name in ("text_embeds", "image_embeds"):
                assert rel_err(out[name].detach(), expected[name]) <= 1e-5, (backend, grad, name)


def test_model_gradients_agree_between_paths(built):
    """float64 gradients of every parameter through the fused kernels equal those through the PyTorch path."""
    model = randomize_(RWKVCLIPModel(tiny_config())).double().train()
    inputs = {
        "input_ids": torch.tensor([[BOS, 5, 9, EOS], [BOS, 7, 2, EOS]]),
        "pixel_values": torch.randn(2, 3, 32, 32, dtype=torch.float64),
        "return_loss": True,
    }
    grads = {}
    for backend in ("kernel", "torch"):
        model.set_kernel_backend(backend)
        model.zero_grad()
        model(**inputs).loss.backward()
        grads[backend] = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert grads["kernel"].keys() == grads["torch"].keys() and grads["kernel"]
    for name, grad in grads["kernel"].items():
        assert rel_err(grad, grads["torch"][name]) <= 1e-10, name


def test_compile_traces_the_composition(built):
    """Under torch.compile the ops trace their PyTorch composition (no graph break on the fused kernel)."""
    x, maa = _shift_inputs(1, (3, 3), 16, 2, torch.float32)

    def fn(x_, maa_):
        delta, mixed = block.token_shift_mix(x_, maa_, (3, 3), Q_SHIFT, 8, backend="auto")
        gate = torch.sigmoid(mixed[0].reshape(9, 16))
        return block.group_norm_gate(mixed[1].reshape(9, 16), gate, maa_[0], maa_[1], 2, 1e-5, backend="auto")

    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    assert rel_err(compiled(x, maa), fn(x, maa).double()) <= 1e-6


@pytest.mark.parametrize("chunk_rows", [1, 7, 1024])
def test_channel_mix_row_chunks_without_autograd(chunk_rows):
    """Without autograd the channel mix runs long inputs in chunks of rows: the same values as the unchunked
    autograd path and the float64 model."""
    model, reference = _models()
    reference.set_kernel_backend("torch")
    for module in model.modules():
        if hasattr(module, "max_chunk_rows"):
            module.max_chunk_rows = chunk_rows
    pixel_values = torch.randn(3, 3, 40, 32)  # 3 x 20 = 60 rows per channel mix
    with torch.no_grad():
        chunked = model.vision_model(pixel_values=pixel_values).last_hidden_state
        expected = reference.vision_model(pixel_values=pixel_values.double()).last_hidden_state
    plain = model.vision_model(pixel_values=pixel_values).last_hidden_state.detach()
    assert rel_err(chunked, plain.double()) <= 1e-6
    assert rel_err(chunked, expected) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_squared_relu_backward(dtype):
    # relu(x) ** 2 with its one-product backward: the same values and gradients as autograd through the
    # composition (bitwise: 2 * relu(x) * g either way), zeros included, and gradcheck in float64
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 40, generator=g, dtype=torch.float64).to(dtype)
    x[0, 0, :4] = 0.0  # the kink
    weight = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)
    ours_in, theirs_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, theirs = block.squared_relu(ours_in), torch.relu(theirs_in).square()
    assert torch.equal(ours, theirs) and ours.grad_fn is not None and "SquaredReLU" in type(ours.grad_fn).__name__
    (grad_ours,) = torch.autograd.grad((ours * weight).sum(), ours_in)
    (grad_theirs,) = torch.autograd.grad((theirs * weight).sum(), theirs_in)
    assert torch.equal(grad_ours, grad_theirs)
    assert torch.equal(grad_ours, 2 * torch.relu(x) * weight)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(block.squared_relu, (x.clone().requires_grad_(),))
    with torch.no_grad():
        assert torch.equal(block.squared_relu(x), torch.relu(x).square())
