"""PyTorch RWKV-CLIP: a CLIP-style dual encoder whose towers are RWKV-6 blocks with a bidirectional WKV.

One block implementation serves both towers; they differ only in the token shift (a "Q-shift" over the
image patch grid, a "B-shift" along the text sequence), chosen by `config.token_shift`.
"""

import contextlib
import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from .configuration_rwkv_clip import RWKVCLIPConfig, RWKVCLIPTextConfig, RWKVCLIPVisionConfig
from .ops.bi_wkv import bi_wkv, check_backend, default_backend
from .ops.block import group_norm_gate, squared_relu, token_shift, token_shift_mix


def contrastive_loss(logits: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


def rwkv_clip_loss(similarity: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a (text x image) similarity matrix whose diagonal holds the matching pairs."""
    return (contrastive_loss(similarity) + contrastive_loss(similarity.t())) / 2.0


def drop_path(hidden_states: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample: drops the whole residual branch with probability `rate` (training only)."""
    if rate == 0.0 or not training:
        return hidden_states
    keep = 1.0 - rate
    mask = hidden_states.new_empty((hidden_states.shape[0],) + (1,) * (hidden_states.dim() - 1)).bernoulli_(keep)
    return hidden_states * mask / keep


def _float32(device_type: str) -> contextlib.AbstractContextManager:
    """A fresh context that turns autocast off for `device_type` where it is on (the token mix's products out of its
    low ranks run in float32 under autocast)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class _ShiftMixin:
    """Token shift of the tower this module belongs to, and the layer facts the RWKV-6 init schedules need."""

    def _init_layer(self, config: RWKVCLIPTextConfig | RWKVCLIPVisionConfig, layer_idx: int) -> None:
        self.layer_idx = layer_idx
        self.num_layers = config.num_hidden_layers
        self.hidden_size = config.hidden_size
        self.head_size = config.head_size
        self.shift_offsets = config.token_shift_offsets
        # which implementation of the custom ops runs (ops.bi_wkv.BACKENDS): set with `set_kernel_backend`
        self.kernel_backend = default_backend()

    def _shift_mix(
        self, hidden_states: torch.Tensor, maa: torch.Tensor, grid_size: tuple[int, int], with_delta: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """`delta = shift(x) - x` and the interpolations `x + delta * maa[j]`, `(mixes, batch, seq_len, dim)`."""
        return token_shift_mix(
            hidden_states, maa, grid_size, self.shift_offsets, self.head_size, with_delta, self.kernel_backend
        )


class RWKVCLIPTokenMix(_ShiftMixin, nn.Module):
    """RWKV-6 token mixing with Bi-WKV: the "spatial mix" of the image tower and the "time mix" of the text tower.

    Parameter names follow RWKV-6; the five data-dependent interpolations (w, k, v, r, g) are stacked.
    """

    def __init__(self, config: RWKVCLIPTextConfig | RWKVCLIPVisionConfig, layer_idx: int):
        super().__init__()
        self._init_layer(config, layer_idx)
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.mix_lora_rank = config.mix_lora_rank

        self.time_maa_x = nn.Parameter(torch.empty(dim))
        self.time_maa_wkvrg = nn.Parameter(torch.empty(5, dim))
        self.time_maa_w1 = nn.Parameter(torch.empty(dim, 5 * config.mix_lora_rank))
        self.time_maa_w2 = nn.Parameter(torch.empty(5, config.mix_lora_rank, dim))
        self.time_decay = nn.Parameter(torch.empty(dim))
        self.time_decay_w1 = nn.Parameter(torch.empty(dim, config.decay_lora_rank))
        self.time_decay_w2 = nn.Parameter(torch.empty(config.decay_lora_rank, dim))
        self.time_faaaa = nn.Parameter(torch.empty(self.num_heads, self.head_size))
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.gate = nn.Linear(dim, dim, bias=False)
        self.output = nn.Linear(dim, dim, bias=False)
        self.ln_x = nn.GroupNorm(self.num_heads, dim, eps=config.group_norm_eps)

    def forward(self, hidden_states: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        batch, seq_len, dim = hidden_states.shape
        x = hidden_states
        # without autograd, temporaries are overwritten in place (fewer passes and allocations, the same values)
        in_place = not torch.is_grad_enabled()
        delta, xxx = self._shift_mix(x, self.time_maa_x[None], grid_size, with_delta=True)
        lora = torch.tanh(xxx[0] @ self.time_maa_w1)
        del xxx
        lora = lora.view(batch * seq_len, 5, self.mix_lora_rank)
        # one interpolation at a time (without autograd computed in place and freed after its projection, so the
        # five never coexist)
        mixed = functools.partial(self._interpolation, x, delta, lora, in_place)
        # the interpolations' order in time_maa_wkvrg: w, k, v, r, g
        heads = (batch, seq_len, self.num_heads, self.head_size)
        receptance = self.receptance(mixed(3)).view(heads)
        key = self.key(mixed(1)).view(heads)
        value = self.value(mixed(2)).view(heads)
        gate = F.silu(self.gate(mixed(4)), inplace=in_place)
        decay_lora = torch.tanh(mixed(0) @ self.time_decay_w1).flatten(0, 1)
        # under autocast the products out of the low ranks (32 / 64) stay in float32 (see `_float32`): their biases
        # are summed in float32 in the same GEMM, and rank-32 GEMMs gain nothing from low precision
        with _float32(x.device.type):  # time_decay enters the GEMM as its C matrix
            log_decay_rate = torch.addmm(self.time_decay, decay_lora.to(x.dtype), self.time_decay_w2)
        del delta, mixed
        if torch.is_autocast_enabled(x.device.type):
            # Bi-WKV and the GroupNorm compute in float32 anyway: widen the low-precision projections once here, so
            # that Bi-WKV's output reaches the norm unrounded and the fused GroupNorm-times-gate pass can run (the
            # composition would widen the gate in its product too; the same values)
            receptance, key, value, gate = (t.float() for t in (receptance, key, value, gate))

        out = bi_wkv(receptance, key, value, log_decay_rate.view(heads), self.time_faaaa, backend=self.kernel_backend)
        out = group_norm_gate(
            out.reshape(batch * seq_len, dim),
            gate.reshape(batch * seq_len, dim),
            self.ln_x.weight,
            self.ln_x.bias,
            self.ln_x.num_groups,
            self.ln_x.eps,
            self.kernel_backend,
        )
        return self.output(out.view(batch, seq_len, dim))

    def _interpolation(
        self, x: torch.Tensor, delta: torch.Tensor, lora: torch.Tensor, in_place: bool, index: int
    ) -> torch.Tensor:
        """x + delta * (time_maa_wkvrg[index] + lora[:, index] @ time_maa_w2[index]), computed in x's dtype."""
        with _float32(x.device.type):  # the bias enters the GEMM as its C matrix
            mix = torch.addmm(self.time_maa_wkvrg[index], lora[:, index].to(x.dtype), self.time_maa_w2[index])
            mix = mix.view_as(x)
            if in_place and mix.dtype == x.dtype:
                return torch.addcmul(x, delta, mix, out=mix)
            return torch.addcmul(x, delta, mix)

    @torch.no_grad()
    def _init_rwkv_weights(self) -> None:
        # RWKV-6 schedules: early layers shift more and decay faster.
        dim, layers, layer = self.hidden_size, self.num_layers, self.layer_idx
        ratio_0_to_1 = layer / max(layers - 1, 1)
        ratio_1_to_almost_0 = 1.0 - layer / layers
        position = torch.arange(dim, dtype=torch.float64) / dim
        shift = 1.0 - position**ratio_1_to_almost_0
        shift_half = 1.0 - position ** (0.5 * ratio_1_to_almost_0)
        init.copy_(self.time_maa_x, shift)
        init.copy_(
            self.time_maa_wkvrg,
            torch.stack(
                [shift, shift, 1.0 - (position**ratio_1_to_almost_0 + 0.3 * ratio_0_to_1), shift_half, shift_half]
            ),
        )
        channel = torch.arange(dim, dtype=torch.float64) / max(dim - 1, 1)
        init.copy_(self.time_decay, -6.0 + 5.0 * channel ** (0.7 + 1.3 * ratio_0_to_1))
        zigzag = ((torch.arange(dim) + 1) % 3 - 1).to(torch.float64) * 0.1
        init.copy_(self.time_faaaa, (ratio_0_to_1 * (1.0 - channel) + zigzag).view(self.num_heads, self.head_size))
        for tensor in (self.time_maa_w1, self.time_maa_w2, self.time_decay_w1, self.time_decay_w2):
            init.uniform_(tensor, -1e-4, 1e-4)
        init.orthogonal_(self.receptance.weight)
        init.orthogonal_(self.key.weight, gain=0.1)
        init.orthogonal_(self.value.weight)
        init.orthogonal_(self.gate.weight, gain=0.1)
        init.zeros_(self.output.weight)
        init.copy_(self.ln_x.weight, torch.full((dim,), ((1 + layer) / layers) ** 0.7))
        init.zeros_(self.ln_x.bias)


class RWKVCLIPChannelMix(_ShiftMixin, nn.Module):
    """RWKV channel mixing (squared-ReLU MLP gated by a sigmoid receptance) on token-shifted inputs.

    The image tower's `spatial_mix` (x * mix + shift * (1 - mix)) is this function with `time_maa = 1 - mix`.
    """

    def __init__(self, config: RWKVCLIPTextConfig | RWKVCLIPVisionConfig, layer_idx: int):
        super().__init__()
        self._init_layer(config, layer_idx)
        dim = config.hidden_size
        self.time_maa_k = nn.Parameter(torch.empty(dim))
        self.time_maa_r = nn.Parameter(torch.empty(dim))
        self.key = nn.Linear(dim, config.intermediate_size, bias=False)
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(config.intermediate_size, dim, bias=False)
        # without autograd, inputs of more rows (batch x tokens) than this run in equal chunks of at most as many
        self.max_chunk_rows = 1024

    def forward(self, hidden_states: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        maa = torch.stack((self.time_maa_k, self.time_maa_r))
        _, mixed = self._shift_mix(hidden_states, maa, grid_size, with_delta=False)
        x_k, x_r = mixed.unbind(0)
        if torch.is_grad_enabled():
            return torch.sigmoid(self.receptance(x_r)) * self.value(squared_relu(self.key(x_k)))
        # without autograd: the same values with the temporaries overwritten in place, and long inputs in chunks
        # of rows so that the (rows, intermediate_size) activation stays small
        x_k, x_r = x_k.flatten(0, 1), x_r.flatten(0, 1)
        rows = x_k.shape[0]
        chunks = -(-rows // self.max_chunk_rows)
        if chunks == 1:
            return self._in_place(x_k, x_r).view_as(hidden_states)
        step = -(-rows // chunks)
        out = None
        for start in range(0, rows, step):
            if out is None:
                part = self._in_place(x_k[:step], x_r[:step])
                out = part.new_empty((rows, part.shape[-1]))
                out[:step] = part
            else:  # written straight into its rows of the output
                self._in_place(x_k[start : start + step], x_r[start : start + step], out=out[start : start + step])
        return out.view_as(hidden_states)

    def _in_place(self, x_k: torch.Tensor, x_r: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        key = self.key(x_k).relu_()
        value = self.value(key.mul_(key))
        del key
        gate = self.receptance(x_r).sigmoid_()
        return gate.mul_(value) if out is None else torch.mul(gate, value, out=out)

    @torch.no_grad()
    def _init_rwkv_weights(self) -> None:
        position = torch.arange(self.hidden_size, dtype=torch.float64) / self.hidden_size
        shift = 1.0 - position ** (1.0 - self.layer_idx / self.num_layers)
        init.copy_(self.time_maa_k, shift)
        init.copy_(self.time_maa_r, shift)
        init.orthogonal_(self.key.weight)
        init.zeros_(self.receptance.weight)
        init.zeros_(self.value.weight)


class RWKVCLIPBlock(GradientCheckpointingLayer):
    """Pre-norm residual block: `x + TokenMix(LN(x))`, then `x + ChannelMix(LN(x))`, with drop-path in training."""

    def __init__(self, config: RWKVCLIPTextConfig | RWKVCLIPVisionConfig, layer_idx: int, drop_path_rate: float = 0.0):
        super().__init__()
        self.drop_path_rate = drop_path_rate
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.token_mix = RWKVCLIPTokenMix(config, layer_idx)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.channel_mix = RWKVCLIPChannelMix(config, layer_idx)

    def forward(
        self, hidden_states: torch.Tensor, grid_size: tuple[int, int], **kwargs: Unpack[TransformersKwargs]
    ) -> torch.Tensor:
        branch = self.token_mix(self.norm1(hidden_states), grid_size)
        hidden_states = hidden_states + drop_path(branch, self.drop_path_rate, self.training)
        branch = self.channel_mix(self.norm2(hidden_states), grid_size)
        return hidden_states + drop_path(branch, self.drop_path_rate, self.training)


class RWKVCLIPEncoder(nn.Module):
    """A stack of `RWKVCLIPBlock`s with drop-path rates rising linearly from 0 to `config.drop_path_rate`."""

    def __init__(self, config: RWKVCLIPTextConfig | RWKVCLIPVisionConfig):
        super().__init__()
        layers = config.num_hidden_layers
        rates = [config.drop_path_rate * index / max(layers - 1, 1) for index in range(layers)]
        self.layers = nn.ModuleList(
            RWKVCLIPBlock(config, layer_idx, rates[layer_idx]) for layer_idx in range(config.num_hidden_layers)
        )

    def forward(
        self, inputs_embeds: torch.Tensor, grid_size: tuple[int, int], **kwargs: Unpack[TransformersKwargs]
    ) -> BaseModelOutput:
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, grid_size, **kwargs)
        return BaseModelOutput(last_hidden_state=hidden_states)


class RWKVCLIPVisionEmbeddings(nn.Module):
    """Patch embedding (zero-padding the bottom/right to whole patches) plus a learned position embedding."""

    def __init__(self, config: RWKVCLIPVisionConfig):
        super().__init__()
        self.config = config
        self.patch_size = config.patch_size
        self.grid_size = config.grid_size
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size, bias=True
        )
        self.position_embedding = nn.Parameter(torch.empty(1, self.grid_size**2, config.hidden_size))

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        """Position embedding resized bicubically (align_corners=False) to a `height x width` patch grid."""
        if (height, width) == (self.grid_size, self.grid_size):
            return self.position_embedding
        dim = self.position_embedding.shape[-1]
        dtype = self.position_embedding.dtype
        grid = self.position_embedding.reshape(1, self.grid_size, self.grid_size, dim).permute(0, 3, 1, 2)
        grid = grid.to(torch.promote_types(dtype, torch.float32))
        grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
        return grid.to(dtype).flatten(2).transpose(1, 2)

    def forward(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool | None = None
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must have shape (batch, {self.config.num_channels}, height, width), "
                f"got {tuple(pixel_values.shape)}"
            )
        height, width = pixel_values.shape[-2:]
        pad_h, pad_w = -height % self.patch_size, -width % self.patch_size
        pixel_values = pixel_values.to(self.patch_embedding.weight.dtype)
        if pad_h or pad_w:
            pixel_values = F.pad(pixel_values, (0, pad_w, 0, pad_h))
        batch, channels = pixel_values.shape[:2]
        grid_h, grid_w = pixel_values.shape[-2] // self.patch_size, pixel_values.shape[-1] // self.patch_size
        if (grid_h, grid_w) != (self.grid_size, self.grid_size) and interpolate_pos_encoding is False:
            raise ValueError(
                f"Input image size ({height}x{width}) gives a {grid_h}x{grid_w} patch grid, but the position "
                f"embedding was learned for {self.grid_size}x{self.grid_size} ({self.config.image_size}px). Pass "
                "interpolate_pos_encoding=True (or leave the default None) to resize it bicubically as the original "
                "model does."
            )
        conv = self.patch_embedding
        if type(conv) is nn.Conv2d:
            # the stride-p p x p convolution as one GEMM over the patches, in (batch, tokens, dim) order directly
            # (faster than the convolution on CPUs; the same sums)
            patches = pixel_values.reshape(batch, channels, grid_h, self.patch_size, grid_w, self.patch_size)
            patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, grid_h * grid_w, -1)
            embeddings = F.linear(patches, conv.weight.view(conv.out_channels, -1), conv.bias)
        else:  # a wrapped module (e.g. by PEFT) runs as itself
            embeddings = conv(pixel_values).flatten(2).transpose(1, 2)
        return embeddings + self.interpolate_pos_encoding(grid_h, grid_w), (grid_h, grid_w)


def _tracing() -> bool:
    """Under torch.compile or torch.export: data-dependent checks (which need the values) are skipped."""
    # torch.compiler.is_exporting is newer than the oldest torch this package supports
    return torch.compiler.is_compiling() or getattr(torch.compiler, "is_exporting", bool)()


def canonical_text_positions(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, eos_token_id: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each input token goes in the original layout (see `canonical_text_ids`).

    Returns `(positions, lengths)`: `positions` `(batch, seq_len)` is each token's index in the left-packed
    layout (real tokens first, in order, then the padding, in order), `lengths` `(batch,)` the number of real
    tokens. Tensor operations only (no data-dependent branch), so that the text tower exports and compiles.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch, sequence_length), got {tuple(input_ids.shape)}")
    seq_len = input_ids.shape[1]
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, "
                f"expected {tuple(input_ids.shape)} like input_ids"
            )
        real = attention_mask.to(torch.bool)
    elif eos_token_id is not None:
        is_eos = input_ids == eos_token_id
        first_eos = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), seq_len - 1)
        real = torch.arange(seq_len, device=input_ids.device)[None, :] <= first_eos[:, None]
    else:
        real = torch.ones_like(input_ids, dtype=torch.bool)
    lengths = real.sum(dim=1)
    real_before = real.cumsum(dim=1) - 1
    pad_before = lengths[:, None] + (~real).cumsum(dim=1) - 1
    return torch.where(real, real_before, pad_before), lengths


