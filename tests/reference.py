"""A deliberately simple float64 re-implementation of docs/architecture.md sections 2-7, written for the tests.

It shares no code with the package: loops over tokens and channel groups, explicit formulas for the
norms, and Bi-WKV straight from its definition. Parameters are read from a model's state dict by name.
"""

import math

import torch
import torch.nn.functional as F


def wkv_by_definition(r, k, v, w, u):
    """Bi-WKV for one head by the triple sum of section 7. r, k, v, w: (T, N); u: (N,). O(T^2 N^2)."""
    seq_len, size = r.shape
    decay = torch.exp(-torch.exp(w))
    y = torch.zeros(seq_len, size, dtype=torch.float64)
    for t in range(seq_len):
        for i in range(seq_len):
            if i == t:
                weight = u * k[t]
            else:
                lo, hi = min(i, t), max(i, t)
                weight = torch.prod(decay[lo + 1 : hi], dim=0) * k[i]
            y[t] += (r[t] * weight).sum() * v[i]
    return y


def wkv_by_recurrence(r, k, v, w, u):
    """Bi-WKV over (B, T, H, N) by a forward and a backward recurrence on an (N, N) state per head."""
    batch, seq_len, heads, size = r.shape
    decay = torch.exp(-torch.exp(w))
    y = torch.zeros_like(r)
    for b in range(batch):
        for h in range(heads):
            state = torch.zeros(size, size, dtype=r.dtype)
            for t in range(seq_len):
                kv = torch.outer(k[b, t, h], v[b, t, h])
                y[b, t, h] = r[b, t, h] @ (state + u[h][:, None] * kv)
                state = decay[b, t, h][:, None] * state + kv
            state = torch.zeros(size, size, dtype=r.dtype)
            for t in reversed(range(seq_len)):
                y[b, t, h] += r[b, t, h] @ state
                state = decay[b, t, h][:, None] * state + torch.outer(k[b, t, h], v[b, t, h])
    return y


def layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def shift_image(x, height, width, head_size):
    """Q-shift, token by token: quarter 0 <- left, 1 <- right, 2 <- above, 3 <- below (per head)."""
    seq_len, dim = x.shape
    out = torch.zeros_like(x)
    quarter = head_size // 4
    sources = [(0, -1), (0, 1), (-1, 0), (1, 0)]
    for row in range(height):
        for col in range(width):
            for head_start in range(0, dim, head_size):
                for q, (dy, dx) in enumerate(sources):
                    rr, cc = row + dy, col + dx
                    if 0 <= rr < height and 0 <= cc < width:
                        channels = slice(head_start + q * quarter, head_start + (q + 1) * quarter)
                        out[row * width + col, channels] = x[rr * width + cc, channels]
    return out


def shift_text(x, head_size):
    """B-shift, token by token: first half of each head <- previous token, second half <- next token."""
    seq_len, dim = x.shape
    out = torch.zeros_like(x)
    half = head_size // 2
    for t in range(seq_len):
        for head_start in range(0, dim, head_size):
            if t > 0:
                out[t, head_start : head_start + half] = x[t - 1, head_start : head_start + half]
            if t < seq_len - 1:
                out[t, head_start + half : head_start + head_size] = x[
                    t + 1, head_start + half : head_start + head_size
                ]
    return out


def token_mix(x, p, shift, heads, head_size, gn_eps):
    """Section 5 for one sequence x: (T, D). p: dict of this block's token-mix parameters (float64)."""
    seq_len, dim = x.shape
    xx = shift(x) - x
    xxx = x + xx * p["time_maa_x"]
    m = torch.tanh(xxx @ p["time_maa_w1"])
    rank = p["time_maa_w2"].shape[1]
    mixes = [m[:, i * rank : (i + 1) * rank] @ p["time_maa_w2"][i] for i in range(5)]
    base = p["time_maa_wkvrg"]
    xw, xk, xv, xr, xg = (x + xx * (base[i] + mixes[i]) for i in range(5))
    r = xr @ p["receptance.weight"].t()
    k = xk @ p["key.weight"].t()
    v = xv @ p["value.weight"].t()
    g = F.silu(xg @ p["gate.weight"].t())
    w = p["time_decay"] + torch.tanh(xw @ p["time_decay_w1"]) @ p["time_decay_w2"]
    shape = (1, seq_len, heads, head_size)
    y = wkv_by_recurrence(r.view(shape), k.view(shape), v.view(shape), w.view(shape), p["time_faaaa"])[0]
    # GroupNorm per token, one group per head
    y = y.reshape(seq_len, heads, head_size)
    mean = y.mean(-1, keepdim=True)
    var = ((y - mean) ** 2).mean(-1, keepdim=True)
    y = ((y - mean) / torch.sqrt(var + gn_eps)).reshape(seq_len, dim) * p["ln_x.weight"] + p["ln_x.bias"]
    return (y * g) @ p["output.weight"].t()


