#!/usr/bin/env python
"""CPU benchmark of the RWKV-CLIP towers against the transformers CLIP ViT-B/32 towers.

All models are randomly initialised from configs (no download, works with HF_HUB_OFFLINE=1), run in
fp32 (and bf16 autocast), in eval mode, under `torch.inference_mode()`, with `torch.set_num_threads(--threads)`.

What it measures, in one run:

1. Vision throughput (images/s) and peak memory of
   `RWKVCLIPVisionModel(RWKVCLIPConfig.from_preset("B/32").vision_config)` versus
   `CLIPVisionModel(CLIPVisionConfig())` (ViT-B/32: hidden 768, 12 layers, patch 32, 224 px) at several
   image sizes (default 224, 896, 1792; fp32, and 224 and 1792 again under bf16 autocast). CLIP gets
   `interpolate_pos_encoding=True` away from 224;
   RWKV-CLIP interpolates on its own.
2. Text throughput (texts/s) and peak memory of `RWKVCLIPTextModel` (B/32 preset) versus
   `CLIPTextModel(CLIPTextConfig())` (hidden 512, 12 layers) on full 77-token captions
   (random ids in [1, 49405], first 49406, last 49407, attention mask all ones).
3. The Bi-WKV share of the RWKV-CLIP forward time: a separate pass in which
   `rwkv_clip_hf.modeling_rwkv_clip.bi_wkv` is replaced by a timing wrapper (then restored); share =
   time inside bi_wkv / total forward time. Unless `--no-profile`, a torch.profiler pass also groups
   self CPU time by op: time under bi_wkv, matmuls (aten::mm/addmm/bmm/linear/...) and everything else
   (elementwise ops, norms, copies), with the top ops by self time, for both models.

Timing: `--warmup` iterations per model, then CLIP and RWKV-CLIP forwards alternate (CLIP, RWKV,
CLIP, RWKV, ...) until each has run at least `--min-iters` iterations and `--min-time` seconds, so
machine noise hits both; the median per-iteration time is converted to items/s.

Peak memory: every (model, workload) runs in a fresh subprocess (this script re-invoked with a hidden
`--_memory-child` flag) that reads `ru_maxrss` after building the model and inputs ("before") and
after `--memory-iters` forwards ("after"). Random-init construction can peak higher than inference,
so on Linux the child first resets its peak-RSS mark to the current RSS (/proc/self/clear_refs); the
construction peak is kept in the JSON. Reported: the absolute peak RSS while running the forwards
("peak"), the increase caused by the forwards ("+fwd", roughly activations and workspaces) and the
parameter memory. Both children import the same modules, so the absolute peaks are comparable. The
children run before any model is built here (`--memory-jobs` of them at a time), because a child's
ru_maxrss can never start below the RSS its parent had when spawning it.

Reading the ratios:
    * speed ratio = RWKV-CLIP items/s / CLIP items/s: > 1 means RWKV-CLIP is faster.
    * memory ratio = RWKV-CLIP MiB / CLIP MiB: < 1 means RWKV-CLIP uses less memory.

The goals checked at the end (issue #20): vision >= 1.10x CLIP at 224 px (batch 8), >= 1.40x at 896 px and
>= 2.00x at 1792 px (batch 1), text >= 1.15x (batch 16); under bf16 autocast >= 1.00x at 224 px, >= 2.00x at
1792 px and text >= 1.00x; the memory a 1792 px forward adds <= 0.80x CLIP's; and RWKV-CLIP's absolute peak
memory <= CLIP's at every image size. The training-step goal is `benchmarks/bench_train.py`'s. Beside the
ratios: the machine (CPU model, AVX2 / AVX-512 / AMX flags, load average at the start and the end: the
machine is shared, so read ratios from a loaded run with care), the square-GEMM throughput of this run in
fp32 and bf16, and each tower's FLOPs per second as a share of it.

Examples:
    HF_HUB_OFFLINE=1 PYTHONPATH=src python benchmarks/bench_towers.py                # full run
    HF_HUB_OFFLINE=1 PYTHONPATH=src python benchmarks/bench_towers.py --quick        # smoke test
    HF_HUB_OFFLINE=1 PYTHONPATH=src python benchmarks/bench_towers.py --threads 8 --json benchmarks/results/run.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

# Make `rwkv_clip_hf` importable from a source checkout without PYTHONPATH=src.
_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
if os.path.isdir(os.path.join(_SRC, "rwkv_clip_hf")) and _SRC not in sys.path:
    sys.path.insert(0, _SRC)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

NATIVE_IMAGE_SIZE = 224
TEXT_LENGTH = 77
BOS_ID, EOS_ID, MAX_REGULAR_ID = 49406, 49407, 49405
DEFAULT_BATCH = {224: 8, 448: 4, 896: 1, 1792: 1}
DEFAULT_SIZES = [224, 896, 1792]
DEFAULT_BF16_SIZES = [224, 1792]
QUICK_VISION_BATCH, QUICK_TEXT_BATCH = 2, 4
# the goals of issue #20: speed ratios (RWKV-CLIP / CLIP throughput, >=) per (tower, size, precision), and the
# ratio of the memory a 1792 px forward adds (<=)
SPEED_GOALS = {
    ("vision", 224, "fp32"): 1.10,
    ("vision", 896, "fp32"): 1.40,
    ("vision", 1792, "fp32"): 2.00,
    ("text", 77, "fp32"): 1.15,
    ("vision", 224, "bf16"): 1.00,
    ("vision", 1792, "bf16"): 2.00,
    ("text", 77, "bf16"): 1.00,
}
FORWARD_MEMORY_GOAL = (1792, 0.80)
GEMM_PEAK_SIZE = 2048
MATMUL_OPS = {
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::linear",
    "aten::matmul",
    "aten::_mm",
    "aten::addmv",
    "aten::mv",
    "aten::dot",
}
MIB = 1024.0 * 1024.0
IMPLS = ("clip", "rwkv")
LABEL = {"clip": "CLIP", "rwkv": "RWKV-CLIP"}


_START = time.perf_counter()


def log(message: str) -> None:
    sys.stderr.write(f"[bench {time.perf_counter() - _START:6.1f}s] {message}\n")
    sys.stderr.flush()


# ----------------------------------------------------------------------------------------------- models


def clip_b32_config():
    """transformers' CLIP ViT-B/32 (openai/clip-vit-base-patch32's sizes; also CLIPConfig()'s defaults)."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config={
            "hidden_size": 512,
            "intermediate_size": 2048,
            "num_attention_heads": 8,
            "num_hidden_layers": 12,
            "max_position_embeddings": TEXT_LENGTH,
            "vocab_size": 49408,
        },
        vision_config={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
            "image_size": NATIVE_IMAGE_SIZE,
            "patch_size": 32,
        },
        projection_dim=512,
    )


