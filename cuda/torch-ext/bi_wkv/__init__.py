"""Bi-WKV, the bidirectional WKV operator of RWKV-CLIP, as a prebuilt kernel (CPU and CUDA).

`bi_wkv(r, k, v, w, u)`: r, k, v, w of shape (batch, seq_len, heads, head_size), w = log(-log(decay)); u of
shape (heads, head_size). Computes in float32 (float64 for float64 inputs, CPU only) whatever the input
dtype and returns the dtype of r. Differentiable in every input; traceable by torch.compile (fake
implementations are registered below), and autocast leaves it alone.
"""

import torch

from ._ops import add_op_namespace_prefix, ops

__all__ = [
    "bi_wkv",
    "group_norm_gate",
    "group_norm_gate_backward",
    "ops",
    "token_shift_mix",
    "token_shift_mix_backward",
]


@torch.library.register_fake(add_op_namespace_prefix("forward"))
def _forward_fake(r, k, v, w, u):
    return torch.empty_like(r)


@torch.library.register_fake(add_op_namespace_prefix("backward"))
def _backward_fake(gy, r, k, v, w, u):
    return tuple(torch.empty_like(r) for _ in range(4)) + (torch.empty_like(u),)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, gy):
    r, k, v, w, u = ctx.saved_tensors
    return ops.backward(gy.to(r.dtype).contiguous(), r, k, v, w, u)


torch.library.register_autograd(add_op_namespace_prefix("forward"), _backward, setup_context=_setup_context)


def bi_wkv(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Bidirectional WKV; see the module docstring. Mixed input dtypes are computed from float32 copies."""
    out_dtype = r.dtype
    dtypes = (r.dtype, k.dtype, v.dtype, w.dtype)
    if torch.float64 in dtypes + (u.dtype,):
        dtype = torch.float64
    elif len(set(dtypes)) == 1:
        dtype = r.dtype
    else:
        dtype = torch.float32
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    r, k, v, w = (x.to(dtype).contiguous() for x in (r, k, v, w))
    return ops.forward(r, k, v, w, u.to(acc).contiguous()).to(out_dtype)


# The fused element-wise work of the RWKV-CLIP block (CPU; float32 and float64) and its backward passes: the
# model package (rwkv_clip_hf.ops.block) holds their PyTorch composition, autograd and fallbacks.


@torch.library.register_fake(add_op_namespace_prefix("token_shift_mix"))
def _token_shift_mix_fake(x, maa, grid_h, grid_w, offsets, head_size, with_delta):
    delta = torch.empty_like(x) if with_delta else x.new_empty(0)
    return delta, x.new_empty((maa.shape[0],) + tuple(x.shape))


@torch.library.register_fake(add_op_namespace_prefix("token_shift_mix_backward"))
def _token_shift_mix_backward_fake(grad_mixed, grad_delta, x, maa, grid_h, grid_w, offsets, head_size):
    return torch.empty_like(x), torch.empty_like(maa)


@torch.library.register_fake(add_op_namespace_prefix("group_norm_gate"))
def _group_norm_gate_fake(y, gate, weight, bias, groups, eps):
    return torch.empty_like(y)


@torch.library.register_fake(add_op_namespace_prefix("group_norm_gate_backward"))
def _group_norm_gate_backward_fake(grad, y, gate, weight, bias, groups, eps):
    return torch.empty_like(y), torch.empty_like(y), torch.empty_like(weight), torch.empty_like(bias)


def token_shift_mix(
    x: torch.Tensor,
    maa: torch.Tensor,
    grid_size: tuple[int, int],
    offsets: tuple[tuple[int, int], ...],
    head_size: int,
    with_delta: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """delta = shift(x) - x (an empty tensor unless `with_delta`) and mixed[j] = x + delta * maa[j]: x (B, T, C)
    contiguous float32 / float64 on a `grid_size` token grid, maa (M, C) of x's dtype; mixed is (M, B, T, C)."""
    flat = [int(value) for pair in offsets for value in pair]
    return ops.token_shift_mix(x, maa, int(grid_size[0]), int(grid_size[1]), flat, int(head_size), bool(with_delta))


def token_shift_mix_backward(
    grad_mixed: torch.Tensor,
    grad_delta: torch.Tensor | None,
    x: torch.Tensor,
    maa: torch.Tensor,
    grid_size: tuple[int, int],
    offsets: tuple[tuple[int, int], ...],
    head_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients (grad_x, grad_maa) of `token_shift_mix` from grad_mixed (M, B, T, C) and grad_delta (B, T, C,
    or None when delta was not used), contiguous, of x's dtype."""
    flat = [int(value) for pair in offsets for value in pair]
    return ops.token_shift_mix_backward(
        grad_mixed, grad_delta, x, maa, int(grid_size[0]), int(grid_size[1]), flat, int(head_size)
    )


def group_norm_gate(
    y: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float
) -> torch.Tensor:
    """GroupNorm(y) * gate for y, gate (rows, channels) contiguous float32 / float64; weight, bias (channels,)."""
    return ops.group_norm_gate(y, gate, weight, bias, int(groups), float(eps))


def group_norm_gate_backward(
    grad: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    groups: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients (grad_y, grad_gate, grad_weight, grad_bias) of `group_norm_gate` from grad (rows, channels),
    all contiguous, of y's dtype."""
    return ops.group_norm_gate_backward(grad, y, gate, weight, bias, int(groups), float(eps))
