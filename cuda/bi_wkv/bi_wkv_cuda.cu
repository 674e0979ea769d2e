// Bi-WKV on CUDA. Any T (nothing sized by T on the device), head sizes N <= 128 with N % 4 == 0, float32,
// bfloat16 and float16 inputs, float32 state and accumulation.
//
// Every piece of the operator is one of two scans of an (N, N) state S = sum of decayed a_i b_i^T, with
// the decay acting on the rows (ARCHITECTURE.md section 7):
//   column scan: out_t[c] = sum_d x_t[d] S_t[d, c]   (+ the bonus (x_t . (u * a_t)) b_t[c] forwards)
//   row scan:    out_t[d] = sum_c S_t[d, c] z_t[c]
// forward y = column scan (x, a, b) = (r, k, v); dv = column scan (k, r, gy); dr = row scan (k, v; gy);
// dk = row scan (r, gy; v); dw from the exact cross terms of a per-row kernel (see cross_kernel).
//
// Layout on the hardware, unlike the one-thread-per-channel original:
//   * the two directions run as separate blocks (grid.y), and the state is split across blocks by 16
//     columns (or rows) and inside a block across 4 lanes per column, so a thread holds N / 4 state
//     values in registers and the 4 partial sums meet through two warp shuffles;
//   * r, k, v, w of TT tokens are staged in shared memory per tile with coalesced loads (the decay
//     exp(-exp(w)) computed once per element there), so a block synchronises once per TT tokens;
//   * shared-memory reads are broadcasts or 4 consecutive words per warp: no bank conflicts.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "bi_wkv.h"

