"""Bi-WKV in Triton: one source for NVIDIA, AMD and Intel GPUs, and for CPU tensors under the Triton interpreter.

The algorithm is the chunked one of `chunk.py`, fused: one program per (batch, head, block of value channels)
walks the chunks of `BLOCK_T` tokens left to right and then right to left, carrying an `(N, BLOCK_V)` state in
each direction, so both directions are one kernel launch and nothing is flipped or copied.

* Inside a chunk, the decay between tokens i and t is `exp(sum of log-decays strictly between them)`, summed
  with `tl.cumsum` over a selection of exactly those tokens (a column of the chunk at a time), never as the
  difference of two running sums; the scores of the chunk form a `BLOCK_T x BLOCK_T` tile that multiplies the
  values with `tl.dot`.
* Across chunks the states are updated with `tl.dot`, and the decays from a chunk edge to a token are again
  cumulative sums over the tokens in between only.

Every exponent is <= 0, so nothing overflows for any decay: w from -20 (no forgetting) to +10 (decay exactly 0),
and beyond. The backward pass follows the same rule: each gradient of a log-decay is a sum of the contributions
of the token pairs whose interaction crosses that token, gathered with cumulative sums and 0/1 matmuls, never as
a difference; so strong decays give exact zeros rather than NaN or rounding noise. `dv` is the same operator
with `r` and `k` exchanged (the pairwise decay is symmetric), computed by the forward kernel.

Everything accumulates in float32 (matmuls with `input_precision="ieee"`: no TF32) whatever the input dtype
(float32, bfloat16, float16); float64 inputs are refused (the PyTorch path computes in float64).

The Triton interpreter (`TRITON_INTERPRET=1` in the environment before triton is imported, e.g. set before Python
starts) runs the same kernels on CPU tensors, slowly: that is how the tests check them without a GPU.
"""

import functools
import importlib.util
import os
import sys

import torch

