// Fused element-wise parts of the RWKV-CLIP block (block_cpu.cpp): declarations for the op registrations.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace bi_wkv {

// delta = shift(x) - x (or an empty tensor without with_delta) and mixed[j] = x + delta * maa[j], (M, B, T, C)
std::tuple<at::Tensor, at::Tensor> token_shift_mix_cpu(const at::Tensor& x, const at::Tensor& maa, int64_t grid_h,
                                                       int64_t grid_w, at::IntArrayRef offsets, int64_t head_size,
                                                       bool with_delta);

// the gradients of x and maa from those of mixed and (when given) delta
std::tuple<at::Tensor, at::Tensor> token_shift_mix_backward_cpu(const at::Tensor& grad_mixed,
                                                                const std::optional<at::Tensor>& grad_delta,
                                                                const at::Tensor& x, const at::Tensor& maa,
                                                                int64_t grid_h, int64_t grid_w, at::IntArrayRef offsets,
                                                                int64_t head_size);

// GroupNorm(y) * gate over rows of y (rows, channels)
at::Tensor group_norm_gate_cpu(const at::Tensor& y, const at::Tensor& gate, const at::Tensor& weight,
                               const at::Tensor& bias, int64_t groups, double eps);

// its gradients (grad_y, grad_gate, grad_weight, grad_bias) from grad (rows, channels)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_gate_backward_cpu(
    const at::Tensor& grad, const at::Tensor& y, const at::Tensor& gate, const at::Tensor& weight,
    const at::Tensor& bias, int64_t groups, double eps);

}  // namespace bi_wkv