def build_model(tower: str, impl: str) -> torch.nn.Module:
    """A randomly initialised tower in eval mode, built from its config only (no network)."""
    torch.manual_seed(0)
    if impl == "rwkv":
        from rwkv_clip_hf import RWKVCLIPConfig, RWKVCLIPTextModel, RWKVCLIPVisionModel

        config = RWKVCLIPConfig.from_preset("B/32")
        if tower == "vision":
            model = RWKVCLIPVisionModel(config.vision_config)
        else:
            model = RWKVCLIPTextModel(config.text_config)
    elif impl == "clip":
        from transformers import CLIPTextModel, CLIPVisionModel

        config = clip_b32_config()
        model = CLIPVisionModel(config.vision_config) if tower == "vision" else CLIPTextModel(config.text_config)
    else:
        raise ValueError(f"unknown implementation {impl!r}")
    return model.eval()


def make_inputs(tower: str, impl: str, size: int, batch: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(1234)
    if tower == "vision":
        inputs: dict[str, Any] = {"pixel_values": torch.randn(batch, 3, size, size, generator=generator)}
        if impl == "clip" and size != NATIVE_IMAGE_SIZE:
            inputs["interpolate_pos_encoding"] = True
        return inputs
    input_ids = torch.randint(1, MAX_REGULAR_ID + 1, (batch, TEXT_LENGTH), generator=generator)
    input_ids[:, 0] = BOS_ID
    input_ids[:, -1] = EOS_ID
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def parameter_mib(model: torch.nn.Module) -> float:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / MIB


def forward_fn(model: torch.nn.Module, inputs: dict[str, Any], precision: str = "fp32") -> Callable[[], Any]:
    """One forward in inference mode; under `torch.autocast("cpu", dtype=torch.bfloat16)` for precision "bf16"."""

    def run() -> Any:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return model(**inputs)

    return run


def forward_flops(model: torch.nn.Module, inputs: dict[str, Any]) -> int:
    """FLOPs of one forward by `torch.utils.flop_counter` (matmuls, convolutions, attention; 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(**inputs)
    return counter.get_total_flops()


def gemm_peak(dtype: torch.dtype, size: int = GEMM_PEAK_SIZE, seconds: float = 1.0) -> float:
    """The machine's GEMM throughput (GFLOP/s) with the current threads: best of repeated square `torch.mm`s."""
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(dtype) for _ in range(2))
    torch.mm(a, b)
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds or best == float("inf"):
        tick = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - tick)
    return 2.0 * size**3 / best / 1e9


# ----------------------------------------------------------------------------------------------- timing


