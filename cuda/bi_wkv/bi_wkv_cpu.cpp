// Bi-WKV on the CPU: parallel over batch x heads, (N, N) states per task.
//
// The forward and the backward (head sizes a multiple of 8) run register tiles of the states over the tokens, the
// forward reading float32 / float64 rows in place (fwd_tile_direction, bwd_tiled_impl); other head sizes use a handful of
// contiguous length-N loops per token and state row (axpys, element-wise updates, few dot products), written so
// that the compiler vectorises them: the forward's rows run over the value channels, the backward's over the
// key channels (value-major states, see bwd_token). The hot loops are compiled for AVX-512, AVX2+FMA and the
// x86-64 baseline and picked at run time by the CPU's features (GCC target_clones on the x86-64-v4 / v3 ISA
// levels; "arch=<cpu>" clones would be picked by CPU model and never run on AMD CPUs), so one build runs
// everywhere. Otherwise inputs are gathered per task into contiguous accumulation-type buffers, so the hot
// code never sees the (B, T, H, N) strides or the storage dtype.
//
// Math (ARCHITECTURE.md section 7), per (b, h), d_t = exp(-exp(w_t)):
//   forward states  A_t = sum_{i<t} (prod_{i<j<t} d_j) k_i v_i^T      (the state before t)
//   backward states B_t = sum_{i>t} (prod_{t<j<i} d_j) k_i v_i^T
//   y_t = r_t^T (A_t + B_t) + (r_t . (u * k_t)) v_t
// The gradient runs the same scans with (r, gy) in the role of (k, v), on value-major states: see bwd_token.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "bi_wkv.h"

namespace bi_wkv {
namespace {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define BI_WKV_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BI_WKV_CLONES
#endif
#define BI_WKV_INLINE inline __attribute__((always_inline))

// y += a * x
template <class T>
BI_WKV_INLINE void axpy(T* __restrict y, const T* __restrict x, T a, int n) {
#pragma omp simd
  for (int i = 0; i < n; ++i) y[i] += a * x[i];
}

template <class T>
BI_WKV_INLINE T dot(const T* __restrict x, const T* __restrict y, int n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int i = 0; i < n; ++i) acc += x[i] * y[i];
  return acc;
}

// One direction of the forward scan. Tokens run t = first, first + step, ...; y accumulates
// r_t^T S_t for the state S_t built from the tokens already visited (zero before the first).
template <class T>
BI_WKV_INLINE void fwd_direction(int T_, int n, int first, int step, const T* r, const T* k, const T* v,
                                 const T* dd, T* y, T* S) {
  for (int i = 0; i < n * n; ++i) S[i] = 0;
  for (int s = 0, t = first; s < T_; ++s, t += step) {
    const T* rt = r + (size_t)t * n;
    const T* kt = k + (size_t)t * n;
    const T* vt = v + (size_t)t * n;
    const T* dt = dd + (size_t)t * n;
    T* yt = y + (size_t)t * n;
    for (int d = 0; d < n; ++d) {
      T* row = S + (size_t)d * n;
      const T rd = rt[d], decay = dt[d], kd = kt[d];
#pragma omp simd
      for (int c = 0; c < n; ++c) {
        yt[c] += rd * row[c];
        row[c] = decay * row[c] + kd * vt[c];
      }
    }
  }
}

template <class T>
BI_WKV_INLINE void fwd_impl(int T_, int n, const T* r, const T* k, const T* v, const T* dd, const T* u, T* y,
                            T* S) {
  for (size_t i = 0; i < (size_t)T_ * n; ++i) y[i] = 0;
  // the bonus of the current token
  for (int t = 0; t < T_; ++t) {
    const T* rt = r + (size_t)t * n;
    const T* kt = k + (size_t)t * n;
    T bonus = 0;
#pragma omp simd reduction(+ : bonus)
    for (int d = 0; d < n; ++d) bonus += rt[d] * u[d] * kt[d];
    axpy(y + (size_t)t * n, v + (size_t)t * n, bonus, n);
  }
  fwd_direction(T_, n, 0, 1, r, k, v, dd, y, S);
  fwd_direction(T_, n, T_ - 1, -1, r, k, v, dd, y, S);
}

// The backward keeps its states value-major: S^T[c][d] (c a value channel, d a key channel), so that each
// state row is a vector over d, like r, k and the decays. With A = sum decayed k v^T and G = sum decayed
// r gy^T (over the tokens already visited in one direction), token t needs
//   dr_t += A_t gy_t = sum_c gy_t[c] A^T[c,:]      (an axpy over d per row c)
//   dk_t += G_t v_t  = sum_c v_t[c] G^T[c,:]       (an axpy over d per row c)
//   dv_t[c] += G^T[c,:] . k_t                      (the only horizontal reduction: one per row)
// and the states update as A^T[c,:] = d_t * A^T[c,:] + v_t[c] k_t, G^T[c,:] = d_t * G^T[c,:] + gy_t[c] r_t.
//
// The gradient of the log-decays, exactly and without cancellation: every pair (t, i) whose decay product
// spans token j contains d_j once, so d loss / d log(d_j) = d_j * X_j with, per key channel d,
//   X_j[d] = sum_c (Af_j[c,d] Gb_j[c,d] + Ab_j[c,d] Gf_j[c,d])
// (f: states of the tokens before j, b: of the tokens after j), again a vector over d accumulated over the
// rows c. Writing it as d_j * X_j lets the caller fold d_j into d d_j / d w_j = -exp(w_j) d_j, which vanishes
// smoothly where the decay underflows (a difference of running sums would leave rounding noise times
// exp(w_j) there). X_j pairs the forward states at j with the backward ones: the forward sweep checkpoints
// (Af, Gf) every `chunk` tokens; the backward sweep, chunk by chunk from the end, rebuilds the chunk's
// forward states from its checkpoint (O(chunk * N^2) memory) and reads them while it runs.

// One token of a sweep: the dr / dk / dv contributions of the states (A, G), then their update with the token.
// With `Xa` / `Xg` (the other direction's states at this token), also X += sum_c Xa * G + A * Xg.
template <class T, bool kCross>
BI_WKV_INLINE void bwd_token(int n, const T* __restrict rt, const T* __restrict kt, const T* __restrict vt,
                             const T* __restrict gt, const T* __restrict dt, T* __restrict drt, T* __restrict dkt,
                             T* __restrict dvt, T* __restrict A, T* __restrict G, const T* __restrict Xa,
                             const T* __restrict Xg, T* __restrict X) {
  for (int c = 0; c < n; ++c) {
    T* __restrict a = A + (size_t)c * n;
    T* __restrict g = G + (size_t)c * n;
    const T gc = gt[c], vc = vt[c];
    const T* __restrict xa = kCross ? Xa + (size_t)c * n : nullptr;
    const T* __restrict xg = kCross ? Xg + (size_t)c * n : nullptr;
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int d = 0; d < n; ++d) {
      const T ad = a[d], gd = g[d];
      acc += kt[d] * gd;
      drt[d] += gc * ad;
      dkt[d] += vc * gd;
      if constexpr (kCross) X[d] += xa[d] * gd + ad * xg[d];
      a[d] = dt[d] * ad + vc * kt[d];
      g[d] = dt[d] * gd + gc * rt[d];
    }
    dvt[c] += acc;
  }
}

