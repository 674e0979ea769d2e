"""Bi-WKV: the prebuilt kernel against the PyTorch chunked path (CPU) and against a one-thread-per-channel
CUDA implementation of the original design (GPU, when one is present).

    python benchmarks/bench_bi_wkv.py --quick     # batch 2, fewer repeats
    python benchmarks/bench_bi_wkv.py             # batch 8

Needs the kernel built (`make kernels`; `make kernels-cuda` on a GPU machine); it is found through
LOCAL_KERNELS like in the tests. Widths of B/32 and B/16 (identical towers): text 10 heads of 64, image 8 heads
of 80. Times are medians in milliseconds.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("LOCAL_KERNELS", f"rwkv-clip-hf/bi-wkv={ROOT / 'cuda'}")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from rwkv_clip_hf.ops.bi_wkv import chunk_bi_wkv  # noqa: E402
from rwkv_clip_hf.ops.bi_wkv.kernel import load_kernel  # noqa: E402


SEQ_LENS = (49, 77, 196, 1024, 4096)
WIDTHS = {"text (10 x 64)": (10, 64), "image (8 x 80)": (8, 80)}


def timed(fn, repeats, sync=lambda: None):
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def inputs(batch, seq_len, heads, size, device, dtype=torch.float32, grad=False):
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (batch, seq_len, heads, size)
    r, k, v = (torch.randn(shape, generator=g) for _ in range(3))
    w = -6.0 + 7.0 * torch.rand(shape, generator=g)
    u = torch.randn(heads, size, generator=g)
    return [x.to(device, dtype).requires_grad_(grad) for x in (r, k, v, w, u)]


def fwd_bwd(fn, xs):
    def run():
        for x in xs:
            x.grad = None
        fn(*xs).sum().backward()

    return run


def bench_cpu(batch, repeats):
    kernel = load_kernel("cpu")
    print(f"CPU, {torch.get_num_threads()} threads, batch {batch}: kernel vs PyTorch chunked path")
    print(
        f"{'width':16} {'T':>5} | {'fwd torch':>10} {'fwd kernel':>10} {'x':>6} | "
        f"{'f+b torch':>10} {'f+b kernel':>10} {'x':>6}"
    )
    for label, (heads, size) in WIDTHS.items():
        for seq_len in SEQ_LENS:
            b = max(1, batch * 196 // max(seq_len, 196)) if seq_len > 196 else batch  # keep long T affordable
            xs = inputs(b, seq_len, heads, size, "cpu")
            reps = max(1, repeats // (2 if seq_len >= 1024 else 1))
            with torch.no_grad():
                t_torch = timed(lambda: chunk_bi_wkv(*xs), reps)
                t_kernel = timed(lambda: kernel.bi_wkv(*xs), reps)
            gx = inputs(b, seq_len, heads, size, "cpu", grad=True)
            tb_torch = timed(fwd_bwd(chunk_bi_wkv, gx), reps)
            tb_kernel = timed(fwd_bwd(kernel.bi_wkv, gx), reps)
            print(
                f"{label:16} {seq_len:>5} | {t_torch:10.2f} {t_kernel:10.2f} {t_torch / t_kernel:6.1f} | "
                f"{tb_torch:10.2f} {tb_kernel:10.2f} {tb_torch / tb_kernel:6.1f}   (batch {b})"
            )


# The original design, written for this benchmark: one thread per value channel c of one (batch, head),
# the column S[:, c] of the state in registers, a serial loop over T per direction, r/k/w re-read from
# global memory at every step. Forward only: the backward of that design needs a T-sized array per thread.
ORIGINAL_DESIGN_CUDA = r"""
#include <torch/extension.h>
template <int N>
__global__ void one_thread_per_channel(const float* r, const float* k, const float* v, const float* w,
                                       const float* u, float* y, int T, int H) {
  const int bh = blockIdx.x, c = threadIdx.x, b = bh / H, h = bh % H;
  const long base = ((long)b * T * H + h) * N, stride = (long)H * N;
  float S[N];
  for (int d = 0; d < N; ++d) S[d] = 0.f;
  for (int t = 0; t < T; ++t) {
    const long o = base + t * stride;
    float acc = 0.f;
    const float vc = v[o + c];
    for (int d = 0; d < N; ++d) {
      acc += r[o + d] * (S[d] + u[h * N + d] * k[o + d] * vc);
      S[d] = expf(-expf(w[o + d])) * S[d] + k[o + d] * vc;
    }
    y[o + c] = acc;
  }
  for (int d = 0; d < N; ++d) S[d] = 0.f;
  for (int t = T - 1; t >= 0; --t) {
    const long o = base + t * stride;
    float acc = 0.f;
    const float vc = v[o + c];
    for (int d = 0; d < N; ++d) {
      acc += r[o + d] * S[d];
      S[d] = expf(-expf(w[o + d])) * S[d] + k[o + d] * vc;
    }
    y[o + c] += acc;
  }
}
torch::Tensor original_design(torch::Tensor r, torch::Tensor k, torch::Tensor v, torch::Tensor w, torch::Tensor u) {
  auto y = torch::empty_like(r);
  const int B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  if (N == 64) one_thread_per_channel<64><<<B * H, 64>>>(r.data_ptr<float>(), k.data_ptr<float>(),
      v.data_ptr<float>(), w.data_ptr<float>(), u.data_ptr<float>(), y.data_ptr<float>(), T, H);
  else if (N == 80) one_thread_per_channel<80><<<B * H, 80>>>(r.data_ptr<float>(), k.data_ptr<float>(),
      v.data_ptr<float>(), w.data_ptr<float>(), u.data_ptr<float>(), y.data_ptr<float>(), T, H);
  else TORCH_CHECK(false, "head size 64 or 80");
  return y;
}
"""

# HBM bandwidth of the devices we may be lent, bytes/s (SXM parts)
PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}


def bench_cuda(batch, repeats):
    from torch.utils.cpp_extension import load_inline

    kernel = load_kernel("cuda")
    original = load_inline(
        "bi_wkv_original_design", cpp_sources="", cuda_sources=ORIGINAL_DESIGN_CUDA, functions=["original_design"]
    )
    name = torch.cuda.get_device_name()
    peak = next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), None)
    sync = torch.cuda.synchronize
    print(f"\nCUDA, {name}, batch {batch}")
    print(
        f"{'width':16} {'T':>5} {'dtype':>8} | {'fwd orig':>9} {'fwd ours':>9} {'x':>5} | "
        f"{'f+b ours':>9} {'GB/s fwd':>9} {'of peak':>7}"
    )
    for label, (heads, size) in WIDTHS.items():
        for seq_len in SEQ_LENS:
            xs = inputs(batch, seq_len, heads, size, "cuda")
            with torch.no_grad():
                t_orig = timed(lambda: original.original_design(*xs), repeats, sync)
                for dtype in (torch.float32, torch.bfloat16):
                    ys = [x.to(dtype) if i < 4 else x for i, x in enumerate(xs)]
                    t_ours = timed(lambda: kernel.bi_wkv(*ys), repeats, sync)
                    gx = [x.detach().clone().requires_grad_() for x in ys]
                    t_fb = timed(fwd_bwd(kernel.bi_wkv, gx), repeats, sync)
                    moved = 5 * xs[0].numel() * ys[0].element_size()  # r, k, v, w in, y out
                    bandwidth = moved / (t_ours * 1e-3)
                    share = f"{bandwidth / peak:7.0%}" if peak else "      ?"
                    print(
                        f"{label:16} {seq_len:>5} {str(dtype)[6:]:>8} | {t_orig:9.3f} {t_ours:9.3f} "
                        f"{t_orig / t_ours:5.1f} | {t_fb:9.3f} {bandwidth / 1e9:9.0f} {share}"
                    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 2 and 3 repeats on the CPU")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--cpu-only", action="store_true")
    args = parser.parse_args()
    batch = args.batch or (2 if args.quick else 8)
    bench_cpu(batch, 3 if args.quick else 10)
    if torch.cuda.is_available() and not args.cpu_only:
        bench_cuda(args.batch or 32, 20)
    elif not torch.cuda.is_available():
        print("\nno GPU: CUDA figures not measured")


if __name__ == "__main__":
    main()
