// Fused element-wise work of the RWKV-CLIP block on the CPU: one pass over the activations where PyTorch's
// composition makes several (and allocates a tensor per step). The Python side (rwkv_clip_hf.ops.block) holds the
// PyTorch composition these must match, the autograd formulas and the fallbacks.
//
//   token_shift_mix: delta = shift(x) - x and mixed[j] = x + delta * maa[j]   (docs/architecture.md section 4)
//       x (B, T, C) on a (grid_h, grid_w) token grid, T = grid_h * grid_w; each head's head_size channels split into
//       G groups; group g reads the token at (row + dy_g, col + dx_g), zero outside the grid.
//   token_shift_mix_backward: its gradients, from those of mixed (and of delta, when it was used): with
//       gD = grad_delta + sum_j grad_mixed[j] * maa[j],
//       grad_x = sum_j grad_mixed[j] - gD + shift^T(gD)   (shift^T: group g reads the token at (row - dy_g, col - dx_g))
//       grad_maa[j] = sum over tokens of grad_mixed[j] * delta   (accumulated in double)
//       One pass over the tokens: gD of the neighbour a token's group reads from is recomputed there.
//   group_norm_gate: GroupNorm(y; groups, weight, bias, eps) * gate, row by row   (section 5)
//   group_norm_gate_backward: its gradients; per row and group, with yhat = (y - mean) * rstd, a = yhat * weight + bias
//       and ga = grad * gate: grad_gate = grad * a, g = ga * weight,
//       grad_y = rstd * (g - mean(g) - yhat * mean(g * yhat)), grad_weight = sum over rows of ga * yhat,
//       grad_bias = sum over rows of ga   (the means and row sums accumulated in double)
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

// One token q of the backward. gmq[j] / gdq: grad_mixed[j] and grad_delta (or null) at q; src[g]: x at the token
// group g of q reads from (null outside the grid); inv[g]: the token whose group g reads q (index into gm / gd at
// the same strides, -1 outside the grid). acc (M, C): this task's grad_maa partial sums.
template <class T>
inline void shift_mix_backward_token(const T* __restrict xq, const T* const* src, const T* __restrict gm,
                                     const T* __restrict gd, int64_t q, const int64_t* inv, int64_t C,
                                     int64_t head_size, int64_t groups, const T* __restrict maa, int64_t M,
                                     int64_t gm_stride, double* __restrict acc, T* __restrict gD, T* __restrict gx) {
  const int64_t width = head_size / groups;
  // gD at q, and grad_x = sum_j grad_mixed[j] - gD
  if (gd) {
    const T* g = gd + q * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) gD[c] = g[c];
  } else {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) gD[c] = T(0);
  }
  for (int64_t j = 0; j < M; ++j) {
    const T* g = gm + j * gm_stride + q * C;
    const T* m = maa + j * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) gD[c] += g[c] * m[c];
  }
  {
    const T* g = gm + q * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) gx[c] = g[c] - gD[c];
  }
  for (int64_t j = 1; j < M; ++j) {
    const T* g = gm + j * gm_stride + q * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) gx[c] += g[c];
  }
  // grad_maa partials: grad_mixed[j] * delta, with delta = shifted - x recomputed group by group
  for (int64_t c0 = 0; c0 < C; c0 += head_size) {
    for (int64_t grp = 0; grp < groups; ++grp) {
      const int64_t begin = c0 + grp * width, end = begin + width;
      const T* s = src[grp];
      for (int64_t j = 0; j < M; ++j) {
        const T* g = gm + j * gm_stride + q * C;
        double* a = acc + j * C;
        if (s) {
#pragma omp simd
          for (int64_t c = begin; c < end; ++c) a[c] += (double)(g[c] * (s[c] - xq[c]));
        } else {
#pragma omp simd
          for (int64_t c = begin; c < end; ++c) a[c] += (double)(g[c] * (T(0) - xq[c]));
        }
      }
      // shift^T: the token p reading q through group grp passes its gD back, recomputed at p
      const int64_t p = inv[grp];
      if (p < 0) continue;
      if (gd) {
        const T* g = gd + p * C;
#pragma omp simd
        for (int64_t c = begin; c < end; ++c) gx[c] += g[c];
      }
      for (int64_t j = 0; j < M; ++j) {
        const T* g = gm + j * gm_stride + p * C;
        const T* m = maa + j * C;
#pragma omp simd
        for (int64_t c = begin; c < end; ++c) gx[c] += g[c] * m[c];
      }
    }
  }
}