// (A, G) <- (d_t A + v_t k_t^T, d_t G + gy_t r_t^T) in the value-major layout: the forward states rebuilt.
template <class T>
BI_WKV_INLINE void update_states(int n, const T* __restrict rt, const T* __restrict kt, const T* __restrict vt,
                                 const T* __restrict gt, const T* __restrict dt, T* __restrict A, T* __restrict G) {
  for (int c = 0; c < n; ++c) {
    T* __restrict a = A + (size_t)c * n;
    T* __restrict g = G + (size_t)c * n;
    const T gc = gt[c], vc = vt[c];
#pragma omp simd
    for (int d = 0; d < n; ++d) {
      a[d] = dt[d] * a[d] + vc * kt[d];
      g[d] = dt[d] * g[d] + gc * rt[d];
    }
  }
}

inline int bwd_chunk(int T_) {
  int chunk = 8;
  while (chunk * chunk < T_ && chunk < 64) chunk *= 2;
  return chunk;
}

// scratch: 2 n^2 for the backward states, then (chunks + chunk) x 2 n^2 for checkpoints and rebuilt states
inline size_t bwd_scratch_size(int T_, int n) {
  const int chunk = bwd_chunk(T_);
  const size_t chunks = (size_t)(T_ + chunk - 1) / chunk;
  return (1 + chunks + (size_t)chunk) * 2 * (size_t)n * n;
}