def time_interleaved(
    fns: dict[str, Callable[[], Any]], warmup: int, min_time: float, min_iters: int
) -> dict[str, list[float]]:
    """Per-iteration seconds of each fn, alternating between them until each has >= min_iters and >= min_time."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    while not all(len(t) >= min_iters and sum(t) >= min_time for t in times.values()):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def measure_bi_wkv_share(run: Callable[[], Any], min_time: float, min_iters: int) -> dict[str, Any] | None:
    """Time inside `modeling_rwkv_clip.bi_wkv` / total forward time, by monkeypatching it with a timer."""
    import rwkv_clip_hf.modeling_rwkv_clip as modeling

    if not hasattr(modeling, "bi_wkv"):
        log("warning: rwkv_clip_hf.modeling_rwkv_clip has no `bi_wkv`; Bi-WKV share not measured")
        return None
    original = modeling.bi_wkv
    state = {"seconds": 0.0, "calls": 0}

    def timed_bi_wkv(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            state["seconds"] += time.perf_counter() - start
            state["calls"] += 1

    modeling.bi_wkv = timed_bi_wkv
    try:
        run()  # warm-up with the wrapper in place
        state["seconds"], state["calls"] = 0.0, 0
        totals: list[float] = []
        while len(totals) < min_iters or sum(totals) < min_time:
            start = time.perf_counter()
            run()
            totals.append(time.perf_counter() - start)
    finally:
        modeling.bi_wkv = original
    total = sum(totals)
    if state["calls"] == 0:
        log("warning: the timed bi_wkv was never called (the modeling code no longer calls it by that name)")
    return {
        "iterations": len(totals),
        "total_s": total,
        "bi_wkv_s": state["seconds"],
        "share": state["seconds"] / total if total > 0 else float("nan"),
        "calls_per_forward": state["calls"] / len(totals),
    }


def profile_ops(run: Callable[[], Any], iters: int, impl: str, top: int) -> dict[str, Any]:
    """Self CPU time grouped by op name and by category (bi_wkv / matmul / attention / other)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    import rwkv_clip_hf.modeling_rwkv_clip as modeling

    original = getattr(modeling, "bi_wkv", None)

    def annotated_bi_wkv(*args: Any, **kwargs: Any) -> Any:
        with record_function("bi_wkv"):
            return original(*args, **kwargs)

    patch = impl == "rwkv" and original is not None
    if patch:
        modeling.bi_wkv = annotated_bi_wkv
    try:
        run()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            for _ in range(iters):
                run()
    finally:
        if patch:
            modeling.bi_wkv = original

    by_op: dict[str, float] = defaultdict(float)
    by_category: dict[str, float] = defaultdict(float)
    for event in prof.events():
        self_us = float(event.self_cpu_time_total)
        if self_us <= 0:
            continue
        parent, inside_bi_wkv = event, False
        while parent is not None:
            if parent.name == "bi_wkv":
                inside_bi_wkv = True
                break
            parent = parent.cpu_parent
        name = event.name
        if name != "bi_wkv":
            by_op[name] += self_us
        if inside_bi_wkv:
            by_category["bi_wkv (all ops inside)"] += self_us
        elif name in MATMUL_OPS:
            by_category["matmul (mm/addmm/bmm/linear)"] += self_us
        elif "scaled_dot_product" in name or "attention" in name:
            by_category["attention kernel (sdpa)"] += self_us
        elif "conv" in name:
            by_category["convolution"] += self_us
        else:
            by_category["other (elementwise, norms, copies, ...)"] += self_us
    total = sum(by_category.values())
    ranked = sorted(by_op.items(), key=lambda item: item[1], reverse=True)[:top]
    return {
        "iterations": iters,
        "total_self_ms": total / 1000.0,
        "categories": {k: v / total for k, v in sorted(by_category.items(), key=lambda item: -item[1])},
        "top_ops": [{"op": op, "self_ms": us / 1000.0, "share": us / total} for op, us in ranked],
    }


# ----------------------------------------------------------------------------------------------- memory