def canonical_text_ids(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    context_length: int,
    pad_token_id: int,
    eos_token_id: int | None,
) -> torch.Tensor:
    """The `(batch, context_length)` ids the original model saw for the same captions.

    The original always ran the text tower on `context_length` tokens: the caption's ids, then `pad_token_id`.
    Because the Bi-WKV is bidirectional, the padding changes every token's output, so callers' padding is
    normalised here: the real tokens (`attention_mask == 1`, in order, any padding side; without a mask,
    everything up to and including the first `eos_token_id`, or the whole row if it has none) are packed to
    the left and padded with `pad_token_id`. A caption longer than `context_length` is cut to it with its last
    id set to `eos_token_id`, as the original tokenizer does.
    """
    positions, lengths = canonical_text_positions(input_ids, attention_mask, eos_token_id)
    seq_len = input_ids.shape[1]
    # one scatter packs the real tokens to the left (the identity where there is no padding to move)
    ids = torch.scatter(input_ids, 1, positions, input_ids)
    ids = torch.where(torch.arange(seq_len, device=ids.device)[None, :] < lengths[:, None], ids, pad_token_id)
    if seq_len < context_length:
        ids = F.pad(ids, (0, context_length - seq_len), value=pad_token_id)
    elif seq_len > context_length:
        ids = ids[:, :context_length]
        if eos_token_id is not None:
            last = torch.where(lengths > context_length, eos_token_id, ids[:, -1])
            ids = torch.cat((ids[:, :-1], last[:, None]), dim=1)
    return ids


