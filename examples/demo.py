"""Zero-shot image classification with RWKV-CLIP through `pipeline("zero-shot-image-classification")`.

    python examples/demo.py                                   # placeholder model, generated images
    python examples/demo.py --model DIR_OR_HUB_ID --images a.jpg b.png --labels dog cat "a red car"

`--model` takes a converted checkpoint directory (conversion/) or a Hub id. Without it, the demo builds a
randomly initialised tiny RWKV-CLIP with the real tokenizer and image processor, saves it to a temporary
directory and classifies generated images: this exercises the whole path (processor, pipeline, model), but
its scores are meaningless until the bundled trained model lands.
"""

import argparse
import tempfile

import numpy as np
from PIL import Image
from transformers import pipeline

import rwkv_clip_hf  # noqa: F401  (registers RWKV-CLIP with the Auto classes and the pipeline)
from rwkv_clip_hf import RWKVCLIPConfig, RWKVCLIPModel, RWKVCLIPProcessor


DEFAULT_LABELS = ["a red circle", "a green square", "a blue triangle"]


def generated_images() -> dict[str, Image.Image]:
    """Three small drawings: a red disc, a green square, a blue triangle on white."""
    size = 96
    yy, xx = np.mgrid[0:size, 0:size]
    shapes = {
        "red disc": ((xx - 48) ** 2 + (yy - 48) ** 2 < 30**2, (220, 30, 30)),
        "green square": ((abs(xx - 48) < 28) & (abs(yy - 48) < 28), (30, 180, 60)),
        "blue triangle": ((yy > 20) & (yy < 80) & (abs(xx - 48) < (yy - 20) * 0.6), (40, 60, 220)),
    }
    images = {}
    for name, (mask, color) in shapes.items():
        pixels = np.full((size, size, 3), 255, dtype=np.uint8)
        pixels[mask] = color
        images[name] = Image.fromarray(pixels)
    return images


def placeholder_model(directory: str) -> str:
    config = RWKVCLIPConfig(
        text_config={"hidden_size": 64, "head_size": 16, "num_hidden_layers": 2, "intermediate_size": 128},
        vision_config={
            "hidden_size": 64,
            "head_size": 16,
            "num_hidden_layers": 2,
            "intermediate_size": 128,
            "image_size": 96,
            "patch_size": 16,
        },
    )
    RWKVCLIPModel(config).save_pretrained(directory)
    RWKVCLIPProcessor.from_bundled(image_size=96).save_pretrained(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="converted checkpoint directory or Hub id (default: placeholder)")
    parser.add_argument("--images", nargs="+", help="image files or URLs (default: generated drawings)")
    parser.add_argument("--labels", nargs="+", default=DEFAULT_LABELS, help="candidate labels")
    parser.add_argument("--template", default="a photo of {}.", help="hypothesis template")
    args = parser.parse_args()

    images = {path: path for path in args.images} if args.images else generated_images()
    with tempfile.TemporaryDirectory() as scratch:
        model = args.model
        if model is None:
            print("No --model given: RANDOM tiny placeholder model, scores are meaningless.")
            model = placeholder_model(scratch)
        classifier = pipeline("zero-shot-image-classification", model=model)
        results = classifier(list(images.values()), candidate_labels=args.labels, hypothesis_template=args.template)
    for name, ranked in zip(images, results):
        print(f"{name}:")
        for entry in ranked:
            print(f"  {entry['score']:.3f}  {entry['label']}")


if __name__ == "__main__":
    main()