def _proc_status_kib(field: str) -> int | None:
    """`VmRSS` (current) or `VmHWM` (peak of this process's own address space) from /proc/self/status."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Resets this process's peak-RSS mark (ru_maxrss / VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def tensor_peak_mib(run: Callable[[], Any]) -> float | None:
    """The most tensor memory alive at once during one forward (torch.profiler's allocation events): what the
    forward itself needs, independent of how much the C allocator keeps (the RSS figures include that)."""
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            run()
        events = sorted(
            (event.start_ns(), event.nbytes())
            for event in prof.profiler.kineto_results.events()
            if event.name() == "[memory]"
        )
    except Exception as error:  # private profiler API: report nothing rather than fail the benchmark
        log(f"tensor peak not measured: {type(error).__name__}: {error}")
        return None
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def memory_child(spec: dict[str, Any]) -> None:
    """Runs in a fresh interpreter: prints one JSON line with the RSS figures of one model's forwards."""
    torch.set_num_threads(spec["threads"])
    import transformers  # noqa: F401

    import rwkv_clip_hf  # noqa: F401  (both children import the same modules)

    model = build_model(spec["tower"], spec["impl"])
    inputs = make_inputs(spec["tower"], spec["impl"], spec["size"], spec["batch"])
    run = forward_fn(model, inputs)
    gc.collect()
    construction_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    # Model construction (random init) can peak above the forward passes, which would hide them in the
    # high-water mark; Linux lets a process reset its own mark to the current RSS.
    hwm_reset = _reset_peak_rss()
    before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    resting_kib = _proc_status_kib("VmRSS")
    for _ in range(spec["iters"]):
        run()
    after_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm_kib = _proc_status_kib("VmHWM")
    tensor_peak = tensor_peak_mib(run)
    print(
        json.dumps(
            {
                "param_mib": parameter_mib(model),
                "construction_peak_mib": construction_kib / 1024.0,
                "peak_reset": hwm_reset,
                "before_mib": before_kib / 1024.0,
                "resting_mib": None if resting_kib is None else resting_kib / 1024.0,
                "peak_mib": after_kib / 1024.0,
                "increase_mib": (after_kib - before_kib) / 1024.0,
                "vm_hwm_mib": None if hwm_kib is None else hwm_kib / 1024.0,
                "tensor_peak_mib": tensor_peak,
            }
        ),
        flush=True,
    )


def measure_memory(tower: str, impl: str, size: int, batch: int, threads: int, iters: int) -> dict[str, Any] | None:
    what = f"{size}px" if tower == "vision" else f"{size} tokens"
    log(f"memory: {LABEL[impl]} {tower} {what} batch {batch} (fresh subprocess)")
    spec = {"tower": tower, "impl": impl, "size": size, "batch": batch, "threads": threads, "iters": iters}
    command = [sys.executable, os.path.abspath(__file__), "--_memory-child", json.dumps(spec)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    except subprocess.TimeoutExpired:
        log(f"memory child for {LABEL[impl]} {tower} {size} timed out")
        return None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        log(f"memory child for {LABEL[impl]} {tower} {size} failed (rc {done.returncode}):\n{done.stderr[-2000:]}")
        return None
    result = json.loads(lines[-1])
    hwm = result.get("vm_hwm_mib")
    if hwm is not None and result["peak_mib"] > hwm + 16:
        log(
            f"warning: ru_maxrss ({result['peak_mib']:.0f} MiB) exceeds the child's own VmHWM ({hwm:.0f} MiB): "
            "the peak was inherited from the parent at spawn time, memory figures are inflated"
        )
    return result


# ----------------------------------------------------------------------------------------------- report


def cpu_model_and_flags() -> tuple[str, set[str]]:
    """The CPU's model name and flags from /proc/cpuinfo ("unknown" and none elsewhere)."""
    cpu, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name") and cpu == "unknown":
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return cpu, flags


def machine_info(threads: int) -> dict[str, Any]:
    import transformers

    cpu, flags = cpu_model_and_flags()
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
    isa = [flag for flag in sorted(flags) if flag in wanted]
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "threads_requested": threads,
        "usable_cpus": usable,
        "cpu": cpu,
        "platform": platform.platform(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "isa_flags": " ".join(isa) or "none of avx2/fma/avx512/amx",
        "native_bf16": bool({"avx512_bf16", "amx_bf16"} & flags),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "bi_wkv_path": bi_wkv_path(),
    }


def bi_wkv_path() -> str:
    """Which Bi-WKV path RWKV-CLIP's default ("auto") backend takes on the CPU, and why."""
    from rwkv_clip_hf.ops.bi_wkv.kernel import KernelUnavailableError, load_kernel

    try:
        load_kernel("cpu")
    except KernelUnavailableError as error:
        return f"PyTorch chunked path ({error})"
    source = os.environ.get("LOCAL_KERNELS")
    return "CPU kernel" + (f" (LOCAL_KERNELS={source})" if source else " (from the Hub cache)")


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _percent(share: float | None) -> float | None:
    return None if share is None else 100.0 * share


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def print_table(rows: list[dict[str, Any]]) -> None:
    headers = [
        "what",
        "size",
        "dtype",
        "batch",
        "CLIP it/s",
        "RWKV it/s",
        "speed x",
        "CLIP peak MiB",
        "RWKV peak MiB",
        "mem x",
        "CLIP +fwd MiB",
        "RWKV +fwd MiB",
        "+fwd x",
        "CLIP %peak",
        "RWKV %peak",
    ]
    table = []
    for row in rows:
        mem = row.get("memory") or {}
        clip_mem, rwkv_mem = mem.get("clip") or {}, mem.get("rwkv") or {}
        table.append(
            [
                row["what"],
                str(row["size"]),
                row.get("precision", "fp32"),
                str(row["batch"]),
                _fmt(row["clip"]["items_per_s"], ".2f"),
                _fmt(row["rwkv"]["items_per_s"], ".2f"),
                _fmt(row["speed_ratio"], ".3f"),
                _fmt(clip_mem.get("peak_mib"), ".0f"),
                _fmt(rwkv_mem.get("peak_mib"), ".0f"),
                _fmt(row.get("memory_ratio"), ".3f"),
                _fmt(clip_mem.get("increase_mib"), ".0f"),
                _fmt(rwkv_mem.get("increase_mib"), ".0f"),
                _fmt(row.get("forward_memory_ratio"), ".3f"),
                _fmt(_percent(row["clip"].get("gemm_peak_share")), ".0f"),
                _fmt(_percent(row["rwkv"].get("gemm_peak_share")), ".0f"),
            ]
        )
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths))
    print(line)
    print("-" * len(line))
    for r in table:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    print(
        "it/s = images/s (vision) or texts/s (text), median over the iterations; speed x = RWKV/CLIP throughput "
        "(> 1: RWKV-CLIP faster).\npeak = absolute peak RSS of a fresh process while it runs the forwards; "
        "+fwd = peak increase caused by the forwards; mem x = RWKV/CLIP (< 1: RWKV-CLIP uses less); memory is "
        "measured for fp32 only.\n%peak = the tower's FLOPs (torch.utils.flop_counter) per second as a share of "
        "this run's square GEMM throughput in the same dtype (the ceiling a tower made only of GEMMs would reach)."
    )


