"""The element-wise work of an RWKV-CLIP block around its matmuls: token shift with its interpolations, the
GroupNorm-times-gate of the token mix, the squared ReLU of the channel mix (docs/architecture.md sections 4-6).

Each op is its PyTorch composition, which is the definition and the fallback, and may run as one fused pass of
the prebuilt kernel package (`cuda/bi_wkv/block_cpu.cpp`; CPU, float32 and float64) chosen through the same
`backend` values and loading as Bi-WKV (`ops.bi_wkv.kernel`): "auto" and "kernel" use the fused pass when the
loaded kernel build has it, "torch" and "triton" never do. Under torch.compile the composition is traced (inductor
fuses it by itself). The fused passes are differentiable: their backward recomputes the composition from the
saved inputs and differentiates it, so both paths share one set of formulas; builds that have them run fused
backward passes instead (`token_shift_mix_backward`, `group_norm_gate_backward`: their formulas are written out in
`block_cpu.cpp` and tested against the composition's autograd). The squared ReLU of the channel mix is plain
PyTorch with a one-product backward.
"""

import torch
import torch.nn.functional as F

from .bi_wkv.kernel import kernel_module, resolve_kernel

_FUSED_DTYPES = (torch.float32, torch.float64)


def _source(offset: int, size: int) -> slice:
    return slice(max(offset, 0), size + min(offset, 0))


def _target(offset: int, size: int) -> slice:
    return slice(max(-offset, 0), size + min(-offset, 0))