def _at_input_positions(states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`(batch, seq_len, hidden)`: the state of each input token, read from the original layout (zeros for tokens
    that fell beyond the context)."""
    inside = positions < states.shape[1]
    index = positions.clamp(max=states.shape[1] - 1)[..., None].expand(-1, -1, states.shape[-1])
    return torch.where(inside[..., None], torch.gather(states, 1, index), 0.0)


class RWKVCLIPPreTrainedModel(PreTrainedModel):
    config: RWKVCLIPConfig
    base_model_prefix = "rwkv_clip"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["RWKVCLIPBlock", "RWKVCLIPVisionEmbeddings"]
    _can_record_outputs = {"hidden_states": RWKVCLIPBlock}

    def set_kernel_backend(self, backend: str) -> "RWKVCLIPPreTrainedModel":
        """Choose the implementation of the custom ops in every block of this model (Bi-WKV and the fused element-wise
        passes of `ops.block`); returns the model.

        Args:
            backend: `"auto"` (the prebuilt kernel when it loads for the tensors' device, else on a GPU the Triton
                kernels, else the exact PyTorch path; the default), `"kernel"` (the prebuilt kernel, or
                `KernelUnavailableError`), `"torch"` (the PyTorch path, never asking for a kernel) or `"triton"`
                (the Triton kernels). New models start with $RWKV_CLIP_KERNEL_BACKEND,
                or `"auto"` when it is unset.
        """
        check_backend(backend)
        for module in self.modules():
            if isinstance(module, _ShiftMixin):
                module.kernel_backend = backend
        return self

    def get_kernel_backend(self) -> str:
        """The backend set with `set_kernel_backend` (a model whose blocks were set one by one: the first one's)."""
        for module in self.modules():
            if isinstance(module, _ShiftMixin):
                return module.kernel_backend
        return default_backend()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, (RWKVCLIPTokenMix, RWKVCLIPChannelMix)):
            module._init_rwkv_weights()
        elif isinstance(module, RWKVCLIPVisionEmbeddings):
            init.trunc_normal_(module.position_embedding, std=module.config.initializer_range)
        elif isinstance(module, RWKVCLIPModel):
            init.constant_(module.logit_scale, module.config.logit_scale_init_value)


class _TowerFromFullCheckpoint(WeightRenaming):
    """Loads a tower from a full RWKV-CLIP checkpoint by dropping the tower's prefix (`vision_model.X` -> `X`), the
    mechanism transformers' CLIP towers use. A tower saves under its own names, so saving has nothing to reverse."""

    __slots__ = ()

    def reverse_transform(self) -> "_TowerFromFullCheckpoint":
        return self


for _tower_class, _prefix in (("RWKVCLIPTextModel", "text_model"), ("RWKVCLIPVisionModel", "vision_model")):
    register_checkpoint_conversion_mapping(
        _tower_class,
        [_TowerFromFullCheckpoint(source_patterns=rf"^{_prefix}\.(.+)", target_patterns=r"\1")],
        overwrite=True,  # the installed package and a remote-code copy may both register
    )


class RWKVCLIPTextModel(RWKVCLIPPreTrainedModel):
    """The RWKV-CLIP text tower. `pooler_output` is the caption embedding: the mean over all context positions
    of the L2-normalised final token states (there is no projection layer)."""

    config: RWKVCLIPTextConfig
    input_modalities = ("text",)
    _input_embed_layer = "token_embedding"
    # `from_pretrained` on a full RWKV-CLIP checkpoint loads `text_model.*`; the image tower is not used here
    _keys_to_ignore_on_load_unexpected = [r"^vision_model\.", r"^logit_scale$"]

    def __init__(self, config: RWKVCLIPTextConfig):
        super().__init__(config)
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.pre_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = RWKVCLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.token_embedding

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.token_embedding = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        r"""
        Args:
            input_ids: `(batch, seq_len)` CLIP BPE ids, any length and padding.
            attention_mask: `(batch, seq_len)`, 1 for real tokens. Padding is normalised to the original's
                layout (see `canonical_text_ids`), so the embedding does not depend on how captions were batched.

        Returns:
            `BaseModelOutputWithPooling` with `pooler_output` `(batch, hidden)` and `last_hidden_state`
            `(batch, seq_len, hidden)` (after the final LayerNorm) at the input positions: the tower runs on the
            normalised `max_position_embeddings`-token layout, and each input token gets the state its token had
            there (padding tokens the states of the layout's padding, in order; tokens cut off beyond the context
            zeros). `hidden_states` (`output_hidden_states=True`) are read back the same way. These returned
            states are copies (gathered from the layout the tower ran on): gradients reach the weights through
            `pooler_output` and `last_hidden_state`, but `retain_grad()` on an entry of `hidden_states` sees none,
            because the rest of the forward used the layout's states, not the copies.
        """
        if input_ids is None:
            raise ValueError("You have to specify input_ids")
        config = self.config
        positions, _ = canonical_text_positions(input_ids, attention_mask, config.eos_token_id)
        input_ids = canonical_text_ids(
            input_ids, attention_mask, config.max_position_embeddings, config.pad_token_id, config.eos_token_id
        )
        if not _tracing() and (int(input_ids.max()) >= config.vocab_size or int(input_ids.min()) < 0):
            raise ValueError(
                f"input_ids contain ids outside the vocabulary [0, {config.vocab_size}): "
                f"min {int(input_ids.min())}, max {int(input_ids.max())}"
            )
        outputs = self._encode_canonical(input_ids, return_dict=True, **kwargs)
        outputs.last_hidden_state = _at_input_positions(outputs.last_hidden_state, positions)
        if outputs.hidden_states is not None:
            outputs.hidden_states = tuple(_at_input_positions(states, positions) for states in outputs.hidden_states)
        return outputs

    @capture_outputs(tie_last_hidden_states=False)
    def _encode_canonical(
        self, input_ids: torch.Tensor, **kwargs: Unpack[TransformersKwargs]
    ) -> BaseModelOutputWithPooling:
        hidden_states = self.pre_layernorm(self.token_embedding(input_ids))
        encoder_outputs = self.encoder(hidden_states, (1, input_ids.shape[1]), **kwargs)
        last_hidden_state = self.final_layer_norm(encoder_outputs.last_hidden_state)
        pooled_output = F.normalize(last_hidden_state, dim=-1).mean(dim=1)
        return BaseModelOutputWithPooling(last_hidden_state=last_hidden_state, pooler_output=pooled_output)


class RWKVCLIPVisionModel(RWKVCLIPPreTrainedModel):
    """The RWKV-CLIP vision tower. `pooler_output` is the image embedding: the mean of the final patch states
    (there is no class token and no projection layer)."""

    config: RWKVCLIPVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _input_embed_layer = "patch_embedding"
    # `from_pretrained` on a full RWKV-CLIP checkpoint (or an image classifier's) loads `vision_model.*`
    _keys_to_ignore_on_load_unexpected = [r"^text_model\.", r"^logit_scale$", r"^classifier\."]

    def __init__(self, config: RWKVCLIPVisionConfig):
        super().__init__(config)
        self.embeddings = RWKVCLIPVisionEmbeddings(config)
        self.pre_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = RWKVCLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embedding

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        r"""
        Args:
            pixel_values: `(batch, channels, height, width)`, any size: sides that are not multiples of the patch
                size are zero-padded at the bottom/right.
            interpolate_pos_encoding: how to treat a patch grid other than the native one. `None` (default) and
                `True` resize the position embedding bicubically, as the original model does; `False` raises instead.

        Returns:
            `BaseModelOutputWithPooling` with `last_hidden_state` `(batch, patches, hidden)` after the final LayerNorm
            and `pooler_output` `(batch, hidden)`, their mean.
        """
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        hidden_states, grid_size = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        hidden_states = self.pre_layernorm(hidden_states)
        encoder_outputs = self.encoder(hidden_states, grid_size, **kwargs)
        last_hidden_state = self.post_layernorm(encoder_outputs.last_hidden_state)
        return BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state, pooler_output=last_hidden_state.mean(dim=1)
        )


