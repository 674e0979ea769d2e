// Fused element-wise work of the RWKV-CLIP block on the CPU: one pass over the activations where PyTorch's
// composition makes several (and allocates a tensor per step). The Python side (rwkv_clip_hf.ops.block) holds the
// PyTorch composition these must match, the autograd formulas and the fallbacks.
//
//   token_shift_mix: delta = shift(x) - x and mixed[j] = x + delta * maa[j]   (docs/architecture.md section 4)
//       x (B, T, C) on a (grid_h, grid_w) token grid, T = grid_h * grid_w; each head's head_size channels split into
//       G groups; group g reads the token at (row + dy_g, col + dx_g), zero outside the grid.
//   group_norm_gate: GroupNorm(y; groups, weight, bias, eps) * gate, row by row   (section 5)
//
// Rows are independent, so both run parallel over tokens with at::parallel_for; the inner loops run over
// contiguous channels and are compiled for AVX-512, AVX2 + FMA and the x86-64 baseline (as in bi_wkv_cpu.cpp).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "block.h"

namespace bi_wkv {
namespace {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define BLOCK_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BLOCK_CLONES
#endif

// One token: d = shifted - x over the C channels (shifted gathered group by group), then out[j] = x + d * maa[j].
template <class T>
inline void shift_mix_token(const T* __restrict x, const T* const* src, int64_t C, int64_t head_size, int64_t groups,
                            const T* __restrict maa, int64_t M, int64_t out_stride, T* __restrict d,
                            T* __restrict out) {
  const int64_t width = head_size / groups;
  for (int64_t c0 = 0; c0 < C; c0 += head_size) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t begin = c0 + g * width;
      const T* s = src[g];
      if (s) {
#pragma omp simd
        for (int64_t c = begin; c < begin + width; ++c) d[c] = s[c] - x[c];
      } else {
#pragma omp simd
        for (int64_t c = begin; c < begin + width; ++c) d[c] = T(0) - x[c];
      }
    }
  }
  for (int64_t j = 0; j < M; ++j) {
    const T* m = maa + j * C;
    T* o = out + j * out_stride;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) o[c] = x[c] + d[c] * m[c];
  }
}

BLOCK_CLONES void shift_mix_f32(const float* x, const float* const* src, int64_t C, int64_t head_size, int64_t groups,
                                const float* maa, int64_t M, int64_t out_stride, float* d, float* out) {
  shift_mix_token(x, src, C, head_size, groups, maa, M, out_stride, d, out);
}

BLOCK_CLONES void shift_mix_f64(const double* x, const double* const* src, int64_t C, int64_t head_size,
                                int64_t groups, const double* maa, int64_t M, int64_t out_stride, double* d,
                                double* out) {
  shift_mix_token(x, src, C, head_size, groups, maa, M, out_stride, d, out);
}

inline void shift_mix(const float* x, const float* const* src, int64_t C, int64_t head_size, int64_t groups,
                      const float* maa, int64_t M, int64_t out_stride, float* d, float* out) {
  shift_mix_f32(x, src, C, head_size, groups, maa, M, out_stride, d, out);
}
inline void shift_mix(const double* x, const double* const* src, int64_t C, int64_t head_size, int64_t groups,
                      const double* maa, int64_t M, int64_t out_stride, double* d, double* out) {
  shift_mix_f64(x, src, C, head_size, groups, maa, M, out_stride, d, out);
}

template <class T>
void token_shift_mix_kernel(const at::Tensor& x, const at::Tensor& maa, int64_t grid_h, int64_t grid_w,
                            const std::vector<int64_t>& offsets, int64_t head_size, at::Tensor& delta,
                            at::Tensor& mixed) {
  const int64_t B = x.size(0), T_ = x.size(1), C = x.size(2), M = maa.size(0);
  const int64_t groups = (int64_t)offsets.size() / 2;
  const T* xp = x.data_ptr<T>();
  const T* mp = maa.data_ptr<T>();
  T* dp = delta.numel() ? delta.data_ptr<T>() : nullptr;
  T* op = mixed.data_ptr<T>();
  const int64_t out_stride = B * T_ * C;
  // about 16k channels of work per task: rows are cheap, so many per task
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C * (M + 1), 1));
  at::parallel_for(0, B * T_, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(dp ? 0 : C);
    std::vector<const T*> src(groups);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b = p / T_, t = p % T_, row = t / grid_w, col = t % grid_w;
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t r2 = row + offsets[2 * g], c2 = col + offsets[2 * g + 1];
        const bool inside = r2 >= 0 && r2 < grid_h && c2 >= 0 && c2 < grid_w;
        src[g] = inside ? xp + (b * T_ + r2 * grid_w + c2) * C : nullptr;
      }
      T* d = dp ? dp + p * C : scratch.data();
      shift_mix(xp + p * C, src.data(), C, head_size, groups, mp, M, out_stride, d, op + p * C);
    }
  });
}

// One row: per group of `width` channels, mean and biased variance (accumulated in double), then
// out = (y - mean) * rstd * weight + bias, times gate.
template <class T>
inline void group_norm_gate_row(const T* __restrict y, const T* __restrict gate, const T* __restrict weight,
                                const T* __restrict bias, int64_t C, int64_t groups, double eps, T* __restrict out) {
  const int64_t width = C / groups;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t begin = g * width, end = begin + width;
    double sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = begin; c < end; ++c) sum += (double)y[c];
    const double mean = sum / (double)width;
    double sq = 0;