def token_shift(
    hidden_states: torch.Tensor, grid_size: tuple[int, int], offsets: tuple[tuple[int, int], ...], head_size: int
) -> torch.Tensor:
    """Each token's neighbours, per channel group (docs/architecture.md section 4).

    Tokens `(batch, height * width, dim)` lie row-major on a `grid_size = (height, width)` grid (text: `(1, T)`).
    Each head's `head_size` channels are split into `len(offsets)` equal groups; group `g` of the output at
    `(row, col)` is the input at `(row + dy, col + dx)` for `(dy, dx) = offsets[g]`, zero outside the grid.
    """
    batch, seq_len, dim = hidden_states.shape
    height, width = grid_size
    groups = len(offsets)
    x = hidden_states.reshape(batch, height, width, dim // head_size, groups, head_size // groups)
    shifted = torch.zeros_like(x)
    for group, (dy, dx) in enumerate(offsets):
        shifted[:, _target(dy, height), _target(dx, width), :, group] = x[
            :, _source(dy, height), _source(dx, width), :, group
        ]
    return shifted.reshape(batch, seq_len, dim)


def _fused_kernel(op: str, backend: str, *tensors: torch.Tensor):
    """The loaded kernel module when `op` can run fused on these tensors, else None."""
    if backend not in ("auto", "kernel") or torch.compiler.is_compiling():
        return None
    if any(t is None for t in tensors):  # e.g. a GroupNorm without affine parameters
        return None
    first = tensors[0]
    if first.device.type != "cpu" or any(t.dtype != first.dtype or t.device != first.device for t in tensors):
        return None
    if first.dtype not in _FUSED_DTYPES:
        return None
    key = resolve_kernel("cpu", backend)
    if not key:
        return None
    module = kernel_module(key)
    # builds published before the block ops carry Bi-WKV only
    return module if hasattr(module, op) else None


def _shift_mix_composition(x, maa, grid_size, offsets, head_size):
    delta = token_shift(x, grid_size, offsets, head_size) - x
    return delta, torch.addcmul(x, delta, maa[:, None, None, :])


def _recompute_grads(composition, inputs, grads):
    """Gradients w.r.t. the tensor `inputs` that need them, by differentiating `composition(*inputs)`."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t for t in inputs]
        outputs = composition(*leaves)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        wanted = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor) and leaf.requires_grad]
        pairs = [(out, grad) for out, grad in zip(outputs, grads) if grad is not None and grad.numel()]
        found = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
    found = iter(found)
    return tuple(next(found) if isinstance(leaf, torch.Tensor) and leaf.requires_grad else None for leaf in leaves)


class _TokenShiftMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, maa, grid_size, offsets, head_size, with_delta, module):
        ctx.save_for_backward(x, maa)
        ctx.args = (grid_size, offsets, head_size)
        ctx.with_delta = with_delta
        ctx.module = module
        delta, mixed = module.token_shift_mix(x, maa, grid_size, offsets, head_size, with_delta)
        if not with_delta:
            ctx.mark_non_differentiable(delta)
        return delta, mixed

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_delta, grad_mixed):
        x, maa = ctx.saved_tensors
        grid_size, offsets, head_size = ctx.args
        grad_delta = grad_delta if ctx.with_delta else None
        if hasattr(ctx.module, "token_shift_mix_backward"):  # builds before it recompute the composition
            if grad_delta is not None:
                grad_delta = grad_delta.contiguous()
            return (
                ctx.module.token_shift_mix_backward(
                    grad_mixed.contiguous(), grad_delta, x, maa, grid_size, offsets, head_size
                )
                + (None,) * 5
            )
        grads = (grad_delta, grad_mixed)
        grad_x, grad_maa = _recompute_grads(
            lambda x_, maa_: _shift_mix_composition(x_, maa_, grid_size, offsets, head_size),
            (x, maa),
            grads,
        )
        return grad_x, grad_maa, None, None, None, None, None


def token_shift_mix(
    x: torch.Tensor,
    maa: torch.Tensor,
    grid_size: tuple[int, int],
    offsets: tuple[tuple[int, int], ...],
    head_size: int,
    with_delta: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """`delta = token_shift(x) - x` and the interpolations `mixed[j] = x + delta * maa[j]` in one pass.

    Args:
        x: `(batch, seq_len, dim)` tokens on the `grid_size` grid; `offsets` and `head_size` as in `token_shift`.
        maa: `(mixes, dim)` interpolation weights.
        with_delta: also return `delta` (else `None`).
        backend: `ops.bi_wkv.BACKENDS`; "auto" / "kernel" take the fused CPU pass when the kernel build has it.

    Returns:
        `(delta or None, mixed)` with `mixed` of shape `(mixes, batch, seq_len, dim)`.
    """
    module = _fused_kernel("token_shift_mix", backend, x, maa)
    if module is None:
        delta, mixed = _shift_mix_composition(x, maa, grid_size, offsets, head_size)
        return (delta if with_delta else None), mixed
    delta, mixed = _TokenShiftMix.apply(
        x.contiguous(), maa.contiguous(), tuple(grid_size), tuple(offsets), head_size, with_delta, module
    )
    return (delta if with_delta else None), mixed


def _group_norm_gate_composition(y, gate, weight, bias, groups, eps):
    return F.group_norm(y, groups, weight, bias, eps) * gate


class _GroupNormGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, gate, weight, bias, groups, eps, module):
        ctx.save_for_backward(y, gate, weight, bias)
        ctx.args = (groups, eps)
        ctx.module = module
        return module.group_norm_gate(y, gate, weight, bias, groups, eps)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        groups, eps = ctx.args
        if hasattr(ctx.module, "group_norm_gate_backward"):  # builds before it recompute the composition
            grads = ctx.module.group_norm_gate_backward(grad_out.contiguous(), *ctx.saved_tensors, groups, eps)
            return tuple(grads) + (None, None, None)
        grads = _recompute_grads(
            lambda *tensors: _group_norm_gate_composition(*tensors, groups, eps), ctx.saved_tensors, (grad_out,)
        )
        return grads + (None, None, None)


def group_norm_gate(
    y: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    groups: int,
    eps: float,
    backend: str = "auto",
) -> torch.Tensor:
    """`F.group_norm(y, groups, weight, bias, eps) * gate` for `y`, `gate` of shape `(rows, channels)`, in one pass
    when the fused CPU kernel runs (see `token_shift_mix` for `backend`)."""
    module = _fused_kernel("group_norm_gate", backend, y, gate, weight, bias)
    if module is None:
        return _group_norm_gate_composition(y, gate, weight, bias, groups, eps)
    return _GroupNormGate.apply(y.contiguous(), gate.contiguous(), weight, bias, groups, eps, module)


class _SquaredReLU(torch.autograd.Function):
    # d relu(x)^2 / dx = 2 relu(x): one product with the saved relu(x) (zero wherever x <= 0, so no mask either),
    # instead of autograd's pow(relu(x), 1) copy, two products and the ReLU's threshold pass; the same values
    @staticmethod
    def forward(ctx, x):
        activated = torch.relu(x)
        ctx.save_for_backward(activated)
        return activated.square()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (activated,) = ctx.saved_tensors
        return torch.mul(grad_out, activated).mul_(2)


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    """`relu(x) ** 2`, the channel mix's activation; with autograd, a backward of one product and no copies."""
    if torch.is_grad_enabled() and x.requires_grad and not torch.compiler.is_compiling():
        return _SquaredReLU.apply(x)
    return torch.relu(x).square()


__all__ = ["group_norm_gate", "squared_relu", "token_shift", "token_shift_mix"]
