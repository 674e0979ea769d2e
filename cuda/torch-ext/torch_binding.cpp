// Registers the Bi-WKV ops in the torch library namespace TORCH_EXTENSION_NAME (unique per build, so that
// several variants can live in one process) and makes the shared object importable as a Python module.

// The module object itself needs only the stable ABI: one binary serves every Python >= 3.9.
#define Py_LIMITED_API 0x03090000
#include <Python.h>

#include <torch/library.h>

#include "../bi_wkv/bi_wkv.h"
#include "../bi_wkv/block.h"

// one more expansion level, so that TORCH_EXTENSION_NAME is replaced before token pasting
#define BI_WKV_LIBRARY(NAME, M) TORCH_LIBRARY(NAME, M)
#define BI_WKV_LIBRARY_IMPL(NAME, KEY, M) TORCH_LIBRARY_IMPL(NAME, KEY, M)
#define BI_WKV_CONCAT_(A, B) A##B
#define BI_WKV_CONCAT(A, B) BI_WKV_CONCAT_(A, B)
#define BI_WKV_STR_(X) #X
#define BI_WKV_STR(X) BI_WKV_STR_(X)

BI_WKV_LIBRARY(TORCH_EXTENSION_NAME, m) {
  // r, k, v, w: (B, T, H, N) in one dtype; u: (H, N) float32 (float64 for float64 inputs). y like r.
  m.def("forward(Tensor r, Tensor k, Tensor v, Tensor w, Tensor u) -> Tensor");
  // gradients of r, k, v, w (like r) and of u (like u)
  m.def(
      "backward(Tensor gy, Tensor r, Tensor k, Tensor v, Tensor w, Tensor u) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  // whether the CPU hot loops run an AVX2 / AVX-512 (FMA) clone on this machine
  m.def("hot_loops_use_fma() -> bool", &bi_wkv::hot_loops_use_fma);
  // the fused element-wise work of the block (block_cpu.cpp; CPU only): x (B, T, C) on a grid_h x grid_w grid,
  // maa (M, C), offsets the flattened (dy, dx) pairs of the shift groups -> (delta or empty, mixed (M, B, T, C))
  m.def(
      "token_shift_mix(Tensor x, Tensor maa, int grid_h, int grid_w, int[] offsets, int head_size, bool with_delta)"
      " -> (Tensor, Tensor)");
  // its gradients (grad_x, grad_maa) from grad_mixed (M, B, T, C) and, when delta was used, grad_delta (B, T, C)
  m.def(
      "token_shift_mix_backward(Tensor grad_mixed, Tensor? grad_delta, Tensor x, Tensor maa, int grid_h, int grid_w,"
      " int[] offsets, int head_size) -> (Tensor, Tensor)");
  // GroupNorm(y) * gate, y and gate (rows, channels)
  m.def("group_norm_gate(Tensor y, Tensor gate, Tensor weight, Tensor bias, int groups, float eps) -> Tensor");
  // its gradients (grad_y, grad_gate, grad_weight, grad_bias)
  m.def(
      "group_norm_gate_backward(Tensor grad, Tensor y, Tensor gate, Tensor weight, Tensor bias, int groups, float eps)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
}

BI_WKV_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CPU, m) {
  m.impl("forward", &bi_wkv::forward_cpu);
  m.impl("backward", &bi_wkv::backward_cpu);
  m.impl("token_shift_mix", &bi_wkv::token_shift_mix_cpu);
  m.impl("token_shift_mix_backward", &bi_wkv::token_shift_mix_backward_cpu);
  m.impl("group_norm_gate", &bi_wkv::group_norm_gate_cpu);
  m.impl("group_norm_gate_backward", &bi_wkv::group_norm_gate_backward_cpu);
}

#ifdef BI_WKV_WITH_CUDA
BI_WKV_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CUDA, m) {
  m.impl("forward", &bi_wkv::forward_cuda);
  m.impl("backward", &bi_wkv::backward_cuda);
}
#endif

static PyModuleDef bi_wkv_module = {PyModuleDef_HEAD_INIT, BI_WKV_STR(TORCH_EXTENSION_NAME), nullptr, 0, nullptr};

// Importing the module loads the library, which runs the registrations above.
extern "C" PyMODINIT_FUNC BI_WKV_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  return PyModuleDef_Init(&bi_wkv_module);
}