# the torch.library namespace of the ops; cuda/build.py gives the kernel-hub copy of this file its own
OP_NAMESPACE = "rwkv_clip_hf"
BLOCK_T = 16  # tokens per chunk; tl.dot needs tiles of at least 16
MAX_HEAD_SIZE = 128
_MAX_LOG_RATE = 80.0  # as in chunk.py: w > 80 already means decay exactly 0, and exp stays finite


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    """TRITON_INTERPRET=1, and it was already set when triton was imported (triton's own jitted helpers, such as
    `tl.cdiv`, are interpreted only then; torch._dynamo imports triton early)."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    triton = sys.modules.get("triton")
    if triton is None:
        return True
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(triton.language.standard.cdiv, InterpretedFunction)


def triton_available(device_type: str) -> bool:
    """Whether `triton_bi_wkv` can run on tensors of `device_type`: triton is installed and either a GPU of
    that type is present ("cuda" also covers ROCm, "xpu" Intel GPUs) or, for "cpu", the Triton interpreter is
    on (`TRITON_INTERPRET=1`). Imports nothing but torch."""
    if not _triton_installed():
        return False
    if device_type == "cpu":
        return _interpreting()
    if device_type == "cuda":
        return torch.cuda.is_available()
    if device_type == "xpu":
        return hasattr(torch, "xpu") and torch.xpu.is_available()
    return False


@functools.cache
def _kernels():
    """triton and the jitted kernels, imported on first use so that importing this module never imports triton."""
    try:  # (a try block: transformers' remote-code import check does not require triton for the model)
        import triton

        from .triton_kernels import backward_kernel, forward_kernel
    except ImportError as error:
        raise RuntimeError(f"triton_bi_wkv: triton cannot be imported: {error}") from error
    return triton, forward_kernel, backward_kernel


def _blocks(head_size: int) -> tuple[int, int]:
    block_n = max(16, 1 << (head_size - 1).bit_length())
    return block_n, min(block_n, 64)


def _check(r, k, v, w, u) -> None:
    if r.dim() != 4:
        raise ValueError(f"triton_bi_wkv expects r of shape (batch, seq_len, heads, head_size), got {tuple(r.shape)}")
    for name, tensor in (("k", k), ("v", v), ("w", w)):
        if tensor.shape != r.shape:
            raise ValueError(f"triton_bi_wkv: {name} has shape {tuple(tensor.shape)}, expected {tuple(r.shape)}")
    if u.shape != r.shape[2:]:
        raise ValueError(f"triton_bi_wkv: u has shape {tuple(u.shape)}, expected {tuple(r.shape[2:])}")
    head_size = r.shape[-1]
    if head_size > MAX_HEAD_SIZE:
        raise ValueError(f"triton_bi_wkv: head_size {head_size} is above the supported {MAX_HEAD_SIZE}")
    for name, tensor in (("r", r), ("k", k), ("v", v), ("w", w), ("u", u)):
        if tensor.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(
                f"triton_bi_wkv: {name} is {tensor.dtype}; the Triton path takes float32, bfloat16 and float16 "
                "(float64: use backend='torch')"
            )
        if tensor.device != r.device:
            raise ValueError(f"triton_bi_wkv: {name} is on {tensor.device}, r on {r.device}")
    if not triton_available(r.device.type):
        reason = (
            "triton is not installed"
            if not _triton_installed()
            else "CPU tensors need the Triton interpreter: TRITON_INTERPRET=1 in the environment before triton is "
            "imported (before Python starts)"
            if r.device.type == "cpu"
            else f"no Triton backend for {r.device.type} tensors"
        )
        raise RuntimeError(f"triton_bi_wkv: cannot run on {r.device.type} tensors: {reason}")


def _forward(r, k, v, w, u) -> torch.Tensor:
    """float32 output of the forward kernel (contiguous inputs of any supported dtype)."""
    triton, forward_kernel, _ = _kernels()
    batch, seq_len, heads, head_size = r.shape
    block_n, block_v = _blocks(head_size)
    y = torch.empty(r.shape, dtype=torch.float32, device=r.device)
    grid = (triton.cdiv(head_size, block_v), batch * heads)
    with torch.device(r.device):
        forward_kernel[grid](
            r, k, v, w, u, y, seq_len, heads, head_size, BLOCK_T=BLOCK_T, BLOCK_N=block_n, BLOCK_V=block_v
        )
    return y


@torch.library.custom_op(f"{OP_NAMESPACE}::triton_bi_wkv", mutates_args=())
def _triton_bi_wkv_op(
    r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    args = [x.contiguous() for x in (r, k, v, w, u)]
    if r.shape[1] == 0 or r.numel() == 0:
        return torch.zeros_like(r)
    return _forward(*args).to(r.dtype)


@_triton_bi_wkv_op.register_fake
def _(r, k, v, w, u):
    return torch.empty_like(r, memory_format=torch.contiguous_format)


@torch.library.custom_op(f"{OP_NAMESPACE}::triton_bi_wkv_backward", mutates_args=())
def _triton_bi_wkv_backward_op(
    r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor, grad_y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `triton_bi_wkv` for r, k, v, w, u (in their dtypes)."""
    r_, k_, v_, w_, u_, dy = (x.contiguous() for x in (r, k, v, w, u, grad_y))
    batch, seq_len, heads, head_size = r.shape
    if seq_len == 0 or r.numel() == 0:
        return tuple(torch.zeros_like(x) for x in (r, k, v, w, u))
    triton, _, backward_kernel = _kernels()
    block_n, block_v = _blocks(head_size)
    num_v = triton.cdiv(head_size, block_v)
    num_chunks = triton.cdiv(seq_len, BLOCK_T)
    partial = torch.empty((3, num_v) + tuple(r.shape), dtype=torch.float32, device=r.device)
    saved = torch.empty(
        batch * heads * num_v * num_chunks * 2 * block_n * block_v, dtype=torch.float32, device=r.device
    )
    with torch.device(r.device):
        backward_kernel[(num_v, batch * heads)](
            r_, k_, v_, w_, u_, dy, partial[0], partial[1], partial[2], saved, seq_len, heads, head_size,
            BLOCK_T=BLOCK_T, BLOCK_N=block_n, BLOCK_V=block_v,
        )  # fmt: skip
    grad_r, grad_k, grad_log_decay = (partial[i].sum(0) for i in range(3))  # separate tensors, no views
    # the pairwise decay is symmetric: dv is the same operator with r and k exchanged, applied to dy
    grad_v = _forward(k_, r_, dy, w_, u_)
    w32 = w_.float()
    grad_w = torch.where(w32 <= _MAX_LOG_RATE, grad_log_decay * -torch.exp(w32.clamp(max=_MAX_LOG_RATE)), 0.0)
    y_dot_v = (dy.float() * v_.float()).sum(-1, keepdim=True)
    grad_u = (r_.float() * k_.float() * y_dot_v).sum((0, 1))
    return grad_r.to(r.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), grad_w.to(w.dtype), grad_u.to(u.dtype)


@_triton_bi_wkv_backward_op.register_fake
def _(r, k, v, w, u, grad_y):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (r, k, v, w, u))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_y):
    return _triton_bi_wkv_backward_op(*ctx.saved_tensors, grad_y)


_triton_bi_wkv_op.register_autograd(_backward, setup_context=_setup_context)


def triton_bi_wkv(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Bi-WKV with the Triton kernels (see `rwkv_clip_hf.ops.bi_wkv.bi_wkv` for the semantics), with autograd.

    Args:
        r, k, v, w: `(batch, seq_len, heads, head_size)`, float32 / bfloat16 / float16, head_size <= 128.
        u: `(heads, head_size)`.

    Returns:
        `(batch, seq_len, heads, head_size)` in the dtype of `r`, accumulated in float32 (autocast disabled).

    Raises:
        ValueError: shapes, dtypes or devices that do not fit.
        RuntimeError: triton cannot run on the tensors' device (see `triton_available`).
    """
    _check(r, k, v, w, u)
    with torch.autocast(device_type=r.device.type, enabled=False):
        return _triton_bi_wkv_op(r, k, v, w, u)
