"""Training-step time of RWKV-CLIP B/32 against transformers CLIPModel ViT-B/32, same batch, same run.

    python benchmarks/bench_train.py [--batch 8] [--steps 5] [--threads 2] [--optimizer fused] [--json out.json]

One step = forward with the contrastive loss, backward, AdamW step, on random-initialised models, float32,
224 px images and 77-token captions. `--optimizer` picks torch's AdamW implementation for both models: "fused"
(the default: what transformers' Trainer uses, `optim="adamw_torch_fused"`), "foreach", or "for-loop" (torch's
own default on CPU tensors, one parameter at a time, whose temporaries make it several times slower).
Both models live in one process and their steps alternate (CLIP, RWKV-CLIP, CLIP, ...) after a warm-up step
each, so machine noise hits both. Prints the machine (CPU model, AVX2 / AVX-512 / AMX flags, load average at the
start and the end), the median and best step time of each and the ratio CLIP / RWKV-CLIP (> 1: RWKV-CLIP trains
faster) against the goal of issue #20 (>= 1.10x).
"""

import argparse
import json
import os
import statistics
import time

import torch

# bench_towers (this folder), imported before transformers and rwkv_clip_hf, puts the checkout's src/ on sys.path
# and sets HF_HUB_OFFLINE; its CLIP ViT-B/32 config and CPU probe are shared here
from bench_towers import clip_b32_config, cpu_model_and_flags
from transformers import CLIPModel

from rwkv_clip_hf import RWKVCLIPConfig, RWKVCLIPModel

GOAL = 1.10


def machine() -> dict:
    cpu, flags = cpu_model_and_flags()
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
    return {
        "cpu": cpu,
        "isa_flags": " ".join(flag for flag in sorted(flags) if flag in wanted),
        "torch": torch.__version__,
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


OPTIMIZERS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}


def stepper(model, inputs, optimizer_kind="fused"):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, **OPTIMIZERS[optimizer_kind])
    model.train()

    def step():
        loss = model(**inputs, return_loss=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="measured steps per model (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="fused", help="AdamW implementation")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if min(args.batch, args.steps, args.threads) < 1:
        parser.error("--batch, --steps and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    info = machine()
    torch.manual_seed(0)
    pixel_values = torch.randn(args.batch, 3, 224, 224)
    input_ids = torch.randint(1, 49406, (args.batch, 77))
    input_ids[:, 0], input_ids[:, -1] = 49406, 49407
    inputs = {"pixel_values": pixel_values, "input_ids": input_ids}

    rwkv = RWKVCLIPModel(RWKVCLIPConfig.from_preset("B/32"))
    rwkv.config.vision_config.drop_path_rate = 0.0  # same work every step
    steps = {
        "clip": stepper(CLIPModel(clip_b32_config()), inputs, args.optimizer),
        "rwkv": stepper(rwkv, inputs, args.optimizer),
    }
    times = {name: [] for name in steps}
    for step in steps.values():
        step()  # warm-up
    for _ in range(args.steps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    info["load_average_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    result = {
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "optimizer": args.optimizer,
        "machine": info,
        "rwkv_clip_step_s": statistics.median(times["rwkv"]),
        "clip_step_s": statistics.median(times["clip"]),
        "rwkv_clip_best_s": min(times["rwkv"]),
        "clip_best_s": min(times["clip"]),
        "times_s": times,
    }
    result["ratio_clip_over_rwkv"] = result["clip_step_s"] / result["rwkv_clip_step_s"]
    result["ratio_best"] = result["clip_best_s"] / result["rwkv_clip_best_s"]
    met = "met" if result["ratio_clip_over_rwkv"] >= GOAL else "NOT MET"
    print(f"machine: {info['cpu']}, flags {info['isa_flags'] or 'none of avx2/avx512/amx'}, torch {info['torch']}")
    print(f"load average (1, 5, 15 min): start {info['load_average']}, end {info['load_average_end']}")
    print(
        f"training step, batch {args.batch}, 224 px + 77 tokens, fp32, {result['threads']} threads, AdamW "
        f"{args.optimizer}, alternating"
    )
    print(f"{'':22}{'median':>9}{'best':>9}")
    print(f"{'RWKV-CLIP B/32':22}{result['rwkv_clip_step_s']:8.3f}s{result['rwkv_clip_best_s']:8.3f}s")
    print(f"{'CLIP ViT-B/32 (HF)':22}{result['clip_step_s']:8.3f}s{result['clip_best_s']:8.3f}s")
    print(
        f"[{met}] training step >= {GOAL:.2f}x CLIPModel: CLIP / RWKV-CLIP = {result['ratio_clip_over_rwkv']:.2f}x "
        f"(median; best-of: {result['ratio_best']:.2f}x)"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
