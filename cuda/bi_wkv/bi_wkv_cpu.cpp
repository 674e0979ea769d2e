// Bi-WKV on the CPU: parallel over batch x heads, one (N, N) state per task that stays in L1.
//
// Per token and state row d the work is a handful of contiguous length-N loops (axpy and dot products)
// over the value channels, written so that the compiler vectorises them; the hot loops are compiled
// for AVX-512, AVX2+FMA and the x86-64 baseline and picked at run time (GCC target_clones), so one
// build runs everywhere. Inputs are gathered per task into contiguous accumulation-type buffers first,
// so the hot code never sees the (B, T, H, N) strides or the storage dtype.
//
// Math (ARCHITECTURE.md section 7), per (b, h), d_t = exp(-exp(w_t)):
//   forward states  A_t = sum_{i<t} (prod_{i<j<t} d_j) k_i v_i^T      (the state before t)
//   backward states B_t = sum_{i>t} (prod_{t<j<i} d_j) k_i v_i^T
//   y_t = r_t^T (A_t + B_t) + (r_t . (u * k_t)) v_t
// The gradient runs the same scans with (r, gy) in the role of (k, v): see bwd_direction and
// decay_cross_terms.

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
#define BI_WKV_CLONES __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
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

// s = decay * s + a * x, returning dot(old s, z): the read of the state before the update and the
// update itself share one pass over the row.
template <class T>
BI_WKV_INLINE T dot_then_decay(T* __restrict s, const T* __restrict z, T decay, T a, const T* __restrict x, int n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int i = 0; i < n; ++i) {
    acc += s[i] * z[i];
    s[i] = decay * s[i] + a * x[i];
  }
  return acc;
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

// One direction of the backward scan, visiting t = first, first + step, ...
// States: K = sum decayed k v^T (as in the forward), G = sum decayed r gy^T. At token t (before updating):
//   dr_t += K gy_t,   dk_t += G v_t,   dv_t += G^T k_t
template <class T>
BI_WKV_INLINE void bwd_direction(int T_, int n, int first, int step, const T* r, const T* k, const T* v,
                                 const T* gy, const T* dd, T* dr, T* dk, T* dv, T* K, T* G) {
  for (int i = 0; i < n * n; ++i) K[i] = G[i] = 0;
  for (int s = 0, t = first; s < T_; ++s, t += step) {
    const size_t off = (size_t)t * n;
    const T *rt = r + off, *kt = k + off, *vt = v + off, *gt = gy + off, *dt = dd + off;
    T *drt = dr + off, *dkt = dk + off, *dvt = dv + off;
    for (int d = 0; d < n; ++d) {
      T* Kd = K + (size_t)d * n;
      T* Gd = G + (size_t)d * n;
      const T decay = dt[d], kd = kt[d], rd = rt[d];
      axpy(dvt, Gd, kd, n);
      drt[d] += dot_then_decay(Kd, gt, decay, kd, vt, n);
      dkt[d] += dot_then_decay(Gd, vt, decay, rd, gt, n);
    }
  }
}

// s = decay * s + a * x
template <class T>
BI_WKV_INLINE void decay_add(T* __restrict s, T decay, T a, const T* __restrict x, int n) {
#pragma omp simd
  for (int i = 0; i < n; ++i) s[i] = decay * s[i] + a * x[i];
}

// The gradient of the log-decays, exactly and without cancellation. Every pair (t, i) whose decay product
// spans token j contains d_j once, so d loss / d log(d_j) = d_j * X_j with, per channel (state row) d,
//   X_j = A_j . Gb_j + B_j . Gf_j        (dot products over the value channels)
// where A / B are the rows of the forward / backward k v^T states at j and Gf / Gb those of the r gy^T
// states. Writing it as d_j * X_j lets the caller fold d_j into d d_j / d w_j = -exp(w_j) d_j, which
// vanishes smoothly where the decay underflows (a difference of running sums would leave rounding noise
// times exp(w_j) there). Rows are independent, so each row is done on its own with two length-N states
// per direction: the backward states are checkpointed every `chunk` tokens on a backward sweep, then
// rebuilt chunk by chunk (O(chunk * N) memory) while the forward sweep runs.
template <class T>
BI_WKV_INLINE void decay_cross_terms(int T_, int n, const T* r, const T* k, const T* v, const T* gy, const T* dd,
                                     T* X, T* work, int chunk) {
  const int chunks = (T_ + chunk - 1) / chunk;
  T* ckpt = work;                             // chunks x (B, Gb)
  T* rebuilt = ckpt + (size_t)chunks * 2 * n;  // chunk x (B, Gb)
  T* A = rebuilt + (size_t)chunk * 2 * n;
  T* Gf = A + n;
  T* Bs = Gf + n;
  T* Gb = Bs + n;
  for (int d = 0; d < n; ++d) {
    for (int i = 0; i < n; ++i) Bs[i] = Gb[i] = 0;
    for (int j = T_ - 1; j >= 0; --j) {
      if (j == T_ - 1 || (j + 1) % chunk == 0) {  // j is the last token of its chunk
        T* saved = ckpt + (size_t)(j / chunk) * 2 * n;
        for (int i = 0; i < n; ++i) saved[i] = Bs[i], saved[n + i] = Gb[i];
      }
      const size_t off = (size_t)j * n;
      decay_add(Bs, dd[off + d], k[off + d], v + off, n);
      decay_add(Gb, dd[off + d], r[off + d], gy + off, n);
    }
    for (int i = 0; i < n; ++i) A[i] = Gf[i] = 0;
    for (int m = 0; m < chunks; ++m) {
      const int start = m * chunk, stop = std::min(T_, start + chunk);
      const T* saved = ckpt + (size_t)m * 2 * n;
      for (int i = 0; i < n; ++i) Bs[i] = saved[i], Gb[i] = saved[n + i];
      for (int j = stop - 1; j >= start; --j) {
        T* slot = rebuilt + (size_t)(j - start) * 2 * n;
        for (int i = 0; i < n; ++i) slot[i] = Bs[i], slot[n + i] = Gb[i];
        const size_t off = (size_t)j * n;
        decay_add(Bs, dd[off + d], k[off + d], v + off, n);
        decay_add(Gb, dd[off + d], r[off + d], gy + off, n);
      }
      for (int j = start; j < stop; ++j) {
        const T* slot = rebuilt + (size_t)(j - start) * 2 * n;
        const size_t off = (size_t)j * n;
        X[off + d] = dot(A, slot + n, n) + dot(slot, Gf, n);
        decay_add(A, dd[off + d], k[off + d], v + off, n);
        decay_add(Gf, dd[off + d], r[off + d], gy + off, n);
      }
    }
  }
}

