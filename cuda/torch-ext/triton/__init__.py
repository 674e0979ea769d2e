"""Bi-WKV, the bidirectional WKV operator of RWKV-CLIP, in Triton: the noarch variants of the kernel (Python only;
one source for NVIDIA, AMD and Intel GPUs, wherever triton has a backend for torch's device).

`bi_wkv(r, k, v, w, u)`: r, k, v, w of shape (batch, seq_len, heads, head_size), w = log(-log(decay)); u of shape
(heads, head_size). float32, bfloat16 and float16 inputs, float32 accumulation, any seq_len, head_size <= 128;
returns the dtype of r. Differentiable in every input; the ops have fake implementations for torch.compile.
`available(device_type)` tells whether triton can run on tensors of that device here. Needs triton (GPU builds
of torch bring it).
"""

import torch

from .triton_op import OP_NAMESPACE, triton_available, triton_bi_wkv

__all__ = ["add_op_namespace_prefix", "available", "bi_wkv", "ops"]

ops = getattr(torch.ops, OP_NAMESPACE)
available = triton_available
bi_wkv = triton_bi_wkv


def add_op_namespace_prefix(op_name: str) -> str:
    """Prefix op by namespace."""
    return f"{OP_NAMESPACE}::{op_name}"
