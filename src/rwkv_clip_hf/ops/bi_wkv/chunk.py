"""Chunked, linear-time Bi-WKV in PyTorch.

The sequence is cut into chunks of `chunk_size` tokens.

* Inside a chunk every pair of tokens interacts through the product of the decays strictly between
  them. That product is formed as `exp(sum of log-decays)` where the sum is accumulated over exactly
  the tokens in between (a 0/1 selection matmul), never as a difference of two running sums: such a
  difference cancels catastrophically after a very strong decay (log-decay -2e4 leaves a float32 error
  of ~1e-3 in every later exponent). In the bidirectional case the pairwise tensor is symmetric, so
  one tensor serves both directions; its diagonal holds the bonus `u`.
* Across chunks a `(N, N)` state per head is carried forwards and backwards with matmuls. The decay
  factors on either side of a chunk boundary are again sums over the tokens in between only.

Every exponent is <= 0, so nothing overflows for any decay (a fully decayed channel gives exact zeros),
and the cost is O(T * chunk_size^2 * N) for the between-sums plus O(T * N^2) for the states per head: linear in T.
"""

import functools

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_SIZE = 16


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


_MAX_LOG_RATE = 80.0


def _build_between_selector(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    index = torch.arange(size, device=device)
    t, i, j = index[:, None, None], index[None, :, None], index[None, None, :]
    inside = (j > torch.minimum(t, i)) & (j < torch.maximum(t, i))
    return inside.to(dtype).reshape(size * size, size)


@functools.lru_cache(maxsize=32)
def _cached_between_selector(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # cached across calls, so never an inference tensor: autograd must be able to save it later
    with torch.inference_mode(False):
        return _build_between_selector(size, dtype, device)


def _between_selector(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`(size * size, size)` 0/1 matrix: row (t, i) selects the tokens j strictly between t and i."""
    tracing = torch.compiler.is_compiling() or getattr(torch.compiler, "is_exporting", bool)()
    if tracing or not isinstance(size, int):
        # traced (a symbolic size is unhashable): built inside the graph, from the same integer ops
        return _build_between_selector(size, dtype, device)
    return _cached_between_selector(size, dtype, device)


def _directional_states(kv: torch.Tensor, chunk_decay: torch.Tensor) -> torch.Tensor:
    """States entering each chunk for a left-to-right scan.

    kv: `(..., C_n, N, N)` contribution of each chunk to the state at its end, already decayed to that end.
    chunk_decay: `(..., C_n, N)` product of the decays of each chunk.
    Returns `(..., C_n, N, N)`: the state before each chunk (zero before the first).
    """
    states = [torch.zeros_like(kv[..., 0, :, :])]
    for c in range(1, kv.shape[-3]):
        states.append(chunk_decay[..., c - 1, :, None] * states[-1] + kv[..., c - 1, :, :])
    return torch.stack(states, dim=-3)


def chunk_bi_wkv(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Bi-WKV over `(B, T, H, N)` inputs; see `rwkv_clip_hf.ops.bi_wkv.bi_wkv` for the semantics.

    Computes in float32 (float64 if any input is float64) with autocast disabled, and returns the
    result in the dtype of `r`.
    """
    out_dtype = r.dtype
    dtype = _compute_dtype(r, k, v, w, u)
    batch, seq_len, heads, head_size = r.shape
    size = max(1, min(chunk_size, seq_len))
    num_chunks = -(-seq_len // size)
    pad = num_chunks * size - seq_len

    with torch.autocast(device_type=r.device.type, enabled=False):

        def to_chunks(x: torch.Tensor) -> torch.Tensor:
            x = x.to(dtype).transpose(1, 2)  # (B, H, T, N)
            if pad:
                # Zero keys/values after the end contribute nothing; the log-decay there (w = 0) is never
                # "between" two real tokens.
                x = F.pad(x, (0, 0, 0, pad))
            return x.reshape(batch, heads, num_chunks, size, head_size)

        r_c, k_c, v_c = to_chunks(r), to_chunks(k), to_chunks(v)
        # w > 80 already means decay exactly 0; the clamp keeps every log-decay finite (0 * -inf would be nan)
        log_decay = -torch.exp(to_chunks(w).clamp(max=_MAX_LOG_RATE))

        # Intra-chunk: between[t, i] = sum of log_decay[j] over min(t, i) < j < max(t, i), as one matmul with a
        # 0/1 selection matrix: only same-sign terms are added, so there is no cancellation.
        between = (_between_selector(size, dtype, r.device) @ log_decay).unflatten(-2, (size, size))
        scores = (r_c.unsqueeze(-2) * torch.exp(between) * k_c.unsqueeze(-3)).sum(-1)  # (B, H, Cn, t, i)
        # the diagonal used exp(0) = 1 where the bonus u belongs
        bonus = (r_c * (u.to(dtype).view(1, heads, 1, 1, head_size) - 1.0) * k_c).sum(-1)
        y = (scores + torch.diag_embed(bonus)) @ v_c

        if num_chunks > 1:
            # log-decay of the previous / next token inside the chunk (zero across the chunk edge)
            prev_log_decay = F.pad(log_decay[..., :-1, :], (0, 0, 1, 0))
            next_log_decay = F.pad(log_decay[..., 1:, :], (0, 0, 0, 1))
            # decay from the chunk start to just before t, and from just after t to the chunk end
            to_start = torch.exp(prev_log_decay.cumsum(-2))
            to_end = torch.exp(next_log_decay.flip(-2).cumsum(-2).flip(-2))
            chunk_decay = torch.exp(log_decay.sum(-2))
            kv_forward = (k_c * to_end).transpose(-1, -2) @ v_c
            kv_backward = (k_c * to_start).transpose(-1, -2) @ v_c
            # one scan serves both directions: the backward one runs on the chunk-reversed sequence
            states = _directional_states(
                torch.stack((kv_forward, kv_backward.flip(-3))),
                torch.stack((chunk_decay, chunk_decay.flip(-2))),
            )
            states = torch.cat((states[0], states[1].flip(-3)), dim=-2)  # (B, H, Cn, 2N, N)
            y = y + torch.cat((r_c * to_start, r_c * to_end), dim=-1) @ states

        y = y.reshape(batch, heads, num_chunks * size, head_size)[:, :, :seq_len]
        return y.transpose(1, 2).to(out_dtype)