@dataclass
class RWKVCLIPOutput(ModelOutput):
    r"""
    loss: symmetric contrastive loss, when `return_loss=True`.
    logits_per_image: `(image_batch, text_batch)` scaled cosine similarities.
    logits_per_text: `(text_batch, image_batch)`, the transpose.
    text_embeds: `(text_batch, hidden)` L2-normalised text embeddings.
    image_embeds: `(image_batch, hidden)` L2-normalised image embeddings.
    text_model_output / vision_model_output: the towers' `BaseModelOutputWithPooling`.
    """

    loss: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in self.values())


class RWKVCLIPModel(RWKVCLIPPreTrainedModel):
    """RWKV-CLIP dual encoder: `RWKVCLIPTextModel` + `RWKVCLIPVisionModel` + a learned temperature."""

    config: RWKVCLIPConfig

    def __init__(self, config: RWKVCLIPConfig):
        super().__init__(config)
        self.text_model = RWKVCLIPTextModel._from_config(config.text_config)
        self.vision_model = RWKVCLIPVisionModel._from_config(config.vision_config)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.post_init()

    @can_return_tuple
    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        """Text tower output; `pooler_output` `(batch, hidden)` is the (unnormalised) caption embedding."""
        return self.text_model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kwargs)

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        """Vision tower output; `pooler_output` `(batch, hidden)` is the (unnormalised) image embedding."""
        return self.vision_model(
            pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **kwargs
        )

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_loss: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> RWKVCLIPOutput:
        r"""
        Args:
            input_ids, attention_mask: captions (see `RWKVCLIPTextModel.forward`).
            pixel_values: images (see `RWKVCLIPVisionModel.forward`).
            return_loss: also return the symmetric contrastive loss of this batch (text i matches image i). It is
                local, as in transformers' CLIP: for the loss over the global batch of all ranks, and for
                contrastive gradient accumulation, use `rwkv_clip_hf.training.ContrastiveLoss` (what
                `RWKVCLIPTrainer` does).
            interpolate_pos_encoding: see `RWKVCLIPVisionModel.forward`.

        Called with images only (no `input_ids`, as `pipeline("image-feature-extraction")` does), it returns the
        image tower's `BaseModelOutputWithPooling` (`pooler_output` is the image embedding, see
        `get_image_features`).
        """
        if input_ids is None and pixel_values is not None and not return_loss:
            return self.get_image_features(
                pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs
            )
        vision_outputs = self.get_image_features(
            pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs
        )
        text_outputs = self.get_text_features(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        image_embeds = F.normalize(vision_outputs.pooler_output, dim=-1)
        text_embeds = F.normalize(text_outputs.pooler_output, dim=-1)
        logits_per_text = text_embeds @ image_embeds.t().to(text_embeds.device)
        logits_per_text = logits_per_text * self.logit_scale.exp().to(text_embeds.device)
        logits_per_image = logits_per_text.t()
        loss = None
        if return_loss:
            if text_embeds.shape[0] != image_embeds.shape[0]:
                raise ValueError(
                    f"return_loss needs one caption per image, got {text_embeds.shape[0]} captions and "
                    f"{image_embeds.shape[0]} images"
                )
            loss = rwkv_clip_loss(logits_per_text)
        return RWKVCLIPOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
        )