namespace bi_wkv {
namespace {

constexpr int TT = 16;     // tokens per shared-memory tile
constexpr int GROUP = 16;  // state columns (column scan) or rows (row scans) per block
constexpr int LANES = 4;   // threads sharing one column or row
constexpr int THREADS = GROUP * LANES;
constexpr int CROSS_CHUNK = 32;  // tokens between checkpoints of cross_kernel

__device__ __forceinline__ float decay_of(float w) { return expf(-expf(w)); }

__device__ __forceinline__ float lane_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x;
}

struct Geometry {
  int T, H, N;
  int64_t base;     // offset of (b, t = 0, h, 0)
  int64_t tstride;  // H * N
  __device__ Geometry(int b, int h, int T_, int H_, int N_)
      : T(T_), H(H_), N(N_), base(((int64_t)b * T_ * H_ + h) * N_), tstride((int64_t)H_ * N_) {}
  // token visited at step s of direction dir (0: forwards, 1: backwards)
  __device__ int token(int dir, int s) const { return dir ? T - 1 - s : s; }
  __device__ int64_t at(int t, int c) const { return base + (int64_t)t * tstride + c; }
};

// dst[i][j] = f(src[token(s0 + i), col0 + j]) for i < count, j < width and col0 + j < N; zero elsewhere.
template <class scalar_t, bool DECAY>
__device__ void load_tile(float* dst, int width, const scalar_t* __restrict__ src, const Geometry& g, int dir,
                          int s0, int count, int col0) {
  for (int idx = threadIdx.x; idx < TT * width; idx += THREADS) {
    const int i = idx / width, j = idx % width, c = col0 + j;
    float value = 0.f;
    if (i < count && c < g.N) {
      value = static_cast<float>(src[g.at(g.token(dir, s0 + i), c)]);
      if (DECAY) value = decay_of(value);
    }
    dst[idx] = value;
  }
}

template <class scalar_t, int MAXR>
__global__ void __launch_bounds__(THREADS) col_scan_kernel(const scalar_t* __restrict__ x,
                                                           const scalar_t* __restrict__ a,
                                                           const scalar_t* __restrict__ b,
                                                           const scalar_t* __restrict__ w,
                                                           const float* __restrict__ u, float* __restrict__ out,
                                                           int B, int T, int H, int N) {
  constexpr int NP = LANES * MAXR;  // state rows, zero padded beyond N
  __shared__ float sx[TT * NP], sa[TT * NP], sd[TT * NP], sb[TT * GROUP];
  const int bh = blockIdx.x, dir = blockIdx.y, col0 = blockIdx.z * GROUP;
  const Geometry g(bh / H, bh % H, T, H, N);
  const int lane = threadIdx.x % LANES, group = threadIdx.x / LANES, c = col0 + group;
  float* o = out + (int64_t)dir * B * T * H * N;

  float S[MAXR], ua[MAXR];  // rows d = m * LANES + lane of column c
#pragma unroll
  for (int m = 0; m < MAXR; ++m) {
    const int d = m * LANES + lane;
    S[m] = 0.f;
    ua[m] = (u != nullptr && dir == 0 && d < N) ? u[(int64_t)(bh % H) * N + d] : 0.f;
  }
  for (int s0 = 0; s0 < T; s0 += TT) {
    const int count = min(TT, T - s0);
    __syncthreads();  // the previous tile is consumed
    load_tile<scalar_t, false>(sx, NP, x, g, dir, s0, count, 0);
    load_tile<scalar_t, false>(sa, NP, a, g, dir, s0, count, 0);
    load_tile<scalar_t, true>(sd, NP, w, g, dir, s0, count, 0);
    load_tile<scalar_t, false>(sb, GROUP, b, g, dir, s0, count, col0);
    __syncthreads();
    for (int i = 0; i < count; ++i) {
      const float bc = sb[i * GROUP + group];
      const float* xi = sx + i * NP;
      const float* ai = sa + i * NP;
      const float* di = sd + i * NP;
      float acc = 0.f, bonus = 0.f;
#pragma unroll
      for (int m = 0; m < MAXR; ++m) {
        const int d = m * LANES + lane;
        acc = fmaf(xi[d], S[m], acc);
        bonus = fmaf(xi[d] * ua[m], ai[d], bonus);
        S[m] = fmaf(di[d], S[m], ai[d] * bc);
      }
      acc = lane_sum(fmaf(bonus, bc, acc));
      if (lane == 0 && c < N) o[g.at(g.token(dir, s0 + i), c)] = acc;
    }
  }
}

template <class scalar_t, int MAXR>
__global__ void __launch_bounds__(THREADS) row_scan_kernel(const scalar_t* __restrict__ a,
                                                           const scalar_t* __restrict__ b,
                                                           const scalar_t* __restrict__ z,
                                                           const scalar_t* __restrict__ w, float* __restrict__ out,
                                                           int B, int T, int H, int N) {
  constexpr int NP = LANES * MAXR;  // state columns, zero padded beyond N
  __shared__ float sa[TT * GROUP], sd[TT * GROUP], sb[TT * NP], sz[TT * NP];
  const int bh = blockIdx.x, dir = blockIdx.y, row0 = blockIdx.z * GROUP;
  const Geometry g(bh / H, bh % H, T, H, N);
  const int lane = threadIdx.x % LANES, group = threadIdx.x / LANES, d = row0 + group;
  float* o = out + (int64_t)dir * B * T * H * N;

  float S[MAXR];  // columns c = m * LANES + lane of row d
#pragma unroll
  for (int m = 0; m < MAXR; ++m) S[m] = 0.f;
  for (int s0 = 0; s0 < T; s0 += TT) {
    const int count = min(TT, T - s0);
    __syncthreads();
    load_tile<scalar_t, false>(sa, GROUP, a, g, dir, s0, count, row0);
    load_tile<scalar_t, true>(sd, GROUP, w, g, dir, s0, count, row0);
    load_tile<scalar_t, false>(sb, NP, b, g, dir, s0, count, 0);
    load_tile<scalar_t, false>(sz, NP, z, g, dir, s0, count, 0);
    __syncthreads();
    for (int i = 0; i < count; ++i) {
      const float ad = sa[i * GROUP + group], dd = sd[i * GROUP + group];
      const float* bi = sb + i * NP;
      const float* zi = sz + i * NP;
      float acc = 0.f;
#pragma unroll
      for (int m = 0; m < MAXR; ++m) {
        const int c = m * LANES + lane;
        acc = fmaf(S[m], zi[c], acc);
        S[m] = fmaf(dd, S[m], ad * bi[c]);
      }
      acc = lane_sum(acc);
      if (lane == 0 && d < N) o[g.at(g.token(dir, s0 + i), d)] = acc;
    }
  }
}

// X_j[d] = A_j[d, :] . Gb_j[d, :] + B_j[d, :] . Gf_j[d, :], with A / B the forward / backward k v^T states
// and Gf / Gb the forward / backward r gy^T states; the caller turns it into dw (see bi_wkv_cpu.cpp for why
// this form and not a difference of running sums). Rows are independent: a block owns 16 rows, 4 lanes per
// row. A backward sweep checkpoints (B, Gb) every CROSS_CHUNK tokens; the forward sweep rebuilds them chunk
// by chunk into per-thread global scratch (mostly L2 resident) and meets them with (A, Gf).
template <class scalar_t, int MAXR>
__global__ void __launch_bounds__(THREADS) cross_kernel(const scalar_t* __restrict__ r,
                                                        const scalar_t* __restrict__ k,
                                                        const scalar_t* __restrict__ v,
                                                        const scalar_t* __restrict__ gy,
                                                        const scalar_t* __restrict__ w, float* __restrict__ ckpt,
                                                        float* __restrict__ rebuilt, float* __restrict__ X, int T,
                                                        int H, int N, int chunks) {
  constexpr int NP = LANES * MAXR;
  const int bh = blockIdx.x, row0 = blockIdx.y * GROUP;
  const Geometry g(bh / H, bh % H, T, H, N);
  const int lane = threadIdx.x % LANES, group = threadIdx.x / LANES, d = row0 + group;
  const bool row_ok = d < N;
  // this thread's slices: checkpoints [chunks][2][MAXR], rebuilt states [CROSS_CHUNK][2][MAXR]
  float* my_ckpt = ckpt + (((int64_t)bh * GROUP * gridDim.y + blockIdx.y * GROUP + group) * LANES + lane) *
                              (int64_t)chunks * 2 * MAXR;
  float* my_rebuilt = rebuilt + (((int64_t)bh * GROUP * gridDim.y + blockIdx.y * GROUP + group) * LANES + lane) *
                                    (int64_t)CROSS_CHUNK * 2 * MAXR;

  auto step = [&](int t, float* S, float* G) {
    float kd = 0.f, rd = 0.f, dd = 0.f;
    if (row_ok) {
      const int64_t off = g.at(t, d);
      kd = static_cast<float>(k[off]);
      rd = static_cast<float>(r[off]);
      dd = decay_of(static_cast<float>(w[off]));
    }
#pragma unroll
    for (int m = 0; m < MAXR; ++m) {
      const int c = m * LANES + lane;
      float vc = 0.f, gc = 0.f;
      if (c < N) {
        vc = static_cast<float>(v[g.at(t, c)]);
        gc = static_cast<float>(gy[g.at(t, c)]);
      }
      S[m] = fmaf(dd, S[m], kd * vc);
      G[m] = fmaf(dd, G[m], rd * gc);
    }
  };

  float S[MAXR], G[MAXR];
#pragma unroll
  for (int m = 0; m < MAXR; ++m) S[m] = G[m] = 0.f;
  for (int t = T - 1; t >= 0; --t) {
    if (t == T - 1 || (t + 1) % CROSS_CHUNK == 0) {  // t is the last token of its chunk
      float* slot = my_ckpt + (int64_t)(t / CROSS_CHUNK) * 2 * MAXR;
#pragma unroll
      for (int m = 0; m < MAXR; ++m) slot[m] = S[m], slot[MAXR + m] = G[m];
    }
    step(t, S, G);
  }

  float A[MAXR], Gf[MAXR];
#pragma unroll
  for (int m = 0; m < MAXR; ++m) A[m] = Gf[m] = 0.f;
  for (int chunk = 0; chunk < chunks; ++chunk) {
    const int start = chunk * CROSS_CHUNK, stop = min(T, start + CROSS_CHUNK);
    const float* saved = my_ckpt + (int64_t)chunk * 2 * MAXR;
#pragma unroll
    for (int m = 0; m < MAXR; ++m) S[m] = saved[m], G[m] = saved[MAXR + m];
    for (int t = stop - 1; t >= start; --t) {
      float* slot = my_rebuilt + (int64_t)(t - start) * 2 * MAXR;
#pragma unroll
      for (int m = 0; m < MAXR; ++m) slot[m] = S[m], slot[MAXR + m] = G[m];
      step(t, S, G);
    }
    for (int t = start; t < stop; ++t) {
      const float* slot = my_rebuilt + (int64_t)(t - start) * 2 * MAXR;
      float acc = 0.f;
#pragma unroll
      for (int m = 0; m < MAXR; ++m) acc = fmaf(A[m], slot[MAXR + m], fmaf(slot[m], Gf[m], acc));
      acc = lane_sum(acc);
      if (lane == 0 && row_ok) X[g.at(t, d)] = acc;
      step(t, A, Gf);
    }
  }
  (void)NP;
}

template <class F>
void dispatch_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat:
      f(float{});
      break;
    case at::kBFloat16:
      f(c10::BFloat16{});
      break;
    case at::kHalf:
      f(c10::Half{});
      break;
    default:
      TORCH_CHECK(false, "bi_wkv (CUDA): inputs must be float32, bfloat16 or float16, got ", dtype);
  }
}