BLOCK_CLONES void shift_mix_backward_f32(const float* xq, const float* const* src, const float* gm, const float* gd,
                                         int64_t q, const int64_t* inv, int64_t C, int64_t head_size, int64_t groups,
                                         const float* maa, int64_t M, int64_t gm_stride, double* acc, float* gD,
                                         float* gx) {
  shift_mix_backward_token(xq, src, gm, gd, q, inv, C, head_size, groups, maa, M, gm_stride, acc, gD, gx);
}

BLOCK_CLONES void shift_mix_backward_f64(const double* xq, const double* const* src, const double* gm,
                                         const double* gd, int64_t q, const int64_t* inv, int64_t C,
                                         int64_t head_size, int64_t groups, const double* maa, int64_t M,
                                         int64_t gm_stride, double* acc, double* gD, double* gx) {
  shift_mix_backward_token(xq, src, gm, gd, q, inv, C, head_size, groups, maa, M, gm_stride, acc, gD, gx);
}

inline void shift_mix_backward(const float* xq, const float* const* src, const float* gm, const float* gd, int64_t q,
                               const int64_t* inv, int64_t C, int64_t head_size, int64_t groups, const float* maa,
                               int64_t M, int64_t gm_stride, double* acc, float* gD, float* gx) {
  shift_mix_backward_f32(xq, src, gm, gd, q, inv, C, head_size, groups, maa, M, gm_stride, acc, gD, gx);
}
inline void shift_mix_backward(const double* xq, const double* const* src, const double* gm, const double* gd,
                               int64_t q, const int64_t* inv, int64_t C, int64_t head_size, int64_t groups,
                               const double* maa, int64_t M, int64_t gm_stride, double* acc, double* gD,
                               double* gx) {
  shift_mix_backward_f64(xq, src, gm, gd, q, inv, C, head_size, groups, maa, M, gm_stride, acc, gD, gx);
}

template <class T>
void token_shift_mix_backward_kernel(const at::Tensor& grad_mixed, const T* gd, const at::Tensor& x,
                                     const at::Tensor& maa, int64_t grid_h, int64_t grid_w,
                                     const std::vector<int64_t>& offsets, int64_t head_size, at::Tensor& grad_x,
                                     at::Tensor& grad_maa) {
  const int64_t B = x.size(0), T_ = x.size(1), C = x.size(2), M = maa.size(0);
  const int64_t groups = (int64_t)offsets.size() / 2, rows = B * T_;
  const T *xp = x.data_ptr<T>(), *mp = maa.data_ptr<T>(), *gm = grad_mixed.data_ptr<T>();
  T* gxp = grad_x.data_ptr<T>();
  // equal row ranges, one per thread at most, each with its own grad_maa partial sums, added in range order
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C * (M + 1), 1));
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows / grain));
  const int64_t per_task = (rows + tasks - 1) / tasks;
  std::vector<double> partial((size_t)tasks * M * C, 0.0);
  at::parallel_for(0, tasks, 1, [&](int64_t task_begin, int64_t task_end) {
    std::vector<T> gD(C);
    std::vector<const T*> src(groups);
    std::vector<int64_t> inv(groups);
    for (int64_t task = task_begin; task < task_end; ++task) {
      double* acc = partial.data() + (size_t)task * M * C;
      for (int64_t q = task * per_task; q < std::min(rows, (task + 1) * per_task); ++q) {
        const int64_t b = q / T_, t = q % T_, row = t / grid_w, col = t % grid_w;
        for (int64_t g = 0; g < groups; ++g) {
          const int64_t dy = offsets[2 * g], dx = offsets[2 * g + 1];
          const int64_t r2 = row + dy, c2 = col + dx;
          src[g] = (r2 >= 0 && r2 < grid_h && c2 >= 0 && c2 < grid_w) ? xp + (b * T_ + r2 * grid_w + c2) * C
                                                                        : nullptr;
          const int64_t r3 = row - dy, c3 = col - dx;
          inv[g] = (r3 >= 0 && r3 < grid_h && c3 >= 0 && c3 < grid_w) ? b * T_ + r3 * grid_w + c3 : -1;
        }
        shift_mix_backward(xp + q * C, src.data(), gm, gd, q, inv.data(), C, head_size, groups, mp, M, rows * C, acc,
                           gD.data(), gxp + q * C);
      }
    }
  });
  T* gmaa = grad_maa.data_ptr<T>();
  for (int64_t i = 0; i < M * C; ++i) {
    double sum = 0;
    for (int64_t task = 0; task < tasks; ++task) sum += partial[(size_t)task * M * C + i];
    gmaa[i] = (T)sum;
  }
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

