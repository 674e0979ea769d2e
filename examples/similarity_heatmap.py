"""Image-caption cosine-similarity matrix of an RWKV-CLIP (or any CLIP-API) model as a PNG heatmap, with the
images above their columns and the value in every cell (the paper's figure 9).

    python examples/similarity_heatmap.py                      # bundled default model, examples/images
    python examples/similarity_heatmap.py --model DIR_OR_HUB_ID --images a.jpg b.jpg \
        --captions "a dog on a sofa" "a red car" --output similarity.png

Without `--captions`, each bundled example image gets the caption its file name spells ("blue_square.png" ->
"a blue square"), so the diagonal holds the matching pairs. Images and captions need not be as many. The
matrix is also printed. Needs matplotlib (`pip install matplotlib`, in the `eval` extra).
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
from transformers.image_utils import load_image

import rwkv_clip_hf
from rwkv_clip_hf.evaluation.features import encode_images, encode_texts, load_model_and_processor

EXAMPLES = Path(__file__).resolve().parent / "images"


def caption_of(path: str) -> str:
    words = Path(path).stem.replace("_", " ").replace("-", " ")
    return f"{'an' if words[:1] in 'aeiou' else 'a'} {words}"


def similarity_matrix(model, processor, images, captions) -> torch.Tensor:
    """(len(captions), len(images)) cosine similarities of the L2-normalised embeddings."""
    image = encode_images(model, processor, images, len(images))
    text = encode_texts(model, processor, captions)
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    return text @ image.T


def plot(similarity, images, captions, path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("the heatmap needs matplotlib: pip install matplotlib (or the package's [eval] extra)")
    rows, columns = similarity.shape
    figure = plt.figure(figsize=(2.2 + 1.0 * columns, 1.6 + 0.45 * rows))
    grid = figure.add_gridspec(2, columns, height_ratios=[1.0, 0.45 * rows], hspace=0.05, wspace=0.05)
    for j, image in enumerate(images):
        axis = figure.add_subplot(grid[0, j])
        axis.imshow(image)
        axis.axis("off")
    heat = figure.add_subplot(grid[1, :])
    heat.imshow(similarity, cmap="viridis", aspect="auto", interpolation="nearest")
    middle = (similarity.max() + similarity.min()) / 2
    for i in range(rows):
        for j in range(columns):
            value = similarity[i, j]
            heat.text(
                j,
                i,
                f"{value:.2f}",
                ha="center",
                va="center",
                fontsize=8,
                color="black" if value > middle else "white",
            )
    heat.set_xticks([])
    heat.set_yticks(range(rows), captions, fontsize=8)
    figure.suptitle(title, fontsize=9)
    # written next to the target and renamed: an interrupted run leaves no half-written PNG
    handle, temporary = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(handle)
    try:
        figure.savefig(temporary, dpi=110, bbox_inches="tight")
        os.replace(temporary, path)
    finally:
        plt.close(figure)
        if os.path.exists(temporary):
            os.unlink(temporary)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory or Hub id (default: the bundled model)")
    parser.add_argument("--images", nargs="+", default=None, help="image files or URLs (default: examples/images)")
    parser.add_argument("--captions", nargs="+", default=None, help="captions (default: from the image file names)")
    parser.add_argument("--output", type=Path, default=Path("similarity.png"), help="PNG to write")
    args = parser.parse_args(argv)

    model_name = args.model or rwkv_clip_hf.default_model_path()
    paths = args.images or sorted(str(path) for path in EXAMPLES.glob("*.png"))
    if not paths:
        raise SystemExit(f"no images given and none found in {EXAMPLES}")
    captions = args.captions or [caption_of(path) for path in paths]
    if any(not caption.strip() for caption in captions):
        raise SystemExit("--captions: empty caption given")
    if not args.output.parent.is_dir():
        raise SystemExit(f"--output {args.output}: directory {args.output.parent} does not exist")
    images = []
    for path in paths:
        if "://" not in path and not Path(path).is_file():
            raise SystemExit(f"--images: no such file: {path}")
        try:
            images.append(load_image(path))
        except (OSError, ValueError) as error:  # PIL's UnidentifiedImageError is an OSError
            raise SystemExit(f"--images: cannot read {path} as an image: {error}") from None

    try:
        model, processor = load_model_and_processor(model_name)
    except (OSError, ValueError) as error:
        raise SystemExit(f"--model {model_name}: cannot load: {error}") from None
    similarity = similarity_matrix(model, processor, images, captions)
    width = max(len(c) for c in captions)
    print(" " * width + "  " + "  ".join(f"{Path(p).name[:12]:>12}" for p in paths))
    for caption, row in zip(captions, similarity.tolist()):
        print(f"{caption:>{width}}  " + "  ".join(f"{value:12.3f}" for value in row))
    plot(similarity.numpy(), images, captions, args.output, title=f"cosine similarity: {model_name}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main(sys.argv[1:])
