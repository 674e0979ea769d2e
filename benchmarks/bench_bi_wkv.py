"""Bi-WKV: the prebuilt kernel against the PyTorch chunked path (CPU) and against a one-thread-per-channel
CUDA implementation of the original design (GPU, when one is present), forward and forward+backward, with the
achieved memory bandwidth as a share of the device's peak. The original-design reference is checked against the
float64 recurrence (forward and every gradient) before it is timed.

    python benchmarks/bench_bi_wkv.py --quick     # batch 2, fewer repeats
    python benchmarks/bench_bi_wkv.py             # batch 8
    python benchmarks/bench_bi_wkv.py --gpu-check # `make gpu-check`: build, native tests and benchmarks on a GPU

Needs the kernel built (`make kernels`; `make kernels-cuda` on a GPU machine); it is found through
LOCAL_KERNELS like in the tests. Widths of B/32 and B/16 (identical towers): text 10 heads of 64, image 8 heads
of 80. Times are medians in milliseconds.
"""

import argparse
import os
import statistics
import subprocess
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


# The original design, written for this benchmark (not copied): one thread per channel of one (batch, head), its
# state row or column in registers, serial loops over T, every other channel's inputs re-read from global memory
# at each step.
# * Forward: thread c (a value channel) keeps the column S[:, c] and sweeps T forwards, then backwards.
# * Backward: dv is the forward with (r, k, v) -> (k, r, dy) (the decay products are symmetric), so it reuses
#   the forward kernel. Thread d (a key channel) computes dr, dk, du and dw in three serial passes: forwards
#   with the row d of the states of k v^T and r dy^T, backwards with the other two, and a last pass over a
#   T-long per-thread scratch array in global memory (the design's T-sized array per thread). dw is the
#   difference of prefix and suffix sums of per-step scalars, as in one-thread-per-channel RWKV kernels.
ORIGINAL_DESIGN_CUDA = r"""
#include <torch/extension.h>
template <int N>
__global__ void forward_per_value_channel(const float* r, const float* k, const float* v, const float* w,
                                          const float* u, float* y, int T, int H) {
  const int bh = blockIdx.x, c = threadIdx.x, h = bh % H;
  const long base = ((long)(bh / H) * T * H + h) * N, stride = (long)H * N;
  float S[N];
  for (int d = 0; d < N; ++d) S[d] = 0.f;
  for (int t = 0; t < T; ++t) {
    const long o = base + t * stride;
    float acc = 0.f;
    const float vc = v[o + c];
#pragma unroll
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
#pragma unroll
    for (int d = 0; d < N; ++d) {
      acc += r[o + d] * S[d];
      S[d] = expf(-expf(w[o + d])) * S[d] + k[o + d] * vc;
    }
    y[o + c] += acc;
  }
}

// Thread d, per step t: q_t = r_t[d] sum_c dy_t[c] A_t[d,c] (A: forward state of k v^T before t), p_t =
// k_t[d] sum_c v_t[c] C_t[d,c] (C: backward state of r dy^T after t), and q'_t, p'_t likewise with the other
// direction's states B, D. d log(decay_j) = sum_{t>j} q_t - sum_{s>=j} p_s + sum_{t<j} q'_t - sum_{s<=j} p'_s.
template <int N>
__global__ void backward_per_key_channel(const float* r, const float* k, const float* v, const float* w,
                                         const float* u, const float* dy, float* dr, float* dk, float* dw,
                                         float* du, float* scratch, int T, int H) {
  const int bh = blockIdx.x, d = threadIdx.x, h = bh % H;
  const long base = ((long)(bh / H) * T * H + h) * N, stride = (long)H * N;
  const float ud = u[h * N + d];
  float A[N], D[N];
  float du_acc = 0.f, prefix_p2 = 0.f;
  for (int c = 0; c < N; ++c) A[c] = D[c] = 0.f;
  for (int t = 0; t < T; ++t) {  // forwards: A (k v^T), D (r dy^T)
    const long o = base + t * stride;
    const float rd = r[o + d], kd = k[o + d], ed = expf(-expf(w[o + d]));
    float gA = 0.f, gv = 0.f, vD = 0.f;
#pragma unroll
    for (int c = 0; c < N; ++c) {
      const float g = dy[o + c], vc = v[o + c];
      gA += g * A[c];
      gv += g * vc;
      vD += vc * D[c];
      A[c] = ed * A[c] + kd * vc;
      D[c] = ed * D[c] + rd * g;
    }
    dr[o + d] = gA + ud * kd * gv;
    dk[o + d] = vD + ud * rd * gv;
    du_acc += rd * kd * gv;
    scratch[o + d] = rd * gA;     // q_t
    prefix_p2 += kd * vD;         // sum_{s<=t} p'_s
    dw[o + d] = -prefix_p2;
  }
  du[bh * N + d] = du_acc;
  float B[N], C[N];
  float suffix_q = 0.f, suffix_p = 0.f, suffix_q2 = 0.f;
  for (int c = 0; c < N; ++c) B[c] = C[c] = 0.f;
  for (int t = T - 1; t >= 0; --t) {  // backwards: B (k v^T), C (r dy^T)
    const long o = base + t * stride;
    const float rd = r[o + d], kd = k[o + d], ed = expf(-expf(w[o + d]));
    float gB = 0.f, vC = 0.f;
#pragma unroll
    for (int c = 0; c < N; ++c) {
      const float g = dy[o + c], vc = v[o + c];
      gB += g * B[c];
      vC += vc * C[c];
      B[c] = ed * B[c] + kd * vc;
      C[c] = ed * C[c] + rd * g;
    }
    dr[o + d] += gB;
    dk[o + d] += vC;
    suffix_p += kd * vC;          // sum_{s>=t} p_s
    suffix_q2 += rd * gB;         // sum_{s>=t} q'_s
    dw[o + d] += suffix_q - suffix_p - suffix_q2;
    suffix_q += scratch[o + d];   // sum_{s>t} q_s for the next (earlier) step
  }
  for (int t = 0; t < T; ++t) {  // + sum of all q'_t; d log(decay) / d w = -exp(w)
    const long o = base + t * stride;
    const float ew = expf(w[o + d]);
    dw[o + d] = (dw[o + d] + suffix_q2) * -ew;
  }
}

#define DISPATCH(N_, launch) if (N == N_) { launch(N_); } else
#define LAUNCH_FORWARD(N_) forward_per_value_channel<N_><<<B * H, N_>>>(r.data_ptr<float>(), k.data_ptr<float>(), \
    v.data_ptr<float>(), w.data_ptr<float>(), u.data_ptr<float>(), y.data_ptr<float>(), T, H)
#define LAUNCH_BACKWARD(N_) backward_per_key_channel<N_><<<B * H, N_>>>(r.data_ptr<float>(), k.data_ptr<float>(), \
    v.data_ptr<float>(), w.data_ptr<float>(), u.data_ptr<float>(), dy.data_ptr<float>(), dr.data_ptr<float>(), \
    dk.data_ptr<float>(), dw.data_ptr<float>(), du.data_ptr<float>(), scratch.data_ptr<float>(), T, H)

torch::Tensor original_design(torch::Tensor r, torch::Tensor k, torch::Tensor v, torch::Tensor w, torch::Tensor u) {
  auto y = torch::empty_like(r);
  const int B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  DISPATCH(64, LAUNCH_FORWARD) DISPATCH(80, LAUNCH_FORWARD) TORCH_CHECK(false, "head size 64 or 80");
  return y;
}

// (dr, dk, dv, dw, du): dv by the forward kernel on (k, r, dy); du summed over the batch
std::vector<torch::Tensor> original_design_backward(torch::Tensor r, torch::Tensor k, torch::Tensor v, torch::Tensor w,
                                                    torch::Tensor u, torch::Tensor dy) {
  const int B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  auto dr = torch::empty_like(r), dk = torch::empty_like(r), dw = torch::empty_like(r), scratch = torch::empty_like(r);
  auto du = torch::empty({B, H, N}, r.options());
  DISPATCH(64, LAUNCH_BACKWARD) DISPATCH(80, LAUNCH_BACKWARD) TORCH_CHECK(false, "head size 64 or 80");
  auto dv = original_design(k, r, dy, w, u);
  return {dr, dk, dv, dw, du.sum(0)};
}
"""
ORIGINAL_DESIGN_FUNCTIONS = ["original_design", "original_design_backward"]