class RWKVCLIPForImageClassification(RWKVCLIPPreTrainedModel):
    """The RWKV-CLIP vision tower with a linear classifier on the image embedding (`pooler_output`).

    Built from an `RWKVCLIPConfig` (with `num_labels`, `id2label`), so `from_pretrained` on a full RWKV-CLIP
    checkpoint loads the vision tower and initialises the head. For linear probing, freeze the tower:
    `model.vision_model.requires_grad_(False)`.
    """

    main_input_name = "pixel_values"
    input_modalities = ("image",)
    # loading a full RWKV-CLIP checkpoint: the text tower and temperature are not used here
    _keys_to_ignore_on_load_unexpected = [r"^text_model\.", r"^logit_scale$"]

    def __init__(self, config: RWKVCLIPConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vision_model = RWKVCLIPVisionModel._from_config(config.vision_config)
        hidden = config.vision_config.hidden_size
        self.classifier = nn.Linear(hidden, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ImageClassifierOutput:
        r"""
        Args:
            pixel_values: images (see `RWKVCLIPVisionModel.forward`).
            labels: `(batch,)` class indices; when given, `loss` is their cross-entropy.
        """
        outputs = self.vision_model(
            pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **kwargs
        )
        logits = self.classifier(outputs.pooler_output)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config)
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


__all__ = [
    "RWKVCLIPForImageClassification",
    "RWKVCLIPModel",
    "RWKVCLIPOutput",
    "RWKVCLIPPreTrainedModel",
    "RWKVCLIPTextModel",
    "RWKVCLIPVisionModel",
    "canonical_text_ids",
    "canonical_text_positions",
    "token_shift",
]