// One row of the backward (see the top of the file). gy holds g between the two passes over a group.
template <class T>
inline void group_norm_gate_backward_row(const T* __restrict grad, const T* __restrict y, const T* __restrict gate,
                                         const T* __restrict weight, const T* __restrict bias, int64_t C,
                                         int64_t groups, double eps, T* __restrict gy, T* __restrict ggate,
                                         double* __restrict acc_w, double* __restrict acc_b) {
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
    double sum_g = 0, sum_gy = 0;
#pragma omp simd reduction(+ : sum_g, sum_gy)
    for (int64_t c = begin; c < end; ++c) {
      const T yhat = (y[c] - m) * rstd;
      ggate[c] = grad[c] * (yhat * weight[c] + bias[c]);
      const T ga = grad[c] * gate[c];
      acc_w[c] += (double)(ga * yhat);
      acc_b[c] += (double)ga;
      const T gw = ga * weight[c];
      gy[c] = gw;
      sum_g += (double)gw;
      sum_gy += (double)(gw * yhat);
    }
    const T mean_g = (T)(sum_g / (double)width), mean_gy = (T)(sum_gy / (double)width);
#pragma omp simd
    for (int64_t c = begin; c < end; ++c) {
      const T yhat = (y[c] - m) * rstd;
      gy[c] = rstd * (gy[c] - mean_g - yhat * mean_gy);
    }
  }
}

BLOCK_CLONES void group_norm_gate_backward_f32(const float* grad, const float* y, const float* gate, const float* weight,
                                               const float* bias, int64_t C, int64_t groups, double eps, float* gy,
                                               float* ggate, double* acc_w, double* acc_b) {
  group_norm_gate_backward_row(grad, y, gate, weight, bias, C, groups, eps, gy, ggate, acc_w, acc_b);
}

BLOCK_CLONES void group_norm_gate_backward_f64(const double* grad, const double* y, const double* gate,
                                               const double* weight, const double* bias, int64_t C, int64_t groups,
                                               double eps, double* gy, double* ggate, double* acc_w, double* acc_b) {
  group_norm_gate_backward_row(grad, y, gate, weight, bias, C, groups, eps, gy, ggate, acc_w, acc_b);
}