def check_original_design(original, repeats=1):
    """The benchmark's reference must be right before it is timed: forward and backward against the float64
    naive recurrence, at both head sizes and a few lengths (raises if not)."""
    from rwkv_clip_hf.ops.bi_wkv import naive_bi_wkv

    worst = 0.0
    for heads, size in WIDTHS.values():
        for seq_len in (1, 2, 49, 77):
            xs = inputs(2, seq_len, heads, size, "cuda")
            dy = torch.randn_like(xs[0])
            exact = [x.detach().double().requires_grad_() for x in xs]
            y64 = naive_bi_wkv(*exact)
            grads64 = torch.autograd.grad(y64, exact, dy.double())
            got = [original.original_design(*xs)] + list(original.original_design_backward(*xs, dy))
            for name, value, expected in zip(("y", "dr", "dk", "dv", "dw", "du"), got, [y64, *grads64]):
                error = ((value.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
                worst = max(worst, error)
                if error > 1e-4:
                    raise AssertionError(
                        f"original-design {name} wrong at T={seq_len}, N={size}: relative error {error:.2e}"
                    )
    print(f"original-design reference checked against float64 (forward and backward): max relative error {worst:.1e}")


# HBM bandwidth of the devices we may be lent, bytes/s (SXM parts)
PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}


def bench_cuda(batch, repeats):
    from torch.utils.cpp_extension import load_inline

    kernel = load_kernel("cuda")
    original = load_inline(
        "bi_wkv_original_design",
        cpp_sources="",
        cuda_sources=ORIGINAL_DESIGN_CUDA,
        functions=ORIGINAL_DESIGN_FUNCTIONS,
    )
    check_original_design(original)
    name = torch.cuda.get_device_name()
    peak = next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), None)
    sync = torch.cuda.synchronize
    print(f"\nCUDA, {name}, batch {batch}; the original design computes in float32 only")
    print(
        f"{'width':16} {'T':>5} {'dtype':>8} | {'fwd orig':>9} {'fwd ours':>9} {'x':>5} | "
        f"{'f+b orig':>9} {'f+b ours':>9} {'x':>5} | {'GB/s fwd':>9} {'of peak':>7} {'GB/s f+b':>9} {'of peak':>7}"
    )
    share = (lambda bandwidth: f"{bandwidth / peak:7.0%}") if peak else (lambda bandwidth: "      ?")
    for label, (heads, size) in WIDTHS.items():
        for seq_len in SEQ_LENS:
            xs = inputs(batch, seq_len, heads, size, "cuda")
            dy = torch.ones_like(xs[0])  # what fwd_bwd's .sum().backward() feeds our kernel
            with torch.no_grad():
                t_orig = timed(lambda: original.original_design(*xs), repeats, sync)
                t_orig_fb = timed(
                    lambda: (original.original_design(*xs), original.original_design_backward(*xs, dy)), repeats, sync
                )
            for dtype in (torch.float32, torch.bfloat16):
                ys = [x.to(dtype) if i < 4 else x for i, x in enumerate(xs)]
                with torch.no_grad():
                    t_ours = timed(lambda: kernel.bi_wkv(*ys), repeats, sync)
                gx = [x.detach().clone().requires_grad_() for x in ys]
                t_fb = timed(fwd_bwd(kernel.bi_wkv, gx), repeats, sync)
                tensor_bytes = xs[0].numel() * ys[0].element_size()
                forward_bw = 5 * tensor_bytes / (t_ours * 1e-3)  # r, k, v, w in, y out
                # + backward: r, k, v, w, dy in, dr, dk, dv, dw out
                both_bw = 14 * tensor_bytes / (t_fb * 1e-3)
                print(
                    f"{label:16} {seq_len:>5} {str(dtype)[6:]:>8} | "
                    f"{t_orig:9.3f} {t_ours:9.3f} {t_orig / t_ours:5.1f} | "
                    f"{t_orig_fb:9.3f} {t_fb:9.3f} {t_orig_fb / t_fb:5.1f} | "
                    f"{forward_bw / 1e9:9.0f} {share(forward_bw)} {both_bw / 1e9:9.0f} {share(both_bw)}"
                )