# ----------------------------------------------------------------------------------------------- main


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the None / False ones (whose help already says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "CPU fp32 benchmark of the RWKV-CLIP B/32 towers versus transformers CLIP ViT-B/32 (random init, "
            "no network): vision images/s and peak memory at several image sizes, text texts/s at 77 tokens, "
            "and the Bi-WKV share of RWKV-CLIP's forward time. CLIP and RWKV-CLIP are timed alternately; "
            "ratios > 1 mean RWKV-CLIP is faster, memory ratios < 1 that it uses less memory."
        ),
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--sizes", type=int, nargs="+", default=DEFAULT_SIZES, help="vision image sizes (px)")
    parser.add_argument(
        "--bf16-sizes",
        type=int,
        nargs="+",
        default=DEFAULT_BF16_SIZES,
        help="vision image sizes also timed under torch.autocast('cpu', dtype=torch.bfloat16) (batch as for --sizes, "
        "else 8 * (224/size)^2); the text tower too unless --no-text",
    )
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast workloads")
    parser.add_argument(
        "--force-bf16",
        action="store_true",
        help="run the bf16 workloads even on a CPU without AVX512-BF16 / AMX (where torch's bf16 GEMMs take a slow "
        "fallback: minutes per forward); by default they are skipped there",
    )
    parser.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=None,
        help="vision batch: one value for every size, or one per --sizes entry "
        f"(default {DEFAULT_BATCH}, 8 * (224/size)^2 for other sizes; {QUICK_VISION_BATCH} with --quick)",
    )
    parser.add_argument(
        "--text-batch", type=int, default=None, help=f"text batch (default 16; {QUICK_TEXT_BATCH} with --quick)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="warm-up iterations per model (at least 2 is advised)")
    parser.add_argument("--min-time", type=float, default=3.0, help="minimum measured seconds per model and workload")
    parser.add_argument("--min-iters", type=int, default=3, help="minimum measured iterations per model and workload")
    parser.add_argument("--memory-iters", type=int, default=2, help="forwards run by each memory subprocess")
    parser.add_argument(
        "--memory-jobs",
        type=int,
        default=2,
        help="memory subprocesses run at once (each measures only its own RSS, so overlap does not skew them)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--no-text", action="store_true", help="skip the text tower")
    parser.add_argument("--no-profile", action="store_true", help="skip the torch.profiler op breakdown")
    parser.add_argument("--profile-iters", type=int, default=2, help="forwards recorded by the profiler")
    parser.add_argument("--top-ops", type=int, default=8, help="ops listed per profiled model")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: size 224 only, tiny --min-time, small batches, one profiled and one memory forward",
    )
    parser.add_argument("--json", metavar="PATH", help="also write every result to this JSON file")
    parser.add_argument("--_memory-child", dest="memory_child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.memory_child is not None:
        return args
    if args.quick:
        args.sizes = [NATIVE_IMAGE_SIZE]
        args.bf16_sizes = [NATIVE_IMAGE_SIZE]
        args.min_time = min(args.min_time, 0.05)
        args.profile_iters = 1
        args.memory_iters = 1
        if args.batch is None:
            args.batch = [QUICK_VISION_BATCH]
        if args.text_batch is None:
            args.text_batch = QUICK_TEXT_BATCH
    if args.text_batch is None:
        args.text_batch = 16
    if args.batch is None:
        args.batch = [DEFAULT_BATCH.get(s, max(1, round(8 * (NATIVE_IMAGE_SIZE / s) ** 2))) for s in args.sizes]
    elif len(args.batch) == 1:
        args.batch = args.batch * len(args.sizes)
    elif len(args.batch) != len(args.sizes):
        parser.error(f"--batch needs 1 or {len(args.sizes)} values (one per size), got {len(args.batch)}")
    if args.no_bf16:
        args.bf16_sizes = []
    by_size = dict(zip(args.sizes, args.batch))
    args.bf16_batch = [
        by_size.get(s, DEFAULT_BATCH.get(s, max(1, round(8 * (NATIVE_IMAGE_SIZE / s) ** 2)))) for s in args.bf16_sizes
    ]
    if min(args.batch + [args.text_batch, args.threads, args.min_iters, args.memory_jobs, args.memory_iters]) < 1:
        parser.error("batches, --threads, --min-iters, --memory-jobs and --memory-iters must be >= 1")
    if args.warmup < 0 or args.profile_iters < 1:
        parser.error("--warmup must be >= 0 and --profile-iters >= 1")
    return args


def summarize(times: dict[str, list[float]], batch: int) -> dict[str, dict[str, Any]]:
    out = {}
    for impl, seconds in times.items():
        median = statistics.median(seconds)
        out[impl] = {
            "iterations": len(seconds),
            "median_s": median,
            "min_s": min(seconds),
            "max_s": max(seconds),
            "items_per_s": batch / median,
            "times_s": seconds,
        }
    return out


def run_workload(
    args: argparse.Namespace, tower: str, size: int, batch: int, results: dict[str, Any], precision: str = "fp32"
) -> dict[str, Any]:
    what = "vision" if tower == "vision" else "text"
    shape = f"{size}px" if tower == "vision" else f"{size} tokens"
    shape += f" {precision}"
    row: dict[str, Any] = {"what": what, "size": size, "batch": batch, "precision": precision}

    models = results.setdefault("_models", {})
    runs = {}
    for impl in IMPLS:
        key = (tower, impl)
        if key not in models:
            log(f"building {LABEL[impl]} {what} model")
            models[key] = build_model(tower, impl)
        inputs = make_inputs(tower, impl, size, batch)
        runs[impl] = forward_fn(models[key], inputs, precision)
        row.setdefault("flops", {})[impl] = forward_flops(models[key], inputs)
    row["param_mib"] = {impl: parameter_mib(models[(tower, impl)]) for impl in IMPLS}
    row["clip_attention"] = getattr(models[(tower, "clip")].config, "_attn_implementation", None)

    log(
        f"timing: {what} {shape} batch {batch}: {args.warmup} warm-up each, then CLIP/RWKV-CLIP alternating "
        f"for >= {args.min_iters} iterations and >= {args.min_time:g} s each"
    )
    row.update(summarize(time_interleaved(runs, args.warmup, args.min_time, args.min_iters), batch))
    row["speed_ratio"] = _ratio(row["rwkv"]["items_per_s"], row["clip"]["items_per_s"])
    log(
        f"  CLIP {row['clip']['items_per_s']:.2f}/s, RWKV-CLIP {row['rwkv']['items_per_s']:.2f}/s "
        f"(x{row['speed_ratio']:.3f})"
    )

    peak = results["_gemm_peak"].get(precision)
    for impl in IMPLS:
        achieved = row["flops"][impl] / row[impl]["median_s"] / 1e9
        row[impl]["gflops"] = achieved
        row[impl]["gemm_peak_share"] = _ratio(achieved, peak)
    log(f"Bi-WKV share: {what} {shape} batch {batch} (RWKV-CLIP with a timed bi_wkv)")
    row["bi_wkv"] = measure_bi_wkv_share(runs["rwkv"], args.min_time / 2, args.min_iters)

    if not args.no_profile:
        row["profile"] = {}
        for impl in IMPLS:
            log(f"profiler: {LABEL[impl]} {what} {shape} batch {batch}, {args.profile_iters} forward(s)")
            row["profile"][impl] = profile_ops(runs[impl], args.profile_iters, impl, args.top_ops)
    return row


def print_settings(args: argparse.Namespace, info: dict[str, Any]) -> None:
    """The `== machine ==` header: versions, CPU, settings, batches. Drops the bf16 workloads (from `args`)
    on a CPU without native bf16 unless --force-bf16."""
    print("== machine ==")
    for key in ("torch", "transformers", "python", "threads", "usable_cpus", "cpu", "platform", "mkldnn"):
        print(f"{key:>13}: {info[key]}")
    print(
        f"{'settings':>13}: fp32, eval, inference_mode, random init; warmup {args.warmup}, "
        f"min-time {args.min_time:g} s, min-iters {args.min_iters}" + (" (--quick)" if args.quick else "")
    )
    print(f"{'isa flags':>13}: {info['isa_flags']} (torch CPU capability {info['torch_cpu_capability']})")
    print(f"{'Bi-WKV':>13}: {info['bi_wkv_path']}")
    if args.bf16_sizes and not (info["native_bf16"] or args.force_bf16):
        print(f"{'bf16 autocast':>13}: skipped, no AVX512-BF16 / AMX on this CPU (--force-bf16 runs it anyway)")
        args.bf16_sizes, args.bf16_batch = [], []
    print(f"{'load average':>13}: {info['load_average']} (1, 5, 15 min; other processes share the CPUs if high)")
    print(f"{'vision batch':>13}: " + ", ".join(f"{s}px -> {b}" for s, b in zip(args.sizes, args.batch)))
    if args.bf16_sizes:
        print(
            f"{'bf16 autocast':>13}: " + ", ".join(f"{s}px -> {b}" for s, b in zip(args.bf16_sizes, args.bf16_batch))
        )
    if not args.no_text:
        print(f"{'text batch':>13}: {args.text_batch} x {TEXT_LENGTH} tokens")
    print(flush=True)


Workload = tuple[str, int, int]  # (tower, size, batch)


def plan_workloads(args: argparse.Namespace) -> tuple[list[Workload], list[Workload]]:
    """The fp32 and the bf16-autocast workloads, in the order they run."""
    workloads = [("vision", size, batch) for size, batch in zip(args.sizes, args.batch)]
    if not args.no_text:
        workloads.append(("text", TEXT_LENGTH, args.text_batch))
    bf16_workloads = [("vision", size, batch) for size, batch in zip(args.bf16_sizes, args.bf16_batch)]
    if bf16_workloads and not args.no_text:
        bf16_workloads.append(("text", TEXT_LENGTH, args.text_batch))
    return workloads, bf16_workloads


def measure_memories(args: argparse.Namespace, workloads: list[Workload]) -> dict[tuple[str, int], dict[str, Any]]:
    """Peak memory of both models on each workload, one fresh subprocess each (none with --no-memory)."""
    # Memory first, while this process is still small: a child's ru_maxrss starts at no less than the
    # parent's RSS at spawn time (the kernel carries the pre-exec peak over), so spawning children from a
    # process that already holds the models would inflate their peaks.
    memory = {}
    if args.no_memory:
        return memory
    jobs = [(tower, impl, size, batch) for tower, size, batch in workloads for impl in IMPLS]
    log(f"memory: {len(jobs)} fresh subprocesses, {args.memory_jobs} at a time")
    with ThreadPoolExecutor(max_workers=args.memory_jobs) as pool:
        measured = pool.map(lambda job: measure_memory(*job, args.threads, args.memory_iters), jobs)
        results = dict(zip(jobs, measured))
    for tower, size, batch in workloads:
        clip_mem, rwkv_mem = results[(tower, "clip", size, batch)], results[(tower, "rwkv", size, batch)]
        memory[(tower, size)] = {"memory": {"clip": clip_mem, "rwkv": rwkv_mem}}
        if clip_mem and rwkv_mem:
            memory[(tower, size)]["memory_ratio"] = _ratio(rwkv_mem["peak_mib"], clip_mem["peak_mib"])
            memory[(tower, size)]["forward_memory_ratio"] = _ratio(rwkv_mem["increase_mib"], clip_mem["increase_mib"])
            memory[(tower, size)]["tensor_peak_ratio"] = _ratio(
                rwkv_mem.get("tensor_peak_mib"), clip_mem.get("tensor_peak_mib")
            )
    return memory


def run_timings(
    args: argparse.Namespace,
    info: dict[str, Any],
    workloads: list[Workload],
    bf16_workloads: list[Workload],
    memory: dict[tuple[str, int], dict[str, Any]],
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The GEMM peaks, then every workload timed (`run_workload`): the result rows and the peaks."""
    log("GEMM peak: square fp32 and bf16 torch.mm")
    # without native bf16 a 2048^2 bf16 GEMM takes minutes: a small one still shows the rate
    bf16_size = GEMM_PEAK_SIZE if info["native_bf16"] else 256
    state: dict[str, Any] = {
        "_gemm_peak": {"fp32": gemm_peak(torch.float32), "bf16": gemm_peak(torch.bfloat16, bf16_size)}
    }
    rows = []
    for tower, size, batch in workloads:
        row = run_workload(args, tower, size, batch, state)
        row.update(memory.get((tower, size), {}))
        rows.append(row)
    for tower, size, batch in bf16_workloads:
        rows.append(run_workload(args, tower, size, batch, state, precision="bf16"))
    state.pop("_models", None)
    return rows, state.pop("_gemm_peak")


def print_throughput(rows: list[dict[str, Any]], info: dict[str, Any], peaks: dict[str, float]) -> None:
    """The `== throughput and memory ==` table, the GEMM peaks, parameter memory and CLIP's attention."""
    print("== throughput and memory ==")
    print_table(rows)
    print(
        f"GEMM peak of this run ({GEMM_PEAK_SIZE}^2 torch.mm, {info['threads']} threads): fp32 {peaks['fp32']:.1f} "
        f"GFLOP/s, bf16 {peaks['bf16']:.1f} GFLOP/s; load average at the end {info['load_average_end']}"
    )
    params = {}
    for row in rows:
        params.setdefault(row["what"], row["param_mib"])
    for what, mib in params.items():
        print(f"parameter memory, {what}: CLIP {mib['clip']:.1f} MiB, RWKV-CLIP {mib['rwkv']:.1f} MiB")
    attention = sorted({str(row["clip_attention"]) for row in rows})
    print(f"CLIP attention implementation: {', '.join(attention)}")


def print_bi_wkv_shares(rows: list[dict[str, Any]]) -> None:
    print("\n== Bi-WKV share of RWKV-CLIP forward time (timed wrapper around modeling_rwkv_clip.bi_wkv) ==")
    for row in rows:
        b = row["bi_wkv"]
        label = f"{row['what']:>6} {row['size']:>4} {row['precision']} batch {row['batch']:>2}"
        if b is None:
            print(f"{label}: not measured")
            continue
        print(
            f"{label}: {100 * b['share']:5.1f}% "
            f"({b['bi_wkv_s'] / b['iterations'] * 1000:.1f} of {b['total_s'] / b['iterations'] * 1000:.1f} ms "
            f"per forward, {b['calls_per_forward']:.0f} calls/forward, {b['iterations']} forwards)"
        )


def print_profiles(rows: list[dict[str, Any]]) -> None:
    print("\n== torch.profiler: self CPU time by category and top ops (includes profiler overhead) ==")
    for row in rows:
        for impl in IMPLS:
            prof = row["profile"][impl]
            cats = ", ".join(f"{name} {100 * share:.1f}%" for name, share in prof["categories"].items())
            print(f"{row['what']} {row['size']} {row['precision']} batch {row['batch']}, {LABEL[impl]}: {cats}")
            for op in prof["top_ops"]:
                per_forward = op["self_ms"] / prof["iterations"]
                print(f"    {op['op']:<50} {per_forward:9.2f} ms/fwd {100 * op['share']:5.1f}%")


def check_goals(args: argparse.Namespace, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each goal of issue #20 with its measured value and status (met, NOT MET, not measured)."""
    goals = []
    by_key = {(row["what"], row["size"], row.get("precision", "fp32")): row for row in rows}
    for (what, size, precision), threshold in SPEED_GOALS.items():
        row = by_key.get((what, size, precision))
        ratio = row["speed_ratio"] if row else None
        status = "not measured" if ratio is None else ("met" if ratio >= threshold else "NOT MET")
        where = f"{size} px" if what == "vision" else f"{size} tokens"
        batch = f", batch {row['batch']}" if row else ""
        goals.append(
            {
                "goal": f"{what} {where}{batch}, {precision}: speed >= {threshold:.2f}x CLIP",
                "threshold": threshold,
                "value": ratio,
                "status": status,
            }
        )
    size, threshold = FORWARD_MEMORY_GOAL
    row = by_key.get(("vision", size, "fp32"))
    value = row.get("forward_memory_ratio") if row else None
    goals.append(
        {
            "goal": f"memory added by a {size} px forward <= {threshold:.2f}x CLIP's",
            "threshold": threshold,
            "value": value,
            "status": "not measured" if value is None else ("met" if value <= threshold else "NOT MET"),
        }
    )
    value = row.get("tensor_peak_ratio") if row else None
    mem = row.get("memory", {}) if row else {}
    detail = ""
    if value is not None:
        detail = f": {mem['rwkv']['tensor_peak_mib']:.0f} vs {mem['clip']['tensor_peak_mib']:.0f} MiB"
    goals.append(
        {
            "goal": f"  the same as live tensor memory (allocator-independent){detail}",
            "threshold": threshold,
            "value": value,
            "status": "not measured" if value is None else ("met" if value <= threshold else "NOT MET"),
        }
    )
    vision_rows = [row for row in rows if row["what"] == "vision" and row.get("precision", "fp32") == "fp32"]
    mem_ratios = [row.get("memory_ratio") for row in vision_rows]
    if args.no_memory or not vision_rows or any(r is None for r in mem_ratios):
        mem_status, mem_value = "not measured", None
    else:
        mem_value = max(mem_ratios)
        mem_status = "met" if mem_value <= 1.0 else "NOT MET"
    goals.append(
        {
            "goal": "RWKV-CLIP peak memory <= CLIP at every image size (" + ", ".join(map(str, args.sizes)) + ")",
            "threshold": 1.0,
            "value": mem_value,
            "status": mem_status,
        }
    )
    return goals


def print_goals(goals: list[dict[str, Any]]) -> None:
    print("\n== goals (issue #20) ==")
    for goal in goals:
        value = "" if goal["value"] is None else f" (x{goal['value']:.3f})"
        print(f"  [{goal['status']}] {goal['goal']}{value}")
    print("  [see make bench-train] training step (batch 8, 224 px + 77 tokens) >= 1.10x CLIPModel")
    print("  (numerics: tests/ops and tests/test_conversion.py; the %peak columns show how close each tower runs to")
    print("   the GEMM ceiling, i.e. what bounds a goal that is not met)")


def write_json(path: str, payload: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=2)
    print(f"\nwrote {path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_child is not None:
        memory_child(json.loads(args.memory_child))
        return 0

    torch.set_num_threads(args.threads)
    import rwkv_clip_hf  # noqa: F401  (imported before timing so import cost is never measured)

    info = machine_info(args.threads)
    print_settings(args, info)
    workloads, bf16_workloads = plan_workloads(args)
    memory = measure_memories(args, workloads)
    rows, peaks = run_timings(args, info, workloads, bf16_workloads, memory)
    info["load_average_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())

    print_throughput(rows, info, peaks)
    print_bi_wkv_shares(rows)
    if not args.no_profile:
        print_profiles(rows)
    goals = check_goals(args, rows)
    print_goals(goals)
    if args.json:
        arguments = {k: v for k, v in vars(args).items() if k != "memory_child"}
        write_json(
            args.json, {"machine": info, "args": arguments, "rows": rows, "goals": goals, "gemm_peak_gflops": peaks}
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
