// Bi-WKV kernels: shared declarations and input checks of the CPU and CUDA implementations.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace bi_wkv {

// r, k, v, w: (B, T, H, N), one floating dtype, contiguous, on `device`; u: (H, N) contiguous in the
// accumulation dtype (float32, or float64 for float64 inputs). The Python face casts and lays out inputs.
inline void check_inputs(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
                         const at::Tensor& u, at::DeviceType device) {
  TORCH_CHECK(r.dim() == 4, "bi_wkv: r must be (batch, seq_len, heads, head_size), got ", r.sizes());
  TORCH_CHECK(r.device().type() == device, "bi_wkv: expected tensors on ", device, ", got ", r.device());
  TORCH_CHECK(r.is_contiguous(), "bi_wkv: r must be contiguous");
  const at::Tensor* others[] = {&k, &v, &w};
  const char* names[] = {"k", "v", "w"};
  for (int i = 0; i < 3; ++i) {
    TORCH_CHECK(others[i]->sizes() == r.sizes(), "bi_wkv: ", names[i], " has shape ", others[i]->sizes(),
                ", expected ", r.sizes());
    TORCH_CHECK(others[i]->scalar_type() == r.scalar_type(), "bi_wkv: ", names[i], " has dtype ",
                others[i]->scalar_type(), ", expected ", r.scalar_type(), " like r");
    TORCH_CHECK(others[i]->device() == r.device(), "bi_wkv: ", names[i], " is on ", others[i]->device());
    TORCH_CHECK(others[i]->is_contiguous(), "bi_wkv: ", names[i], " must be contiguous");
  }
  const auto acc = r.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(u.dim() == 2 && u.size(0) == r.size(2) && u.size(1) == r.size(3),
              "bi_wkv: u must be (heads, head_size) = (", r.size(2), ", ", r.size(3), "), got ", u.sizes());
  TORCH_CHECK(u.scalar_type() == acc, "bi_wkv: u must be ", acc, " for ", r.scalar_type(), " inputs");
  TORCH_CHECK(u.device() == r.device() && u.is_contiguous(), "bi_wkv: u must be contiguous on ", r.device());
}

inline void check_like(const at::Tensor& x, const at::Tensor& r, const char* name) {
  TORCH_CHECK(x.sizes() == r.sizes() && x.scalar_type() == r.scalar_type() && x.device() == r.device(),
              "bi_wkv: ", name, " must match r in shape, dtype and device");
  TORCH_CHECK(x.is_contiguous(), "bi_wkv: ", name, " must be contiguous");
}

// whether the CPU hot loops run an FMA (AVX2 / AVX-512) clone: the run-time dispatch, for the tests
bool hot_loops_use_fma();

at::Tensor forward_cpu(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
                       const at::Tensor& u);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& gy, const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
    const at::Tensor& u);

#ifdef BI_WKV_WITH_CUDA
at::Tensor forward_cuda(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
                        const at::Tensor& u);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& gy, const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
    const at::Tensor& u);
#endif

}  // namespace bi_wkv