// Full backward of one (b, h). Outputs dr, dk, dv, X (see above) and du (this head's share).
template <class T>
BI_WKV_INLINE void bwd_impl(int T_, int n, const T* r, const T* k, const T* v, const T* gy, const T* dd,
                            const T* u, T* dr, T* dk, T* dv, T* X, T* du, T* scratch) {
  const size_t tn = (size_t)T_ * n, nn = (size_t)n * n;
  const int chunk = bwd_chunk(T_), chunks = (T_ + chunk - 1) / chunk;
  T* A = scratch;                               // the sweep's states (A, G)
  T* G = A + nn;
  T* ckpt = G + nn;                             // chunks x (Af, Gf) before the chunk's first token
  T* rebuilt = ckpt + (size_t)chunks * 2 * nn;  // chunk x (Af, Gf) before each token of the chunk
  for (size_t i = 0; i < tn; ++i) dr[i] = dk[i] = dv[i] = X[i] = 0;
  for (int d = 0; d < n; ++d) du[d] = 0;

  // the bonus of the current token: y_t += (r_t . (u * k_t)) v_t
  for (int t = 0; t < T_; ++t) {
    const size_t off = (size_t)t * n;
    const T q = dot(v + off, gy + off, n);
    T ruk = 0;
#pragma omp simd reduction(+ : ruk)
    for (int d = 0; d < n; ++d) ruk += r[off + d] * u[d] * k[off + d];
#pragma omp simd
    for (int d = 0; d < n; ++d) {
      dr[off + d] += u[d] * k[off + d] * q;
      dk[off + d] += u[d] * r[off + d] * q;
      du[d] += r[off + d] * k[off + d] * q;
      dv[off + d] += ruk * gy[off + d];
    }
  }

  // forward sweep: the pairs i < t, checkpointing (Af, Gf)
  for (size_t i = 0; i < 2 * nn; ++i) A[i] = 0;
  for (int t = 0; t < T_; ++t) {
    if (t % chunk == 0) std::copy(A, A + 2 * nn, ckpt + (size_t)(t / chunk) * 2 * nn);
    const size_t off = (size_t)t * n;
    bwd_token<T, false>(n, r + off, k + off, v + off, gy + off, dd + off, dr + off, dk + off, dv + off, A, G,
                        nullptr, nullptr, nullptr);
  }

  // backward sweep: the pairs i > t, and X from the rebuilt forward states
  for (size_t i = 0; i < 2 * nn; ++i) A[i] = 0;
  for (int m = chunks - 1; m >= 0; --m) {
    const int start = m * chunk, stop = std::min(T_, start + chunk);
    T* state = rebuilt;
    std::copy(ckpt + (size_t)m * 2 * nn, ckpt + (size_t)(m + 1) * 2 * nn, state);
    for (int j = start; j + 1 < stop; ++j, state += 2 * nn) {
      std::copy(state, state + 2 * nn, state + 2 * nn);
      const size_t off = (size_t)j * n;
      update_states(n, r + off, k + off, v + off, gy + off, dd + off, state + 2 * nn, state + 3 * nn);
    }
    for (int j = stop - 1; j >= start; --j) {
      const T* Af = rebuilt + (size_t)(j - start) * 2 * nn;
      const size_t off = (size_t)j * n;
      bwd_token<T, true>(n, r + off, k + off, v + off, gy + off, dd + off, dr + off, dk + off, dv + off, A, G,
                         Af, Af + nn, X + off);
    }
  }
}

BI_WKV_CLONES void fwd_f32(int T_, int n, const float* r, const float* k, const float* v, const float* dd,
                           const float* u, float* y, float* S) {
  fwd_impl<float>(T_, n, r, k, v, dd, u, y, S);
}
BI_WKV_CLONES void fwd_f64(int T_, int n, const double* r, const double* k, const double* v, const double* dd,
                           const double* u, double* y, double* S) {
  fwd_impl<double>(T_, n, r, k, v, dd, u, y, S);
}
BI_WKV_CLONES void bwd_f32(int T_, int n, const float* r, const float* k, const float* v, const float* gy,
                           const float* dd, const float* u, float* dr, float* dk, float* dv, float* X, float* du,
                           float* scratch) {
  bwd_impl<float>(T_, n, r, k, v, gy, dd, u, dr, dk, dv, X, du, scratch);
}
BI_WKV_CLONES void bwd_f64(int T_, int n, const double* r, const double* k, const double* v, const double* gy,
                           const double* dd, const double* u, double* dr, double* dk, double* dv, double* X,
                           double* du, double* scratch) {
  bwd_impl<double>(T_, n, r, k, v, gy, dd, u, dr, dk, dv, X, du, scratch);
}

inline void fwd_hot(int T_, int n, const float* r, const float* k, const float* v, const float* dd, const float* u,
                    float* y, float* S) {
  fwd_f32(T_, n, r, k, v, dd, u, y, S);
}
inline void fwd_hot(int T_, int n, const double* r, const double* k, const double* v, const double* dd,
                    const double* u, double* y, double* S) {
  fwd_f64(T_, n, r, k, v, dd, u, y, S);
}
inline void bwd_hot(int T_, int n, const float* r, const float* k, const float* v, const float* gy, const float* dd,
                    const float* u, float* dr, float* dk, float* dv, float* X, float* du, float* scratch) {
  bwd_f32(T_, n, r, k, v, gy, dd, u, dr, dk, dv, X, du, scratch);
}
inline void bwd_hot(int T_, int n, const double* r, const double* k, const double* v, const double* gy,
                    const double* dd, const double* u, double* dr, double* dk, double* dv, double* X,
                    double* du, double* scratch) {
  bwd_f64(T_, n, r, k, v, gy, dd, u, dr, dk, dv, X, du, scratch);
}

