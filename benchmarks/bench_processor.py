"""Preprocessing speed: RWKV-CLIP's tokenizer and image processor against transformers' CLIP ones, same run.

    python benchmarks/bench_processor.py [--captions 10000] [--images 128] [--repeats 3]

The baselines are transformers' `CLIPTokenizer` built from the same BPE vocabulary (no ftfy / HTML cleaning)
and `CLIPImageProcessorPil` (the PIL backend, as torchvision is not required). Ratios > 1 mean we are faster.
"""

import argparse
import random
import time

import numpy as np
from PIL import Image
from transformers import CLIPImageProcessorPil, CLIPTokenizer

from rwkv_clip_hf import RWKVCLIPImageProcessor, RWKVCLIPTokenizer
from rwkv_clip_hf.tokenization_rwkv_clip import bundled_vocab_and_merges

WORDS = "a photo of the dog cat red blue green small large two three on in with grass street sky running".split()


def captions(count, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(count):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 20)))
        if i % 10 == 0:
            text += " &amp; café — naïve 🐶"  # one in ten needs ftfy / HTML cleaning
        out.append(text.capitalize() + ".")
    return out


def best_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=int, default=10_000)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    texts = captions(args.captions)
    ours = RWKVCLIPTokenizer()
    vocab, merges = bundled_vocab_and_merges()
    baseline = CLIPTokenizer(vocab=vocab, merges=list(merges))
    ours(texts[:10], padding=True)
    baseline(texts[:10], padding=True)
    t_ours = best_time(
        lambda: ours(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"), args.repeats
    )
    t_base = best_time(
        lambda: baseline(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"),
        args.repeats,
    )

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)) for _ in range(args.images)]
    ours_images, base_images = RWKVCLIPImageProcessor(), CLIPImageProcessorPil()
    i_ours = best_time(lambda: ours_images(images, return_tensors="pt"), args.repeats)
    i_base = best_time(lambda: base_images(images, return_tensors="pt"), args.repeats)

    print("| step | rwkv-clip-hf | transformers CLIP | ratio (baseline / ours) |")
    print("|---|---|---|---|")
    print(
        f"| tokenize {args.captions} captions to 77 ids (pt) | "
        f"{t_ours:.3f} s | {t_base:.3f} s | {t_base / t_ours:.2f}x |"
    )
    print(
        f"| preprocess {args.images} images 500x375 -> 224 (pt) | "
        f"{i_ours:.3f} s | {i_base:.3f} s | {i_base / i_ours:.2f}x |"
    )


if __name__ == "__main__":
    main()