constexpr int kCrossChunk = 32;

inline size_t cross_work_size(int T_, int n) {
  return ((size_t)(T_ + kCrossChunk - 1) / kCrossChunk + kCrossChunk) * 2 * n + 4 * (size_t)n;
}

// Full backward of one (b, h). Outputs dr, dk, dv, X (see decay_cross_terms) and du (this head's share).
template <class T>
BI_WKV_INLINE void bwd_impl(int T_, int n, const T* r, const T* k, const T* v, const T* gy, const T* dd,
                            const T* u, T* dr, T* dk, T* dv, T* X, T* du, T* scratch) {
  const size_t tn = (size_t)T_ * n;
  T* K = scratch;
  T* G = K + (size_t)n * n;
  for (size_t i = 0; i < tn; ++i) dr[i] = dk[i] = dv[i] = 0;
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

  bwd_direction(T_, n, 0, 1, r, k, v, gy, dd, dr, dk, dv, K, G);
  bwd_direction(T_, n, T_ - 1, -1, r, k, v, gy, dd, dr, dk, dv, K, G);
  decay_cross_terms(T_, n, r, k, v, gy, dd, X, scratch, kCrossChunk);
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

template <class scalar_t>
void forward_kernel(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
                    const at::Tensor& u, at::Tensor& y) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t B = r.size(0), T_ = r.size(1), H = r.size(2), n = r.size(3);
  const scalar_t *rp = r.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>(),
                 *wp = w.data_ptr<scalar_t>();
  const acc_t* up = u.data_ptr<acc_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    const size_t tn = (size_t)T_ * n;
    std::vector<acc_t> buf(5 * tn + (size_t)n * n);
    acc_t *rb = buf.data(), *kb = rb + tn, *vb = kb + tn, *db = vb + tn, *yb = db + tn, *S = yb + tn;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      gather(rp, rb, b, h, T_, H, n);
      gather(kp, kb, b, h, T_, H, n);
      gather(vp, vb, b, h, T_, H, n);
      gather(wp, db, b, h, T_, H, n);
      for (size_t i = 0; i < tn; ++i) db[i] = std::exp(-std::exp(db[i]));
      fwd_hot((int)T_, (int)n, rb, kb, vb, db, up + h * n, yb, S);
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
                 *vp = v.data_ptr<scalar_t>(), *wp = w.data_ptr<scalar_t>();
  const acc_t* up = u.data_ptr<acc_t>();
  scalar_t *drp = dr.data_ptr<scalar_t>(), *dkp = dk.data_ptr<scalar_t>(), *dvp = dv.data_ptr<scalar_t>(),
           *dwp = dw.data_ptr<scalar_t>();
  acc_t* dup = du_per_batch.data_ptr<acc_t>();  // (B, H, N)
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    const size_t tn = (size_t)T_ * n;
    // inputs (r, k, v, gy, dd, w), outputs (dr, dk, dv, X), scan scratch
    std::vector<acc_t> buf(10 * tn + std::max(2 * (size_t)n * n, cross_work_size((int)T_, (int)n)));
    acc_t *rb = buf.data(), *kb = rb + tn, *vb = kb + tn, *gb = vb + tn, *db = gb + tn, *wb = db + tn;
    acc_t *drb = wb + tn, *dkb = drb + tn, *dvb = dkb + tn, *dlb = dvb + tn, *scratch = dlb + tn;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      gather(rp, rb, b, h, T_, H, n);
      gather(kp, kb, b, h, T_, H, n);
      gather(vp, vb, b, h, T_, H, n);
      gather(gp, gb, b, h, T_, H, n);
      gather(wp, wb, b, h, T_, H, n);
      for (size_t i = 0; i < tn; ++i) db[i] = std::exp(-std::exp(wb[i]));
      bwd_hot((int)T_, (int)n, rb, kb, vb, gb, db, up + h * n, drb, dkb, dvb, dlb, dup + (b * H + h) * n, scratch);
      // dw_j = X_j * d_j * d log(d_j) / d w_j = -X_j exp(w_j) d_j = -X_j exp(w_j - exp(w_j)): zero, not 0 * inf,
      // for a large w
      for (size_t i = 0; i < tn; ++i) dlb[i] *= -std::exp(wb[i] - std::exp(wb[i]));
      scatter(drb, drp, b, h, T_, H, n);
      scatter(dkb, dkp, b, h, T_, H, n);
      scatter(dvb, dvp, b, h, T_, H, n);
      scatter(dlb, dwp, b, h, T_, H, n);
    }
  });
}

}  // namespace

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