// Copies the (T, N) slice of head h of batch b out of a (B, T, H, N) tensor, converting to acc_t.
template <class scalar_t, class acc_t>
void gather(const scalar_t* src, acc_t* dst, int64_t b, int64_t h, int64_t T_, int64_t H, int64_t n) {
  for (int64_t t = 0; t < T_; ++t) {
    const scalar_t* row = src + ((b * T_ + t) * H + h) * n;
    acc_t* out = dst + t * n;
    for (int64_t d = 0; d < n; ++d) out[d] = static_cast<acc_t>(row[d]);
  }
}

template <class scalar_t, class acc_t>
void scatter(const acc_t* src, scalar_t* dst, int64_t b, int64_t h, int64_t T_, int64_t H, int64_t n) {
  for (int64_t t = 0; t < T_; ++t) {
    scalar_t* row = dst + ((b * T_ + t) * H + h) * n;
    const acc_t* in = src + t * n;
    for (int64_t d = 0; d < n; ++d) row[d] = static_cast<scalar_t>(in[d]);
  }
}

// The forward, register-blocked: for a tile of kRows key channels x kCols vectors of value channels, the tile of
// the state stays in vector registers for a whole block of tokens, and y_t's slice of value channels is read and
// written once per token and tile (instead of once per token and key channel). Each token costs kRows x kCols x
// (2 FMA + 1 multiply) on registers plus kRows broadcasts of r, k and the decay; two vectors per row halve the
// broadcasts per FMA and give two independent sums of r_t^T S (4 x 2 was 1.3x faster than 8 x 1 on a Zen 3 core,
// with 14 of the 16 AVX2 registers). Rows of r, k, v and y are read in place with a token stride (no gathered
// copies for float32 / float64 inputs).
template <class T>
struct Vec {
  static constexpr int kWidth = 32 / sizeof(T);  // 8 floats or 4 doubles: one AVX register
  typedef T type __attribute__((vector_size(32)));
  typedef T unaligned __attribute__((vector_size(32), aligned(alignof(T))));
  static BI_WKV_INLINE type load(const T* p) { return *reinterpret_cast<const unaligned*>(p); }
  static BI_WKV_INLINE void store(T* p, type x) { *reinterpret_cast<unaligned*>(p) = x; }
};

constexpr int kRows = 4;
constexpr int kCols = 2;

// Tokens per block of a sweep: a block's rows of r, k, v, the decays and y stay in L1 while every tile of the
// state passes over them (a tile's state goes to memory only between blocks).
constexpr int kTokenBlock = 16;

// One tile of C vectors from value channel c0, key channels d0 .. d0 + kRows, over the tokens s0 .. s1 of a sweep.
template <class T, int C>
BI_WKV_INLINE void fwd_tile(int s0, int s1, int n, int first, int step, int c0, int d0, const T* r, const T* k,
                            const T* v, const T* dd, int64_t stride, T* y, int64_t ystride, T* state) {
  using V = Vec<T>;
  using vec = typename V::type;
  constexpr int W = V::kWidth;
  T* tile = state + (size_t)d0 * n + c0;
  vec S[kRows][C];
  for (int i = 0; i < kRows; ++i)
    for (int j = 0; j < C; ++j) S[i][j] = V::load(tile + (size_t)i * n + j * W);
  for (int s = s0; s < s1; ++s) {
    const int64_t t = first + (int64_t)s * step;
    const T* rt = r + t * stride + d0;
    const T* kt = k + t * stride + d0;
    const T* dt = dd + t * n + d0;
    T* yt = y + t * ystride + c0;
    vec vt[C], acc[C];
    for (int j = 0; j < C; ++j) {
      vt[j] = V::load(v + t * stride + c0 + j * W);
      acc[j] = V::load(yt + j * W);
    }
#pragma GCC unroll 8
    for (int i = 0; i < kRows; ++i) {
      const T ri = rt[i], di = dt[i], ki = kt[i];
#pragma GCC unroll 2
      for (int j = 0; j < C; ++j) {
        acc[j] += ri * S[i][j];
        S[i][j] = di * S[i][j] + ki * vt[j];
      }
    }
    for (int j = 0; j < C; ++j) V::store(yt + j * W, acc[j]);
  }
  for (int i = 0; i < kRows; ++i)
    for (int j = 0; j < C; ++j) V::store(tile + (size_t)i * n + j * W, S[i][j]);
}

