"""A functional float64 forward of RWKV-CLIP written directly against the ORIGINAL checkpoint key names.

It is the yardstick of `convert_rwkv_clip_original.py --verify`: it reads the authors' state dict as it is
(`image_model.layers.{i}.att.time_maa_w`, `...ffn.spatial_mix_k`, `text_model.blocks.{i}...`, bfloat16 text
decays) and computes what docs/architecture.md sections 2-7 specify with plain torch functions. It shares no code
with `rwkv_clip_hf`, so a mistake in the key mapping or in the package's modules shows up as a difference.

Keys must already be free of the `module.` / `_orig_mod.` wrappers (see `normalize_keys` in the converter).
Every tensor is promoted to float64 before use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LAYER_NORM_EPS = 1e-5
IMAGE_GROUP_NORM_EPS = 1e-5


def _p(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    return state[key].to(torch.float64)


def _vec(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """A (1, 1, D) mixing parameter as a (D,) vector."""
    return _p(state, key).reshape(-1)


def _layer_norm(x: torch.Tensor, state: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], _p(state, prefix + ".weight"), _p(state, prefix + ".bias"), LAYER_NORM_EPS)


def _linear(x: torch.Tensor, state: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    return x @ _p(state, prefix + ".weight").t()


def _num_blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    indices = {int(key[len(prefix) :].split(".", 1)[0]) for key in state if key.startswith(prefix)}
    return max(indices) + 1


# ------------------------------------------------------------------------------------------ token shifts


def _shift_right(x: torch.Tensor, dim: int) -> torch.Tensor:
    """out[..., j, ...] = x[..., j - 1, ...] along `dim`, zero at j = 0."""
    zeros = torch.zeros_like(x.narrow(dim, 0, 1))
    return torch.cat([zeros, x.narrow(dim, 0, x.shape[dim] - 1)], dim=dim)


def _shift_left(x: torch.Tensor, dim: int) -> torch.Tensor:
    """out[..., j, ...] = x[..., j + 1, ...] along `dim`, zero at the last position."""
    zeros = torch.zeros_like(x.narrow(dim, 0, 1))
    return torch.cat([x.narrow(dim, 1, x.shape[dim] - 1), zeros], dim=dim)


def q_shift(x: torch.Tensor, grid: tuple[int, int], head_size: int) -> torch.Tensor:
    """Image Q-shift: per head, quarter 0 <- left, 1 <- right, 2 <- above, 3 <- below neighbour."""
    batch, _, dim = x.shape
    rows, cols = grid
    # (batch, row, col, head, quarter, channel)
    xg = x.reshape(batch, rows, cols, dim // head_size, 4, head_size // 4)
    out = torch.stack(
        [
            _shift_right(xg[:, :, :, :, 0], dim=2),  # from column j - 1
            _shift_left(xg[:, :, :, :, 1], dim=2),  # from column j + 1
            _shift_right(xg[:, :, :, :, 2], dim=1),  # from row i - 1
            _shift_left(xg[:, :, :, :, 3], dim=1),  # from row i + 1
        ],
        dim=4,
    )
    return out.reshape(batch, rows * cols, dim)


def b_shift(x: torch.Tensor, head_size: int) -> torch.Tensor:
    """Text B-shift: per head, the first half <- previous token, the second half <- next token."""
    batch, seq_len, dim = x.shape
    xg = x.reshape(batch, seq_len, dim // head_size, 2, head_size // 2)
    out = torch.stack([_shift_right(xg[:, :, :, 0], dim=1), _shift_left(xg[:, :, :, 1], dim=1)], dim=3)
    return out.reshape(batch, seq_len, dim)


# ------------------------------------------------------------------------------------------ Bi-WKV


def bi_wkv_recurrent(r, k, v, w, u):
    """Bi-WKV by a forward and a backward recurrence. r, k, v, w: (B, T, H, N); u: (H, N). float64."""
    batch, seq_len, heads, size = r.shape
    decay = torch.exp(-torch.exp(w))
    y = torch.zeros_like(r)
    state = r.new_zeros(batch, heads, size, size)  # (key channel, value channel)
    for t in range(seq_len):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]
        y[:, t] = torch.einsum("bhi,bhij->bhj", r[:, t], state + u[None, :, :, None] * kv)
        state = decay[:, t, :, :, None] * state + kv
    state = r.new_zeros(batch, heads, size, size)
    for t in range(seq_len - 1, -1, -1):
        y[:, t] += torch.einsum("bhi,bhij->bhj", r[:, t], state)
        state = decay[:, t, :, :, None] * state + k[:, t, :, :, None] * v[:, t, :, None, :]
    return y


# ------------------------------------------------------------------------------------------ blocks


def _token_mix(x, state, prefix, shift, group_norm_eps):
    """RWKV-6 time / spatial mix (section 5) with the original parameter names under `prefix` (`...att`)."""
    batch, seq_len, dim = x.shape
    faaaa = _p(state, prefix + ".time_faaaa")
    heads, head_size = faaaa.shape
    xx = shift(x) - x
    xxx = x + xx * _vec(state, prefix + ".time_maa_x")
    w1 = _p(state, prefix + ".time_maa_w1")
    w2 = _p(state, prefix + ".time_maa_w2")
    rank = w2.shape[1]
    lora = torch.tanh(xxx @ w1)
    mixed = {}
    for index, name in enumerate("wkvrg"):
        delta = lora[..., index * rank : (index + 1) * rank] @ w2[index]
        mixed[name] = x + xx * (_vec(state, f"{prefix}.time_maa_{name}") + delta)
    r = _linear(mixed["r"], state, prefix + ".receptance")
    k = _linear(mixed["k"], state, prefix + ".key")
    v = _linear(mixed["v"], state, prefix + ".value")
    g = F.silu(_linear(mixed["g"], state, prefix + ".gate"))
    w = _vec(state, prefix + ".time_decay") + torch.tanh(mixed["w"] @ _p(state, prefix + ".time_decay_w1")) @ _p(
        state, prefix + ".time_decay_w2"
    )
    heads_shape = (batch, seq_len, heads, head_size)
    y = bi_wkv_recurrent(r.view(heads_shape), k.view(heads_shape), v.view(heads_shape), w.view(heads_shape), faaaa)
    y = F.group_norm(
        y.reshape(batch * seq_len, dim),
        heads,
        _p(state, prefix + ".ln_x.weight"),
        _p(state, prefix + ".ln_x.bias"),
        group_norm_eps,
    ).view(batch, seq_len, dim)
    return _linear(y * g, state, prefix + ".output")


def _image_channel_mix(x, state, prefix, shift):
    """Image channel mix: the original interpolates `x * mix + shift(x) * (1 - mix)`."""
    xx = shift(x)
    mix_k = _vec(state, prefix + ".spatial_mix_k")
    mix_r = _vec(state, prefix + ".spatial_mix_r")
    xk = x * mix_k + xx * (1.0 - mix_k)
    xr = x * mix_r + xx * (1.0 - mix_r)
    k = torch.relu(_linear(xk, state, prefix + ".key")) ** 2
    return torch.sigmoid(_linear(xr, state, prefix + ".receptance")) * _linear(k, state, prefix + ".value")


def _text_channel_mix(x, state, prefix, shift):
    """Text channel mix: RWKV-6 form `x + (shift(x) - x) * maa`."""
    xx = shift(x) - x
    xk = x + xx * _vec(state, prefix + ".time_maa_k")
    xr = x + xx * _vec(state, prefix + ".time_maa_r")
    k = torch.relu(_linear(xk, state, prefix + ".key")) ** 2
    return torch.sigmoid(_linear(xr, state, prefix + ".receptance")) * _linear(k, state, prefix + ".value")


# ------------------------------------------------------------------------------------------ towers


def image_embeddings(state: dict[str, torch.Tensor], pixel_values: torch.Tensor) -> torch.Tensor:
    """Image tower (section 2) on `(B, 3, H, W)` pixels of any size; returns the `(B, D)` float64 embeddings."""
    weight = _p(state, "image_model.patch_embed.projection.weight")
    patch = weight.shape[-1]
    x = pixel_values.to(torch.float64)
    height, width = x.shape[-2:]
    x = F.pad(x, (0, -width % patch, 0, -height % patch))  # zero-pad bottom/right to whole patches
    x = F.conv2d(x, weight, _p(state, "image_model.patch_embed.projection.bias"), stride=patch)
    batch, dim, rows, cols = x.shape
    x = x.flatten(2).transpose(1, 2)
    pos = _p(state, "image_model.pos_embed")
    native = round(pos.shape[1] ** 0.5)
    if (rows, cols) != (native, native):
        grid = pos.reshape(1, native, native, dim).permute(0, 3, 1, 2)
        pos = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    x = x + pos

    x = _layer_norm(x, state, "image_model.layers.0.ln0")
    for i in range(_num_blocks(state, "image_model.layers.")):
        block = f"image_model.layers.{i}"
        head_size = state[block + ".att.time_faaaa"].shape[1]

        def shift(t, head_size=head_size):
            return q_shift(t, (rows, cols), head_size)

        x = x + _token_mix(_layer_norm(x, state, block + ".ln1"), state, block + ".att", shift, IMAGE_GROUP_NORM_EPS)
        x = x + _image_channel_mix(_layer_norm(x, state, block + ".ln2"), state, block + ".ffn", shift)
    x = _layer_norm(x, state, "image_model.ln1")
    return x.mean(dim=1)


def text_embeddings(state: dict[str, torch.Tensor], ids: torch.Tensor, head_size_divisor: int = 8) -> torch.Tensor:
    """Text tower (section 3) on `(B, ctx_len)` ids exactly as the original fed them (caption, then id 0).

    Returns the `(B, D)` float64 embeddings: the mean over all positions of the L2-normalised final states.
    """
    x = _p(state, "text_model.emb.weight")[ids]
    x = _layer_norm(x, state, "text_model.blocks.0.ln0")
    group_norm_eps = 1e-5 * head_size_divisor**2
    for i in range(_num_blocks(state, "text_model.blocks.")):
        block = f"text_model.blocks.{i}"
        head_size = state[block + ".att.time_faaaa"].shape[1]

        def shift(t, head_size=head_size):
            return b_shift(t, head_size)

        x = x + _token_mix(_layer_norm(x, state, block + ".ln1"), state, block + ".att", shift, group_norm_eps)
        x = x + _text_channel_mix(_layer_norm(x, state, block + ".ln2"), state, block + ".ffn", shift)
    x = _layer_norm(x, state, "text_model.ln_out")
    return (x / x.norm(dim=-1, keepdim=True)).mean(dim=1)