inline void group_norm_gate_backward_dispatch(const float* grad, const float* y, const float* gate, const float* weight,
                                              const float* bias, int64_t C, int64_t groups, double eps, float* gy,
                                              float* ggate, double* acc_w, double* acc_b) {
  group_norm_gate_backward_f32(grad, y, gate, weight, bias, C, groups, eps, gy, ggate, acc_w, acc_b);
}
inline void group_norm_gate_backward_dispatch(const double* grad, const double* y, const double* gate,
                                              const double* weight, const double* bias, int64_t C, int64_t groups,
                                              double eps, double* gy, double* ggate, double* acc_w, double* acc_b) {
  group_norm_gate_backward_f64(grad, y, gate, weight, bias, C, groups, eps, gy, ggate, acc_w, acc_b);
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

std::tuple<at::Tensor, at::Tensor> token_shift_mix_backward_cpu(const at::Tensor& grad_mixed,
                                                                const std::optional<at::Tensor>& grad_delta,
                                                                const at::Tensor& x, const at::Tensor& maa,
                                                                int64_t grid_h, int64_t grid_w, at::IntArrayRef offsets,
                                                                int64_t head_size) {
  const char* op = "token_shift_mix_backward";
  TORCH_CHECK(x.dim() == 3, op, ": x must be (batch, seq_len, channels), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64, got ", x.scalar_type());
  check_float(x, op, "x", x.scalar_type());
  check_float(maa, op, "maa", x.scalar_type());
  check_float(grad_mixed, op, "grad_mixed", x.scalar_type());
  const int64_t C = x.size(2);
  TORCH_CHECK(maa.dim() == 2 && maa.size(1) == C, op, ": maa must be (mixes, ", C, "), got ", maa.sizes());
  TORCH_CHECK(grad_mixed.dim() == 4 && grad_mixed.size(0) == maa.size(0) && grad_mixed.size(1) == x.size(0) &&
                  grad_mixed.size(2) == x.size(1) && grad_mixed.size(3) == C,
              op, ": grad_mixed must be (", maa.size(0), ", ", x.size(0), ", ", x.size(1), ", ", C, "), got ",
              grad_mixed.sizes());
  const bool has_delta = grad_delta.has_value() && grad_delta->defined();
  if (has_delta) {
    check_float(*grad_delta, op, "grad_delta", x.scalar_type());
    TORCH_CHECK(grad_delta->sizes() == x.sizes(), op, ": grad_delta has shape ", grad_delta->sizes(), ", expected ",
                x.sizes());
  }
  TORCH_CHECK(grid_h >= 0 && grid_w >= 0 && grid_h * grid_w == x.size(1), op, ": a ", grid_h, " x ", grid_w,
              " grid does not hold ", x.size(1), " tokens");
  TORCH_CHECK(offsets.size() >= 2 && offsets.size() % 2 == 0, op,
              ": offsets must be (dy, dx) pairs, flattened, got ", offsets.size(), " numbers");
  const int64_t groups = (int64_t)offsets.size() / 2;
  TORCH_CHECK(head_size > 0 && C % head_size == 0 && head_size % groups == 0, op, ": head_size ", head_size,
              " must divide the ", C, " channels and be divisible by the ", groups, " shift groups");
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_maa = at::zeros_like(maa);
  if (x.numel() == 0) return {grad_x, grad_maa};
  const std::vector<int64_t> pairs(offsets.begin(), offsets.end());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "token_shift_mix_backward", [&] {
    const scalar_t* gd = has_delta ? grad_delta->data_ptr<scalar_t>() : nullptr;
    token_shift_mix_backward_kernel<scalar_t>(grad_mixed, gd, x, maa, grid_h, grid_w, pairs, head_size, grad_x,
                                              grad_maa);
  });
  return {grad_x, grad_maa};
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_gate_backward_cpu(
    const at::Tensor& grad, const at::Tensor& y, const at::Tensor& gate, const at::Tensor& weight,
    const at::Tensor& bias, int64_t groups, double eps) {
  const char* op = "group_norm_gate_backward";
  TORCH_CHECK(y.dim() == 2, op, ": y must be (rows, channels), got ", y.sizes());
  TORCH_CHECK(y.scalar_type() == at::kFloat || y.scalar_type() == at::kDouble, op,
              ": y must be float32 or float64, got ", y.scalar_type());
  check_float(grad, op, "grad", y.scalar_type());
  check_float(y, op, "y", y.scalar_type());
  check_float(gate, op, "gate", y.scalar_type());
  check_float(weight, op, "weight", y.scalar_type());
  check_float(bias, op, "bias", y.scalar_type());
  const int64_t C = y.size(1), R = y.size(0);
  TORCH_CHECK(grad.sizes() == y.sizes() && gate.sizes() == y.sizes(), op, ": grad and gate must have y's shape ",
              y.sizes(), ", got ", grad.sizes(), " and ", gate.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == C && bias.dim() == 1 && bias.size(0) == C, op,
              ": weight and bias must be (", C, ",), got ", weight.sizes(), " and ", bias.sizes());
  TORCH_CHECK(groups > 0 && C % groups == 0, op, ": ", groups, " groups do not divide ", C, " channels");
  at::Tensor gy = at::empty_like(y), ggate = at::empty_like(y);
  at::Tensor gw = at::zeros_like(weight), gb = at::zeros_like(bias);
  if (y.numel() == 0) return {gy, ggate, gw, gb};
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "group_norm_gate_backward", [&] {
    const scalar_t *grp = grad.data_ptr<scalar_t>(), *yp = y.data_ptr<scalar_t>(), *gp = gate.data_ptr<scalar_t>();
    const scalar_t *wp = weight.data_ptr<scalar_t>(), *bp = bias.data_ptr<scalar_t>();
    scalar_t *gyp = gy.data_ptr<scalar_t>(), *ggp = ggate.data_ptr<scalar_t>();
    // equal row ranges, one per thread at most, each with its own weight / bias partial sums, added in range order
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
    const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), R / grain));
    const int64_t per_task = (R + tasks - 1) / tasks;
    std::vector<double> partial((size_t)tasks * 2 * C, 0.0);
    at::parallel_for(0, tasks, 1, [&](int64_t task_begin, int64_t task_end) {
      for (int64_t task = task_begin; task < task_end; ++task) {
        double* acc_w = partial.data() + (size_t)task * 2 * C;
        for (int64_t r = task * per_task; r < std::min(R, (task + 1) * per_task); ++r)
          group_norm_gate_backward_dispatch(grp + r * C, yp + r * C, gp + r * C, wp, bp, C, groups, eps, gyp + r * C,
                                            ggp + r * C, acc_w, acc_w + C);
      }
    });
    scalar_t *gwp = gw.data_ptr<scalar_t>(), *gbp = gb.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      double sw = 0, sb = 0;
      for (int64_t task = 0; task < tasks; ++task) {
        sw += partial[(size_t)task * 2 * C + c];
        sb += partial[(size_t)task * 2 * C + C + c];
      }
      gwp[c] = (scalar_t)sw;
      gbp[c] = (scalar_t)sb;
    }
  });
  return {gy, ggate, gw, gb};
}

}  // namespace bi_wkv