// One direction: y[t, c] += sum over key channels d of r_t[d] S_t[d, c], tile by tile (kCols vectors, a last
// single vector where the value channels leave one over). For each y element the key channels are summed in
// ascending order, like a row-by-row scan.
template <class T>
BI_WKV_INLINE void fwd_tile_direction(int T_, int n, int first, int step, const T* r, const T* k, const T* v,
                                      const T* dd, int64_t stride, T* y, int64_t ystride, T* state) {
  constexpr int W = Vec<T>::kWidth;
  for (int i = 0; i < n * n; ++i) state[i] = 0;
  for (int s0 = 0; s0 < T_; s0 += kTokenBlock) {
    const int s1 = std::min(T_, s0 + kTokenBlock);
    int c0 = 0;
    for (; c0 + kCols * W <= n; c0 += kCols * W)
      for (int d0 = 0; d0 < n; d0 += kRows)
        fwd_tile<T, kCols>(s0, s1, n, first, step, c0, d0, r, k, v, dd, stride, y, ystride, state);
    for (; c0 < n; c0 += W)
      for (int d0 = 0; d0 < n; d0 += kRows)
        fwd_tile<T, 1>(s0, s1, n, first, step, c0, d0, r, k, v, dd, stride, y, ystride, state);
  }
}

// Full forward of one (b, h): y = bonus, then both directions. r, k, v rows at `stride`, y rows at `ystride`,
// decays dd contiguous (T, n).
template <class T>
BI_WKV_INLINE void fwd_tiled_impl(int T_, int n, const T* r, const T* k, const T* v, const T* dd, const T* u,
                                  int64_t stride, T* y, int64_t ystride, T* state) {
  for (int t = 0; t < T_; ++t) {
    const T* rt = r + t * stride;
    const T* kt = k + t * stride;
    const T* vt = v + t * stride;
    T* yt = y + t * ystride;
    T bonus = 0;
#pragma omp simd reduction(+ : bonus)
    for (int d = 0; d < n; ++d) bonus += rt[d] * u[d] * kt[d];
#pragma omp simd
    for (int c = 0; c < n; ++c) yt[c] = bonus * vt[c];
  }
  fwd_tile_direction(T_, n, 0, 1, r, k, v, dd, stride, y, ystride, state);
  fwd_tile_direction(T_, n, T_ - 1, -1, r, k, v, dd, stride, y, ystride, state);
}

BI_WKV_CLONES void fwd_tiled_f32(int T_, int n, const float* r, const float* k, const float* v, const float* dd,
                                 const float* u, int64_t stride, float* y, int64_t ystride, float* state) {
  fwd_tiled_impl<float>(T_, n, r, k, v, dd, u, stride, y, ystride, state);
}
BI_WKV_CLONES void fwd_tiled_f64(int T_, int n, const double* r, const double* k, const double* v, const double* dd,
                                 const double* u, int64_t stride, double* y, int64_t ystride, double* state) {
  fwd_tiled_impl<double>(T_, n, r, k, v, dd, u, stride, y, ystride, state);
}
inline void fwd_tiled(int T_, int n, const float* r, const float* k, const float* v, const float* dd, const float* u,
                      int64_t stride, float* y, int64_t ystride, float* state) {
  fwd_tiled_f32(T_, n, r, k, v, dd, u, stride, y, ystride, state);
}
inline void fwd_tiled(int T_, int n, const double* r, const double* k, const double* v, const double* dd,
                      const double* u, int64_t stride, double* y, int64_t ystride, double* state) {
  fwd_tiled_f64(T_, n, r, k, v, dd, u, stride, y, ystride, state);
}

// The backward, register-blocked (head sizes as the tiled forward). dv_i = sum_t (r_t . D(t,i) k_i) gy_t is itself a
// Bi-WKV without the bonus, with (k, r, gy) in the roles of (r, k, v) (the decay product between two tokens is the same
// both ways): the forward's tiles compute it. dr, dk and X run on value-major tiles of kBwdRows value channels c x
// one vector of key channels d, for both states A^T = sum decayed v k^T and G^T = sum decayed gy r^T, kept in
// registers for a whole sweep: per token, dr_t[d] += sum_c gy_t[c] A^T[c, d] and dk_t[d] += sum_c v_t[c] G^T[c, d]
// are vertical sums over the tile's rows, read and written once per token and tile. The forward sweep stores each
// token's (Af, Gf) tile (2 kBwdRows vectors per token: T * 256 bytes for float32); the backward sweep reads them
// back for X_t = sum_c Af_t Gb_t + Ab_t Gf_t (see bwd_impl for X and the decay gradient).
constexpr int kBwdRows = 4;

