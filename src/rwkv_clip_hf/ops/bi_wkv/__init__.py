"""The bidirectional WKV operator of RWKV-CLIP (Bi-WKV).

For each batch element and head, with `r, k, v, w` of shape `(T, N)`, `u` of shape `(N,)` and the per-step
decay `d_t = exp(-exp(w_t))`:

    y_t = sum_{i<t} r_t . (prod_{i<j<t} d_j * k_i) v_i
        + r_t . (u * k_t) v_t
        + sum_{i>t} r_t . (prod_{t<j<i} d_j * k_i) v_i

(the decay between two tokens excludes both endpoints). Tensors in, tensors out: the op knows nothing
about modules or configs.

Paths:
    * `naive_bi_wkv`: two explicit recurrences, a loop over tokens (reference, slow).
    * `chunk_bi_wkv`: chunked, linear time, exact and overflow-free for any decay (the PyTorch path).
    * the prebuilt kernel (CPU and CUDA, `cuda/` in the repository), loaded from the kernel hub by `kernel.py`.
    * `triton_op.triton_bi_wkv`: Triton kernels for GPUs (NVIDIA, AMD, Intel), and for CPU tensors under the
      Triton interpreter (`TRITON_INTERPRET=1`); `backend="triton"`.
"""

import torch

from .chunk import DEFAULT_CHUNK_SIZE, chunk_bi_wkv
from .kernel import BACKENDS, KernelUnavailableError, check_backend, default_backend, kernel_module, resolve_kernel
from .naive import naive_bi_wkv
from .triton_op import triton_available


def bi_wkv(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    backend: str = "torch",
    kernel_repo: str | None = None,
) -> torch.Tensor:
    """Bidirectional WKV.

    Args:
        r, k, v, w: `(batch, seq_len, heads, head_size)`. `w` is log(-log(decay)).
        u: `(heads, head_size)`, the bonus of the current token.
        chunk_size: tokens per chunk of the chunked path (a speed knob; results do not depend on it
            beyond float rounding).
        backend: `"torch"` (the chunked PyTorch path), `"kernel"` (the prebuilt kernel; raises
            `KernelUnavailableError` when it cannot be loaded for the tensors' device) or `"auto"` (the kernel
            when it loads; else, on a GPU where triton runs, the Triton kernels; else the PyTorch path, logging
            the reason once). Float64 inputs always take the PyTorch path under `"auto"` (the CUDA kernel
            computes in float32). `"triton"`: the Triton kernels
            (`triton_op.triton_bi_wkv`; float32, bfloat16 and float16 inputs; raises when triton cannot run on
            the tensors' device, see `triton_op.triton_available`).
        kernel_repo: kernel-hub repo id of the kernel (default: $RWKV_CLIP_BI_WKV_KERNEL_REPO or
            `kernel.DEFAULT_KERNEL_REPO`).

    Returns:
        `(batch, seq_len, heads, head_size)` in the dtype of `r`, computed in float32 (float64 when an
        input is float64) whatever the input dtype, with autocast disabled.
    """
    if r.dim() != 4:
        raise ValueError(f"bi_wkv expects r of shape (batch, seq_len, heads, head_size), got {tuple(r.shape)}")
    for name, tensor in (("k", k), ("v", v), ("w", w)):
        if tensor.shape != r.shape:
            raise ValueError(f"bi_wkv: {name} has shape {tuple(tensor.shape)}, expected {tuple(r.shape)} like r")
    if u.shape != r.shape[2:]:
        raise ValueError(f"bi_wkv: u has shape {tuple(u.shape)}, expected (heads, head_size) = {tuple(r.shape[2:])}")
    check_backend(backend, "bi_wkv: backend")
    if backend == "triton":
        from .triton_op import triton_bi_wkv

        return triton_bi_wkv(r, k, v, w, u)
    if r.shape[1] == 0:
        return torch.zeros_like(r)
    float64 = torch.float64 in (r.dtype, k.dtype, v.dtype, w.dtype, u.dtype)
    if backend == "kernel" or (backend == "auto" and not float64):
        key = resolve_kernel(r.device.type, backend, kernel_repo)
        if key:
            return kernel_module(key).bi_wkv(r, k, v, w, u)
        if backend == "auto" and r.device.type != "cpu" and triton_available(r.device.type):
            # a GPU without the compiled CUDA variant: the Triton kernel (the interpreter on CPU is for tests only)
            from .triton_op import triton_bi_wkv

            return triton_bi_wkv(r, k, v, w, u)
    return chunk_bi_wkv(r, k, v, w, u, chunk_size=chunk_size)


__all__ = [
    "bi_wkv",
    "chunk_bi_wkv",
    "naive_bi_wkv",
    "DEFAULT_CHUNK_SIZE",
    "BACKENDS",
    "KernelUnavailableError",
    "check_backend",
    "default_backend",
]