def channel_mix(x, p, shift):
    xx = shift(x) - x
    xk = x + xx * p["time_maa_k"]
    xr = x + xx * p["time_maa_r"]
    k = torch.relu(xk @ p["key.weight"].t()) ** 2
    return torch.sigmoid(xr @ p["receptance.weight"].t()) * (k @ p["value.weight"].t())


def _params(state, prefix):
    return {key[len(prefix) :]: value.double() for key, value in state.items() if key.startswith(prefix)}


def run_blocks(x, state, prefix, config, shift):
    heads = config.hidden_size // config.head_size
    for layer in range(config.num_hidden_layers):
        block = f"{prefix}encoder.layers.{layer}."
        n1, n2 = _params(state, block + "norm1."), _params(state, block + "norm2.")
        h = layer_norm(x, n1["weight"], n1["bias"], config.layer_norm_eps)
        x = x + token_mix(
            h, _params(state, block + "token_mix."), shift, heads, config.head_size, config.group_norm_eps
        )
        h = layer_norm(x, n2["weight"], n2["bias"], config.layer_norm_eps)
        x = x + channel_mix(h, _params(state, block + "channel_mix."), shift)
    return x


def vision_tower(pixel_values, state, config, prefix=""):
    """Section 2 for a batch of images; returns (tokens after the final LN, embeddings)."""
    p = config.patch_size
    native = config.image_size // p
    tokens_out, pooled = [], []
    for image in pixel_values.double():
        _, height, width = image.shape
        padded_h, padded_w = math.ceil(height / p) * p, math.ceil(width / p) * p
        canvas = torch.zeros(image.shape[0], padded_h, padded_w, dtype=torch.float64)
        canvas[:, :height, :width] = image
        gh, gw = padded_h // p, padded_w // p
        weight = state[prefix + "embeddings.patch_embedding.weight"].double()
        bias = state[prefix + "embeddings.patch_embedding.bias"].double()
        patches = []
        for row in range(gh):
            for col in range(gw):
                patch = canvas[:, row * p : (row + 1) * p, col * p : (col + 1) * p]
                patches.append((weight * patch).sum(dim=(1, 2, 3)) + bias)
        x = torch.stack(patches)
        pos = state[prefix + "embeddings.position_embedding"].double()[0]
        if (gh, gw) != (native, native):
            grid = pos.reshape(native, native, -1).permute(2, 0, 1)[None]
            pos = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
            pos = pos.reshape(gh * gw, -1)
        x = x + pos
        pre = _params(state, prefix + "pre_layernorm.")
        x = layer_norm(x, pre["weight"], pre["bias"], config.layer_norm_eps)
        x = run_blocks(x, state, prefix, config, lambda t: shift_image(t, gh, gw, config.head_size))
        post = _params(state, prefix + "post_layernorm.")
        x = layer_norm(x, post["weight"], post["bias"], config.layer_norm_eps)
        tokens_out.append(x)
        pooled.append(x.mean(0))
    return tokens_out, torch.stack(pooled)


def original_ids(caption_ids, context_length, eos_id, pad_id=0):
    """What the original fed the text tower for one caption's ids ([start] ... [end]), as a list."""
    ids = list(caption_ids)
    if len(ids) > context_length:
        ids = ids[:context_length]
        ids[-1] = eos_id
    return ids + [pad_id] * (context_length - len(ids))


def text_tower(ids_77, state, config, prefix=""):
    """Section 3 for a batch of already canonical (B, 77) ids; returns (tokens, embeddings)."""
    embedding = state[prefix + "token_embedding.weight"].double()
    tokens_out, pooled = [], []
    for row in ids_77.tolist():
        x = embedding[torch.tensor(row)]
        pre = _params(state, prefix + "pre_layernorm.")
        x = layer_norm(x, pre["weight"], pre["bias"], config.layer_norm_eps)
        x = run_blocks(x, state, prefix, config, lambda t: shift_text(t, config.head_size))
        fin = _params(state, prefix + "final_layer_norm.")
        x = layer_norm(x, fin["weight"], fin["bias"], config.layer_norm_eps)
        tokens_out.append(x)
        pooled.append((x / x.norm(dim=-1, keepdim=True)).mean(0))
    return tokens_out, torch.stack(pooled)