# ------------------------------------------------------------------------------------------------ make gpu-check


class CheckTable:
    """The one table `make gpu-check` prints: a row per build, test run, accuracy and timing."""

    def __init__(self):
        self.rows = []

    def add(self, section, item, config, value):
        self.rows.append((section, item, config, value))
        print(f"  {section} | {item} | {config} | {value}", flush=True)

    def print(self, title):
        widths = [
            max(len(str(row[i])) for row in self.rows + [("check", "item", "config", "result")]) for i in range(4)
        ]
        line = lambda row: " | ".join(str(cell).ljust(width) for cell, width in zip(row, widths))  # noqa: E731
        print(
            f"\n{title}\n" + line(("check", "item", "config", "result")) + "\n" + "-+-".join("-" * w for w in widths)
        )
        for row in self.rows:
            print(line(row))


def _run_step(table, section, item, command, timeout, env=None):
    """Run a build or test command; one table row with its outcome (pytest's summary line, or the error)."""
    started = time.time()
    try:
        result = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
        )
    except subprocess.TimeoutExpired:
        table.add(section, item, "", f"TIMED OUT after {timeout} s")
        return False
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    summary = next(
        (line for line in reversed(lines) if " passed" in line or " failed" in line), lines[-1] if lines else ""
    )
    status = "ok" if result.returncode == 0 else f"FAILED (exit {result.returncode})"
    table.add(section, item, f"{time.time() - started:.0f} s", f"{status}: {summary.strip('= ')}"[:150])
    if result.returncode != 0:
        print("\n".join(lines[-40:]))
    return result.returncode == 0