#pragma omp simd reduction(+ : sq)
    for (int64_t c = begin; c < end; ++c) {
      const double centred = (double)y[c] - mean;
      sq += centred * centred;
    }
    const T rstd = (T)(1.0 / std::sqrt(sq / (double)width + eps));
    const T m = (T)mean;
#pragma omp simd
    for (int64_t c = begin; c < end; ++c) out[c] = ((y[c] - m) * rstd * weight[c] + bias[c]) * gate[c];
  }
}

BLOCK_CLONES void group_norm_gate_f32(const float* y, const float* gate, const float* weight, const float* bias,
                                      int64_t C, int64_t groups, double eps, float* out) {
  group_norm_gate_row(y, gate, weight, bias, C, groups, eps, out);
}

BLOCK_CLONES void group_norm_gate_f64(const double* y, const double* gate, const double* weight, const double* bias,
                                      int64_t C, int64_t groups, double eps, double* out) {
  group_norm_gate_row(y, gate, weight, bias, C, groups, eps, out);
}

inline void group_norm_gate_dispatch(const float* y, const float* gate, const float* weight, const float* bias,
                                     int64_t C, int64_t groups, double eps, float* out) {
  group_norm_gate_f32(y, gate, weight, bias, C, groups, eps, out);
}
inline void group_norm_gate_dispatch(const double* y, const double* gate, const double* weight, const double* bias,
                                     int64_t C, int64_t groups, double eps, double* out) {
  group_norm_gate_f64(y, gate, weight, bias, C, groups, eps, out);
}

void check_float(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " has dtype ", t.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> token_shift_mix_cpu(const at::Tensor& x, const at::Tensor& maa, int64_t grid_h,
                                                       int64_t grid_w, at::IntArrayRef offsets, int64_t head_size,
                                                       bool with_delta) {
  const char* op = "token_shift_mix";
  TORCH_CHECK(x.dim() == 3, op, ": x must be (batch, seq_len, channels), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64, got ", x.scalar_type());
  check_float(x, op, "x", x.scalar_type());
  check_float(maa, op, "maa", x.scalar_type());
  const int64_t C = x.size(2);
  TORCH_CHECK(maa.dim() == 2 && maa.size(1) == C, op, ": maa must be (mixes, ", C, "), got ", maa.sizes());
  TORCH_CHECK(grid_h >= 0 && grid_w >= 0 && grid_h * grid_w == x.size(1), op, ": a ", grid_h, " x ", grid_w,
              " grid does not hold ", x.size(1), " tokens");
  TORCH_CHECK(offsets.size() >= 2 && offsets.size() % 2 == 0, op,
              ": offsets must be (dy, dx) pairs, flattened, got ", offsets.size(), " numbers");
  const int64_t groups = (int64_t)offsets.size() / 2;
  TORCH_CHECK(head_size > 0 && C % head_size == 0 && head_size % groups == 0, op, ": head_size ", head_size,
              " must divide the ", C, " channels and be divisible by the ", groups, " shift groups");
  at::Tensor delta = with_delta ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor mixed = at::empty({maa.size(0), x.size(0), x.size(1), C}, x.options());
  if (x.numel() == 0 || maa.size(0) == 0) return {delta, mixed};
  const std::vector<int64_t> pairs(offsets.begin(), offsets.end());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "token_shift_mix", [&] {
    token_shift_mix_kernel<scalar_t>(x, maa, grid_h, grid_w, pairs, head_size, delta, mixed);
  });
  return {delta, mixed};
}

at::Tensor group_norm_gate_cpu(const at::Tensor& y, const at::Tensor& gate, const at::Tensor& weight,
                               const at::Tensor& bias, int64_t groups, double eps) {
  const char* op = "group_norm_gate";
  TORCH_CHECK(y.dim() == 2, op, ": y must be (rows, channels), got ", y.sizes());
  TORCH_CHECK(y.scalar_type() == at::kFloat || y.scalar_type() == at::kDouble, op,
              ": y must be float32 or float64, got ", y.scalar_type());
  check_float(y, op, "y", y.scalar_type());
  check_float(gate, op, "gate", y.scalar_type());
  check_float(weight, op, "weight", y.scalar_type());
  check_float(bias, op, "bias", y.scalar_type());
  const int64_t C = y.size(1);
  TORCH_CHECK(gate.sizes() == y.sizes(), op, ": gate has shape ", gate.sizes(), ", expected ", y.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == C && bias.dim() == 1 && bias.size(0) == C, op,
              ": weight and bias must be (", C, ",), got ", weight.sizes(), " and ", bias.sizes());
  TORCH_CHECK(groups > 0 && C % groups == 0, op, ": ", groups, " groups do not divide ", C, " channels");
  at::Tensor out = at::empty_like(y);
  const int64_t R = y.size(0);
  if (y.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "group_norm_gate", [&] {
    const scalar_t *yp = y.data_ptr<scalar_t>(), *gp = gate.data_ptr<scalar_t>();
    const scalar_t *wp = weight.data_ptr<scalar_t>(), *bp = bias.data_ptr<scalar_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
    at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        group_norm_gate_dispatch(yp + r * C, gp + r * C, wp, bp, C, groups, eps, op_ + r * C);
    });
  });
  return out;
}

}  // namespace bi_wkv