template <class T>
BI_WKV_INLINE void bwd_tiled_impl(int T_, int n, const T* r, const T* k, const T* v, const T* gy, const T* dd,
                                  const T* u, T* dr, T* dk, T* dv, T* X, T* du, T* scratch) {
  using V = Vec<T>;
  using vec = typename V::type;
  constexpr int W = V::kWidth, R = kBwdRows;
  const size_t tn = (size_t)T_ * n;
  for (size_t i = 0; i < tn; ++i) dr[i] = dk[i] = dv[i] = X[i] = 0;
  for (int d = 0; d < n; ++d) du[d] = 0;
  // the bonus of the current token: y_t += (r_t . (u * k_t)) v_t
  for (int t = 0; t < T_; ++t) {
    const size_t off = (size_t)t * n;
    const T q = dot(v + off, gy + off, n);
    T ruk = 0;
#pragma omp simd reduction(+ : ruk)
    for (int d = 0; d < n; ++d) ruk += r[off + d] * u[d] * k[off + d];
#pragma omp simd
    for (int d = 0; d < n; ++d) {
      dr[off + d] += u[d] * k[off + d] * q;
      dk[off + d] += u[d] * r[off + d] * q;
      du[d] += r[off + d] * k[off + d] * q;
      dv[off + d] += ruk * gy[off + d];
    }
  }
  // dv: the forward's scans with (k, r, gy) for (r, k, v)
  fwd_tile_direction(T_, n, 0, 1, k, r, gy, dd, n, dv, n, scratch);
  fwd_tile_direction(T_, n, T_ - 1, -1, k, r, gy, dd, n, dv, n, scratch);
  // dr, dk, X
  T* hist = scratch;  // (T, 2R, W): the forward states before each token
  const vec zero = {};
  for (int c0 = 0; c0 < n; c0 += R) {
    for (int d0 = 0; d0 < n; d0 += W) {
      vec A[R], G[R];
      for (int i = 0; i < R; ++i) A[i] = G[i] = zero;
      for (int t = 0; t < T_; ++t) {
        const size_t off = (size_t)t * n;
        const T* gt = gy + off + c0;
        const T* vt = v + off + c0;
        const vec kt = V::load(k + off + d0), rt = V::load(r + off + d0), dt = V::load(dd + off + d0);
        T* h = hist + (size_t)t * 2 * R * W;
        vec accr = zero, acck = zero;
#pragma GCC unroll 4
        for (int i = 0; i < R; ++i) {
          accr += gt[i] * A[i];
          acck += vt[i] * G[i];
          V::store(h + i * W, A[i]);
          V::store(h + (R + i) * W, G[i]);
          A[i] = dt * A[i] + vt[i] * kt;
          G[i] = dt * G[i] + gt[i] * rt;
        }
        V::store(dr + off + d0, V::load(dr + off + d0) + accr);
        V::store(dk + off + d0, V::load(dk + off + d0) + acck);
      }
      for (int i = 0; i < R; ++i) A[i] = G[i] = zero;
      for (int t = T_ - 1; t >= 0; --t) {
        const size_t off = (size_t)t * n;
        const T* gt = gy + off + c0;
        const T* vt = v + off + c0;
        const vec kt = V::load(k + off + d0), rt = V::load(r + off + d0), dt = V::load(dd + off + d0);
        const T* h = hist + (size_t)t * 2 * R * W;
        vec accr = zero, acck = zero, accx = zero;
#pragma GCC unroll 4
        for (int i = 0; i < R; ++i) {
          accr += gt[i] * A[i];
          acck += vt[i] * G[i];
          accx += V::load(h + i * W) * G[i] + A[i] * V::load(h + (R + i) * W);
          A[i] = dt * A[i] + vt[i] * kt;
          G[i] = dt * G[i] + gt[i] * rt;
        }
        V::store(dr + off + d0, V::load(dr + off + d0) + accr);
        V::store(dk + off + d0, V::load(dk + off + d0) + acck);
        V::store(X + off + d0, V::load(X + off + d0) + accx);
      }
    }
  }
}

