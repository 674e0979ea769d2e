"""The Triton Bi-WKV (ops/bi_wkv/triton_op.py) against the float64 references.

Without a GPU the kernels run on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set by
conftest.py before triton is first imported): slow, so the shapes are small and the larger cases are marked slow.
With a GPU (and TRITON_INTERPRET unset) the same tests run the compiled kernels on it (`make gpu-check`).
"""

import os

import pytest
import torch

from rwkv_clip_hf.ops.bi_wkv import bi_wkv, chunk_bi_wkv, naive_bi_wkv
from rwkv_clip_hf.ops.bi_wkv.triton_op import triton_available, triton_bi_wkv

from test_bi_wkv import make_inputs, rel_err

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
pytestmark = pytest.mark.skipif(not triton_available(DEVICE), reason=f"triton cannot run on {DEVICE} here")


def run(*xs):
    return bi_wkv(*xs, backend="triton")


# (seq_len, head_size, decay): one and two tokens, partial chunks (49, 77), several chunks (130), head sizes 16,
# 64 and 80 (80: two blocks of value channels, padded head), and every decay regime
FORWARD_CASES = [
    (1, 16, "mixed"),
    (2, 64, "spikes"),
    (49, 80, "mixed"),
    (77, 64, "spikes"),
    (130, 16, "mixed"),
    (40, 16, "full"),
    (40, 16, "none"),
    (33, 16, "trained"),
]
SLOW_FORWARD_CASES = [(196, 64, "mixed"), (130, 80, "spikes"), (577, 16, "mixed"), (77, 128, "mixed")]


def _forward_case(seq_len, size, decay):
    r, k, v, w, u = make_inputs(1, seq_len, 2, size, decay, seed=seq_len + size)
    reference = naive_bi_wkv(r, k, v, w, u)  # float64, checked against the definition in test_bi_wkv.py
    y = run(*(x.float().to(DEVICE) for x in (r, k, v, w, u)))
    assert y.dtype == torch.float32 and y.shape == r.shape
    assert rel_err(y.cpu(), reference) <= 1e-5


@pytest.mark.parametrize("seq_len,size,decay", FORWARD_CASES)
def test_forward_against_float64_reference(seq_len, size, decay):
    _forward_case(seq_len, size, decay)


@pytest.mark.slow
@pytest.mark.parametrize("seq_len,size,decay", SLOW_FORWARD_CASES)
def test_forward_against_float64_reference_larger(seq_len, size, decay):
    _forward_case(seq_len, size, decay)


GRADIENT_CASES = [(1, 16, "mixed"), (2, 16, "mixed"), (49, 16, "spikes"), (20, 80, "mixed"), (40, 16, "full")]
SLOW_GRADIENT_CASES = [(77, 64, "mixed"), (130, 80, "spikes"), (49, 16, "none"), (77, 16, "trained")]


def _gradient_case(seq_len, size, decay):
    """Gradients of every input against autograd through the float64 chunked PyTorch path."""
    inputs = make_inputs(1, seq_len, 2, size, decay, seed=seq_len * size)
    grad_y = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(seq_len), dtype=torch.float64)
    leaves64 = [x.clone().requires_grad_() for x in inputs]
    chunk_bi_wkv(*leaves64).backward(grad_y)
    leaves = [x.float().to(DEVICE).requires_grad_() for x in inputs]
    run(*leaves).backward(grad_y.float().to(DEVICE))
    for name, x, x64 in zip("rkvwu", leaves, leaves64):
        assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all(), name
        expected = x64.grad
        if not expected.any():  # e.g. dw when every decay is exactly zero
            assert x.grad.abs().max().item() == 0.0, name
            continue
        assert rel_err(x.grad.cpu(), expected) <= 1e-5, name


@pytest.mark.parametrize("seq_len,size,decay", GRADIENT_CASES)
def test_gradients_against_float64_chunked_path(seq_len, size, decay):
    _gradient_case(seq_len, size, decay)


@pytest.mark.slow
@pytest.mark.parametrize("seq_len,size,decay", SLOW_GRADIENT_CASES)
def test_gradients_against_float64_chunked_path_larger(seq_len, size, decay):
    _gradient_case(seq_len, size, decay)