def _max_rel_error(fn, xs, dy):
    """Largest relative error of the output and of every gradient against autograd through the float64 recurrence."""
    from rwkv_clip_hf.ops.bi_wkv import naive_bi_wkv

    exact = [x.detach().cpu().double().requires_grad_() for x in xs]
    y64 = naive_bi_wkv(*exact)
    expected = [y64, *torch.autograd.grad(y64, exact, dy.cpu().double())]
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    y = fn(*leaves)
    got = [y, *torch.autograd.grad(y, leaves, dy.to(y.dtype))]
    return max(
        ((a.detach().cpu().double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        for a, b in zip(got, expected)
    )


def _rwkv_vision_tower(backend, device):
    from rwkv_clip_hf import RWKVCLIPConfig, RWKVCLIPVisionModel
    from rwkv_clip_hf.modeling_rwkv_clip import RWKVCLIPTokenMix

    torch.manual_seed(0)
    model = RWKVCLIPVisionModel(RWKVCLIPConfig.from_preset("B/32").vision_config).to(device).eval()
    for module in model.modules():
        if isinstance(module, RWKVCLIPTokenMix):
            module.bi_wkv_backend = lambda backend=backend: backend  # the Bi-WKV implementation under test
    return model


def gpu_check(smoke=False):
    """`make gpu-check`: on a GPU, build the CUDA variant, run the CUDA and Triton tests natively, check every
    Bi-WKV path against float64 and time it (CUDA kernel, Triton, chunked PyTorch, the original design), then
    RWKV-CLIP's vision tower with each path against transformers' CLIP at 224-1792 px. `smoke`: tiny shapes on
    the CPU (Triton under the interpreter), to check the script itself without a GPU."""
    from rwkv_clip_hf.ops.bi_wkv import bi_wkv
    from rwkv_clip_hf.ops.bi_wkv.kernel import KernelUnavailableError, clear_cache
    from rwkv_clip_hf.ops.bi_wkv.triton_op import triton_available

    device = "cpu" if smoke else "cuda"
    if not smoke and not torch.cuda.is_available():
        sys.exit("gpu-check: torch sees no GPU (torch.cuda.is_available() is False); it needs a CUDA build of torch")
    started = time.time()
    table = CheckTable()
    name = "CPU (smoke run, Triton interpreted)" if smoke else torch.cuda.get_device_name()
    sync = (lambda: None) if smoke else torch.cuda.synchronize
    print(f"gpu-check on {name}, torch {torch.__version__}", flush=True)

    if not smoke:
        jobs = str(min(16, os.cpu_count() or 2))
        _run_step(
            table,
            "build",
            "CUDA + Triton variants",
            [sys.executable, "cuda/build.py", "--backend", "cuda", "triton"],
            300,
            {"MAX_JOBS": jobs},
        )
        _run_step(table, "build", "hub rules", [sys.executable, "cuda/check_hub_rules.py"], 60)
        pytest = [sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider"]
        env = {"RWKV_CLIP_REQUIRE_KERNEL": "1", "HF_HUB_OFFLINE": "1", "TRITON_INTERPRET": "0"}
        _run_step(table, "tests", "CUDA kernel", pytest + ["tests/ops/test_bi_wkv_kernel.py", "-k", "cuda"], 240, env)
        _run_step(
            table,
            "tests",
            "Triton (native)",
            pytest + ["tests/ops/test_bi_wkv_triton.py", "tests/ops/test_kernel_build.py", "-k", "triton"],
            240,
            env,
        )
        clear_cache()

    paths = {"torch (chunked)": lambda *xs: bi_wkv(*xs, backend="torch")}
    try:
        bi_wkv(*inputs(1, 2, 1, 16, device), backend="kernel")
        paths["CUDA kernel" if not smoke else "CPU kernel"] = lambda *xs: bi_wkv(*xs, backend="kernel")
    except KernelUnavailableError as error:
        table.add("bi-wkv", "kernel", device, f"UNAVAILABLE: {error}"[:150])
    if triton_available(device):
        paths["Triton"] = lambda *xs: bi_wkv(*xs, backend="triton")
    else:
        table.add("bi-wkv", "Triton", device, "UNAVAILABLE: triton cannot run here")
    if not smoke:
        from torch.utils.cpp_extension import load_inline

        try:
            original = load_inline(
                "bi_wkv_original_design",
                cpp_sources="",
                cuda_sources=ORIGINAL_DESIGN_CUDA,
                functions=ORIGINAL_DESIGN_FUNCTIONS,
            )

            class _OriginalDesign(torch.autograd.Function):
                @staticmethod
                def forward(ctx, r, k, v, w, u):
                    ctx.save_for_backward(r, k, v, w, u)
                    return original.original_design(r, k, v, w, u)

                @staticmethod
                def backward(ctx, dy):
                    return tuple(original.original_design_backward(*ctx.saved_tensors, dy.contiguous()))

            paths["original design"] = _OriginalDesign.apply
        except Exception as error:  # a benchmark row, not a crash
            table.add("bi-wkv", "original design", device, f"UNAVAILABLE: {type(error).__name__}: {error}"[:150])

    # accuracy: forward and every gradient against the float64 recurrence, mixed decays (w from -20 to 10)
    for label, (heads, size) in WIDTHS.items():
        seq_len = 20 if smoke else 77
        g = torch.Generator().manual_seed(1)
        xs = [torch.randn(1 if smoke else 2, seq_len, heads, size, generator=g) for _ in range(3)]
        xs.append(-20.0 + 30.0 * torch.rand(xs[0].shape, generator=g))
        xs.append(torch.randn(heads, size, generator=g))
        xs = [x.to(device) for x in xs]
        dy = torch.randn(xs[0].shape, generator=g).to(device)
        for path, fn in paths.items():
            table.add(
                "accuracy",
                path,
                f"{label}, T={seq_len}, fp32",
                f"max rel. error {_max_rel_error(fn, xs, dy):.1e} (y, dr, dk, dv, dw, du)",
            )

    # timing: medians in ms, forward and forward + backward
    seq_lens = (49,) if smoke else (49, 77, 196, 577, 1024, 4096)
    batch, repeats = (1, 1) if smoke else (32, 10)
    for label, (heads, size) in list(WIDTHS.items())[:1] if smoke else WIDTHS.items():
        for seq_len in seq_lens:
            b = max(1, batch * 196 // seq_len) if seq_len > 196 else batch
            for dtype in (torch.float32,) if smoke else (torch.float32, torch.bfloat16):
                xs = [x.to(dtype) if i < 4 else x for i, x in enumerate(inputs(b, seq_len, heads, size, device))]
                for path, fn in paths.items():
                    if smoke and path == "Triton":
                        continue  # interpreted: checked above, timing it would mean nothing
                    if path == "original design" and dtype != torch.float32:
                        continue
                    if path == "torch (chunked)" and seq_len > 1024:
                        continue  # its intra-chunk tensor makes it slow and large there
                    with torch.no_grad():
                        t_fwd = timed(lambda: fn(*xs), repeats, sync)
                    gx = [x.detach().clone().requires_grad_() for x in xs]
                    t_both = timed(fwd_bwd(fn, gx), repeats, sync)
                    dt = str(dtype)[6:]
                    table.add(
                        "bi-wkv ms",
                        path,
                        f"{label}, T={seq_len}, batch {b}, {dt}",
                        f"fwd {t_fwd:.3f}, fwd+bwd {t_both:.3f}",
                    )
        if time.time() - started > 330 and not smoke:
            table.add("bi-wkv ms", "(stopped)", "", "time budget: remaining widths skipped")
            break

    # towers: images/s of the vision tower, forward, fp32, RWKV-CLIP B/32 with each Bi-WKV path against CLIP ViT-B/32
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    clip = (
        CLIPVisionModel(CLIPVisionConfig(image_size=64, patch_size=32) if smoke else CLIPVisionConfig())
        .to(device)
        .eval()
    )
    towers = {"transformers CLIP": clip}
    backends = {"torch (chunked)": "torch", "CUDA kernel": "kernel", "CPU kernel": "kernel", "Triton": "triton"}
    for path in paths:
        if path in backends and not (smoke and path == "Triton"):
            towers[f"RWKV-CLIP, {path}"] = _rwkv_vision_tower(backends[path], device)
    for px in (64,) if smoke else (224, 448, 896, 1792):
        if time.time() - started > 420 and not smoke:
            table.add("towers img/s", "(stopped)", f"{px}px", "time budget: larger sizes skipped")
            break
        b = 1 if smoke else max(1, int(32 * (224 / px) ** 2))
        pixels = torch.randn(b, 3, px, px, device=device)
        for tower_name, model in towers.items():
            kwargs = (
                {"interpolate_pos_encoding": True} if "CLIP" in tower_name and px != model.config.image_size else {}
            )
            with torch.no_grad():
                try:
                    ms = timed(lambda: model(pixel_values=pixels, **kwargs), 1 if smoke else 5, sync)
                    table.add(
                        "towers img/s",
                        tower_name,
                        f"{px}px, batch {b}, fp32",
                        f"{b / (ms * 1e-3):.1f} img/s ({ms:.1f} ms)",
                    )
                except Exception as error:  # e.g. out of memory at 1792 px
                    table.add(
                        "towers img/s",
                        tower_name,
                        f"{px}px, batch {b}",
                        f"FAILED: {type(error).__name__}: {error}"[:150],
                    )
                    if device == "cuda":
                        torch.cuda.empty_cache()
    table.print(f"gpu-check on {name}: {time.time() - started:.0f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 2 and 3 repeats on the CPU")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--cpu-only", action="store_true")
    parser.add_argument("--gpu-check", action="store_true", help="what `make gpu-check` runs (needs a GPU)")
    parser.add_argument("--smoke", action="store_true", help="with --gpu-check: tiny shapes on the CPU, no GPU needed")
    args = parser.parse_args()
    if args.gpu_check:
        gpu_check(smoke=args.smoke)
        return
    batch = args.batch or (2 if args.quick else 8)
    bench_cpu(batch, 3 if args.quick else 10)
    if torch.cuda.is_available() and not args.cpu_only:
        bench_cuda(args.batch or 32, 20)
    elif not torch.cuda.is_available():
        print("\nno GPU: CUDA figures not measured")


if __name__ == "__main__":
    main()