BI_WKV_CLONES void bwd_tiled_f32(int T_, int n, const float* r, const float* k, const float* v, const float* gy,
                                 const float* dd, const float* u, float* dr, float* dk, float* dv, float* X,
                                 float* du, float* scratch) {
  bwd_tiled_impl<float>(T_, n, r, k, v, gy, dd, u, dr, dk, dv, X, du, scratch);
}
BI_WKV_CLONES void bwd_tiled_f64(int T_, int n, const double* r, const double* k, const double* v, const double* gy,
                                 const double* dd, const double* u, double* dr, double* dk, double* dv, double* X,
                                 double* du, double* scratch) {
  bwd_tiled_impl<double>(T_, n, r, k, v, gy, dd, u, dr, dk, dv, X, du, scratch);
}
inline void bwd_tiled(int T_, int n, const float* r, const float* k, const float* v, const float* gy, const float* dd,
                      const float* u, float* dr, float* dk, float* dv, float* X, float* du, float* scratch) {
  bwd_tiled_f32(T_, n, r, k, v, gy, dd, u, dr, dk, dv, X, du, scratch);
}
inline void bwd_tiled(int T_, int n, const double* r, const double* k, const double* v, const double* gy,
                      const double* dd, const double* u, double* dr, double* dk, double* dv, double* X, double* du,
                      double* scratch) {
  bwd_tiled_f64(T_, n, r, k, v, gy, dd, u, dr, dk, dv, X, du, scratch);
}

// the tiles need whole vectors and whole row tiles; other head sizes take the row-by-row scans
template <class T>
inline bool use_tiles(int64_t n) {
  return n % Vec<T>::kWidth == 0 && n % kRows == 0 && n % kBwdRows == 0;
}

template <class scalar_t>
void forward_kernel(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
                    const at::Tensor& u, at::Tensor& y) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  constexpr bool kInPlace = std::is_same_v<scalar_t, acc_t>;
  const int64_t B = r.size(0), T_ = r.size(1), H = r.size(2), n = r.size(3);
  const scalar_t *rp = r.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>();
  const acc_t* up = u.data_ptr<acc_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  // the decays exp(-exp(w)) of every element at once, with ATen's vectorised exp (a scalar exp per element in the
  // loop below cost about as much as the scans), in the accumulation type and w's (B, T, H, N) layout
  at::Tensor decay = w.to(std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat).exp();
  decay.neg_().exp_();
  const acc_t* decay_all = decay.data_ptr<acc_t>();
  const bool tiled = use_tiles<acc_t>(n);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    const size_t tn = (size_t)T_ * n;
    // decays, the state, and (unless the tiles read the inputs in place) gathered r, k, v and y
    const bool in_place = kInPlace && tiled;
    std::vector<acc_t> buf(tn + (size_t)n * n + (in_place ? 0 : 4 * tn));
    acc_t *db = buf.data(), *S = db + tn;
    acc_t *rb = S + (size_t)n * n, *kb = rb + tn, *vb = kb + tn, *yb = vb + tn;  // used unless in_place
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const int64_t head = (b * T_ * H + h) * n;  // offset of (b, 0, h, 0)
      for (int64_t t = 0; t < T_; ++t) {
        const acc_t* src = decay_all + head + t * H * n;
        std::copy(src, src + n, db + t * n);
      }
      if (in_place) {
        // scalar_t is acc_t here; the casts only satisfy the other instantiations
        fwd_tiled((int)T_, (int)n, reinterpret_cast<const acc_t*>(rp + head), reinterpret_cast<const acc_t*>(kp + head),
                  reinterpret_cast<const acc_t*>(vp + head), db, up + h * n, H * n,
                  reinterpret_cast<acc_t*>(yp + head), H * n, S);
        continue;
      }
      gather(rp, rb, b, h, T_, H, n);
      gather(kp, kb, b, h, T_, H, n);
      gather(vp, vb, b, h, T_, H, n);
      if (tiled) {
        fwd_tiled((int)T_, (int)n, rb, kb, vb, db, up + h * n, n, yb, n, S);
      } else {
        fwd_hot((int)T_, (int)n, rb, kb, vb, db, up + h * n, yb, S);
      }
      scatter(yb, yp, b, h, T_, H, n);
    }
  });
}

