"""Recurrent reference of the bidirectional WKV operator (Bi-WKV).

Obviously correct and slow (a Python loop over tokens): the fast paths are tested against it.
"""

import torch


def naive_bi_wkv(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Bi-WKV by two explicit recurrences, one forward and one backward in time.

    Args:
        r, k, v, w: `(B, T, H, N)`; `w` is log(-log(decay)), i.e. the per-step decay is `exp(-exp(w))`.
        u: `(H, N)`, the bonus applied to the current token.

    Returns:
        `(B, T, H, N)` in the promoted dtype of the inputs (at least float32).
    """
    dtype = torch.promote_types(torch.promote_types(r.dtype, w.dtype), torch.float32)
    r, k, v, w, u = (x.to(dtype) for x in (r, k, v, w, u))
    batch, seq_len, heads, head_size = r.shape
    decay = torch.exp(-torch.exp(w))
    y = torch.zeros_like(v)
    state = r.new_zeros(batch, heads, head_size, head_size)
    for t in range(seq_len):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]
        y[:, t] = torch.einsum("bhd,bhdc->bhc", r[:, t], state + u[None, :, :, None] * kv)
        state = decay[:, t, :, :, None] * state + kv
    state = torch.zeros_like(state)
    for t in range(seq_len - 1, -1, -1):
        y[:, t] += torch.einsum("bhd,bhdc->bhc", r[:, t], state)
        state = decay[:, t, :, :, None] * state + k[:, t, :, :, None] * v[:, t, :, None, :]
    return y