def test_decays_beyond_the_model_range_stay_exact():
    """w far outside [-20, 10] (decay exactly 0, or 1 to float precision): exact zeros where nothing passes,
    finite gradients, and the float64 result; the gradient of w where the decay is exactly 0 is exactly 0."""
    r, k, v, w, u = make_inputs(1, 35, 1, 16, "mixed", seed=5)
    g = torch.Generator().manual_seed(6)
    w = torch.where(torch.rand(w.shape, generator=g, dtype=torch.float64) < 0.5, 100.0, -40.0)
    w[:, 17] = 100.0  # a chunk-crossing reset inside the second chunk
    leaves64 = [x.clone().requires_grad_() for x in (r, k, v, w, u)]
    y64 = chunk_bi_wkv(*leaves64)
    y64.sum().backward()
    leaves = [x.float().to(DEVICE).requires_grad_() for x in (r, k, v, w, u)]
    y = run(*leaves)
    y.sum().backward()
    assert rel_err(y.detach().cpu(), naive_bi_wkv(r, k, v, w, u)) <= 1e-5
    for name, x, x64 in zip("rkvwu", leaves, leaves64):
        assert torch.isfinite(x.grad).all(), name
        assert rel_err(x.grad.cpu(), x64.grad) <= 1e-5, name
    assert (leaves[3].grad.cpu()[w >= 80] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_in_float32(dtype):
    r, k, v, w, u = make_inputs(1, 20, 2, 16, "trained", seed=2)
    half = [x.to(DEVICE, dtype) for x in (r, k, v, w, u)]
    y = run(*half)
    assert y.dtype == dtype
    # exactly the float32 computation on the (rounded) half inputs, rounded once at the end
    torch.testing.assert_close(y, run(*(x.float() for x in half)).to(dtype), rtol=0, atol=0)
    assert rel_err(y.float().cpu(), naive_bi_wkv(*(x.double().cpu() for x in half))) <= 1e-2
    leaves = [x.detach().requires_grad_() for x in half]
    run(*leaves).float().sum().backward()
    assert all(x.grad.dtype == dtype and torch.isfinite(x.grad).all() for x in leaves)


def test_autocast_is_disabled_inside():
    r, k, v, w, u = (x.float().to(DEVICE) for x in make_inputs(1, 20, 1, 16, "mixed", seed=8))
    with torch.autocast(device_type=DEVICE, dtype=torch.bfloat16):
        y = run(r, k, v, w, u)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, run(r, k, v, w, u), rtol=0, atol=0)


def test_opcheck():
    """torch.library.opcheck of the forward op (with its autograd) and of the backward op."""
    r, k, v, w, u = (x.float().to(DEVICE) for x in make_inputs(1, 5, 1, 16, "mixed", seed=9))
    leaves = [x.clone().requires_grad_() for x in (r, k, v, w, u)]
    torch.library.opcheck(torch.ops.rwkv_clip_hf.triton_bi_wkv.default, tuple(leaves))
    grad_y = torch.randn_like(r)
    torch.library.opcheck(torch.ops.rwkv_clip_hf.triton_bi_wkv_backward.default, (r, k, v, w, u, grad_y))


def test_bad_inputs_are_refused_clearly(monkeypatch):
    r, k, v, w, u = make_inputs(1, 4, 1, 16, "mixed", seed=0)
    with pytest.raises(ValueError, match=r"r is torch.float64.*backend='torch'"):
        triton_bi_wkv(r, k, v, w, u)
    r, k, v, w, u = (x.float().to(DEVICE) for x in (r, k, v, w, u))
    with pytest.raises(ValueError, match="u has shape"):
        triton_bi_wkv(r, k, v, w, u[:, :8])
    big = torch.zeros(1, 2, 1, 256, device=DEVICE)
    with pytest.raises(ValueError, match="head_size 256"):
        triton_bi_wkv(big, big, big, big, big[0, 0])
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert not triton_available("cpu")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 in the environment"):
            triton_bi_wkv(r, k, v, w, u)


def test_empty_sequence():
    r = torch.zeros(2, 0, 1, 16, device=DEVICE)
    assert run(r, r, r, r, torch.zeros(1, 16, device=DEVICE)).shape == r.shape