// MAXR = state values per thread along the split dimension: N <= 4 * MAXR
template <class F>
void dispatch_size(int64_t N, F&& f) {
  TORCH_CHECK(N % 4 == 0 && N > 0 && N <= 128, "bi_wkv (CUDA): head_size must be a multiple of 4 up to 128, got ", N);
  if (N <= 32) {
    f(std::integral_constant<int, 8>{});
  } else if (N <= 64) {
    f(std::integral_constant<int, 16>{});
  } else if (N <= 80) {
    f(std::integral_constant<int, 20>{});
  } else if (N <= 96) {
    f(std::integral_constant<int, 24>{});
  } else {
    f(std::integral_constant<int, 32>{});
  }
}

struct Shape {
  int64_t B, T, H, N;
  explicit Shape(const at::Tensor& r) : B(r.size(0)), T(r.size(1)), H(r.size(2)), N(r.size(3)) {
    TORCH_CHECK(B * H < (int64_t(1) << 31) && T < (int64_t(1) << 31), "bi_wkv (CUDA): tensor too large");
  }
  dim3 grid(int directions) const { return dim3((unsigned)(B * H), directions, (unsigned)((N + GROUP - 1) / GROUP)); }
};

// both directions of a column scan: (2, B, T, H, N) float32
at::Tensor col_scan(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b, const at::Tensor& w,
                    const at::Tensor& u) {
  const Shape s(x);
  at::Tensor out = at::empty({2, s.B, s.T, s.H, s.N}, x.options().dtype(at::kFloat));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    dispatch_size(s.N, [&](auto maxr) {
      col_scan_kernel<scalar_t, decltype(maxr)::value><<<s.grid(2), THREADS, 0, stream>>>(
          x.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
          u.data_ptr<float>(), out.data_ptr<float>(), (int)s.B, (int)s.T, (int)s.H, (int)s.N);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor row_scan(const at::Tensor& a, const at::Tensor& b, const at::Tensor& z, const at::Tensor& w) {
  const Shape s(a);
  at::Tensor out = at::empty({2, s.B, s.T, s.H, s.N}, a.options().dtype(at::kFloat));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(a.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    dispatch_size(s.N, [&](auto maxr) {
      row_scan_kernel<scalar_t, decltype(maxr)::value><<<s.grid(2), THREADS, 0, stream>>>(
          a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
          out.data_ptr<float>(), (int)s.B, (int)s.T, (int)s.H, (int)s.N);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor cross_terms(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& gy,
                       const at::Tensor& w) {
  const Shape s(r);
  const int chunks = (int)((s.T + CROSS_CHUNK - 1) / CROSS_CHUNK);
  const int64_t row_blocks = (s.N + GROUP - 1) / GROUP;
  at::Tensor X = at::empty({s.B, s.T, s.H, s.N}, r.options().dtype(at::kFloat));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(r.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    dispatch_size(s.N, [&](auto maxr) {
      constexpr int MAXR = decltype(maxr)::value;
      const int64_t threads = s.B * s.H * row_blocks * THREADS;
      at::Tensor ckpt = at::empty({threads * chunks * 2 * MAXR}, X.options());
      at::Tensor rebuilt = at::empty({threads * CROSS_CHUNK * 2 * MAXR}, X.options());
      cross_kernel<scalar_t, MAXR><<<dim3((unsigned)(s.B * s.H), (unsigned)row_blocks), THREADS, 0, stream>>>(
          r.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), gy.data_ptr<scalar_t>(),
          w.data_ptr<scalar_t>(), ckpt.data_ptr<float>(), rebuilt.data_ptr<float>(), X.data_ptr<float>(), (int)s.T,
          (int)s.H, (int)s.N, chunks);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return X;
}

}  // namespace

at::Tensor forward_cuda(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
                        const at::Tensor& u) {
  check_inputs(r, k, v, w, u, at::kCUDA);
  const c10::cuda::CUDAGuard guard(r.device());
  if (r.numel() == 0) return at::zeros_like(r);
  return col_scan(r, k, v, w, u).sum(0).to(r.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& gy, const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
    const at::Tensor& u) {
  check_inputs(r, k, v, w, u, at::kCUDA);
  check_like(gy, r, "gy");
  const c10::cuda::CUDAGuard guard(r.device());
  if (r.numel() == 0) {
    auto z = [&] { return at::zeros_like(r); };
    return {z(), z(), z(), z(), at::zeros_like(u)};
  }
  const auto dtype = r.scalar_type();
  const at::Tensor uf = u.view({1, 1, r.size(2), r.size(3)});
  // q_t = v_t . gy_t, the weight of the bonus terms
  const at::Tensor q = (v.to(at::kFloat) * gy.to(at::kFloat)).sum(-1, true);
  const at::Tensor rf = r.to(at::kFloat), kf = k.to(at::kFloat), wf = w.to(at::kFloat);
  at::Tensor dv = col_scan(k, r, gy, w, u).sum(0).to(dtype);
  at::Tensor dr = (row_scan(k, v, gy, w).sum(0) + uf * kf * q).to(dtype);
  at::Tensor dk = (row_scan(r, gy, v, w).sum(0) + uf * rf * q).to(dtype);
  // dw = X * d(log d)/dw * d = -X exp(w - exp(w))
  at::Tensor dw = (cross_terms(r, k, v, gy, w) * at::exp(wf - at::exp(wf))).neg().to(dtype);
  at::Tensor du = (rf * kf * q).sum({0, 1});
  return {dr, dk, dv, dw, du};
}

}  // namespace bi_wkv
