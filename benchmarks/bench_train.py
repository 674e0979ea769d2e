"""Training-step time of RWKV-CLIP B/32 against transformers CLIPModel ViT-B/32, same batch, same run.

    python benchmarks/bench_train.py [--batch 8] [--steps 5] [--threads N] [--json out.json]

One step = forward with the contrastive loss, backward, AdamW step, on random-initialised models, float32,
224 px images and 77-token captions. Prints the median step time of each and the ratio CLIP / RWKV-CLIP
(> 1: RWKV-CLIP trains faster).
"""

import argparse
import json
import statistics
import time

import torch
from transformers import CLIPConfig, CLIPModel

from rwkv_clip_hf import RWKVCLIPConfig, RWKVCLIPModel


def clip_b32() -> CLIPModel:
    config = CLIPConfig(
        text_config={"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8, "num_hidden_layers": 12,
                     "max_position_embeddings": 77, "vocab_size": 49408},
        vision_config={"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
                       "image_size": 224, "patch_size": 32},
        projection_dim=512,
    )
    return CLIPModel(config)


def step_times(model, inputs, steps, warmup=1):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()
    times = []
    for index in range(warmup + steps):
        start = time.perf_counter()
        loss = model(**inputs, return_loss=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pixel_values = torch.randn(args.batch, 3, 224, 224)
    input_ids = torch.randint(1, 49406, (args.batch, 77))
    input_ids[:, 0], input_ids[:, -1] = 49406, 49407
    inputs = {"pixel_values": pixel_values, "input_ids": input_ids}

    rwkv = RWKVCLIPModel(RWKVCLIPConfig.from_preset("B/32"))
    rwkv.config.vision_config.drop_path_rate = 0.0  # same work every step
    rwkv_times = step_times(rwkv, inputs, args.steps)
    del rwkv
    clip_times = step_times(clip_b32(), inputs, args.steps)
    result = {
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "rwkv_clip_step_s": statistics.median(rwkv_times),
        "clip_step_s": statistics.median(clip_times),
    }
    result["ratio_clip_over_rwkv"] = result["clip_step_s"] / result["rwkv_clip_step_s"]
    print(f"training step, batch {args.batch}, 224 px + 77 tokens, fp32, {result['threads']} threads")
    print(f"  RWKV-CLIP B/32      {result['rwkv_clip_step_s']:.3f} s")
    print(f"  CLIP ViT-B/32 (HF)  {result['clip_step_s']:.3f} s")
    print(f"  ratio CLIP / RWKV-CLIP = {result['ratio_clip_over_rwkv']:.2f}x (goal >= 1.1x)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
