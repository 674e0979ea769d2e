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
    if args.top < 1:
        parser.error(f"--top must be >= 1, got {args.top}")
    if "{}" not in args.template:
        parser.error(f"--template must contain {{}} where the label goes, got {args.template!r}")

    model = args.model or rwkv_clip_hf.default_model_path()
    if args.model and looks_like_a_path(args.model) and not Path(args.model).expanduser().is_dir():
        parser.error(f"--model: no such directory: {args.model}")
    images = args.images or sorted(str(path) for path in EXAMPLES.glob("*.png"))
    if not images:
        raise SystemExit(f"no images given and none found in {EXAMPLES}")
    for image in images:
        if not image.startswith(("http://", "https://")) and not Path(image).expanduser().is_file():
            parser.error(f"--images: no such file: {image}")
    print(f"model: {model}")
    try:
        classifier = pipeline("zero-shot-image-classification", model=model)
    except (OSError, ValueError) as error:
        raise SystemExit(f"demo.py: cannot load --model {model}: {error}") from None
    try:
        results = classifier(images, candidate_labels=args.labels, hypothesis_template=args.template)
    except (OSError, ValueError) as error:  # e.g. a file that is not an image
        raise SystemExit(f"demo.py: cannot classify the images: {error}") from None
    for image, ranked in zip(images, results):
        print(f"{Path(image).name}:")
        for entry in ranked[: args.top]:
            print(f"  {entry['score']:.3f}  {entry['label']}")


def looks_like_a_path(name: str) -> bool:
    """A local path rather than a Hub id ("user/model"): absolute, relative with ./ or ../, or ~."""
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists()


if __name__ == "__main__":
    main()
