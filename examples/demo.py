"""Zero-shot image classification with RWKV-CLIP through `pipeline("zero-shot-image-classification")`.

    python examples/demo.py                     # the bundled default model on examples/images/*.png
    python examples/demo.py --model DIR_OR_HUB_ID --images a.jpg b.png --labels dog cat "a red car"

Without `--model` it uses the bundled default model (`rwkv_clip_hf.default_model_path()`: a tiny RWKV-CLIP
trained on generated drawings of coloured shapes, so it only knows colours and shapes) on the bundled example
drawings. `--model` takes a converted checkpoint directory (see conversion/) or a Hub id.
"""

import argparse
from pathlib import Path

from transformers import pipeline

import rwkv_clip_hf

EXAMPLES = Path(__file__).resolve().parent / "images"
DEFAULT_LABELS = [
    "a red circle", "a blue square", "a green triangle", "a yellow star",
    "a purple cross", "an orange diamond", "a black circle", "a white square",
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory or Hub id (default: the bundled model)")
    parser.add_argument("--images", nargs="+", default=None, help="image files or URLs (default: examples/images)")
    parser.add_argument("--labels", nargs="+", default=DEFAULT_LABELS, help="candidate labels")
    parser.add_argument("--template", default="a photo of {}.", help="hypothesis template, with {} for the label")
    parser.add_argument("--top", type=int, default=3, help="how many ranked labels to print per image")
    args = parser.parse_args()

    model = args.model or rwkv_clip_hf.default_model_path()
    images = args.images or sorted(str(path) for path in EXAMPLES.glob("*.png"))
    if not images:
        raise SystemExit(f"no images given and none found in {EXAMPLES}")
    print(f"model: {model}")
    classifier = pipeline("zero-shot-image-classification", model=model)
    results = classifier(images, candidate_labels=args.labels, hypothesis_template=args.template)
    for image, ranked in zip(images, results):
        print(f"{Path(image).name}:")
        for entry in ranked[: args.top]:
            print(f"  {entry['score']:.3f}  {entry['label']}")


if __name__ == "__main__":
    main()