template <class scalar_t>
void backward_kernel(const at::Tensor& gy, const at::Tensor& r, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& w, const at::Tensor& u, at::Tensor& dr, at::Tensor& dk, at::Tensor& dv,
                     at::Tensor& dw, at::Tensor& du_per_batch) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t B = r.size(0), T_ = r.size(1), H = r.size(2), n = r.size(3);
  const scalar_t *gp = gy.data_ptr<scalar_t>(), *rp = r.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(),
                 *vp = v.data_ptr<scalar_t>();
  const acc_t* up = u.data_ptr<acc_t>();
  scalar_t *drp = dr.data_ptr<scalar_t>(), *dkp = dk.data_ptr<scalar_t>(), *dvp = dv.data_ptr<scalar_t>(),
           *dwp = dw.data_ptr<scalar_t>();
  acc_t* dup = du_per_batch.data_ptr<acc_t>();  // (B, H, N)
  const bool tiled = use_tiles<acc_t>(n);
  // with ATen's vectorised exp, for every element at once (as the forward): the decays d = exp(-exp(w)) and the
  // factor of dw, dw_j = X_j * d_j * d log(d_j) / d w_j = -X_j exp(w_j) d_j = -X_j exp(w_j - exp(w_j)) (zero, not
  // 0 * inf, for a large w), in the accumulation type and w's (B, T, H, N) layout
  const at::Tensor w_acc = w.to(std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat);
  const at::Tensor exp_w = w_acc.exp();
  const at::Tensor decay = exp_w.neg().exp_();
  const at::Tensor dw_factor = (w_acc - exp_w).exp_().neg_();
  const acc_t *decay_all = decay.data_ptr<acc_t>(), *factor_all = dw_factor.data_ptr<acc_t>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    const size_t tn = (size_t)T_ * n;
    // the tiles' scratch: an (n, n) state for the dv scans, then the forward states of every token
    const size_t scratch_size = tiled ? std::max((size_t)n * n, (size_t)T_ * 2 * kBwdRows * Vec<acc_t>::kWidth)
                                      : bwd_scratch_size((int)T_, (int)n);
    // inputs (r, k, v, gy, decays, dw factors), outputs (dr, dk, dv, X), scan scratch
    std::vector<acc_t> buf(10 * tn + scratch_size);
    acc_t *rb = buf.data(), *kb = rb + tn, *vb = kb + tn, *gb = vb + tn, *db = gb + tn, *wb = db + tn;
    acc_t *drb = wb + tn, *dkb = drb + tn, *dvb = dkb + tn, *dlb = dvb + tn, *scratch = dlb + tn;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      gather(rp, rb, b, h, T_, H, n);
      gather(kp, kb, b, h, T_, H, n);
      gather(vp, vb, b, h, T_, H, n);
      gather(gp, gb, b, h, T_, H, n);
      gather(decay_all, db, b, h, T_, H, n);
      gather(factor_all, wb, b, h, T_, H, n);
      if (tiled) {
        bwd_tiled((int)T_, (int)n, rb, kb, vb, gb, db, up + h * n, drb, dkb, dvb, dlb, dup + (b * H + h) * n, scratch);
      } else {
        bwd_hot((int)T_, (int)n, rb, kb, vb, gb, db, up + h * n, drb, dkb, dvb, dlb, dup + (b * H + h) * n, scratch);
      }
      for (size_t i = 0; i < tn; ++i) dlb[i] *= wb[i];  // dw
      scatter(drb, drp, b, h, T_, H, n);
      scatter(dkb, dkp, b, h, T_, H, n);
      scatter(dvb, dvp, b, h, T_, H, n);
      scatter(dlb, dwp, b, h, T_, H, n);
    }
  });
}

// The hot loops' clone picked at run time contracts a * b + c into an FMA exactly when it is an AVX2 / AVX-512
// one: with these inputs the FMA keeps the 2^-60 that a rounded product loses.
volatile double fma_probe_a = 1.0 + 0x1p-30, fma_probe_c = -(1.0 + 0x1p-29);
BI_WKV_CLONES double fma_probe() {
  const double a = fma_probe_a, c = fma_probe_c;
  return a * a + c;
}

}  // namespace

bool hot_loops_use_fma() { return fma_probe() != 0.0; }

at::Tensor forward_cpu(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
                       const at::Tensor& u) {
  check_inputs(r, k, v, w, u, at::kCPU);
  at::Tensor y = at::empty_like(r);
  if (r.numel() == 0) return y.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, r.scalar_type(), "bi_wkv_forward_cpu",
                                  [&] { forward_kernel<scalar_t>(r, k, v, w, u, y); });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& gy, const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
    const at::Tensor& u) {
  check_inputs(r, k, v, w, u, at::kCPU);
  check_like(gy, r, "gy");
  at::Tensor dr = at::empty_like(r), dk = at::empty_like(r), dv = at::empty_like(r), dw = at::empty_like(r);
  at::Tensor du = at::zeros({r.size(0), r.size(2), r.size(3)}, u.options());
  if (r.numel() == 0) return {dr.zero_(), dk.zero_(), dv.zero_(), dw.zero_(), du.sum(0)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, r.scalar_type(), "bi_wkv_backward_cpu",
                                  [&] { backward_kernel<scalar_t>(gy, r, k, v, w, u, dr, dk, dv, dw, du); });
  return {dr, dk, dv, dw, du.sum(0)};
}

}  // namespace bi_wkv
